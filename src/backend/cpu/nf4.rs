//! NF4 base weights on the CPU: kept 4-bit, dequantized for one product at a
//! time into a per-thread f32 scratch that is reused across products.
//!
//! Dequantization is exactly bitsandbytes' CPU path with compute dtype f32:
//! out[i] = code[nibble(i)] · absmax[i / blocksize], one f32 multiply, with
//! absmax expanded (double quantization: nested_map[q] · nested_absmax + offset,
//! two f32 roundings) once at load, as `Nf4Tensor::absmax_f32` computes it.

use rayon::prelude::*;
use std::cell::Cell;

use crate::quant::nf4::Nf4Tensor;

/// Blocks of the 4-bit weight per rayon task.
const BLOCKS_PER_TASK: usize = 256;

/// A frozen NF4 weight: the packed codes, the code table and every block's
/// f32 scale (1/16 of an f32 weight's size on top of the 4-bit codes).
pub struct Nf4Weight {
    pub shape: [usize; 2],
    pub blocksize: usize,
    pub packed: Vec<u8>,
    pub code: [f32; 16],
    pub absmax: Vec<f32>,
}

impl Nf4Weight {
    pub fn new(t: &Nf4Tensor) -> Nf4Weight {
        Nf4Weight { shape: t.shape, blocksize: t.blocksize, packed: t.packed.clone(), code: t.code, absmax: t.absmax_f32() }
    }

    pub fn numel(&self) -> usize {
        self.shape[0] * self.shape[1]
    }

    /// Write the dequantized matrix into `out[..numel]`. Every element is one
    /// f32 product, so the result does not depend on the thread count.
    pub fn dequantize_into(&self, out: &mut [f32]) {
        let n = self.numel();
        let bs = self.blocksize;
        out[..n].par_chunks_mut(bs * BLOCKS_PER_TASK).enumerate().for_each(|(task, chunk)| {
            let first = task * bs * BLOCKS_PER_TASK;
            for (j, o) in chunk.iter_mut().enumerate() {
                let i = first + j;
                let byte = self.packed[i / 2];
                let nib = if i.is_multiple_of(2) { byte >> 4 } else { byte & 0x0f };
                *o = self.code[nib as usize] * self.absmax[i / bs];
            }
        });
    }
}

thread_local! {
    /// The calling thread's dequantization scratch, grown to the largest
    /// NF4 weight it has multiplied by and then reused.
    static SCRATCH: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// Run `f` on the dequantized weight. The scratch is taken out of the
/// thread-local for the call, so a nested call on the same thread (rayon
/// work-stealing inside the product) gets its own buffer instead of a
/// borrow conflict.
pub fn with_dequantized<R>(w: &Nf4Weight, f: impl FnOnce(&[f32]) -> R) -> R {
    let n = w.numel();
    let mut buf = SCRATCH.with(Cell::take);
    if buf.len() < n {
        buf.resize(n, 0.0);
    }
    w.dequantize_into(&mut buf);
    let r = f(&buf[..n]);
    SCRATCH.with(|s| {
        let other = s.take();
        // Keep the larger of the two buffers if a nested call left one.
        s.set(if other.len() > buf.len() { other } else { buf });
    });
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Backend, MatShape};
    use crate::backend::cpu::CpuBackend;
    use crate::quant::nf4::{Absmax, NF4_CODE};

    /// A hand-built NF4 tensor: codes 0..15 cycling, scales 1, 2, 3, ...
    fn tensor(rows: usize, cols: usize, blocksize: usize) -> Nf4Tensor {
        let n = rows * cols;
        let codes: Vec<u8> = (0..n).map(|i| ((i * 7 + 3) % 16) as u8).collect();
        let packed = codes.chunks(2).map(|c| (c[0] << 4) | c.get(1).copied().unwrap_or(0)).collect();
        let absmax = (0..n.div_ceil(blocksize)).map(|b| 0.5 + b as f32 * 0.25).collect();
        Nf4Tensor { shape: [rows, cols], blocksize, packed, absmax: Absmax::Plain(absmax), code: NF4_CODE }
    }

    #[test]
    fn dequantize_is_code_times_absmax_and_matches_the_reference() {
        // 5 x 27 = 135 elements: an odd count and a partial last block.
        let t = tensor(5, 27, 64);
        let w = Nf4Weight::new(&t);
        let mut out = vec![0f32; 135];
        w.dequantize_into(&mut out);
        for (i, &o) in out.iter().enumerate() {
            let code = (i * 7 + 3) % 16;
            assert_eq!(o.to_bits(), (NF4_CODE[code] * (0.5 + (i / 64) as f32 * 0.25)).to_bits(), "element {i}");
        }
        assert_eq!(out, t.dequantize());
    }

    #[test]
    fn nf4_products_equal_the_dense_products_of_the_dequantized_weight() {
        let be = CpuBackend::new();
        let (m, k, n) = (3, 40, 24);
        let t = tensor(n, k, 64);
        let q = be.weight_from_nf4(&t).unwrap();
        let dense = be.weight_from_f32(&t.dequantize());
        assert_eq!(be.weight_to_f32(&q), t.dequantize());
        assert_eq!(be.weight_len(&q), n * k);
        let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let bias = be.weight_from_f32(&(0..n).map(|i| i as f32 * 0.1).collect::<Vec<_>>());
        let (mut y1, mut y2) = (vec![0f32; m * n], vec![0f32; m * n]);
        be.linear(&x, &q, Some(&bias), &mut y1, MatShape { m, k, n });
        be.linear(&x, &dense, Some(&bias), &mut y2, MatShape { m, k, n });
        assert_eq!(y1, y2);
        let dy: Vec<f32> = (0..m * n).map(|i| (i as f32 * 0.11).cos()).collect();
        let (mut d1, mut d2) = (vec![1f32; m * k], vec![1f32; m * k]);
        be.linear_backward_input(&dy, &q, &mut d1, MatShape { m, k, n }, true);
        be.linear_backward_input(&dy, &dense, &mut d2, MatShape { m, k, n }, true);
        assert_eq!(d1, d2);
    }

    #[test]
    fn malformed_tensors_are_refused() {
        let be = CpuBackend::new();
        let mut t = tensor(4, 16, 64);
        t.packed.pop();
        let err = be.weight_from_nf4(&t).err().unwrap().to_string();
        assert!(err.contains("packed bytes"), "{err}");
    }
}
