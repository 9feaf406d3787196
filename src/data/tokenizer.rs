//! The tokenizer as the dataset readers use it: tokenizer.json plus the
//! special tokens of tokenizer_config.json, with the run's `special_tokens:`
//! overrides applied. Overrides may only name tokens the vocabulary already
//! has: a new token would need an embedding row the base model lacks.

use super::chat_template::SpecialTokens;
use crate::model::checkpoint;
use anyhow::{Context, Result, bail};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// generation_config.json's eos_token_id (an int or a list; empty when the
/// file lacks it), or None when the model folder has no such file.
pub fn generation_eos(model_dir: &Path) -> Result<Option<Vec<u32>>> {
    let path = model_dir.join("generation_config.json");
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
    crate::model::hparams::token_ids(v.get("eos_token_id"), "eos_token_id", &path.display().to_string()).map(Some)
}

/// A token's byte range [start, end) in the text it came from.
pub type ByteSpan = (usize, usize);

pub struct TextTokenizer {
    tokenizer: tokenizers::Tokenizer,
    dir: PathBuf,
    tokens: SpecialTokens,
    /// The BOS id the tokenizer's post-processor inserts, when an override
    /// replaces it with another token.
    bos_swap: Option<(u32, u32)>,
}

impl TextTokenizer {
    /// Load `dir`/tokenizer.json and its special tokens; `overrides` is the
    /// run's `special_tokens:` map (bos_token, eos_token, pad_token, unk_token).
    pub fn load(dir: &Path, overrides: &BTreeMap<String, String>) -> Result<TextTokenizer> {
        let tokenizer = checkpoint::load_tokenizer(dir)?;
        let original = SpecialTokens::from_tokenizer_dir(dir)?;
        let mut tokens = original.clone();
        for (key, value) in overrides {
            if tokenizer.token_to_id(value).is_none() {
                bail!(
                    "special_tokens.{key}: \"{value}\" is not a token of {}; ferrotune does not add tokens \
                     (a new token needs an embedding row the base model does not have), so choose one the \
                     vocabulary already has",
                    dir.join("tokenizer.json").display()
                );
            }
            tokens.set(key, value)?;
        }
        let id = |t: &Option<String>| t.as_deref().and_then(|s| tokenizer.token_to_id(s));
        let bos_swap = match (id(&original.bos), id(&tokens.bos)) {
            (Some(a), Some(b)) if a != b => Some((a, b)),
            _ => None,
        };
        Ok(TextTokenizer { tokenizer, dir: dir.to_path_buf(), tokens, bos_swap })
    }

    /// The special-token strings after overrides (what chat templates see).
    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.tokens
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Token ids of `text`; `add_special_tokens` runs the tokenizer's
    /// post-processor (the BOS a Llama tokenizer puts in front).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode_fast(text, add_special_tokens)
            .map_err(|e| anyhow::anyhow!("tokenizer {}: {e}", self.dir.display()))?;
        let mut ids = enc.get_ids().to_vec();
        if let Some((from, to)) = self.bos_swap.filter(|(from, _)| add_special_tokens && ids.first() == Some(from)) {
            debug_assert_eq!(ids[0], from);
            ids[0] = to;
        }
        Ok(ids)
    }

    /// Token ids of `text` (no special tokens added) with each token's byte
    /// range in `text`.
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, Vec<ByteSpan>)> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| anyhow::anyhow!("tokenizer {}: {e}", self.dir.display()))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    /// The text each token of `ids` adds when they are decoded in order
    /// (special tokens kept). Decoded as a stream, so a word-start marker
    /// becomes its space and a character split over several byte tokens
    /// appears whole at the token that completes it (the others give "").
    /// An id outside the tokenizer's vocabulary gives `<id>`.
    pub fn token_pieces(&self, ids: &[u32]) -> Vec<String> {
        let mut stream = self.tokenizer.decode_stream(false);
        let mut pieces = Vec::with_capacity(ids.len());
        for &id in ids {
            // Past the tokenizer's vocabulary (a model's padded embedding rows).
            if self.tokenizer.id_to_token(id).is_none() {
                pieces.push(format!("<{id}>"));
                continue;
            }
            match stream.step(id) {
                Ok(piece) => pieces.push(piece.unwrap_or_default()),
                Err(_) => {
                    // The stream's prefix no longer decodes consistently: start a new one.
                    stream = self.tokenizer.decode_stream(false);
                    pieces.push(self.tokenizer.decode(&[id], false).unwrap_or_else(|_| format!("<{id}>")));
                }
            }
        }
        pieces
    }

    /// The text of `ids`, special tokens left out (TRL decodes completions
    /// for reward functions this way).
    pub fn decode_text(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode(ids, true).map_err(|e| anyhow::anyhow!("cannot decode token ids: {e}"))
    }

    /// The ids that end a sampled completion, as TRL's GRPOTrainer takes
    /// them: the tokenizer's eos_token, then the model's generation config
    /// eos_token_id (generation_config.json's when the file exists, else
    /// `model_eos`, config.json's, as transformers falls back), without
    /// repeats.
    pub fn stop_tokens(&self, model_eos: &[u32], model_dir: &Path) -> Result<Vec<u32>> {
        let mut ids: Vec<u32> = self.eos_id().into_iter().collect();
        match generation_eos(model_dir)? {
            Some(from_file) => ids.extend(from_file),
            None => ids.extend_from_slice(model_eos),
        }
        let mut seen = std::collections::HashSet::new();
        ids.retain(|id| seen.insert(*id));
        Ok(ids)
    }

    /// The pad token's id, if the tokenizer names one that is in its vocabulary.
    pub fn pad_id(&self) -> Option<u32> {
        self.tokens.pad.as_deref().and_then(|s| self.tokenizer.token_to_id(s))
    }

    /// The EOS token's id, if the tokenizer names one that is in its vocabulary.
    pub fn eos_id(&self) -> Option<u32> {
        self.tokens.eos.as_deref().and_then(|s| self.tokenizer.token_to_id(s))
    }

    /// The EOS id, required (alpaca and completion rows end with it).
    pub fn require_eos(&self) -> Result<u32> {
        match (&self.tokens.eos, self.eos_id()) {
            (_, Some(id)) => Ok(id),
            (Some(s), None) => bail!(
                "the eos_token \"{s}\" of {} is not in its vocabulary; set special_tokens: {{eos_token: ...}}",
                self.dir.display()
            ),
            (None, None) => bail!(
                "{} names no eos_token; set special_tokens: {{eos_token: ...}} in the run config",
                self.dir.join("tokenizer_config.json").display()
            ),
        }
    }
}
