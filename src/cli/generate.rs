//! `ferrotune generate`: text from a model (and adapter) with a KV cache;
//! timings on stderr. One sequence is streamed to stdout as it is
//! generated; several (--prompts rows × --num-return-sequences) are
//! generated as one batch (`Model::generate_batch`) and each printed when
//! done, under a header naming its prompt row and sequence number.
//!
//! Sampling defaults: temperature 0.7 (0 = greedy), top-k, top-p and min-p
//! off. Generation stops at max_new_tokens or (unless --ignore-eos) at an
//! end-of-sequence token: the eos_token_id of config.json and of
//! generation_config.json (each an int or a list), and the tokenizer's
//! eos_token.

use super::generate_prompts::{PromptRow, PromptText, Render, read_prompts_file};
use super::{Opened, open_device};
use crate::adapter::peft;
use crate::backend::Backend;
use crate::model::Model;
use crate::model::checkpoint::{self, Checkpoint};
use crate::model::generate::{GenerateOpts, StopReason};
use crate::model::generate_batch::BatchOpts;
use crate::model::sample::SamplingParams;
use anyhow::{Result, bail};
use clap::Args;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Args)]
pub struct GenerateArgs {
    /// HuggingFace model directory (config.json, safetensors, tokenizer),
    /// or a hub id ("org/name") already in the HuggingFace cache.
    #[arg(long)]
    model: String,
    /// PEFT LoRA adapter directory to apply.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The prompt text (tokenized with the tokenizer's special tokens, e.g. BOS).
    #[arg(long, required_unless_present = "prompts", conflicts_with = "prompts")]
    prompt: Option<String>,
    /// A JSONL file of prompts instead of --prompt, one per row:
    /// {"prompt": "text"} or {"prompt": [{"role": "user", "content": "..."}, ...]}
    /// (a conversation, rendered with the chat template and the assistant
    /// turn opened). All rows are generated as one batch.
    #[arg(long, value_name = "FILE.jsonl")]
    prompts: Option<PathBuf>,
    /// Sequences to generate per prompt (each with its own seed).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = parse_at_least_1, allow_negative_numbers = true)]
    num_return_sequences: usize,
    /// Send the prompt as a user message through the model's chat template
    /// (with the assistant turn opened).
    #[arg(long)]
    chat: bool,
    /// A system message before the prompt (with --chat).
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// A built-in chat template instead of the tokenizer's own (with --chat,
    /// or --prompts rows that are conversations): chatml or llama3.
    #[arg(long)]
    chat_template: Option<String>,
    /// Most tokens to generate (fewer if the model's max_position_embeddings
    /// is reached first).
    #[arg(long, default_value_t = 128, value_parser = parse_at_least_1, allow_negative_numbers = true)]
    max_new_tokens: usize,
    /// Softmax temperature; 0 = greedy decoding.
    #[arg(long, default_value_t = 0.7, value_parser = parse_temperature, allow_negative_numbers = true)]
    temperature: f32,
    /// Sample among the K most likely tokens only; 0 = off.
    #[arg(long, value_name = "K", default_value_t = 0, allow_negative_numbers = true)]
    top_k: usize,
    /// Sample among the smallest set of most likely tokens whose probability
    /// reaches P, in (0, 1]; 1 = off.
    #[arg(long, value_name = "P", default_value_t = 1.0, value_parser = parse_top_p, allow_negative_numbers = true)]
    top_p: f32,
    /// Drop the tokens less likely than P times the most likely one (after
    /// top-p), in [0, 1]; 0 = off.
    #[arg(long, value_name = "P", default_value_t = 0.0, value_parser = parse_min_p, allow_negative_numbers = true)]
    min_p: f32,
    /// Never stop at an end-of-sequence token: every sequence runs to
    /// --max-new-tokens (or the context's end).
    #[arg(long)]
    ignore_eos: bool,
    /// Seed of the sampler (the same seed gives the same text).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    device: String,
}

fn parse_at_least_1(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("expected a whole number, 1 or more, not \"{s}\"")),
    }
}

fn parse_min_p(s: &str) -> std::result::Result<f32, String> {
    let p: f32 = s.parse().map_err(|_| format!("{s} is not a number"))?;
    if (0.0..=1.0).contains(&p) { Ok(p) } else { Err(format!("must be in [0, 1], got {s}")) }
}

fn parse_temperature(s: &str) -> std::result::Result<f32, String> {
    let t: f32 = s.parse().map_err(|_| format!("{s} is not a number"))?;
    if t.is_finite() && t >= 0.0 { Ok(t) } else { Err(format!("must be a finite number >= 0 (0 = greedy), got {s}")) }
}

fn parse_top_p(s: &str) -> std::result::Result<f32, String> {
    let p: f32 = s.parse().map_err(|_| format!("{s} is not a number"))?;
    if p > 0.0 && p <= 1.0 { Ok(p) } else { Err(format!("must be in (0, 1], got {s}")) }
}

