// What the flash attention kernels (cuda/flash_attn.cu: tensor cores, head_dim
// 64 / 128; cuda/flash_attn_generic.cu: any other head_dim) share. Two parts:
//
// 1. Warp-level tensor-core and async-copy wrappers (inline PTX, sm_80+).
// Only the instructions live in this part, each behind a small function, so
// that the kernels' index math reads as plain C++ (and can be exercised
// off-GPU: cuda/emu/flash_common_emu.h replaces these few functions).
//
// PTX ISA references (PTX ISA 8.4, section "Warp Level Matrix Multiply-
// Accumulate Instructions" and "Data Movement and Conversion Instructions"):
//   mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 -- "Matrix Fragments
//       for mma.m16n8k16 with floating point type"
//   ldmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16 -- "Warp-level matrix
//       load instruction: ldmatrix"
//   cp.async.cg.shared.global, cp.async.commit_group, cp.async.wait_group
//
// Fragment layouts assumed (lane = %laneid, g = lane >> 2, t = lane & 3; a
// .b32 register holding two bf16 keeps the lower-indexed element in its low
// 16 bits):
//   A (16x16, row-major, 4 regs):  a0 = A[g  ][2t..2t+1]   a1 = A[g+8][2t..2t+1]
//                                  a2 = A[g  ][2t+8..+9]   a3 = A[g+8][2t+8..+9]
//   B (16x8,  "col", 2 regs):      b0 = B[2t..2t+1][g]     b1 = B[2t+8..2t+9][g]
//   C/D (16x8, f32, 4 regs):       c0,c1 = C[g][2t], C[g][2t+1]
//                                  c2,c3 = C[g+8][2t], C[g+8][2t+1]
//   ldmatrix .x4: lanes 8i..8i+7 give the 8 row addresses (16 bytes each) of
//   matrix i; register i of every lane receives matrix i. Without .trans lane
//   L gets M[L/4][2(L%4)], M[L/4][2(L%4)+1]; with .trans it gets
//   M[2(L%4)][L/4], M[2(L%4)+1][L/4] (rows = the addressed rows).
// Consequence used throughout (as in FlashAttention-2): the C fragments of
// two adjacent n8 tiles (columns 16k..16k+15) repacked to bf16 pairs are
// exactly the A fragment of k-slice k of the next product:
//   a0 = (C[2k].c0,c1) a1 = (C[2k].c2,c3) a2 = (C[2k+1].c0,c1) a3 = (C[2k+1].c2,c3).
#pragma once

#ifdef FT_SIMT_EMU
// Off-GPU: the SIMT emulator's versions of the functions below (cuda/emu/).
#include "emu/flash_common_emu.h"
#else

#include <cuda_bf16.h>

namespace fa {

// A shared-memory address in the .shared window (what ldmatrix / cp.async take).
typedef unsigned sptr;

// Start of the kernel's dynamic shared memory (16-byte aligned).
__device__ __forceinline__ unsigned char* dyn_smem() {
    extern __shared__ __align__(16) unsigned char fa_dyn_smem[];
    return fa_dyn_smem;
}

__device__ __forceinline__ sptr smem_addr(const void* p) {
    return (sptr)__cvta_generic_to_shared(p);
}

// D += A·B for one m16n8k16 tile (bf16 inputs, f32 accumulate), in place.
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const unsigned (&a)[4], unsigned b0,
                                               unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four 8x8 b16 matrices; lane L supplies the address of row L%8 of matrix L/8.
__device__ __forceinline__ void ldsm_x4(unsigned (&r)[4], sptr addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}

__device__ __forceinline__ void ldsm_x4_trans(unsigned (&r)[4], sptr addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}

// 16-byte global -> shared copy, asynchronous. When `valid` is false nothing is
// read (src-size 0) and the 16 destination bytes are zero-filled; `src` must
// still be a valid address. Both addresses 16-byte aligned.
__device__ __forceinline__ void cp_async_16(sptr dst, const void* src, bool valid) {
    const unsigned n = valid ? 16u : 0u;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n)
                 : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits for every cp.async this thread issued (all committed groups).
// Other threads' copies become visible only after a following __syncthreads().
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

}  // namespace fa

