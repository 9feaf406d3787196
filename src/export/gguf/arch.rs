//! What llama.cpp calls each architecture ferrotune trains, and what its
//! converter writes for it: the `<arch>.*` hyper-parameters (read from
//! config.json as transformers 5 completes it), the GGUF tensor names, the
//! per-tensor changes (the Q/K row permutation of llama-arch models, Gemma's
//! norm weights stored as offsets from one) and the generated tensors
//! (Llama 3's rope_freqs, Phi-3's long/short rope factors).
//!
//! A new architecture is a variant of `Arch` with its arms here; nothing
//! else in the exporter names architectures except `vocab`.

use super::types::{Kvs, Value};
use anyhow::{Context, Result, bail};
use serde_json::{Map, Value as Json, json};
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Llama and Mistral.
    Llama,
    Qwen2,
    Qwen3,
    Gemma2,
    /// Gemma3ForCausalLM and the text of Gemma3ForConditionalGeneration.
    Gemma3,
    Phi3,
}

impl Arch {
    /// The architecture by config.json's `architectures[0]` (text_config's
    /// when present, as the converter reads it).
    pub fn from_hf(name: &str) -> Option<Arch> {
        Some(match name {
            "LlamaForCausalLM" | "MistralForCausalLM" => Arch::Llama,
            "Qwen2ForCausalLM" => Arch::Qwen2,
            "Qwen3ForCausalLM" => Arch::Qwen3,
            "Gemma2ForCausalLM" => Arch::Gemma2,
            "Gemma3ForCausalLM" | "Gemma3ForConditionalGeneration" => Arch::Gemma3,
            "Phi3ForCausalLM" => Arch::Phi3,
            _ => return None,
        })
    }

    /// llama.cpp's name (general.architecture and the key prefix).
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma2 => "gemma2",
            Arch::Gemma3 => "gemma3",
            Arch::Phi3 => "phi3",
        }
    }

    fn is_gemma(self) -> bool {
        matches!(self, Arch::Gemma2 | Arch::Gemma3)
    }
}

/// config.json as the converter sees it: text_config merged into the root,
/// the defaults transformers' config class fills in for the keys read here,
/// and rope_parameters completed as the converter's TextModel does.
pub struct Hparams {
    pub arch: Arch,
    pub hf_arch: String,
    pub map: Map<String, Json>,
    pub rope: Map<String, Json>,
}

const SUPPORTED: &str = "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3ForConditionalGeneration, Phi3ForCausalLM";

impl Hparams {
    pub fn load(dir: &Path) -> Result<Hparams> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let raw: Json = serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
        Hparams::from_json(&raw).with_context(|| path.display().to_string())
    }

    pub fn from_json(raw: &Json) -> Result<Hparams> {
        let Some(root) = raw.as_object() else { bail!("config.json is not a JSON object") };
        let arch_of = |v: &Json| v.get("architectures").and_then(|a| a.get(0)).and_then(Json::as_str).map(str::to_string);
        let hf_arch = raw.get("text_config").and_then(arch_of).or_else(|| arch_of(raw)).context("no `architectures` entry: cannot tell which llama.cpp architecture this is")?;
        let arch = Arch::from_hf(&hf_arch).with_context(|| {
            format!("architecture {hf_arch} has no GGUF export; ferrotune writes GGUF for {SUPPORTED}")
        })?;
        let mut map = root.clone();
        if let Some(Json::Object(tc)) = root.get("text_config") {
            map.extend(tc.clone());
        }
        fill_defaults(arch, &hf_arch, &mut map);
        let rope = rope_parameters(arch, &map);
        Ok(Hparams { arch, hf_arch, map, rope })
    }

    pub fn get(&self, k: &str) -> Option<&Json> {
        self.map.get(k).filter(|v| !v.is_null())
    }

    pub fn u32(&self, k: &str) -> Result<u32> {
        self.opt_u32(k)?.with_context(|| format!("config.json: key {k} is missing (a whole number is expected)"))
    }

    pub fn opt_u32(&self, k: &str) -> Result<Option<u32>> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v.as_u64().and_then(|n| u32::try_from(n).ok()).map(Some).with_context(|| format!("config.json: {k} is {v}; a whole number is expected")),
        }
    }

    pub fn f32(&self, k: &str) -> Result<Option<f32>> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v.as_f64().map(|x| Some(x as f32)).with_context(|| format!("config.json: {k} is {v}; a number is expected")),
        }
    }

    pub fn n_layer(&self) -> Result<u32> {
        self.u32("num_hidden_layers")
    }

    fn key(&self, k: &str) -> String {
        format!("{}.{k}", self.arch.name())
    }

    /// The rope parameters of full-attention layers.
    fn rope_full(&self) -> &Map<String, Json> {
        match self.rope.get("full_attention") {
            Some(Json::Object(m)) => m,
            _ => &self.rope,
        }
    }
}

