// Copies of rows and columns between row-major matrices: copy_cols and,
// at the end of the file, scatter_rows.
//
// copy_cols: a block of columns between two row-major matrices with the
// same number of rows: dst[r, dst_off + j] = src[r, src_off + j] for
// r < rows, j < width; the other columns of dst are left as they are.
// Splits the output of a fused projection (qkv_proj, gate_up_proj) into its
// parts, and assembles their gradients into the fused layout.
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

// Rows into a batched KV cache (Backend::scatter_rows; CPU reference:
// src/backend/cpu/buffer_ops.rs): row s of src [rows, width] to row
// s * capacity + positions[s] of dst, whose rows are `width` wide (each
// decoding sequence's new key or value into its own cache region). The
// positions are read on the device, so the host never waits for them. A
// position outside [0, capacity) is a host bug (the CPU backend panics):
// its row is not written, and decode_attention_batch, given the same
// positions, writes NaN for that sequence. An exact copy in one storage
// type. One block per row (grid-stride over rows), threads striding over
// its `width` consecutive elements.
// Suggested launch: block = 256, grid = rows (any grid works).
template <typename T>
__device__ __forceinline__ void scatter_rows(const T* __restrict__ src, T* __restrict__ dst,
                                             const int* __restrict__ positions, int rows, int width,
                                             int capacity) {
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        const int p = positions[r];
        if (p < 0 || p >= capacity) continue;  // the same for the whole block
        const T* s = src + (u64)r * width;
        T* d = dst + ((u64)r * capacity + p) * width;
        for (int j = threadIdx.x; j < width; j += blockDim.x) d[j] = s[j];
    }
}

#define FT_SCATTER_ROWS(SUFFIX, T)                                                               \
    extern "C" __global__ void __launch_bounds__(FT_MAX_THREADS)                                 \
        scatter_rows_##SUFFIX(const T* src, T* dst, const int* positions, int rows, int width,  \
                              int capacity) {                                                    \
        scatter_rows<T>(src, dst, positions, rows, width, capacity);                             \
    }

FT_SCATTER_ROWS(f32, float)
FT_SCATTER_ROWS(bf16, bf16)
