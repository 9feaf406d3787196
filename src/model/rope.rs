//! Rotary embeddings as config.json declares them: the base, the scaling
//! (linear, Llama 3, long-rope), the rotated fraction of each head, and,
//! for models whose sliding-window layers use another base (Gemma 3), one
//! table per layer type. Both config.json layouts are read: transformers 5's
//! `rope_parameters` (one object, or one per layer type) and the older
//! top-level rope_theta / rope_scaling / partial_rotary_factor.

use crate::registry::Family;
use anyhow::{Context, Result, bail};
use serde_json::Value;

/// How rotary frequencies are derived from the base ones.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// inv_freq / factor.
    Linear { factor: f32 },
    /// Llama 3.1 / 3.2 frequency-dependent scaling.
    Llama3 { factor: f32, low_freq_factor: f32, high_freq_factor: f32, original_max_position_embeddings: f32 },
    /// Phi-3's long-rope: inv_freq / short_factor[i] up to the original
    /// context, / long_factor[i] past it (chosen per forward from its
    /// largest position), with cos and sin times `attention_factor`.
    LongRope { short_factor: Vec<f32>, long_factor: Vec<f32>, original_max_position_embeddings: usize, attention_factor: f32 },
    /// Gemma 4's "proportional" rope: the first `pairs` frequencies as
    /// usual over the whole head, the rest 0 (those pairs do not turn),
    /// all divided by `factor`.
    Proportional { pairs: usize, factor: f32 },
}

/// One rotary table: its base and scaling.
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    pub theta: f32,
    pub scaling: RopeScaling,
}

impl Rope {
    /// Inverse frequencies for `rot_dim` rotated dims (rot_dim/2 of them),
    /// in f32 in transformers' order of operations; `long` picks long-rope's
    /// long-context factors.
    pub fn inv_freq(&self, rot_dim: usize, long: bool) -> Vec<f32> {
        let d = rot_dim;
        let exps: Vec<f32> = (0..d / 2).map(|i| (2 * i) as f32 / d as f32).collect();
        let base: Vec<f32> = exps.iter().map(|&e| 1.0f32 / self.theta.powf(e)).collect();
        match &self.scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::Proportional { pairs, factor } => base.iter().enumerate().map(|(i, &f)| if i < *pairs { f / factor } else { 0.0 }).collect(),
            RopeScaling::LongRope { short_factor, long_factor, .. } => {
                let ext = if long { long_factor } else { short_factor };
                exps.iter().zip(ext).map(|(&e, &x)| 1.0f32 / (x * self.theta.powf(e))).collect()
            }
            &RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings: old_ctx } => {
                let low_freq_wavelen = old_ctx / low_freq_factor;
                let high_freq_wavelen = old_ctx / high_freq_factor;
                base.iter()
                    .map(|&inv| {
                        let wavelen = 2.0 * std::f32::consts::PI / inv;
                        let scaled = if wavelen > low_freq_wavelen { inv / factor } else { inv };
                        let medium = (high_freq_wavelen..=low_freq_wavelen).contains(&wavelen);
                        if medium {
                            let smooth = (old_ctx / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * scaled / factor + smooth * scaled
                        } else {
                            scaled
                        }
                    })
                    .collect()
            }
        }
    }

    /// The multiplier of cos and sin (long-rope's attention factor, else 1).
    pub fn mscale(&self) -> f32 {
        match self.scaling {
            RopeScaling::LongRope { attention_factor, .. } => attention_factor,
            _ => 1.0,
        }
    }

    /// For long-rope, the context length past which the long factors apply.
    pub fn long_context(&self) -> Option<usize> {
        match self.scaling {
            RopeScaling::LongRope { original_max_position_embeddings, .. } => Some(original_max_position_embeddings),
            _ => None,
        }
    }
}

/// The rope settings of one config.json.
pub struct RopeConfig {
    /// [global] or [global, local]: the tables the layers index.
    pub ropes: Vec<Rope>,
    /// Rotated leading dims of each head.
    pub rot_dim: usize,
}

fn num(obj: &Value, key: &str, file: &str) -> Result<Option<f64>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x.as_f64().map(Some).with_context(|| format!("{file}: \"{key}\" must be a number, found {x}")),
    }
}

fn factors(obj: &Value, key: &str, want: usize, file: &str) -> Result<Vec<f32>> {
    let arr = obj
        .get(key)
        .and_then(|v| v.as_array())
        .with_context(|| format!("{file}: rope scaling \"longrope\" needs \"{key}\", a list of numbers"))?;
    let v: Vec<f32> = arr
        .iter()
        .map(|x| x.as_f64().map(|f| f as f32).with_context(|| format!("{file}: \"{key}\" holds {x}, expected numbers")))
        .collect::<Result<_>>()?;
    if v.len() != want {
        bail!("{file}: \"{key}\" has {} entries; the {} rotated dims of each head need {want}", v.len(), 2 * want);
    }
    Ok(v)
}