/// The values transformers 5's config classes give keys a config.json may
/// omit (only those the converter reads).
fn fill_defaults(arch: Arch, hf_arch: &str, m: &mut Map<String, Json>) {
    let hidden = m.get("hidden_size").and_then(Json::as_u64).unwrap_or(0);
    let heads = m.get("num_attention_heads").and_then(Json::as_u64).unwrap_or(1).max(1);
    let (head_dim, kv, max_pos, eps): (Option<Json>, Json, u64, f64) = match (arch, hf_arch) {
        (Arch::Llama, "MistralForCausalLM") => (Some(json!(hidden / heads)), json!(8), 131072, 1e-6),
        (Arch::Llama, _) => (Some(json!(hidden / heads)), json!(heads), 2048, 1e-6),
        (Arch::Qwen2, _) => (None, json!(32), 32768, 1e-6),
        (Arch::Qwen3, _) => (Some(json!(128)), json!(32), 32768, 1e-6),
        (Arch::Gemma2, _) => (Some(json!(256)), json!(4), 8192, 1e-6),
        (Arch::Gemma3, _) => (Some(json!(256)), json!(4), 131072, 1e-6),
        (Arch::Phi3, _) => (None, json!(heads), 4096, 1e-5),
    };
    let mut default = |k: &str, v: Json| {
        if m.get(k).is_none_or(Json::is_null) {
            m.insert(k.to_string(), v);
        }
    };
    if let Some(hd) = head_dim {
        default("head_dim", hd);
    }
    default("num_key_value_heads", kv);
    default("max_position_embeddings", json!(max_pos));
    default("rms_norm_eps", json!(eps));
    if arch == Arch::Gemma2 {
        default("attn_logit_softcapping", json!(50.0));
        default("final_logit_softcapping", json!(30.0));
        default("sliding_window", json!(4096));
    }
    if arch == Arch::Gemma3 {
        default("sliding_window", json!(4096));
    }
}

/// rope_parameters as transformers 5 stores them (legacy rope_theta /
/// rope_scaling folded in), then mirrored as the converter's TextModel does.
fn rope_parameters(arch: Arch, m: &Map<String, Json>) -> Map<String, Json> {
    let get = |k: &str| m.get(k).filter(|v| !v.is_null()).cloned();
    let mut rope = match get("rope_parameters").or_else(|| get("rope_scaling")) {
        Some(Json::Object(r)) => r,
        _ => Map::new(),
    };
    if arch == Arch::Gemma3 && !rope.contains_key("full_attention") && !rope.contains_key("sliding_attention") {
        // Gemma 3's legacy fields: rope_scaling applies to global layers.
        let mut full = rope.clone();
        if let Some(t) = full.remove("type") {
            full.entry("rope_type").or_insert(t);
        }
        full.entry("rope_type").or_insert(json!("default"));
        full.insert("rope_theta".into(), get("rope_theta").unwrap_or(json!(1_000_000.0)));
        let local = get("rope_local_base_freq").unwrap_or(json!(10_000.0));
        rope = Map::new();
        rope.insert("full_attention".into(), Json::Object(full));
        rope.insert("sliding_attention".into(), json!({"rope_type": "default", "rope_theta": local}));
        return rope;
    }
    if !rope.contains_key("full_attention") && !rope.contains_key("sliding_attention") {
        let first = |keys: &[&str]| keys.iter().find_map(|k| get(k));
        if let Some(local) = first(&["local_rope_theta", "rope_local_theta", "rope_theta_local", "swa_rope_theta", "rope_local_base_freq"]) {
            rope.insert("sliding_attention".into(), json!({"rope_theta": local}));
        }
        let theta = first(&["global_rope_theta", "rope_global_theta", "rope_theta_global", "rope_theta", "rotary_emb_base"]).unwrap_or(json!(10_000.0));
        rope.entry("rope_theta").or_insert(theta);
        if let Some(t) = rope.get("type").cloned() {
            rope.entry("rope_type").or_insert(t);
        }
        if let Some(p) = first(&["partial_rotary_factor", "rope_pct", "rope_percent"]) {
            rope.entry("partial_rotary_factor").or_insert(p);
        }
        if let Some(o) = get("original_max_position_embeddings") {
            rope.entry("original_max_position_embeddings").or_insert(o);
        }
    }
    rope
}

