//! The tokenizer as GGUF metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`),
//! written as llama.cpp's convert_hf_to_gguf.py writes it for each
//! architecture: byte-level BPE (`gpt2`, with the pre-tokenizer named by the
//! fingerprint of its encoding of a check text), SentencePiece models
//! (`llama`, from tokenizer.model), byte-fallback BPE tokenizer.json files
//! without a tokenizer.model (Mistral/Llama 2 style), and Phi-3's own
//! SentencePiece list. The files beside the vocabulary are read in `special`.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};

use super::special::{SpecialVocab, DEFAULT_TYPES};
use super::spm::{self, toktype, TokenList};
use super::types::{Kvs, Value};

pub struct VocabOptions {
    /// the pre-tokenizer name to write when the tokenizer's hash is not one llama.cpp knows
    pub pre: Option<String>,
}

pub struct Vocab {
    /// tokenizer.ggml.* keys (and tokenizer.chat_template, add_space_prefix …) in the converter's order
    pub kvs: Kvs,
    /// Gemma 3 truncates token_embd to the real vocabulary: Some(rows) when the converter does.
    pub n_vocab_real: Option<usize>,
}

/// `arch` is the GGUF architecture name: "llama" (Llama and Mistral), "qwen2", "qwen3", "gemma2",
/// "gemma3", "phi3". `hparams` is config.json as the converter sees it (text_config merged into the root
/// already by the caller; use vocab_size and the *_token_id keys from it).
pub fn vocab(dir: &Path, arch: &str, hparams: &serde_json::Value, opts: &VocabOptions) -> Result<Vocab> {
    let vocab_size = hparams.get("vocab_size").and_then(|v| v.as_u64()).map(|v| v as usize);
    let has_spm = dir.join("tokenizer.model").is_file();
    let mut kvs = Kvs::default();
    let mut n_vocab_real = None;
    match arch {
        "llama" => llama(dir, vocab_size, opts, &mut kvs)?,
        "qwen2" | "qwen3" if has_spm => {
            sentencepiece(dir, hparams, &mut kvs)?;
        }
        "qwen2" | "qwen3" => gpt2(dir, arch, vocab_size, opts, &mut kvs)?,
        "gemma2" | "gemma3" if has_spm => {
            let n = sentencepiece(dir, hparams, &mut kvs)?;
            kvs.set("tokenizer.ggml.add_space_prefix", Value::Bool(false));
            if arch == "gemma3" {
                n_vocab_real = Some(n);
            }
        }
        "gemma2" => bail!(
            "{}: Gemma 2 needs its SentencePiece tokenizer.model (llama.cpp reads the vocabulary from it); \
             copy it from the base model",
            dir.join("tokenizer.model").display()
        ),
        "gemma3" => {
            gpt2(dir, arch, vocab_size, opts, &mut kvs)?;
            n_vocab_real = Some(tokenizer_json_len(dir)?);
        }
        "phi3" => phi3(dir, vocab_size, opts, &mut kvs)?,
        _ => bail!("no GGUF tokenizer export for architecture {arch:?}"),
    }
    Ok(Vocab { kvs, n_vocab_real })
}

/// The token list as tokenizer.ggml.{tokens,scores,token_type}.
fn put_tokens(kvs: &mut Kvs, model: &str, pre: &str, v: TokenList, scores: bool) {
    kvs.set("tokenizer.ggml.model", Value::Str(model.into()));
    kvs.set("tokenizer.ggml.pre", Value::Str(pre.into()));
    kvs.set("tokenizer.ggml.tokens", Value::ArrStr(v.tokens));
    if scores {
        kvs.set("tokenizer.ggml.scores", Value::ArrF32(v.scores));
    }
    kvs.set("tokenizer.ggml.token_type", Value::ArrI32(v.types));
}

