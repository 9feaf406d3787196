//! NF4 (4-bit NormalFloat) blockwise quantization, byte-identical to
//! bitsandbytes: blocks of 64 values share an absmax; each value / absmax is
//! mapped to the nearest of 16 codes; two codes per byte (the first in the
//! high nibble). With double quantization the absmaxes are themselves
//! quantized to 8 bits (blocks of 256, bitsandbytes' signed dynamic map,
//! after subtracting their mean). SPECS.md §1.

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
