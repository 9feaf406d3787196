//! llama-quantize's choices for the k-quant file types Q4_K_M, Q5_K_M and
//! Q6_K: the order it writes tensors in, which tensors it quantizes, and the
//! type of each (the mixture rules for output, attn_v and ffn_down, then the
//! fallbacks for rows that do not fit a 256-value block). Only what applies
//! to a dense model quantized without an importance matrix or overrides.

use super::types::GgmlType;
use std::cmp::Ordering;

/// A k-quant file type `ferrotune export gguf` can write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KQuant {
    Q4KM,
    Q5KM,
    Q6K,
}

impl KQuant {
    /// "q4_k_m" | "q5_k_m" | "q6_k", any case.
    pub fn parse(s: &str) -> Option<KQuant> {
        match s.to_ascii_lowercase().as_str() {
            "q4_k_m" => Some(KQuant::Q4KM),
            "q5_k_m" => Some(KQuant::Q5KM),
            "q6_k" => Some(KQuant::Q6K),
            _ => None,
        }
    }

    /// `general.file_type` (llama.cpp's LLAMA_FTYPE_MOSTLY_*).
    pub fn file_type(self) -> u32 {
        match self {
            KQuant::Q4KM => 15,
            KQuant::Q5KM => 17,
            KQuant::Q6K => 18,
        }
    }

    /// The type of every tensor no rule singles out.
    pub fn default_type(self) -> GgmlType {
        match self {
            KQuant::Q4KM => GgmlType::Q4K,
            KQuant::Q5KM => GgmlType::Q5K,
            KQuant::Q6K => GgmlType::Q6K,
        }
    }
}

/// A tensor of the unquantized (f16/bf16) file: GGUF name, ggml shape
/// (`ne[0]` is the row length) and stored type.
pub struct TensorDesc<'a> {
    pub name: &'a str,
    pub ne: &'a [u64],
    pub ty: GgmlType,
}

/// The layer number llama.cpp reads from a name with `sscanf("blk.%d.")`;
/// -1 for names outside the blocks.
pub fn layer_of(name: &str) -> i32 {
    let Some(rest) = name.strip_prefix("blk.") else { return -1 };
    // %d: optional white space, an optional sign, then digits.
    let rest = rest.trim_start_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
    let (neg, digits) = match rest.as_bytes().first() {
        Some(b'-') => (true, &rest[1..]),
        Some(b'+') => (false, &rest[1..]),
        _ => (false, rest),
    };
    let end = digits.bytes().position(|b| !b.is_ascii_digit()).unwrap_or(digits.len());
    if end == 0 {
        return -1;
    }
    let v = digits[..end].bytes().fold(0i64, |v, b| (v * 10 + (b - b'0') as i64).min(i32::MAX as i64 + 1));
    let v = if neg { -v } else { v };
    v.clamp(i32::MIN as i64, i32::MAX as i64) as i32
}

/// llama-quantize's output order: by layer (tensors outside the blocks
/// first), then by name bytewise. Returns indices into `names`.
pub fn quantize_order(names: &[&str]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..names.len()).collect();
    idx.sort_by(|&a, &b| match layer_of(names[a]).cmp(&layer_of(names[b])) {
        Ordering::Equal => names[a].as_bytes().cmp(names[b].as_bytes()),
        o => o,
    });
    idx
}

/// Whether llama.cpp's loader types a model as its 70B class, which gives
/// attn_v one more step in Q4_K_M: the llama architecture with 80 layers
/// and grouped-query attention, or qwen2 with 80 layers.
pub fn llm_type_70b(arch: &str, n_layer: usize, n_head: usize, n_head_kv: usize) -> bool {
    n_layer == 80 && (arch == "qwen2" || (arch == "llama" && n_head != n_head_kv))
}

/// The output type of every tensor (given in [`quantize_order`]) for a
/// model that is not of the 70B class; see [`plan_for`].
pub fn plan(ftype: KQuant, n_layer: usize, tensors: &[TensorDesc]) -> Vec<GgmlType> {
    plan_for(ftype, n_layer, false, tensors)
}

