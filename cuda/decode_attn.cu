// Decode attention: the newest tokens of one sequence against that
// sequence's key/value cache, for generation (Backend::decode_attention in
// src/backend/mod.rs). CPU reference: decode_attention in
// src/backend/cpu/attention.rs.
//
// Semantics: q holds the queries of positions past .. past+n-1; the caches
// hold the keys and values of positions 0 .. past+n-1 (the new tokens'
// included). Query i (position t = past + i) sees key j iff j <= t and
// (window == 0 or t - j < window): the mask of flash_attn.cu within one
// sequence. Query head h reads kv head h / (n_heads / n_kv_heads) (GQA, the
// cache is never copied). score = scale * (q . k) in f32, soft-capped to
// tanh(score / c) * c when softcap = c > 0 (score / c taken as score * (1/c),
// as in flash_attn.cu's capped kernels); out =
// softmax(scores) . V in f32, rounded once to bf16 when stored (no internal
// rounding of P, unlike the tensor-core flash kernels). Deterministic: fixed
// key assignment, fixed reduction trees, no atomics.
//
// =============================== LAUNCH CONTRACT ===============================
//   decode_attention_bf16(const bf16* q, const bf16* k_cache,
//       const bf16* v_cache, bf16* out, int n, int past, int n_heads,
//       int n_kv_heads, int head_dim, int window, float scale, float softcap)
//   q, out           : bf16 [n, n_heads, head_dim]
//   k_cache, v_cache : bf16 [>= past + n, n_kv_heads, head_dim] (rows past
//                      past + n - 1 are never read)
//   window           : 0 = none, else W >= 1 (pass min(W, i32::MAX))
//   softcap          : 0 = none, else the cap c > 0
//   grid (n, n_heads, 1), block (DA_THREADS = 256, 1, 1), no dynamic shared
//   memory (8256 bytes static). Preconditions, checked (__trap()): blockDim
//   as stated, 1 <= head_dim <= 256, n_kv_heads >= 1, n_heads % n_kv_heads
//   == 0, past >= 0. Never launch with n == 0 (an empty grid is an invalid
//   launch): the op is then a no-op. n_heads <= 65535 (grid.y).
// ===============================================================================
//
// Design (simple first): one block per (query, head). Its 8 warps take the
// visible keys round robin (warp w: keys lo+w, lo+w+8, ...); lane L holds
// elements L, L+32, ... of the query row and of the warp's output. Each
// warp runs an online softmax (running max m, sum l, output rescaled by
// exp(m_old - m_new)) over its keys; the 8 partial (m, l, o) are then merged
// in warp order through shared memory. Work per block is O(keys * d) on CUDA
// cores: memory-bound on the cache reads, as decoding is.
#include "common.cuh"

namespace da {

typedef long long i64;
typedef __nv_bfloat16 bf16;

constexpr int THREADS = 256;
constexpr int WARPS = THREADS / 32;
constexpr int MAX_D = 256;
constexpr int E = MAX_D / 32;  // row elements per lane

__device__ __forceinline__ float warp_allsum(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(FT_FULL_MASK, v, off);
    return v;
}

// The shared memory of the warps' merge (declared once by the entry point,
// so that the two instantiations of `decode` share it).
struct Merge {
    float m[WARPS], l[WARPS];
    float o[WARPS][MAX_D];
};

// CAP: whether scores are soft-capped (a template flag, so the plain path
// compiles exactly as without the cap).
template <bool CAP>
__device__ __forceinline__ void decode(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                       const bf16* __restrict__ v, bf16* __restrict__ out, int n, int past, int nh,
                                       int nkv, int d, int window, float scale, float cap,
                                       Merge& sm) {
    if (blockDim.x != THREADS || blockDim.y != 1 || blockDim.z != 1 || d < 1 || d > MAX_D || nkv < 1 ||
        nh % nkv != 0 || past < 0)
        __trap();
    const int i = blockIdx.x, h = blockIdx.y;
    if (i >= n || h >= nh) return;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int t = past + i;
    const int lo = (window > 0 && t - window + 1 > 0) ? t - window + 1 : 0;
    const int kvh = h / (nh / nkv);
    const float inv_cap = CAP ? 1.f / cap : 0.f;

    float qv[E], o[E];
    const bf16* qr = q + ((i64)i * nh + h) * d;
#pragma unroll
    for (int e = 0; e < E; ++e) {
        const int x = e * 32 + lane;
        qv[e] = x < d ? __bfloat162float(qr[x]) : 0.f;
        o[e] = 0.f;
    }
    float m = -ft::inf_f32(), l = 0.f;
    for (int j = lo + warp; j <= t; j += WARPS) {
        const bf16* kr = k + ((i64)j * nkv + kvh) * d;
        const bf16* vr = v + ((i64)j * nkv + kvh) * d;
        float part = 0.f;
#pragma unroll
        for (int e = 0; e < E; ++e) {
            const int x = e * 32 + lane;
            if (x < d) part += qv[e] * __bfloat162float(kr[x]);
        }
        float s = warp_allsum(part) * scale;
        if constexpr (CAP) s = tanhf(s * inv_cap) * cap;
        const float m_new = fmaxf(m, s);
        const float corr = expf(m - m_new);  // 0 on the warp's first key (m = -inf, s finite)
        const float p = expf(s - m_new);
        l = l * corr + p;
#pragma unroll
        for (int e = 0; e < E; ++e) {
            const int x = e * 32 + lane;
            if (x < d) o[e] = o[e] * corr + p * __bfloat162float(vr[x]);
        }
        m = m_new;
    }

    // Merge the warps' partial softmaxes in warp order.
    if (lane == 0) {
        sm.m[warp] = m;
        sm.l[warp] = l;
    }
#pragma unroll
    for (int e = 0; e < E; ++e) {
        const int x = e * 32 + lane;
        if (x < d) sm.o[warp][x] = o[e];
    }
    __syncthreads();
    // Key t is always visible, so some warp saw a key and M is finite; a
    // warp that saw none (m = -inf, l = 0, o = 0) gets weight 0.
    float big = -ft::inf_f32();
#pragma unroll
    for (int w = 0; w < WARPS; ++w) big = fmaxf(big, sm.m[w]);
    float weight[WARPS];
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) {
        weight[w] = sm.l[w] > 0.f ? expf(sm.m[w] - big) : 0.f;
        sum += sm.l[w] * weight[w];
    }
    bf16* orow = out + ((i64)i * nh + h) * d;
    for (int x = threadIdx.x; x < d; x += THREADS) {
        float acc = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) acc += sm.o[w][x] * weight[w];
        orow[x] = __float2bfloat16_rn(acc / sum);
    }
}

}  // namespace da

extern "C" __global__ void __launch_bounds__(da::THREADS)
    decode_attention_bf16(const __nv_bfloat16* q, const __nv_bfloat16* k_cache, const __nv_bfloat16* v_cache,
                          __nv_bfloat16* out, int n, int past, int n_heads, int n_kv_heads, int head_dim,
                          int window, float scale, float softcap) {
    __shared__ da::Merge sm;
    if (softcap > 0.f)
        da::decode<true>(q, k_cache, v_cache, out, n, past, n_heads, n_kv_heads, head_dim, window, scale, softcap, sm);
    else
        da::decode<false>(q, k_cache, v_cache, out, n, past, n_heads, n_kv_heads, head_dim, window, scale, 0.f, sm);
}
