// LoRA dropout fused into the rank-r products of a LoRA layer, so that
// neither pass holds a masked copy of x or a full-size gradient scratch.
// CPU reference: lora_forward / lora_backward with Some(dropout) in
// src/backend/cpu/lora.rs (apply_mask, then the products); the mask is
// crate::backend::dropout_keep.
//
// keep(i) = dropout_uniform(seed, i) >= p with i the flat element index of
// the [m, k] input (row · k + column), so the mask is bit-identical to the
// CPU's (common.cuh ports the SplitMix64 hash with exact u64 arithmetic).
// The keep scale is 1 / (1 − p) in f32, as on the CPU.
#include "common.cuh"

using namespace ft;

// ---- fused LoRA products with dropout -------------------------------------------
//
// mask(i, j) = keep(i·k + j) / (1 − p) over the [m, k] input (as above).
//   lora_xa_dropout:            xa[i, :]  = Σ_j mask(i, j)·x[i, j] · A[:, j]
//   lora_da_dropout_partials +
//   lora_da_dropout_finalize:   dA[:, j] += Σ_i dxa[i, :] · mask(i, j)·x[i, j]
//   lora_dx_dropout:            dx[i, j] += mask(i, j) · Σ_c dxa[i, c]·A[c, j]
// A [r, k] and dA are the f32 LoRA parameter and gradient, x / xa / dx are
// stored as T, dxa [m, r] is bf16 (the backend's product operand). Values
// are formed as on the CPU: x·(1/(1−p)) rounded to f32 before it multiplies.
// Sums are fixed trees or fixed loops (no atomics): results do not depend on
// the grid. Ranks are processed RC at a time (RC accumulators per thread).

#define FT_LORA_RC 16
// The fused kernels keep RC accumulators per thread: they are compiled for
// blocks of at most 256 threads (more registers per thread, no spills).
#define FT_LORA_THREADS 256

// One block per row (grid-stride over rows); blockDim a multiple of 32, <= 256.
template <typename T>
__device__ __forceinline__ void lora_xa_dropout(const T* __restrict__ x, const float* __restrict__ a,
                                                T* __restrict__ xa, int m, int k, int r, u64 seed, float p) {
    __shared__ float part[FT_LORA_RC][FT_WARP];
    const float inv = 1.0f / (1.0f - p);
    const int lane = threadIdx.x % FT_WARP, warp = threadIdx.x / FT_WARP, nwarps = blockDim.x / FT_WARP;
    for (int i = blockIdx.x; i < m; i += gridDim.x) {
        const u64 row = (u64)i * (u64)k;
        for (int r0 = 0; r0 < r; r0 += FT_LORA_RC) {
            const int nr = min(FT_LORA_RC, r - r0);
            float acc[FT_LORA_RC];
#pragma unroll
            for (int c = 0; c < FT_LORA_RC; ++c) acc[c] = 0.0f;
            for (int j = threadIdx.x; j < k; j += blockDim.x) {
                const float v = dropout_keep(seed, row + j, p) ? load(x, row + j) * inv : 0.0f;
#pragma unroll
                for (int c = 0; c < FT_LORA_RC; ++c)
                    if (c < nr) acc[c] += v * a[(u64)(r0 + c) * k + j];
            }
#pragma unroll
            for (int c = 0; c < FT_LORA_RC; ++c) {
                const float w = warp_sum(acc[c]);
                if (lane == 0) part[c][warp] = w;
            }
            __syncthreads();
            if (threadIdx.x < nr) {
                float s = 0.0f;
                for (int w = 0; w < nwarps; ++w) s += part[threadIdx.x][w];
                store(xa, (u64)i * r + r0 + threadIdx.x, s);
            }
            __syncthreads();  // part is rewritten by the next rank chunk
        }
    }
}

