// The next token of each row of logits[rows, vocab] (Backend::sample_rows).
// CPU reference: src/backend/cpu/sample.rs (`choose`), whose arithmetic this
// follows step for step; only the order of the f64 sums differs.
//
// One block per row (grid-stride over rows); any vocab up to i32. The row
// is never written: every filter is kept as a threshold and re-applied as
// the logits are read again, x = logit / temperature (f32, as the CPU).
// - temperature == 0: greedy, the argmax of the raw logits (the first of
//   equal maxima, -0 equal to +0; NaN never wins unless every logit is NaN,
//   then the last index, as the CPU's loop).
// - top_k in [1, vocab): keep x unless x < kth, the k-th largest x in the
//   order of f32::total_cmp, found by a search over order-preserving u32
//   keys of the floats: each pass over the row counts the keys above 7
//   candidates at once (block sums), narrowing the range 8-fold (11 passes).
// - top_p in (0, 1]: transformers' TopPLogitsWarper. With p_i the softmax
//   (f64) of the top-k survivors and thr = 1 - top_p, the dropped tokens are
//   the prefix of the order ascending by (key, index) whose cumulative mass
//   is <= thr; the last of that order (the largest key, the highest index
//   among equal ones) is always kept. The same search (masses for counts)
//   finds the cut key K, the smallest with mass(key <= K) > thr; every key
//   below K is dropped, every key above kept, and the tokens equal to K are
//   dropped while mass(key < K) plus their mass in index order (a block
//   scan) is still <= thr.
// - min_p in (0, 1]: drop p_i < min_p * max p over the survivors (f64).
// - The draw: with p_i the softmax of the final survivors, the first index
//   whose cumulative probability (index order, a block scan) exceeds u =
//   uniforms[row]; when rounding leaves the total <= u, the last index with
//   p_i > 0.
// top_k 0, top_p 0 and min_p 0 are "off" (min_p 0 drops nothing anyway).
// Sums are f64 fixed trees (common.cuh's block_sum, the scan below): the
// token is bit-identical run to run for a given blockDim, and equals the
// CPU's except where u or thr lies within rounding of a cumulative mass, or
// min_p · max p within rounding of a p_i.
// Launch: grid = rows, block = 1024 (any multiple of 32 up to 1024).
#include "common.cuh"

using namespace ft;

#define FT_INT_MAX 0x7fffffff

