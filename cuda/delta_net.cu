// Qwen3.5's gated delta-net (linear attention). CPU reference:
// src/backend/cpu/delta_net.rs (its header states the math), backward in
// src/backend/cpu/delta_net/backward.rs. Per token t of a sequence and
// v-head h (reading k-head h / (Hv/Hk)):
//   pre = causal depthwise conv over time (kernel K) of qkv, act = silu(pre);
//   q̂ = act_q / √(Σ act_q² + 1e-6) · dk^−½, k̂ = act_k / √(Σ act_k² + 1e-6), v = act_v;
//   β = σ(b), g = −exp(A_log)·softplus(a + dt_bias);
//   S' = e^g·S, u = β(v − S'ᵀk̂), S = S' + k̂·uᵀ, o = Sᵀq̂;
//   out = w ⊙ o / √(mean(o²) + eps) ⊙ silu(z).
//
// Kernels (T = storage of the activations qkv, z, b, a, out and their
// gradients; the frozen conv, A_log, dt_bias and norm weights are bf16;
// states, saved states and scratch are f32; math in f32):
// - delta_prep_fwd_T: one block per token (grid-stride): pre [n, C] and
//   xn [n, C] = [q̂ | k̂ | v]; the conv reads `hist` [n_seqs, K−1, C] before a
//   sequence's first token when has_hist (decode), zeros otherwise.
// - delta_scan_fwd_T: one block per (sequence, v-head) (grid-stride), thread
//   j owns column j of that pair's state [dk, dv] in `state` (f32, global,
//   updated in place); writes out and, when save, the state at the start of
//   each 64-token chunk into `saved` (sequence after sequence, chunk after
//   chunk, [Hv, dk, dv] each: the CPU's layout).
// - delta_conv_state_T: a decode's new conv rows: the last K−1 of
//   (old rows ++ the sequence's new qkv rows), in place, one block per
//   sequence, a thread per channel.
// - delta_scan_bwd_T: per (sequence, v-head) the chunks from last to first:
//   the chunk's per-token start states recomputed from the saved one into
//   `starts` [slot, 64, dk, dv], then the tokens in reverse carrying dS in
//   `dstate` [slot, dk, dv] (slot = blockIdx.x: the grid may be smaller than
//   the number of pairs). Writes dq̂, dk̂ per v-head into dqk [n, Hv, 2, dk],
//   dv into the v columns of dact [n, C], and dz, db, da.
// - delta_norm_bwd_f32: per token, dq̂/dk̂ summed over the v-heads sharing a
//   k-head (in head order, no atomics), through the l2 norms, then every
//   channel of dact times silu'(pre): dact becomes d(pre), in place.
// - delta_conv_bwd_T: per token, the transposed conv within its sequence:
//   dqkv[t] = Σ_j conv[:, j] ⊙ dpre[t + K − 1 − j].
//
// Launch: prep / norm / conv kernels any block size (a multiple of 32);
// scan kernels blockDim = dv rounded up to 32, dk and dv at most 128
// (__launch_bounds__(128), the forward scan at least 4 blocks per SM; the
// backward's per-warp partials are sized for 4 warps).
// Sums over the state's rows run in the CPU's order; those across threads
// are fixed trees: results are deterministic and agree with the CPU to
// rounding.

#include "common.cuh"

