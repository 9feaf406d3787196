// Flash attention's generic kernels, for any head_dim 1..512 that the
// tensor-core kernels of cuda/flash_attn.cu (64 / 128) do not cover:
// flash_attn_fwd_generic, flash_attn_bwd_dq_generic, flash_attn_bwd_dkdv_generic
// and their soft-capped twins (*_capped_generic) for head_dim <= 256, and the
// same six with the suffix _generic_d512 for 257..512 (Gemma 4's full-
// attention layers). Semantics, arguments, grid and block are in the launch
// contract at the top of cuda/flash_attn.cu; the backward uses that file's
// flash_attn_bwd_preprocess too. Slow (no tensor cores, one warp per row):
// for tiny test models and unusual heads.
// CPU reference: src/backend/cpu/attention.rs.
#include <cuda_bf16.h>

#include "flash_common.cuh"

namespace fa {

// ============================================================================
// Generic fallback (any head_dim 1..32·E): one warp per (token, head) or
// (token, kv head); lane L holds elements L, L+32, ... of a row, E of them
// in registers; f32 math, no tensor cores, loops over exactly the visible
// keys (no masking needed). E is a template parameter, instantiated twice:
// E = 8 (head_dim <= 256) and E = 16 (<= 512). One E for every size would
// make the small heads carry (and loop over) the large heads' registers;
// two instantiations keep the <= 256 kernels exactly as they were.
// ============================================================================

// The sequence holding token t: the largest s < n_seqs with cu[s] <= t.
__device__ __forceinline__ int find_seq(const int* __restrict__ cu, int n_seqs, int t) {
    int lo = 0, hi = n_seqs - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (cu[mid] <= t)
            lo = mid;
        else
            hi = mid - 1;
    }
    return lo;
}

template <int E>
__device__ __forceinline__ void gen_load(float (&x)[E], const bf16* __restrict__ row, int d, int lane) {
#pragma unroll
    for (int e = 0; e < E; ++e) {
        const int i = e * 32 + lane;
        x[e] = i < d ? bf2f(row[i]) : 0.f;
    }
}

template <int E>
__device__ __forceinline__ float gen_dot(const float (&x)[E], const bf16* __restrict__ row, int d, int lane) {
    float part = 0.f;
#pragma unroll
    for (int e = 0; e < E; ++e) {
        const int i = e * 32 + lane;
        if (i < d) part += x[e] * bf2f(row[i]);
    }
    return warp_allsum(part);
}

template <int E>
__device__ __forceinline__ void gen_store(bf16* __restrict__ row, const float (&x)[E], float mul, int d,
                                          int lane) {
#pragma unroll
    for (int e = 0; e < E; ++e) {
        const int i = e * 32 + lane;
        if (i < d) row[i] = __float2bfloat16_rn(x[e] * mul);
    }
}

// The launch contract's checked preconditions; head_dim at most 32·E.
template <int E>
__device__ __forceinline__ void gen_check(int head_dim, int nh, int nkv) {
    if (blockDim.x != NTHREADS || blockDim.y != 1 || blockDim.z != 1 || head_dim < 1 || head_dim > 32 * E ||
        nkv <= 0 || nh % nkv != 0)
        __trap();
}