/// Read the rope of config.json `raw` (of a model with `head_dim`).
pub fn parse(raw: &Value, family: &Family, head_dim: usize, file: &str) -> Result<RopeConfig> {
    let params = raw.get("rope_parameters").filter(|v| v.is_object());
    // transformers 5 keeps one object per layer type when they differ.
    let per_type = params.filter(|p| p.get("full_attention").is_some_and(Value::is_object));
    let global_params = per_type.and_then(|p| p.get("full_attention")).or(params);

    let partial = num(global_params.unwrap_or(raw), "partial_rotary_factor", file)?
        .or(num(raw, "partial_rotary_factor", file)?)
        .unwrap_or(1.0);
    if !(partial > 0.0 && partial <= 1.0) {
        bail!("{file}: \"partial_rotary_factor\" is {partial}; it must be in (0, 1]");
    }
    // transformers truncates head_dim · factor to an integer.
    let rot_dim = (head_dim as f64 * partial) as usize;
    if rot_dim == 0 || !rot_dim.is_multiple_of(2) {
        bail!("{file}: partial_rotary_factor {partial} rotates {rot_dim} of head_dim {head_dim} dims; rotary embeddings need a positive even number");
    }

    let scaling_obj = raw.get("rope_scaling").filter(|v| !v.is_null());
    let global = parse_one(raw, family, global_params, scaling_obj, rot_dim, file)?;
    let mut ropes = vec![global];
    if let Some(key) = &family.config_keys.local_rope_theta {
        let local = match per_type.and_then(|p| p.get("sliding_attention")) {
            Some(p) => parse_one(raw, family, Some(p), None, rot_dim, file)?,
            None => {
                let theta = num(raw, key, file)?.with_context(|| format!("{file}: required key \"{key}\" is missing"))?;
                Rope { theta: positive_theta(theta, key, file)?, scaling: RopeScaling::None }
            }
        };
        ropes.push(local);
    }
    Ok(RopeConfig { ropes, rot_dim })
}

fn positive_theta(theta: f64, key: &str, file: &str) -> Result<f32> {
    let t = theta as f32;
    if !(t.is_finite() && t > 0.0) {
        bail!("{file}: \"{key}\" is {theta}; the rotary base must be a positive number (10000 or 500000 are usual)");
    }
    Ok(t)
}

/// One table from a rope_parameters object (`params`) or the older
/// top-level keys (`rope_theta`, `rope_scaling` = `scaling_obj`).
fn parse_one(raw: &Value, family: &Family, params: Option<&Value>, scaling_obj: Option<&Value>, rot_dim: usize, file: &str) -> Result<Rope> {
    let theta = match params {
        Some(p) => num(p, "rope_theta", file)?,
        None => None,
    }
    .or(num(raw, "rope_theta", file)?)
    .unwrap_or(10000.0);
    let theta = positive_theta(theta, "rope_theta", file)?;
    let scaling = match scaling_obj.or(params) {
        None => RopeScaling::None,
        Some(p) => {
            let kind = p.get("rope_type").or_else(|| p.get("type")).and_then(|v| v.as_str()).unwrap_or("default");
            // Phi-3's older configs call long-rope "su" (transformers reads it as longrope).
            let kind = if kind == "su" { "longrope" } else { kind };
            if !family.rope_scaling.iter().any(|k| k == kind) {
                bail!(
                    "{file}: rope scaling \"{kind}\" is not supported for {} models (supported: {})",
                    family.family,
                    family.rope_scaling.join(", ")
                );
            }
            let need = |key: &str| -> Result<f32> {
                Ok(num(p, key, file)?.with_context(|| format!("{file}: rope scaling \"{kind}\" needs \"{key}\""))? as f32)
            };
            match kind {
                "default" => RopeScaling::None,
                "linear" => RopeScaling::Linear { factor: need("factor")? },
                "llama3" => RopeScaling::Llama3 {
                    factor: need("factor")?,
                    low_freq_factor: need("low_freq_factor")?,
                    high_freq_factor: need("high_freq_factor")?,
                    original_max_position_embeddings: need("original_max_position_embeddings")?,
                },
                "longrope" => {
                    let max_pos = num(raw, "max_position_embeddings", file)?;
                    // The top-level value wins, as transformers reads it.
                    let original = num(raw, "original_max_position_embeddings", file)?
                        .or(num(p, "original_max_position_embeddings", file)?)
                        .or(max_pos)
                        .with_context(|| format!("{file}: rope scaling \"longrope\" needs \"original_max_position_embeddings\""))?;
                    if original < 1.0 {
                        bail!("{file}: \"original_max_position_embeddings\" is {original}; it must be at least 1");
                    }
                    // Without an explicit factor, transformers takes the
                    // context extension max_position_embeddings / original.
                    let factor = num(p, "factor", file)?.or(max_pos.map(|m| m / original)).unwrap_or(1.0);
                    let attention_factor = match num(p, "attention_factor", file)? {
                        Some(a) => a,
                        None if factor <= 1.0 => 1.0,
                        None => (1.0 + factor.ln() / original.ln()).sqrt(),
                    } as f32;
                    RopeScaling::LongRope {
                        short_factor: factors(p, "short_factor", rot_dim / 2, file)?,
                        long_factor: factors(p, "long_factor", rot_dim / 2, file)?,
                        original_max_position_embeddings: original as usize,
                        attention_factor,
                    }
                }
                other => bail!("{file}: rope scaling \"{other}\" is not implemented"),
            }
        }
    };
    Ok(Rope { theta, scaling })
}
