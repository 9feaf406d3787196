//! The checkpoint layout of bitsandbytes' 4-bit models, as transformers
//! saves them. Each quantized Linear at prefix P stores
//!
//! ```text
//! P.weight                                  U8 [(n+1)/2, 1]  packed codes (or the same bytes as BF16 ...)
//! P.weight.absmax                           U8 [blocks]      (F32 without double quantization)
//! P.weight.quant_map                        F32 [16]
//! P.weight.nested_absmax                    F32 [ceil(blocks/256)]   } double quantization
//! P.weight.nested_quant_map                 F32 [256]                } only
//! P.weight.quant_state.bitsandbytes__nf4    U8 [len]         UTF-8 JSON: quant_type, blocksize,
//!                                                            dtype, shape, nested_* fields
//! ```
//!
//! and config.json carries a `quantization_config` (`QuantizationConfig`).

use super::nf4::{Absmax, Nf4Tensor};
use crate::backend::DType;
use anyhow::{Context, Result, bail};
use regex::Regex;
use safetensors::Dtype;
use serde_json::{Value, json};

/// The name under which bitsandbytes packs the non-tensor quantization state.
pub const QUANT_STATE_KEY: &str = "quant_state.bitsandbytes__nf4";
/// The same key of an FP4 checkpoint, refused by name.
pub const FP4_STATE_KEY: &str = "quant_state.bitsandbytes__fp4";

/// torch's name of a dtype, as bitsandbytes and config.json spell it.
pub fn torch_dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "float32",
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
    }
}

fn dtype_from_torch_name(s: &str) -> Option<DType> {
    match s.strip_prefix("torch.").unwrap_or(s) {
        "float32" | "float" => Some(DType::F32),
        "float16" | "half" => Some(DType::F16),
        "bfloat16" => Some(DType::BF16),
        _ => None,
    }
}

// ---------------------------------------------------------------- quant state

/// The JSON of `P.weight.quant_state.bitsandbytes__nf4`.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantState {
    pub blocksize: usize,
    /// The dtype the weight had before quantization (and dequantizes to).
    pub dtype: DType,
    pub shape: [usize; 2],
    /// Some((nested_blocksize, nested_offset)) with double quantization.
    pub nested: Option<(usize, f32)>,
}

impl QuantState {
    /// Parse the packed JSON; `key` names the tensor in errors.
    pub fn parse(bytes: &[u8], key: &str) -> Result<QuantState> {
        let text = std::str::from_utf8(bytes).with_context(|| format!("tensor {key}: not UTF-8 JSON"))?;
        let v: Value = serde_json::from_str(text).with_context(|| format!("tensor {key}: not valid JSON: {text}"))?;
        let field = |name: &str| v.get(name).with_context(|| format!("tensor {key}: the quant state has no \"{name}\" field ({text})"));
        let uint = |name: &str| -> Result<usize> {
            field(name)?.as_u64().map(|n| n as usize).with_context(|| format!("tensor {key}: \"{name}\" must be a non-negative integer ({text})"))
        };
        match field("quant_type")?.as_str() {
            Some("nf4") => {}
            Some("fp4") => bail!("tensor {key}: quant_type \"fp4\" is not supported; ferrotune reads NF4 (bnb_4bit_quant_type=\"nf4\") checkpoints"),
            other => bail!("tensor {key}: quant_type {other:?}, expected \"nf4\""),
        }
        let blocksize = uint("blocksize")?;
        if blocksize == 0 {
            bail!("tensor {key}: blocksize must be positive");
        }
        let dname = field("dtype")?.as_str().with_context(|| format!("tensor {key}: \"dtype\" must be a string"))?;
        let dtype = dtype_from_torch_name(dname)
            .with_context(|| format!("tensor {key}: dtype \"{dname}\"; expected float32, float16 or bfloat16"))?;
        let shape: Vec<usize> = field("shape")?
            .as_array()
            .and_then(|a| a.iter().map(|d| d.as_u64().map(|n| n as usize)).collect())
            .with_context(|| format!("tensor {key}: \"shape\" must be a list of integers"))?;
        let [rows, cols] = shape[..] else {
            bail!("tensor {key}: shape {shape:?}; ferrotune reads 2-D quantized weights only");
        };
        let nested = match v.get("nested_offset") {
            None | Some(Value::Null) => None,
            Some(off) => {
                let offset = off.as_f64().with_context(|| format!("tensor {key}: \"nested_offset\" must be a number"))? as f32;
                let nb = uint("nested_blocksize")?;
                if nb == 0 {
                    bail!("tensor {key}: nested_blocksize must be positive");
                }
                match v.get("nested_dtype").and_then(Value::as_str) {
                    Some("float32") | None => {}
                    Some(d) => bail!("tensor {key}: nested_dtype \"{d}\"; expected float32"),
                }
                Some((nb, offset))
            }
        };
        Ok(QuantState { blocksize, dtype, shape: [rows, cols], nested })
    }

