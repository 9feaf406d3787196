// Flash attention for ferrotune's varlen layout: forward and backward of
// Backend::attention / Backend::attention_backward (src/backend/mod.rs).
// CPU reference: src/backend/cpu/attention.rs. Off-GPU tests of this file's
// index math: see "Verification" at the end of this comment.
//
// This file holds the tensor-core kernels (head_dim 64 / 128) and the
// backward's preprocess; the generic kernels (any other head_dim <= 512) are
// in cuda/flash_attn_generic.cu, and the device code both use in
// cuda/flash_common.cuh. This comment is the launch contract of all of them.
//
// Semantics (identical for every kernel; they can be mixed freely, e.g.
// tensor-core forward with generic backward):
//   Tokens of all sequences are one stream of n tokens; sequence s is tokens
//   cu_seqlens[s] .. cu_seqlens[s+1]-1. Query head h uses kv head
//   h / (n_heads / n_kv_heads) (GQA / MQA, K and V are never copied). Query i
//   sees key j iff start(i) <= j <= i and (window == 0 or i - j < window).
//   score = scale * (q_i . k_j) in f32; the *_capped kernels then soft-cap
//   it to tanh(score / c) * c (f32; score / c taken as score * (1/c));
//   out_i = softmax(scores) . V;
//   lse[h*n + i] = natural-log log-sum-exp of the scores (f32).
//   Backward: dsum[h*n + i] = sum_d dout . out (f32); P recomputed from lse;
//   dS = P * (dout . v - dsum), times 1 - tanh^2(score / c) when capped;
//   dq = scale * dS . K; dk = scale * dS^T . Q;
//   dv = P^T . dout; dk, dv summed over the query heads of each kv head.
//   Storage bf16, math f32 (tensor cores: bf16 x bf16 -> f32; P and dS are
//   rounded to bf16 before their products, as in FlashAttention-2).
//   Deterministic: no atomics anywhere; every output element is written by
//   exactly one thread with a fixed summation order, so results are
//   bit-identical run to run (and independent of the grid-x padding).
//
// =============================== LAUNCH CONTRACT ===============================
// Types: bf16 = __nv_bfloat16 (u16 bits), pointers are device pointers
// (CUdeviceptr / u64), int = i32, float = f32. All arguments by value.
//
// Tensors (dense, row-major, every output fully overwritten for t < n):
//   q, out, dout, dq : bf16 [n, n_heads, head_dim]
//   k, v, dk, dv     : bf16 [n, n_kv_heads, head_dim]
//   lse, dsum        : f32  [n_heads, n]           (element h*n + t)
//   cu_seqlens       : i32  [n_seqs + 1], device memory; cu[0] = 0,
//                      non-decreasing, cu[n_seqs] = n (empty sequences allowed)
// Scalars: n (total tokens), n_seqs, n_heads, n_kv_heads, head_dim, window
// (0 = none, else W >= 1; pass min(W, i32::MAX)), scale (> 0 in practice;
// multiplies q.k).
//
// Common preconditions (violations of the checked ones __trap()):
//   1 <= n < 2^30; n_seqs >= 1; n_kv_heads >= 1 and n_heads % n_kv_heads == 0
//   (checked); blockDim = (128, 1, 1) for every kernel except preprocess
//   (checked); every pointer 16-byte aligned (cuMemAlloc gives 256); no
//   aliasing between inputs and outputs. Never launch with n == 0 (a zero
//   grid dimension is an invalid launch): the op is then a no-op.
//   Backward order: flash_attn_bwd_preprocess first (writes dsum from dout and
//   the forward's out), then the dq and dkdv kernels (independent of each
//   other; same stream in any order, or two streams after preprocess).
//
// Kernel choice: head_dim 64 or 128 -> tensor-core kernels *_d64 / *_d128;
// any other 1 <= head_dim <= 256 -> *_generic, 257 <= head_dim <= 512 ->
// *_generic_d512 (both cuda/flash_attn_generic.cu;
// slow: no tensor cores, one warp per row; for tiny test models and unusual
// heads). head_dim > 512 is unsupported. The preprocess kernel serves all.
//
// Tensor-core kernels. Let max_len = max over s of (cu[s+1] - cu[s]),
// computed on the host, and NB = max(1, ceil(max_len / 64)). grid.x may be
// any value >= NB (blocks past a sequence's end exit at once). blockIdx.z is
// the sequence, blockIdx.y the (kv) head; blockIdx.x = b selects the 64-row
// tile gridDim.x - 1 - b (fwd, dq: query tiles, last = heaviest first) or
// tile b (dkdv: key tiles, first = heaviest first). Limits: grid.y = heads
// <= 65535, grid.z = n_seqs <= 65535.
// SMEM = dynamic shared memory bytes (third launch parameter). When SMEM >
// 49152 the launcher must first call, once per function,
//   cuFuncSetAttribute(f, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, SMEM)
// (cudarc: CudaFunction::set_attribute). Every size below fits sm_80..sm_90
// (and the 99 KiB per-block limit of sm_86 / sm_89).
//
//   flash_attn_fwd_d64 / flash_attn_fwd_d128(
//       const bf16* q, const bf16* k, const bf16* v, const int* cu_seqlens,
//       bf16* out, float* lse, int n, int n_seqs, int n_heads,
//       int n_kv_heads, int head_dim, int window, float scale)
//     grid (NB, n_heads, n_seqs), block (128,1,1)
//     SMEM = 2*64*(D+8)*2: d64 18432, d128 34816
//     head_dim must equal 64 / 128 (checked).
//
//   flash_attn_bwd_dq_d64 / flash_attn_bwd_dq_d128(
//       const bf16* q, const bf16* k, const bf16* v, const bf16* dout,
//       const float* lse, const float* dsum, const int* cu_seqlens,
//       bf16* dq, int n, int n_seqs, int n_heads, int n_kv_heads,
//       int head_dim, int window, float scale)
//     grid (NB, n_heads, n_seqs), block (128,1,1)
//     SMEM = 4*64*(D+8)*2: d64 36864, d128 69632 (needs the attribute)
//
//   flash_attn_bwd_dkdv_d64 / flash_attn_bwd_dkdv_d128(
//       const bf16* q, const bf16* k, const bf16* v, const bf16* dout,
//       const float* lse, const float* dsum, const int* cu_seqlens,
//       bf16* dk, bf16* dv, int n, int n_seqs, int n_heads, int n_kv_heads,
//       int head_dim, int window, float scale)
//     grid (NB, n_kv_heads, n_seqs), block (128,1,1)   <- kv heads, not heads
//     SMEM = (2*64 + 2*BQ)*(D+8)*2 + 8*BQ with BQ = 64 (d64) / 32 (d128):
//            d64 37376, d128 52480 (needs the attribute)
//
// Preprocess (any head_dim >= 1):
//   flash_attn_bwd_preprocess(const bf16* dout, const bf16* out, float* dsum,
//       int n, int n_heads, int head_dim)
//     one warp per (token, head) row, grid-stride: block (B,1,1) with B a
//     multiple of 32, <= 1024 (use 256); grid (G,1,1) with any G >= 1 (use
//     min(ceil(n*n_heads / (B/32)), 1<<20)); SMEM 0.
//
// Soft-capped twins: flash_attn_fwd_capped_d64, flash_attn_bwd_dq_capped_d128,
// flash_attn_bwd_dkdv_capped_generic, flash_attn_fwd_capped_generic_d512,
// ... (every fwd / bwd_dq / bwd_dkdv
// kernel, tensor-core or generic, `capped_` before its head_dim suffix): the
// same arguments, grid, block and SMEM plus a last argument `float softcap`,
// the cap c > 0. The preprocess serves both.
//
// Generic kernels (cuda/flash_attn_generic.cu; 1 <= head_dim <= 256,
// checked), one warp per row, 4 rows per block; SMEM 0:
//   flash_attn_fwd_generic(<same arguments as flash_attn_fwd_d64>)
//     grid (ceil(n/4), n_heads, 1), block (128,1,1)
//   flash_attn_bwd_dq_generic(<same arguments as flash_attn_bwd_dq_d64>)
//     grid (ceil(n/4), n_heads, 1), block (128,1,1)
//   flash_attn_bwd_dkdv_generic(<same arguments as flash_attn_bwd_dkdv_d64>)
//     grid (ceil(n/4), n_kv_heads, 1), block (128,1,1)   <- kv heads
// and their wide twins flash_attn_fwd_generic_d512, flash_attn_bwd_dq_generic_d512,
// flash_attn_bwd_dkdv_generic_d512 (and capped_generic_d512): the same
// arguments, grid and block, for 1 <= head_dim <= 512 (checked; meant for
// 257..512: at 256 and below the narrow ones hold half the registers).
// ===============================================================================
//
// Design (tensor-core kernels; FlashAttention-2 structure):
// - 4 warps per block, each owns 16 rows of the block's 64-row tile; products
//   are mma.sync m16n8k16 bf16 -> f32 with ldmatrix fragment loads from
//   shared memory rows padded to D+8 elements (conflict-free ldmatrix);
//   global -> shared copies are 16-byte cp.async (zero-filled past the end).
// - Forward: Q fragments live in registers; K and V tiles (64 keys) are
//   single-buffered but overlapped (V(j) loads during S = Q.K^T, K(j-1)
//   during O += P.V). Key tiles run from the diagonal down to the first tile
//   the window reaches; online softmax in the log2 domain (scores times
//   scale*log2(e), exp2f), running max m and sum l per row, O rescaled by
//   exp2(m_old - m_new). Masked scores are -inf; a row that has seen no
//   visible key keeps m = -inf and subtracts 0 instead (never -inf - -inf).
//   lse = m*ln2 + ln(l) (natural log, as the CPU reference).
// - dQ: per 64-query tile, loops over the visible key tiles; S and dP
//   recomputed with tensor cores, P = exp2(S*scale*log2e - lse*log2e),
//   dS = P*(dP - dsum), dQ += dS.K in registers.
// - dK/dV: per 64-key tile and kv head, loops over the group's query heads
//   and the query tiles that see the key tile; every warp computes the
//   transposed products S^T = K.Q^T and dP^T = V.dO^T for its 16 keys, so
//   P^T and dS^T are directly the A operands of dV += P^T.dO, dK += dS^T.Q;
//   accumulators stay in registers; no cross-warp reduction, no atomics.
//
// Verification without a GPU: cuda/emu/ runs these files unmodified on the
// host (every thread a fiber; mma / ldmatrix from the PTX ISA fragment
// tables; lazy cp.async; poisoned shared memory; guard pages), and
// tests/cuda_emu.rs checks them against the CPU reference (varlen batches with
// length-1, exactly-one-tile and multi-tile sequences, GQA/MQA/MHA, windows,
// tensor-core and generic paths) and bit for bit across thread schedules,
// including one warp running ahead of the others.
#include <cuda_bf16.h>

