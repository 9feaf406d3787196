//! Reward modelling (TRL's RewardTrainer): the model as transformers'
//! *ForSequenceClassification with one label. A [1, hidden] Linear named
//! `score` (no bias) reads the final normed hidden state of each sequence's
//! last token that is not the pad id, giving one scalar reward; pairs go
//! through the model as one batch [chosen₁..chosen_k, rejected₁..rejected_k]
//! and the loss on the rewards is `RewardConfig::loss`. The score head is
//! trained in full beside the LoRA adapters (PEFT's modules_to_save) and
//! saved with them. `reward_model: true` selects it.
//!
//! The rewards are computed on the host in f64 from the k·2 pooled hidden
//! rows (read back as one small [2k, hidden] block); the backward writes
//! ∂L/∂h only at those rows, and the head's own gradient Σ dL/dr · h there.

use super::math::{Loss, Metrics, PairGrad, log_sigmoid, mean, sigmoid};
use super::{Examples, MicroLoss, Objective, Step, StepOutcome, eval_in_chunks, mean_loss_step};
use crate::adapter::peft::{self, SCORE_KEY};
use crate::adapter::LoraConfig;
use crate::backend::Backend;
use crate::config::RunConfig;
use crate::data::pairs;
use crate::data::prepare::DatasetReport;
use crate::data::preference::RewardPair;
use crate::data::tokenizer::TextTokenizer;
use crate::model::Model;
use crate::model::batch::{Batch, IGNORE_INDEX, Sequence};
use crate::model::graph::{BackwardOpts, Head};
use crate::train::optimizer::ExtraParam;
use crate::util::rng::Rng;
use anyhow::{Context, Result, bail};
use std::fmt;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RewardConfig {
    /// Adds coefficient × mean((r_c + r_r)²), pulling rewards toward 0.
    pub center_rewards_coefficient: Option<f64>,
}



/// The scalar rewards of one pair and its optional margin (`RewardPair`
/// outside this file: the data layer's `RewardPair` holds its token ids).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairRewards {
    pub chosen: f64,
    pub rejected: f64,
    pub margin: f64,
}

/// A reward model's result: `grads` is dL/dr per pair (`chosen_nll` is 0).
pub type RewardLoss = Loss<PairGrad>;

impl RewardConfig {
    /// mean(−logσ(r_c − r_r − margin)) [+ c·mean((r_c + r_r)²)].
    pub fn loss(&self, pairs: &[PairRewards]) -> Result<RewardLoss> {
        if pairs.is_empty() {
            bail!("a reward-model batch needs at least one pair");
        }
        if let Some(i) = pairs.iter().position(|p| !(p.chosen.is_finite() && p.rejected.is_finite() && p.margin.is_finite())) {
            bail!("pair {i}: rewards and margin must be finite");
        }
        let n = pairs.len() as f64;
        let c = self.center_rewards_coefficient.unwrap_or(0.0);
        let mut loss = 0.0;
        let mut grads = Vec::with_capacity(pairs.len());
        for p in pairs {
            let z = p.chosen - p.rejected - p.margin;
            let sum = p.chosen + p.rejected;
            loss += (-log_sigmoid(z) + c * sum * sum) / n;
            let d = -sigmoid(-z);
            grads.push(PairGrad { chosen: (d + 2.0 * c * sum) / n, rejected: (-d + 2.0 * c * sum) / n, chosen_nll: 0.0 });
        }
        let all = pairs.iter().flat_map(|p| [p.chosen, p.rejected]);
        let mut metrics = Metrics::default();
        metrics.push("loss", loss);
        metrics.push("min_reward", all.clone().fold(f64::INFINITY, f64::min));
        metrics.push("mean_reward", all.clone().sum::<f64>() / (2.0 * n));
        metrics.push("max_reward", all.fold(f64::NEG_INFINITY, f64::max));
        metrics.push("accuracy", mean(pairs.iter().map(|p| if p.chosen > p.rejected { 1.0 } else { 0.0 })));
        metrics.push("margin", mean(pairs.iter().map(|p| p.chosen - p.rejected)));
        Ok(RewardLoss { loss, grads, metrics })
    }
}

