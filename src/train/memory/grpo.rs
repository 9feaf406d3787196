//! The memory plan of a GRPO run, and of an RLOO run (`rl: rloo`), whose
//! step has exactly GRPO's passes: the same sampler, the same scoring
//! forwards (RLOO always takes the sampling policy's log-probs, which the
//! plan always counts, and the reference's when β > 0) and the same
//! training pass (its sequence-level loss only changes the per-token
//! weights, which are host numbers). Besides the persistent part (as for
//! any run), such a step has three kinds of pass, and its peak is the largest:
//!
//! - sampling: `Model::generate_batch` over the completions of a generation
//!   batch, traced on the planner's backend like the training pass. Every
//!   sequence's prompt is the longest prompt (token 0) and no stop token is
//!   given, so every sequence decodes to max_completion_length: the batched
//!   KV cache of all sequences at capacity prompt + max_new (capped at
//!   max_position_embeddings, as generation caps it), the prefill of one
//!   prompt, then the decode steps of all sequences (their layer
//!   activations and the f32 logits [sequences, vocab]). Every decode step
//!   of that batch allocates the same buffers, so the trace stops after the
//!   first one (the trace's `on_token` ends the generation) instead of
//!   running max_new of them. One piece is added from shapes: a sequence
//!   that finishes while others go on has its cache region moved through a
//!   scratch of one region (capacity × kv_heads × head_dim activations)
//!   that stays allocated for the rest of the generation; the plan adds it
//!   to the decode step of all sequences whenever more than one sequence
//!   decodes. The most a run can hold then is a decode step of one
//!   sequence fewer with the region, so the plan over-estimates that worst
//!   case by about one sequence's decode activations (and a run in which no
//!   sequence finishes early by up to the region).
//! - scoring: the no-grad forwards of a training micro-batch
//!   (`Model::token_nll_at`): the reference with the adapter off (β > 0)
//!   and the sampling policy's log-probs with it on (num_iterations > 1,
//!   which the shape does not say, so it is always counted). They keep less
//!   alive than the training pass (no saved activations, no gradients); a
//!   micro-batch too large to trace (see `Planned::activations`) is not
//!   traced for them.
//! - training: GRPO's own pass, `Model::forward_backward_with` with
//!   per-token weights chosen from the losses (`Head::TokensAt` with
//!   `TokenWeights::FromLosses`: the LM head runs once without gradients,
//!   then with them), traced phase by phase as for SFT, every token
//!   labelled.

use super::trace::Tracer;
use super::{Built, MemoryPlan, Phase, Planned, RunShape, adapted_modules, human, plan_model};
use crate::adapter::LoraConfig;
use crate::model::batch::{Batch, Sequence};
use crate::model::generate_batch::BatchOpts;
use crate::model::graph::{BackwardOpts, Head, TokenWeights};
use crate::model::hparams::ModelConfig;
use crate::model::sample::SamplingParams;
use crate::model::{BaseWeights, Model};
use anyhow::{Result, anyhow, bail};
use std::cell::Cell;

/// The settings of a GRPO run that decide its memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrpoShape {
    /// One training micro-batch of completions; seq_len = the longest
    /// prompt + max_completion_length.
    pub run: RunShape,
    /// Completions sampled per generation batch (prompts × num_generations).
    pub sequences: usize,
    /// Tokens of the longest prompt.
    pub prompt_len: usize,
    /// max_completion_length.
    pub max_new: usize,
    /// β > 0: the reference forward runs.
    pub reference: bool,
}

/// The generation batch of a plan (a `GrpoShape` less its run shape).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Sampling {
    sequences: usize,
    prompt_len: usize,
    max_new: usize,
    reference: bool,
}

/// Which pass of a GRPO step holds the peak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrpoPhase {
    Sampling,
    Scoring,
    Training,
}

