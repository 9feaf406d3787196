//! NF4 (4-bit NormalFloat) blockwise quantization, byte-identical to
//! bitsandbytes: blocks of 64 values share an absmax; each value / absmax is
//! mapped to the nearest of 16 codes; two codes per byte (the first in the
//! high nibble). With double quantization the absmaxes are themselves
//! quantized to 8 bits (blocks of 256, bitsandbytes' signed dynamic map,
//! after subtracting their mean).

/// The 16 NF4 code values, index 0..15 (bitsandbytes' quant_map).
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

pub const BLOCKSIZE: usize = 64;
pub const NESTED_BLOCKSIZE: usize = 256;

/// The per-block scales of an NF4 tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    /// One f32 per block.
    Plain(Vec<f32>),
    /// Double quantization: absmax[b] = nested_map[codes[b]] ·
    /// nested_absmax[b / nested_blocksize] + offset.
    Nested {
        codes: Vec<u8>,
        nested_absmax: Vec<f32>,
        /// The 256-entry dynamic map (bitsandbytes' nested_quant_map).
        nested_map: Vec<f32>,
        offset: f32,
        nested_blocksize: usize,
    },
}

/// A quantized 2-D weight [rows, cols] (row-major, flattened into blocks).
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Tensor {
    pub shape: [usize; 2],
    pub blocksize: usize,
    /// Two codes per byte, element 2j in the high nibble; (n+1)/2 bytes.
    pub packed: Vec<u8>,
    pub absmax: Absmax,
    /// The 16 code values (the checkpoint's quant_map; NF4_CODE normally).
    pub code: [f32; 16],
}

impl Nf4Tensor {
    pub fn numel(&self) -> usize {
        self.shape[0] * self.shape[1]
    }

    pub fn n_blocks(&self) -> usize {
        self.numel().div_ceil(self.blocksize)
    }

    /// The f32 absmax of every block (expanding double quantization).
    pub fn absmax_f32(&self) -> Vec<f32> {
        match &self.absmax {
            Absmax::Plain(a) => a.clone(),
            Absmax::Nested { codes, nested_absmax, nested_map, offset, nested_blocksize } => codes
                .iter()
                .enumerate()
                .map(|(b, &q)| nested_map[q as usize] * nested_absmax[b / nested_blocksize] + offset)
                .collect(),
        }
    }

    /// Dequantize into `out` (f32, numel values): code · absmax.
    pub fn dequantize_into(&self, out: &mut [f32]) {
        let absmax = self.absmax_f32();
        for (i, o) in out.iter_mut().enumerate().take(self.numel()) {
            let byte = self.packed[i / 2];
            let nib = if i % 2 == 0 { byte >> 4 } else { byte & 0x0f };
            *o = self.code[nib as usize] * absmax[i / self.blocksize];
        }
    }

    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.numel()];
        self.dequantize_into(&mut out);
        out
    }

    /// Bytes held (packed codes and scales), for memory plans.
    pub fn nbytes(&self) -> usize {
        self.packed.len()
            + match &self.absmax {
                Absmax::Plain(a) => 4 * a.len(),
                Absmax::Nested { codes, nested_absmax, nested_map, .. } => codes.len() + 4 * (nested_absmax.len() + nested_map.len()),
            }
    }
}

// ---------------------------------------------------------------- quantize
//
// bitsandbytes' CPU path, operation by operation (its default `quantize_4bit`
// kernel in torch, and the native `quantize_blockwise` of its CPU library for
// the nested 8-bit step), so that the bytes come out identical.

/// The smallest absmax the final partial block is scaled by: bitsandbytes
/// clamps it (`clamp(min=1e-38)`, a subnormal f32) and stores the clamped
/// value. Full blocks store their true absmax (0 for an all-zero block) and
/// only scale by the clamped one.
const MIN_ABSMAX: f32 = 1e-38;