    /// The JSON bitsandbytes writes (Python's json.dumps of its dict, keys in
    /// its order, floats as Python's repr).
    pub fn to_json(&self) -> String {
        let mut s = format!(
            "{{\"quant_type\": \"nf4\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{}, {}]",
            self.blocksize,
            torch_dtype_name(self.dtype),
            self.shape[0],
            self.shape[1]
        );
        if let Some((nb, offset)) = self.nested {
            s += &format!(
                ", \"nested_blocksize\": {nb}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
                python_float_repr(offset as f64)
            );
        }
        s.push('}');
        s
    }
}

/// Python's `repr(float)` (what json.dumps writes): the shortest digits that
/// round-trip, in positional form for exponents -4..15, else as d.ddde±XX.
pub fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0".into() } else { "0.0".into() };
    }
    // Rust's `{:e}` gives the same shortest round-trip digits: "d.ddde-X".
    let sci = format!("{:e}", x.abs());
    let (mant, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("{:e} exponent is an integer");
    let digits: String = mant.chars().filter(|c| *c != '.').collect();
    let sign = if x < 0.0 { "-" } else { "" };
    if (-4..16).contains(&exp) {
        let body = if exp < 0 {
            format!("0.{}{}", "0".repeat((-exp - 1) as usize), digits)
        } else {
            let int_len = exp as usize + 1;
            if digits.len() <= int_len {
                format!("{}{}.0", digits, "0".repeat(int_len - digits.len()))
            } else {
                format!("{}.{}", &digits[..int_len], &digits[int_len..])
            }
        };
        format!("{sign}{body}")
    } else {
        let m = if digits.len() == 1 { digits } else { format!("{}.{}", &digits[..1], &digits[1..]) };
        format!("{sign}{m}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
    }
}

// ---------------------------------------------------------------- read

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// One tensor of a checkpoint: dtype, shape and raw little-endian bytes.
pub type RawTensor<'a> = (Dtype, Vec<usize>, &'a [u8]);

/// Read the NF4 weight stored at `prefix` (e.g.
/// "model.layers.0.self_attn.q_proj"). `get(name)` returns a tensor of the
/// checkpoint, or an error when the checkpoint has none of that name.
pub fn read_nf4<'a>(get: impl Fn(&str) -> Result<RawTensor<'a>>, prefix: &str) -> Result<Nf4Tensor> {
    Ok(read_nf4_with_state(get, prefix)?.0)
}

