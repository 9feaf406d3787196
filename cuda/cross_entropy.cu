// Row-wise cross-entropy over logits[rows, vocab] with the gradient written
// in place. CPU reference: src/backend/cpu/cross_entropy.rs (Backend::cross_entropy).
//
// One block per row (grid-stride over rows). Pass 1: each thread keeps an
// online (max, Σ exp(l − max)) over its strided slice in f32; the pairs are
// merged in a fixed tree (deterministic, no atomics); lse = max + log(Σ).
// losses[row] = lse − logits[target]. When write_grad != 0, pass 2 overwrites
// the row with grad_scale · (exp(l − lse) − onehot(target)).
// With softcap = c > 0 every logit l is first capped to z = tanh(l / c) · c
// (f32, the reference's order of operations), the loss is that of z, and the
// gradient is with respect to the raw l: grad_scale · (exp(z − lse) −
// onehot) · (1 − tanh²(l / c)). softcap = 0: no cap (a template flag, so the
// plain path compiles exactly as without it).
// target == -100 is ignored: loss 0 and (with write_grad) a zero row. Any
// other target outside [0, vocab) is a host bug (the CPU backend panics): the
// kernel writes a NaN loss and (with write_grad) a NaN row, never reading out
// of bounds. Suggested launch: grid = rows, block = 1024.
#include "common.cuh"

using namespace ft;

#define FT_IGNORE_INDEX (-100)

struct MaxSum {
    float m;  // running max
    float s;  // Σ exp(l − m)
};

__device__ __forceinline__ MaxSum merge(MaxSum a, MaxSum b) {
    const float m = fmaxf(a.m, b.m);
    if (m == -inf_f32()) return MaxSum{m, a.s + b.s};  // both empty (or all −inf)
    return MaxSum{m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}

__device__ __forceinline__ MaxSum warp_merge(MaxSum v) {
#pragma unroll
    for (int off = FT_WARP / 2; off > 0; off >>= 1) {
        MaxSum o;
        o.m = __shfl_down_sync(FT_FULL_MASK, v.m, off);
        o.s = __shfl_down_sync(FT_FULL_MASK, v.s, off);
        v = merge(v, o);
    }
    return v;  // valid in lane 0
}

// Merge over the block, returned to every thread (same pattern as block_sum).
__device__ __forceinline__ MaxSum block_merge(MaxSum v) {
    __shared__ float pm[FT_WARP + 1];
    __shared__ float ps[FT_WARP + 1];
    const int lane = threadIdx.x % FT_WARP;
    const int warp = threadIdx.x / FT_WARP;
    const int nwarps = blockDim.x / FT_WARP;
    v = warp_merge(v);
    __syncthreads();
    if (lane == 0) {
        pm[warp] = v.m;
        ps[warp] = v.s;
    }
    __syncthreads();
    if (warp == 0) {
        v = lane < nwarps ? MaxSum{pm[lane], ps[lane]} : MaxSum{-inf_f32(), 0.0f};
        v = warp_merge(v);
        if (lane == 0) {
            pm[FT_WARP] = v.m;
            ps[FT_WARP] = v.s;
        }
    }
    __syncthreads();
    return MaxSum{pm[FT_WARP], ps[FT_WARP]};
}

// The logit as the loss sees it: l, or tanh(l / c) · c with a cap.
template <bool CAP> __device__ __forceinline__ float capped(float l, float c) {
    if constexpr (CAP) return tanhf(l / c) * c;
    return l;
}

template <typename T, bool CAP>
__device__ __forceinline__ void cross_entropy(T* __restrict__ logits, const int* __restrict__ targets,
                                              float* __restrict__ losses, int rows, int vocab,
                                              float grad_scale, int write_grad, float cap) {
    const float nan = nan_f32();
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        T* l = logits + (u64)row * vocab;
        const int t = targets[row];
        if (t == FT_IGNORE_INDEX || t < 0 || t >= vocab) {
            // Uniform per block: every thread takes the same branch.
            const float fill = t == FT_IGNORE_INDEX ? 0.0f : nan;
            if (threadIdx.x == 0) losses[row] = fill;
            if (write_grad)
                for (int j = threadIdx.x; j < vocab; j += blockDim.x) store(l, j, fill);
            continue;
        }
        // Read the target logit before any thread can overwrite it: the
        // block_merge below synchronises the block.
        const float lt = threadIdx.x == 0 ? capped<CAP>(load(l, t), cap) : 0.0f;
        MaxSum acc{-inf_f32(), 0.0f};
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
            const float x = capped<CAP>(load(l, j), cap);
            if (x > acc.m) {
                acc.s = acc.s * expf(acc.m - x) + 1.0f;
                acc.m = x;
            } else if (acc.m > -inf_f32()) {
                acc.s += expf(x - acc.m);  // NaN logits propagate through here
            }
        }
        acc = block_merge(acc);
        const float lse = acc.m + logf(acc.s);
        if (threadIdx.x == 0) losses[row] = lse - lt;
        if (write_grad) {
            for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
                if constexpr (CAP) {
                    const float th = tanhf(load(l, j) / cap);
                    const float p = expf(th * cap - lse) - (j == t ? 1.0f : 0.0f);
                    store(l, j, grad_scale * p * (1.0f - th * th));
                } else {
                    float g = grad_scale * expf(load(l, j) - lse);
                    if (j == t) g -= grad_scale;
                    store(l, j, g);
                }
            }
        }
    }
}

#define FT_CROSS_ENTROPY(SUFFIX, T)                                                                    \
    extern "C" __global__ void __launch_bounds__(FT_MAX_THREADS)                                       \
        cross_entropy_##SUFFIX(T* logits, const int* targets, float* losses, int rows, int vocab,       \
                               float grad_scale, int write_grad, float softcap) {                      \
        if (softcap > 0.0f)                                                                            \
            cross_entropy<T, true>(logits, targets, losses, rows, vocab, grad_scale, write_grad, softcap); \
        else                                                                                           \
            cross_entropy<T, false>(logits, targets, losses, rows, vocab, grad_scale, write_grad, 0.0f);   \
    }

FT_CROSS_ENTROPY(f32, float)
FT_CROSS_ENTROPY(bf16, bf16)