/// Llama and Mistral: `add_prefix_space` from tokenizer_config first, then
/// tokenizer.model, else a byte-fallback tokenizer.json, else byte-level BPE.
fn llama(dir: &Path, vocab_size: Option<usize>, opts: &VocabOptions, kvs: &mut Kvs) -> Result<()> {
    let tc = crate::model::checkpoint::load_tokenizer_config(dir)?;
    if let Some(b) = tc.as_ref().and_then(|c| c.get("add_prefix_space")).and_then(|v| v.as_bool()) {
        kvs.set("tokenizer.ggml.add_space_prefix", Value::Bool(b));
    }
    if dir.join("tokenizer.model").is_file() {
        let hp = serde_json::json!({ "vocab_size": vocab_size });
        sentencepiece(dir, &hp, kvs)?;
    } else if is_llama_hf(dir)? {
        llama_hf(dir, kvs)?;
    } else {
        gpt2(dir, "llama", vocab_size, opts, kvs)?;
    }
    match vocab_size {
        // CodeLlama's infill tokens (llama.cpp has a key for EOT only).
        Some(32016) => {
            let types = ["prefix", "suffix", "middle", "eot"];
            let mut sv = SpecialVocab::load(dir, false, &types, None)?;
            let src = dir.join("config.json");
            for (t, id) in types.iter().zip(32007..) {
                sv.set_id(t, Some(&serde_json::json!(id)), &src)?;
            }
            sv.add_to(kvs);
        }
        // Granite's small models.
        Some(49152) => kvs.set("tokenizer.ggml.add_bos_token", Value::Bool(false)),
        _ => {}
    }
    Ok(())
}

/// `_set_vocab_sentencepiece`; returns the token count.
fn sentencepiece(dir: &Path, hparams: &serde_json::Value, kvs: &mut Kvs) -> Result<usize> {
    let size = ["vocab_size_per_layer_input", "vocab_size"]
        .iter()
        .find_map(|k| hparams.get(*k).filter(|v| !v.is_null()))
        .and_then(|v| v.as_u64())
        .map(|v| v as usize);
    let v = spm::sentencepiece_vocab(dir, size)?;
    let n = v.tokens.len();
    put_tokens(kvs, "llama", "default", v, true);
    SpecialVocab::load(dir, false, &DEFAULT_TYPES, Some(n))?.add_to(kvs);
    Ok(n)
}

fn read_tokenizer_json(dir: &Path) -> Result<serde_json::Value> {
    let path = dir.join("tokenizer.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

/// Gemma 3's real vocabulary without tokenizer.model: model.vocab plus added_tokens.
fn tokenizer_json_len(dir: &Path) -> Result<usize> {
    let tj = read_tokenizer_json(dir)?;
    let vocab = tj.get("model").and_then(|m| m.get("vocab")).and_then(|v| v.as_object());
    let added = tj.get("added_tokens").and_then(|v| v.as_array());
    match (vocab, added) {
        (Some(v), Some(a)) => Ok(v.len() + a.len()),
        _ => bail!("{}: expected model.vocab (object) and added_tokens (list)", dir.join("tokenizer.json").display()),
    }
}

/// Whether tokenizer.json is a byte-fallback BPE with a Sequence decoder
/// (what the converter's LlamaHfVocab accepts; Llama 3's ignore_merges BPE
/// and everything else go to the byte-level BPE path).
fn is_llama_hf(dir: &Path) -> Result<bool> {
    if !dir.join("tokenizer.json").is_file() {
        return Ok(false);
    }
    let tj = read_tokenizer_json(dir)?;
    let model = &tj["model"];
    let flag = |k: &str, default: bool| model.get(k).and_then(|v| v.as_bool()).unwrap_or(default);
    let bpe = model.get("type").and_then(|t| t.as_str()) == Some("BPE");
    if bpe && flag("ignore_merges", false) && !flag("byte_fallback", true) {
        return Ok(false);
    }
    Ok(bpe && flag("byte_fallback", false) && tj["decoder"]["type"].as_str() == Some("Sequence"))
}

/// The special token strings transformers reports (`all_special_tokens`):
/// the named ones, then the extra/additional ones, without repeats. For
/// Qwen2, transformers' Qwen2Tokenizer makes `<|endoftext|>` the EOS, UNK
/// and PAD that tokenizer_config.json leaves out.
fn special_token_strings(dir: &Path, arch: &str) -> Result<Vec<String>> {
    let tc = crate::model::checkpoint::load_tokenizer_config(dir)?.unwrap_or_default();
    let mut out: Vec<String> = Vec::new();
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_string),
        _ => None,
    };
    let mut push = |s: Option<String>| {
        if let Some(s) = s.filter(|s| !out.contains(s)) {
            out.push(s);
        }
    };
    for typ in DEFAULT_TYPES {
        let key = format!("{typ}_token");
        match tc.get(&key) {
            None if arch == "qwen2" && matches!(typ, "eos" | "unk" | "pad") => push(Some("<|endoftext|>".into())),
            v => push(v.and_then(text)),
        }
    }
    for key in ["extra_special_tokens", "additional_special_tokens"] {
        for v in tc.get(key).and_then(|v| v.as_array()).into_iter().flatten() {
            push(text(v));
        }
    }
    Ok(out)
}

