//! The whole model: embedding -> layers -> final norm -> LM head + loss, and
//! the backward through them. The LM head and cross-entropy run over chunks
//! of tokens so the logits of the whole batch never exist at once.

use super::{Model, RopeTable};
use super::batch::{Batch, IGNORE_INDEX};
use super::gemma4_layer::Pass as Gemma4Pass;
use super::layer::{self, LayerActs, StepCtx};
use crate::backend::{Backend, CeShape, MatShape, NormShape, Phase};

/// Σ token NLL and the number of target tokens it covers. The mean loss of
/// a step is the sum over its micro-batches divided by all their targets.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LossSum {
    pub nll_sum: f64,
    pub n_targets: usize,
}

impl LossSum {
    pub fn mean(&self) -> f64 {
        if self.n_targets == 0 { f64::NAN } else { self.nll_sum / self.n_targets as f64 }
    }
    pub fn add(&mut self, other: LossSum) {
        self.nll_sum += other.nll_sum;
        self.n_targets += other.n_targets;
    }
}

/// Options of one forward+backward pass.
#[derive(Debug, Clone, Copy)]
pub struct BackwardOpts {
    /// Multiplier of every token's loss gradient: 1 / (target tokens of the
    /// whole optimiser step, all micro-batches together).
    pub grad_scale: f32,
    /// Keep only each layer's input and recompute the layer in backward.
    pub gradient_checkpointing: bool,
    /// Some(seed) enables LoRA dropout (training); None disables it.
    pub dropout_seed: Option<u64>,
}

/// The batch's metadata, uploaded once per pass.
struct Uploaded<B: Backend> {
    ids: B::IntBuf,
    positions: B::IntBuf,
    cu_seqlens: B::IntBuf,
    /// Each sequence's length, kept on the host.
    seq_lens: Vec<usize>,
}

fn upload<B: Backend>(be: &B, batch: &Batch) -> Uploaded<B> {
    Uploaded {
        ids: be.upload_ints(&batch.ids),
        positions: be.upload_ints(&batch.positions),
        cu_seqlens: be.upload_ints(&batch.cu_seqlens),
        seq_lens: batch.cu_seqlens.windows(2).map(|w| (w[1] - w[0]) as usize).collect(),
    }
}

fn step_ctx<'a, B: Backend>(
    up: &'a Uploaded<B>,
    ropes: &'a [RopeTable<B>],
    batch: &Batch,
    seed: Option<u64>,
    adapters: bool,
) -> StepCtx<'a, B> {
    StepCtx {
        n: batch.n_tokens(),
        n_seqs: batch.n_seqs(),
        max_seqlen: batch.max_seqlen(),
        positions: &up.positions,
        cu_seqlens: &up.cu_seqlens,
        seq_lens: &up.seq_lens,
        ropes,
        max_position: batch.positions.iter().copied().max().unwrap_or(0).max(0) as usize,
        dropout_seed: seed,
        adapters,
        g4: None,
    }
}

/// How each target token's loss enters the gradient.
pub enum TokenWeights<'a> {
    /// Every target token's loss gradient times this (SFT: 1 / the target
    /// tokens of the whole optimiser step).
    Uniform(f32),
    /// Per-token weights chosen after the forward pass from the per-token
    /// losses (NLL in batch token order, 0 where the target is -100): the
    /// preference objectives, whose gradient for a sequence depends on the
    /// log-probabilities of the whole batch. The weight of token t
    /// multiplies ∂NLL_t; tokens whose target is -100 are ignored.
    FromLosses(&'a mut dyn FnMut(&[f32]) -> anyhow::Result<Vec<f32>>),
}

