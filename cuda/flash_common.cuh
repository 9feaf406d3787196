// Warp-level tensor-core and async-copy wrappers (inline PTX, sm_80+) used by
// cuda/flash_attn.cu. Only the instructions live here, each behind a small
// function, so that the kernels' index math reads as plain C++ (and can be
// exercised off-GPU: cuda/emu/flash_common_emu.h replaces these few functions).
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