/// `read_nf4`, also returning the quant state (the weight's original dtype).
pub fn read_nf4_with_state<'a>(get: impl Fn(&str) -> Result<RawTensor<'a>>, prefix: &str) -> Result<(Nf4Tensor, QuantState)> {
    let name = |suffix: &str| format!("{prefix}.weight{suffix}");
    let fetch = |suffix: &str| -> Result<RawTensor<'a>> {
        let key = name(suffix);
        get(&key).with_context(|| format!("tensor {key} of the 4-bit weight {prefix}.weight"))
    };
    let state_key = name(&format!(".{QUANT_STATE_KEY}"));
    let (dt, _, bytes) = match get(&state_key) {
        Ok(t) => t,
        Err(e) => {
            if get(&name(&format!(".{FP4_STATE_KEY}"))).is_ok() {
                bail!("{prefix}.weight is quantized as FP4; ferrotune supports NF4 (bnb_4bit_quant_type=\"nf4\") only");
            }
            return Err(e.context(format!("tensor {state_key} of the 4-bit weight {prefix}.weight")));
        }
    };
    if dt != Dtype::U8 {
        bail!("tensor {state_key} has dtype {dt:?}; expected U8 (UTF-8 JSON)");
    }
    let qs = QuantState::parse(bytes, &state_key)?;
    let [rows, cols] = qs.shape;
    let numel = rows * cols;
    let n_blocks = numel.div_ceil(qs.blocksize);

    // The packed codes: U8 [(n+1)/2, 1], or the same bytes viewed as another
    // dtype (bnb_4bit_quant_storage, e.g. bfloat16): [bytes / size, 1].
    let (dt, shape, bytes) = fetch("")?;
    let want_bytes = numel.div_ceil(2);
    let elem = dt.bitsize() / 8;
    if bytes.len() != want_bytes || elem == 0 || shape != [want_bytes / elem, 1] || want_bytes % elem != 0 {
        bail!(
            "tensor {}: dtype {dt:?} shape {shape:?} ({} bytes); a {rows}x{cols} NF4 weight is {want_bytes} bytes of packed codes, stored as U8 [{want_bytes}, 1]",
            name(""),
            bytes.len()
        );
    }
    let packed = bytes.to_vec();

    let expect = |suffix: &str, dtype: Dtype, len: usize| -> Result<&'a [u8]> {
        let (dt, shape, bytes) = fetch(suffix)?;
        if dt != dtype || shape != [len] || bytes.len() != len * dtype.bitsize() / 8 {
            bail!("tensor {}: dtype {dt:?} shape {shape:?}; expected {dtype:?} [{len}] for a {rows}x{cols} weight in blocks of {}", name(suffix), qs.blocksize);
        }
        Ok(bytes)
    };
    let code_bytes = expect(".quant_map", Dtype::F32, 16)?;
    let code: [f32; 16] = f32s(code_bytes).try_into().expect("16 values checked");
    let absmax = match qs.nested {
        None => Absmax::Plain(f32s(expect(".absmax", Dtype::F32, n_blocks)?)),
        Some((nb, offset)) => {
            let codes = expect(".absmax", Dtype::U8, n_blocks)?.to_vec();
            let nested_absmax = f32s(expect(".nested_absmax", Dtype::F32, n_blocks.div_ceil(nb))?);
            let nested_map = f32s(expect(".nested_quant_map", Dtype::F32, 256)?);
            Absmax::Nested { codes, nested_absmax, nested_map, offset, nested_blocksize: nb }
        }
    };
    Ok((Nf4Tensor { shape: qs.shape, blocksize: qs.blocksize, packed, absmax, code }, qs))
}

// ---------------------------------------------------------------- write

/// One output tensor: name, dtype, shape, little-endian bytes.
pub type OwnedTensor = (String, Dtype, Vec<usize>, Vec<u8>);

