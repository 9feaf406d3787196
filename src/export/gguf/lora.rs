//! A PEFT LoRA adapter as llama.cpp's LoRA GGUF (what convert_lora_to_gguf.py
//! writes; llama.cpp applies it with --lora): general.type "adapter",
//! adapter.type "lora", adapter.lora.alpha, and per adapted weight
//! `<gguf name>.lora_a` ([r, in] as torch stores it, so ne = [in, r]) and
//! `.lora_b` (ne = [r, out]), B's rows permuted where the base weight's are.
//!
//! llama.cpp scales every pair by alpha / r. What one alpha cannot say is
//! folded into B, exactly: rsLoRA (alpha / √r) writes alpha·√r, and a
//! module whose rank_pattern / alpha_pattern scale differs from the file's
//! has its B multiplied by the ratio. DoRA has no llama.cpp form: refused.

use super::arch::{self, Change, Hparams};
use super::convert::{OutType, converter_type};
use super::file::{GgufWriter, TensorInfo};
use super::types::{GgmlType, Kvs, Value};
use super::{metadata, quants};
use crate::adapter::peft;
use crate::backend::to_f32;
use crate::model::st_files::float_dtype;
use anyhow::{Context, Result, bail};
use safetensors::SafeTensors;
use std::path::Path;

const PREFIX: &str = "base_model.model.";

pub struct LoraSummary {
    pub pairs: usize,
    pub alpha: f32,
    pub bytes: u64,
    /// Why the scale was folded, when it was (rsLoRA, patterns).
    pub folded: Option<String>,
}

