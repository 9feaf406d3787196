//! Text generation with a KV cache: the prompt runs through the model in one
//! pass (prefill), each layer keeping its rotated keys and values; then one
//! token at a time runs through it, attending to the cache
//! (`Backend::decode_attention`) instead of recomputing the sequence. Only
//! the last position's logits are computed (f32). LoRA adapters apply as in
//! the forward pass, without dropout.
//!
//! A linear-attention layer (Qwen3.5's gated delta-net) keeps no keys and
//! values but its state: the conv's last inputs and the recurrent state,
//! in the same two per-layer slots (`Backend::delta_net_decode`).
//!
//! Each layer runs the training forward (`layer::forward_with`) with its
//! attention swapped for attention against the cache, so cached generation
//! reproduces `Model::logits` of the whole sequence; tests/generate.rs holds
//! the two to each other on every fixture model. `Model::generate` is
//! `Model::generate_batch` (generate_batch.rs) with one prompt.

use super::Model;
use super::generate_batch::BatchOpts;
use super::sample::SamplingParams;
use super::layer::{self, Mixing, StepCtx};
use crate::backend::{Backend, DeltaState, MatShape, NormShape, Qkv, Varlen};
use anyhow::{Result, bail};
use std::time::Duration;

/// Keys and values of one sequence, per layer, on the backend.
pub struct KvCache<B: Backend> {
    /// Per layer, [capacity, n_kv_heads, head_dim] (activation storage):
    /// rows 0..len are filled. A linear-attention layer holds its conv
    /// state [kernel−1, conv_dim] in `k` and its recurrent state
    /// [v_heads, k_dim, v_dim] in `v` (f32).
    pub(super) k: Vec<B::Buf>,
    pub(super) v: Vec<B::Buf>,
    capacity: usize,
    len: usize,
}

impl<B: Backend> KvCache<B> {
    /// Positions the cache can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Positions held (the next token goes to position `len`).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// What `Model::generate` does.
#[derive(Debug, Clone)]
pub struct GenerateOpts {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    pub seed: u64,
    /// Generation stops after any of these (the model's EOS ids); the stop
    /// token is part of the output.
    pub stop_tokens: Vec<u32>,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// A stop token was generated (it is the last output token).
    Eos,
    /// max_new_tokens were generated.
    MaxNewTokens,
    /// The sequence reached the model's max_position_embeddings.
    ContextFull,
}

/// The output of `Model::generate`.
#[derive(Debug, Clone)]
pub struct Generation {
    /// The new tokens (the prompt is not repeated).
    pub tokens: Vec<u32>,
    pub stop: StopReason,
    pub prompt_tokens: usize,
    /// The prompt's forward pass and the first token's choice.
    pub prefill_time: Duration,
    /// Every later step (one forward of one token and its choice each).
    pub decode_time: Duration,
}

impl Generation {
    /// Prompt tokens per second of prefill.
    pub fn prefill_tokens_per_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_time.as_secs_f64().max(1e-9)
    }

    /// Generated tokens per second after the first (each costs one step).
    pub fn decode_tokens_per_s(&self) -> f64 {
        self.tokens.len().saturating_sub(1) as f64 / self.decode_time.as_secs_f64().max(1e-9)
    }
}


/// A layer's cache slots in one generation step: its own (keys and
/// values, or a delta-net's states), or its producer's keys and values (a
/// Gemma 4 K/V-sharing layer, which stores nothing).
pub(super) enum KvSlot<'a, B: Backend> {
    Own(&'a mut B::Buf, &'a mut B::Buf),
    Shared(&'a B::Buf, &'a B::Buf),
}

impl<B: Backend> Model<B> {
    /// The cache a generation of `max_new_tokens` after a prompt of
    /// `prompt_len` tokens needs, capped at the model's
    /// max_position_embeddings (when config.json gives it).
    pub fn cache_capacity(&self, prompt_len: usize, max_new_tokens: usize) -> usize {
        let want = prompt_len.saturating_add(max_new_tokens);
        self.cfg.max_position_embeddings.map_or(want, |m| want.min(m))
    }

    /// An empty cache for `capacity` positions.
    pub fn new_kv_cache(&self, be: &B, capacity: usize) -> KvCache<B> {
        let (k, v) = (0..self.cfg.n_layers).map(|li| self.cache_slots(be, li, 1, capacity)).unzip();
        KvCache { k, v, capacity, len: 0 }
    }

