// RMSNorm with a frozen bf16 weight: forward and input gradient.
// CPU reference: src/backend/cpu/norm.rs (Backend::rmsnorm, rmsnorm_backward).
//
// One block per row (grid-stride over rows, so any gridDim works); threads
// stride over `hidden`; the row reductions are f32 fixed-tree block sums
// (the CPU accumulates sequentially in f64: results agree to rounding).
// Suggested launch: grid = rows, block = 256.
#include "common.cuh"

using namespace ft;

// y = (x · inv) · w per row, inv = 1 / sqrt(mean(x²) + eps) saved in inv_rms[row].
template <typename T>
__device__ __forceinline__ void rmsnorm_fwd(const T* __restrict__ x, const bf16* __restrict__ w,
                                            T* __restrict__ y, float* __restrict__ inv_rms, int rows,
                                            int hidden, float eps) {
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        const u64 base = (u64)row * hidden;
        float ss = 0.0f;
        for (int j = threadIdx.x; j < hidden; j += blockDim.x) {
            const float v = load(x, base + j);
            ss += v * v;
        }
        ss = block_sum(ss);
        const float inv = 1.0f / sqrtf(ss / (float)hidden + eps);
        if (threadIdx.x == 0) inv_rms[row] = inv;
        for (int j = threadIdx.x; j < hidden; j += blockDim.x)
            store(y, base + j, (load(x, base + j) * inv) * to_f32(w[j]));
    }
}

// dx += inv·(w⊙dy) − x·c with c = inv³ · Σ((w⊙dy)⊙x) / hidden, per row.
// The weight is frozen: no weight gradient.
template <typename T>
__device__ __forceinline__ void rmsnorm_bwd(const T* __restrict__ dy, const T* __restrict__ x,
                                            const bf16* __restrict__ w, const float* __restrict__ inv_rms,
                                            T* __restrict__ dx, int rows, int hidden) {
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        const u64 base = (u64)row * hidden;
        float dot = 0.0f;
        for (int j = threadIdx.x; j < hidden; j += blockDim.x)
            dot += (to_f32(w[j]) * load(dy, base + j)) * load(x, base + j);
        dot = block_sum(dot);
        const float inv = inv_rms[row];
        const float c = (inv * inv * inv * dot) / (float)hidden;
        for (int j = threadIdx.x; j < hidden; j += blockDim.x) {
            const float wg = to_f32(w[j]) * load(dy, base + j);
            store(dx, base + j, load(dx, base + j) + (inv * wg - load(x, base + j) * c));
        }
    }
}

#define FT_RMSNORM(SUFFIX, T)                                                                      \
    extern "C" __global__ void __launch_bounds__(FT_MAX_THREADS)                                   \
        rmsnorm_fwd_##SUFFIX(const T* x, const bf16* w, T* y, float* inv_rms, int rows, int hidden, \
                             float eps) {                                                          \
        rmsnorm_fwd<T>(x, w, y, inv_rms, rows, hidden, eps);                                       \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(FT_MAX_THREADS)                                   \
        rmsnorm_bwd_##SUFFIX(const T* dy, const T* x, const bf16* w, const float* inv_rms, T* dx,  \
                             int rows, int hidden) {                                               \
        rmsnorm_bwd<T>(dy, x, w, inv_rms, dx, rows, hidden);                                       \
    }

FT_RMSNORM(f32, float)
FT_RMSNORM(bf16, bf16)
