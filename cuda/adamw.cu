// Fused AdamW step over a flat f32 parameter array (torch.optim.AdamW,
// single-tensor, non-amsgrad). CPU reference: src/backend/cpu/adamw.rs.
//
// The host computes the scalars exactly as the CPU reference does (in f64,
// then cast to f32): decay = 1 − lr·wd, one_minus_beta1 = 1 − β1,
// one_minus_beta2 = 1 − β2, step_size = lr / (1 − β1^step),
// bias_c2_sqrt = sqrt(1 − β2^step). The per-element update is the CPU's, op
// for op, in IEEE f32 (no FMA contraction: see cuda/README.md), so with the
// same scalars the result is bit-identical to the CPU backend:
//   p *= decay; m = β1·m + (1 − β1)·g; v = β2·v + (1 − β2)·g²;
//   p −= step_size · m / (sqrt(v) / bias_c2_sqrt + eps)
// Suggested launch: block = 256, any grid (grid-stride loop).
#include "common.cuh"

using namespace ft;

extern "C" __global__ void __launch_bounds__(FT_MAX_THREADS)
    adamw_f32(float* __restrict__ param, const float* __restrict__ grad, float* __restrict__ m,
              float* __restrict__ v, u64 n, float decay, float beta1, float beta2, float one_minus_beta1,
              float one_minus_beta2, float step_size, float bias_c2_sqrt, float eps) {
    for (u64 i = global_thread(); i < n; i += grid_threads()) {
        const float g = grad[i];
        float p = param[i] * decay;
        const float mi = beta1 * m[i] + one_minus_beta1 * g;
        const float vi = beta2 * v[i] + one_minus_beta2 * (g * g);
        const float denom = sqrtf(vi) / bias_c2_sqrt + eps;
        p -= step_size * (mi / denom);
        m[i] = mi;
        v[i] = vi;
        param[i] = p;
    }
}