/// Thresholds between neighbouring NF4 codes: (c[i] + c[i+1]) / 2 in f32.
fn nf4_bounds(code: &[f32; 16]) -> [f32; 15] {
    std::array::from_fn(|i| (code[i] + code[i + 1]) / 2.0)
}

/// torch.bucketize(x, bounds) (right=False): the number of thresholds that
/// are not >= x. A value on a threshold takes the lower code; NaN the last.
fn code_index(x: f32, bounds: &[f32; 15]) -> u8 {
    use std::cmp::Ordering::{Equal, Greater};
    bounds.iter().filter(|b| !matches!(b.partial_cmp(&&x), Some(Greater | Equal))).count() as u8
}

/// max |x| over a block; NaN propagates as torch's max does.
fn abs_max(xs: &[f32]) -> f32 {
    xs.iter().fold(0.0f32, |m, &x| if m.is_nan() || x.is_nan() { f32::NAN } else { m.max(x.abs()) })
}

/// Append the stored absmax of each block of `w` to `out`. `w` starts on a
/// block boundary; only its last block may be short, and a short block is
/// the tensor's final partial block.
pub fn push_block_absmax(w: &[f32], blocksize: usize, out: &mut Vec<f32>) {
    out.extend(w.chunks(blocksize).map(|b| {
        let m = abs_max(b);
        if b.len() < blocksize { m.max(MIN_ABSMAX) } else { m }
    }));
}

/// Append the packed codes of `w` (two per byte, the first in the high
/// nibble) to `out`, given each block's stored absmax. `w` starts on a block
/// boundary; an odd final length is padded with the code of 0.0 (7), as
/// bitsandbytes pads the scaled values with a zero.
pub fn push_packed_codes(w: &[f32], absmax: &[f32], blocksize: usize, code: &[f32; 16], out: &mut Vec<u8>) {
    let bounds = nf4_bounds(code);
    let mut idx = Vec::with_capacity(w.len() + 1);
    for (block, &am) in w.chunks(blocksize).zip(absmax) {
        if block.len() == blocksize {
            // Full block: x · (1 / absmax), the reciprocal rounded once.
            let inv = 1.0 / am.max(MIN_ABSMAX);
            idx.extend(block.iter().map(|&x| code_index((x * inv).clamp(-1.0, 1.0), &bounds)));
        } else {
            // The final partial block divides (absmax already clamped).
            idx.extend(block.iter().map(|&x| code_index((x / am).clamp(-1.0, 1.0), &bounds)));
        }
    }
    if idx.len() % 2 == 1 {
        idx.push(code_index(0.0, &bounds));
    }
    out.extend(idx.chunks_exact(2).map(|p| (p[0] << 4) | p[1]));
}

/// Quantize a row-major [rows, cols] weight (f32 values converted exactly
/// from the checkpoint's bf16/f16/f32) as bitsandbytes'
/// `quantize_4bit(w, blocksize=64, quant_type="nf4",
/// compress_statistics=double_quant)` does on its CPU backend. With double
/// quantization, weights of 32768 blocks (2,097,152 values) or more match
/// torch running its mean on one thread (see `torch_mean`); with more threads
/// torch's offset, and so the nested statistics, can differ in the last bit.
pub fn quantize(w: &[f32], shape: [usize; 2], double_quant: bool) -> Nf4Tensor {
    assert_eq!(w.len(), shape[0] * shape[1], "quantize: {} values for shape {shape:?}", w.len());
    let mut absmax = Vec::with_capacity(w.len().div_ceil(BLOCKSIZE));
    push_block_absmax(w, BLOCKSIZE, &mut absmax);
    let mut packed = Vec::with_capacity(w.len().div_ceil(2));
    push_packed_codes(w, &absmax, BLOCKSIZE, &NF4_CODE, &mut packed);
    let absmax = if double_quant { double_quantize(&absmax) } else { Absmax::Plain(absmax) };
    Nf4Tensor { shape, blocksize: BLOCKSIZE, packed, absmax, code: NF4_CODE }
}

