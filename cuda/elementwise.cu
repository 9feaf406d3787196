// Elementwise buffer ops and the deterministic sum of squares.
// CPU reference: src/backend/cpu/buffer_ops.rs (Backend::fill, add_assign,
// scale, softcap, sum_sq). copy_slice needs no kernel (a device-to-device copy).
// Suggested launch for the elementwise ops: block = 256, any grid.
#include "common.cuh"

using namespace ft;

template <typename T> __device__ __forceinline__ void fill(T* __restrict__ buf, u64 n, float value) {
    for (u64 i = global_thread(); i < n; i += grid_threads()) store(buf, i, value);
}

// dst += src
template <typename T>
__device__ __forceinline__ void add_assign(T* __restrict__ dst, const T* __restrict__ src, u64 n) {
    for (u64 i = global_thread(); i < n; i += grid_threads()) store(dst, i, load(dst, i) + load(src, i));
}

// buf *= s
template <typename T> __device__ __forceinline__ void scale(T* __restrict__ buf, u64 n, float s) {
    for (u64 i = global_thread(); i < n; i += grid_threads()) store(buf, i, load(buf, i) * s);
}

// buf = cap · tanh(buf / cap) (cap > 0; the logits' soft-cap at inference).
template <typename T> __device__ __forceinline__ void softcap(T* __restrict__ buf, u64 n, float cap) {
    for (u64 i = global_thread(); i < n; i += grid_threads()) store(buf, i, cap * tanhf(load(buf, i) / cap));
}

// Σ x², pass 1: partials[c] = Σ over chunk c = [c·chunk, min(n, (c+1)·chunk)),
// squares and sums in f64, one block per chunk (grid-stride over chunks), a
// fixed-tree block sum. The host allocates ceil(n / chunk) partials (chunk
// >= 1; 16384 matches the CPU backend's chunking). The result depends only on
// chunk and blockDim, never on gridDim.
template <typename T>
__device__ __forceinline__ void sum_sq_partials(const T* __restrict__ x, u64 n, u64 chunk,
                                                double* __restrict__ partials) {
    const u64 chunks = (n + chunk - 1) / chunk;
    for (u64 c = blockIdx.x; c < chunks; c += gridDim.x) {
        const u64 begin = c * chunk;
        const u64 end = begin + chunk < n ? begin + chunk : n;
        double acc = 0.0;
        for (u64 i = begin + threadIdx.x; i < end; i += blockDim.x) {
            const double v = (double)load(x, i);
            acc += v * v;
        }
        acc = block_sum(acc);
        if (threadIdx.x == 0) partials[c] = acc;
    }
}

#define FT_ELEMENTWISE(SUFFIX, T)                                                                 \
    extern "C" __global__ void __launch_bounds__(FT_MAX_THREADS) fill_##SUFFIX(T* buf, u64 n,     \
                                                                               float value) {     \
        fill<T>(buf, n, value);                                                                   \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(FT_MAX_THREADS)                                  \
        add_assign_##SUFFIX(T* dst, const T* src, u64 n) {                                        \
        add_assign<T>(dst, src, n);                                                               \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(FT_MAX_THREADS) scale_##SUFFIX(T* buf, u64 n,    \
                                                                                float s) {        \
        scale<T>(buf, n, s);                                                                      \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(FT_MAX_THREADS) softcap_##SUFFIX(T* buf, u64 n,  \
                                                                                  float cap) {    \
        softcap<T>(buf, n, cap);                                                                  \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(FT_MAX_THREADS)                                  \
        sum_sq_partials_##SUFFIX(const T* x, u64 n, u64 chunk, double* partials) {                \
        sum_sq_partials<T>(x, n, chunk, partials);                                                \
    }

FT_ELEMENTWISE(f32, float)
FT_ELEMENTWISE(bf16, bf16)

// Σ x², pass 2: *out = Σ partials[0..count), launched as ONE block: each
// thread sums a strided subset in order, then a fixed-tree block sum.
extern "C" __global__ void __launch_bounds__(FT_MAX_THREADS)
    sum_sq_finalize_f64(const double* __restrict__ partials, u64 count, double* __restrict__ out) {
    if (blockIdx.x != 0) return;
    double acc = 0.0;
    for (u64 i = threadIdx.x; i < count; i += blockDim.x) acc += partials[i];
    acc = block_sum(acc);
    if (threadIdx.x == 0) *out = acc;
}