/// Write the adapter in `adapter_dir` (for the base model in `model_dir`) to `out`.
pub fn convert_lora(model_dir: &Path, adapter_dir: &Path, out: &Path, outtype: OutType) -> Result<LoraSummary> {
    let hp = Hparams::load(model_dir)?;
    let lc = peft::read_config(adapter_dir)?;
    let cfg_path = adapter_dir.join("adapter_config.json");
    let raw: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).with_context(|| format!("cannot read {}", cfg_path.display()))?)
        .with_context(|| format!("{} is not valid JSON", cfg_path.display()))?;
    if raw.get("use_dora").and_then(|v| v.as_bool()) == Some(true) {
        bail!("{}: use_dora is true; llama.cpp's LoRA GGUF has no DoRA magnitudes (merge the adapter and export the merged model instead)", cfg_path.display());
    }
    let file = adapter_dir.join(peft::WEIGHTS_FILE);
    let bytes = std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| anyhow::anyhow!("{} is not a valid safetensors file: {e}", file.display()))?;
    let mut names: Vec<&str> = st.names();
    names.sort();

    // The file's alpha: llama.cpp divides by each pair's rank.
    let alpha = if lc.use_rslora { lc.alpha * (lc.r as f32).sqrt() } else { lc.alpha };
    let mut folded = lc.use_rslora.then(|| format!("rsLoRA: alpha written as {} · √{} = {alpha}", lc.alpha, lc.r));
    let cfg = crate::model::checkpoint::read_config(model_dir).ok();
    let fdisp = file.display();
    let mut pairs = Vec::new();
    for ka in names.iter().filter(|n| n.ends_with(".lora_A.weight")) {
        let module = ka.strip_prefix(PREFIX).and_then(|k| k.strip_suffix(".lora_A.weight")).with_context(|| format!("{fdisp}: tensor {ka}: expected {PREFIX}<module>.lora_A.weight"))?;
        let kb = format!("{PREFIX}{module}.lora_B.weight");
        let (ta, tb) = (st.tensor(ka).map_err(|e| anyhow::anyhow!("{fdisp}: {ka}: {e}"))?, st.tensor(&kb).map_err(|_| anyhow::anyhow!("{fdisp}: {ka} is present but {kb} is missing"))?);
        let ckpt_module = cfg.as_ref().map_or_else(|| module.to_string(), |c| crate::model::checkpoint_module(c, module));
        let base = format!("{ckpt_module}.weight");
        let Some((gguf, change)) = arch::map_tensor(&hp, &base)? else {
            bail!("{fdisp}: {ka} adapts {base}, which llama.cpp's {} model does not have (an adapter on lm_head of a tied model cannot be exported)", hp.arch.name());
        };
        let (r, scale) = lc.rank_and_scale(module)?;
        let (sa, sb) = (ta.shape().to_vec(), tb.shape().to_vec());
        if sa.len() != 2 || sb.len() != 2 || sa[0] != r || sb[1] != r {
            bail!("{fdisp}: {ka} {sa:?} / {kb} {sb:?} do not form a rank-{r} pair");
        }
        let f = |k: &str, t: &safetensors::tensor::TensorView| -> Result<Vec<f32>> {
            let d = float_dtype(t.dtype()).with_context(|| format!("{fdisp}: tensor {k} has dtype {:?}; expected F32, F16 or BF16", t.dtype()))?;
            Ok(to_f32(d, t.data()))
        };
        let a = f(ka, &ta)?;
        let mut b = f(&kb, &tb)?;
        // What llama.cpp will apply is alpha / r; the adapter wants `scale`.
        let ratio = scale / (alpha / r as f32);
        if (ratio - 1.0).abs() > 1e-6 {
            b.iter_mut().for_each(|x| *x *= ratio);
            folded.get_or_insert_with(|| "rank_pattern / alpha_pattern: per-module scales folded into lora_b".to_string());
        }
        if let Change::Permute { n_head } = change {
            b = arch::permute_rows(&b, sb[0], n_head)?;
        }
        if gguf == "token_embd.weight" {
            bail!("{fdisp}: {ka}: an adapter on the embeddings is not exported to a LoRA GGUF");
        }
        pairs.push((gguf, a, sa, b, sb, ta.dtype()));
    }
    if pairs.is_empty() {
        bail!("{fdisp}: no LoRA tensors found");
    }
    let file_type = match outtype {
        OutType::F32 => GgmlType::F32,
        OutType::F16 => GgmlType::F16,
        OutType::BF16 => GgmlType::BF16,
        OutType::Q8_0 => GgmlType::Q8_0,
        OutType::Auto => match pairs.iter().find_map(|p| float_dtype(p.5).filter(|d| *d != crate::backend::DType::F32)) {
            Some(crate::backend::DType::BF16) => GgmlType::BF16,
            _ => GgmlType::F16,
        },
        OutType::K(_) => bail!("--lora-only writes f32, f16, bf16, q8_0 or auto (llama.cpp's LoRA converter has no k-quants)"),
    };
    let mut infos = Vec::new();
    let mut data = Vec::new();
    for (gguf, a, sa, b, sb, _) in pairs.iter() {
        for (suffix, v, shape) in [("lora_a", a, sa), ("lora_b", b, sb)] {
            let name = format!("{gguf}.{suffix}");
            let ne = vec![shape[1] as u64, shape[0] as u64];
            let ty = converter_type(&name, &ne, file_type);
            data.push(quants::quantize(ty, v, shape[1]));
            infos.push(TensorInfo { name, ne, ty });
        }
    }
    let mut kvs = Kvs::default();
    kvs.set("general.architecture", Value::Str(hp.arch.name().into()));
    kvs.set("general.type", Value::Str("adapter".into()));
    kvs.set("adapter.type", Value::Str("lora".into()));
    let named: Vec<(&str, &[u64])> = infos.iter().map(|t| (t.name.as_str(), t.ne.as_slice())).collect();
    kvs.extend(metadata::general(adapter_dir, &named, true)?);
    kvs.set("adapter.lora.alpha", Value::F32(alpha));
    kvs.set("general.quantization_version", Value::U32(2));
    let mut w = GgufWriter::create(out, &kvs, infos)?;
    for d in &data {
        w.write_tensor(d)?;
    }
    let bytes = w.finish()?;
    Ok(LoraSummary { pairs: pairs.len(), alpha, bytes, folded })
}