#include "flash_common.cuh"

namespace fa {

constexpr int TILE = 64;  // Br (query rows per block) = Bc (keys per tile) = 64
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.69314718055994531f;

// ============================================================================
// Forward (tensor cores).
// ============================================================================
template <int D, bool CAP>
__device__ __forceinline__ void fwd_tc(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                       const bf16* __restrict__ v, const int* __restrict__ cu,
                                       bf16* __restrict__ out, float* __restrict__ lse, int n, int n_seqs, int nh,
                                       int nkv, int head_dim, int window, float scale, float cap) {
    static_assert(D % 16 == 0, "head_dim must be a multiple of 16");
    constexpr int BR = TILE, BC = TILE, LD = D + 8, NT = D / 8, KS = D / 16;
    check_contract(head_dim, D, nh, nkv);
    const float inv_cap = CAP ? 1.f / cap : 0.f;
    const int seq = blockIdx.z, h = blockIdx.y;
    if (seq >= n_seqs || h >= nh) return;
    const int s0 = cu[seq], len = cu[seq + 1] - s0;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * BR;  // heaviest (last) query blocks first
    if (q0 >= len) return;
    const int W = clamp_window(window, len);
    const int kvh = h / (nh / nkv);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;

    bf16* sK = reinterpret_cast<bf16*>(dyn_smem());
    bf16* sV = sK + BC * LD;  // also stages Q before the loop and O after it (BR == BC)
    const sptr aK = smem_addr(sK), aV = smem_addr(sV);
    const unsigned off16 = lane_off_rows16<LD>(lane), offnk = lane_off_bnk<LD>(lane);

    const int q_hi = min(q0 + BR, len) - 1;  // last real query of the block
    const int kb_first = (W ? max(0, q0 - W + 1) : 0) / BC;
    const int kb_last = q_hi / BC;

    load_tile_async<D, BR>(aV, q, s0 + q0, nh, h, len - q0);
    load_tile_async<D, BC>(aK, k, s0 + kb_last * BC, nkv, kvh, len - kb_last * BC);
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();

    unsigned qf[KS][4];  // this warp's 16 query rows as A fragments
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) ldsm_x4(qf[ks], aV + off16 + (unsigned)((warp * 16 * LD + ks * 16) * 2));
    __syncthreads();  // every warp holds Q before sV is overwritten by V

