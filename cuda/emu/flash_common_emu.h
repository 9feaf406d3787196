// The SIMT emulator's versions of the inline-PTX wrappers in
// cuda/flash_common.cuh (same names and signatures; that header includes this
// one instead of its own definitions when FT_SIMT_EMU is defined).
//
// mma and ldmatrix are written from the PTX ISA 8.4 fragment tables
// ("Matrix Fragments for mma.m16n8k16 with floating point type", "Warp-level
// matrix load instruction: ldmatrix"), not from the layouts flash_common.cuh
// assumes, so a kernel that relies on a wrong layout gives wrong numbers here.
// Products are exact (bf16 x bf16 fits in f64) and summed in f64, then added to
// the f32 accumulator with one rounding.
//
// Included inside the anonymous namespace of a generated translation unit
// (no standard headers here: simt.h brought them in).
namespace fa {

// Shared addresses are plain host pointers here (32-bit .shared offsets on the GPU).
typedef unsigned char* sptr;

inline unsigned char* dyn_smem() { return simt::g.smem; }
inline sptr smem_addr(const void* p) { return (sptr)p; }

inline float bf16_half(uint32_t reg, int hi) {
    const uint32_t u = (hi ? (reg >> 16) : (reg & 0xffffu)) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32, D = A.B + C in place.
inline void mma_bf16_16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    uint64_t* s = simt::warp_slots();
    const int l = simt::lane_id();
    for (int i = 0; i < 4; ++i) s[l * 4 + i] = (uint64_t)a[i] | ((i < 2 ? (uint64_t)(i == 0 ? b0 : b1) : 0) << 32);
    simt::warp_barrier("mma.sync");
    double A[16][16], B[16][8];
    for (int lane = 0; lane < 32; ++lane) {
        const int group = lane >> 2, tig = lane & 3;
        // A fragment: a0..a7 = 4 registers of 2 bf16; rows group / group+8,
        // columns tig*2 + (i & 1) (+8 for a4..a7).
        for (int i = 0; i < 8; ++i) {
            const int row = (i < 2 || (i >= 4 && i < 6)) ? group : group + 8;
            const int col = tig * 2 + (i & 1) + (i >= 4 ? 8 : 0);
            A[row][col] = bf16_half((uint32_t)s[lane * 4 + i / 2], i & 1);
        }
        // B fragment: b0..b3 = 2 registers; rows tig*2 + (i & 1) (+8 for b2, b3), column group.
        for (int i = 0; i < 4; ++i) {
            const int row = tig * 2 + (i & 1) + (i >= 2 ? 8 : 0);
            B[row][group] = bf16_half((uint32_t)(s[lane * 4 + i / 2] >> 32), i & 1);
        }
    }
    const int group = l >> 2, tig = l & 3;
    float out[4];
    // C/D fragment: c0, c1 in row group, c2, c3 in row group+8; columns tig*2 + (i & 1).
    for (int i = 0; i < 4; ++i) {
        const int row = i < 2 ? group : group + 8;
        const int col = tig * 2 + (i & 1);
        double acc = 0;
        for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
        out[i] = (float)((double)d[i] + acc);
    }
    simt::warp_barrier("mma.sync");
    for (int i = 0; i < 4; ++i) d[i] = out[i];
}

// ldmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16: lanes 8i..8i+7 give the
// row addresses of matrix i; register i of every lane receives matrix i.
inline void ldsm(unsigned (&r)[4], sptr addr, bool trans) {
    const int l = simt::lane_id();
    const unsigned char** rows = &simt::g.slot_ptr[(size_t)simt::warp_id() * 32];
    if ((uintptr_t)addr & 15) simt::fail("ldmatrix: row address not 16-byte aligned");
    if (addr < simt::g.smem || addr + 16 > simt::g.smem + simt::g.smem_bytes)
        simt::fail("ldmatrix: row address outside dynamic shared memory");
    rows[l] = addr;
    simt::warp_barrier("ldmatrix");
    for (int i = 0; i < 4; ++i) {
        uint16_t e0, e1;
        if (!trans) {  // lane l holds row l/4, elements 2(l%4), 2(l%4)+1
            const unsigned char* row = rows[i * 8 + l / 4];
            std::memcpy(&e0, row + 4 * (l % 4), 2);
            std::memcpy(&e1, row + 4 * (l % 4) + 2, 2);
        } else {  // transposed: element l/4 of rows 2(l%4) and 2(l%4)+1
            std::memcpy(&e0, rows[i * 8 + 2 * (l % 4)] + 2 * (l / 4), 2);
            std::memcpy(&e1, rows[i * 8 + 2 * (l % 4) + 1] + 2 * (l / 4), 2);
        }
        r[i] = (uint32_t)e0 | ((uint32_t)e1 << 16);
    }
    simt::warp_barrier("ldmatrix");
}

inline void ldsm_x4(unsigned (&r)[4], sptr addr) { ldsm(r, addr, false); }
inline void ldsm_x4_trans(unsigned (&r)[4], sptr addr) { ldsm(r, addr, true); }

inline void cp_async_16(sptr dst, const void* src, bool valid) { simt::cp_async_16(dst, src, valid); }
inline void cp_async_commit() {}
inline void cp_async_wait_all() { simt::cp_async_wait_all(); }

}  // namespace fa
