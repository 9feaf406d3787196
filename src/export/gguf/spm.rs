//! SentencePiece `tokenizer.model` files: a reader for the pieces of the
//! ModelProto protobuf, and the token list llama.cpp's converter builds
//! from them (`_create_vocab_sentencepiece`), with added tokens laid over it.
//!
//! Only `ModelProto.pieces` (field 1) is read: each piece's text (1),
//! score (2) and type (3). Everything else in the file is skipped.

use std::path::Path;

use anyhow::{bail, Context, Result};

/// llama.cpp token types, as written in `tokenizer.ggml.token_type`.
pub mod toktype {
    pub const NORMAL: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
    pub const UNUSED: i32 = 5;
    pub const BYTE: i32 = 6;
}

/// One SentencePiece vocabulary entry. `kind` is the proto's Type enum
/// (NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6),
/// 1 when the field is absent as in the proto's default.
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    pub piece: String,
    pub score: f32,
    pub kind: u64,
}

/// The pieces of a tokenizer.model, in id order.
pub fn read_pieces(path: &Path) -> Result<Vec<Piece>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse_pieces(&bytes).with_context(|| format!("{} is not a SentencePiece model", path.display()))
}

/// A protobuf wire reader over one message.
struct Wire<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Wire<'a> {
    fn varint(&mut self) -> Result<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let Some(&b) = self.buf.get(self.pos) else { bail!("truncated varint at byte {}", self.pos) };
            self.pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        bail!("varint longer than 10 bytes at byte {}", self.pos)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let Some(end) = end else { bail!("field of {n} bytes at byte {} runs past the end", self.pos) };
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    /// The next (field number, wire type), or None at the end.
    fn key(&mut self) -> Result<Option<(u64, u64)>> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let k = self.varint()?;
        Ok(Some((k >> 3, k & 7)))
    }

    /// Skips a value of the given wire type (groups are not used by SentencePiece).
    fn skip(&mut self, wire: u64) -> Result<()> {
        match wire {
            0 => {
                self.varint()?;
            }
            1 => {
                self.take(8)?;
            }
            2 => {
                let n = self.varint()? as usize;
                self.take(n)?;
            }
            5 => {
                self.take(4)?;
            }
            w => bail!("unsupported protobuf wire type {w} at byte {}", self.pos),
        }
        Ok(())
    }
}

/// The pieces of a serialized ModelProto.
pub fn parse_pieces(buf: &[u8]) -> Result<Vec<Piece>> {
    let mut w = Wire { buf, pos: 0 };
    let mut pieces = Vec::new();
    while let Some((field, wire)) = w.key()? {
        if field == 1 && wire == 2 {
            let n = w.varint()? as usize;
            let msg = w.take(n)?;
            pieces.push(parse_piece(msg).with_context(|| format!("piece {}", pieces.len()))?);
        } else {
            w.skip(wire)?;
        }
    }
    if pieces.is_empty() {
        bail!("it holds no pieces");
    }
    Ok(pieces)
}

fn parse_piece(buf: &[u8]) -> Result<Piece> {
    let mut w = Wire { buf, pos: 0 };
    let mut p = Piece { piece: String::new(), score: 0.0, kind: 1 };
    while let Some((field, wire)) = w.key()? {
        match (field, wire) {
            (1, 2) => {
                let n = w.varint()? as usize;
                p.piece = String::from_utf8(w.take(n)?.to_vec()).context("piece text is not UTF-8")?;
            }
            (2, 5) => p.score = f32::from_le_bytes(w.take(4)?.try_into().expect("4 bytes")),
            (3, 0) => p.kind = w.varint()?,
            _ => w.skip(wire)?,
        }
    }
    Ok(p)
}

/// llama.cpp's token type for a piece, as the converter asks the
/// SentencePiece processor (user-defined pieces count as NORMAL).
pub fn piece_toktype(kind: u64) -> i32 {
    match kind {
        2 => toktype::UNKNOWN,
        3 => toktype::CONTROL,
        5 => toktype::UNUSED,
        6 => toktype::BYTE,
        _ => toktype::NORMAL,
    }
}

/// Tokens, scores and types of a GGUF vocabulary.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenList {
    pub tokens: Vec<String>,
    pub scores: Vec<f32>,
    pub types: Vec<i32>,
}