/// transformers' default `initializer_range` when config.json has none.
pub const DEFAULT_INITIALIZER_RANGE: f64 = 0.02;

/// The settings of config.json that a sequence-classification head uses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HeadConfig {
    /// Std of the normal init of a fresh `score` Linear.
    pub initializer_range: f64,
    /// The pad id that decides which token is pooled. TRL overwrites it
    /// with the tokenizer's pad token id (its EOS when it has none), so a
    /// run should prefer the tokenizer's value.
    pub pad_token_id: Option<u32>,
}

impl HeadConfig {
    /// Read `initializer_range` and `pad_token_id` from `model_dir`/config.json.
    pub fn read(model_dir: &Path) -> Result<HeadConfig> {
        let path = model_dir.join("config.json");
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
        let initializer_range = match v.get("initializer_range") {
            None | Some(serde_json::Value::Null) => DEFAULT_INITIALIZER_RANGE,
            Some(x) => match x.as_f64() {
                Some(r) if r.is_finite() && r >= 0.0 => r,
                _ => bail!("{}: \"initializer_range\" must be a non-negative number, found {x}", path.display()),
            },
        };
        let pad_token_id = match v.get("pad_token_id") {
            None | Some(serde_json::Value::Null) => None,
            Some(x) => Some(
                x.as_u64()
                    .and_then(|id| u32::try_from(id).ok())
                    .with_context(|| format!("{}: \"pad_token_id\" must be a token id, found {x}", path.display()))?,
            ),
        };
        Ok(HeadConfig { initializer_range, pad_token_id })
    }
}

/// The reward head: `score.weight` [1, hidden] in f32 with its gradient
/// (an `ExtraParam` named as PEFT stores it, so the optimiser and
/// checkpoints handle it beside the LoRA tensors), and the pad id that
/// decides the pooled token.
pub struct ScoreHead<B: Backend> {
    pub param: ExtraParam<B>,
    pub pad_token_id: Option<u32>,
}

impl<B: Backend> ScoreHead<B> {
    /// A fresh head as transformers initialises the `score` Linear of a new
    /// sequence-classification model: normal(0, initializer_range). The
    /// draws come from ferrotune's RNG, so the values cannot equal torch's
    /// for the same seed; only the distribution is the same.
    pub fn init(be: &B, hidden: usize, initializer_range: f64, pad_token_id: Option<u32>, rng: &mut Rng) -> ScoreHead<B> {
        let w: Vec<f32> = (0..hidden).map(|_| (rng.normal() as f64 * initializer_range) as f32).collect();
        Self::from_host(be, &w, pad_token_id)
    }

    /// A head holding `weight` ([1, hidden] row-major), e.g. from
    /// `peft::load_reward`.
    pub fn from_host(be: &B, weight: &[f32], pad_token_id: Option<u32>) -> ScoreHead<B> {
        ScoreHead { param: ExtraParam::from_host(be, SCORE_KEY, &[1, weight.len()], weight), pad_token_id }
    }

    pub fn hidden(&self) -> usize {
        self.param.shape[1]
    }

    /// The weight's values on the host.
    pub fn weight(&self, be: &B) -> Vec<f32> {
        be.download(&self.param.value)
    }

    /// The accumulated gradient of the weight on the host.
    pub fn grad(&self, be: &B) -> Vec<f32> {
        be.download(&self.param.grad)
    }

    pub fn zero_grad(&mut self, be: &B) {
        self.param.zero_grad(be);
    }

    /// The token transformers pools in a sequence: the rightmost one whose
    /// id is not the pad id (position 0 when every token is the pad id, as
    /// torch's argmax of all zeros gives); the last token when there is no
    /// pad id. Tokens after it cannot change its hidden state (attention is
    /// causal), so they need no special handling.
    pub fn pooled_position(&self, ids: &[u32]) -> usize {
        pooled_position(self.pad_token_id, ids)
    }
}