/// The tokenizer as transformers' AutoTokenizer loads it: tokenizer.json,
/// with the special tokens its vocabulary lacks appended as added tokens.
fn hf_tokenizer(dir: &Path, arch: &str) -> Result<(tokenizers::Tokenizer, Vec<String>)> {
    let mut tok = crate::model::checkpoint::load_tokenizer(dir)?;
    let specials = special_token_strings(dir, arch)?;
    let vocab = tok.get_vocab(true);
    let missing: Vec<tokenizers::AddedToken> = specials
        .iter()
        .filter(|s| !vocab.contains_key(*s))
        .map(|s| tokenizers::AddedToken::from(s.clone(), true))
        .collect();
    tok.add_special_tokens(missing).map_err(|e| anyhow!("{}: {e}", dir.join("tokenizer.json").display()))?;
    Ok((tok, specials))
}

/// `_set_vocab_llama_hf`: the tokenizer's base vocabulary (scores -1000,
/// `<0xNN>` BYTE, special tokens CONTROL), then added tokens past it.
fn llama_hf(dir: &Path, kvs: &mut Kvs) -> Result<()> {
    let (tok, specials) = hf_tokenizer(dir, "llama")?;
    let path = dir.join("tokenizer.json");
    let full = tok.get_vocab(true);
    let base = tok.get_vocab_size(false);
    let specials: Vec<u32> = specials.iter().filter_map(|s| full.get(s).copied()).collect();
    let reverse: HashMap<u32, &str> = full.iter().map(|(s, &i)| (i, s.as_str())).collect();
    let mut v = TokenList::default();
    for id in 0..base as u32 {
        let text = reverse.get(&id).ok_or_else(|| anyhow!("{}: no token has id {id}", path.display()))?;
        let is_byte = text.len() == 6
            && text.starts_with("<0x")
            && text.ends_with('>')
            && text[3..5].bytes().all(|b| b.is_ascii_hexdigit());
        v.tokens.push(text.to_string());
        v.scores.push(-1000.0);
        v.types.push(if is_byte {
            toktype::BYTE
        } else if specials.contains(&id) {
            toktype::CONTROL
        } else {
            toktype::NORMAL
        });
    }
    let mut added: Vec<(u32, String)> =
        tok.get_added_tokens_decoder().into_iter().filter(|(i, _)| *i as usize >= base).map(|(i, t)| (i, t.content)).collect();
    added.sort();
    for (_, text) in added {
        let special = full.get(&text).is_some_and(|i| specials.contains(i));
        v.types.push(if special { toktype::CONTROL } else { toktype::USER_DEFINED });
        v.tokens.push(text);
        v.scores.push(-1000.0);
    }
    let n = v.tokens.len();
    put_tokens(kvs, "llama", "default", v, true);
    SpecialVocab::load(dir, false, &DEFAULT_TYPES, Some(n))?.add_to(kvs);
    Ok(())
}

/// `_set_vocab_gpt2`: byte-level BPE from tokenizer.json, padded with
/// `[PAD{i}]` up to config.json's vocab_size, with its merges.
fn gpt2(dir: &Path, arch: &str, vocab_size: Option<usize>, opts: &VocabOptions, kvs: &mut Kvs) -> Result<()> {
    let path = dir.join("tokenizer.json");
    if !path.is_file() {
        bail!("{}: no tokenizer (neither tokenizer.json nor tokenizer.model is there)", path.display());
    }
    let (tok, _) = hf_tokenizer(dir, arch)?;
    let full = tok.get_vocab(true);
    let n = vocab_size.unwrap_or(full.len());
    if let Some(max) = full.values().max().filter(|&&m| m as usize >= n) {
        bail!("{}: token id {max} is not below config.json's vocab_size {n}", path.display());
    }
    let hash = chkhsh(&tok)?;
    let pre = match PRE_TOKENIZERS.iter().rev().find(|(h, _)| *h == hash) {
        Some((_, name)) => name.to_string(),
        None => opts.pre.clone().ok_or_else(|| {
            anyhow!(
                "{}: llama.cpp does not know this BPE pre-tokenizer (fingerprint {hash}); \
                 name the one it matches with --tokenizer-pre NAME (e.g. llama-bpe, qwen2)",
                path.display()
            )
        })?,
    };
    let added = tok.get_added_tokens_decoder();
    let reverse: HashMap<u32, &str> = full.iter().map(|(s, &i)| (i, s.as_str())).collect();
    let mut v = TokenList::default();
    for i in 0..n as u32 {
        let Some(&text) = reverse.get(&i) else {
            v.tokens.push(format!("[PAD{i}]"));
            v.types.push(toktype::UNUSED);
            continue;
        };
        let Some(at) = added.get(&i).filter(|a| a.content == text) else {
            v.tokens.push(text.to_string());
            v.types.push(toktype::NORMAL);
            continue;
        };
        let mut text = text.to_string();
        if !at.normalized {
            // llama.cpp expects added tokens pre-normalized: round-trip them.
            let enc = tok.encode(text.as_str(), false).map_err(|e| anyhow!("{}: {e}", path.display()))?;
            text = tok.decode(enc.get_ids(), false).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        }
        if at.special || spm::looks_special(&text) {
            v.types.push(toktype::CONTROL);
            v.tokens.push(text);
        } else {
            v.types.push(toktype::USER_DEFINED);
            v.tokens.push(spm::user_defined_text(&text));
        }
    }
    put_tokens(kvs, "gpt2", &pre, v, false);
    SpecialVocab::load(dir, true, &DEFAULT_TYPES, None)?.add_to(kvs);
    Ok(())
}

