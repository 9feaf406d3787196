//! The `trl:` section of an `rl: grpo` run: TRL's GRPOConfig names, read
//! into [`GrpoSettings`] with TRL 1.16's defaults for every absent key
//! (docs/grpo.md lists them). `trl.beta` is folded into rl_beta when the
//! file loads, so β comes from there (GRPO's default is 0: no reference
//! pass). Keys that only configure vLLM are accepted with a note: sampling
//! is built in. Any other key is refused, naming the ones accepted.

use serde_json::{Map, Value};

/// GRPO's `loss_type`: how the per-token losses of a micro-batch are
/// normalised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrpoLoss {
    /// Σ over the micro-batch ÷ the mask tokens of the whole generation batch (TRL's default).
    Dapo,
    /// Each sequence's mean over its tokens, then the mean over sequences (÷ GA).
    Grpo,
    /// Σ over the micro-batch ÷ its mask tokens (÷ GA).
    Bnpo,
    /// Σ over the micro-batch ÷ (sequences × max_completion_length) (÷ GA).
    DrGrpo,
}

/// `scale_rewards`: what the advantages are divided by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleRewards {
    /// The group's standard deviation (+ 1e-4).
    Group,
    /// The standard deviation of the whole generation batch (+ 1e-4).
    Batch,
    /// Nothing: advantages are rewards minus the group mean.
    None,
}

/// GRPO's settings (TRL 1.16 GRPOConfig).
#[derive(Debug, Clone, PartialEq)]
pub struct GrpoSettings {
    pub beta: f64,
    pub num_generations: usize,
    pub max_completion_length: usize,
    pub temperature: f64,
    pub top_p: f64,
    /// 0 = off.
    pub top_k: usize,
    pub min_p: Option<f64>,
    pub loss_type: GrpoLoss,
    pub epsilon: f64,
    /// None: epsilon.
    pub epsilon_high: Option<f64>,
    pub delta: Option<f64>,
    pub scale_rewards: ScaleRewards,
    pub reward_funcs: Vec<String>,
    /// One per reward function; None: all 1.
    pub reward_weights: Option<Vec<f64>>,
    pub num_iterations: usize,
    pub mask_truncated_completions: bool,
    pub log_completions: bool,
    /// Multiply the KL term by the importance ratio (TRL's default true).
    pub use_bias_correction_kl: bool,
    /// `rl: rloo`: RLOO's advantages and sequence-level loss on GRPO's
    /// sampler (`super::rloo` reads it); None for GRPO.
    pub rloo: Option<RlooOptions>,
}

/// What RLOO (TRL 1.16 RLOOConfig) adds to the shared settings.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RlooOptions {
    /// (A − mean) / (std + 1e-4) over the generation batch.
    pub normalize_advantages: bool,
    /// Rewards clamped to [min, max] before the KL penalty.
    pub reward_clip_range: Option<(f64, f64)>,
}

impl Default for GrpoSettings {
    /// TRL 1.16's GRPOConfig defaults (reward_funcs has none).
    fn default() -> Self {
        GrpoSettings {
            beta: 0.0,
            num_generations: 8,
            max_completion_length: 512,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: None,
            loss_type: GrpoLoss::Dapo,
            epsilon: 0.2,
            epsilon_high: None,
            delta: None,
            scale_rewards: ScaleRewards::Group,
            reward_funcs: Vec::new(),
            reward_weights: None,
            num_iterations: 1,
            mask_truncated_completions: false,
            log_completions: false,
            use_bias_correction_kl: true,
            rloo: None,
        }
    }
}

impl GrpoSettings {
    /// The upper clip: epsilon_high, else epsilon.
    pub fn eps_high(&self) -> f64 {
        self.epsilon_high.unwrap_or(self.epsilon)
    }

    /// The weight of each reward function.
    pub fn weights(&self) -> Vec<f64> {
        self.reward_weights.clone().unwrap_or_else(|| vec![1.0; self.reward_funcs.len()])
    }
}

/// The keys read from `trl:`.
pub const GRPO_KEYS: &[&str] = &[
    "beta",
    "num_generations",
    "max_completion_length",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "loss_type",
    "epsilon",
    "epsilon_high",
    "delta",
    "scale_rewards",
    "reward_funcs",
    "reward_weights",
    "num_iterations",
    "mask_truncated_completions",
    "log_completions",
    "use_bias_correction_kl",
];

