// NF4 dequantization (QLoRA base weights, bitsandbytes' layout): a 4-bit
// [out, in] weight is expanded into the backend's one bf16 scratch right
// before the cuBLAS product that reads it (forward y = x·Wᵀ and the
// backward's dx = dy·W); the 4-bit form is all that stays resident.
//
// CPU reference: src/backend/cpu/nf4.rs (`Nf4Weight::dequantize_into`), and
// bitsandbytes' own CPU path with compute dtype f32:
//   absmax[b] = nested_map[q[b]] · nested_absmax[b / nested_blocksize] + offset
//               (double quantization; two f32 roundings, no FMA), or the
//               stored f32 absmax[b];
//   out[i]    = bf16_rn(code[nibble(i)] · absmax[i / blocksize])
// where element 2j is the high nibble of packed byte j, 2j+1 the low one.
// Every f32 operation is written __fmul_rn / __fadd_rn (and the module is
// compiled with --fmad=false), so each value equals the CPU's f32 result
// before the one bf16 rounding: the outputs are bit-identical to
// bf16(CPU dequantize).
//
// Layout of the work: one thread expands 32 elements from one 16-byte load
// of packed codes (uint4) and writes them with four 16-byte stores, so reads
// and writes are full-width and coalesced. blocksize must be a multiple of
// 32 (bitsandbytes uses 64) so the 32 elements share one scale. A last
// partial group (numel % 32) is expanded element by element.
// Suggested launch: block = 256, grid = ceil(numel / 32 / 256) (grid-stride).
#include "common.cuh"

using namespace ft;

typedef unsigned char u8;

// The scale of block `b`.
template <bool NESTED>
__device__ __forceinline__ float block_scale(const float* __restrict__ absmax, const u8* __restrict__ absmax_codes,
                                             const float* __restrict__ nested_absmax, const float* __restrict__ nested_map,
                                             float offset, int nested_blocksize, u64 b) {
    if (NESTED) {
        const float m = __ldg(nested_map + absmax_codes[b]);
        return __fadd_rn(__fmul_rn(m, __ldg(nested_absmax + b / (u64)nested_blocksize)), offset);
    }
    return absmax[b];
}

__device__ __forceinline__ unsigned int pack_bf16x2(float lo, float hi) {
    const unsigned int a = __bfloat16_as_ushort(__float2bfloat16_rn(lo));
    const unsigned int b = __bfloat16_as_ushort(__float2bfloat16_rn(hi));
    return a | (b << 16);
}

template <bool NESTED>
__device__ __forceinline__ void nf4_dequantize(const u8* __restrict__ packed, const float* __restrict__ absmax,
                                               const u8* __restrict__ absmax_codes, const float* __restrict__ nested_absmax,
                                               const float* __restrict__ nested_map, float offset,
                                               const float* __restrict__ code, bf16* __restrict__ out, u64 n,
                                               int blocksize, int nested_blocksize) {
    __shared__ float s_code[16];
    if (threadIdx.x < 16) s_code[threadIdx.x] = code[threadIdx.x];
    __syncthreads();

    const u64 groups = n / 32;
    const uint4* __restrict__ in4 = reinterpret_cast<const uint4*>(packed);
    uint4* __restrict__ out4 = reinterpret_cast<uint4*>(out);
    for (u64 g = global_thread(); g < groups; g += grid_threads()) {
        const float s = block_scale<NESTED>(absmax, absmax_codes, nested_absmax, nested_map, offset, nested_blocksize,
                                            g * 32 / (u64)blocksize);
        const uint4 q = __ldg(in4 + g);
        const unsigned int words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int w = 0; w < 4; ++w) {
            // Word w holds packed bytes 4w..4w+3 (little endian), i.e.
            // elements 8w..8w+7: byte j -> (high nibble, low nibble).
            unsigned int o[4];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const unsigned int byte = (words[w] >> (8 * j)) & 0xffu;
                o[j] = pack_bf16x2(__fmul_rn(s_code[byte >> 4], s), __fmul_rn(s_code[byte & 0xfu], s));
            }
            out4[g * 4 + w] = make_uint4(o[0], o[1], o[2], o[3]);
        }
    }
    // The last partial group, one element per thread of the first block.
    const u64 tail = groups * 32;
    if (blockIdx.x == 0) {
        for (u64 i = tail + threadIdx.x; i < n; i += blockDim.x) {
            const float s = block_scale<NESTED>(absmax, absmax_codes, nested_absmax, nested_map, offset, nested_blocksize,
                                                i / (u64)blocksize);
            const unsigned int byte = packed[i / 2];
            const unsigned int nib = (i % 2 == 0) ? (byte >> 4) : (byte & 0xfu);
            out[i] = __float2bfloat16_rn(__fmul_rn(s_code[nib], s));
        }
    }
}

// Plain scales: absmax is f32 [n_blocks].
extern "C" __global__ void __launch_bounds__(FT_MAX_THREADS)
    nf4_dequantize_bf16(const u8* packed, const float* absmax, const float* code, bf16* out, u64 n, int blocksize) {
    nf4_dequantize<false>(packed, absmax, nullptr, nullptr, nullptr, 0.0f, code, out, n, blocksize, 1);
}

// Double-quantized scales: absmax_codes u8 [n_blocks], nested_absmax f32
// [ceil(n_blocks / nested_blocksize)], nested_map f32 [256], offset f32.
extern "C" __global__ void __launch_bounds__(FT_MAX_THREADS)
    nf4_dequantize_nested_bf16(const u8* packed, const u8* absmax_codes, const float* nested_absmax,
                               const float* nested_map, float offset, const float* code, bf16* out, u64 n, int blocksize,
                               int nested_blocksize) {
    nf4_dequantize<true>(packed, nullptr, absmax_codes, nested_absmax, nested_map, offset, code, out, n, blocksize,
                         nested_blocksize);
}
