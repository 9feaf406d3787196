// SwiGLU activation: out = silu(gate) ⊙ up, silu(g) = g · σ(g),
// σ(g) = 1 / (1 + exp(−g)); forward and backward, elementwise over `len`.
// CPU reference: src/backend/cpu/swiglu.rs (Backend::swiglu, swiglu_backward).
// Suggested launch: block = 256, any grid (grid-stride loop).
#include "common.cuh"

using namespace ft;

__device__ __forceinline__ float sigmoid(float g) { return 1.0f / (1.0f + expf(-g)); }

template <typename T>
__device__ __forceinline__ void swiglu_fwd(const T* __restrict__ gate, const T* __restrict__ up,
                                           T* __restrict__ out, u64 len) {
    for (u64 i = global_thread(); i < len; i += grid_threads()) {
        const float g = load(gate, i);
        store(out, i, (g * sigmoid(g)) * load(up, i));
    }
}

// dgate = dout · up · σ(g)(1 + g(1 − σ(g))), dup = dout · silu(g); both overwritten.
template <typename T>
__device__ __forceinline__ void swiglu_bwd(const T* __restrict__ dout, const T* __restrict__ gate,
                                           const T* __restrict__ up, T* __restrict__ dgate,
                                           T* __restrict__ dup, u64 len) {
    for (u64 i = global_thread(); i < len; i += grid_threads()) {
        const float d = load(dout, i);
        const float g = load(gate, i);
        const float s = sigmoid(g);
        store(dgate, i, (d * load(up, i)) * (s * (1.0f + g * (1.0f - s))));
        store(dup, i, d * (g * s));
    }
}

#define FT_SWIGLU(SUFFIX, T)                                                                     \
    extern "C" __global__ void __launch_bounds__(FT_MAX_THREADS)                                 \
        swiglu_fwd_##SUFFIX(const T* gate, const T* up, T* out, u64 len) {                       \
        swiglu_fwd<T>(gate, up, out, len);                                                       \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(FT_MAX_THREADS)                                 \
        swiglu_bwd_##SUFFIX(const T* dout, const T* gate, const T* up, T* dgate, T* dup,         \
                            u64 len) {                                                           \
        swiglu_bwd<T>(dout, gate, up, dgate, dup, len);                                          \
    }

FT_SWIGLU(f32, float)
FT_SWIGLU(bf16, bf16)
