//! The 4-bit projections of a model: read from a bitsandbytes checkpoint
//! (`load_prequantized`), or quantized at load for QLoRA (`quantize_nf4`,
//! the parallel form of `quant::nf4::quantize`).

use super::checkpoint::Checkpoint;
use crate::backend::Backend;
use anyhow::{Context, Result};

/// A projection weight of a bitsandbytes 4-bit checkpoint: NF4 when the
/// checkpoint quantized it (it may leave some dense), read
/// through `quant::bnb` and released part by part.
pub(super) fn load_prequantized<B: Backend>(
    be: &B,
    ckpt: &Checkpoint,
    name: &str,
    shape: &[usize],
) -> Result<B::Weight> {
    use crate::quant::bnb;
    // The file says which projections are 4-bit: those with a quant state
    // (the skip list, or a tool that leaves a whole-model Linear such as
    // Gemma 4's per_layer_model_projection dense, keeps the others dense).
    let stored_4bit = [bnb::QUANT_STATE_KEY, bnb::FP4_STATE_KEY].iter().any(|k| ckpt.raw(&format!("{name}.{k}")).is_ok());
    if !stored_4bit {
        return be.load_weight(&ckpt.tensor(name, shape)?);
    }
    let dir = ckpt.dir.display();
    let prefix = name.strip_suffix(".weight").unwrap_or(name);
    let t = bnb::read_nf4(|n| ckpt.raw(n), prefix).with_context(|| format!("{dir}: 4-bit checkpoint"))?;
    if t.shape[..] != *shape {
        anyhow::bail!("{dir}: tensor {name} is a 4-bit weight of shape {:?}, expected {shape:?}", t.shape);
    }
    for suffix in ["", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map"] {
        ckpt.release(&format!("{name}{suffix}"));
    }
    be.weight_from_nf4(&t).with_context(|| format!("{dir}: tensor {name}"))
}

/// `quant::nf4::quantize`, split over threads: blocks are quantized
/// independently (in chunks of whole blocks, an even count so code pairs
/// never straddle chunks), then the double quantization of all the scales
/// runs once. The result is identical to the serial quantization.
pub fn quantize_nf4(w: &[f32], shape: [usize; 2], double_quant: bool) -> crate::quant::nf4::Nf4Tensor {
    use crate::quant::nf4::{Absmax, BLOCKSIZE, NF4_CODE, Nf4Tensor, double_quantize, push_block_absmax, push_packed_codes};
    use rayon::prelude::*;
    const CHUNK: usize = BLOCKSIZE * 1024;
    assert_eq!(w.len(), shape[0] * shape[1], "quantize_nf4: {} values for shape {shape:?}", w.len());
    let parts: Vec<(Vec<f32>, Vec<u8>)> = w
        .par_chunks(CHUNK)
        .map(|c| {
            let mut absmax = Vec::with_capacity(c.len().div_ceil(BLOCKSIZE));
            push_block_absmax(c, BLOCKSIZE, &mut absmax);
            let mut packed = Vec::with_capacity(c.len().div_ceil(2));
            push_packed_codes(c, &absmax, BLOCKSIZE, &NF4_CODE, &mut packed);
            (absmax, packed)
        })
        .collect();
    let mut absmax = Vec::with_capacity(w.len().div_ceil(BLOCKSIZE));
    let mut packed = Vec::with_capacity(w.len().div_ceil(2));
    for (a, p) in parts {
        absmax.extend(a);
        packed.extend(p);
    }
    let absmax = if double_quant { double_quantize(&absmax) } else { Absmax::Plain(absmax) };
    Nf4Tensor { shape, blocksize: BLOCKSIZE, packed, absmax, code: NF4_CODE }
}

#[cfg(test)]
mod tests {
    use super::quantize_nf4;
    use crate::quant::nf4::quantize;

    #[test]
    fn parallel_quantization_equals_the_serial_one() {
        // Several chunks, a partial last block and an odd element count.
        let shape = [301, 1001];
        let w: Vec<f32> = (0..shape[0] * shape[1]).map(|i| ((i as f32) * 0.618).sin() * (1.0 + (i % 977) as f32 * 0.01)).collect();
        for dq in [true, false] {
            assert_eq!(quantize_nf4(&w, shape, dq), quantize(&w, shape, dq));
        }
    }
}
