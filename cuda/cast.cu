// Storage-type conversions between f32 and bf16 buffers, for operands that
// must share a type in one cuBLAS product (LoRA's f32 A/B against bf16
// activations; the f32 logits gradient against the bf16 LM head).
// No CPU counterpart: the CPU backend stores everything in f32. f32 -> bf16
// rounds to nearest even (__float2bfloat16_rn); bf16 -> f32 is exact.
// Suggested launch: block = 256, any grid (grid-stride loop).
#include "common.cuh"

using namespace ft;

extern "C" __global__ void __launch_bounds__(FT_MAX_THREADS)
    cast_f32_to_bf16(const float* __restrict__ src, bf16* __restrict__ dst, u64 n) {
    for (u64 i = global_thread(); i < n; i += grid_threads()) dst[i] = __float2bfloat16_rn(src[i]);
}

extern "C" __global__ void __launch_bounds__(FT_MAX_THREADS)
    cast_bf16_to_f32(const bf16* __restrict__ src, float* __restrict__ dst, u64 n) {
    for (u64 i = global_thread(); i < n; i += grid_threads()) dst[i] = __bfloat162float(src[i]);
}

// y[i, j] = bias[j] for a row-major [m, n] y: the starting value of a biased
// linear layer, onto which the product is accumulated (beta = 1).
template <typename T>
__device__ __forceinline__ void broadcast_rows(const bf16* __restrict__ bias, T* __restrict__ y, int m, int n) {
    const u64 total = (u64)m * (u64)n;
    for (u64 i = global_thread(); i < total; i += grid_threads()) y[i] = from_f32<T>(__bfloat162float(bias[i % (u64)n]));
}

extern "C" __global__ void __launch_bounds__(FT_MAX_THREADS)
    broadcast_rows_bf16_to_f32(const bf16* bias, float* y, int m, int n) {
    broadcast_rows<float>(bias, y, m, n);
}

extern "C" __global__ void __launch_bounds__(FT_MAX_THREADS)
    broadcast_rows_bf16_to_bf16(const bf16* bias, bf16* y, int m, int n) {
    broadcast_rows<bf16>(bias, y, m, n);
}