#endif  // FT_SIMT_EMU

// 2. Device code both kernel files use, compiled for the GPU and the
// emulator alike: types, scalar and warp helpers, the tensor-core kernels'
// tile loads / stores and warp-level products, and the entry points'
// argument lists. The functions are inline, so a module's PTX holds only the
// code its own kernels call.
#include <cuda_bf16.h>

namespace fa {

typedef __nv_bfloat16 bf16;
typedef long long i64;

// Threads per block of every fwd / bwd_dq / bwd_dkdv kernel: 4 warps (each
// owns 16 rows of a tensor-core kernel's tile, or one row of a generic one).
constexpr int NTHREADS = 128;

__device__ __forceinline__ float neg_inf() { return __int_as_float((int)0xff800000u); }

// The soft-cap of a score s = scale·(q·k): tanh(s / c)·c in f32, the CPU
// reference's order of operations, except that s / c is s·(1/c) with 1/c
// rounded once per kernel (a true division's slow path is a subroutine call,
// which makes ptxas spill in these register-heavy loops; the difference is
// at most an ulp before tanh). `th` receives tanh(s / c), from which the
// backward's slope 1 − th² follows. Only the *_capped kernels call it, so the
// plain ones compile exactly as without it.
__device__ __forceinline__ float soft_cap(float s, float c, float inv_c, float& th) {
    th = tanhf(s * inv_c);
    return th * c;
}
__device__ __forceinline__ float bf2f(bf16 x) { return __bfloat162float(x); }

// Two floats -> one .b32 holding two bf16 (round to nearest even); `lo` in the
// low 16 bits, i.e. the lower-indexed element of an mma fragment register.
__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {
    return (unsigned)__bfloat16_as_ushort(__float2bfloat16_rn(lo)) |
           ((unsigned)__bfloat16_as_ushort(__float2bfloat16_rn(hi)) << 16);
}

// Sum over the 32 lanes, returned to every lane. Butterfly: every lane adds
// the same two operands at every level (commuted), so all lanes hold
// bit-identical results; fixed order, hence deterministic.
__device__ __forceinline__ float warp_allsum(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

// Max / sum over the 4 lanes of a quad (the lanes sharing one accumulator row).
__device__ __forceinline__ float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// Whether key `kc` is visible from query `qr` (sequence-local indices, `len`
// tokens, window W, 0 = none). Queries past the end see nothing.
__device__ __forceinline__ bool visible(int qr, int kc, int len, int W) {
    return qr < len && kc <= qr && (W == 0 || qr - kc < W);
}

// The window as the kernels use it: 0 when it cannot mask anything in a
// sequence of `len` tokens (this also keeps k + W - 1 from overflowing).
__device__ __forceinline__ int clamp_window(int window, int len) {
    return (window > 0 && window < len) ? window : 0;
}

// Asynchronously copies a ROWS x D bf16 tile into shared memory (row stride
// LD = D + 8 elements). Tile row r is token tok0 + r, head `head`, of a tensor
// [*, nh, D]; rows r >= valid are zero-filled without reading global memory.
// Precondition: valid >= 1 (row 0 exists; its address stands in for the rest).
template <int D, int ROWS>
__device__ __forceinline__ void load_tile_async(sptr dst, const bf16* __restrict__ src, i64 tok0, int nh,
                                                int head, int valid) {
    constexpr int CH = D / 8;  // 16-byte chunks per row
    constexpr int LD = D + 8;
    const bf16* row0 = src + (tok0 * nh + head) * (i64)D;
    const i64 stride = (i64)nh * D;
    for (int c = threadIdx.x; c < ROWS * CH; c += NTHREADS) {
        const int r = c / CH, cc = c - r * CH;
        const bool ok = r < valid;
        const bf16* g = ok ? row0 + r * stride + cc * 8 : row0;
        cp_async_16(dst + (unsigned)((r * LD + cc * 8) * 2), g, ok);
    }
}

// Writes a warp's 16 x D f32 accumulator tile (C fragments acc[D/8][4]),
// times mul[0] (rows g) / mul[1] (rows g+8), as bf16 into shared rows
// srow (16 rows of LD elements), then copies the rows r < valid to global
// token tok0 + r, head `head`, of dst [*, nh, D] with 16-byte stores.
// Only this warp may touch those 16 shared rows meanwhile.
template <int D>
__device__ __forceinline__ void store_warp_tile(const float (&acc)[D / 8][4], const float (&mul)[2], bf16* srow,
                                                bf16* __restrict__ dst, i64 tok0, int nh, int head, int valid,
                                                int lane) {
    constexpr int LD = D + 8, CH = D / 8;
    const int g = lane >> 2, t4 = lane & 3;
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt) {
        *reinterpret_cast<unsigned*>(srow + g * LD + nt * 8 + 2 * t4) =
            pack_bf16(acc[nt][0] * mul[0], acc[nt][1] * mul[0]);
        *reinterpret_cast<unsigned*>(srow + (g + 8) * LD + nt * 8 + 2 * t4) =
            pack_bf16(acc[nt][2] * mul[1], acc[nt][3] * mul[1]);
    }
    __syncwarp();
    for (int c = lane; c < 16 * CH; c += 32) {
        const int r = c / CH, cc = c - r * CH;
        if (r < valid) {
            const uint4 val = *reinterpret_cast<const uint4*>(srow + r * LD + cc * 8);
            *reinterpret_cast<uint4*>(dst + ((tok0 + r) * nh + head) * (i64)D + cc * 8) = val;
        }
    }
}

// Per-lane byte offsets of the ldmatrix row addresses (see the layouts above).
// A operand / .trans B operand: 16 rows starting at the tile row, the lane's
// row is lane & 15, its 8-column block (lane >> 4).
template <int LD>
__device__ __forceinline__ unsigned lane_off_rows16(int lane) {
    return (unsigned)(((lane & 15) * LD + (lane >> 4) * 8) * 2);
}
// Non-transposed B operand stored as [n][k] rows (K for Q·Kᵀ): matrices
// (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15), so that
// r0, r1 = (b0, b1) of n-tile n0 and r2, r3 = (b0, b1) of n-tile n0 + 8.
template <int LD>
__device__ __forceinline__ unsigned lane_off_bnk(int lane) {
    return (unsigned)((((lane & 7) + ((lane >> 4) << 3)) * LD + ((lane >> 3) & 1) * 8) * 2);
}

// ---- warp-level products (every warp works on its own 16 rows) ----------------

template <int N8>
__device__ __forceinline__ void zero_frags(float (&acc)[N8][4]) {
#pragma unroll
    for (int i = 0; i < N8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
}

// The A fragment of k-slice kk of a product whose left operand is the f32
// result of an earlier one: its C fragments c0 = acc[2kk], c1 = acc[2kk+1]
// rounded to bf16 (see the layouts above).
__device__ __forceinline__ void frags_to_a(unsigned (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
    a[0] = pack_bf16(c0[0], c0[1]);
    a[1] = pack_bf16(c0[2], c0[3]);
    a[2] = pack_bf16(c1[0], c1[1]);
    a[3] = pack_bf16(c1[2], c1[3]);
}

// acc (16 x N) += A·Bᵀ for k-slice ks: A the fragment `a` (16 x 16), B the N
// shared rows [n][k] at b_rows (row stride LD; lane offset lane_off_bnk).
template <int LD, int N>
__device__ __forceinline__ void mma_slice_abt(float (&acc)[N / 8][4], const unsigned (&a)[4], sptr b_rows,
                                              unsigned offnk, int ks) {
#pragma unroll
    for (int np = 0; np < N / 16; ++np) {
        unsigned b[4];
        ldsm_x4(b, b_rows + offnk + (unsigned)((np * 16 * LD + ks * 16) * 2));
        mma_bf16_16816(acc[2 * np], a, b[0], b[1]);
        mma_bf16_16816(acc[2 * np + 1], a, b[2], b[3]);
    }
}

// acc (16 x N) = A·Bᵀ over KS k-slices: A the warp's 16 shared rows at
// a_rows (lane offset lane_off_rows16), B the N shared rows [n][k] at b_rows.
template <int LD, int KS, int N>
__device__ __forceinline__ void mma_rows_abt(float (&acc)[N / 8][4], sptr a_rows, sptr b_rows, unsigned off16,
                                             unsigned offnk) {
    zero_frags(acc);
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
        unsigned a[4];
        ldsm_x4(a, a_rows + off16 + (unsigned)(ks * 16 * 2));
        mma_slice_abt<LD, N>(acc, a, b_rows, offnk, ks);
    }
}

// acc (16 x D) += A·B for k-slice kk: A the fragment `a`, B shared rows
// 16kk..16kk+15 of a [k][d] tile at b_rows, read with transposed ldmatrix.
template <int LD, int D>
__device__ __forceinline__ void mma_slice_ab_trans(float (&acc)[D / 8][4], const unsigned (&a)[4], sptr b_rows,
                                                   unsigned off16, int kk) {
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
        unsigned b[4];
        ldsm_x4_trans(b, b_rows + off16 + (unsigned)((kk * 16 * LD + dp * 16) * 2));
        mma_bf16_16816(acc[2 * dp], a, b[0], b[1]);
        mma_bf16_16816(acc[2 * dp + 1], a, b[2], b[3]);
    }
}

// Whether the tile of queries q0..q0+nq-1 and keys k0..k0+nk-1 (sequence-
// local) may hold a pair that is not visible, and so needs the per-element
// mask (conservative: false only when every pair is visible).
__device__ __forceinline__ bool tile_needs_mask(int q0, int nq, int k0, int nk, int len, int W) {
    return (k0 + nk - 1 > q0) || (q0 + nq > len) || (k0 + nk > len) || (W != 0 && q0 + nq - 1 - k0 >= W);
}

__device__ __forceinline__ void check_contract(int head_dim, int d_want, int nh, int nkv) {
    if (blockDim.x != NTHREADS || blockDim.y != 1 || blockDim.z != 1 || head_dim != d_want || nkv <= 0 ||
        nh % nkv != 0)
        __trap();
}

}  // namespace fa