fn jf32(v: Option<&Json>) -> Option<f32> {
    v.and_then(Json::as_f64).map(|x| x as f32)
}

/// The `<arch>.*` keys and general.file_type, in the converter's order.
/// `kvs` already holds what came before (general.*), so that a key written
/// twice keeps its first place.
pub fn hparam_kvs(hp: &Hparams, file_type: u32, kvs: &mut Kvs) -> Result<()> {
    let k = |s: &str| hp.key(s);
    match hp.arch {
        Arch::Gemma2 => {
            kvs.set(k("context_length"), Value::U32(hp.u32("max_position_embeddings")?));
            kvs.set(k("embedding_length"), Value::U32(hp.u32("hidden_size")?));
            kvs.set(k("block_count"), Value::U32(hp.n_layer()?));
            kvs.set(k("feed_forward_length"), Value::U32(hp.u32("intermediate_size")?));
            kvs.set(k("attention.head_count"), Value::U32(hp.u32("num_attention_heads")?));
            kvs.set(k("attention.head_count_kv"), Value::U32(hp.u32("num_key_value_heads")?));
            kvs.set(k("attention.layer_norm_rms_epsilon"), Value::F32(hp.f32("rms_norm_eps")?.context("config.json: rms_norm_eps is missing")?));
            kvs.set(k("attention.key_length"), Value::U32(hp.u32("head_dim")?));
            kvs.set(k("attention.value_length"), Value::U32(hp.u32("head_dim")?));
            kvs.set("general.file_type", Value::U32(file_type));
            for cap in ["attn_logit_softcapping", "final_logit_softcapping"] {
                let v = hp.f32(cap)?.with_context(|| format!("config.json: {cap} is missing or null; llama.cpp's gemma2 needs it"))?;
                kvs.set(k(cap), Value::F32(v));
            }
            kvs.set(k("attention.sliding_window"), Value::U32(hp.u32("sliding_window")?));
        }
        Arch::Phi3 => {
            let n_embd = hp.u32("hidden_size")?;
            let n_head = hp.u32("num_attention_heads")?;
            let orig = hp.rope.get("original_max_position_embeddings").and_then(Json::as_u64).context(
                "config.json: rope_parameters.original_max_position_embeddings is missing; llama.cpp's phi3 needs it",
            )?;
            let pct = hp.rope.get("partial_rotary_factor").and_then(Json::as_f64).unwrap_or(1.0);
            kvs.set(k("context_length"), Value::U32(hp.u32("max_position_embeddings")?));
            kvs.set(k("rope.scaling.original_context_length"), Value::U32(orig as u32));
            kvs.set(k("embedding_length"), Value::U32(n_embd));
            kvs.set(k("feed_forward_length"), Value::U32(hp.u32("intermediate_size")?));
            kvs.set(k("block_count"), Value::U32(hp.n_layer()?));
            kvs.set(k("attention.head_count"), Value::U32(n_head));
            kvs.set(k("attention.head_count_kv"), Value::U32(hp.u32("num_key_value_heads")?));
            kvs.set(k("attention.layer_norm_rms_epsilon"), Value::F32(hp.f32("rms_norm_eps")?.context("config.json: rms_norm_eps is missing")?));
            kvs.set(k("rope.dimension_count"), Value::U32(((pct * n_embd as f64) as u64 / n_head as u64) as u32));
            let theta = jf32(hp.rope_full().get("rope_theta")).context("config.json: rope_theta is missing")?;
            kvs.set(k("rope.freq_base"), Value::F32(theta));
            kvs.set("general.file_type", Value::U32(file_type));
            kvs.set(k("attention.sliding_window"), Value::U32(hp.opt_u32("sliding_window")?.unwrap_or(0)));
        }
        _ => text_model_kvs(hp, file_type, kvs)?,
    }
    match hp.arch {
        Arch::Llama => {
            kvs.set(k("vocab_size"), Value::U32(hp.u32("vocab_size")?));
            let rope_dim = match hp.opt_u32("head_dim")? {
                Some(d) => d,
                None => hp.u32("hidden_size")? / hp.u32("num_attention_heads")?,
            };
            kvs.set(k("rope.dimension_count"), Value::U32(rope_dim));
        }
        Arch::Gemma3 => {
            kvs.set(k("context_length"), Value::U32(hp.opt_u32("max_position_embeddings")?.unwrap_or(131072)));
            kvs.set(k("attention.head_count"), Value::U32(hp.opt_u32("num_attention_heads")?.unwrap_or(8)));
            kvs.set(k("attention.layer_norm_rms_epsilon"), Value::F32(hp.f32("rms_norm_eps")?.unwrap_or(1e-6)));
            let hd = hp.opt_u32("head_dim")?.unwrap_or(256);
            kvs.set(k("attention.key_length"), Value::U32(hd));
            kvs.set(k("attention.value_length"), Value::U32(hd));
            kvs.set(k("rope.freq_base"), Value::F32(jf32(hp.rope_full().get("rope_theta")).unwrap_or(1_000_000.0)));
            if hp.f32("attn_logit_softcapping")?.is_some() {
                bail!("config.json: attn_logit_softcapping is set; llama.cpp's gemma3 has no attention soft-cap");
            }
            if let Some(cap) = hp.f32("final_logit_softcapping")?.filter(|c| *c != 0.0) {
                kvs.set(k("final_logit_softcapping"), Value::F32(cap));
            }
            if hp.get("sliding_window_pattern").and_then(Json::as_i64) != Some(1) {
                kvs.set(k("attention.sliding_window"), Value::U32(hp.u32("sliding_window")?));
            }
            kvs.set(k("attention.head_count_kv"), Value::U32(hp.opt_u32("num_key_value_heads")?.unwrap_or(4)));
        }
        _ => {}
    }
    Ok(())
}