/// Keys that only configure vLLM: accepted with a note.
pub fn is_vllm_key(key: &str) -> bool {
    key == "use_vllm" || key.starts_with("vllm_")
}

/// A failed read: the key (under `trl.`) and what is wrong with it.
pub type KeyError = (String, String);

fn err(key: &str, msg: impl Into<String>) -> KeyError {
    (format!("trl.{key}"), msg.into())
}

fn number(v: &Value, key: &str) -> Result<f64, KeyError> {
    v.as_f64().filter(|x| x.is_finite()).ok_or_else(|| err(key, format!("must be a number, not {v}")))
}

fn count(v: &Value, key: &str, min: u64) -> Result<usize, KeyError> {
    match v.as_u64() {
        Some(n) if n >= min => Ok(n as usize),
        _ => Err(err(key, format!("must be a whole number >= {min}, not {v}"))),
    }
}

fn flag(v: &Value, key: &str) -> Result<bool, KeyError> {
    v.as_bool().ok_or_else(|| err(key, format!("must be true or false, not {v}")))
}

/// Read `trl:` (None when absent) with β from rl_beta. Returns the settings
/// and notes to print (vLLM keys).
pub fn read(trl: Option<&Map<String, Value>>, rl_beta: Option<f64>) -> Result<(GrpoSettings, Vec<String>), KeyError> {
    let mut s = GrpoSettings::default();
    let mut notes = Vec::new();
    if let Some(b) = rl_beta {
        if !(b.is_finite() && b >= 0.0) {
            return Err(("rl_beta".into(), format!("(GRPO's KL coefficient beta) must be >= 0, not {b}")));
        }
        s.beta = b;
    }
    let empty = Map::new();
    for (key, v) in trl.unwrap_or(&empty) {
        if v.is_null() {
            continue;
        }
        let k = key.as_str();
        match k {
            "num_generations" => s.num_generations = count(v, k, 2)?,
            "max_completion_length" => s.max_completion_length = count(v, k, 1)?,
            "temperature" => {
                s.temperature = number(v, k)?;
                if s.temperature <= 0.0 {
                    return Err(err(k, format!("must be > 0 (log-probs are taken of logits / temperature), not {}", s.temperature)));
                }
            }
            "top_p" => {
                s.top_p = number(v, k)?;
                if !(s.top_p > 0.0 && s.top_p <= 1.0) {
                    return Err(err(k, format!("must be in (0, 1], not {}", s.top_p)));
                }
            }
            "top_k" => s.top_k = count(v, k, 0)?,
            "min_p" => {
                let p = number(v, k)?;
                if !(0.0..=1.0).contains(&p) {
                    return Err(err(k, format!("must be in [0, 1], not {p}")));
                }
                s.min_p = Some(p);
            }
            "loss_type" => {
                s.loss_type = match v.as_str() {
                    Some("dapo") => GrpoLoss::Dapo,
                    Some("grpo") => GrpoLoss::Grpo,
                    Some("bnpo") => GrpoLoss::Bnpo,
                    Some("dr_grpo") => GrpoLoss::DrGrpo,
                    _ => return Err(err(k, format!("must be dapo, grpo, bnpo or dr_grpo, not {v}"))),
                }
            }
            "epsilon" | "epsilon_high" | "delta" => {
                let x = number(v, k)?;
                if x <= 0.0 {
                    return Err(err(k, format!("must be > 0, not {x}")));
                }
                match k {
                    "epsilon" => s.epsilon = x,
                    "epsilon_high" => s.epsilon_high = Some(x),
                    _ => s.delta = Some(x),
                }
            }
            "scale_rewards" => {
                s.scale_rewards = match v {
                    Value::String(t) if t == "group" => ScaleRewards::Group,
                    Value::String(t) if t == "batch" => ScaleRewards::Batch,
                    Value::String(t) if t == "none" => ScaleRewards::None,
                    // TRL's older boolean spelling.
                    Value::Bool(true) => ScaleRewards::Group,
                    Value::Bool(false) => ScaleRewards::None,
                    _ => return Err(err(k, format!("must be group, batch or none, not {v}"))),
                }
            }
            "reward_funcs" => {
                let list = match v {
                    Value::String(one) => vec![one.clone()],
                    Value::Array(a) => a
                        .iter()
                        .map(|x| x.as_str().map(str::to_string))
                        .collect::<Option<Vec<_>>>()
                        .ok_or_else(|| err(k, "must list reward functions by name (module.function, or builtin:NAME)"))?,
                    _ => return Err(err(k, format!("must be a list of reward function names, not {v}"))),
                };
                s.reward_funcs = list;
            }
            "reward_weights" => {
                let a = v.as_array().ok_or_else(|| err(k, format!("must be a list of numbers, not {v}")))?;
                s.reward_weights = Some(a.iter().map(|x| number(x, k)).collect::<Result<_, _>>()?);
            }
            "num_iterations" => s.num_iterations = count(v, k, 1)?,
            "mask_truncated_completions" => s.mask_truncated_completions = flag(v, k)?,
            "log_completions" => s.log_completions = flag(v, k)?,
            "use_bias_correction_kl" => s.use_bias_correction_kl = flag(v, k)?,
            _ if is_vllm_key(k) => notes.push(format!("trl.{k} is not used: sampling is built in (one process, one copy of the weights)")),
            _ => {
                return Err(err(
                    k,
                    format!("is not a GRPO setting ferrotune reads; the trl: keys of rl: grpo are {}, and vLLM's (ignored)", GRPO_KEYS.join(", ")),
                ));
            }
        }
    }
    if s.reward_funcs.is_empty() {
        return Err(err(
            "reward_funcs",
            "is required for rl: grpo: list the reward functions (module.function of a Python file beside the config, or builtin:answer_match, builtin:format:REGEX, builtin:length:N)",
        ));
    }
    if let Some(w) = &s.reward_weights
        && w.len() != s.reward_funcs.len()
    {
        return Err(err("reward_weights", format!("has {} weights for {} reward functions (one each)", w.len(), s.reward_funcs.len())));
    }
    Ok((s, notes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn absent_keys_take_trl_defaults() {
        let (s, notes) = read(Some(&map(json!({"reward_funcs": ["r.f"]}))), None).unwrap();
        assert_eq!(s, GrpoSettings { reward_funcs: vec!["r.f".into()], ..GrpoSettings::default() });
        assert!(notes.is_empty());
        assert_eq!(s.eps_high(), 0.2);
    }

    #[test]
    fn values_are_read_and_vllm_keys_noted() {
        let t = map(json!({"reward_funcs": ["a.b", "builtin:length:10"], "reward_weights": [1.0, 0.5], "num_generations": 4,
            "loss_type": "dr_grpo", "scale_rewards": "batch", "epsilon_high": 0.28, "use_vllm": true, "vllm_server_port": 8000}));
        let (s, notes) = read(Some(&t), Some(0.04)).unwrap();
        assert_eq!((s.num_generations, s.loss_type, s.scale_rewards, s.beta), (4, GrpoLoss::DrGrpo, ScaleRewards::Batch, 0.04));
        assert_eq!(s.weights(), vec![1.0, 0.5]);
        assert_eq!(s.eps_high(), 0.28);
        assert_eq!(notes.len(), 2);
    }

    #[test]
    fn bad_values_name_the_key() {
        let bad = |v: Value, key: &str, needle: &str| {
            let (k, msg) = read(Some(&map(v)), None).unwrap_err();
            assert_eq!(k, key);
            assert!(msg.contains(needle), "{msg}");
        };
        bad(json!({}), "trl.reward_funcs", "is required");
        bad(json!({"reward_funcs": ["a.b"], "num_generations": 1}), "trl.num_generations", ">= 2");
        bad(json!({"reward_funcs": ["a.b"], "loss_type": "ppo"}), "trl.loss_type", "dapo, grpo, bnpo or dr_grpo");
        bad(json!({"reward_funcs": ["a.b"], "reward_weights": [1, 2]}), "trl.reward_weights", "2 weights for 1");
        bad(json!({"reward_funcs": ["a.b"], "temperature": 0}), "trl.temperature", "> 0");
        bad(json!({"reward_funcs": ["a.b"], "sync_ref_model": true}), "trl.sync_ref_model", "is not a GRPO setting");
    }
}