/// The activation peaks of a GRPO step, each above the persistent part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrpoPeaks {
    sampling_shape: Sampling,
    /// Positions of each sequence's KV-cache region.
    pub capacity: usize,
    /// The batched KV cache of all sequences.
    pub kv_cache: u64,
    /// The cache and the prefill of one prompt.
    pub prefill: u64,
    /// The cache and one decode step of every sequence (with max_new 1: the
    /// cache and the region move that ends the generation).
    pub decode: u64,
    /// The region scratch added to `decode` (0 when one sequence, or one
    /// new token, leaves nothing to move while decoding).
    pub region: u64,
    /// The largest no-grad forward of a micro-batch (0 when not traced).
    pub scoring: u64,
    /// The training pass of a micro-batch (its phase is the plan's
    /// `peak_at`).
    pub training: u64,
}

impl GrpoPeaks {
    /// The sampling peak: the prefill or a decode step with the region.
    pub fn sampling(&self) -> u64 {
        self.prefill.max(self.decode + self.region)
    }

    /// Where the step's peak is (ties go to training, then scoring).
    pub fn phase(&self) -> GrpoPhase {
        if self.training >= self.scoring && self.training >= self.sampling() {
            GrpoPhase::Training
        } else if self.scoring >= self.sampling() {
            GrpoPhase::Scoring
        } else {
            GrpoPhase::Sampling
        }
    }

    /// The step's activation peak.
    pub fn peak(&self) -> u64 {
        self.sampling().max(self.scoring).max(self.training)
    }

    /// The shape these peaks were planned for, with `run` as its run shape.
    pub fn shape(&self, run: RunShape) -> GrpoShape {
        let Sampling { sequences, prompt_len, max_new, reference } = self.sampling_shape;
        GrpoShape { run, sequences, prompt_len, max_new, reference }
    }

    pub(super) fn summary(&self) -> String {
        let s = &self.sampling_shape;
        format!(
            "GRPO: {} completions sampled at once, prompts up to {} tokens + {} new (KV cache of {} positions each), reference forward {}",
            s.sequences,
            s.prompt_len,
            s.max_new,
            self.capacity,
            if s.reference { "on" } else { "off" }
        )
    }

    pub(super) fn describe_peak(&self, at: Phase) -> String {
        match self.phase() {
            GrpoPhase::Sampling => "peak: sampling".to_string(),
            GrpoPhase::Scoring => "peak: no-grad scoring forward".to_string(),
            GrpoPhase::Training => format!("peak: training, {at}"),
        }
    }

    pub(super) fn rows(&self, at: Phase) -> Vec<(&'static str, u64, String)> {
        let sampling = if self.prefill >= self.decode + self.region { "prefill" } else { "decode step" };
        vec![
            ("  sampling", self.sampling(), format!("KV cache {} + {sampling}", human(self.kv_cache))),
            ("  scoring", self.scoring, "reference / old log-prob forward, no grad".to_string()),
            ("  training", self.training, format!("{at}")),
        ]
    }
}

/// Plan a GRPO run (see the module doc): the model described by `cfg` with
/// the adapters of `lc`, its projections held as `base` says.
pub fn plan_grpo(cfg: &ModelConfig, lc: &LoraConfig, shape: &GrpoShape, base: BaseWeights) -> Result<MemoryPlan> {
    let modules = adapted_modules(cfg, lc)?;
    check(cfg, shape)?;
    let sampling = Sampling { sequences: shape.sequences, prompt_len: shape.prompt_len, max_new: shape.max_new, reference: shape.reference };
    Ok(plan_model(Planned { cfg: cfg.clone(), modules, base, grpo: Some(sampling) }, shape.run))
}

/// What generation itself would refuse, refused before tracing it.
fn check(cfg: &ModelConfig, s: &GrpoShape) -> Result<()> {
    if s.sequences == 0 || s.max_new == 0 || s.run.micro_batch == 0 {
        bail!(
            "GRPO memory plan: completions per generation batch ({}), max_completion_length ({}) and micro_batch_size ({}) must be at least 1",
            s.sequences,
            s.max_new,
            s.run.micro_batch
        );
    }
    if s.prompt_len == 0 {
        bail!("GRPO memory plan: the longest prompt has no tokens");
    }
    if let Some(m) = cfg.max_position_embeddings
        && s.prompt_len >= m
    {
        bail!(
            "GRPO memory plan: the longest prompt has {} tokens; the model's max_position_embeddings is {m}, which leaves no room to generate",
            s.prompt_len
        );
    }
    Ok(())
}

