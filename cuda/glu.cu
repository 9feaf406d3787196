// Gated MLP activations, out = act(gate) ⊙ up, forward and backward,
// elementwise over `len`; one kernel pair per activation:
// - swiglu_*: act = silu(g) = g · σ(g), σ(g) = 1 / (1 + exp(−g));
// - geglu_*:  act = gelu_tanh(g) = 0.5·g·(1 + tanh(√(2/π)·(g + 0.044715·g³)))
//             (torch's gelu(approximate="tanh"));
// - sigmoid_gate_*: act = σ(g) (Qwen3.5's attention output gate, attn ⊙ σ(gate)).
// CPU reference: src/backend/cpu/glu.rs (Backend::glu, glu_backward with
// GluAct::Silu / GluAct::GeluTanh / GluAct::Sigmoid); the products are in its order.
// The activation is a template parameter, so each kernel carries only its
// own math. Suggested launch: block = 256, any grid (grid-stride loop).
#include "common.cuh"

using namespace ft;

__device__ __forceinline__ float sigmoid(float g) { return 1.0f / (1.0f + expf(-g)); }

// √(2/π) as an f32 (the value torch's f32 gelu uses) and the cubic's coefficient.
#define FT_SQRT_2_OVER_PI 0.7978846f
#define FT_GELU_C 0.044715f

struct Silu {
    __device__ __forceinline__ static float act(float g) { return g * sigmoid(g); }
    // act'(g) = σ(g)(1 + g(1 − σ(g))); also returns act(g) in *a.
    __device__ __forceinline__ static float grad(float g, float* a) {
        const float s = sigmoid(g);
        *a = g * s;
        return s * (1.0f + g * (1.0f - s));
    }
};

struct GeluTanh {
    __device__ __forceinline__ static float tanh_of(float g) {
        return tanhf(FT_SQRT_2_OVER_PI * (g + FT_GELU_C * g * g * g));
    }
    __device__ __forceinline__ static float act(float g) { return 0.5f * g * (1.0f + tanh_of(g)); }
    // act'(g) = 0.5(1 + t) + 0.5·g·(1 − t²)·√(2/π)(1 + 3·0.044715·g²), t = tanh(inner).
    __device__ __forceinline__ static float grad(float g, float* a) {
        const float t = tanh_of(g);
        const float d_inner = FT_SQRT_2_OVER_PI * (1.0f + 3.0f * FT_GELU_C * g * g);
        *a = 0.5f * g * (1.0f + t);
        return 0.5f * (1.0f + t) + 0.5f * g * (1.0f - t * t) * d_inner;
    }
};

struct Sigmoid {
    __device__ __forceinline__ static float act(float g) { return sigmoid(g); }
    // σ'(g) = σ(g)(1 − σ(g)).
    __device__ __forceinline__ static float grad(float g, float* a) {
        const float s = sigmoid(g);
        *a = s;
        return s * (1.0f - s);
    }
};

template <typename Act, typename T>
__device__ __forceinline__ void glu_fwd(const T* __restrict__ gate, const T* __restrict__ up,
                                        T* __restrict__ out, u64 len) {
    for (u64 i = global_thread(); i < len; i += grid_threads())
        store(out, i, Act::act(load(gate, i)) * load(up, i));
}

// dgate = dout · up · act'(g), dup = dout · act(g); both overwritten.
template <typename Act, typename T>
__device__ __forceinline__ void glu_bwd(const T* __restrict__ dout, const T* __restrict__ gate,
                                        const T* __restrict__ up, T* __restrict__ dgate,
                                        T* __restrict__ dup, u64 len) {
    for (u64 i = global_thread(); i < len; i += grid_threads()) {
        const float d = load(dout, i);
        float a;
        const float da = Act::grad(load(gate, i), &a);
        store(dgate, i, (d * load(up, i)) * da);
        store(dup, i, d * a);
    }
}

#define FT_GLU(NAME, ACT, SUFFIX, T)                                                             \
    extern "C" __global__ void __launch_bounds__(FT_MAX_THREADS)                                 \
        NAME##_fwd_##SUFFIX(const T* gate, const T* up, T* out, u64 len) {                       \
        glu_fwd<ACT, T>(gate, up, out, len);                                                     \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(FT_MAX_THREADS)                                 \
        NAME##_bwd_##SUFFIX(const T* dout, const T* gate, const T* up, T* dgate, T* dup,         \
                            u64 len) {                                                           \
        glu_bwd<ACT, T>(dout, gate, up, dgate, dup, len);                                        \
    }

FT_GLU(swiglu, Silu, f32, float)
FT_GLU(swiglu, Silu, bf16, bf16)
FT_GLU(geglu, GeluTanh, f32, float)
FT_GLU(geglu, GeluTanh, bf16, bf16)
FT_GLU(sigmoid_gate, Sigmoid, f32, float)
FT_GLU(sigmoid_gate, Sigmoid, bf16, bf16)