/// Double quantization of the per-block absmaxes: offset = their mean (as
/// torch computes it), then `quantize_blockwise(absmax - offset,
/// blocksize=256)` with the signed dynamic map.
pub fn double_quantize(absmax: &[f32]) -> Absmax {
    let offset = torch_mean(absmax);
    let centered: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let nested_map = dynamic_map_signed();
    let (codes, nested_absmax) = quantize_blockwise(&centered, &nested_map, NESTED_BLOCKSIZE);
    Absmax::Nested { codes, nested_absmax, nested_map, offset, nested_blocksize: NESTED_BLOCKSIZE }
}

/// bitsandbytes' `create_dynamic_map(signed=True)`: for exponents 10^-6 ..
/// 10^0, the midpoints of `linspace(0.1, 1, 2^i + 1)` scaled by ±10^(i-6),
/// plus 0 and 1, sorted (256 values, all computed in f32 as torch does).
pub fn dynamic_map_signed() -> Vec<f32> {
    // 10 ** (i - 6) as Python evaluates it (a double), then cast to f32 by torch.
    const SCALES: [f64; 7] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0];
    let mut data = Vec::with_capacity(256);
    for (i, &s) in SCALES.iter().enumerate() {
        let bounds = torch_linspace(0.1, 1.0, (1 << i) + 1);
        let s = s as f32;
        for m in bounds.windows(2).map(|p| (p[0] + p[1]) / 2.0) {
            data.push(s * m);
            data.push(-s * m);
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(f32::total_cmp);
    data
}

/// torch.linspace(start, end, steps) in f32 on the CPU: the first half
/// counts up from start, the second down from end, each a fused
/// multiply-add as torch's compiled kernel computes it.
fn torch_linspace(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| if i < half { step.mul_add(i as f32, start) } else { (-step).mul_add((steps - i - 1) as f32, end) })
        .collect()
}

// ---------------------------------------------------------------- torch's mean

/// Lanes of torch's f32 vector type on AVX2 CPUs.
const TORCH_LANES: usize = 8;

/// `tensor.mean()` of a contiguous f32 vector as torch computes it on one
/// CPU thread (AVX2 kernels): its cascade sum in f32, then one division.
/// Torch reduces 32768 or more values on several threads, each summing its
/// own slice; the result then depends on the thread count, and this is the
/// one-thread value.
pub fn torch_mean(x: &[f32]) -> f32 {
    torch_sum(x) / x.len() as f32
}

/// torch's `cascade_sum` over one contiguous row: vectors of 8 lanes summed
/// four at a time in a multi-level cascade, the tail added in order, then the
/// lanes. Fewer than 8 values take the scalar form of the same cascade.
fn torch_sum(x: &[f32]) -> f32 {
    if x.len() < TORCH_LANES {
        return 0.0 + row_sum::<1>(x, x.len())[0];
    }
    let n_vec = x.len() / TORCH_LANES;
    let lanes = row_sum::<TORCH_LANES>(x, n_vec);
    let mut total = 0.0f32;
    for &v in &x[n_vec * TORCH_LANES..] {
        total += v;
    }
    for l in lanes {
        total += l;
    }
    0.0 + total
}

fn add_lanes<const L: usize>(acc: &mut [f32; L], x: &[f32]) {
    acc.iter_mut().zip(x).for_each(|(a, &v)| *a += v);
}

/// torch's `row_sum`: `size` elements of L lanes (element e is x[e·L..]),
/// summed as 4 interleaved columns, then the leftover elements, then the
/// columns into the first.
fn row_sum<const L: usize>(x: &[f32], size: usize) -> [f32; L] {
    const ILP: usize = 4;
    let rows = size / ILP;
    let mut partial = multi_row_sum::<L>(x, rows);
    for e in rows * ILP..size {
        add_lanes(&mut partial[0], &x[e * L..(e + 1) * L]);
    }
    let [mut first, rest @ ..] = partial;
    for p in rest {
        add_lanes(&mut first, &p);
    }
    first
}