// Entry point argument lists (the launch contract in cuda/flash_attn.cu).
#define FA_FWD_ARGS                                                                                         \
    const __nv_bfloat16 *q, const __nv_bfloat16 *k, const __nv_bfloat16 *v, const int *cu_seqlens,          \
        __nv_bfloat16 *out, float *lse, int n, int n_seqs, int n_heads, int n_kv_heads, int head_dim, int window, \
        float scale
#define FA_FWD_PASS q, k, v, cu_seqlens, out, lse, n, n_seqs, n_heads, n_kv_heads, head_dim, window, scale
#define FA_DQ_ARGS                                                                                             \
    const __nv_bfloat16 *q, const __nv_bfloat16 *k, const __nv_bfloat16 *v, const __nv_bfloat16 *dout,          \
        const float *lse, const float *dsum, const int *cu_seqlens, __nv_bfloat16 *dq, int n, int n_seqs,       \
        int n_heads, int n_kv_heads, int head_dim, int window, float scale
#define FA_DQ_PASS \
    q, k, v, dout, lse, dsum, cu_seqlens, dq, n, n_seqs, n_heads, n_kv_heads, head_dim, window, scale
#define FA_DKDV_ARGS                                                                                           \
    const __nv_bfloat16 *q, const __nv_bfloat16 *k, const __nv_bfloat16 *v, const __nv_bfloat16 *dout,          \
        const float *lse, const float *dsum, const int *cu_seqlens, __nv_bfloat16 *dk, __nv_bfloat16 *dv, int n, \
        int n_seqs, int n_heads, int n_kv_heads, int head_dim, int window, float scale
#define FA_DKDV_PASS \
    q, k, v, dout, lse, dsum, cu_seqlens, dk, dv, n, n_seqs, n_heads, n_kv_heads, head_dim, window, scale