// The total order of f32::total_cmp as unsigned order: negative floats
// (sign set) reversed, positive ones above them.
__device__ __forceinline__ unsigned order_key(float x) {
    const unsigned u = (unsigned)__float_as_int(x);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float key_value(unsigned k) {
    const unsigned u = (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k;
    return __int_as_float((int)u);
}

// Max / min over the block of an integer, returned to every thread (the
// operation is idempotent, so the padding lanes repeat partial[0]). Every
// thread must call it.
template <bool MAX, typename T> __device__ __forceinline__ T block_extreme(T v) {
    __shared__ T partial[FT_WARP + 1];
    const int lane = threadIdx.x % FT_WARP;
    const int warp = threadIdx.x / FT_WARP;
    const int nwarps = blockDim.x / FT_WARP;
#pragma unroll
    for (int off = FT_WARP / 2; off > 0; off >>= 1) {
        const T o = __shfl_xor_sync(FT_FULL_MASK, v, off);
        v = MAX ? (o > v ? o : v) : (o < v ? o : v);
    }
    __syncthreads();  // the previous call's broadcast has been read
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = partial[lane < nwarps ? lane : 0];
#pragma unroll
        for (int off = FT_WARP / 2; off > 0; off >>= 1) {
            const T o = __shfl_xor_sync(FT_FULL_MASK, v, off);
            v = MAX ? (o > v ? o : v) : (o < v ? o : v);
        }
        if (lane == 0) partial[FT_WARP] = v;
    }
    __syncthreads();
    return partial[FT_WARP];
}

// Exclusive prefix sum over the threads of the block in thread order, in a
// fixed order: each warp's total sequentially, the warps' offsets
// sequentially, then offset + the lower lanes' values sequentially.
__device__ __forceinline__ double block_exclusive_scan(double v) {
    __shared__ double vals[FT_MAX_THREADS];
    __shared__ double warp_off[FT_WARP];
    const int lane = threadIdx.x % FT_WARP;
    const int warp = threadIdx.x / FT_WARP;
    const int nwarps = blockDim.x / FT_WARP;
    __syncthreads();  // the previous call's values have been read
    vals[threadIdx.x] = v;
    __syncthreads();
    if (warp == 0) {
        double s = 0.0;
        if (lane < nwarps)
            for (int j = 0; j < FT_WARP; ++j) s += vals[lane * FT_WARP + j];
        warp_off[lane] = s;
        __syncwarp();
        if (lane == 0) {
            double run = 0.0;
            for (int w = 0; w < nwarps; ++w) {
                const double t = warp_off[w];
                warp_off[w] = run;
                run += t;
            }
        }
    }
    __syncthreads();
    double acc = warp_off[warp];
    for (int j = 0; j < lane; ++j) acc += vals[warp * FT_WARP + j];
    return acc;
}

// Sums of N values over the block, each returned to every thread (fixed
// order: warp trees, then the warps in order). Every thread must call it.
template <typename T, int N> __device__ __forceinline__ void block_sum_n(T (&v)[N]) {
    __shared__ T partial[FT_WARP][N];
    __shared__ T total[N];
    const int lane = threadIdx.x % FT_WARP;
    const int warp = threadIdx.x / FT_WARP;
    const int nwarps = blockDim.x / FT_WARP;
#pragma unroll
    for (int j = 0; j < N; ++j) v[j] = warp_sum(v[j]);
    __syncthreads();  // the previous call's totals have been read
    if (lane == 0)
#pragma unroll
        for (int j = 0; j < N; ++j) partial[warp][j] = v[j];
    __syncthreads();
    if ((int)threadIdx.x < N) {
        T s = T(0);
        for (int w = 0; w < nwarps; ++w) s += partial[w][threadIdx.x];
        total[threadIdx.x] = s;
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < N; ++j) v[j] = total[j];
}

// Candidates per pass of the key searches: 7 keys split the range in 8, so
// a 32-bit range takes 11 passes over the row instead of bisection's 32.
#define FT_SEARCH_WAYS 8

// The smallest key K in [a, b] with pred(total(K)), where pred(total(b))
// holds and pred is monotone in K; total(c) is the block's sum of w over
// the elements whose key is <= c (LE) or > c (!LE). elem(i, key, w) gives
// element i's key and weight, false to skip it.
template <bool LE, typename W, typename Elem, typename Pred>
__device__ unsigned smallest_key(unsigned a, unsigned b, int vocab, Elem elem, Pred pred) {
    constexpr int N = FT_SEARCH_WAYS - 1;
    while (a < b) {
        unsigned c[N];
        W acc[N];
        const u64 span = (u64)b - a;
#pragma unroll
        for (int j = 0; j < N; ++j) {
            c[j] = a + (unsigned)(span * (j + 1) / FT_SEARCH_WAYS);  // in [a, b), non-decreasing
            acc[j] = W(0);
        }
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
            unsigned key;
            W w;
            if (!elem(i, key, w)) continue;
#pragma unroll
            for (int j = 0; j < N; ++j)
                if (LE ? key <= c[j] : key > c[j]) acc[j] += w;
        }
        block_sum_n(acc);
        // The first candidate where pred holds bounds K above; the one
        // before it (where pred fails) bounds it below. (Constant indices
        // only: the candidates stay in registers.)
        bool found = false;
        unsigned na = c[N - 1] + 1, nb = b;
#pragma unroll
        for (int j = 0; j < N; ++j) {
            if (!found && pred(acc[j])) {
                found = true;
                na = j > 0 ? c[j > 0 ? j - 1 : 0] + 1 : a;
                nb = c[j];
            }
        }
        a = na;
        b = nb;
    }
    return a;
}