template <bool CAP, int E>
__device__ __forceinline__ void fwd_generic(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                            const bf16* __restrict__ v, const int* __restrict__ cu,
                                            bf16* __restrict__ out, float* __restrict__ lse, int n, int n_seqs,
                                            int nh, int nkv, int d, int window, float scale, float cap) {
    gen_check<E>(d, nh, nkv);
    const float inv_cap = CAP ? 1.f / cap : 0.f;
    const int t = blockIdx.x * (NTHREADS / 32) + (threadIdx.x >> 5), h = blockIdx.y, lane = threadIdx.x & 31;
    if (t >= n || h >= nh) return;
    const int s0 = cu[find_seq(cu, n_seqs, t)];
    const int lo = window > 0 ? max(s0, t - window + 1) : s0;
    const int kvh = h / (nh / nkv);
    float qv[E], o[E];
    gen_load(qv, q + ((i64)t * nh + h) * d, d, lane);
#pragma unroll
    for (int e = 0; e < E; ++e) o[e] = 0.f;
    float m = neg_inf(), l = 0.f;
    for (int j = lo; j <= t; ++j) {
        float s = gen_dot(qv, k + ((i64)j * nkv + kvh) * d, d, lane) * scale;
        if constexpr (CAP) {
            float th;
            s = soft_cap(s, cap, inv_cap, th);
        }
        const float m_new = fmaxf(m, s);
        const float corr = expf(m - m_new);  // 0 on the first key (m = -inf, s finite)
        const float p = expf(s - m_new);
        l = l * corr + p;
        const bf16* vr = v + ((i64)j * nkv + kvh) * d;
#pragma unroll
        for (int e = 0; e < E; ++e) {
            const int i = e * 32 + lane;
            if (i < d) o[e] = o[e] * corr + p * bf2f(vr[i]);
        }
        m = m_new;
    }
    gen_store(out + ((i64)t * nh + h) * d, o, 1.f / l, d, lane);  // l >= 1: key t is always visible
    if (lane == 0) lse[(i64)h * n + t] = m + logf(l);
}

template <bool CAP, int E>
__device__ __forceinline__ void bwd_dq_generic(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                               const bf16* __restrict__ v, const bf16* __restrict__ dout,
                                               const float* __restrict__ lse, const float* __restrict__ dsum,
                                               const int* __restrict__ cu, bf16* __restrict__ dq, int n, int n_seqs,
                                               int nh, int nkv, int d, int window, float scale, float cap) {
    gen_check<E>(d, nh, nkv);
    const float inv_cap = CAP ? 1.f / cap : 0.f;
    const int t = blockIdx.x * (NTHREADS / 32) + (threadIdx.x >> 5), h = blockIdx.y, lane = threadIdx.x & 31;
    if (t >= n || h >= nh) return;
    const int s0 = cu[find_seq(cu, n_seqs, t)];
    const int lo = window > 0 ? max(s0, t - window + 1) : s0;
    const int kvh = h / (nh / nkv);
    float qv[E], dov[E], acc[E];
    gen_load(qv, q + ((i64)t * nh + h) * d, d, lane);
    gen_load(dov, dout + ((i64)t * nh + h) * d, d, lane);
#pragma unroll
    for (int e = 0; e < E; ++e) acc[e] = 0.f;
    const float lse_t = lse[(i64)h * n + t], d_t = dsum[(i64)h * n + t];
    for (int j = lo; j <= t; ++j) {
        const bf16* kr = k + ((i64)j * nkv + kvh) * d;
        float s = gen_dot(qv, kr, d, lane) * scale, th = 0.f;
        if constexpr (CAP) s = soft_cap(s, cap, inv_cap, th);
        const float p = expf(s - lse_t);
        float ds = p * (gen_dot(dov, v + ((i64)j * nkv + kvh) * d, d, lane) - d_t);
        if constexpr (CAP) ds *= 1.f - th * th;
#pragma unroll
        for (int e = 0; e < E; ++e) {
            const int i = e * 32 + lane;
            if (i < d) acc[e] += ds * bf2f(kr[i]);
        }
    }
    gen_store(dq + ((i64)t * nh + h) * d, acc, scale, d, lane);
}