/// The text of an added token that is not special: SentencePiece's '▁'
/// stands for a space, and llama.cpp expects it pre-normalized.
pub fn user_defined_text(s: &str) -> String {
    s.replace('\u{2581}', " ")
}

/// Added tokens that the converter treats as control tokens even when the
/// tokenizer does not mark them special.
pub fn looks_special(t: &str) -> bool {
    matches!(t, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (t.starts_with("<|") && t.ends_with("|>"))
        || (t.starts_with("<\u{ff5c}") && t.ends_with("\u{ff5c}>"))
        || (t.starts_with("<unused") && t.ends_with('>'))
}

/// An id given in a tokenizer file, as an index.
pub fn token_id(v: &serde_json::Value, file: &Path, what: &str) -> Result<usize> {
    v.as_u64()
        .map(|i| i as usize)
        .with_context(|| format!("{}: {what} has id {v}, expected a non-negative integer", file.display()))
}

/// `_create_vocab_sentencepiece`: the model's pieces padded with `[PAD{i}]`
/// up to `vocab_size` (from config.json; the model's size when absent),
/// then added_tokens.json and tokenizer_config's added_tokens_decoder laid
/// over them. Ids at or past `vocab_size` are ignored, as the converter does.
pub fn sentencepiece_vocab(dir: &Path, vocab_size: Option<usize>) -> Result<TokenList> {
    let model = dir.join("tokenizer.model");
    let pieces = read_pieces(&model)?;
    let n = vocab_size.filter(|&n| n > 0).unwrap_or(pieces.len());
    let mut v = TokenList {
        tokens: (0..n).map(|i| format!("[PAD{i}]")).collect(),
        scores: vec![-10000.0; n],
        types: vec![toktype::UNUSED; n],
    };
    for (i, p) in pieces.iter().take(n).enumerate() {
        v.tokens[i] = p.piece.clone();
        v.scores[i] = p.score;
        v.types[i] = piece_toktype(p.kind);
    }
    let added = dir.join("added_tokens.json");
    if added.is_file() {
        for (text, id) in read_json_object(&added)? {
            let id = token_id(&id, &added, &format!("token {text:?}"))?;
            if id < n {
                v.tokens[id] = text;
                v.scores[id] = -1000.0;
                v.types[id] = toktype::USER_DEFINED;
            }
        }
    }
    let tc = dir.join("tokenizer_config.json");
    if tc.is_file() {
        for (id, text, special) in added_tokens_decoder(&tc)? {
            if id >= n {
                continue;
            }
            if special || looks_special(&text) {
                v.types[id] = toktype::CONTROL;
                v.tokens[id] = text;
            } else {
                v.types[id] = toktype::USER_DEFINED;
                v.tokens[id] = user_defined_text(&text);
            }
            v.scores[id] = -1000.0;
        }
    }
    Ok(v)
}

/// A JSON file whose top level is an object, as (key, value) pairs.
pub fn read_json_object(path: &Path) -> Result<Vec<(String, serde_json::Value)>> {
    match read_json(path)? {
        serde_json::Value::Object(m) => Ok(m.into_iter().collect()),
        _ => bail!("{}: expected a JSON object at the top level", path.display()),
    }
}

/// tokenizer_config.json's `added_tokens_decoder` as (id, content, special).
pub fn added_tokens_decoder(path: &Path) -> Result<Vec<(usize, String, bool)>> {
    let mut out = Vec::new();
    for (key, val) in read_json_object(path)? {
        if key != "added_tokens_decoder" {
            continue;
        }
        let serde_json::Value::Object(m) = val else {
            bail!("{}: added_tokens_decoder must be an object of id -> token", path.display())
        };
        for (id, tok) in m {
            let Ok(i) = id.parse::<usize>() else {
                bail!("{}: added_tokens_decoder key {id:?} is not a token id", path.display())
            };
            let Some(content) = tok.get("content").and_then(|c| c.as_str()) else {
                bail!("{}: added_tokens_decoder[{id}] has no string \"content\"", path.display())
            };
            let special = tok.get("special").and_then(|s| s.as_bool()).unwrap_or(false);
            out.push((i, content.to_string(), special));
        }
    }
    Ok(out)
}

/// Phi-3's own SentencePiece list: the model's pieces padded with
/// `[PAD{i}]` to vocab_size (config.json; the model's size when absent),
/// then added_tokens.json, tokenizer_config's added_tokens_decoder and
/// tokenizer.json's added_tokens over them (CONTROL when special, else
/// USER_DEFINED, score -1000). Unlike the generic list, an added id past
/// vocab_size is an error here, as it is in the converter.
pub fn phi3_vocab(dir: &Path, vocab_size: Option<usize>) -> Result<TokenList> {
    let model = dir.join("tokenizer.model");
    let pieces = read_pieces(&model)?;
    let n = vocab_size.unwrap_or(pieces.len());
    if pieces.len() > n {
        bail!("{}: {} pieces, more than config.json's vocab_size {n}", model.display(), pieces.len());
    }
    let mut v = TokenList {
        tokens: (0..n).map(|i| format!("[PAD{i}]")).collect(),
        scores: vec![-10000.0; n],
        types: vec![toktype::UNUSED; n],
    };
    for (i, p) in pieces.into_iter().enumerate() {
        v.tokens[i] = p.piece;
        v.scores[i] = p.score;
        v.types[i] = piece_toktype(p.kind);
    }
    let mut over = |id: usize, text: String, kind: i32, file: &Path| -> Result<()> {
        if id >= n {
            bail!("{}: token {text:?} has id {id}, not below config.json's vocab_size {n}", file.display());
        }
        v.tokens[id] = text;
        v.scores[id] = -1000.0;
        v.types[id] = kind;
        Ok(())
    };
    let added = dir.join("added_tokens.json");
    if added.is_file() {
        for (text, id) in read_json_object(&added)? {
            let id = token_id(&id, &added, &format!("token {text:?}"))?;
            if id < n {
                over(id, text, toktype::USER_DEFINED, &added)?;
            }
        }
    }
    let tc_path = dir.join("tokenizer_config.json");
    if tc_path.is_file() {
        for (id, text, special) in added_tokens_decoder(&tc_path)? {
            over(id, text, if special { toktype::CONTROL } else { toktype::USER_DEFINED }, &tc_path)?;
        }
    }
    let tj_path = dir.join("tokenizer.json");
    if tj_path.is_file() {
        let tj = read_json(&tj_path)?;
        for t in tj.get("added_tokens").and_then(|a| a.as_array()).into_iter().flatten() {
            let id = token_id(t.get("id").unwrap_or(&serde_json::Value::Null), &tj_path, "an added token")?;
            let Some(text) = t.get("content").and_then(|c| c.as_str()) else {
                bail!("{}: added token {id} has no string \"content\"", tj_path.display())
            };
            let special = t.get("special").and_then(|s| s.as_bool()).unwrap_or(false);
            over(id, text.to_string(), if special { toktype::CONTROL } else { toktype::USER_DEFINED }, &tj_path)?;
        }
    }
    Ok(v)
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf/spm/tokenizer.model")
    }

    #[test]
    fn reads_the_fixture_model() {
        // The fixture's trainer options fix these ids and types.
        let p = read_pieces(&fixture()).unwrap();
        assert_eq!(p.len(), 320);
        let head: Vec<(&str, u64)> = p[..7].iter().map(|p| (p.piece.as_str(), p.kind)).collect();
        assert_eq!(
            head,
            [("<unk>", 2), ("<s>", 3), ("</s>", 3), ("<pad>", 3), ("<start_of_turn>", 4), ("<end_of_turn>", 4), ("<0x00>", 6)]
        );
        assert_eq!(p[6 + 255].piece, "<0xFF>");
        // BPE pieces score by merge order: 0, -1, -2, ...
        assert_eq!(p[262].score, 0.0);
        assert_eq!(p[263].score, -1.0);
    }

    #[test]
    fn bad_models_are_errors() {
        assert!(parse_pieces(&[]).is_err());
        assert!(parse_pieces(&[0x0a, 0x05, 0x0a]).is_err());
        let e = read_pieces(Path::new("/nonexistent/tokenizer.model")).unwrap_err();
        assert!(format!("{e:#}").contains("/nonexistent/tokenizer.model"));
    }
}