/// `ScoreHead::pooled_position` for a head whose pad id is `pad`.
fn pooled_position(pad: Option<u32>, ids: &[u32]) -> usize {
    match pad {
        None => ids.len().saturating_sub(1),
        Some(pad) => ids.iter().rposition(|&t| t != pad).unwrap_or(0),
    }
}

/// A micro-batch of reward pairs laid out as one batch.
struct RewardBatch {
    batch: Batch,
    /// Batch token index of each sequence's pooled token: chosen then rejected.
    pooled: Vec<usize>,
    margins: Vec<f64>,
}

impl RewardBatch {
    fn new(pad: Option<u32>, pairs: &[&RewardPair], vocab: usize) -> Result<RewardBatch> {
        if pairs.is_empty() {
            bail!("a reward-model batch needs at least one pair");
        }
        let mut seqs = Vec::with_capacity(2 * pairs.len());
        let mut pooled = Vec::with_capacity(2 * pairs.len());
        let mut offset = 0;
        for side in ["chosen", "rejected"] {
            for (i, p) in pairs.iter().enumerate() {
                let ids = if side == "chosen" { &p.chosen } else { &p.rejected };
                if ids.is_empty() {
                    bail!("reward pair {i}: the {side} sequence has no tokens");
                }
                pooled.push(offset + pooled_position(pad, ids));
                offset += ids.len();
                // No LM targets: the loss is on the pooled hidden states.
                seqs.push(Sequence { input_ids: ids.clone(), labels: vec![IGNORE_INDEX; ids.len()] });
            }
        }
        let batch = Batch::from_sequences(&seqs, vocab).context("reward pairs")?;
        Ok(RewardBatch { batch, pooled, margins: pairs.iter().map(|p| p.margin.unwrap_or(0.0)).collect() })
    }

    fn k(&self) -> usize {
        self.margins.len()
    }

    /// The pooled hidden rows [2k, hidden], read back in one transfer.
    fn pooled_rows<B: Backend>(&self, be: &B, hf: &B::Buf, h: usize) -> Vec<f32> {
        let mut rows = be.zeros(self.pooled.len() * h);
        for (s, &t) in self.pooled.iter().enumerate() {
            be.copy_slice(hf, t * h, &mut rows, s * h, h);
        }
        be.download(&rows)
    }

    /// r = score · h for each sequence, in f64, as pairs with their margins.
    fn rewards(&self, rows: &[f32], w: &[f32]) -> Result<Vec<PairRewards>> {
        let h = w.len();
        let r: Vec<f64> = rows.chunks_exact(h).map(|x| x.iter().zip(w).map(|(&a, &b)| a as f64 * b as f64).sum()).collect();
        if r.iter().any(|x| !x.is_finite()) {
            bail!(
                "training diverged: the rewards are no longer finite (NaN or infinite). \
                 The usual cause is a learning_rate that is too high (or max_grad_norm: 0, no clipping)"
            );
        }
        let k = self.k();
        Ok((0..k).map(|i| PairRewards { chosen: r[i], rejected: r[k + i], margin: self.margins[i] }).collect())
    }
}

/// The rewards of pairs (chosen, rejected), without gradients.
pub fn rewards<B: Backend>(be: &B, model: &Model<B>, head: &ScoreHead<B>, pairs: &[&RewardPair]) -> Result<Vec<PairRewards>> {
    check_hidden(model, head.hidden())?;
    let rb = RewardBatch::new(head.pad_token_id, pairs, model.cfg.vocab)?;
    let hf = model.final_hidden(be, &rb.batch, true);
    rb.rewards(&rb.pooled_rows(be, &hf, head.hidden()), &head.weight(be))
}

/// Loss and metrics of pairs without gradients (evaluation).
pub fn reward_eval<B: Backend>(
    be: &B,
    model: &Model<B>,
    head: &ScoreHead<B>,
    cfg: &RewardConfig,
    pairs: &[&RewardPair],
) -> Result<RewardLoss> {
    cfg.loss(&rewards(be, model, head, pairs)?)
}