namespace {

using ft::bf16;
using ft::load;
using ft::store;
using ft::u64;

constexpr int CHUNK = 64;
constexpr int SCAN_THREADS = 128;
constexpr int SCAN_WARPS = SCAN_THREADS / FT_WARP;
constexpr int MAX_DK = 128;

__device__ __forceinline__ float sigmoidf_(float x) { return 1.0f / (1.0f + expf(-x)); }
__device__ __forceinline__ float silu_(float x) { return x / (1.0f + expf(-x)); }
__device__ __forceinline__ float silu_slope(float x) {
    const float s = sigmoidf_(x);
    return s * (1.0f + x * (1.0f - s));
}
// torch's softplus (linear above 20) and its slope.
__device__ __forceinline__ float softplus_(float x) { return x > 20.0f ? x : log1pf(expf(x)); }
__device__ __forceinline__ float softplus_slope(float x) { return x > 20.0f ? 1.0f : sigmoidf_(x); }

// Sum over the warp, the same in every lane (each butterfly step adds the
// same two values in either lane).
__device__ __forceinline__ float warp_allsum(float v) {
#pragma unroll
    for (int off = FT_WARP / 2; off > 0; off >>= 1) v += __shfl_xor_sync(FT_FULL_MASK, v, off);
    return v;
}

// The sequence holding token t, and its bounds.
__device__ __forceinline__ int seq_of(const int* cu, int n_seqs, int t, int* s0, int* s1) {
    int s = 0;
    while (s + 1 < n_seqs && cu[s + 1] <= t) s++;
    *s0 = cu[s];
    *s1 = cu[s + 1];
    return s;
}

// Chunks of the sequences before `seq` (its first index into `saved`).
__device__ __forceinline__ int chunk_base(const int* cu, int seq) {
    int base = 0;
    for (int s = 0; s < seq; s++) base += (cu[s + 1] - cu[s] + CHUNK - 1) / CHUNK;
    return base;
}

// The per-token gates of (t, h).
struct Gates {
    float beta, g, a_scale, a_in;
};
template <typename T>
__device__ __forceinline__ Gates gates(const T* b, const T* a, const bf16* a_log, const bf16* dt_bias, int t, int h, int hv) {
    Gates r;
    r.beta = sigmoidf_(load(b, (u64)t * hv + h));
    r.a_scale = -expf(load(a_log, h));
    r.a_in = load(a, (u64)t * hv + h) + load(dt_bias, h);
    r.g = r.a_scale * softplus_(r.a_in);
    return r;
}

template <typename T>
__device__ void prep_fwd(const T* qkv, const bf16* conv, const float* hist, const int* cu, float* pre, float* xn, int n, int n_seqs,
                         int hk, int dk, int c, int k, int has_hist, float q_scale) {
    const int lane = threadIdx.x % FT_WARP, warp = threadIdx.x / FT_WARP, nwarps = blockDim.x / FT_WARP;
    for (int t = blockIdx.x; t < n; t += gridDim.x) {
        int s0, s1;
        const int sq = seq_of(cu, n_seqs, t, &s0, &s1);
        for (int ch = threadIdx.x; ch < c; ch += blockDim.x) {
            float acc = 0.0f;
            for (int j = 0; j < k; j++) {
                // Input row t − (K−1) + j: a carried row while r < K−1.
                const int r = t - s0 + j;
                if (r + 1 >= k) {
                    acc += load(conv, (u64)ch * k + j) * load(qkv, (u64)(t + j + 1 - k) * c + ch);
                } else if (has_hist) {
                    acc += load(conv, (u64)ch * k + j) * hist[((u64)sq * (k - 1) + r) * c + ch];
                }
            }
            pre[(u64)t * c + ch] = acc;
            xn[(u64)t * c + ch] = silu_(acc);
        }
        __syncthreads();
        // The l2 norms: a warp per q or k head.
        for (int head = warp; head < 2 * hk; head += nwarps) {
            float* x = xn + (u64)t * c + (u64)head * dk;
            float ss = 0.0f;
            for (int i = lane; i < dk; i += FT_WARP) ss += x[i] * x[i];
            ss = warp_allsum(ss);
            const float inv = 1.0f / sqrtf(ss + 1e-6f);
            const float sc = head < hk ? q_scale : 1.0f;
            for (int i = lane; i < dk; i += FT_WARP) x[i] = x[i] * inv * sc;
        }
        __syncthreads();
    }
}

template <typename T>
__device__ void scan_fwd(const float* xn, const T* z, const T* b, const T* a, const bf16* a_log, const bf16* dt_bias, const bf16* norm,
                         const int* cu, float* state, T* out, float* saved, int n_seqs, int hk, int hv, int dk, int dv, float eps, int save) {
    const int j = threadIdx.x;
    const bool active = j < dv;
    const int c = 2 * hk * dk + hv * dv, ratio = hv / hk;
    const u64 ss = (u64)dk * dv;
    for (int p = blockIdx.x; p < n_seqs * hv; p += gridDim.x) {
        const int sq = p / hv, h = p % hv, kh = h / ratio;
        const int s0 = cu[sq], s1 = cu[sq + 1];
        // Column j of the pair's state, and of its first saved chunk state.
        float* col = state + (u64)p * ss + j;
        float* saved_col = save ? saved + ((u64)chunk_base(cu, sq) * hv + h) * ss + j : nullptr;
        const float w = active ? load(norm, j) : 0.0f;
        for (int t = s0; t < s1; t++) {
            if (save && active && (t - s0) % CHUNK == 0) {
                float* dst = saved_col + (u64)((t - s0) / CHUNK) * hv * ss;
                for (int i = 0; i < dk; i++) dst[(u64)i * dv] = col[(u64)i * dv];
            }
            const Gates gt = gates(b, a, a_log, dt_bias, t, h, hv);
            const float* q = xn + (u64)t * c + (u64)kh * dk;
            const float* kk = q + (u64)hk * dk;
            float o = 0.0f;
            if (active) {
                const float d = expf(gt.g);
                float kv = 0.0f;
                for (int i = 0; i < dk; i++) {
                    const float s = col[(u64)i * dv] * d;
                    col[(u64)i * dv] = s;
                    kv += kk[i] * s;
                }
                const float u = gt.beta * (xn[(u64)t * c + 2 * hk * dk + h * dv + j] - kv);
                for (int i = 0; i < dk; i++) {
                    const float s = col[(u64)i * dv] + kk[i] * u;
                    col[(u64)i * dv] = s;
                    o += s * q[i];
                }
            }
            const float sum = ft::block_sum(active ? o * o : 0.0f);
            const float inv = 1.0f / sqrtf(sum / (float)dv + eps);
            if (active) {
                const u64 at = ((u64)t * hv + h) * dv + j;
                store(out, at, w * (o * inv) * silu_(load(z, at)));
            }
        }
    }
}

template <typename T>
__device__ void update_conv_state(const T* qkv, const int* cu, float* cs, int n_seqs, int c, int k) {
    const int hist = k - 1;
    for (int s = blockIdx.x; s < n_seqs; s += gridDim.x) {
        const int s0 = cu[s], len = cu[s + 1] - s0;
        for (int ch = threadIdx.x; ch < c; ch += blockDim.x) {
            // Row r takes row len + r of (old ++ new): a later row, so
            // ascending r never reads a row it has overwritten.
            for (int r = 0; r < hist; r++) {
                const int src = len + r;
                const float v = src < hist ? cs[((u64)s * hist + src) * c + ch] : load(qkv, (u64)(s0 + src - hist) * c + ch);
                cs[((u64)s * hist + r) * c + ch] = v;
            }
        }
    }
}

// Sum over a warp's lanes, stored by lane 0 as part[i][warp].
__device__ __forceinline__ void warp_part(float (*part)[SCAN_WARPS], int i, float v) {
    v = ft::warp_sum(v);
    if (threadIdx.x % FT_WARP == 0) part[i][threadIdx.x / FT_WARP] = v;
}

template <typename T>
__device__ void scan_bwd(const float* xn, const T* z, const T* b, const T* a, const bf16* a_log, const bf16* dt_bias, const bf16* norm,
                         const int* cu, const float* saved, const T* dout, float* starts_all, float* dstate_all, float* dqk, float* dact,
                         T* dz, T* db, T* da, int n_seqs, int hk, int hv, int dk, int dv, float eps) {
    __shared__ float dq_part[MAX_DK][SCAN_WARPS];
    __shared__ float dk_part1[MAX_DK][SCAN_WARPS];
    __shared__ float dk_part2[MAX_DK][SCAN_WARPS];
    const int j = threadIdx.x;
    const bool active = j < dv;
    const int nwarps = blockDim.x / FT_WARP;
    const int c = 2 * hk * dk + hv * dv, ratio = hv / hk;
    const u64 ss = (u64)dk * dv;
    float* starts = starts_all + (u64)blockIdx.x * CHUNK * ss;
    float* ds = dstate_all + (u64)blockIdx.x * ss;
    const float inv_dv = 1.0f / (float)dv;
    for (int p = blockIdx.x; p < n_seqs * hv; p += gridDim.x) {
        const int sq = p / hv, h = p % hv, kh = h / ratio;
        const int s0 = cu[sq], s1 = cu[sq + 1], len = s1 - s0;
        const int cb = chunk_base(cu, sq);
        const float w = active ? load(norm, j) : 0.0f;
        if (active)
            for (int i = 0; i < dk; i++) ds[(u64)i * dv + j] = 0.0f;
        for (int ch = (len + CHUNK - 1) / CHUNK - 1; ch >= 0; ch--) {
            const int t0 = s0 + ch * CHUNK, t1 = min(s1, t0 + CHUNK);
            // Each token's start state, from the chunk's saved one (thread j
            // reads and writes only column j: no barrier needed).
            if (active) {
                const float* src = saved + ((u64)(cb + ch) * hv + h) * ss;
                for (int i = 0; i < dk; i++) starts[(u64)i * dv + j] = src[(u64)i * dv + j];
                for (int t = t0; t + 1 < t1; t++) {
                    const Gates gt = gates(b, a, a_log, dt_bias, t, h, hv);
                    const float* kk = xn + (u64)t * c + (u64)(hk + kh) * dk;
                    const float* cur = starts + (u64)(t - t0) * ss;
                    float* nxt = starts + (u64)(t + 1 - t0) * ss;
                    const float d = expf(gt.g);
                    float kv = 0.0f;
                    for (int i = 0; i < dk; i++) kv += kk[i] * (cur[(u64)i * dv + j] * d);
                    const float u = gt.beta * (xn[(u64)t * c + 2 * hk * dk + h * dv + j] - kv);
                    for (int i = 0; i < dk; i++) nxt[(u64)i * dv + j] = cur[(u64)i * dv + j] * d + kk[i] * u;
                }
            }
            for (int t = t1 - 1; t >= t0; t--) {
                const Gates gt = gates(b, a, a_log, dt_bias, t, h, hv);
                const float* q = xn + (u64)t * c + (u64)kh * dk;
                const float* kk = xn + (u64)t * c + (u64)(hk + kh) * dk;
                const float* cur = starts + (u64)(t - t0) * ss;
                const float e = expf(gt.g);
                const u64 at = ((u64)t * hv + h) * dv + j;
                // Recompute S' = e^g·S, kv, u, S and o as the forward did.
                float kv = 0.0f, u = 0.0f, o = 0.0f, v = 0.0f;
                if (active) {
                    for (int i = 0; i < dk; i++) kv += kk[i] * (cur[(u64)i * dv + j] * e);
                    v = xn[(u64)t * c + 2 * hk * dk + h * dv + j];
                    u = gt.beta * (v - kv);
                    for (int i = 0; i < dk; i++) o += (cur[(u64)i * dv + j] * e + kk[i] * u) * q[i];
                }
                // The gated norm.
                const float inv = 1.0f / sqrtf(ft::block_sum(active ? o * o : 0.0f) / (float)dv + eps);
                float dn = 0.0f;
                if (active) {
                    const float dy = load(dout, at), zz = load(z, at);
                    dn = dy * w * silu_(zz);
                    store(dz, at, dy * w * (o * inv) * silu_slope(zz));
                }
                const float cc = inv * inv * inv * ft::block_sum(dn * o) * inv_dv;
                const float dov = inv * dn - o * cc;
                // o = Sᵀq, then S = S' + k·uᵀ.
                float du = 0.0f;
                for (int i = 0; i < dk; i++) {
                    float dq_c = 0.0f, dk_c = 0.0f;
                    if (active) {
                        const float s = cur[(u64)i * dv + j] * e + kk[i] * u;
                        dq_c = s * dov;
                        float dsv = ds[(u64)i * dv + j] + q[i] * dov;
                        ds[(u64)i * dv + j] = dsv;
                        dk_c = dsv * u;
                        du += kk[i] * dsv;
                    }
                    warp_part(dq_part, i, dq_c);
                    warp_part(dk_part1, i, dk_c);
                }
                // u = β(v − kv), kv = S'ᵀk.
                const float dbeta = ft::block_sum(active ? du * (v - kv) : 0.0f);
                const float dkv = -(gt.beta * du);
                if (active) dact[(u64)t * c + 2 * hk * dk + h * dv + j] = gt.beta * du;
                // S' = e^g·S.
                float dg = 0.0f;
                for (int i = 0; i < dk; i++) {
                    float dk_c = 0.0f;
                    if (active) {
                        const float sp = cur[(u64)i * dv + j] * e;
                        dk_c = sp * dkv;
                        const float dsv = ds[(u64)i * dv + j] + kk[i] * dkv;
                        dg += sp * dsv;
                        ds[(u64)i * dv + j] = dsv * e;
                    }
                    warp_part(dk_part2, i, dk_c);
                }
                dg = ft::block_sum(dg);
                if (j == 0) {
                    store(db, (u64)t * hv + h, dbeta * gt.beta * (1.0f - gt.beta));
                    store(da, (u64)t * hv + h, dg * gt.a_scale * softplus_slope(gt.a_in));
                }
                __syncthreads();  // the partials are complete
                for (int i = threadIdx.x; i < dk; i += blockDim.x) {
                    float dq = 0.0f, dk1 = 0.0f, dk2 = 0.0f;
                    for (int wi = 0; wi < nwarps; wi++) {
                        dq += dq_part[i][wi];
                        dk1 += dk_part1[i][wi];
                        dk2 += dk_part2[i][wi];
                    }
                    float* dst = dqk + ((u64)t * hv + h) * 2 * dk;
                    dst[i] = dq;
                    dst[dk + i] = dk1 + dk2;
                }
                __syncthreads();  // read before the next token overwrites them
            }
        }
    }
}

}  // namespace