/// What the final normed hidden states hf feed in a training pass.
pub enum Head<'a, B: Backend> {
    /// The LM head and cross-entropy, each target token's loss weighted.
    Tokens(TokenWeights<'a>),
    /// The same over log_softmax(logits / temperature) (GRPO scores its
    /// samples at the sampling temperature, as TRL does).
    TokensAt(f32, TokenWeights<'a>),
    /// A head supplied by the caller instead of the LM head (a reward
    /// model's score head): it gets hf [n, hidden] (batch token order) and
    /// returns ∂L/∂hf, same length, already scaled as the step needs.
    Hidden(&'a mut dyn FnMut(&B::Buf) -> anyhow::Result<B::Buf>),
}

/// The gradient scale of the LM-head pass.
#[derive(Clone, Copy)]
enum GradScale<'a> {
    Uniform(f32),
    PerToken(&'a [f32]),
}

impl<B: Backend> Model<B> {
    /// Embedding, all layers and the final norm, keeping no activations.
    /// Returns the normed hidden states [n, hidden].
    fn hidden_states(&self, be: &B, batch: &Batch, adapters: bool) -> B::Buf {
        let up = upload(be, batch);
        let ctx = step_ctx(&up, &self.rope_tables, batch, None, adapters);
        let (n, h) = (batch.n_tokens(), self.cfg.hidden);
        let mut x = self.embed(be, &up.ids, n);
        let pass = self.gemma4_pass(be, &up.ids, &x, &ctx);
        let ctx = StepCtx { g4: pass.as_ref(), ..ctx };
        for (li, l) in self.layers.iter().enumerate() {
            x = layer::forward(be, &self.cfg, l, li, x, &ctx).0;
        }
        let mut hf = be.zeros(n * h);
        let mut inv = be.zeros_f32(n);
        be.rmsnorm(&x, &self.final_norm, &mut hf, &mut inv, NormShape { rows: n, hidden: h, plus_one: self.cfg.norm_plus_one }, self.cfg.rms_norm_eps);
        hf
    }

    /// Full logits [n_tokens, vocab] of a batch (inference; for tests and
    /// small inputs: the whole logits matrix is materialised).
    pub fn logits(&self, be: &B, batch: &Batch) -> Vec<f32> {
        let hf = self.hidden_states(be, batch, true);
        let n = batch.n_tokens();
        let mut logits = be.zeros_f32(n * self.cfg.vocab);
        be.linear(&hf, self.head(), None, &mut logits, MatShape { m: n, k: self.cfg.hidden, n: self.cfg.vocab });
        if let Some(c) = self.cfg.final_softcap {
            be.softcap(&mut logits, c);
        }
        be.download(&logits)
    }

    /// The embedding of `n` token ids, times the family's embedding scale.
    pub(crate) fn embed(&self, be: &B, ids: &B::IntBuf, n: usize) -> B::Buf {
        let h = self.cfg.hidden;
        let mut x = be.zeros(n * h);
        be.embedding(&self.embed, ids, &mut x, n, h);
        if let Some(s) = self.embed_scale {
            be.scale(&mut x, s);
        }
        x
    }

    /// Loss of a batch without gradients.
    pub fn eval_loss(&self, be: &B, batch: &Batch) -> LossSum {
        LossSum { nll_sum: sum_f64(&self.token_nll(be, batch, true)), n_targets: batch.n_targets() }
    }

    /// Per-token NLL of each token's target, in batch token order (0 where
    /// the target is -100), without gradients. `adapters: false` runs the
    /// base model alone (the reference policy of preference objectives).
    pub fn token_nll(&self, be: &B, batch: &Batch, adapters: bool) -> Vec<f32> {
        self.token_nll_at(be, batch, adapters, 1.0)
    }

    /// `token_nll` of log_softmax(logits / temperature).
    pub fn token_nll_at(&self, be: &B, batch: &Batch, adapters: bool, temperature: f32) -> Vec<f32> {
        let hf = self.hidden_states(be, batch, adapters);
        self.head_loss(be, &hf, &batch.targets, temperature, None)
    }

    /// LM head + cross-entropy over chunks of tokens; returns the per-token
    /// losses (0 where the target is -100). With `grad` = Some((scale,
    /// dhf)), also writes ∂(Σ_t w_t·NLL_t)/∂hf into dhf. Per-token losses stay
    /// on the backend until the one read at the end (no host
    /// synchronisation per chunk). With a temperature T ≠ 1 the NLL is that
    /// of softmax(logits / T): the head's input is scaled by 1/T (the
    /// logits are linear in it) and a soft cap c becomes c/T, since
    /// c·tanh(l/c)/T = (c/T)·tanh((l/T)/(c/T)); the gradient picks up the
    /// same 1/T on its way back.
    fn head_loss(&self, be: &B, hf: &B::Buf, targets: &[i32], temperature: f32, mut grad: Option<(GradScale, &mut B::Buf)>) -> Vec<f32> {
        let (h, v) = (self.cfg.hidden, self.cfg.vocab);
        let tempered = temperature != 1.0;
        let softcap = self.cfg.final_softcap.map(|c| c / temperature);
        let n = targets.len();
        let chunk = self.loss_chunk_tokens.max(1).min(n.max(1));
        // Scratch sized for the largest chunk, reused by every chunk.
        let mut hc = be.zeros(chunk * h);
        let mut logits = be.zeros_f32(chunk * v);
        let mut dhc = be.zeros(chunk * h);
        let mut chunk_losses = be.zeros_f32(chunk);
        let mut losses = be.zeros_f32(n);
        let mut c0 = 0;
        while c0 < n {
            let end = (c0 + chunk).min(n);
            // A chunk is cut further where the per-token weight changes, so
            // each cross-entropy call has one gradient scale.
            let (c, scale) = match grad.as_ref().map(|g| g.0) {
                None => (end - c0, None),
                Some(GradScale::Uniform(s)) => (end - c0, Some(s)),
                Some(GradScale::PerToken(w)) => {
                    let run_weight = (c0..end).find(|&t| targets[t] != IGNORE_INDEX).map(|t| w[t]);
                    let len = (c0..end)
                        .position(|t| targets[t] != IGNORE_INDEX && Some(w[t]) != run_weight)
                        .unwrap_or(end - c0);
                    (len, Some(run_weight.unwrap_or(0.0)))
                }
            };
            let chunk_targets = &targets[c0..c0 + c];
            if chunk_targets.iter().all(|&t| t == IGNORE_INDEX) {
                // Nothing scored here: no loss and a zero gradient (dhf starts zeroed).
                c0 += c;
                continue;
            }
            be.copy_slice(hf, c0 * h, &mut hc, 0, c * h);
            if tempered {
                be.scale(&mut hc, 1.0 / temperature);
            }
            be.linear(&hc, self.head(), None, &mut logits, MatShape { m: c, k: h, n: v });
            let t = be.upload_ints(chunk_targets);
            be.cross_entropy(&mut logits, &t, &mut chunk_losses, CeShape { rows: c, vocab: v, softcap }, scale);
            be.copy_slice(&chunk_losses, 0, &mut losses, c0, c);
            if let Some((_, dhf)) = grad.as_mut() {
                be.linear_backward_input(&logits, self.head(), &mut dhc, MatShape { m: c, k: h, n: v }, false);
                if tempered {
                    be.scale(&mut dhc, 1.0 / temperature);
                }
                be.copy_slice(&dhc, 0, dhf, c0 * h, c * h);
            }
            c0 += c;
        }
        be.download(&losses)
    }

    /// Forward and backward of one micro-batch with every target token's
    /// loss gradient scaled by `opts.grad_scale` (SFT). LoRA gradients
    /// accumulate (call `zero_grad` at the start of an optimiser step).
    pub fn forward_backward(&mut self, be: &B, batch: &Batch, opts: BackwardOpts) -> LossSum {
        let nll = self
            .forward_backward_with(be, batch, opts, Head::Tokens(TokenWeights::Uniform(opts.grad_scale)))
            .expect("uniform token weights cannot fail");
        LossSum { nll_sum: sum_f64(&nll), n_targets: batch.n_targets() }
    }

    /// The one training pass: embedding, the layers (keeping activations
    /// or, with checkpointing, only each layer's input), the final norm,
    /// the `head` (which gives ∂L/∂hf), then the backward through the final
    /// norm and the layers. LoRA gradients accumulate. Returns the per-token
    /// NLL of the forward pass for `Head::Tokens` (batch token order, 0
    /// where the target is -100), nothing for `Head::Hidden`. With
    /// `TokenWeights::FromLosses` the LM head runs once without gradients
    /// to get the losses, then again with the chosen weights (the layers'
    /// forward runs once). An error from the head stops the pass before any
    /// backward.
    pub fn forward_backward_with(&mut self, be: &B, batch: &Batch, opts: BackwardOpts, head: Head<'_, B>) -> anyhow::Result<Vec<f32>> {
        let n = batch.n_tokens();
        let head = match head {
            Head::Tokens(weights) => Head::TokensAt(1.0, weights),
            other => other,
        };
        self.train_pass(be, batch, opts, |model, hf| match head {
            Head::TokensAt(temp, weights) => {
                let mut dhf = be.zeros(n * model.cfg.hidden);
                let nll = match weights {
                    TokenWeights::Uniform(s) => model.head_loss(be, hf, &batch.targets, temp, Some((GradScale::Uniform(s), &mut dhf))),
                    TokenWeights::FromLosses(choose) => {
                        let nll = model.head_loss(be, hf, &batch.targets, temp, None);
                        let w = choose(&nll)?;
                        anyhow::ensure!(w.len() == n, "{} token weights for {n} tokens", w.len());
                        model.head_loss(be, hf, &batch.targets, temp, Some((GradScale::PerToken(&w), &mut dhf)));
                        nll
                    }
                };
                Ok((nll, dhf))
            }
            Head::Tokens(_) => unreachable!("mapped to TokensAt above"),
            Head::Hidden(grad) => {
                let len = n * model.cfg.hidden;
                let dhf = grad(hf)?;
                anyhow::ensure!(be.len(&dhf) == len, "the head's gradient has {} values; the hidden states have {len}", be.len(&dhf));
                Ok((Vec::new(), dhf))
            }
        })
    }

    /// The final normed hidden states [n, hidden] of a batch, without
    /// gradients (a custom head's evaluation). `adapters: false` runs the
    /// base model alone.
    pub fn final_hidden(&self, be: &B, batch: &Batch, adapters: bool) -> B::Buf {
        self.hidden_states(be, batch, adapters)
    }

    /// The body of `forward_backward_with`: `head(model, hf)` returns its
    /// result and ∂L/∂hf.
    fn train_pass<R>(
        &mut self,
        be: &B,
        batch: &Batch,
        opts: BackwardOpts,
        head: impl FnOnce(&Self, &B::Buf) -> anyhow::Result<(R, B::Buf)>,
    ) -> anyhow::Result<R> {
        let up = upload(be, batch);
        let (n, h) = (batch.n_tokens(), self.cfg.hidden);
        let mut x = self.embed(be, &up.ids, n);

        // Forward, keeping either every layer's activations or only its input.
        let mut saved_acts: Vec<LayerActs<B>> = Vec::new();
        let mut saved_inputs: Vec<B::Buf> = Vec::new();
        let ctx = step_ctx(&up, &self.rope_tables, batch, opts.dropout_seed, true);
        let pass = self.gemma4_pass(be, &up.ids, &x, &ctx);
        let ctx = StepCtx { g4: pass.as_ref(), ..ctx };
        for (li, l) in self.layers.iter().enumerate() {
            be.enter(Phase::Forward { layer: li });
            let (x_out, acts) = layer::forward(be, &self.cfg, l, li, x, &ctx);
            if opts.gradient_checkpointing {
                saved_inputs.push(acts.x_in);
            } else {
                saved_acts.push(acts);
            }
            x = x_out;
        }
        be.enter(Phase::HeadLoss);
        let mut hf = be.zeros(n * h);
        let mut inv_f = be.zeros_f32(n);
        be.rmsnorm(&x, &self.final_norm, &mut hf, &mut inv_f, NormShape { rows: n, hidden: h, plus_one: self.cfg.norm_plus_one }, self.cfg.rms_norm_eps);

        let (result, dhf) = head(self, &hf)?;
        drop(hf);
        be.enter(Phase::FinalNormBackward);
        let mut dx = be.zeros(n * h);
        be.rmsnorm_backward(&dhf, &x, &self.final_norm, &inv_f, &mut dx, NormShape { rows: n, hidden: h, plus_one: self.cfg.norm_plus_one });
        drop(dhf);

        // Backward through the layers in reverse (the embedding is frozen).
        let (cfg, layers) = (&self.cfg, &mut self.layers);
        for li in (0..layers.len()).rev() {
            let acts = if opts.gradient_checkpointing {
                let x_in = saved_inputs.pop().expect("one saved input per layer");
                be.enter(Phase::Recompute { layer: li });
                layer::forward(be, cfg, &layers[li], li, x_in, &ctx).1
            } else {
                saved_acts.pop().expect("one saved activation set per layer")
            };
            be.enter(Phase::Backward { layer: li });
            layer::backward(be, cfg, &mut layers[li], li, &acts, &mut dx, &ctx);
        }
        if let Some(pass) = &pass {
            pass.backward(be, cfg, self.ple.as_ref(), &mut layers[0], &ctx);
        }
        Ok(result)
    }

    /// Gemma 4's per-pass state (PLE inputs from the ids and the scaled
    /// embeddings x); None for other families.
    pub(crate) fn gemma4_pass(&self, be: &B, ids: &B::IntBuf, x: &B::Buf, ctx: &StepCtx<B>) -> Option<Gemma4Pass<B>> {
        self.cfg.gemma4.as_ref()?;
        Some(Gemma4Pass::new(be, &self.cfg, self.ple.as_ref(), &self.layers[0], ids, x, ctx))
    }
}

/// Σ in f64 in token order: deterministic and independent of chunking.
fn sum_f64(xs: &[f32]) -> f64 {
    xs.iter().map(|&x| x as f64).sum()
}