    float o[NT][4];
    zero_frags(o);
    float m[2] = {neg_inf(), neg_inf()};  // running max of the log2-domain scores (rows g, g+8)
    float l[2] = {0.f, 0.f};              // this lane's part of the running sum
    const float sl2 = scale * LOG2E;
    const int qr0 = q0 + warp * 16 + g;  // the lane's rows: qr0 and qr0 + 8

    // Invariant at the top of each iteration: sK holds K(kb), complete and
    // visible to all threads; sV is free.
    for (int kb = kb_last; kb >= kb_first; --kb) {
        const int k0 = kb * BC;
        load_tile_async<D, BC>(aV, v, s0 + k0, nkv, kvh, len - k0);
        cp_async_commit();

        float s[BC / 8][4];
        zero_frags(s);
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) mma_slice_abt<LD, BC>(s, qf[ks], aK, offnk, ks);

        // Scores to the log2 domain, mask, online softmax (FA2).
        const bool need_mask = tile_needs_mask(q0, BR, k0, BC, len, W);
        float mx[2] = {neg_inf(), neg_inf()};
#pragma unroll
        for (int nt = 0; nt < BC / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float x;
                if constexpr (CAP) {
                    float th;
                    x = soft_cap(s[nt][e] * scale, cap, inv_cap, th) * LOG2E;
                } else {
                    x = s[nt][e] * sl2;
                }
                if (need_mask && !visible(qr0 + (e >> 1) * 8, k0 + nt * 8 + 2 * t4 + (e & 1), len, W)) x = neg_inf();
                s[nt][e] = x;
                mx[e >> 1] = fmaxf(mx[e >> 1], x);
            }
        }
        float m_use[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const float m_new = fmaxf(m[r], quad_max(mx[r]));
            // A row with no visible key so far keeps m = -inf; subtracting 0
            // instead of -inf keeps exp2 at exp2(-inf) = 0 (never inf - inf).
            m_use[r] = (m_new == neg_inf()) ? 0.f : m_new;
            const float alpha = exp2f(m[r] - m_use[r]);  // 0 when m[r] = -inf
            m[r] = m_new;
            l[r] *= alpha;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                o[nt][2 * r] *= alpha;
                o[nt][2 * r + 1] *= alpha;
            }
        }