/// Phi-3: byte-level BPE when tokenizer_config names GPT2Tokenizer (Phi-4
/// mini), else its own SentencePiece list (`spm::phi3_vocab`).
fn phi3(dir: &Path, vocab_size: Option<usize>, opts: &VocabOptions, kvs: &mut Kvs) -> Result<()> {
    let tc = crate::model::checkpoint::load_tokenizer_config(dir)?;
    if tc.as_ref().and_then(|c| c.get("tokenizer_class")).and_then(|c| c.as_str()) == Some("GPT2Tokenizer") {
        return gpt2(dir, "phi3", vocab_size, opts, kvs);
    }
    let model = dir.join("tokenizer.model");
    if !model.is_file() {
        bail!(
            "{}: Phi-3 needs its SentencePiece tokenizer.model (llama.cpp reads the vocabulary from it \
             unless tokenizer_config.json names GPT2Tokenizer); copy it from the base model",
            model.display()
        );
    }
    let v = spm::phi3_vocab(dir, vocab_size)?;
    let n = v.tokens.len();
    put_tokens(kvs, "llama", "default", v, true);
    SpecialVocab::load(dir, false, &DEFAULT_TYPES, Some(n))?.add_to(kvs);
    Ok(())
}

/// The text the converter encodes to fingerprint a BPE pre-tokenizer.
const CHKTXT: &str = "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u{200d}🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL";

/// The converter's pre-tokenizer fingerprint: sha256 of Python's repr of the ids of CHKTXT encoded with
/// special tokens (as transformers' AutoTokenizer(...).encode(chktxt) does).
pub fn chkhsh(tok: &tokenizers::Tokenizer) -> Result<String> {
    let enc = tok.encode(CHKTXT, true).map_err(|e| anyhow!("cannot encode the pre-tokenizer check text: {e}"))?;
    let ids: Vec<String> = enc.get_ids().iter().map(|i| i.to_string()).collect();
    let repr = format!("[{}]", ids.join(", "));
    Ok(Sha256::digest(repr.as_bytes()).iter().map(|b| format!("{b:02x}")).collect())
}