// The filters of one row, as thresholds (see the header).
struct Filters {
    float kth;     // top-k: x < kth is dropped (-inf: off)
    unsigned cut_key;  // top-p: keys below are dropped (0: off)
    int cut_index;     // top-p: tokens with key == cut_key and index <= this are dropped
    int last;          // top-p: never dropped
    double m;          // the largest x (f64), the softmax's shift
    double min_bound;  // min-p: e / S < min_bound is dropped (0: off)
    double min_sum;    // min-p: S, the sum of e over the top-k and top-p survivors
};

__device__ __forceinline__ bool keep_k(const Filters& f, float x) { return !(x < f.kth); }
__device__ __forceinline__ bool keep_p(const Filters& f, unsigned key, int i) {
    return key > f.cut_key || (key == f.cut_key && i > f.cut_index) || i == f.last;
}
// exp(x − m) in f64 (the CPU's unnormalised probability).
__device__ __forceinline__ double weight(const Filters& f, float x) { return exp((double)x - f.m); }

template <typename T>
__device__ __forceinline__ float logit(const T* l, int i, float temperature) {
    return load(l, i) / temperature;
}

template <typename T>
__device__ int greedy(const T* l, int vocab) {
    // Composite (key, ~index): the max is the largest value, first index.
    // -0 counts as +0 (the CPU compares with >); NaN is key 0, below every
    // number, with the index itself, so only an all-NaN row picks one: the last.
    unsigned long long best = 0;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        float x = load(l, i);
        unsigned long long c;
        if (x != x) {
            c = (unsigned long long)i;
        } else {
            if (x == 0.0f) x = 0.0f;
            c = ((unsigned long long)order_key(x) << 32) | (unsigned)(0xffffffffu - (unsigned)i);
        }
        best = c > best ? c : best;
    }
    best = block_extreme<true>(best);
    return (best >> 32) == 0 ? (int)(best & 0xffffffffu) : (int)(0xffffffffu - (unsigned)(best & 0xffffffffu));
}

