// Embedding gather from a frozen bf16 table: out[i, :] = table[ids[i], :].
// CPU reference: src/backend/cpu/memory.rs (Backend::embedding).
//
// table is [vocab, hidden]. The CPU backend panics on an id outside
// [0, vocab); a kernel cannot, so the host must validate ids before upload
// (they come from the host). As a last guard an out-of-range id never reads
// out of bounds: its output row is filled with NaN, so the bug is loud.
// The table is frozen: there is no backward.
// Suggested launch: grid = n, block = 256 (grid-stride over rows).
#include "common.cuh"

using namespace ft;

template <typename T>
__device__ __forceinline__ void embedding_fwd(const bf16* __restrict__ table, const int* __restrict__ ids,
                                              T* __restrict__ out, int n, int hidden, int vocab) {
    for (int row = blockIdx.x; row < n; row += gridDim.x) {
        const int id = ids[row];
        const u64 dst = (u64)row * hidden;
        if (id >= 0 && id < vocab) {
            const bf16* src = table + (u64)id * hidden;
            for (int j = threadIdx.x; j < hidden; j += blockDim.x) store(out, dst + j, to_f32(src[j]));
        } else {
            for (int j = threadIdx.x; j < hidden; j += blockDim.x) store(out, dst + j, nan_f32());
        }
    }
}

#define FT_EMBEDDING(SUFFIX, T)                                                                  \
    extern "C" __global__ void __launch_bounds__(FT_MAX_THREADS)                                 \
        embedding_fwd_##SUFFIX(const bf16* table, const int* ids, T* out, int n, int hidden,     \
                               int vocab) {                                                      \
        embedding_fwd<T>(table, ids, out, n, hidden, vocab);                                     \
    }

FT_EMBEDDING(f32, float)
FT_EMBEDDING(bf16, bf16)