template <bool CAP, int E>
__device__ __forceinline__ void bwd_dkdv_generic(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                                 const bf16* __restrict__ v, const bf16* __restrict__ dout,
                                                 const float* __restrict__ lse, const float* __restrict__ dsum,
                                                 const int* __restrict__ cu, bf16* __restrict__ dk,
                                                 bf16* __restrict__ dv, int n, int n_seqs, int nh, int nkv, int d,
                                                 int window, float scale, float cap) {
    gen_check<E>(d, nh, nkv);
    const float inv_cap = CAP ? 1.f / cap : 0.f;
    const int j = blockIdx.x * (NTHREADS / 32) + (threadIdx.x >> 5), kvh = blockIdx.y, lane = threadIdx.x & 31;
    if (j >= n || kvh >= nkv) return;
    const int end = cu[find_seq(cu, n_seqs, j) + 1];
    const int hi = (window > 0 && window < end - j) ? j + window : end;  // queries j .. hi-1 see key j
    const int group = nh / nkv;
    float kv_[E], vv[E], ak[E], av[E];
    gen_load(kv_, k + ((i64)j * nkv + kvh) * d, d, lane);
    gen_load(vv, v + ((i64)j * nkv + kvh) * d, d, lane);
#pragma unroll
    for (int e = 0; e < E; ++e) ak[e] = av[e] = 0.f;
    for (int hq = kvh * group; hq < (kvh + 1) * group; ++hq) {
        for (int i = j; i < hi; ++i) {
            const bf16* qr = q + ((i64)i * nh + hq) * d;
            const bf16* dr = dout + ((i64)i * nh + hq) * d;
            float s = gen_dot(kv_, qr, d, lane) * scale, th = 0.f;
            if constexpr (CAP) s = soft_cap(s, cap, inv_cap, th);
            const float p = expf(s - lse[(i64)hq * n + i]);
            float ds = p * (gen_dot(vv, dr, d, lane) - dsum[(i64)hq * n + i]);
            if constexpr (CAP) ds *= 1.f - th * th;
#pragma unroll
            for (int e = 0; e < E; ++e) {
                const int x = e * 32 + lane;
                if (x < d) {
                    ak[e] += ds * bf2f(qr[x]);
                    av[e] += p * bf2f(dr[x]);
                }
            }
        }
    }
    gen_store(dk + ((i64)j * nkv + kvh) * d, ak, scale, d, lane);
    gen_store(dv + ((i64)j * nkv + kvh) * d, av, 1.f, d, lane);
}

}  // namespace fa

// ============================================================================
// Entry points: the six kernels for head_dim <= 256 (E = 8) under their
// original names (*_generic), and for 257..512 (E = 16) as *_generic_d512.
// ============================================================================
#define FA_GENERIC_ENTRIES(SUFFIX, E)                                                                       \
    extern "C" __global__ void __launch_bounds__(fa::NTHREADS) flash_attn_fwd_##SUFFIX(FA_FWD_ARGS) {        \
        fa::fwd_generic<false, E>(FA_FWD_PASS, 0.f);                                                      \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(fa::NTHREADS) flash_attn_bwd_dq_##SUFFIX(FA_DQ_ARGS) {      \
        fa::bwd_dq_generic<false, E>(FA_DQ_PASS, 0.f);                                                    \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(fa::NTHREADS) flash_attn_bwd_dkdv_##SUFFIX(FA_DKDV_ARGS) {  \
        fa::bwd_dkdv_generic<false, E>(FA_DKDV_PASS, 0.f);                                                \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(fa::NTHREADS)                                            \
        flash_attn_fwd_capped_##SUFFIX(FA_FWD_ARGS, float softcap) {                                      \
        fa::fwd_generic<true, E>(FA_FWD_PASS, softcap);                                                   \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(fa::NTHREADS)                                            \
        flash_attn_bwd_dq_capped_##SUFFIX(FA_DQ_ARGS, float softcap) {                                    \
        fa::bwd_dq_generic<true, E>(FA_DQ_PASS, softcap);                                                 \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(fa::NTHREADS)                                            \
        flash_attn_bwd_dkdv_capped_##SUFFIX(FA_DKDV_ARGS, float softcap) {                                \
        fa::bwd_dkdv_generic<true, E>(FA_DKDV_PASS, softcap);                                             \
    }

FA_GENERIC_ENTRIES(generic, 8)
FA_GENERIC_ENTRIES(generic_d512, 16)
