// Decode attention: the newest tokens of one sequence against that
// sequence's key/value cache, for generation (Backend::decode_attention in
// src/backend/mod.rs), and its batched form, one new token in each of many
// sequences, each against its own region of one cache buffer
// (Backend::decode_attention_batch). CPU reference: decode_attention and
// decode_attention_batch in src/backend/cpu/attention/decode.rs.
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
//
//   decode_attention_d512_bf16: the same arguments, grid and block, for
//   257 <= head_dim <= 512 (checked: 1 <= head_dim <= 512; 16448 bytes of
//   static shared memory).
//
//   decode_attention_batch_bf16(const bf16* q, const bf16* k_cache,
//       const bf16* v_cache, const int* positions, bf16* out, int n_seqs,
//       int capacity, int n_heads, int n_kv_heads, int head_dim, int window,
//       float scale, float softcap)
//   q, out           : bf16 [n_seqs, n_heads, head_dim] (one token each)
//   k_cache, v_cache : bf16 [n_seqs * capacity, n_kv_heads, head_dim];
//                      sequence s owns rows s*capacity .. (s+1)*capacity - 1
//   positions        : i32 [n_seqs], read on the device: sequence s's query
//                      is at position t = positions[s] and sees its rows
//                      s*capacity + j for j <= t (and t - j < window) --
//                      per sequence, decode_attention with past = t, n = 1.
//                      t outside [0, capacity) is a host bug: that output
//                      row is NaN and nothing is read.
//   window, softcap  : as above
//   grid (n_seqs, n_heads, 1), block and shared memory as above.
//   Preconditions, checked (__trap()): as above, and capacity >= 1 instead
//   of past >= 0. Never launch with n_seqs == 0.
//
//   decode_attention_batch_d512_bf16: the same for 257 <= head_dim <= 512,
//   as decode_attention_d512_bf16.
// ===============================================================================
//
// Design (simple first): one block per (query, head), in the batch per
// (sequence, head); both entry points run the same block body, `attend`.
// Its 8 warps take the visible keys round robin (warp w: keys lo+w, lo+w+8,
// ...); lane L holds elements L, L+32, ... of the query row and of the
// warp's output, MAX_D / 32 of each in registers. MAX_D is a template
// parameter: 256 for the plain names, 512 for the *_d512 ones, so that the
// common heads neither hold nor merge through the wide heads' registers and
// shared memory. Each warp runs an online softmax (running max m, sum l,
// output rescaled by exp(m_old - m_new)) over its keys; the 8 partial
// (m, l, o) are then merged in warp order through shared memory. Work per
// block is O(keys * d) on CUDA cores: memory-bound on the cache reads, as
// decoding is. (The heads of a GQA group read the same cache rows from
// separate blocks; L2 serves the repeats.)
#include "common.cuh"

namespace da {

typedef long long i64;
typedef __nv_bfloat16 bf16;

constexpr int THREADS = 256;
constexpr int WARPS = THREADS / 32;

__device__ __forceinline__ float warp_allsum(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(FT_FULL_MASK, v, off);
    return v;
}

// The shared memory of the warps' merge (declared once by each entry point,
// so that its capped and plain instantiations share it), for heads of at
// most MAX_D elements.
template <int MAX_D>
struct Merge {
    float m[WARPS], l[WARPS];
    float o[WARPS][MAX_D];
};

// Checked preconditions shared by both entry points (__trap(): a host bug).
template <int MAX_D>
__device__ __forceinline__ void check_launch(int nh, int nkv, int d) {
    if (blockDim.x != THREADS || blockDim.y != 1 || blockDim.z != 1 || d < 1 || d > MAX_D || nkv < 1 ||
        nh % nkv != 0)
        __trap();
}

// One query row against keys lo..t of one sequence's cache: qr and orow are
// the row's query and output, k and v the cache of its sequence (row 0 of
// that sequence), kvh the kv head it reads. The block's body, shared by the
// one-sequence and the batched entry points.
// CAP: whether scores are soft-capped (a template flag, so the plain path
// compiles exactly as without the cap).
template <bool CAP, int MAX_D>
__device__ __forceinline__ void attend(const bf16* __restrict__ qr, const bf16* __restrict__ k,
                                       const bf16* __restrict__ v, bf16* __restrict__ orow, int t, int nkv,
                                       int kvh, int d, int window, float scale, float cap, Merge<MAX_D>& sm) {
    constexpr int E = MAX_D / 32;  // row elements per lane
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int lo = (window > 0 && t - window + 1 > 0) ? t - window + 1 : 0;
    const float inv_cap = CAP ? 1.f / cap : 0.f;

    float qv[E], o[E];
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
    for (int x = threadIdx.x; x < d; x += THREADS) {
        float acc = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) acc += sm.o[w][x] * weight[w];
        orow[x] = __float2bfloat16_rn(acc / sum);
    }
}

