// RMSNorm with a frozen bf16 weight: forward and input gradient.
// CPU reference: src/backend/cpu/norm.rs (Backend::rmsnorm, rmsnorm_backward).
//
// The scale per column is w, or (1 + w) formed in f32 with `plus_one`
// (Gemma's norms, whose stored weights are offsets from one).
//
// Two kernels of the same math (the host picks one from `hidden`; either is
// correct for any shape and launch, and neither result depends on gridDim):
// - rmsnorm_{fwd,bwd}_*: one block per row, grid-stride over rows, threads
//   striding over `hidden`, f32 fixed-tree block sums (long rows: the
//   model's hidden size);
// - rmsnorm_warp_{fwd,bwd}_*: one warp per row, lanes striding over
//   `hidden`, f32 fixed-tree warp sums and no block barrier, so a block of
//   256 threads does 8 rows at once instead of idling most of its threads on
//   one (short rows: the per-head q/k norms, hidden = head_dim, rows =
//   n · heads). Its result does not depend on blockDim either.
// Two entry points rather than a branch in one: each keeps its own register
// count, and the long-row kernel stays as lean as without the short one.
// The CPU accumulates sequentially in f64: results agree to rounding.
// Suggested launch: block = 256; grid = rows (rmsnorm_*), or
// ceil(rows / (block / 32)) (rmsnorm_warp_*).
#include "common.cuh"

using namespace ft;

__device__ __forceinline__ float norm_scale(const bf16* __restrict__ w, int j, int plus_one) {
    const float v = to_f32(w[j]);
    return plus_one ? 1.0f + v : v;
}

// Sum over the 32 lanes of a warp, returned to every lane: a butterfly, in
// which lanes i and i ^ off add the same two values at each step (f32
// addition commutes), so every lane ends with the same bits.
__device__ __forceinline__ float warp_sum_all(float v) {
#pragma unroll
    for (int off = FT_WARP / 2; off > 0; off >>= 1) v += __shfl_xor_sync(FT_FULL_MASK, v, off);
    return v;
}

// Rows one group (a block, or a warp with WARP) handles, and its lane in it.
template <bool WARP> struct RowGroup {
    int first, stride, lane, width;
    __device__ __forceinline__ RowGroup() {
        if (WARP) {
            const int warps = blockDim.x / FT_WARP;
            first = blockIdx.x * warps + threadIdx.x / FT_WARP;
            stride = gridDim.x * warps;
            lane = threadIdx.x % FT_WARP;
            width = FT_WARP;
        } else {
            first = blockIdx.x;
            stride = gridDim.x;
            lane = threadIdx.x;
            width = blockDim.x;
        }
    }
    __device__ __forceinline__ float sum(float v) const { return WARP ? warp_sum_all(v) : block_sum(v); }
};

// y = (x · inv) · scale per row, inv = 1 / sqrt(mean(x²) + eps) saved in inv_rms[row].
template <bool WARP, typename T>
__device__ __forceinline__ void rmsnorm_fwd_rows(const T* __restrict__ x, const bf16* __restrict__ w,
                                                 T* __restrict__ y, float* __restrict__ inv_rms, int rows,
                                                 int hidden, float eps, int plus_one) {
    const RowGroup<WARP> g;
    // The block path's loop bound is the same for every thread (block_sum
    // synchronises); the warp path's for every lane of a warp.
    for (int row = g.first; row < rows; row += g.stride) {
        const u64 base = (u64)row * hidden;
        float ss = 0.0f;
        for (int j = g.lane; j < hidden; j += g.width) {
            const float v = load(x, base + j);
            ss += v * v;
        }
        ss = g.sum(ss);
        const float inv = 1.0f / sqrtf(ss / (float)hidden + eps);
        if (g.lane == 0) inv_rms[row] = inv;
        for (int j = g.lane; j < hidden; j += g.width)
            store(y, base + j, (load(x, base + j) * inv) * norm_scale(w, j, plus_one));
    }
}

// dx += inv·(s⊙dy) − x·c with c = inv³ · Σ((s⊙dy)⊙x) / hidden per row,
// s the scale. The weight is frozen: no weight gradient.
template <bool WARP, typename T>
__device__ __forceinline__ void rmsnorm_bwd_rows(const T* __restrict__ dy, const T* __restrict__ x,
                                                 const bf16* __restrict__ w, const float* __restrict__ inv_rms,
                                                 T* __restrict__ dx, int rows, int hidden, int plus_one) {
    const RowGroup<WARP> g;
    for (int row = g.first; row < rows; row += g.stride) {
        const u64 base = (u64)row * hidden;
        float dot = 0.0f;
        for (int j = g.lane; j < hidden; j += g.width)
            dot += (norm_scale(w, j, plus_one) * load(dy, base + j)) * load(x, base + j);
        dot = g.sum(dot);
        const float inv = inv_rms[row];
        const float c = (inv * inv * inv * dot) / (float)hidden;
        for (int j = g.lane; j < hidden; j += g.width) {
            const float wg = norm_scale(w, j, plus_one) * load(dy, base + j);
            store(dx, base + j, load(dx, base + j) + (inv * wg - load(x, base + j) * c));
        }
    }
}

#define FT_RMSNORM(NAME, WARP, SUFFIX, T)                                                         \
    extern "C" __global__ void __launch_bounds__(FT_MAX_THREADS)                                   \
        NAME##_fwd_##SUFFIX(const T* x, const bf16* w, T* y, float* inv_rms, int rows, int hidden,  \
                            float eps, int plus_one) {                                             \
        rmsnorm_fwd_rows<WARP, T>(x, w, y, inv_rms, rows, hidden, eps, plus_one);                  \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(FT_MAX_THREADS)                                   \
        NAME##_bwd_##SUFFIX(const T* dy, const T* x, const bf16* w, const float* inv_rms, T* dx,   \
                            int rows, int hidden, int plus_one) {                                  \
        rmsnorm_bwd_rows<WARP, T>(dy, x, w, inv_rms, dx, rows, hidden, plus_one);                  \
    }

FT_RMSNORM(rmsnorm, false, f32, float)
FT_RMSNORM(rmsnorm, false, bf16, bf16)
FT_RMSNORM(rmsnorm_warp, true, f32, float)
FT_RMSNORM(rmsnorm_warp, true, bf16, bf16)