fn f32_bytes(xs: &[f32]) -> Vec<u8> {
    xs.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The quant state JSON of `t`, which was quantized from `original_dtype`.
pub fn quant_state_of(t: &Nf4Tensor, original_dtype: DType) -> QuantState {
    let nested = match &t.absmax {
        Absmax::Plain(_) => None,
        Absmax::Nested { offset, nested_blocksize, .. } => Some((*nested_blocksize, *offset)),
    };
    QuantState { blocksize: t.blocksize, dtype: original_dtype, shape: t.shape, nested }
}

/// The tensors transformers + bitsandbytes save for `t` at `prefix`, with
/// uint8 quant storage, in their state-dict order: weight, absmax,
/// quant_map, nested_absmax, nested_quant_map, quant state.
pub fn write_nf4(prefix: &str, t: &Nf4Tensor, original_dtype: DType) -> Vec<OwnedTensor> {
    let name = |suffix: &str| format!("{prefix}.weight{suffix}");
    let mut out = vec![(name(""), Dtype::U8, vec![t.packed.len(), 1], t.packed.clone())];
    match &t.absmax {
        Absmax::Plain(a) => {
            out.push((name(".absmax"), Dtype::F32, vec![a.len()], f32_bytes(a)));
            out.push((name(".quant_map"), Dtype::F32, vec![16], f32_bytes(&t.code)));
        }
        Absmax::Nested { codes, nested_absmax, nested_map, .. } => {
            out.push((name(".absmax"), Dtype::U8, vec![codes.len()], codes.clone()));
            out.push((name(".quant_map"), Dtype::F32, vec![16], f32_bytes(&t.code)));
            out.push((name(".nested_absmax"), Dtype::F32, vec![nested_absmax.len()], f32_bytes(nested_absmax)));
            out.push((name(".nested_quant_map"), Dtype::F32, vec![nested_map.len()], f32_bytes(nested_map)));
        }
    }
    let json = quant_state_of(t, original_dtype).to_json().into_bytes();
    out.push((name(&format!(".{QUANT_STATE_KEY}")), Dtype::U8, vec![json.len()], json));
    out
}

// ---------------------------------------------------------------- which modules

/// Whether the checkpoint tensor `name` of shape `shape` is a weight
/// bitsandbytes quantizes: the weight of a Linear inside a decoder layer
/// (2-D, under `.layers.<i>.`), unless its module matches one of
/// `skip_modules` (transformers' `llm_int8_skip_modules` rule: a pattern
/// matching the module name from its start up to a module boundary, as a
/// regular expression, or as a suffix). Embeddings, norms, biases and lm_head
/// stay as they are.
pub fn is_quantized(name: &str, shape: &[usize], skip_modules: &[String]) -> bool {
    let Some(module) = name.strip_suffix(".weight") else { return false };
    if shape.len() != 2 || !in_decoder_layer(module) {
        return false;
    }
    !skip_modules.iter().any(|p| skip_matches(module, p))
}

fn in_decoder_layer(module: &str) -> bool {
    let parts: Vec<&str> = module.split('.').collect();
    parts.windows(2).enumerate().any(|(i, w)| {
        w[0] == "layers" && !w[1].is_empty() && w[1].bytes().all(|b| b.is_ascii_digit()) && i + 2 < parts.len()
    })
}

/// transformers' `should_convert_module` test for one pattern.
fn skip_matches(module: &str, pattern: &str) -> bool {
    if module.ends_with(pattern) {
        return true;
    }
    // re.match(rf"(?:{pattern})(?:(?<=\.)|(?=\.|$))", module)
    match Regex::new(&format!("^(?:{pattern})")) {
        Ok(re) => re.find(module).is_some_and(|m| {
            let rest = &module[m.end()..];
            m.as_str().ends_with('.') || rest.is_empty() || rest.starts_with('.')
        }),
        Err(_) => false,
    }
}

// ---------------------------------------------------------------- config

/// config.json's `quantization_config` for a bitsandbytes 4-bit NF4 model.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizationConfig {
    /// bnb_4bit_use_double_quant.
    pub double_quant: bool,
    /// bnb_4bit_compute_dtype.
    pub compute_dtype: DType,
    /// bnb_4bit_quant_storage: None for uint8, else the dtype the packed
    /// bytes are viewed as.
    pub quant_storage: Option<DType>,
    /// llm_int8_skip_modules.
    pub skip_modules: Vec<String>,
}

impl QuantizationConfig {
    /// The configuration `ferrotune quantize` writes: NF4, double
    /// quantization as asked, computing in the model's dtype, uint8 storage.
    pub fn nf4(double_quant: bool, compute_dtype: DType) -> QuantizationConfig {
        QuantizationConfig { double_quant, compute_dtype, quant_storage: None, skip_modules: Vec::new() }
    }