#pragma unroll
        for (int nt = 0; nt < BC / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float p = exp2f(s[nt][e] - m_use[e >> 1]);
                s[nt][e] = p;
                l[e >> 1] += p;
            }
        }

        cp_async_wait_all();
        __syncthreads();  // V(kb) visible; every warp is done reading K(kb)
        if (kb > kb_first) {
            load_tile_async<D, BC>(aK, k, s0 + (kb - 1) * BC, nkv, kvh, len - (kb - 1) * BC);
            cp_async_commit();
        }

        // O += P·V: P (bf16) straight from the score fragments.
#pragma unroll
        for (int kk = 0; kk < BC / 16; ++kk) {
            unsigned a[4];
            frags_to_a(a, s[2 * kk], s[2 * kk + 1]);
            mma_slice_ab_trans<LD, D>(o, a, aV, off16, kk);
        }
        cp_async_wait_all();
        __syncthreads();  // K(kb-1) visible; every warp is done reading V(kb)
    }

    // Epilogue: normalise, write lse (natural log) and O.
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const float lt = quad_sum(l[r]);
        inv[r] = lt > 0.f ? 1.f / lt : 0.f;  // lt = 0 only for rows past the end
        const int qr = qr0 + r * 8;
        if (t4 == 0 && qr < len) lse[(i64)h * n + s0 + qr] = m[r] * LN2 + logf(lt);
    }
    store_warp_tile<D>(o, inv, sV + warp * 16 * LD, out, (i64)s0 + q0 + warp * 16, nh, h, len - (q0 + warp * 16),
                       lane);
}