/// The output type of every tensor (given in [`quantize_order`]), as
/// llama_model_quantize chooses it. `n_layer` is the file's block_count;
/// `is_70b` is [`llm_type_70b`] of the model. A tensor whose type is
/// returned unchanged is copied as it is.
pub fn plan_for(ftype: KQuant, n_layer: usize, is_70b: bool, tensors: &[TensorDesc]) -> Vec<GgmlType> {
    let cats: Vec<Category> = tensors.iter().map(|t| category(t.name)).collect();
    let n_attention_wv = cats.iter().filter(|c| c.is_attn_v()).count() as i64;
    let tied = !cats.contains(&Category::Output);
    let n_layer = n_layer as i64;
    let (mut i_attention_wv, mut i_ffn_down) = (0i64, 0i64);
    let default = ftype.default_type();
    let mixed = matches!(ftype, KQuant::Q4KM | KQuant::Q5KM);

    tensors
        .iter()
        .zip(&cats)
        .map(|(t, &cat)| {
            if !allows_quantization(t.name, t.ne) {
                return t.ty;
            }
            let nx = t.ne.first().copied().unwrap_or(1);
            let mut ty = default;
            if cat == Category::Output || (tied && cat == Category::TokenEmbd) {
                // The output matrix (or the embedding that doubles as it).
                if !nx.is_multiple_of(default.block_len() as u64) {
                    ty = GgmlType::Q8_0;
                } else if ty != GgmlType::Q8_0 {
                    ty = GgmlType::Q6K;
                }
            } else if cat.is_attn_v() {
                if mixed && use_more_bits(i_attention_wv, n_attention_wv) {
                    ty = GgmlType::Q6K;
                }
                if is_70b && ty == GgmlType::Q4K {
                    ty = GgmlType::Q5K;
                }
                i_attention_wv += 1;
            } else if cat == Category::FfnDown {
                if mixed && use_more_bits(i_ffn_down, n_layer) {
                    ty = GgmlType::Q6K;
                }
                i_ffn_down += 1;
            }
            fallback(ty, nx)
        })
        .collect()
}

