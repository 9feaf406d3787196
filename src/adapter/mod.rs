//! LoRA adapters: configuration, parameters (f32 master copies, the only
//! trainable tensors), PEFT-compatible initialisation, PEFT-format
//! save/load (see `peft`), and the merge of an adapter into its base
//! checkpoint (see `merge`).
//!
//! A new way to write out a checkpoint (as `merge` here and
//! `quant::convert` do) is a module of its own that streams through
//! `model::st_files` (sharding, index, side files, output directory).

pub mod merge;
pub mod peft;

use crate::backend::Backend;
use crate::config::RunConfig;
use crate::util::rng::Rng;
use anyhow::{Context, Result, bail};
use regex::Regex;
use std::collections::BTreeMap;

pub use crate::config::Targets;

#[derive(Debug, Clone)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f32,
    pub dropout: f32,
    pub targets: Targets,
    pub use_rslora: bool,
    /// Per-module overrides, keyed by a pattern matched as PEFT does:
    /// `(.*\.)?(pattern)$` against the module path.
    pub rank_pattern: BTreeMap<String, usize>,
    pub alpha_pattern: BTreeMap<String, f32>,
    pub base_model_name_or_path: Option<String>,
}

impl LoraConfig {
    pub fn new(r: usize, alpha: f32, targets: Targets) -> LoraConfig {
        LoraConfig {
            r,
            alpha,
            dropout: 0.0,
            targets,
            use_rslora: false,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            base_model_name_or_path: None,
        }
    }

    fn pattern_value<T: Copy>(patterns: &BTreeMap<String, T>, module_path: &str) -> Result<Option<T>> {
        for (pat, v) in patterns {
            let re = Regex::new(&format!("^(.*\\.)?(?:{pat})$"))
                .with_context(|| format!("rank/alpha pattern \"{pat}\" is not a valid regex"))?;
            if re.is_match(module_path) {
                return Ok(Some(*v));
            }
        }
        Ok(None)
    }

    /// Rank and scaling for one module, honouring rank_pattern / alpha_pattern.
    pub fn rank_and_scale(&self, module_path: &str) -> Result<(usize, f32)> {
        let r = Self::pattern_value(&self.rank_pattern, module_path)?.unwrap_or(self.r);
        let alpha = Self::pattern_value(&self.alpha_pattern, module_path)?.unwrap_or(self.alpha);
        if r == 0 {
            bail!("LoRA rank for {module_path} is 0; it must be at least 1");
        }
        let scale = if self.use_rslora { alpha / (r as f32).sqrt() } else { alpha / r as f32 };
        Ok((r, scale))
    }
}

impl RunConfig {
    /// The adapter this run trains (PEFT's adapter_config.json fields).
    /// Defined with `LoraConfig` rather than in `config`, which sits below
    /// the adapter and does not know its types.
    pub fn lora_config(&self) -> Result<LoraConfig> {
        let mut cfg = LoraConfig::new(self.lora_r, self.lora_alpha, self.targets()?);
        cfg.dropout = self.lora_dropout;
        cfg.use_rslora = self.peft_use_rslora;
        cfg.base_model_name_or_path = Some(self.base_model.clone());
        Ok(cfg)
    }
}

/// One adapted linear layer: y = base(x) + scale · B(A(dropout(x))).
pub struct Lora<B: Backend> {
    /// [r, in]
    pub a: B::Buf,
    /// [out, r]
    pub b: B::Buf,
    pub grad_a: B::Buf,
    pub grad_b: B::Buf,
    pub r: usize,
    pub scale: f32,
    pub dropout: f32,
}

impl<B: Backend> Lora<B> {
    /// PEFT's default init: A ~ kaiming_uniform(a=√5) = U(−1/√in, 1/√in), B = 0.
    pub fn init(be: &B, r: usize, in_f: usize, out_f: usize, scale: f32, dropout: f32, rng: &mut Rng) -> Lora<B> {
        let bound = 1.0 / (in_f as f32).sqrt();
        let a: Vec<f32> = (0..r * in_f).map(|_| rng.uniform_range(-bound, bound)).collect();
        Self::from_host(be, &a, &vec![0.0; out_f * r], r, scale, dropout)
    }

    pub fn from_host(be: &B, a: &[f32], b: &[f32], r: usize, scale: f32, dropout: f32) -> Lora<B> {
        Lora {
            grad_a: be.zeros_f32(a.len()),
            grad_b: be.zeros_f32(b.len()),
            a: be.upload(a),
            b: be.upload(b),
            r,
            scale,
            dropout,
        }
    }

    pub fn zero_grad(&mut self, be: &B) {
        be.fill(&mut self.grad_a, 0.0);
        be.fill(&mut self.grad_b, 0.0);
    }
}