    /// Values per sequence of layer `li`'s two cache slots: keys and values
    /// of `capacity` positions, or a linear-attention layer's conv and
    /// recurrent states (whose size does not depend on the length).
    pub(super) fn cache_region(&self, li: usize, capacity: usize) -> (usize, usize) {
        match (&self.layers[li].delta, self.cfg.delta) {
            (Some(_), Some(d)) => ((d.conv_kernel - 1) * d.conv_dim(), d.v_heads * d.k_dim * d.v_dim),
            // A Gemma 4 K/V-sharing layer attends to its producer's slots.
            _ if self.kv_source(li).is_some() => (0, 0),
            _ => {
                let (d, kv_heads) = layer::head_dims(&self.cfg, &self.layers[li]);
                (capacity * kv_heads * d, capacity * kv_heads * d)
            }
        }
    }

    /// The earlier layer whose cached keys and values layer `li` reads
    /// (a Gemma 4 K/V-sharing layer), if any.
    pub(super) fn kv_source(&self, li: usize) -> Option<usize> {
        self.layers[li].g4.as_ref().and_then(|g| g.kv_source)
    }

    /// Layer `li`'s two zeroed cache slots for `seqs` sequences.
    pub(super) fn cache_slots(&self, be: &B, li: usize, seqs: usize, capacity: usize) -> (B::Buf, B::Buf) {
        let (k, v) = self.cache_region(li, capacity);
        if self.layers[li].delta.is_some() {
            // The states stay f32 (as transformers keeps them).
            (be.zeros_f32(seqs * k), be.zeros_f32(seqs * v))
        } else {
            (be.zeros(seqs * k), be.zeros(seqs * v))
        }
    }

    /// Run `ids`, the next tokens of the cached sequence, through the model:
    /// their keys and values join the cache, and the logits of the last of
    /// them come back (f32, [vocab]). An empty cache is a prefill (one
    /// attention pass over `ids`); otherwise the new tokens attend to the
    /// cache.
    pub fn forward_cached(&self, be: &B, cache: &mut KvCache<B>, ids: &[u32]) -> Result<Vec<f32>> {
        let cfg = &self.cfg;
        let (n, past, h) = (ids.len(), cache.len, cfg.hidden);
        if n == 0 {
            bail!("no tokens to run through the model");
        }
        if cache.k.len() != cfg.n_layers {
            bail!("the KV cache has {} layers, the model {}", cache.k.len(), cfg.n_layers);
        }
        if past + n > cache.capacity {
            bail!(
                "{past} cached + {n} new tokens exceed the KV cache's {} positions{}",
                cache.capacity,
                cfg.max_position_embeddings.map(|m| format!(" (max_position_embeddings is {m})")).unwrap_or_default()
            );
        }
        if let Some((i, id)) = ids.iter().enumerate().find(|(_, id)| **id as usize >= cfg.vocab) {
            bail!("token id {id} (new token {i}) is outside the vocabulary (size {})", cfg.vocab);
        }
        let ids_i32: Vec<i32> = ids.iter().map(|&t| t as i32).collect();
        let positions: Vec<i32> = (past..past + n).map(|p| p as i32).collect();
        let ids_buf = be.upload_ints(&ids_i32);
        let pos_buf = be.upload_ints(&positions);
        let cu = be.upload_ints(&[0, n as i32]);

        let mut x = self.embed(be, &ids_buf, n);
        let seq_lens = [n];
        let ctx = self.step_ctx_for(n, 1, &pos_buf, &cu, &seq_lens, past + n - 1);
        let pass = self.gemma4_pass(be, &ids_buf, &x, &ctx);
        let ctx = StepCtx { g4: pass.as_ref(), ..ctx };
        for li in 0..self.layers.len() {
            let slot = match self.kv_source(li) {
                Some(src) => KvSlot::Shared(&cache.k[src], &cache.v[src]),
                None => KvSlot::Own(&mut cache.k[li], &mut cache.v[li]),
            };
            x = self.layer_step(be, li, x, past, &ctx, slot);
        }
        cache.len += n;

        // Final norm and LM head on the last position only.
        let mut last = be.zeros(h);
        be.copy_slice(&x, (n - 1) * h, &mut last, 0, h);
        let mut normed = be.zeros(h);
        let mut inv = be.zeros_f32(1);
        be.rmsnorm(&last, &self.final_norm, &mut normed, &mut inv, NormShape { rows: 1, hidden: h, plus_one: cfg.norm_plus_one }, cfg.rms_norm_eps);
        let mut logits = be.zeros_f32(cfg.vocab);
        be.linear(&normed, self.head(), None, &mut logits, MatShape { m: 1, k: h, n: cfg.vocab });
        if let Some(c) = cfg.final_softcap {
            be.softcap(&mut logits, c);
        }
        Ok(be.download(&logits))
    }

