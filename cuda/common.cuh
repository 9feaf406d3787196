// Shared device helpers for every kernel in cuda/: bf16 <-> f32 loads and
// stores, grid-stride loops, deterministic warp/block reductions, and the
// dropout hash (a bit-exact port of `crate::backend::dropout_uniform`).
//
// Conventions for every kernel (see cuda/README.md):
// - Activations are stored as f32 or bf16 (`T`); each kernel is a template
//   instantiated for both by `extern "C"` wrappers named `<op>_f32` /
//   `<op>_bf16`. Frozen weights (norm weights, the embedding table) are bf16.
//   Math and accumulation are f32 (f64 where the CPU reference promises f64).
// - blockDim.x must be a multiple of 32 and at most 1024 (every kernel is
//   compiled with __launch_bounds__(FT_MAX_THREADS)). Reductions are fixed
//   trees with no atomics: for a given blockDim the result is bit-identical
//   run to run, and it never depends on gridDim.
// - Flat element counts are `unsigned long long` (u64 on the host); shape
//   dimensions (rows, hidden, vocab, heads, head_dim) are `int` (i32);
//   scalars are `float`; flags are `int` (0 or 1).
#pragma once

#include <cuda_bf16.h>

#define FT_MAX_THREADS 1024
#define FT_WARP 32
#define FT_FULL_MASK 0xffffffffu

namespace ft {

typedef unsigned long long u64;
typedef __nv_bfloat16 bf16;

// ---- storage <-> f32 --------------------------------------------------------

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(bf16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
// Round to nearest even, NaN kept NaN: the same rounding as half::bf16::from_f32.
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float v) { return __float2bfloat16_rn(v); }

template <typename T> __device__ __forceinline__ float load(const T* p, u64 i) { return to_f32(p[i]); }
template <typename T> __device__ __forceinline__ void store(T* p, u64 i, float v) { p[i] = from_f32<T>(v); }

// ---- special values (no <cmath> under NVRTC) --------------------------------

__device__ __forceinline__ float inf_f32() { return __int_as_float(0x7f800000); }
__device__ __forceinline__ float nan_f32() { return __int_as_float(0x7fc00000); }

// ---- indexing ---------------------------------------------------------------

__device__ __forceinline__ u64 global_thread() { return (u64)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ u64 grid_threads() { return (u64)gridDim.x * blockDim.x; }

// ---- reductions (deterministic: fixed trees, no atomics) -----------------------

// Sum over the 32 lanes of a warp; the result is valid in lane 0.
template <typename T> __device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
    for (int off = FT_WARP / 2; off > 0; off >>= 1) v += __shfl_down_sync(FT_FULL_MASK, v, off);
    return v;
}

// Sum over the block, returned to every thread. Every thread of the block
// must call it (it synchronises); it may be called repeatedly.
template <typename T> __device__ __forceinline__ T block_sum(T v) {
    __shared__ T partial[FT_WARP + 1];
    const int lane = threadIdx.x % FT_WARP;
    const int warp = threadIdx.x / FT_WARP;
    const int nwarps = blockDim.x / FT_WARP;
    v = warp_sum(v);
    __syncthreads();  // the previous call's broadcast has been read
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < nwarps ? partial[lane] : T(0);
        v = warp_sum(v);
        if (lane == 0) partial[FT_WARP] = v;
    }
    __syncthreads();
    return partial[FT_WARP];
}

// ---- dropout hash -----------------------------------------------------------

// SplitMix64 finaliser over (seed, index): bit-exact port of
// crate::backend::dropout_uniform (wrapping u64 arithmetic).
__device__ __forceinline__ u64 splitmix64(u64 seed, u64 index) {
    u64 z = seed + index * 0x9E3779B97F4A7C15ull + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// 24 high bits -> uniform in [0, 1); exact in f32, as on the CPU.
__device__ __forceinline__ float dropout_uniform(u64 seed, u64 index) {
    return (float)(splitmix64(seed, index) >> 40) * (1.0f / 16777216.0f);
}

// Whether element `index` survives dropout with drop probability p.
__device__ __forceinline__ bool dropout_keep(u64 seed, u64 index, float p) {
    return dropout_uniform(seed, index) >= p;
}

}  // namespace ft
