// LoRA dropout on the adapter input, x · keep / (1 − p), and its backward
// (the same mask on the gradient). CPU reference: apply_mask in
// src/backend/cpu/lora.rs; the mask is crate::backend::dropout_keep.
//
// keep(i) = dropout_uniform(seed, i) >= p with i the flat element index of
// the [m, k] matrix (row · k + column), so the mask is bit-identical to the
// CPU's (common.cuh ports the SplitMix64 hash with exact u64 arithmetic).
// The keep scale is 1 / (1 − p) in f32, as on the CPU. With accumulate != 0
// the result is added to `out` (the backward's dx += mask ⊙ g), otherwise it
// overwrites `out`; out may alias the input when accumulate == 0.
// Suggested launch: block = 256, any grid (grid-stride loop).
#include "common.cuh"

using namespace ft;

template <typename T>
__device__ __forceinline__ void dropout_mask(const T* in, T* out, u64 n, u64 seed, float p, int accumulate) {
    const float inv = 1.0f / (1.0f - p);
    for (u64 i = global_thread(); i < n; i += grid_threads()) {
        const float val = dropout_keep(seed, i, p) ? load(in, i) * inv : 0.0f;
        store(out, i, accumulate ? load(out, i) + val : val);
    }
}

#define FT_LORA_DROPOUT(SUFFIX, T)                                                               \
    extern "C" __global__ void __launch_bounds__(FT_MAX_THREADS)                                 \
        lora_dropout_fwd_##SUFFIX(const T* x, T* out, u64 n, u64 seed, float p, int accumulate) { \
        dropout_mask<T>(x, out, n, seed, p, accumulate);                                         \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(FT_MAX_THREADS)                                 \
        lora_dropout_bwd_##SUFFIX(const T* dy, T* dx, u64 n, u64 seed, float p, int accumulate) { \
        dropout_mask<T>(dy, dx, n, seed, p, accumulate);                                         \
    }

FT_LORA_DROPOUT(f32, float)
FT_LORA_DROPOUT(bf16, bf16)
