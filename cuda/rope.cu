// Rotary position embeddings, half-split layout, in place: forward and
// backward (the transpose: rotation by the negative angle).
// CPU reference: src/backend/cpu/rope.rs (Backend::rope, rope_backward).
//
// x is [n, heads, head_dim]; only the first rot_dim dims of each head rotate
// (rot_dim = head_dim, or fewer with a partial rotary factor): element
// i < rot_dim/2 pairs with i + rot_dim/2, and the dims from rot_dim on are
// not touched. angle = float(positions[t]) · inv_freq[i], an f32 product
// (inv_freq has rot_dim/2 entries); sin/cos are the precise sincosf (no fast
// math), each times mscale in f32 (1 except for long-context rope; a product
// by 1 is exact, so the plain rope pays two multiplies per pair, not a
// rounding). One thread per (t, i) computes the angle once and rotates that
// pair in every head.
// Suggested launch: block = 256, grid = ceil(n · rot_dim/2 / 256) (any grid works).
#include "common.cuh"

using namespace ft;

template <typename T, bool INVERSE>
__device__ __forceinline__ void rope_apply(T* __restrict__ x, const int* __restrict__ positions,
                                           const float* __restrict__ inv_freq, int n, int heads,
                                           int head_dim, int rot_dim, float mscale) {
    const int half = rot_dim / 2;
    const u64 pairs = (u64)n * half;
    const u64 row = (u64)heads * head_dim;
    for (u64 idx = global_thread(); idx < pairs; idx += grid_threads()) {
        const u64 t = idx / half;
        const int i = (int)(idx - t * half);
        float s, c;
        sincosf((float)positions[t] * inv_freq[i], &s, &c);
        s *= mscale;
        c *= mscale;
        if (INVERSE) s = -s;
        T* xt = x + t * row;
        for (int h = 0; h < heads; ++h) {
            T* xh = xt + (u64)h * head_dim;
            const float a = load(xh, i);
            const float b = load(xh, i + half);
            store(xh, i, a * c - b * s);
            store(xh, i + half, b * c + a * s);
        }
    }
}

#define FT_ROPE(SUFFIX, T)                                                                       \
    extern "C" __global__ void __launch_bounds__(FT_MAX_THREADS)                                 \
        rope_fwd_##SUFFIX(T* x, const int* positions, const float* inv_freq, int n, int heads,   \
                          int head_dim, int rot_dim, float mscale) {                             \
        rope_apply<T, false>(x, positions, inv_freq, n, heads, head_dim, rot_dim, mscale);       \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(FT_MAX_THREADS)                                 \
        rope_bwd_##SUFFIX(T* dx, const int* positions, const float* inv_freq, int n, int heads,  \
                          int head_dim, int rot_dim, float mscale) {                             \
        rope_apply<T, true>(dx, positions, inv_freq, n, heads, head_dim, rot_dim, mscale);       \
    }

FT_ROPE(f32, float)
FT_ROPE(bf16, bf16)
