//! One generation batch of GRPO: each prompt sampled num_generations times
//! by the model being trained (its adapter on, no dropout), the completions
//! cut after the first EOS, decoded, scored by the reward functions, turned
//! into advantages, logged (TRL's metrics, and completions.jsonl when
//! log_completions is set).

use super::loss::{Advantages, advantages, nanmean, nanstd};
use crate::backend::Backend;
use crate::config::grpo::GrpoSettings;
use crate::data::prompts::PromptRow;
use crate::data::tokenizer::TextTokenizer;
use crate::model::Model;
use crate::model::generate::StopReason;
use crate::model::generate_batch::BatchOpts;
use crate::model::sample::SamplingParams;
use crate::train::objectives::Metrics;
use crate::train::rewards::{RewardFuncs, Scored};
use anyhow::{Context, Result};
use serde_json::{Value, json};
use std::io::Write;
use std::path::Path;

/// One sampled completion.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Index of its prompt in the run's prompts.
    pub prompt: usize,
    pub completion: Vec<u32>,
    /// Completion tokens the loss covers: all of them (up to and including
    /// the EOS), or none for a truncated one under mask_truncated_completions.
    pub mask: usize,
    pub advantage: f64,
    /// The sampling policy's log-probs of the masked tokens (num_iterations > 1).
    pub old: Option<Vec<f64>>,
}

/// A generation batch: its samples, in sampling order (groups contiguous).
#[derive(Debug, Clone)]
pub struct Rollout {
    /// The prompts it was sampled for and the step group it serves.
    pub key: (Vec<usize>, usize),
    pub samples: Vec<Sample>,
    /// The generation metrics (reward, completions/...), logged once.
    pub metrics: Option<Metrics>,
}

/// The seed of step `step`'s sampling: stateless, so a resumed run draws
/// what the uninterrupted one would have.
pub fn sampling_seed(seed: u64, step: usize) -> u64 {
    let mut z = seed ^ (step as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407);
    z = (z ^ (z >> 32)).wrapping_mul(0x9FB2_1C65_1E98_DF25);
    z ^ (z >> 29)
}

/// The sampler's settings from GRPO's.
pub fn sampling(s: &GrpoSettings) -> SamplingParams {
    SamplingParams {
        temperature: s.temperature as f32,
        top_k: (s.top_k > 0).then_some(s.top_k),
        top_p: (s.top_p < 1.0).then_some(s.top_p as f32),
        min_p: s.min_p.map(|p| p as f32),
    }
}

/// What a generation needs besides the model.
pub struct Ctx<'a> {
    pub s: &'a GrpoSettings,
    pub tok: &'a TextTokenizer,
    pub stop: &'a [u32],
    /// A completion whose last token is one of these ended (the stop tokens
    /// and the pad token, as TRL tells truncated completions apart).
    pub ends: &'a [u32],
    pub rewards: &'a mut RewardFuncs,
    /// The names metrics are logged under, one (mean, std) per function.
    pub reward_names: &'a [(&'static str, &'static str)],
    /// Where completions.jsonl goes (log_completions).
    pub log_dir: Option<&'a Path>,
    pub seed: u64,
    /// Completions per scoring forward (RLOO's old and reference log-probs).
    pub micro_batch_size: usize,
}