/// Forward and backward of one micro-batch of reward pairs. LoRA gradients
/// and the head's gradient accumulate, scaled by `scale` (this micro-batch's
/// share of the step's pairs, so the step's gradient is that of the mean
/// over all its pairs). Returns the micro-batch's loss and metrics (not
/// scaled) and its token count.
pub fn reward_forward_backward<B: Backend>(
    be: &B,
    model: &mut Model<B>,
    head: &mut ScoreHead<B>,
    cfg: &RewardConfig,
    pairs: &[&RewardPair],
    scale: f64,
    opts: BackwardOpts,
) -> Result<(RewardLoss, usize)> {
    let pad = head.pad_token_id;
    micro_batch(be, model, &mut head.param, pad, cfg, pairs, scale, opts)
}

/// `reward_forward_backward` on the head's parameter and pad id.
#[allow(clippy::too_many_arguments)]
fn micro_batch<B: Backend>(
    be: &B,
    model: &mut Model<B>,
    param: &mut ExtraParam<B>,
    pad: Option<u32>,
    cfg: &RewardConfig,
    pairs: &[&RewardPair],
    scale: f64,
    opts: BackwardOpts,
) -> Result<(RewardLoss, usize)> {
    check_hidden(model, param.shape[1])?;
    let rb = RewardBatch::new(pad, pairs, model.cfg.vocab)?;
    let (n, h) = (rb.batch.n_tokens(), param.shape[1]);
    let w = be.download(&param.value);
    let mut result = None;
    model.forward_backward_with(be, &rb.batch, opts, Head::Hidden(&mut |hf| {
        let rows = rb.pooled_rows(be, hf, h);
        let loss = cfg.loss(&rb.rewards(&rows, &w)?)?;
        let k = rb.k();
        // dL/dr per sequence, chosen then rejected, with the step's scale.
        let dr: Vec<f64> = (0..2 * k)
            .map(|s| scale * if s < k { loss.grads[s].chosen } else { loss.grads[s - k].rejected })
            .collect();
        // ∂L/∂w = Σ_s dL/dr_s · h_s (f64), added to the head's gradient.
        let dw: Vec<f32> = (0..h).map(|j| dr.iter().enumerate().map(|(s, d)| d * rows[s * h + j] as f64).sum::<f64>() as f32).collect();
        be.add_assign(&mut param.grad, &be.upload(&dw));
        // ∂L/∂h_s = dL/dr_s · w at the pooled rows, zero elsewhere.
        let d_rows: Vec<f32> = dr.iter().flat_map(|&d| w.iter().map(move |&x| (d * x as f64) as f32)).collect();
        let d_rows = be.upload_activation(&d_rows);
        let mut dhf = be.zeros(n * h);
        for (s, &t) in rb.pooled.iter().enumerate() {
            be.copy_slice(&d_rows, s * h, &mut dhf, t * h, h);
        }
        result = Some(loss);
        Ok(dhf)
    }))?;
    Ok((result.expect("the head ran"), n))
}

fn check_hidden<B: Backend>(model: &Model<B>, inputs: usize) -> Result<()> {
    if inputs != model.cfg.hidden {
        bail!("the score head has {inputs} inputs but the model's hidden size is {}", model.cfg.hidden);
    }
    Ok(())
}

/// The reward model as a training objective: its loss settings and the
/// score head it trains (made by `prepare_model`).
pub struct Reward<B: Backend> {
    pub cfg: RewardConfig,
    head: Option<ScoreHead<B>>,
    /// The head lora_model_dir's adapter brought, until `prepare_model`.
    saved_score: Option<Vec<f32>>,
}

impl<B: Backend> fmt::Debug for Reward<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Reward({:?})", self.cfg)
    }
}

fn pairs_of(examples: &Examples) -> Result<&[RewardPair]> {
    match examples {
        Examples::Reward(r) => Ok(r),
        _ => bail!("reward modelling takes the rewards of pairs {{prompt?, chosen, rejected, margin?}}"),
    }
}

impl<B: Backend> Reward<B> {
    fn head(&self) -> Result<&ScoreHead<B>> {
        self.head.as_ref().context("a reward model needs its score head")
    }
}