/// Layers that get more bits: the first and last eighth, and every third
/// one in between (C integer arithmetic).
fn use_more_bits(i: i64, n: i64) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// A type whose block does not divide the row: the 32-block type next to
/// it, and F16 when even that does not fit.
fn fallback(ty: GgmlType, nx: u64) -> GgmlType {
    if nx.is_multiple_of(ty.block_len() as u64) {
        return ty;
    }
    let ty = match ty {
        GgmlType::Q4K => GgmlType::Q5_0,
        GgmlType::Q5K => GgmlType::Q5_1,
        GgmlType::Q6K => GgmlType::Q8_0,
        other => other,
    };
    if nx.is_multiple_of(ty.block_len() as u64) { ty } else { GgmlType::F16 }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Category {
    TokenEmbd,
    AttnV,
    AttnQkv,
    AttnKvB,
    FfnDown,
    Output,
    Other,
}

impl Category {
    fn is_attn_v(self) -> bool {
        matches!(self, Category::AttnV | Category::AttnQkv | Category::AttnKvB)
    }
}

/// llama-quantize's name categories, tested in its order (only those with
/// a rule for these file types are told apart).
fn category(name: &str) -> Category {
    if name == "output.weight" {
        Category::Output
    } else if name == "token_embd.weight" || name == "per_layer_token_embd.weight" {
        Category::TokenEmbd
    } else if name.contains("attn_qkv.weight") {
        Category::AttnQkv
    } else if name.contains("attn_kv_b.weight") {
        Category::AttnKvB
    } else if name.contains("attn_v.weight") {
        Category::AttnV
    } else if ["attn_k.weight", "attn_q.weight", "attn_output.weight", "ffn_up", "ffn_gate"]
        .iter()
        .any(|p| name.contains(p))
    {
        Category::Other
    } else if name.contains("ffn_down") {
        Category::FfnDown
    } else {
        Category::Other
    }
}

/// Names llama-quantize never quantizes, whatever their shape.
const KEEP_SUBSTRINGS: &[&str] = &[
    "_norm.weight",
    "ffn_gate_inp.weight",
    "ffn_gate_tid2eid.weight",
    "altup",
    "laurel",
    "per_layer_model_proj",
    "ssm_conv1d",
    "shortconv.conv.weight",
    "indexer.k_proj.weight",
    "indexer.q_proj.weight",
    "time_mix_first.weight",
    "time_mix_w0.weight",
    "time_mix_w1.weight",
    "time_mix_w2.weight",
    "time_mix_v0.weight",
    "time_mix_v1.weight",
    "time_mix_v2.weight",
    "time_mix_a0.weight",
    "time_mix_a1.weight",
    "time_mix_a2.weight",
    "time_mix_g1.weight",
    "time_mix_g2.weight",
    "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight",
    "time_mix_lerp_fused.weight",
    "attn_rel_b.weight",
    ".position_embd",
    "sam.pos_embd",
    "sam.neck.",
    "sam.net_",
    ".rel_pos",
    ".patch_embd",
    ".patch_merger",
    "a.rvq.codebook",
    "mm.a.code_embd",
];

/// llama-quantize's tensor_allows_quantization for the architectures the
/// exporter writes (the GLM5-only exclusions do not apply).
fn allows_quantization(name: &str, ne: &[u64]) -> bool {
    // ggml_n_dims: trailing dimensions of 1 do not count, so a one-row
    // matrix is 1-D and stays as it is.
    let n_dims = ne.iter().rposition(|&d| d > 1).map_or(1, |i| i + 1);
    if n_dims < 2 {
        return false;
    }
    // The "ends in weight" test compares rfind("weight") with size - 6 as
    // size_t; for a 5-byte name both sides are SIZE_MAX and it passes.
    let ends_weight = name.ends_with("weight") || name.len() == 5;
    ends_weight
        && name != "position_embd.weight"
        && name != "token_types.weight"
        && !KEEP_SUBSTRINGS.iter().any(|s| name.contains(s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value as J;

    const TYPES: [GgmlType; 9] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
        GgmlType::BF16,
    ];

    fn ty(name: &str) -> GgmlType {
        *TYPES.iter().find(|t| t.name() == name).unwrap_or_else(|| panic!("type {name}"))
    }

    /// Tensor order and types must equal what llama_model_quantize wrote
    /// for each fixture model and file type.
    #[test]
    fn plan_matches_llama_quantize() {
        let p = format!("{}/tests/fixtures/gguf/quants/rules.json", env!("CARGO_MANIFEST_DIR"));
        let models: J = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        let mut checked = 0;
        for m in models.as_array().unwrap() {
            let model = m["name"].as_str().unwrap();
            let dtype = ty(m["dtype"].as_str().unwrap());
            let tensors: Vec<(&str, Vec<u64>)> = m["tensors"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| (t[0].as_str().unwrap(), t[1].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).collect()))
                .collect();
            let names: Vec<&str> = tensors.iter().map(|t| t.0).collect();
            let order = quantize_order(&names);
            let got_order: Vec<&str> = order.iter().map(|&i| names[i]).collect();
            let want_order: Vec<&str> = m["order"].as_array().unwrap().iter().map(|n| n.as_str().unwrap()).collect();
            assert_eq!(got_order, want_order, "{model}: tensor order");

            let descs: Vec<TensorDesc> = order
                .iter()
                .map(|&i| {
                    let (name, ne) = (tensors[i].0, &tensors[i].1[..]);
                    // The fixture writer stores 1-D tensors and biases as F32.
                    let ty = if ne.len() == 1 || name.ends_with(".bias") { GgmlType::F32 } else { dtype };
                    TensorDesc { name, ne, ty }
                })
                .collect();
            let heads = m["heads"].as_array().unwrap();
            let n_layer = m["n_layer"].as_u64().unwrap() as usize;
            let is_70b = llm_type_70b(
                m["arch"].as_str().unwrap(),
                n_layer,
                heads[0].as_u64().unwrap() as usize,
                heads[1].as_u64().unwrap() as usize,
            );
            for (key, ft) in [("q4_k_m", KQuant::Q4KM), ("q5_k_m", KQuant::Q5KM), ("q6_k", KQuant::Q6K)] {
                let want: Vec<GgmlType> =
                    m["expected"][key].as_array().unwrap().iter().map(|t| ty(t.as_str().unwrap())).collect();
                let got = plan_for(ft, n_layer, is_70b, &descs);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(g, w, "{model} {key}: {} {:?}", descs[i].name, descs[i].ne);
                }
                assert_eq!(got.len(), want.len());
                checked += 1;
            }
        }
        assert_eq!(checked, 27);
    }

    #[test]
    fn names_and_layers() {
        assert_eq!(KQuant::parse("Q4_K_M"), Some(KQuant::Q4KM));
        assert_eq!(KQuant::parse("q6_k").map(KQuant::file_type), Some(18));
        assert_eq!(KQuant::parse("q5_k_s"), None);
        assert_eq!(layer_of("blk.12.attn_q.weight"), 12);
        assert_eq!(layer_of("blk.x.attn_q.weight"), -1);
        assert_eq!(layer_of("output.weight"), -1);
        assert_eq!(layer_of("blk.7"), 7);
        let names = ["blk.10.a", "blk.2.b", "token_embd.weight", "blk.2.a", "output.weight"];
        let got: Vec<&str> = quantize_order(&names).into_iter().map(|i| names[i]).collect();
        assert_eq!(got, ["output.weight", "token_embd.weight", "blk.2.a", "blk.2.b", "blk.10.a"]);
        // A one-row matrix counts as 1-D and is kept.
        let t = [TensorDesc { name: "blk.0.attn_q.weight", ne: &[256, 1], ty: GgmlType::BF16 }];
        assert_eq!(plan(KQuant::Q6K, 1, &t), [GgmlType::BF16]);
    }
}