#define FT_DELTA_KERNELS(T, SUF)                                                                                                        \
    extern "C" __global__ void __launch_bounds__(FT_MAX_THREADS)                                                                         \
        delta_prep_fwd_##SUF(const T* qkv, const bf16* conv, const float* hist, const int* cu_seqlens, float* pre, float* xn, int n,    \
                             int n_seqs, int k_heads, int k_dim, int conv_dim, int kernel, int has_hist, float q_scale) {               \
        prep_fwd<T>(qkv, conv, hist, cu_seqlens, pre, xn, n, n_seqs, k_heads, k_dim, conv_dim, kernel, has_hist, q_scale);              \
    }                                                                                                                                    \
    extern "C" __global__ void __launch_bounds__(SCAN_THREADS, 4)                                                                        \
        delta_scan_fwd_##SUF(const float* xn, const T* z, const T* b, const T* a, const bf16* a_log, const bf16* dt_bias,              \
                             const bf16* norm, const int* cu_seqlens, float* state, T* out, float* saved, int n_seqs, int k_heads,      \
                             int v_heads, int k_dim, int v_dim, float eps, int save) {                                                  \
        scan_fwd<T>(xn, z, b, a, a_log, dt_bias, norm, cu_seqlens, state, out, saved, n_seqs, k_heads, v_heads, k_dim, v_dim, eps,      \
                    save);                                                                                                              \
    }                                                                                                                                    \
    extern "C" __global__ void __launch_bounds__(FT_MAX_THREADS)                                                                         \
        delta_conv_state_##SUF(const T* qkv, const int* cu_seqlens, float* conv_state, int n_seqs, int conv_dim, int kernel) {          \
        update_conv_state<T>(qkv, cu_seqlens, conv_state, n_seqs, conv_dim, kernel);                                                    \
    }                                                                                                                                    \
    extern "C" __global__ void __launch_bounds__(SCAN_THREADS)                                                                           \
        delta_scan_bwd_##SUF(const float* xn, const T* z, const T* b, const T* a, const bf16* a_log, const bf16* dt_bias,              \
                             const bf16* norm, const int* cu_seqlens, const float* saved, const T* dout, float* starts, float* dstate,  \
                             float* dqk, float* dact, T* dz, T* db, T* da, int n_seqs, int k_heads, int v_heads, int k_dim, int v_dim, \
                             float eps) {                                                                                               \
        scan_bwd<T>(xn, z, b, a, a_log, dt_bias, norm, cu_seqlens, saved, dout, starts, dstate, dqk, dact, dz, db, da, n_seqs,        \
                    k_heads, v_heads, k_dim, v_dim, eps);                                                                               \
    }                                                                                                                                    \
    extern "C" __global__ void __launch_bounds__(FT_MAX_THREADS)                                                                         \
        delta_conv_bwd_##SUF(const float* dpre, const bf16* conv, const int* cu_seqlens, T* dqkv, int n, int n_seqs, int conv_dim,     \
                             int kernel) {                                                                                              \
        for (int t = blockIdx.x; t < n; t += gridDim.x) {                                                                               \
            int s0, s1;                                                                                                                 \
            seq_of(cu_seqlens, n_seqs, t, &s0, &s1);                                                                                    \
            for (int ch = threadIdx.x; ch < conv_dim; ch += blockDim.x) {                                                               \
                float acc = 0.0f;                                                                                                       \
                for (int j = 0; j < kernel; j++) {                                                                                      \
                    const int out_t = t + kernel - 1 - j;                                                                               \
                    if (out_t < s1) acc += load(conv, (u64)ch * kernel + j) * dpre[(u64)out_t * conv_dim + ch];                        \
                }                                                                                                                       \
                store(dqkv, (u64)t * conv_dim + ch, acc);                                                                               \
            }                                                                                                                           \
        }                                                                                                                               \
    }