impl<B: Backend> Objective<B> for Reward<B> {
    fn prepare_data(&self, cfg: &RunConfig, tokenizer_dir: &Path, vocab: usize) -> Result<(Examples, Examples, Vec<DatasetReport>)> {
        let data = pairs::prepare_reward(cfg, tokenizer_dir, vocab)?;
        Ok((Examples::Reward(data.train), Examples::Reward(data.val), data.report))
    }

    /// A reward adapter (SEQ_CLS) brings its score head along.
    fn load_adapter(&mut self, be: &B, model: &mut Model<B>, dir: &Path) -> Result<usize> {
        if !peft::is_reward_adapter(dir)? {
            return peft::load(be, model, dir).with_context(|| format!("lora_model_dir {}", dir.display()));
        }
        let (n, score) = peft::load_reward(be, model, dir).with_context(|| format!("lora_model_dir {}", dir.display()))?;
        self.saved_score = Some(score);
        Ok(n)
    }

    /// The score head: fresh (transformers' init range), or the one saved
    /// with lora_model_dir's adapter. Rewards are read at the last token
    /// that is not padding, the pad id being the tokenizer's pad (or its
    /// EOS), as TRL sets it.
    fn prepare_model(&mut self, be: &B, model: &Model<B>, cfg: &RunConfig, model_dir: &Path, tokenizer_dir: &Path) -> Result<()> {
        let tok = TextTokenizer::load(tokenizer_dir, &cfg.special_tokens)?;
        let pad = tok.pad_id().or(tok.eos_id());
        let hc = HeadConfig::read(model_dir)?;
        self.head = Some(match self.saved_score.take() {
            Some(score) => ScoreHead::from_host(be, &score, pad),
            None => ScoreHead::init(be, model.cfg.hidden, hc.initializer_range, pad, &mut Rng::new(cfg.seed ^ 0x5c0e)),
        });
        Ok(())
    }

    fn step(&mut self, s: Step<'_, B>) -> Result<StepOutcome> {
        let rp = pairs_of(s.examples)?;
        let head = self.head.as_mut().context("a reward model needs its score head")?;
        let (be, cfg, pad) = (s.be, &self.cfg, head.pad_token_id);
        mean_loss_step(s, &mut [&mut head.param], |model, extras, mb, share, opts| {
            let refs: Vec<&RewardPair> = mb.iter().map(|&i| &rp[i]).collect();
            let (l, tokens) = micro_batch(be, model, extras[0], pad, cfg, &refs, share, opts)?;
            Ok(MicroLoss { loss: l.loss, metrics: l.metrics, tokens })
        })
    }

    fn evaluate(&self, be: &B, model: &Model<B>, val: &Examples, rows: usize) -> Result<(f64, Metrics)> {
        let head = self.head()?;
        eval_in_chunks(pairs_of(val)?, rows, |refs| reward_eval(be, model, head, &self.cfg, refs).map(|l| (l.loss, l.metrics)))
    }

    fn extra_params(&self) -> Vec<&ExtraParam<B>> {
        self.head.iter().map(|h| &h.param).collect()
    }

    fn restore(&mut self, be: &B, model: &mut Model<B>, dir: &Path) -> Result<usize> {
        let (n, score) = peft::load_reward(be, model, dir).with_context(|| format!("loading the adapter of {}", dir.display()))?;
        let head = self.head.as_mut().context("a reward model needs its score head")?;
        *head = ScoreHead::from_host(be, &score, head.pad_token_id);
        Ok(n)
    }

    fn save_adapter(&self, be: &B, model: &Model<B>, lora: &LoraConfig, dir: &Path) -> Result<()> {
        peft::save_reward(be, model, lora, &self.head()?.weight(be), dir)
    }
}

/// `reward_model: true`, with center_rewards_coefficient.
pub fn select<B: Backend>(cfg: &RunConfig) -> Option<Result<Box<dyn Objective<B>>>> {
    cfg.reward_model.then(|| {
        let c = RewardConfig { center_rewards_coefficient: cfg.center_rewards_coefficient };
        Ok(Box::new(Reward::<B> { cfg: c, head: None, saved_score: None }) as Box<dyn Objective<B>>)
    })
}
