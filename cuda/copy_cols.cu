// A block of columns between two row-major matrices with the same number of
// rows: dst[r, dst_off + j] = src[r, src_off + j] for r < rows, j < width;
// the other columns of dst are left as they are. Splits the output of a
// fused projection (qkv_proj, gate_up_proj) into its parts, and assembles
// their gradients into the fused layout.
// CPU reference: src/backend/cpu/buffer_ops.rs (Backend::copy_cols).
//
// A copy of stored values in one storage type (bf16 to bf16, f32 to f32):
// exact. One block per row (grid-stride over rows), threads striding over
// the row's `width` consecutive elements, so every warp reads and writes
// one contiguous run; no per-element division.
// Suggested launch: block = 256, grid = rows (any grid works).
#include "common.cuh"

using namespace ft;

template <typename T>
__device__ __forceinline__ void copy_cols(const T* __restrict__ src, T* __restrict__ dst, int rows,
                                          int src_cols, int src_off, int dst_cols, int dst_off,
                                          int width) {
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* s = src + (u64)r * src_cols + src_off;
        T* d = dst + (u64)r * dst_cols + dst_off;
        for (int j = threadIdx.x; j < width; j += blockDim.x) d[j] = s[j];
    }
}

#define FT_COPY_COLS(SUFFIX, T)                                                                  \
    extern "C" __global__ void __launch_bounds__(FT_MAX_THREADS)                                 \
        copy_cols_##SUFFIX(const T* src, T* dst, int rows, int src_cols, int src_off,            \
                           int dst_cols, int dst_off, int width) {                               \
        copy_cols<T>(src, dst, rows, src_cols, src_off, dst_cols, dst_off, width);               \
    }

FT_COPY_COLS(f32, float)
FT_COPY_COLS(bf16, bf16)