FT_DELTA_KERNELS(float, f32)
FT_DELTA_KERNELS(bf16, bf16)

// dact [n, C]: q/k columns from dqk (summed over each k-head's v-heads, then
// through the l2 norm: dx = r·dy − x·r³·(x·dy)), v columns as the scan wrote
// them; then every column times silu'(pre).
extern "C" __global__ void __launch_bounds__(FT_MAX_THREADS)
    delta_norm_bwd_f32(const float* pre, const float* dqk, float* dact, int n, int k_heads, int v_heads, int k_dim, int conv_dim,
                       float q_scale) {
    const int lane = threadIdx.x % FT_WARP, warp = threadIdx.x / FT_WARP, nwarps = blockDim.x / FT_WARP;
    const int ratio = v_heads / k_heads;
    for (int t = blockIdx.x; t < n; t += gridDim.x) {
        for (int head = warp; head < 2 * k_heads; head += nwarps) {
            const int part = head / k_heads, kh = head % k_heads;
            const float sc = part == 0 ? q_scale : 1.0f;
            const float* x = pre + (u64)t * conv_dim + (u64)head * k_dim;
            // x·x and x·dy over the head (lanes stride the head's dims).
            float xx = 0.0f, xdy = 0.0f;
            for (int i = lane; i < k_dim; i += FT_WARP) {
                const float xi = silu_(x[i]);
                float dy = 0.0f;
                for (int vh = kh * ratio; vh < (kh + 1) * ratio; vh++) dy += dqk[(((u64)t * v_heads + vh) * 2 + part) * k_dim + i];
                xx += xi * xi;
                xdy += xi * dy;
            }
            xx = warp_allsum(xx);
            xdy = warp_allsum(xdy);
            const float inv = 1.0f / sqrtf(xx + 1e-6f);
            const float cx = inv * inv * inv * xdy * sc;
            for (int i = lane; i < k_dim; i += FT_WARP) {
                const float xi = silu_(x[i]);
                float dy = 0.0f;
                for (int vh = kh * ratio; vh < (kh + 1) * ratio; vh++) dy += dqk[(((u64)t * v_heads + vh) * 2 + part) * k_dim + i];
                dact[(u64)t * conv_dim + (u64)head * k_dim + i] = inv * (dy * sc) - xi * cx;
            }
        }
        __syncthreads();
        for (int ch = threadIdx.x; ch < conv_dim; ch += blockDim.x) dact[(u64)t * conv_dim + ch] *= silu_slope(pre[(u64)t * conv_dim + ch]);
        __syncthreads();
    }
}