/// TextModel.set_gguf_parameters: the keys shared by llama, qwen2, qwen3
/// and gemma3 (each written only when its hyper-parameter exists).
fn text_model_kvs(hp: &Hparams, file_type: u32, kvs: &mut Kvs) -> Result<()> {
    let k = |s: &str| hp.key(s);
    kvs.set(k("block_count"), Value::U32(hp.n_layer()?));
    for (key, hf) in [
        ("context_length", "max_position_embeddings"),
        ("embedding_length", "hidden_size"),
        ("feed_forward_length", "intermediate_size"),
        ("attention.head_count", "num_attention_heads"),
        ("attention.head_count_kv", "num_key_value_heads"),
    ] {
        if let Some(v) = hp.opt_u32(hf)? {
            kvs.set(k(key), Value::U32(v));
        }
    }
    let rope = hp.rope_full();
    if let Some(t) = rope.get("rope_type").and_then(Json::as_str) {
        let factor = jf32(rope.get("factor"));
        match (t, factor) {
            ("linear", Some(f)) => {
                kvs.set(k("rope.scaling.type"), Value::Str("linear".into()));
                kvs.set(k("rope.scaling.factor"), Value::F32(f));
            }
            ("yarn", Some(f)) => {
                kvs.set(k("rope.scaling.type"), Value::Str("yarn".into()));
                kvs.set(k("rope.scaling.factor"), Value::F32(f));
                let orig = rope.get("original_max_position_embeddings").and_then(Json::as_u64).context("config.json: yarn rope_parameters without original_max_position_embeddings")?;
                kvs.set(k("rope.scaling.original_context_length"), Value::U32(orig as u32));
                for (key, names) in [
                    ("rope.scaling.yarn_ext_factor", &["extrapolation_factor"][..]),
                    ("rope.scaling.yarn_attn_factor", &["attention_factor", "attn_factor"][..]),
                    ("rope.scaling.yarn_beta_fast", &["beta_fast"][..]),
                    ("rope.scaling.yarn_beta_slow", &["beta_slow"][..]),
                ] {
                    if let Some(v) = names.iter().find_map(|n| rope.get(*n).filter(|v| !v.is_null())) {
                        kvs.set(k(key), Value::F32(jf32(Some(v)).with_context(|| format!("config.json: rope_parameters {names:?} is not a number"))?));
                    }
                }
            }
            ("su" | "longrope", _) => kvs.set(k("rope.scaling.type"), Value::Str("longrope".into())),
            _ => {}
        }
    }
    if let Some(theta) = jf32(rope.get("rope_theta")) {
        kvs.set(k("rope.freq_base"), Value::F32(theta));
    }
    if let Some(local) = hp.rope.get("sliding_attention").and_then(|s| jf32(s.get("rope_theta"))) {
        kvs.set(k("rope.freq_base_swa"), Value::F32(local));
    }
    if let Some(eps) = hp.f32("rms_norm_eps")? {
        kvs.set(k("attention.layer_norm_rms_epsilon"), Value::F32(eps));
    }
    if let Some(hd) = hp.opt_u32("head_dim")? {
        kvs.set(k("attention.key_length"), Value::U32(hd));
        kvs.set(k("attention.value_length"), Value::U32(hd));
    }
    kvs.set("general.file_type", Value::U32(file_type));
    Ok(())
}

