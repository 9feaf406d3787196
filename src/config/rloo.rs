//! The `trl:` section of an `rl: rloo` run: TRL 1.16's RLOOConfig names.
//! RLOO samples and scores exactly as GRPO does, so the shared keys are
//! read by `super::grpo::read` into the same [`GrpoSettings`]; this file
//! adds RLOO's defaults (beta 0.05, num_generations 2), its two own keys,
//! and refuses GRPO-only keys (loss_type, scale_rewards, delta,
//! use_bias_correction_kl), which RLOOConfig does not have.

use super::grpo::{GrpoSettings, KeyError, RlooOptions, is_vllm_key, read as read_shared};
use serde_json::{Map, Value};

/// RLOOConfig's default beta (GRPO's is 0).
pub const DEFAULT_BETA: f64 = 0.05;

/// The keys read from `trl:` for rl: rloo.
pub const RLOO_KEYS: &[&str] = &[
    "beta",
    "num_generations",
    "max_completion_length",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "epsilon",
    "epsilon_high",
    "normalize_advantages",
    "reward_clip_range",
    "reward_funcs",
    "reward_weights",
    "num_iterations",
    "mask_truncated_completions",
    "log_completions",
];

fn err(key: &str, msg: impl Into<String>) -> KeyError {
    (format!("trl.{key}"), msg.into())
}

/// Read `trl:` (None when absent) with β from rl_beta (RLOO's 0.05 when
/// unset). Returns the settings and notes to print (vLLM keys).
pub fn read(trl: Option<&Map<String, Value>>, rl_beta: Option<f64>) -> Result<(GrpoSettings, Vec<String>), KeyError> {
    let mut shared = Map::new();
    let mut opts = RlooOptions::default();
    let mut num_generations_set = false;
    for (key, v) in trl.into_iter().flatten() {
        let k = key.as_str();
        match k {
            _ if v.is_null() => {}
            "normalize_advantages" => opts.normalize_advantages = v.as_bool().ok_or_else(|| err(k, format!("must be true or false, not {v}")))?,
            "reward_clip_range" => {
                let pair = v
                    .as_array()
                    .filter(|a| a.len() == 2)
                    .and_then(|a| Some((a[0].as_f64()?, a[1].as_f64()?)))
                    .filter(|(lo, hi)| lo.is_finite() && hi.is_finite() && lo <= hi)
                    .ok_or_else(|| err(k, format!("must be [min, max] with min <= max, not {v}")))?;
                opts.reward_clip_range = Some(pair);
            }
            _ if RLOO_KEYS.contains(&k) || is_vllm_key(k) => {
                num_generations_set |= k == "num_generations";
                shared.insert(key.clone(), v.clone());
            }
            _ => {
                return Err(err(
                    k,
                    format!("is not an RLOO setting ferrotune reads; the trl: keys of rl: rloo are {}, and vLLM's (ignored)", RLOO_KEYS.join(", ")),
                ));
            }
        }
    }
    if !num_generations_set {
        shared.insert("num_generations".into(), Value::from(2u64));
    }
    let (mut s, notes) = read_shared(Some(&shared), Some(rl_beta.unwrap_or(DEFAULT_BETA))).map_err(|(k, m)| (k, m.replace("rl: grpo", "rl: rloo")))?;
    s.rloo = Some(opts);
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
    fn defaults_are_rloo_configs() {
        let (s, _) = read(Some(&map(json!({"reward_funcs": ["r.f"]}))), None).unwrap();
        assert_eq!((s.beta, s.num_generations, s.epsilon, s.eps_high()), (0.05, 2, 0.2, 0.2));
        assert_eq!(s.rloo, Some(RlooOptions { normalize_advantages: false, reward_clip_range: None }));
    }

    #[test]
    fn own_keys_are_read_and_grpo_keys_refused() {
        let t = map(json!({"reward_funcs": ["r.f"], "normalize_advantages": true, "reward_clip_range": [-1, 2], "num_generations": 4}));
        let (s, _) = read(Some(&t), Some(0.0)).unwrap();
        assert_eq!((s.beta, s.num_generations), (0.0, 4));
        assert_eq!(s.rloo, Some(RlooOptions { normalize_advantages: true, reward_clip_range: Some((-1.0, 2.0)) }));
        let (k, m) = read(Some(&map(json!({"reward_funcs": ["r.f"], "loss_type": "dapo"}))), None).unwrap_err();
        assert_eq!(k, "trl.loss_type");
        assert!(m.contains("rl: rloo"), "{m}");
        let (k, _) = read(Some(&map(json!({"reward_funcs": ["r.f"], "reward_clip_range": [2, 1]}))), None).unwrap_err();
        assert_eq!(k, "trl.reward_clip_range");
        let (k, m) = read(None, None).unwrap_err();
        assert!(k == "trl.reward_funcs" && m.contains("rl: rloo"), "{k} {m}");
    }
}