// ============================================================================
// Backward (tensor cores): dQ, one block per (query tile, head, sequence).
// ============================================================================
template <int D, bool CAP>
__device__ __forceinline__ void bwd_dq_tc(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                          const bf16* __restrict__ v, const bf16* __restrict__ dout,
                                          const float* __restrict__ lse, const float* __restrict__ dsum,
                                          const int* __restrict__ cu, bf16* __restrict__ dq, int n, int n_seqs,
                                          int nh, int nkv, int head_dim, int window, float scale, float cap) {
    static_assert(D % 16 == 0, "head_dim must be a multiple of 16");
    constexpr int BR = TILE, BC = TILE, LD = D + 8, NT = D / 8, KS = D / 16;
    check_contract(head_dim, D, nh, nkv);
    const float inv_cap = CAP ? 1.f / cap : 0.f;
    const int seq = blockIdx.z, h = blockIdx.y;
    if (seq >= n_seqs || h >= nh) return;
    const int s0 = cu[seq], len = cu[seq + 1] - s0;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * BR;
    if (q0 >= len) return;
    const int W = clamp_window(window, len);
    const int kvh = h / (nh / nkv);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;

    bf16* sQ = reinterpret_cast<bf16*>(dyn_smem());
    bf16* sdO = sQ + BR * LD;
    bf16* sK = sdO + BR * LD;
    bf16* sV = sK + BC * LD;
    const sptr aQ = smem_addr(sQ), adO = smem_addr(sdO), aK = smem_addr(sK), aV = smem_addr(sV);
    const unsigned off16 = lane_off_rows16<LD>(lane), offnk = lane_off_bnk<LD>(lane);
    const unsigned offw = (unsigned)(warp * 16 * LD * 2);  // this warp's first row

    const int q_hi = min(q0 + BR, len) - 1;
    const int kb_first = (W ? max(0, q0 - W + 1) : 0) / BC;
    const int kb_last = q_hi / BC;

    load_tile_async<D, BR>(aQ, q, s0 + q0, nh, h, len - q0);
    load_tile_async<D, BR>(adO, dout, s0 + q0, nh, h, len - q0);
    cp_async_commit();

    const float sl2 = scale * LOG2E;
    const int qr0 = q0 + warp * 16 + g;
    float lse2[2], dd[2];  // lse in the log2 domain, D = rowsum(dO ∘ O)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int qr = qr0 + r * 8;
        const bool ok = qr < len;
        lse2[r] = ok ? lse[(i64)h * n + s0 + qr] * LOG2E : 0.f;
        dd[r] = ok ? dsum[(i64)h * n + s0 + qr] : 0.f;
    }

    float acc[NT][4];
    zero_frags(acc);

    for (int kb = kb_last; kb >= kb_first; --kb) {
        const int k0 = kb * BC;
        load_tile_async<D, BC>(aK, k, s0 + k0, nkv, kvh, len - k0);
        load_tile_async<D, BC>(aV, v, s0 + k0, nkv, kvh, len - k0);
        cp_async_commit();
        cp_async_wait_all();
        __syncthreads();

        // S = Q·Kᵀ and dP = dO·Vᵀ (16 x BC per warp).
        float s[BC / 8][4], dp[BC / 8][4];
        mma_rows_abt<LD, KS, BC>(s, aQ + offw, aK, off16, offnk);
        mma_rows_abt<LD, KS, BC>(dp, adO + offw, aV, off16, offnk);

        // P = exp2(S·scale·log2e − lse·log2e); dS = P ∘ (dP − D), kept in s
        // (with a cap: S capped first, dS times the slope 1 − tanh²).
        const bool need_mask = tile_needs_mask(q0, BR, k0, BC, len, W);
#pragma unroll
        for (int nt = 0; nt < BC / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float x, th = 0.f;
                if constexpr (CAP) {
                    x = soft_cap(s[nt][e] * scale, cap, inv_cap, th) * LOG2E - lse2[e >> 1];
                } else {
                    x = s[nt][e] * sl2 - lse2[e >> 1];
                }
                if (need_mask && !visible(qr0 + (e >> 1) * 8, k0 + nt * 8 + 2 * t4 + (e & 1), len, W)) x = neg_inf();
                const float p = exp2f(x);
                s[nt][e] = p * (dp[nt][e] - dd[e >> 1]);
                if constexpr (CAP) s[nt][e] *= 1.f - th * th;
            }
        }

        // dQ += dS·K   (B[key][d] = K[key][d]: transposed ldmatrix of sK).