/// How a checkpoint tensor becomes its GGUF tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Change {
    None,
    /// Rows go from HF's half-split RoPE order to llama.cpp's interleaved
    /// one, within each of `n_head` heads.
    Permute { n_head: usize },
    /// Gemma stores norm weights as offsets from one; llama.cpp wants the scale.
    AddOne,
}

/// The GGUF name of a checkpoint tensor and its change; None for a tensor
/// the converter drops (vision towers, Gemma 2's tied lm_head, rotary caches).
pub fn map_tensor(hp: &Hparams, hf_name: &str) -> Result<Option<(String, Change)>> {
    let arch = hp.arch;
    if hf_name.ends_with(".attention.masked_bias") || hf_name.ends_with(".attention.bias") || hf_name.ends_with(".rotary_emb.inv_freq") {
        return Ok(None);
    }
    if is_multimodal(hf_name) {
        return Ok(None);
    }
    let name = hf_name.replace("language_model.", "");
    if arch == Arch::Gemma2 && name == "lm_head.weight" {
        return Ok(None);
    }
    let (stem, suffix) = match name.rsplit_once('.') {
        Some((s, x @ ("weight" | "bias"))) => (s, x),
        _ => bail!("tensor {hf_name}: llama.cpp's {} has no tensor it maps to", arch.name()),
    };
    let gguf = match stem {
        "model.embed_tokens" => "token_embd".to_string(),
        "lm_head" => "output".to_string(),
        "model.norm" => "output_norm".to_string(),
        _ => {
            let rest = stem.strip_prefix("model.layers.").with_context(|| format!("tensor {hf_name}: llama.cpp's {} has no tensor it maps to", arch.name()))?;
            let (bid, part) = rest.split_once('.').with_context(|| format!("tensor {hf_name}: not a layer tensor"))?;
            let bid: usize = bid.parse().with_context(|| format!("tensor {hf_name}: layer number {bid:?}"))?;
            let g = match (part, arch) {
                ("input_layernorm", _) => "attn_norm",
                ("self_attn.q_proj", _) => "attn_q",
                ("self_attn.k_proj", _) => "attn_k",
                ("self_attn.v_proj", _) => "attn_v",
                ("self_attn.o_proj", _) => "attn_output",
                ("self_attn.qkv_proj", _) => "attn_qkv",
                ("self_attn.q_norm", Arch::Qwen3 | Arch::Gemma3) => "attn_q_norm",
                ("self_attn.k_norm", Arch::Qwen3 | Arch::Gemma3) => "attn_k_norm",
                ("post_attention_layernorm", Arch::Gemma2 | Arch::Gemma3) => "post_attention_norm",
                ("post_attention_layernorm", _) => "ffn_norm",
                ("pre_feedforward_layernorm", Arch::Gemma2 | Arch::Gemma3) => "ffn_norm",
                ("post_feedforward_layernorm", Arch::Gemma2 | Arch::Gemma3) => "post_ffw_norm",
                ("mlp.gate_proj", a) if a != Arch::Phi3 => "ffn_gate",
                ("mlp.up_proj", _) | ("mlp.gate_up_proj", _) => "ffn_up",
                ("mlp.down_proj", _) => "ffn_down",
                _ => bail!("tensor {hf_name}: llama.cpp's {} has no tensor it maps to", arch.name()),
            };
            format!("blk.{bid}.{g}")
        }
    };
    let change = if arch == Arch::Llama && (stem.ends_with("q_proj") || stem.ends_with("k_proj")) {
        let n_head = hp.u32("num_attention_heads")? as usize;
        let n_kv = hp.u32("num_key_value_heads")? as usize;
        Change::Permute { n_head: if stem.ends_with("k_proj") && n_kv != n_head { n_kv } else { n_head } }
    } else if arch.is_gemma() && name.ends_with("norm.weight") {
        Change::AddOne
    } else {
        Change::None
    };
    Ok(Some((format!("{gguf}.{suffix}"), change)))
}