/// Sample, score and log one generation batch for `prompt_idx` (1-based
/// `step` names it in messages and logs).
pub fn generate<B: Backend>(be: &B, model: &Model<B>, rows: &[PromptRow], prompt_idx: &[usize], step: usize, c: Ctx<'_>) -> Result<Rollout> {
    let g = c.s.num_generations;
    let order: Vec<usize> = prompt_idx.iter().flat_map(|&p| std::iter::repeat_n(p, g)).collect();
    let prompts: Vec<Vec<u32>> = order.iter().map(|&p| rows[p].ids.clone()).collect();
    let opts = BatchOpts {
        max_new_tokens: c.s.max_completion_length,
        sampling: sampling(c.s),
        seed: sampling_seed(c.seed, step),
        stop_tokens: c.stop.to_vec(),
    };
    let out = model.generate_batch(be, &prompts, &opts).with_context(|| format!("step {step}: sampling completions"))?;

    // Decode and score.
    let texts: Vec<String> = out.seqs.iter().map(|q| c.tok.decode_text(&q.tokens)).collect::<Result<_>>()?;
    let completions: Vec<Value> = order
        .iter()
        .zip(&texts)
        .map(|(&p, t)| if rows[p].conversational() { json!([{"role": "assistant", "content": t}]) } else { json!(t) })
        .collect();
    let batch: Vec<Scored> = order
        .iter()
        .enumerate()
        .map(|(i, &p)| Scored { prompt: &rows[p].prompt, completion: &completions[i], completion_ids: &out.seqs[i].tokens, columns: &rows[p].columns })
        .collect();
    let by_func = c.rewards.score(step, &batch)?;
    let n = order.len();
    let per_func: Vec<Vec<f64>> = (0..n).map(|i| by_func.iter().map(|f| f[i].unwrap_or(f64::NAN)).collect()).collect();
    let eos: Vec<bool> = out.seqs.iter().map(|q| q.stop == StopReason::Eos || q.tokens.last().is_some_and(|t| c.ends.contains(t))).collect();
    let mut samples: Vec<Sample> = (0..n)
        .map(|i| {
            let len = out.seqs[i].tokens.len();
            let mask = if c.s.mask_truncated_completions && !eos[i] { 0 } else { len };
            Sample { prompt: order[i], completion: out.seqs[i].tokens.clone(), mask, advantage: 0.0, old: None }
        })
        .collect();
    let mut kl_metric = None;
    let scored = match c.s.rloo {
        None => advantages(&per_func, &c.s.weights(), g, c.s.scale_rewards),
        Some(o) => {
            // RLOO's reward holds β·Σ(old − ref), so the sampling policy's
            // (and with β ≠ 0 the reference's) log-probs come before the advantages.
            let temp = c.s.temperature as f32;
            let mut reference = Vec::new();
            for chunk in samples.chunks_mut(c.micro_batch_size.max(1)) {
                let mb = super::micro_batch(rows, chunk, model.cfg.vocab)?;
                let old = super::logps(&mb, chunk, &model.token_nll_at(be, &mb.batch, true, temp));
                if c.s.beta != 0.0 {
                    reference.extend(super::logps(&mb, chunk, &model.token_nll_at(be, &mb.batch, false, temp)));
                }
                for (q, l) in chunk.iter_mut().zip(old) {
                    q.old = Some(l);
                }
            }
            let mut kl_sums = vec![0.0; n];
            if c.s.beta != 0.0 {
                let old: Vec<Vec<f64>> = samples.iter().map(|q| q.old.clone().unwrap_or_default()).collect();
                let (sums, mean) = super::rloo::kl_sums(&old, &reference);
                (kl_sums, kl_metric) = (sums, Some(mean));
            }
            super::rloo::advantages(&per_func, &c.s.weights(), g, o, c.s.beta, &kl_sums)
        }
    };
    for (q, a) in samples.iter_mut().zip(&scored.advantages) {
        q.advantage = *a;
    }

    let lens: Vec<usize> = samples.iter().map(|q| q.completion.len()).collect();
    let mut m = generation_metrics(&per_func, &scored, &lens, &eos, c.reward_names);
    if let Some(kl) = kl_metric {
        // RLOO's kl: the token mean of old − ref (a generation metric there).
        m.push("kl", kl);
    }
    let Advantages { rewards, advantages: adv, .. } = scored;

    if let Some(dir) = c.log_dir {
        let names: Vec<String> = c.rewards.names();
        let path = dir.join("completions.jsonl");
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path).with_context(|| format!("cannot open {}", path.display()))?;
        let mut buf = String::new();
        for i in 0..n {
            let per: serde_json::Map<String, Value> = names.iter().enumerate().map(|(k, name)| (name.clone(), num(per_func[i][k]))).collect();
            let row = json!({
                "step": step, "prompt": rows[order[i]].prompt, "completion": completions[i],
                "prompt_ids": rows[order[i]].ids, "completion_ids": out.seqs[i].tokens,
                "rewards": per, "reward": num(rewards[i]), "advantage": adv[i],
            });
            buf += &row.to_string();
            buf.push('\n');
        }
        f.write_all(buf.as_bytes()).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(Rollout { key: (prompt_idx.to_vec(), 0), samples, metrics: Some(m) })
}

/// TRL's generation metrics of a batch: rewards per function and in sum,
/// the share of completions whose advantage was divided by a zero std, and
/// the completion lengths (tokens up to and including the EOS) with the
/// share that never reached an EOS.
pub fn generation_metrics(
    per_func: &[Vec<f64>],
    scored: &Advantages,
    lens: &[usize],
    eos: &[bool],
    reward_names: &[(&'static str, &'static str)],
) -> Metrics {
    let n = lens.len().max(1) as f64;
    let mut m = Metrics::default();
    m.push("reward", nanmean(&scored.rewards));
    m.push("reward_std", nanstd(&scored.rewards));
    for (f, &(mean, sd)) in reward_names.iter().enumerate() {
        let col: Vec<f64> = per_func.iter().map(|r| r[f]).collect();
        m.push(mean, nanmean(&col));
        m.push(sd, nanstd(&col));
    }
    // torch.isclose(std, 0): |std| <= 1e-8 (a NaN std is not zero).
    m.push("frac_reward_zero_std", scored.std.iter().filter(|&&s| s.abs() <= 1e-8).count() as f64 / n);
    m.push("completions/mean_length", lens.iter().sum::<usize>() as f64 / n);
    m.push("completions/min_length", lens.iter().copied().min().unwrap_or(0) as f64);
    m.push("completions/max_length", lens.iter().copied().max().unwrap_or(0) as f64);
    m.push("completions/clipped_ratio", eos.iter().filter(|&&e| !e).count() as f64 / n);
    // The lengths of the completions that ended (0 when none did, as TRL).
    let ended: Vec<usize> = lens.iter().zip(eos).filter(|(_, e)| **e).map(|(l, _)| *l).collect();
    let ended = if ended.is_empty() { vec![0] } else { ended };
    m.push("completions/mean_terminated_length", ended.iter().sum::<usize>() as f64 / ended.len() as f64);
    m.push("completions/min_terminated_length", *ended.iter().min().expect("not empty") as f64);
    m.push("completions/max_terminated_length", *ended.iter().max().expect("not empty") as f64);
    m
}

/// A number for JSON: NaN (no score) as null.
fn num(x: f64) -> Value {
    if x.is_finite() { json!(x) } else { Value::Null }
}