#pragma unroll
        for (int kk = 0; kk < BC / 16; ++kk) {
            unsigned a[4];
            frags_to_a(a, s[2 * kk], s[2 * kk + 1]);
            mma_slice_ab_trans<LD, D>(acc, a, aK, off16, kk);
        }
        __syncthreads();  // every warp is done with sK / sV before the next tile
    }

    const float mul[2] = {scale, scale};
    store_warp_tile<D>(acc, mul, sQ + warp * 16 * LD, dq, (i64)s0 + q0 + warp * 16, nh, h, len - (q0 + warp * 16),
                       lane);
}

// ============================================================================
// Backward (tensor cores): dK and dV, one block per (key tile, kv head,
// sequence). Every warp owns 16 keys and computes the transposed products
// Sᵀ = K·Qᵀ, dPᵀ = V·dOᵀ (16 keys x BQ queries), so that Pᵀ / dSᵀ are already
// A fragments for dV += Pᵀ·dO and dK += dSᵀ·Q. Loops over every query head of
// the kv head's group and every query tile that sees the key tile.
// ============================================================================
template <int D, int BQ, bool CAP>
__device__ __forceinline__ void bwd_dkdv_tc(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                            const bf16* __restrict__ v, const bf16* __restrict__ dout,
                                            const float* __restrict__ lse, const float* __restrict__ dsum,
                                            const int* __restrict__ cu, bf16* __restrict__ dk,
                                            bf16* __restrict__ dv, int n, int n_seqs, int nh, int nkv,
                                            int head_dim, int window, float scale, float cap) {
    static_assert(D % 16 == 0 && BQ % 16 == 0 && BQ <= NTHREADS, "tile shape");
    constexpr int BC = TILE, LD = D + 8, NT = D / 8, KS = D / 16, NQ = BQ / 8;
    check_contract(head_dim, D, nh, nkv);
    const float inv_cap = CAP ? 1.f / cap : 0.f;
    const int seq = blockIdx.z, kvh = blockIdx.y;
    if (seq >= n_seqs || kvh >= nkv) return;
    const int s0 = cu[seq], len = cu[seq + 1] - s0;
    const int k0 = blockIdx.x * BC;  // first key tiles are the heaviest (seen by most queries): start them first
    if (k0 >= len) return;
    const int W = clamp_window(window, len);
    const int group = nh / nkv;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;

    bf16* sK = reinterpret_cast<bf16*>(dyn_smem());
    bf16* sV = sK + BC * LD;
    bf16* sQ = sV + BC * LD;
    bf16* sdO = sQ + BQ * LD;
    float* sL = reinterpret_cast<float*>(sdO + BQ * LD);  // lse·log2e of the tile's queries
    float* sD = sL + BQ;                                  // D of the tile's queries
    const sptr aK = smem_addr(sK), aV = smem_addr(sV), aQ = smem_addr(sQ), adO = smem_addr(sdO);
    const unsigned off16 = lane_off_rows16<LD>(lane), offnk = lane_off_bnk<LD>(lane);
    const unsigned offw = (unsigned)(warp * 16 * LD * 2);

    load_tile_async<D, BC>(aK, k, s0 + k0, nkv, kvh, len - k0);
    load_tile_async<D, BC>(aV, v, s0 + k0, nkv, kvh, len - k0);
    cp_async_commit();

    // Queries that see some key of the tile: k0 ..= q_max.
    const int k_hi = min(k0 + BC, len) - 1;
    const int q_max = W ? min(len - 1, k_hi + W - 1) : len - 1;
    const int qt_first = k0 / BQ, n_qt = q_max / BQ - qt_first + 1;

    const float sl2 = scale * LOG2E;
    const int kr0 = k0 + warp * 16 + g;  // the lane's keys: kr0 and kr0 + 8
    float ak[NT][4], av[NT][4];
    zero_frags(ak);
    zero_frags(av);

    for (int it = 0; it < group * n_qt; ++it) {
        const int hq = kvh * group + it / n_qt;
        const int q0 = (qt_first + it % n_qt) * BQ;
        load_tile_async<D, BQ>(aQ, q, s0 + q0, nh, hq, len - q0);
        load_tile_async<D, BQ>(adO, dout, s0 + q0, nh, hq, len - q0);
        cp_async_commit();
        if (threadIdx.x < BQ) {
            const int qr = q0 + threadIdx.x;
            const bool ok = qr < len;
            sL[threadIdx.x] = ok ? lse[(i64)hq * n + s0 + qr] * LOG2E : 0.f;
            sD[threadIdx.x] = ok ? dsum[(i64)hq * n + s0 + qr] : 0.f;
        }
        cp_async_wait_all();
        __syncthreads();

        // Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ (16 keys x BQ queries per warp).
        float st[NQ][4], dpt[NQ][4];
        mma_rows_abt<LD, KS, BQ>(st, aK + offw, aQ, off16, offnk);
        mma_rows_abt<LD, KS, BQ>(dpt, aV + offw, adO, off16, offnk);

        // Pᵀ (in st) and dSᵀ = Pᵀ ∘ (dPᵀ − D) (in dpt). Element (key row, query col):
        // row kr0 + (e >> 1) * 8, column q0 + nt * 8 + 2 * t4 + (e & 1).
        const bool need_mask = tile_needs_mask(q0, BQ, k0, BC, len, W);
#pragma unroll
        for (int nt = 0; nt < NQ; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int qc = nt * 8 + 2 * t4 + (e & 1);
                float x, th = 0.f;
                if constexpr (CAP) {
                    x = soft_cap(st[nt][e] * scale, cap, inv_cap, th) * LOG2E - sL[qc];
                } else {
                    x = st[nt][e] * sl2 - sL[qc];
                }
                if (need_mask && !visible(q0 + qc, kr0 + (e >> 1) * 8, len, W)) x = neg_inf();
                const float p = exp2f(x);
                st[nt][e] = p;
                dpt[nt][e] = p * (dpt[nt][e] - sD[qc]);
                if constexpr (CAP) dpt[nt][e] *= 1.f - th * th;
            }
        }

        // dV += Pᵀ·dO and dK += dSᵀ·Q   (B[query][d]: transposed ldmatrix).
#pragma unroll
        for (int kk = 0; kk < BQ / 16; ++kk) {
            unsigned ap[4], ad[4];
            frags_to_a(ap, st[2 * kk], st[2 * kk + 1]);
            frags_to_a(ad, dpt[2 * kk], dpt[2 * kk + 1]);
            mma_slice_ab_trans<LD, D>(av, ap, adO, off16, kk);
            mma_slice_ab_trans<LD, D>(ak, ad, aQ, off16, kk);
        }
        __syncthreads();  // every warp is done with sQ / sdO / sL / sD
    }

    const float mk[2] = {scale, scale}, mv[2] = {1.f, 1.f};
    const i64 tok = (i64)s0 + k0 + warp * 16;
    const int valid = len - (k0 + warp * 16);
    store_warp_tile<D>(ak, mk, sK + warp * 16 * LD, dk, tok, nkv, kvh, valid, lane);
    store_warp_tile<D>(av, mv, sV + warp * 16 * LD, dv, tok, nkv, kvh, valid, lane);
}