impl MemoryPlan {
    /// The same model and adapter with another GRPO shape.
    pub fn replan_grpo(&self, shape: &GrpoShape) -> MemoryPlan {
        let mut inputs = self.inputs.clone();
        let GrpoShape { sequences, prompt_len, max_new, reference, .. } = *shape;
        inputs.grpo = Some(Sampling { sequences, prompt_len, max_new, reference });
        plan_model(inputs, shape.run)
    }
}

/// The temperature the traced passes score at: any T ≠ 1 takes the path
/// that scales the head's input (in place: no buffer of its own).
const TEMPERATURE: f32 = 0.5;

/// GRPO's training pass on a traced micro-batch: per-token weights chosen
/// from the losses (all 1: one weight, so chunks are cut at the loss chunk
/// size alone).
pub(super) fn train_pass(be: &Tracer, model: &mut Model<Tracer>, batch: &Batch, opts: BackwardOpts) {
    let mut uniform = |nll: &[f32]| -> Result<Vec<f32>> { Ok(vec![1.0; nll.len()]) };
    model
        .forward_backward_with(be, batch, opts, Head::TokensAt(TEMPERATURE, TokenWeights::FromLosses(&mut uniform)))
        .expect("uniform weights of the right length cannot fail");
}

/// The sampling and scoring peaks traced on `built`, with the training
/// peak already planned.
pub(super) fn peaks(planned: &Planned, built: &mut Built, run: &RunShape, s: Sampling, training: u64) -> GrpoPeaks {
    let Built { be, model, .. } = built;
    let be: &Tracer = be;
    let cfg = &planned.cfg;
    let capacity = model.cache_capacity(s.prompt_len, s.max_new);
    let kvd = (cfg.n_kv_heads * cfg.head_dim) as u64;

    // Sampling: cut after the first decode step (see the module doc).
    let base = be.unphased();
    let prompts = vec![vec![0u32; s.prompt_len]; s.sequences];
    let opts = BatchOpts { max_new_tokens: s.max_new, sampling: SamplingParams::greedy(), seed: 0, stop_tokens: Vec::new() };
    let (chosen, prefill, kv_cache) = (Cell::new(0usize), Cell::new(0u64), Cell::new(0u64));
    let generated = model.generate_batch_with(be, &prompts, &opts, |_, _| {
        chosen.set(chosen.get() + 1);
        if chosen.get() == 1 {
            // The prefills are done; what they leave is the batched cache.
            prefill.set(be.peak_above(base));
            kv_cache.set(be.with_log(|l| l.live) - base);
            be.unphased();
        } else if chosen.get() > s.sequences {
            return Err(anyhow!(CUT));
        }
        Ok(())
    });
    match generated {
        Ok(_) => {}
        Err(e) if e.to_string() == CUT => {}
        Err(e) => panic!("the traced generation was checked before it ran: {e:#}"),
    }
    let decode = be.peak_above(base);
    let region = if s.sequences > 1 && s.max_new > 1 { capacity as u64 * kvd * run.act_bytes as u64 } else { 0 };

    // Scoring: the no-grad forwards of one micro-batch.
    let mut scoring = 0;
    if run.tokens() <= super::TRACE_TOKENS {
        let seqs: Vec<Sequence> = (0..run.micro_batch).map(|_| Sequence::unmasked(vec![0; run.seq_len])).collect();
        let batch = Batch::from_sequences(&seqs, cfg.vocab).expect("token 0 is in every vocabulary");
        model.loss_chunk_tokens = run.loss_chunk_tokens;
        let adapters: &[bool] = if s.reference { &[true, false] } else { &[true] };
        for &on in adapters {
            let before = be.unphased();
            model.token_nll_at(be, &batch, on, TEMPERATURE);
            scoring = scoring.max(be.peak_above(before));
        }
    }
    GrpoPeaks { sampling_shape: s, capacity, kv_cache: kv_cache.get(), prefill: prefill.get(), decode, region, scoring, training }
}

/// The error that ends a traced generation after its first decode step.
const CUT: &str = "memory trace: one decode step traced";