    /// One decoder layer over `n` new tokens at positions past..past+n: the
    /// training forward (`layer::forward_with`) with attention against the
    /// cache, after storing the new rotated keys and values in its own slot
    /// (a sharing layer's producer has stored them already).
    fn layer_step(&self, be: &B, li: usize, x: B::Buf, past: usize, ctx: &StepCtx<B>, slot: KvSlot<'_, B>) -> B::Buf {
        let cfg = &self.cfg;
        let layer = &self.layers[li];
        let (n, cu_seqlens) = (ctx.n, ctx.cu_seqlens);
        let (d, kv_heads) = layer::head_dims(cfg, layer);
        let kvd = kv_heads * d;
        let shape = layer::layer_attn_shape(cfg, layer, n, n);
        // With an empty cache the whole sequence is new: the varlen (flash)
        // attention; otherwise the new tokens attend to the cache.
        let attend = move |q: &B::Buf, k: &B::Buf, v: &B::Buf, kc: &B::Buf, vc: &B::Buf, attn: &mut B::Buf, lse: &mut B::Buf| {
            if past == 0 {
                be.attention(Qkv { q, k, v }, Varlen { cu_seqlens, n_seqs: 1 }, shape, attn, lse);
            } else {
                be.decode_attention(q, kc, vc, past, shape, attn);
            }
        };
        let mixing = match slot {
            KvSlot::Own(conv, rec) if layer.delta.is_some() => Mixing::DeltaState(DeltaState { conv, rec }),
            KvSlot::Own(kc, vc) => Mixing::Attend(Box::new(move |q, k, v, attn, lse| {
                be.copy_slice(k, 0, kc, past * kvd, n * kvd);
                be.copy_slice(v, 0, vc, past * kvd, n * kvd);
                attend(q, k, v, kc, vc, attn, lse);
            })),
            KvSlot::Shared(kc, vc) => Mixing::Attend(Box::new(move |q, k, v, attn, lse| attend(q, k, v, kc, vc, attn, lse))),
        };
        layer::forward_with(be, cfg, layer, li, x, ctx, mixing).0
    }

    /// The context of a generation forward of `n` tokens in `n_seqs`
    /// sequences whose largest position is `max_position` (transformers
    /// picks long-rope's table from it, in a cached decode too).
    pub(super) fn step_ctx_for<'a>(
        &'a self,
        n: usize,
        n_seqs: usize,
        positions: &'a B::IntBuf,
        cu_seqlens: &'a B::IntBuf,
        seq_lens: &'a [usize],
        max_position: usize,
    ) -> StepCtx<'a, B> {
        StepCtx {
            n,
            n_seqs,
            max_seqlen: n / n_seqs.max(1),
            positions,
            cu_seqlens,
            seq_lens,
            ropes: &self.rope_tables,
            max_position,
            dropout_seed: None,
            adapters: true,
            g4: None,
        }
    }

    /// Generate up to `opts.max_new_tokens` tokens after `prompt`: one
    /// prefill pass, then one cached step per token (`generate_batch` with
    /// one prompt, whose sampler seed is `opts.seed`). `on_token` sees each
    /// token as soon as it is chosen (for streaming); an error from it stops
    /// generation and is returned.
    pub fn generate(
        &self,
        be: &B,
        prompt: &[u32],
        opts: &GenerateOpts,
        mut on_token: impl FnMut(u32) -> Result<()>,
    ) -> Result<Generation> {
        let batch = BatchOpts {
            max_new_tokens: opts.max_new_tokens,
            sampling: opts.sampling,
            seed: opts.seed,
            stop_tokens: opts.stop_tokens.clone(),
        };
        let g = self.generate_batch_with(be, &[prompt.to_vec()], &batch, |_, t| on_token(t))?;
        let seq = g.seqs.into_iter().next().expect("one prompt, one sequence");
        Ok(Generation {
            tokens: seq.tokens,
            stop: seq.stop,
            prompt_tokens: prompt.len(),
            prefill_time: g.prefill_time,
            decode_time: g.decode_time,
        })
    }
}