    /// Read `quantization_config` from a parsed config.json (`path` names it
    /// in errors): None when the model is not quantized.
    pub fn from_config(config: &Value, path: &str) -> Result<Option<QuantizationConfig>> {
        let Some(q) = config.get("quantization_config").filter(|q| !q.is_null()) else { return Ok(None) };
        let q = q.as_object().with_context(|| format!("{path}: \"quantization_config\" must be an object"))?;
        let key = |k: &str| format!("{path}: quantization_config.{k}");
        let flag = |k: &str| -> Result<bool> {
            match q.get(k) {
                None | Some(Value::Null) => Ok(false),
                Some(Value::Bool(b)) => Ok(*b),
                Some(v) => bail!("{} is {v}; expected true or false", key(k)),
            }
        };
        match q.get("quant_method").and_then(Value::as_str) {
            Some("bitsandbytes") => {}
            Some(m) => bail!("{} is \"{m}\"; ferrotune reads bitsandbytes 4-bit (NF4) models only", key("quant_method")),
            None => bail!("{} is missing; expected \"bitsandbytes\"", key("quant_method")),
        }
        if flag("load_in_8bit")? {
            bail!("{} is true: 8-bit (LLM.int8) models are not supported; ferrotune reads 4-bit NF4 models", key("load_in_8bit"));
        }
        if !flag("load_in_4bit")? {
            bail!("{} is not true; ferrotune reads bitsandbytes 4-bit (NF4) models only", key("load_in_4bit"));
        }
        match q.get("bnb_4bit_quant_type").and_then(Value::as_str) {
            Some("nf4") => {}
            Some("fp4") => bail!("{} is \"fp4\": FP4 is not supported; ferrotune supports \"nf4\"", key("bnb_4bit_quant_type")),
            Some(t) => bail!("{} is \"{t}\"; expected \"nf4\"", key("bnb_4bit_quant_type")),
            None => bail!("{} is missing (transformers then means \"fp4\", which is not supported); expected \"nf4\"", key("bnb_4bit_quant_type")),
        }
        let dtype_of = |k: &str, default: Option<DType>| -> Result<Option<DType>> {
            match q.get(k) {
                None | Some(Value::Null) => Ok(default),
                Some(Value::String(s)) if k == "bnb_4bit_quant_storage" && s == "uint8" => Ok(None),
                Some(Value::String(s)) => dtype_from_torch_name(s)
                    .map(Some)
                    .with_context(|| format!("{} is \"{s}\"; expected float32, float16 or bfloat16", key(k))),
                Some(v) => bail!("{} is {v}; expected a dtype name such as \"bfloat16\"", key(k)),
            }
        };
        let compute_dtype = dtype_of("bnb_4bit_compute_dtype", Some(DType::F32))?.expect("defaulted");
        let quant_storage = dtype_of("bnb_4bit_quant_storage", None)?;
        let skip_modules = match q.get("llm_int8_skip_modules") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|m| m.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .with_context(|| format!("{} must be a list of module names", key("llm_int8_skip_modules")))?,
            Some(v) => bail!("{} is {v}; expected a list of module names or null", key("llm_int8_skip_modules")),
        };
        Ok(Some(QuantizationConfig { double_quant: flag("bnb_4bit_use_double_quant")?, compute_dtype, quant_storage, skip_modules }))
    }

    /// The object transformers writes into config.json (every field of its
    /// BitsAndBytesConfig, as `save_pretrained` serializes it).
    pub fn to_json(&self) -> Value {
        json!({
            "_load_in_4bit": true,
            "_load_in_8bit": false,
            "bnb_4bit_compute_dtype": torch_dtype_name(self.compute_dtype),
            "bnb_4bit_quant_storage": self.quant_storage.map_or("uint8", torch_dtype_name),
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": self.double_quant,
            "llm_int8_enable_fp32_cpu_offload": false,
            "llm_int8_has_fp16_weight": false,
            "llm_int8_skip_modules": if self.skip_modules.is_empty() { Value::Null } else { json!(self.skip_modules) },
            "llm_int8_threshold": 6.0,
            "load_in_4bit": true,
            "load_in_8bit": false,
            "quant_method": "bitsandbytes",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_print_as_python_repr() {
        for (x, want) in [
            (0.47773662209510803, "0.47773662209510803"),
            (0.4593048095703125, "0.4593048095703125"),
            (1.0, "1.0"),
            (2.5, "2.5"),
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (1.25e-7, "1.25e-07"),
            (1e16, "1e+16"),
            (123456789012345.0, "123456789012345.0"),
            (-0.015, "-0.015"),
            (0.0, "0.0"),
        ] {
            assert_eq!(python_float_repr(x), want, "{x}");
        }
    }

    #[test]
    fn decoder_layer_linears_are_quantized_and_the_rest_is_not() {
        let skip = vec!["mlp.down_proj".to_string()];
        assert!(is_quantized("model.layers.0.self_attn.q_proj.weight", &[4, 4], &[]));
        assert!(!is_quantized("model.layers.0.self_attn.q_proj.bias", &[4], &[]));
        assert!(!is_quantized("model.layers.0.input_layernorm.weight", &[4], &[]));
        assert!(!is_quantized("model.embed_tokens.weight", &[8, 4], &[]));
        assert!(!is_quantized("lm_head.weight", &[8, 4], &[]));
        assert!(!is_quantized("model.layers.0.mlp.down_proj.weight", &[4, 4], &skip));
        assert!(is_quantized("model.layers.0.mlp.gate_proj.weight", &[4, 4], &skip));
        // A pattern from the start stops at a module boundary: layer 1, not layer 11.
        assert!(is_quantized("model.layers.11.mlp.up_proj.weight", &[4, 4], &["model.layers.1".into()]));
        assert!(!is_quantized("model.layers.1.mlp.up_proj.weight", &[4, 4], &["model.layers.1".into()]));
    }
}