impl GenerateArgs {
    fn sampling(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: (self.top_k > 0).then_some(self.top_k),
            top_p: (self.top_p < 1.0).then_some(self.top_p),
            min_p: (self.min_p > 0.0).then_some(self.min_p),
        }
    }
}

pub fn run(a: GenerateArgs) -> Result<()> {
    a.sampling().validate()?;
    if a.chat_template.is_some() && !a.chat && a.prompts.is_none() {
        bail!("--chat-template applies with --chat (or to the conversation rows of --prompts): add --chat");
    }
    match open_device(&a.device)? {
        Opened::Cpu(be) => generate_on(&be, &a),
        Opened::Cuda(be) => generate_on(&be, &a),
    }
}

/// The prompt rows and their token ids.
fn prompt_rows(a: &GenerateArgs, dir: &Path, tok: &tokenizers::Tokenizer) -> Result<Vec<(PromptRow, Vec<u32>)>> {
    let render = Render { dir, chat: a.chat, system: a.system.as_deref(), template: a.chat_template.as_deref() };
    let rows = match (&a.prompts, &a.prompt) {
        (Some(path), _) => read_prompts_file(path)?
            .into_iter()
            .map(|row| {
                let what = format!("the prompt on line {} of {}", row.line, path.display());
                let ids = render.ids(&row.text, tok, &what)?;
                Ok((row, ids))
            })
            .collect::<Result<Vec<_>>>()?,
        (None, Some(text)) => {
            let row = PromptRow { line: 1, text: PromptText::Text(text.clone()) };
            let ids = render.ids(&row.text, tok, "the prompt (--prompt)")?;
            vec![(row, ids)]
        }
        (None, None) => bail!("give --prompt TEXT or --prompts FILE.jsonl"),
    };
    Ok(rows)
}

/// End-of-sequence ids: config.json's, generation_config.json's and the
/// tokenizer's eos_token, without repeats.
fn stop_tokens(cfg_eos: &[u32], dir: &Path, tok: &tokenizers::Tokenizer) -> Result<Vec<u32>> {
    let mut ids = cfg_eos.to_vec();
    ids.extend(crate::data::tokenizer::generation_eos(dir)?.unwrap_or_default());
    let special = crate::data::chat_template::SpecialTokens::from_tokenizer_dir(dir)?;
    if let Some(id) = special.eos.as_deref().and_then(|s| tok.token_to_id(s)) {
        ids.push(id);
    }
    let mut seen = std::collections::HashSet::new();
    ids.retain(|id| seen.insert(*id));
    Ok(ids)
}

/// Prints the text of the growing list of generated ids as it grows. Each
/// step decodes the whole list and prints what is new, so a character
/// spread over several tokens prints once complete (never half of it).
struct Streamer<'a> {
    tok: &'a tokenizers::Tokenizer,
    ids: Vec<u32>,
    printed: usize,
}

impl Streamer<'_> {
    fn decode(&self) -> Result<String> {
        self.tok.decode(&self.ids, true).map_err(|e| anyhow::anyhow!("cannot decode generated tokens: {e}"))
    }

    fn emit(&mut self, text: &str) -> Result<()> {
        if text.len() > self.printed && text.is_char_boundary(self.printed) {
            let mut out = std::io::stdout().lock();
            out.write_all(&text.as_bytes()[self.printed..])?;
            out.flush()?;
            self.printed = text.len();
        }
        Ok(())
    }

    fn push(&mut self, id: u32) -> Result<()> {
        self.ids.push(id);
        let text = self.decode()?;
        // An incomplete UTF-8 sequence decodes to U+FFFD: wait for the rest.
        if !text.ends_with('\u{FFFD}') {
            self.emit(&text)?;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        let text = self.decode()?;
        self.emit(&text)?;
        println!();
        Ok(())
    }
}