// ============================================================================
// Backward preprocessing: dsum[h, t] = Σ_d dout[t, h, d] · out[t, h, d].
// ============================================================================
__device__ __forceinline__ void bwd_preprocess(const bf16* __restrict__ dout, const bf16* __restrict__ out,
                                               float* __restrict__ dsum, int n, int nh, int d) {
    const int lane = threadIdx.x & 31;
    const i64 rows = (i64)n * nh;
    const i64 nwarps = (i64)gridDim.x * (blockDim.x >> 5);
    for (i64 row = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); row < rows; row += nwarps) {
        const bf16* a = dout + row * d;
        const bf16* b = out + row * d;
        float acc = 0.f;
        if ((d & 1) == 0) {
            for (int i = 2 * lane; i < d; i += 64) {
                const __nv_bfloat162 x = *reinterpret_cast<const __nv_bfloat162*>(a + i);
                const __nv_bfloat162 y = *reinterpret_cast<const __nv_bfloat162*>(b + i);
                acc += bf2f(x.x) * bf2f(y.x);
                acc += bf2f(x.y) * bf2f(y.y);
            }
        } else {
            for (int i = lane; i < d; i += 32) acc += bf2f(a[i]) * bf2f(b[i]);
        }
        acc = warp_allsum(acc);
        if (lane == 0) dsum[(row % nh) * n + row / nh] = acc;
    }
}

}  // namespace fa

