//! NF4 quantization against bitsandbytes (tests/fixtures/nf4, written by
//! tests/fixtures/nf4.py), the bitsandbytes 4-bit checkpoint layout, and
//! `ferrotune quantize`.

mod common;

use common::fixture;
use ferrotune::backend::{DType, to_f32};
use ferrotune::quant::bnb::{self, QuantizationConfig, RawTensor};
use ferrotune::quant::nf4::{self, Absmax, Nf4Tensor};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn nf4_dir() -> PathBuf {
    fixture("nf4")
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

fn bits(xs: &[f32]) -> Vec<u32> {
    xs.iter().map(|x| x.to_bits()).collect()
}

fn float_dtype(d: Dtype) -> DType {
    match d {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        other => panic!("not a float dtype: {other:?}"),
    }
}

/// f32 values rounded to `d` (round to nearest even, as torch's casts), back in f32.
fn round_to(d: DType, xs: &[f32]) -> Vec<f32> {
    match d {
        DType::F32 => xs.to_vec(),
        DType::F16 => xs.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect(),
        DType::BF16 => xs.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect(),
    }
}

// ---------------------------------------------------------------- byte identity with bitsandbytes

#[test]
fn dynamic_map_is_bitsandbytes_create_dynamic_map() {
    let bytes = std::fs::read(nf4_dir().join("cases.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let want = f32s(st.tensor("dynamic_map").unwrap().data());
    assert_eq!(bits(&nf4::dynamic_map_signed()), bits(&want));
}

#[test]
fn quantize_is_byte_identical_to_bitsandbytes() {
    let bytes = std::fs::read(nf4_dir().join("cases.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let meta: Value = serde_json::from_str(&std::fs::read_to_string(nf4_dir().join("cases.json")).unwrap()).unwrap();
    let cases = meta["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let shape: Vec<usize> = case["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
        let shape = [shape[0], shape[1]];
        let dq = case["double_quant"].as_bool().unwrap();
        let t = |k: &str| st.tensor(&format!("{name}.{k}")).unwrap_or_else(|_| panic!("{name}.{k}"));
        let w = t("weight");
        let src_dtype = float_dtype(w.dtype());
        let q = nf4::quantize(&to_f32(src_dtype, w.data()), shape, dq);

        assert_eq!(t("packed").shape(), [q.packed.len(), 1], "{name}: packed shape");
        assert_eq!(q.packed, t("packed").data(), "{name}: packed codes");
        assert_eq!(bits(&q.code), bits(&f32s(t("quant_map").data())), "{name}: quant_map");
        match (&q.absmax, dq) {
            (Absmax::Plain(a), false) => {
                assert_eq!(bits(a), bits(&f32s(t("absmax").data())), "{name}: absmax");
            }
            (Absmax::Nested { codes, nested_absmax, nested_map, offset, nested_blocksize }, true) => {
                assert_eq!(*nested_blocksize, 256);
                assert_eq!(codes.as_slice(), t("absmax").data(), "{name}: absmax codes");
                assert_eq!(bits(nested_absmax), bits(&f32s(t("nested_absmax").data())), "{name}: nested_absmax");
                assert_eq!(bits(nested_map), bits(&f32s(t("nested_quant_map").data())), "{name}: nested_quant_map");
                assert_eq!(offset.to_bits(), f32s(t("offset").data())[0].to_bits(), "{name}: offset");
                // The offset bitsandbytes writes into the quant state JSON.
                let repr = bnb::python_float_repr(*offset as f64);
                assert_eq!(repr.parse::<f64>().unwrap(), case["nested_offset"].as_f64().unwrap(), "{name}: offset repr");
            }
            (a, _) => panic!("{name}: double_quant {dq} but absmax {a:?}"),
        }
        if case["dequant"].as_bool().unwrap() {
            let deq = q.dequantize();
            assert_eq!(bits(&deq), bits(&f32s(t("dequant").data())), "{name}: dequantized (f32)");
            if src_dtype != DType::F32 {
                let native = to_f32(src_dtype, t("dequant_native").data());
                assert_eq!(bits(&round_to(src_dtype, &deq)), bits(&native), "{name}: dequantized ({src_dtype:?})");
            }
        }
    }
}

#[test]
fn quantize_in_chunks_equals_quantize_whole() {
    // The streaming writer quantizes a block-aligned chunk at a time.
    let w: Vec<f32> = (0..7 * 131).map(|i| ((i * 37 % 101) as f32 - 50.0) / 13.0).collect();
    let whole = nf4::quantize(&w, [7, 131], false);
    let mut absmax = Vec::new();
    let mut packed = Vec::new();
    for chunk in w.chunks(128) {
        let first = absmax.len();
        nf4::push_block_absmax(chunk, 64, &mut absmax);
        nf4::push_packed_codes(chunk, &absmax[first..], 64, &nf4::NF4_CODE, &mut packed);
    }
    assert_eq!(Absmax::Plain(absmax), whole.absmax);
    assert_eq!(packed, whole.packed);
}

// ---------------------------------------------------------------- the checkpoint layout

/// A safetensors file held in memory, with `get` for bnb::read_nf4.
struct StFile {
    bytes: Vec<u8>,
}

impl StFile {
    fn open(path: &Path) -> StFile {
        StFile { bytes: std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())) }
    }

    fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).unwrap()
    }

    fn get(&self, name: &str) -> anyhow::Result<RawTensor<'_>> {
        let st = self.st();
        let t = st.tensor(name).map_err(|_| anyhow::anyhow!("tensor {name} is missing"))?;
        Ok((t.dtype(), t.shape().to_vec(), t.data()))
    }

    /// name -> (dtype, shape, bytes) of every tensor.
    fn all(&self) -> BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> {
        self.st().tensors().into_iter().map(|(n, t)| (n, (t.dtype(), t.shape().to_vec(), t.data().to_vec()))).collect()
    }
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The quantized modules of a fixture model, from its original weights.
fn quantize_fixture_weights(case: &str) -> Vec<(String, Nf4Tensor, DType)> {
    let orig = StFile::open(&fixture(case).join("model/model.safetensors"));
    let mut out = Vec::new();
    for (name, (dt, shape, bytes)) in orig.all() {
        if bnb::is_quantized(&name, &shape, &[]) {
            let prefix = name.strip_suffix(".weight").unwrap().to_string();
            let d = float_dtype(dt);
            out.push((prefix, nf4::quantize(&to_f32(d, &bytes), [shape[0], shape[1]], true), d));
        }
    }
    out
}

#[test]
fn transformers_checkpoint_reads_back_as_our_quantization() {
    for case in ["llama", "qwen2"] {
        let file = StFile::open(&nf4_dir().join(format!("bnb_{case}/model.safetensors")));
        let ours = quantize_fixture_weights(case);
        assert_eq!(ours.len(), 14, "{case}: 7 projections × 2 layers");
        for (prefix, q, dtype) in &ours {
            let (read, state) = bnb::read_nf4_with_state(|n| file.get(n), prefix).unwrap();
            assert_eq!(&read, q, "{case}: {prefix}");
            assert_eq!(state.dtype, *dtype, "{case}: {prefix} dtype");
            // And writing it gives back the very tensors transformers saved.
            for (name, dt, shape, bytes) in bnb::write_nf4(prefix, q, *dtype) {
                let (fdt, fshape, fbytes) = file.get(&name).unwrap();
                assert_eq!((dt, shape.as_slice(), bytes.as_slice()), (fdt, fshape.as_slice(), fbytes), "{case}: {name}");
            }
        }
        let cfg = read_json(&nf4_dir().join(format!("bnb_{case}/config.json")));
        let qc = QuantizationConfig::from_config(&cfg, "config.json").unwrap().unwrap();
        let dtype = ours[0].2;
        assert_eq!(qc, QuantizationConfig::nf4(true, dtype));
        assert_eq!(qc.to_json(), cfg["quantization_config"], "{case}: quantization_config as transformers writes it");
    }
}

#[test]
fn bf16_quant_storage_reads_the_same_bytes() {
    // Axolotl's bnb_4bit_quant_storage=bfloat16: the packed bytes viewed as bf16.
    let file = StFile::open(&nf4_dir().join("bnb_llama/model.safetensors"));
    let prefix = "model.layers.1.mlp.down_proj";
    let want = bnb::read_nf4(|n| file.get(n), prefix).unwrap();
    let key = format!("{prefix}.weight");
    let viewed: Vec<u8> = file.get(&key).unwrap().2.to_vec();
    let got = bnb::read_nf4(
        |n| if n == key { Ok((Dtype::BF16, vec![viewed.len() / 2, 1], viewed.as_slice())) } else { file.get(n) },
        prefix,
    )
    .unwrap();
    assert_eq!(got, want);
}

#[test]
fn bad_checkpoints_name_the_tensor() {
    let file = StFile::open(&nf4_dir().join("bnb_llama/model.safetensors"));
    let prefix = "model.layers.0.self_attn.q_proj";
    let err = |drop: &str, replace: Option<RawTensor<'_>>| -> String {
        let e = bnb::read_nf4(
            |n| {
                if n == drop {
                    return replace.clone().ok_or_else(|| anyhow::anyhow!("tensor {n} is missing"));
                }
                file.get(n)
            },
            prefix,
        )
        .unwrap_err();
        format!("{e:#}")
    };
    let absmax = format!("{prefix}.weight.absmax");
    let e = err(&absmax, None);
    assert!(e.contains(&absmax) && e.contains("missing"), "{e}");
    let nested = format!("{prefix}.weight.nested_absmax");
    let e = err(&nested, None);
    assert!(e.contains(&nested), "{e}");
    let bad = [0u8; 8];
    let e = err(&absmax, Some((Dtype::U8, vec![8], &bad)));
    assert!(e.contains(&absmax) && e.contains("[16]"), "{e}");
    let weight = format!("{prefix}.weight");
    let e = err(&weight, Some((Dtype::U8, vec![8, 1], &bad)));
    assert!(e.contains(&weight) && e.contains("512"), "{e}");
    let state = format!("{prefix}.weight.{}", bnb::QUANT_STATE_KEY);
    let fp4 = br#"{"quant_type": "fp4", "blocksize": 64, "dtype": "float32", "shape": [32, 32]}"#;
    let e = err(&state, Some((Dtype::U8, vec![fp4.len()], fp4)));
    assert!(e.contains(&state) && e.contains("fp4"), "{e}");
    let e = err(&state, None);
    assert!(e.contains(&state), "{e}");

    let mut cfg = read_json(&nf4_dir().join("bnb_llama/config.json"));
    cfg["quantization_config"]["bnb_4bit_quant_type"] = "fp4".into();
    let e = QuantizationConfig::from_config(&cfg, "m/config.json").unwrap_err().to_string();
    assert!(e.contains("m/config.json") && e.contains("bnb_4bit_quant_type") && e.contains("fp4"), "{e}");
    cfg["quantization_config"]["quant_method"] = "gptq".into();
    let e = QuantizationConfig::from_config(&cfg, "m/config.json").unwrap_err().to_string();
    assert!(e.contains("quant_method") && e.contains("gptq"), "{e}");
}