// Query i of the one-sequence op: position past + i against the cache.
template <bool CAP, int MAX_D>
__device__ __forceinline__ void decode(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                       const bf16* __restrict__ v, bf16* __restrict__ out, int n, int past, int nh,
                                       int nkv, int d, int window, float scale, float cap, Merge<MAX_D>& sm) {
    check_launch<MAX_D>(nh, nkv, d);
    if (past < 0) __trap();
    const int i = blockIdx.x, h = blockIdx.y;
    if (i >= n || h >= nh) return;
    const i64 row = ((i64)i * nh + h) * d;
    attend<CAP, MAX_D>(q + row, k, v, out + row, past + i, nkv, h / (nh / nkv), d, window, scale, cap, sm);
}

// Sequence s of the batched op: its one query, at positions[s], against
// rows s * capacity .. of the batched cache. A position outside
// [0, capacity) is a host bug (the CPU backend panics): nothing is read and
// the output row is NaN, so the bug is loud.
template <bool CAP, int MAX_D>
__device__ __forceinline__ void decode_batch(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                             const bf16* __restrict__ v, const int* __restrict__ positions,
                                             bf16* __restrict__ out, int n_seqs, int capacity, int nh, int nkv,
                                             int d, int window, float scale, float cap, Merge<MAX_D>& sm) {
    check_launch<MAX_D>(nh, nkv, d);
    if (capacity < 1) __trap();
    const int s = blockIdx.x, h = blockIdx.y;
    if (s >= n_seqs || h >= nh) return;
    const i64 row = ((i64)s * nh + h) * d;
    const int t = positions[s];  // the same for the whole block: no divergence at the barrier
    if (t < 0 || t >= capacity) {
        for (int x = threadIdx.x; x < d; x += THREADS) out[row + x] = __float2bfloat16_rn(ft::nan_f32());
        return;
    }
    const i64 base = (i64)s * capacity * nkv * d;
    attend<CAP, MAX_D>(q + row, k + base, v + base, out + row, t, nkv, h / (nh / nkv), d, window, scale, cap, sm);
}

}  // namespace da

// The entry points for heads of at most MAX_D elements; the cap's two
// instantiations share one Merge.
#define DA_ENTRIES(NAME, BATCH_NAME, MAX_D)                                                                     \
    extern "C" __global__ void __launch_bounds__(da::THREADS)                                                 \
        NAME(const __nv_bfloat16* q, const __nv_bfloat16* k_cache, const __nv_bfloat16* v_cache,               \
             __nv_bfloat16* out, int n, int past, int n_heads, int n_kv_heads, int head_dim, int window,        \
             float scale, float softcap) {                                                                    \
        __shared__ da::Merge<MAX_D> sm;                                                                       \
        if (softcap > 0.f)                                                                                    \
            da::decode<true, MAX_D>(q, k_cache, v_cache, out, n, past, n_heads, n_kv_heads, head_dim, window,  \
                                    scale, softcap, sm);                                                      \
        else                                                                                                  \
            da::decode<false, MAX_D>(q, k_cache, v_cache, out, n, past, n_heads, n_kv_heads, head_dim, window, \
                                     scale, 0.f, sm);                                                         \
    }                                                                                                         \
    extern "C" __global__ void __launch_bounds__(da::THREADS)                                                 \
        BATCH_NAME(const __nv_bfloat16* q, const __nv_bfloat16* k_cache, const __nv_bfloat16* v_cache,         \
                   const int* positions, __nv_bfloat16* out, int n_seqs, int capacity, int n_heads,            \
                   int n_kv_heads, int head_dim, int window, float scale, float softcap) {                    \
        __shared__ da::Merge<MAX_D> sm;                                                                       \
        if (softcap > 0.f)                                                                                    \
            da::decode_batch<true, MAX_D>(q, k_cache, v_cache, positions, out, n_seqs, capacity, n_heads,      \
                                          n_kv_heads, head_dim, window, scale, softcap, sm);                  \
        else                                                                                                  \
            da::decode_batch<false, MAX_D>(q, k_cache, v_cache, positions, out, n_seqs, capacity, n_heads,     \
                                           n_kv_heads, head_dim, window, scale, 0.f, sm);                     \
    }

DA_ENTRIES(decode_attention_bf16, decode_attention_batch_bf16, 256)
DA_ENTRIES(decode_attention_d512_bf16, decode_attention_batch_d512_bf16, 512)