fn generate_on<B: Backend>(be: &B, a: &GenerateArgs) -> Result<()> {
    let t0 = Instant::now();
    let dir = checkpoint::resolve_model_dir(&a.model, None)?;
    let ckpt = Checkpoint::open(&dir)?;
    if let Some(note) = ckpt.untrained_note() {
        eprintln!("{note}");
    }
    let tok = checkpoint::load_tokenizer(&dir)?;
    // The prompts before the weights: a template error should not cost a load.
    let rows = prompt_rows(a, &dir, &tok)?;
    let stop = if a.ignore_eos { Vec::new() } else { stop_tokens(&ckpt.config.eos_token_ids, &dir, &tok)? };
    let max_new_tokens = capped_new_tokens(&ckpt.config, &rows, a.max_new_tokens)?;
    let mut model = Model::load(be, &ckpt)?;
    if let Some(adapter) = &a.adapter {
        let adapter = &checkpoint::resolve_adapter_dir(adapter)?;
        let n = peft::load(be, &mut model, adapter)?;
        eprintln!("adapter: {} ({n} LoRA modules)", adapter.display());
    }
    let lens: Vec<String> = rows.iter().map(|(_, ids)| ids.len().to_string()).collect();
    eprintln!(
        "model: {} ({}), loaded on {} in {:.1}s; prompt{} {} tokens",
        dir.display(),
        model.cfg.family.family,
        be.name(),
        t0.elapsed().as_secs_f64(),
        if rows.len() > 1 { "s" } else { "" },
        lens.join(", "),
    );
    let n_seq = a.num_return_sequences;
    if rows.len() == 1 && n_seq == 1 {
        // One sequence: streamed as it is generated.
        let opts = GenerateOpts { max_new_tokens, sampling: a.sampling(), seed: a.seed, stop_tokens: stop };
        let mut streamer = Streamer { tok: &tok, ids: Vec::new(), printed: 0 };
        let g = model.generate(be, &rows[0].1, &opts, |id| streamer.push(id))?;
        streamer.finish()?;
        eprintln!(
            "prefill: {} tokens in {:.3}s ({:.1} tokens/s); decode: {} tokens in {:.3}s ({:.1} tokens/s); stopped: {}",
            g.prompt_tokens,
            g.prefill_time.as_secs_f64(),
            g.prefill_tokens_per_s(),
            g.tokens.len().saturating_sub(1),
            g.decode_time.as_secs_f64(),
            g.decode_tokens_per_s(),
            stop_reason(g.stop),
        );
        return Ok(());
    }
    // Every row's sequences, contiguous: sequence k of row r is number
    // r·N + k of the batch (its seed follows from --seed and that number).
    let prompts: Vec<Vec<u32>> = rows.iter().flat_map(|(_, ids)| std::iter::repeat_n(ids.clone(), n_seq)).collect();
    let opts = BatchOpts { max_new_tokens, sampling: a.sampling(), seed: a.seed, stop_tokens: stop };
    let g = model.generate_batch(be, &prompts, &opts)?;
    let mut out = std::io::stdout().lock();
    for (i, seq) in g.seqs.iter().enumerate() {
        let (row, k) = (&rows[i / n_seq].0, i % n_seq + 1);
        let text = tok.decode(&seq.tokens, true).map_err(|e| anyhow::anyhow!("cannot decode generated tokens: {e}"))?;
        let source = match &a.prompts {
            Some(p) => format!("{} line {}", p.display(), row.line),
            None => "--prompt".to_string(),
        };
        writeln!(
            out,
            "=== prompt {} ({source}), sequence {k} of {n_seq}: {} tokens, stopped: {} ===",
            i / n_seq + 1,
            seq.tokens.len(),
            stop_reason(seq.stop)
        )?;
        writeln!(out, "{text}")?;
    }
    out.flush()?;
    eprintln!(
        "prefill: {} tokens ({} distinct prompts) in {:.3}s ({:.1} tokens/s); decode: {} tokens in {:.3}s ({:.1} tokens/s); \
         {} sequences, {} batched steps",
        g.prompt_tokens,
        g.prefilled_prompts,
        g.prefill_time.as_secs_f64(),
        g.prefill_tokens_per_s(),
        g.decoded_tokens(),
        g.decode_time.as_secs_f64(),
        g.decode_tokens_per_s(),
        g.seqs.len(),
        g.decode_steps,
    );
    Ok(())
}

fn stop_reason(r: StopReason) -> &'static str {
    match r {
        StopReason::Eos => "end-of-sequence token",
        StopReason::MaxNewTokens => "max-new-tokens",
        StopReason::ContextFull => "max_position_embeddings reached",
    }
}

const UNKNOWN_CONTEXT: usize = 131_072;

/// --max-new-tokens within the context: a generation never runs past
/// max_position_embeddings (the cache is sized for it), so a larger value is
/// capped at what the shortest prompt leaves, with a note (longer prompts
/// stop at the context's end); a prompt that fills the context is an error.
fn capped_new_tokens(cfg: &crate::model::hparams::ModelConfig, rows: &[(PromptRow, Vec<u32>)], asked: usize) -> Result<usize> {
    // Without max_position_embeddings in config.json, a generous bound keeps
    // the cache allocation sane.
    let context = cfg.max_position_embeddings.unwrap_or(UNKNOWN_CONTEXT);
    for (row, ids) in rows {
        let n = ids.len();
        if n >= context {
            let which = if rows.len() > 1 { format!(" on line {}", row.line) } else { String::new() };
            bail!("the prompt{which} is {n} tokens, the model's whole context (max_position_embeddings {context}); shorten it");
        }
    }
    let shortest = rows.iter().map(|(_, ids)| ids.len()).min().unwrap_or(0);
    let room = context - shortest;
    if asked > room {
        eprintln!(
            "note: --max-new-tokens {asked} is more than the context leaves after the {shortest}-token prompt; \
             generating at most {room} (max_position_embeddings {context})"
        );
        return Ok(room);
    }
    Ok(asked)
}