/// torch's `multi_row_sum` with 4 columns: row i, column k is element
/// 4i + k. Rows are added into level 0; every 2^p rows level j-1 is folded
/// into level j (p = max(4, ceil(log2 rows) / 4)), so only partial sums of
/// similar size meet.
fn multi_row_sum<const L: usize>(x: &[f32], rows: usize) -> [[f32; L]; 4] {
    const LEVELS: usize = 4;
    let ceil_log2 = if rows <= 2 { 1 } else { (usize::BITS - (rows - 1).leading_zeros()) as usize };
    let power = (ceil_log2 / LEVELS).max(4);
    let step = 1usize << power;
    let mask = step - 1;
    let mut acc = [[[0f32; L]; 4]; LEVELS];
    let add_row = |acc: &mut [[f32; L]; 4], i: usize| {
        for (k, col) in acc.iter_mut().enumerate() {
            let e = i * 4 + k;
            add_lanes(col, &x[e * L..(e + 1) * L]);
        }
    };
    let mut i = 0;
    while i + step <= rows {
        for _ in 0..step {
            add_row(&mut acc[0], i);
            i += 1;
        }
        for j in 1..LEVELS {
            let lower = std::mem::replace(&mut acc[j - 1], [[0.0; L]; 4]);
            for (col, low) in acc[j].iter_mut().zip(&lower) {
                add_lanes(col, low);
            }
            if i & (mask << (j * power)) != 0 {
                break;
            }
        }
    }
    while i < rows {
        add_row(&mut acc[0], i);
        i += 1;
    }
    let [mut out, rest @ ..] = acc;
    for level in rest {
        for (col, part) in out.iter_mut().zip(&level) {
            add_lanes(col, part);
        }
    }
    out
}

// ---------------------------------------------------------------- 8-bit blockwise

/// Entries of bitsandbytes' CPU quantization lookup table: [-1, 1] cut
/// into 65536 steps, each mapped to its nearest code once.
const LUT_SIZE: usize = 65536;

/// bitsandbytes' `build_quantize_lut`: for step i (value -1 + 2i/65535),
/// the first code whose upper midpoint is not below it.
fn build_lut(code: &[f32]) -> Vec<u8> {
    let mid: Vec<f32> = code.windows(2).map(|p| 0.5 * (p[0] + p[1])).collect();
    let mut lut = vec![0u8; LUT_SIZE];
    let mut c = 0;
    for (i, slot) in lut.iter_mut().enumerate() {
        let val = -1.0 + (2.0 * i as f32) / (LUT_SIZE - 1) as f32;
        while c < mid.len() && mid[c] < val {
            c += 1;
        }
        *slot = c as u8;
    }
    lut
}

/// bitsandbytes' `norm_to_lut_index`: the table step of a scaled value.
fn lut_index(v: f32) -> usize {
    let v = v.clamp(-1.0, 1.0);
    // `as` saturates, and maps NaN to 0 (the x86 conversion's low bits).
    (((v + 1.0) * 0.5) * (LUT_SIZE - 1) as f32 + 0.5) as u16 as usize
}

/// bitsandbytes' native CPU `quantize_blockwise` with a 256-entry code:
/// per block the absmax, then each value × (1 / absmax) through the lookup
/// table; an all-zero block stores absmax 0 and codes 0.
pub fn quantize_blockwise(x: &[f32], code: &[f32], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    let lut = build_lut(code);
    let mut codes = Vec::with_capacity(x.len());
    let mut absmax = Vec::with_capacity(x.len().div_ceil(blocksize));
    for block in x.chunks(blocksize) {
        let am = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        absmax.push(am);
        if am == 0.0 {
            codes.extend(std::iter::repeat_n(0u8, block.len()));
            continue;
        }
        let inv = 1.0 / am;
        codes.extend(block.iter().map(|&v| lut[lut_index(v * inv)]));
    }
    (codes, absmax)
}