template <typename T>
__device__ int sample_row(const T* l, int vocab, double u, float temperature, int top_k, float top_p, float min_p) {
    if (temperature == 0.0f) return greedy(l, vocab);
    const int chunk = (vocab + blockDim.x - 1) / blockDim.x;  // contiguous range per thread (scans)
    const int lo = min(vocab, (int)threadIdx.x * chunk), hi = min(vocab, lo + chunk);
    Filters f;
    f.kth = -inf_f32();
    f.cut_key = 0;
    f.cut_index = -1;
    f.min_bound = 0.0;
    f.min_sum = 1.0;

    // The largest x (NaN ignored, as f32::max) and the last token of the
    // ascending (key, index) order.
    float mx = -inf_f32();
    unsigned long long last = 0;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float x = logit(l, i, temperature);
        mx = fmaxf(mx, x);
        const unsigned long long c = ((unsigned long long)order_key(x) << 32) | (unsigned)i;
        last = c > last ? c : last;
    }
    last = block_extreme<true>(last);
    f.last = (int)(last & 0xffffffffu);
    const unsigned max_key = (unsigned)(last >> 32);
    // Reduced as keys (the f32 bits would not order negatives).
    f.m = (double)key_value(block_extreme<true>(order_key(mx)));

    if (top_k > 0 && top_k < vocab) {
        // The k-th largest key: the smallest K with fewer than k keys > K
        // (none is above the largest).
        auto elem = [&](int i, unsigned& key, int& w) {
            key = order_key(logit(l, i, temperature));
            w = 1;
            return true;
        };
        const unsigned kth = smallest_key<false, int>(0u, max_key, vocab, elem, [&](int n) { return n < top_k; });
        f.kth = key_value(kth);
    }

    if (top_p > 0.0f) {
        const double thr = 1.0 - (double)top_p;
        double s = 0.0;
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
            const float x = logit(l, i, temperature);
            if (keep_k(f, x)) s += weight(f, x);
        }
        const double sum = block_sum(s);
        // Mass of the top-k survivors with key <= k (p_i = e_i / sum, as the CPU).
        auto mass_le = [&](unsigned k, bool below) {
            double acc = 0.0;
            for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
                const float x = logit(l, i, temperature);
                const unsigned key = order_key(x);
                if (keep_k(f, x) && (below ? key < k : key <= k)) acc += weight(f, x) / sum;
            }
            return block_sum(acc);
        };
        unsigned cut = max_key;
        int cut_index = FT_INT_MAX;  // the whole row below the last is dropped unless a cut is found
        if (mass_le(max_key, false) > thr) {
            auto elem = [&](int i, unsigned& key, double& w) {
                const float x = logit(l, i, temperature);
                key = order_key(x);
                w = keep_k(f, x) ? weight(f, x) / sum : 0.0;
                return w > 0.0;
            };
            cut = smallest_key<true, double>(0u, max_key, vocab, elem, [&](double m) { return m > thr; });
            // Tokens with key == cut in index order: dropped while the mass
            // below the cut plus theirs so far stays <= thr.
            const double below = mass_le(cut, true);
            double mine = 0.0;
            for (int i = lo; i < hi; ++i) {
                const float x = logit(l, i, temperature);
                if (keep_k(f, x) && order_key(x) == cut) mine += weight(f, x) / sum;
            }
            double run = below + block_exclusive_scan(mine);
            int dropped = -1;
            for (int i = lo; i < hi; ++i) {
                const float x = logit(l, i, temperature);
                if (keep_k(f, x) && order_key(x) == cut) {
                    run += weight(f, x) / sum;
                    if (run <= thr) dropped = i;
                }
            }
            cut_index = block_extreme<true>(dropped);
        }
        f.cut_key = cut;
        f.cut_index = cut_index;
    }

    if (min_p > 0.0f) {
        double s = 0.0;
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
            const float x = logit(l, i, temperature);
            if (keep_k(f, x) && keep_p(f, order_key(x), i)) s += weight(f, x);
        }
        f.min_sum = block_sum(s);
        // The most likely token's probability is exp(0) / S.
        f.min_bound = (double)min_p * (1.0 / f.min_sum);
    }

    // The draw over the final survivors, in index order.
    auto prob = [&](int i, double total) {
        const float x = logit(l, i, temperature);
        if (!keep_k(f, x) || !keep_p(f, order_key(x), i)) return 0.0;
        const double e = weight(f, x);
        if (f.min_bound > 0.0 && e / f.min_sum < f.min_bound) return 0.0;
        return e / total;
    };
    double s = 0.0;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) s += prob(i, 1.0);
    const double total = block_sum(s);
    double mine = 0.0;
    for (int i = lo; i < hi; ++i) {
        const double p = prob(i, total);
        if (p > 0.0) mine += p;
    }
    double run = block_exclusive_scan(mine);
    int first = FT_INT_MAX, nonzero = 0;
    for (int i = lo; i < hi; ++i) {
        const double p = prob(i, total);
        if (p > 0.0) {
            run += p;
            nonzero = i;
            if (u < run && first == FT_INT_MAX) first = i;
        }
    }
    first = block_extreme<false>(first);
    nonzero = block_extreme<true>(nonzero);
    return first != FT_INT_MAX ? first : nonzero;
}

template <typename T>
__device__ __forceinline__ void sample_rows(const T* __restrict__ logits, const double* __restrict__ uniforms,
                                            int* __restrict__ out, int rows, int vocab, float temperature, int top_k,
                                            float top_p, float min_p) {
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        const int t = sample_row(logits + (u64)row * vocab, vocab, uniforms[row], temperature, top_k, top_p, min_p);
        if (threadIdx.x == 0) out[row] = t;
    }
}

#define FT_SAMPLE_ROWS(SUFFIX, T)                                                                          \
    extern "C" __global__ void __launch_bounds__(FT_MAX_THREADS)                                           \
        sample_rows_##SUFFIX(const T* logits, const double* uniforms, int* out, int rows, int vocab,       \
                             float temperature, int top_k, float top_p, float min_p) {                     \
        sample_rows<T>(logits, uniforms, out, rows, vocab, temperature, top_k, top_p, min_p);              \
    }

FT_SAMPLE_ROWS(f32, float)
FT_SAMPLE_ROWS(bf16, bf16)