/// llama.cpp's known pre-tokenizers: (fingerprint, name), from the
/// converter's table (a fingerprint listed twice keeps its later name, as
/// the converter's chain of checks does; lookups search from the end).
const PRE_TOKENIZERS: &[(&str, &str)] = &[
    ("b6e8e1518dc4305be2fe39c313ed643381c4da5db34a98f6a04c093f8afbe99b", "chatglm-bpe"),
    ("81d72c7348a9f0ebe86f23298d37debe0a5e71149e29bd283904c02262b27516", "chatglm-bpe"),
    ("a1336059768a55c99a734006ffb02203cd450fed003e9a71886c88acf24fdbc2", "glm4"),
    ("9ca2dd618e8afaf09731a7cf6e2105b373ba6a1821559f258b272fe83e6eb902", "glm4"),
    ("cdf5f35325780597efd76153d4d1c16778f766173908894c04afc20108536267", "glm4"),
    ("1431a23e583c97432bc230bff598d103ddb5a1f89960c8f1d1051aaa944d0b35", "minerva-7b"),
    ("7e57df22b1fe23a7b1e1c7f3dc4e3f96d43a4eb0836d0c6bdc3436d7b2f1c664", "hunyuan"),
    ("bba3b3366b646dbdded5dbc42d59598b849371afc42f7beafa914afaa5b70aa6", "hunyuan-dense"),
    ("e6ddf9c6686791c12d698d34c31ab9be1fea9af5a3d9a6909783ab382198ae1c", "hy_v4"),
    ("a6b57017d60e6edb4d88ecc2845188e0eb333a70357e45dcc9b53964a73bbae6", "falcon-h1"),
    ("60476e1243776c4fb1b993dbd7a5f15ac22f83c80afdf425fa5ae01c8d44ef86", "falcon-h1"),
    ("3eda48b4c4dc7de733d1a8b3e3b4a85243dbbf704da2ee9d42c6beced8897896", "falcon-h1"),
    ("48f8e02c0359c0bbdd82f26909171fac1c18a457bb47573ed1fe3bbb2c1cfd4b", "falcon-h1"),
    ("81212dc7cdb7e0c1074ca62c5aeab0d43c9f52b8a737be7b12a777c953027890", "kimi-k2"),
    ("d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c", "qwen2"),
    ("1444df51289cfa8063b96f0e62b1125440111bc79a52003ea14b6eac7016fd5f", "qwen35"),
    ("66b8d4e19ab16c3bfd89bce5d785fb7e0155e8648708a1f42077cb9fe002c273", "grok-2"),
    ("b3d1dd861f1d4c5c0d2569ce36baf3f90fe8a102db3de50dd71ff860d91be3df", "jina-v2-de"),
    ("0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4", "gpt-2"),
    ("9e454714343b69b99b71795c1d27a68c2a1d15dab111f4d353109f966af29da7", "lfm2"),
    ("846deafc5b0fa786186fa4ae6c7b49903cf2f1d1895bdb80b9120d60be135252", "gemma4"),
    ("0a766d034107bc736a3f2dc4968fd62e54a3570f1454443e0c5a4cc6bd7941ed", "spark2_5"),
    ("0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5", "llama-bpe"),
    ("049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754", "deepseek-llm"),
    ("347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821", "deepseek-coder"),
    ("8aeee3860c56296a157a1fe2fad249ec40aa59b1bb5709f4ade11c4e6fe652ed", "falcon"),
    ("0876d13b50744004aa9aeae05e7b0647eac9d801b5ba4668afc01e709c15e19f", "jina-v2-en"),
    ("9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e", "falcon3"),
    ("8e62295832751ca1e8f92f2226f403dea30dc5165e448b5bfa05af5340c64ec7", "bert-bge-large"),
    ("b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166", "olmo"),
    ("35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34", "starcoder"),
    ("3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454", "gpt-2"),
    ("32d85c31273f8019248f2559fed492d929ea28b17e51d81d3bb36fff23ca72b3", "stablelm2"),
    ("6221ad2852e85ce96f791f476e0b390cf9b474c9e3d1362f53a24a06dc8220ff", "refact"),
    ("9c2227e4dd922002fb81bde4fc02b0483ca4f12911410dee2255e4987644e3f8", "command-r"),
    ("d772b220ace2baec124bed8cfafce0ead7d6c38a4b65ef11261cf9d5d62246d1", "tiny_aya"),
    ("52df12b4c8d4176e7481aab4b6e8454d1fd0a210a04a574f6d4e067d10e23c3e", "cohere2moe"),
    ("e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea", "qwen2"),
    ("a8594e3edff7c29c003940395316294b2c623e09894deebbc65f33f1515df79e", "dbrx"),
    ("c7699093ba4255a91e702aa38a596aa81669f3525dae06c2953267dde580f448", "jina-v1-en"),
    ("171aeeedd6fb548d418a7461d053f11b6f1f1fc9b387bd66640d28a4b9f5c643", "jina-v2-es"),
    ("27949a2493fc4a9f53f5b9b029c82689cfbe5d3a1929bb25e043089e28466de6", "jina-v2-de"),
    ("a023e9fdc5a11f034d3ef515b92350e56fb2af1f66c6b6811a4444ea9bf8763d", "jina-v5-nano"),
    ("c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d", "smaug-bpe"),
    ("c7ea5862a53e4272c035c8238367063e2b270d51faa48c0f09e9d5b54746c360", "poro-chat"),
    ("7967bfa498ade6b757b064f31e964dddbb80f8f9a4d68d4ba7998fcf281c531a", "jina-v2-code"),
    ("7fc505bd3104ca1083b150b17d088b59534ede9bde81f0dd2090967d7fe52cee", "viking"),
    ("b53802fb28e26d645c3a310b34bfe07da813026ec7c7716883404d5e0f8b1901", "jais"),
    ("bc5108ee1eb6a3d600cadd065f63190fbd0554dbc9e4bbd6a0d977970afc8d2a", "jais-2"),
    ("7b3e7548e4308f52a76e8229e4e6cc831195d0d1df43aed21ac6c93da05fec5f", "codeshell"),
    ("63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e", "tekken"),
    ("855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249", "smollm"),
    ("3c30d3ad1d6b64202cd222813e7736c2db6e1bd6d67197090fc1211fbc612ae7", "bloom"),
    ("bc01ce58980e1db43859146dc51b1758b3b88729b217a74792e9f8d43e479d21", "gpt3-finnish"),
    ("4e2b24cc4770243d65a2c9ec19770a72f08cffc161adbb73fcbb6b7dd45a0aae", "exaone"),
    ("fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085", "phi-2"),
    ("60824e3c0d9401f89943cbb2fff727f0e2d4c545ba4df2d6e4f09a6db0f5b450", "chameleon"),
    ("8b5a93ed704057481f240da0be7e7dca721d7f8f4755263b6807227a2cbeae65", "roberta-bpe"),
    ("ad851be1dba641f2e3711822f816db2c265f788b37c63b4e1aeacb9ee92de8eb", "gigachat"),
    ("d4c8f286ea6b520b3d495c4455483cfa2302c0cfcd4be05d781b6a8a0a7cdaf1", "megrez"),
    ("877081d19cf6996e2c4ff0e1236341e9b7bde288f5311a56a937f0afbbb3aeb5", "deepseek-v3"),
    ("b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5", "deepseek-r1-qwen"),
    ("ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e", "gpt-4o"),
    ("7dec86086fcc38b66b7bc1575a160ae21cf705be7718b9d5598190d7c12db76f", "superbpe"),
    ("1994ffd01900cfb37395608534236ecd63f2bd5995d6cb1004dda1af50240f15", "trillion"),
    ("96a5f08be6259352137b512d4157e333e21df7edd3fcd152990608735a65b224", "bailingmoe"),
    ("d353350c764d8c3b39c763113960e4fb4919bea5fbf208a0e3b22e8469dc7406", "llama4"),
    ("0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3", "pixtral"),
    ("d5f1dd6f980fec569fb218a81a7658ac45fc56b38c5a0adeb1c232fbe04ef5ec", "seed-coder"),
    ("b0a6b1c0bd5998ebd9df08611efde34a4ff03faed45ae09c43e6b31ebd4b94cf", "a.x-4.0"),
    ("f6791d196f87ce6b56a7d234be618e0d58f8cda3549416635b2bebcd22cd95c4", "midm-2.0"),
    ("169bf0296a13c4d9b7672313f749eb36501d931022de052aad6e36f2bf34dd51", "lfm2"),
    ("2085e1638f6c377a0aa4ead21b27bb4cb941bf800df86ed391011769c1758dfb", "exaone4"),
    ("a1e163ecab2e718a4c829d1148b6e86824ec36163bb71941c3dca9cd5ac25756", "mellum"),
    ("a0b64b4385f123663873756336c085744376d015ff328bb1d901598f63c44152", "modern-bert"),
    ("49fc0303c9e0d2c2c565c510f64b2d9b271276acdcdadff733249eda9f7d59df", "afmoe"),
    ("9b1be57e70d20d9501b2b3186e792d81181ae36ada3903c26f9fea418cf87206", "bailingmoe2"),
    ("53e325976a6e142379c19b09afcae354f2f496f147afa8f9e189a33fe4e3024e", "granite-docling"),
    ("f4f37b6c8eb9ea29b3eac6bb8c8487c5ab7885f8d8022e67edc1c68ce8403e95", "minimax-m2"),
    ("4a2e2abae11ca2b86d570fc5b44be4d5eb5e72cc8f22dd136a94b37da83ab665", "kormo"),
    ("9d70134b369a70e5735009b6de918f7581b5211f7c074d1f89f753aea8248af1", "youtu"),
    ("16389f0a1f51ee53e562ffd51c371dc508639ab0e4261502071836e50e223e91", "solar-open"),
    ("6c81ce329e0802883b22eabab0d3fa48357337ef1ecb45443828bf1f6254833f", "exaone-moe"),
    ("d30d75d9059f1aa2c19359de71047b3ae408c70875e8a3ccf8c5fba56c9d8af4", "qwen35"),
    ("b4b8ca1f9769494fbd956ebc4c249de6131fb277a4a3345a7a92c7dd7a55808d", "joyai-llm"),
    ("e4d54df1ebc1f2b91acd986c5b51aa50837d5faf7c7398e73c1f9e9ee5d19869", "kanana2"),
    ("862f827721df956049dff5ca81a57f29e575280bc622e290d3bf4e35eca29015", "f2llmv2"),
    ("62f6fb0a6fd5098caeabb19b07a5c1099cafc8b9c40eab6ea89ece4ec02fbc57", "sarvam-moe"),
    ("f728162c1315c26e40249849799b4ba3fe584c32084b4795b03eb295e63cb5af", "talkie"),
    ("36f3066e97b7f3994b379aaacde306c1444c6ae84e81a5ae3cd2b7ed3b8c42d4", "minicpm5"),
    ("f241072145675bf8322086f115aebad05e9f869557a238bf2150a2a417d1bf60", "granite-embed-multi-97m"),
    ("789696f5946cc0fc59371f39f6097cafed196b3acded6140432f26bbb1ae1669", "granite-embed-multi-311m"),
    ("9dcf830ee9990cdbf78cc523a5f7bd9ad8f3f9890c2d3581d2785ad10f07049d", "mellum2"),
    ("972da7b59cec44d1f0a490a86c96df53859e486e481563e5dddac155013d87ac", "laguna"),
    ("653660222fb704f61cbf2b618a8ae6502b7f8b20c980f9a5de07ed78e13319cd", "ufakzeka"),
];

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value as Json;
    use std::path::PathBuf;

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
    }

    /// A case folder as the fixture script assembled it for the converter.
    fn case_dir(case: &Json, tmp: &Path) -> PathBuf {
        let d = tmp.join("model");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("config.json"), case["config"].to_string()).unwrap();
        let src = fixtures().join(case["tokenizer_dir"].as_str().unwrap());
        let omit: Vec<&str> = case["omit"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        for f in ["tokenizer.json", "tokenizer_config.json", "tokenizer.model", "chat_template.jinja"] {
            if src.join(f).is_file() && !omit.contains(&f) {
                std::fs::copy(src.join(f), d.join(f)).unwrap();
            }
        }
        for (file, patch) in [("tokenizer.json", "tokenizer_json_patch"), ("tokenizer_config.json", "tokenizer_config_patch")] {
            let Some(patch) = case[patch].as_object().filter(|p| !p.is_empty()) else { continue };
            let p = d.join(file);
            let mut j: Json = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            for (k, v) in patch {
                j[k] = v.clone();
            }
            std::fs::write(&p, j.to_string()).unwrap();
        }
        d
    }

    /// The converter's hparams root: config.json with text_config merged in.
    fn hparams(config: &Json) -> Json {
        let mut h = config.clone();
        if let Some(Json::Object(t)) = config.get("text_config") {
            for (k, v) in t {
                h[k] = v.clone();
            }
        }
        h
    }

    /// GGUF's encoding of array elements, which the fixture hashes.
    fn gguf_bytes(v: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        match v {
            Value::ArrStr(l) => l.iter().for_each(|s| {
                out.extend((s.len() as u64).to_le_bytes());
                out.extend(s.as_bytes());
            }),
            Value::ArrI32(l) => l.iter().for_each(|x| out.extend(x.to_le_bytes())),
            Value::ArrF32(l) => l.iter().for_each(|x| out.extend(x.to_le_bytes())),
            _ => unreachable!(),
        }
        out
    }

    fn as_json(v: &Value) -> (&'static str, Json) {
        match v {
            Value::U32(x) => ("u32", Json::from(*x)),
            Value::I32(x) => ("i32", Json::from(*x)),
            Value::F32(x) => ("f32", Json::from(*x as f64)),
            Value::Bool(x) => ("bool", Json::from(*x)),
            Value::Str(x) => ("str", Json::from(x.clone())),
            Value::ArrStr(l) => ("arr[str]", Json::from(l.clone())),
            Value::ArrI32(l) => ("arr[i32]", Json::from(l.clone())),
            Value::ArrF32(l) => ("arr[f32]", l.iter().map(|x| *x as f64).collect()),
        }
    }

    /// Each case's keys, in order, types and values, against what llama.cpp's converter wrote
    /// (tests/fixtures/gguf_vocab.py); long arrays by the sha256 of their GGUF bytes.
    #[test]
    fn matches_the_converter() {
        let dir = fixtures().join("gguf/vocab");
        let mut names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
        names.sort();
        assert!(names.len() >= 14, "fixture cases missing in {}", dir.display());
        for path in names {
            let name = path.file_stem().unwrap().to_string_lossy().to_string();
            let case: Json = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            let tmp = tempfile::tempdir().unwrap();
            let d = case_dir(&case, tmp.path());
            let arch = match name.split('_').next().unwrap() {
                "llama3" | "llama" => "llama",
                a => a,
            };
            let opts = VocabOptions { pre: case["pre"].as_str().map(str::to_string) };
            let got = vocab(&d, arch, &hparams(&case["config"]), &opts).unwrap_or_else(|e| panic!("{name}: {e:#}"));
            let want = case["kvs"].as_array().unwrap();
            let got_keys: Vec<&str> = got.kvs.0.iter().map(|(k, _)| k.as_str()).collect();
            let want_keys: Vec<&str> = want.iter().map(|kv| kv[0].as_str().unwrap()).collect();
            assert_eq!(got_keys, want_keys, "{name}: keys");
            for ((key, v), w) in got.kvs.0.iter().zip(want) {
                let (ty, val) = as_json(v);
                assert_eq!(ty, w[1].as_str().unwrap(), "{name}: {key} type");
                match &w[2] {
                    Json::Object(h) => {
                        let n = val.as_array().unwrap().len();
                        assert_eq!(n as u64, h["len"].as_u64().unwrap(), "{name}: {key} length");
                        assert_eq!(&val.as_array().unwrap()[..8], h["head"].as_array().unwrap().as_slice(), "{name}: {key} head");
                        let sha: String = Sha256::digest(gguf_bytes(v)).iter().map(|b| format!("{b:02x}")).collect();
                        assert_eq!(sha, h["sha256"].as_str().unwrap(), "{name}: {key} contents");
                    }
                    w => assert_eq!(&val, w, "{name}: {key}"),
                }
            }
            assert_eq!(got.n_vocab_real.map(|n| n as u64), case["n_vocab_real"].as_u64(), "{name}: n_vocab_real");
            if let Some(h) = case["chkhsh"].as_str() {
                let tok = crate::model::checkpoint::load_tokenizer(&d).unwrap();
                assert_eq!(chkhsh(&tok).unwrap(), h, "{name}: pre-tokenizer fingerprint");
            }
        }
    }

    fn spm_case(tokenizer: &str, tmp: &Path, config: &str, omit: &[&str]) -> PathBuf {
        let case = serde_json::json!({
            "config": serde_json::from_str::<Json>(&std::fs::read_to_string(fixtures().join(config)).unwrap()).unwrap(),
            "tokenizer_dir": tokenizer, "omit": omit, "tokenizer_config_patch": {},
        });
        case_dir(&case, tmp)
    }

    #[test]
    fn missing_or_unknown_tokenizers_are_one_clear_error() {
        let opts = VocabOptions { pre: None };
        let hp = serde_json::json!({ "vocab_size": 330 });
        for (arch, config) in [("gemma2", "gemma2/model/config.json"), ("phi3", "phi3/model/config.json")] {
            let tmp = tempfile::tempdir().unwrap();
            let d = spm_case("gguf/spm/llama", tmp.path(), config, &["tokenizer.model"]);
            let e = format!("{:#}", vocab(&d, arch, &hp, &opts).err().unwrap());
            assert!(e.contains(&d.join("tokenizer.model").display().to_string()), "{e}");
        }
        // A byte-level BPE llama.cpp has no fingerprint for, and no --tokenizer-pre.
        let tmp = tempfile::tempdir().unwrap();
        let d = spm_case("qwen2/model", tmp.path(), "qwen2/model/config.json", &[]);
        let e = format!("{:#}", vocab(&d, "qwen2", &serde_json::json!({ "vocab_size": 131 }), &opts).err().unwrap());
        let tok = crate::model::checkpoint::load_tokenizer(&d).unwrap();
        for part in [d.join("tokenizer.json").display().to_string(), chkhsh(&tok).unwrap(), "--tokenizer-pre".into()] {
            assert!(e.contains(&part), "{e} lacks {part}");
        }
        // A known fingerprint names the pre-tokenizer, whatever the option says.
        assert_eq!(PRE_TOKENIZERS.iter().rev().find(|(h, _)| h.starts_with("0ef9807a")).unwrap().1, "llama-bpe");
        let e = vocab(&d, "qwen2", &serde_json::json!({ "vocab_size": 50 }), &VocabOptions { pre: Some("qwen2".into()) });
        assert!(format!("{:#}", e.err().unwrap()).contains("vocab_size 50"));
        let e = vocab(&d, "mamba", &hp, &opts).err().unwrap();
        assert!(format!("{e:#}").contains("mamba"));
    }
}