/// TextModel.filter_tensors: the multimodal parts a text GGUF leaves out.
fn is_multimodal(n: &str) -> bool {
    const PREFIXES: &[&str] = &["mlp", "vit.", "vpm.", "siglip2.", "conformer.", "merger.", "resampler.", "sound_encoder.", "sound_projection.", "speech_embeddings."];
    const PARTS: &[&str] = &[
        "visual.", "vision.", "audio.", "talker.", "vision_", "audio_", "token2wav.", "code2wav.", "projector.", "pre_mm_projector_norm", "image_newline",
        "view_seperator", "patch_embed", "patch_embedding", "patch_merger.", "patch_merge_mlp.", "model.connector.",
    ];
    PREFIXES.iter().any(|p| n.starts_with(p)) || PARTS.iter().any(|p| n.contains(p))
}

/// The tensors the converter generates before the checkpoint's, and the
/// keys it writes while generating them (Phi-3's attention factor).
pub fn generated(hp: &Hparams, kvs: &mut Kvs) -> Result<Vec<(String, Vec<f32>)>> {
    match hp.arch {
        Arch::Llama => {
            let rope = hp.rope_full();
            if rope.get("rope_type").and_then(Json::as_str).map(str::to_lowercase).as_deref() != Some("llama3") {
                return Ok(vec![]);
            }
            let dim = match hp.opt_u32("head_dim")? {
                Some(d) => d,
                None => hp.u32("hidden_size")? / hp.u32("num_attention_heads")?,
            } as usize;
            let f = |k: &str, d: f64| rope.get(k).and_then(Json::as_f64).unwrap_or(d);
            Ok(vec![("rope_freqs.weight".into(), llama3_rope_factors(f("rope_theta", 10000.0), dim, f("factor", 8.0), f("low_freq_factor", 1.0), f("high_freq_factor", 4.0), f("original_max_position_embeddings", 8192.0)))])
        }
        Arch::Phi3 => {
            let rope = &hp.rope;
            let (Some(long), short) = (rope.get("long_factor").and_then(Json::as_array).filter(|a| !a.is_empty()), rope.get("short_factor").and_then(Json::as_array)) else {
                return Ok(vec![]);
            };
            let n_embd = hp.u32("hidden_size")? as f64;
            let n_head = hp.u32("num_attention_heads")? as u64;
            let orig = rope.get("original_max_position_embeddings").and_then(Json::as_f64).context("config.json: rope_parameters.original_max_position_embeddings is missing")?;
            let scale = hp.u32("max_position_embeddings")? as f64 / orig;
            let pct = rope.get("partial_rotary_factor").and_then(Json::as_f64).unwrap_or(1.0);
            let rope_dims = (pct * n_embd) as u64 / n_head;
            let attn_factor = match rope.get("rope_type").and_then(Json::as_str).unwrap_or("").to_lowercase().as_str() {
                "su" | "longrope" if scale > 1.0 => (1.0 + scale.ln() / orig.ln()).sqrt(),
                "yarn" if scale > 1.0 => 0.1 * scale.ln() + 1.0,
                "su" | "longrope" | "yarn" => 1.0,
                "" => bail!("config.json: rope_parameters has long_factor but no rope_type"),
                t => bail!("config.json: rope_type {t:?} with long/short factors; llama.cpp's phi3 takes longrope or yarn"),
            };
            kvs.set(hp.key("rope.scaling.attn_factor"), Value::F32(attn_factor as f32));
            let short = short.context("config.json: rope_parameters has long_factor but no short_factor")?;
            if long.len() != short.len() || long.len() as f64 != rope_dims as f64 / 2.0 {
                bail!("config.json: rope long/short factors must have {} entries each (rotary dims / 2); they have {} and {}", rope_dims / 2, long.len(), short.len());
            }
            let floats = |a: &Vec<Json>| a.iter().map(|v| v.as_f64().map(|x| x as f32).context("config.json: a rope factor is not a number")).collect::<Result<Vec<f32>>>();
            Ok(vec![("rope_factors_long.weight".into(), floats(long)?), ("rope_factors_short.weight".into(), floats(short)?)])
        }
        _ => Ok(vec![]),
    }
}