// grid (ceil(k / blockDim), splits), blockDim <= 256: thread column j, rows
// [split·rows_per_split, +rows_per_split); partials [splits, r, k] f32.
template <typename T>
__device__ __forceinline__ void lora_da_dropout_partials(const T* __restrict__ x, const bf16* __restrict__ dxa,
                                                         float* __restrict__ partials, int m, int k, int r,
                                                         int rows_per_split, u64 seed, float p) {
    const float inv = 1.0f / (1.0f - p);
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= k) return;
    const int split = blockIdx.y;
    const int i0 = split * rows_per_split, i1 = min(m, i0 + rows_per_split);
    for (int r0 = 0; r0 < r; r0 += FT_LORA_RC) {
        const int nr = min(FT_LORA_RC, r - r0);
        float acc[FT_LORA_RC];
#pragma unroll
        for (int c = 0; c < FT_LORA_RC; ++c) acc[c] = 0.0f;
        for (int i = i0; i < i1; ++i) {
            const u64 at = (u64)i * (u64)k + j;
            const float v = dropout_keep(seed, at, p) ? load(x, at) * inv : 0.0f;
#pragma unroll
            for (int c = 0; c < FT_LORA_RC; ++c)
                if (c < nr) acc[c] += to_f32(dxa[(u64)i * r + r0 + c]) * v;
        }
#pragma unroll
        for (int c = 0; c < FT_LORA_RC; ++c)
            if (c < nr) partials[((u64)split * r + r0 + c) * k + j] = acc[c];
    }
}

// da[e] += Σ_s partials[s, e] for every element e of [r, k], s in order.
__device__ __forceinline__ void lora_da_dropout_finalize(const float* __restrict__ partials, float* __restrict__ da,
                                                         int k, int r, int splits) {
    const u64 n = (u64)r * (u64)k;
    for (u64 e = global_thread(); e < n; e += grid_threads()) {
        float s = 0.0f;
        for (int sp = 0; sp < splits; ++sp) s += partials[(u64)sp * n + e];
        da[e] += s;
    }
}

// Grid-stride over the n = m·k elements of dx; blockDim <= 256.
template <typename T>
__device__ __forceinline__ void lora_dx_dropout(const bf16* __restrict__ dxa, const float* __restrict__ a,
                                                T* __restrict__ dx, u64 n, int k, int r, u64 seed, float p) {
    const float inv = 1.0f / (1.0f - p);
    for (u64 e = global_thread(); e < n; e += grid_threads()) {
        if (!dropout_keep(seed, e, p)) continue;  // the CPU adds 0 here
        const u64 i = e / (u64)k, j = e - i * (u64)k;
        float s = 0.0f;
        for (int c = 0; c < r; ++c) s += to_f32(dxa[i * r + c]) * a[(u64)c * k + j];
        store(dx, e, load(dx, e) + s * inv);
    }
}

#define FT_LORA_FUSED(SUFFIX, T)                                                                            \
    extern "C" __global__ void __launch_bounds__(FT_LORA_THREADS)                                            \
        lora_xa_dropout_##SUFFIX(const T* x, const float* a, T* xa, int m, int k, int r, u64 seed, float p) { \
        lora_xa_dropout<T>(x, a, xa, m, k, r, seed, p);                                                     \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(FT_LORA_THREADS)                                            \
        lora_da_dropout_partials_##SUFFIX(const T* x, const bf16* dxa, float* partials, int m, int k, int r, \
                                          int rows_per_split, u64 seed, float p) {                          \
        lora_da_dropout_partials<T>(x, dxa, partials, m, k, r, rows_per_split, seed, p);                    \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(FT_LORA_THREADS)                                            \
        lora_dx_dropout_##SUFFIX(const bf16* dxa, const float* a, T* dx, u64 n, int k, int r, u64 seed,     \
                                 float p) {                                                                 \
        lora_dx_dropout<T>(dxa, a, dx, n, k, r, seed, p);                                                   \
    }

FT_LORA_FUSED(f32, float)
FT_LORA_FUSED(bf16, bf16)

extern "C" __global__ void __launch_bounds__(FT_MAX_THREADS)
    lora_da_dropout_finalize_f32(const float* partials, float* da, int k, int r, int splits) {
    lora_da_dropout_finalize(partials, da, k, r, splits);
}