// ============================================================================
// Entry points.
// ============================================================================
// Every kernel twice: plain, and *_capped with one more argument, the
// soft-cap c > 0 (separate entries, so the plain ones keep their registers
// and speed).
#define FA_TC_ENTRIES(D, BQ)                                                                                    \
    extern "C" __global__ void __launch_bounds__(fa::NTHREADS) flash_attn_fwd_d##D(FA_FWD_ARGS) {              \
        fa::fwd_tc<D, false>(FA_FWD_PASS, 0.f);                                                                 \
    }                                                                                                           \
    extern "C" __global__ void __launch_bounds__(fa::NTHREADS) flash_attn_bwd_dq_d##D(FA_DQ_ARGS) {            \
        fa::bwd_dq_tc<D, false>(FA_DQ_PASS, 0.f);                                                               \
    }                                                                                                           \
    extern "C" __global__ void __launch_bounds__(fa::NTHREADS) flash_attn_bwd_dkdv_d##D(FA_DKDV_ARGS) {        \
        fa::bwd_dkdv_tc<D, BQ, false>(FA_DKDV_PASS, 0.f);                                                       \
    }                                                                                                           \
    extern "C" __global__ void __launch_bounds__(fa::NTHREADS)                                                  \
        flash_attn_fwd_capped_d##D(FA_FWD_ARGS, float softcap) {                                                \
        fa::fwd_tc<D, true>(FA_FWD_PASS, softcap);                                                              \
    }                                                                                                           \
    extern "C" __global__ void __launch_bounds__(fa::NTHREADS)                                                  \
        flash_attn_bwd_dq_capped_d##D(FA_DQ_ARGS, float softcap) {                                              \
        fa::bwd_dq_tc<D, true>(FA_DQ_PASS, softcap);                                                            \
    }                                                                                                           \
    extern "C" __global__ void __launch_bounds__(fa::NTHREADS)                                                  \
        flash_attn_bwd_dkdv_capped_d##D(FA_DKDV_ARGS, float softcap) {                                          \
        fa::bwd_dkdv_tc<D, BQ, true>(FA_DKDV_PASS, softcap);                                                    \
    }

FA_TC_ENTRIES(64, 64)
FA_TC_ENTRIES(128, 32)

extern "C" __global__ void __launch_bounds__(1024)
    flash_attn_bwd_preprocess(const __nv_bfloat16* dout, const __nv_bfloat16* out, float* dsum, int n, int n_heads,
                              int head_dim) {
    fa::bwd_preprocess(dout, out, dsum, n, n_heads, head_dim);
}