/// Llama 3's per-frequency RoPE scaling, as the converter computes it: the
/// frequencies in f32 (torch), the smoothing in f32 tensor arithmetic with
/// Python scalars, each scalar op rounded to f32.
pub fn llama3_rope_factors(base: f64, dim: usize, factor: f64, low: f64, high: f64, old_ctx: f64) -> Vec<f32> {
    let (lf_wav, hf_wav) = (old_ctx / low, old_ctx / high);
    (0..dim)
        .step_by(2)
        .map(|i| {
            let exponent = i as f32 / dim as f32;
            let freq = 1.0f32 / (base as f32).powf(exponent);
            // 2π / freq on a tensor is reciprocal(freq) · 2π.
            let wavelen = (1.0f32 / freq) * (2.0 * std::f64::consts::PI) as f32;
            if wavelen < hf_wav as f32 {
                1.0
            } else if wavelen > lf_wav as f32 {
                factor as f32
            } else {
                let smooth = ((1.0f32 / wavelen) * old_ctx as f32 - low as f32) / (high - low) as f32;
                1.0f32 / ((1.0f32 - smooth) / factor as f32 + smooth)
            }
        })
        .collect()
}

/// Permute the rows of a [rows, cols] matrix (or a bias, cols 1) from HF's
/// half-split RoPE layout to llama.cpp's interleaved one.
pub fn permute_rows<T: Copy>(data: &[T], rows: usize, n_head: usize) -> Result<Vec<T>> {
    if n_head == 0 || !rows.is_multiple_of(2 * n_head) {
        bail!("cannot permute {rows} rows for {n_head} heads (rows must be a multiple of 2·heads)");
    }
    let cols = data.len() / rows;
    let half = rows / n_head / 2;
    let mut out = Vec::with_capacity(data.len());
    for h in 0..n_head {
        for j in 0..half {
            for i in 0..2 {
                let r = h * 2 * half + i * half + j;
                out.extend_from_slice(&data[r * cols..(r + 1) * cols]);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_interleaves_the_two_halves_of_each_head() {
        // 2 heads of 4 rows: HF rows [a0 a1 b0 b1] per head become [a0 b0 a1 b1].
        let rows: Vec<u32> = (0..8).collect();
        assert_eq!(permute_rows(&rows, 8, 2).unwrap(), vec![0, 2, 1, 3, 4, 6, 5, 7]);
        assert!(permute_rows(&rows, 8, 3).is_err());
    }

    #[test]
    fn unknown_architectures_are_named_in_the_error() {
        let e = Hparams::from_json(&json!({"architectures": ["FalconForCausalLM"]})).err().unwrap().to_string();
        assert!(e.contains("FalconForCausalLM") && e.contains("Phi3ForCausalLM"), "{e}");
    }
}
