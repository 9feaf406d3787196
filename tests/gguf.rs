//! GGUF export against the files llama.cpp's own tools wrote for the same
//! checkpoints (tests/fixtures/gguf_models.py): convert_hf_to_gguf.py for
//! f32, f16, bf16, q8_0 and auto, llama_model_quantize for q4_k_m, q5_k_m
//! and q6_k, convert_lora_to_gguf.py for adapters. Each file ferrotune
//! writes must be byte-identical to llama.cpp's; on a difference the test
//! names the first keys and tensors that differ.
//!
//! The checkpoints are regenerated from their manifests (every weight is a
//! function of its name and index), so the fixtures hold no weights.

use ferrotune::export::gguf::{self, ConvertOptions, ExportRequest, OutType};
use ferrotune_testkit::gguf_read::{diff, py_float, py_str, summarize};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf/models")
}

fn expected(case: &str) -> Value {
    let p = fixtures().join(case).join("expected.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

/// The case's model folder, rebuilt under `root/<basename>` (general.name
/// comes from the folder's name, as in the converter).
fn build(src: &Path, root: &Path, basename: &str) -> PathBuf {
    let dir = root.join(basename);
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        if e.file_name() != "manifest.json" {
            std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
        }
    }
    ferrotune_testkit::gguf_weights::write_checkpoint(&src.join("manifest.json"), &dir).unwrap();
    dir
}

/// Compare the file at `path` with one recorded output; the failure lists
/// the first differences.
fn check(path: &Path, want: &Value, what: &str) {
    let ours = summarize(&std::fs::read(path).unwrap()).unwrap();
    if ours["sha256"] == want["sha256"] {
        return;
    }
    let d = diff(&ours, want);
    panic!("{what}: not llama.cpp's file; {} differences, the first:\n{}", d.len(), d.iter().take(12).cloned().collect::<Vec<_>>().join("\n"));
}

fn model_case(case: &str) {
    let exp = expected(case);
    let tmp = tempfile::tempdir().unwrap();
    let dir = build(&fixtures().join(case).join("model"), tmp.path(), exp["model_dir_basename"].as_str().unwrap());
    let pre = exp["pre_forced"].as_str().map(str::to_string);
    let outputs = exp["outputs"].as_array().unwrap();
    assert_eq!(outputs.len(), 8, "{case}: every outtype is recorded");
    for want in outputs {
        let t = want["outtype"].as_str().unwrap();
        let out = tmp.path().join(format!("{case}-{t}.gguf"));
        let opts = ConvertOptions { tokenizer_pre: pre.clone() };
        gguf::convert::convert(&dir, &out, OutType::parse(t).unwrap(), &opts, &mut |_, _| {}).unwrap_or_else(|e| panic!("{case} {t}: {e:#}"));
        check(&out, want, &format!("{case} {t}"));
    }
    // llama.cpp ran the same bytes: its logits on the auto file agree with
    // transformers' (recorded when the fixture was made).
    let l = &exp["logits"];
    assert!(l["auto"]["max_abs_diff"].as_f64().unwrap() < 0.02, "{case}: {l}");
    assert_eq!(l["auto"]["top1"], l["hf_top1"], "{case}: {l}");
}

#[test]
fn llama_matches_llama_cpp() {
    model_case("llama");
}

#[test]
fn mistral_matches_llama_cpp() {
    model_case("mistral");
}

#[test]
fn qwen2_matches_llama_cpp() {
    model_case("qwen2");
}

#[test]
fn qwen3_matches_llama_cpp() {
    model_case("qwen3");
}

#[test]
fn qwen3_f32_checkpoint_matches_llama_cpp() {
    model_case("qwen3_f32");
}

#[test]
fn gemma2_matches_llama_cpp() {
    model_case("gemma2");
}

#[test]
fn gemma3_matches_llama_cpp() {
    model_case("gemma3");
}

#[test]
fn phi3_matches_llama_cpp() {
    model_case("phi3");
}

#[test]
fn lora_adapter_and_merged_model_match_llama_cpp() {
    let exp = expected("lora");
    let base_exp = expected(exp["base"].as_str().unwrap());
    let tmp = tempfile::tempdir().unwrap();
    let base = build(&fixtures().join("llama/model"), &tmp.path().join("base"), base_exp["model_dir_basename"].as_str().unwrap());
    let adapter = build(&fixtures().join("lora/adapter"), tmp.path(), exp["adapter_dir_basename"].as_str().unwrap());
    for want in exp["adapter"].as_array().unwrap() {
        let t = want["outtype"].as_str().unwrap();
        let out = tmp.path().join(format!("lora-{t}.gguf"));
        gguf::lora::convert_lora(&base, &adapter, &out, OutType::parse(t).unwrap()).unwrap_or_else(|e| panic!("lora {t}: {e:#}"));
        check(&out, want, &format!("lora {t}"));
    }
    // --adapter: merged first (W + s·BA in f32, one rounding), then converted.
    for want in exp["merged"]["outputs"].as_array().unwrap() {
        let t = want["outtype"].as_str().unwrap();
        let out = tmp.path().join(format!("merged-{t}.gguf"));
        let req = ExportRequest {
            model_dir: base.clone(),
            adapter_dir: Some(adapter.clone()),
            outtype: OutType::parse(t).unwrap(),
            out: out.clone(),
            lora_only: false,
            modelfile: false,
            options: ConvertOptions { tokenizer_pre: base_exp["pre_forced"].as_str().map(str::to_string) },
            nf4_round_trip: None,
        };
        gguf::export(&req, &mut |_, _| {}).unwrap_or_else(|e| panic!("merged {t}: {e:#}"));
        check_merged(&out, want, t);
    }
}

/// The merged model's file against llama.cpp's file of PEFT's merge. The
/// merges round W + s·(B A) once to bf16 from f32 products accumulated in
/// different orders (torch's GEMM and ferrotune's row loop), so a value
/// near a rounding midpoint may land on the other neighbour: everything
/// else must be identical (keys, tensor infos and offsets, the data of every
/// tensor the adapter does not touch), and every merged bf16 value must be
/// the exact f64 merge rounded, within 1e-6 relative of the midpoint.
fn check_merged(path: &Path, want: &Value, outtype: &str) {
    let buf = std::fs::read(path).unwrap();
    let ours = summarize(&buf).unwrap();
    assert_eq!(ours["kv"], want["kv"], "merged {outtype}: keys");
    let adapted = |name: &str| ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"].iter().any(|p| name.ends_with(&format!("{p}.weight")));
    let (a, b) = (ours["tensors"].as_array().unwrap(), want["tensors"].as_array().unwrap());
    assert_eq!(a.len(), b.len());
    let mut merged_differ = 0;
    for (x, y) in a.iter().zip(b) {
        let name = x[0].as_str().unwrap();
        assert_eq!(x.as_array().unwrap()[..4], y.as_array().unwrap()[..4], "merged {outtype}: tensor info");
        if x[4] != y[4] {
            assert!(adapted(name), "merged {outtype}: {name} is not adapted, yet its data differ");
            merged_differ += 1;
        }
    }
    if outtype != "auto" {
        return;
    }
    // The bf16 values of every adapted tensor against the exact merge.
    let base = ferrotune_testkit::gguf_weights::read_manifest(&fixtures().join("llama/model/manifest.json")).unwrap();
    let lora = ferrotune_testkit::gguf_weights::read_manifest(&fixtures().join("lora/adapter/manifest.json")).unwrap();
    let stored = |specs: &[ferrotune_testkit::gguf_weights::TensorSpec], name: &str| -> (Vec<f64>, Vec<usize>) {
        let t = specs.iter().find(|t| t.name == name).unwrap_or_else(|| panic!("{name} not in the manifest"));
        let bytes = t.bytes();
        let v = match t.dtype {
            safetensors::Dtype::BF16 => bytes.chunks(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64()).collect(),
            _ => bytes.chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64).collect(),
        };
        (v, t.shape.clone())
    };
    let scale = 16.0 / 8.0; // lora_alpha / r of the fixture adapter
    let mut checked = 0;
    for layer in 0..8 {
        for (hf, gguf, heads) in [
            ("self_attn.q_proj", "attn_q", Some(4)),
            ("self_attn.k_proj", "attn_k", Some(2)),
            ("self_attn.v_proj", "attn_v", None),
            ("self_attn.o_proj", "attn_output", None),
            ("mlp.gate_proj", "ffn_gate", None),
            ("mlp.up_proj", "ffn_up", None),
            ("mlp.down_proj", "ffn_down", None),
        ] {
            let m = format!("model.layers.{layer}.{hf}");
            let (w, shape) = stored(&base.tensors, &format!("{m}.weight"));
            let (la, _) = stored(&lora.tensors, &format!("base_model.model.{m}.lora_A.weight"));
            let (lb, _) = stored(&lora.tensors, &format!("base_model.model.{m}.lora_B.weight"));
            let (rows, cols, r) = (shape[0], shape[1], la.len() / shape[1]);
            // The exact merge, and the size of its terms (f32 rounding errors scale with it).
            let term = |i: usize, f: fn(f64) -> f64| (0..r).map(|k| f(lb[(i / cols) * r + k] * la[k * cols + i % cols])).sum::<f64>();
            let mut exact: Vec<(f64, f64)> = (0..rows * cols).map(|i| (w[i] + scale * term(i, |x| x), w[i].abs() + scale * term(i, f64::abs))).collect();
            if let Some(h) = heads {
                exact = gguf::arch::permute_rows(&exact, rows, h).unwrap();
            }
            let got = tensor_bf16(&buf, &ours, &format!("blk.{layer}.{gguf}.weight"));
            for (i, (&g, &(e, mag))) in got.iter().zip(&exact).enumerate() {
                let ulp = 2f64.powi(e.abs().log2().floor() as i32 - 7);
                assert!((g - e).abs() <= ulp / 2.0 + 1e-6 * mag, "merged blk.{layer}.{gguf}[{i}]: {g} vs exact {e}");
            }
            checked += got.len();
        }
    }
    assert!(checked > 1_000_000, "{checked} values checked");
    eprintln!("merged auto: {merged_differ} adapted tensors differ from PEFT's merge by a rounding; {checked} values within half a bf16 ulp of the exact merge");
}

/// A BF16 tensor's values from a GGUF file and its summary.
fn tensor_bf16(buf: &[u8], summary: &Value, name: &str) -> Vec<f64> {
    let t = summary["tensors"].as_array().unwrap().iter().find(|t| t[0] == name).unwrap_or_else(|| panic!("{name} missing"));
    assert_eq!(t[1], "BF16");
    let n: u64 = t[2].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).product();
    let start = (summary["data_start"].as_u64().unwrap() + t[3].as_u64().unwrap()) as usize;
    buf[start..start + 2 * n as usize].chunks(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64()).collect()
}

#[test]
fn python_json_of_floats_and_strings() {
    // The array digests in the fixtures are sha256 of Python's json.dumps.
    for (x, py) in [(1.0, "1.0"), (-1000.0, "-1000.0"), (0.5, "0.5"), (1e-5f32 as f64, "9.999999747378752e-06"), (1e16, "1e+16"), (123456.789, "123456.789"), (0.0001, "0.0001"), (-2.5e-7, "-2.5e-07")] {
        assert_eq!(py_float(x), py, "{x}");
    }
    assert_eq!(py_str("a\"é\n🦙"), "\"a\\\"\\u00e9\\n\\ud83e\\udd99\"");
}

#[test]
fn bad_requests_are_one_line_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let req = |out: PathBuf, lora_only: bool| ExportRequest {
        model_dir: tmp.path().join("missing"),
        adapter_dir: None,
        outtype: OutType::Auto,
        out,
        lora_only,
        modelfile: false,
        options: ConvertOptions::default(),
        nf4_round_trip: None,
    };
    let e = gguf::check_request(&req(tmp.path().join("x.bin"), false)).unwrap_err().to_string();
    assert!(e.contains("x.bin") && e.contains(".gguf"), "{e}");
    let e = gguf::check_request(&req(tmp.path().join("nowhere/x.gguf"), false)).unwrap_err().to_string();
    assert!(e.contains("does not exist"), "{e}");
    let e = gguf::check_request(&req(tmp.path().join("x.gguf"), true)).unwrap_err().to_string();
    assert!(e.contains("--adapter"), "{e}");
    let e = OutType::parse("q3_k_s").unwrap_err().to_string();
    assert!(e.contains("q3_k_s") && e.contains("q4_k_m"), "{e}");
    // A missing model: one error naming it, and no file left behind.
    let out = tmp.path().join("x.gguf");
    let e = gguf::export(&req(out.clone(), false), &mut |_, _| {}).unwrap_err();
    assert!(format!("{e:#}").contains("missing"), "{e:#}");
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
}

#[test]
fn unknown_pre_tokenizers_and_architectures_are_refused_before_writing() {
    // The fixture tokenizers are not ones llama.cpp knows: the error gives
    // the converter's own fingerprint of them and the way out.
    for case in ["llama", "qwen2"] {
        let exp = expected(case);
        let tmp = tempfile::tempdir().unwrap();
        let dir = build(&fixtures().join(case).join("model"), tmp.path(), "model");
        let out = tmp.path().join("x.gguf");
        let e = format!("{:#}", gguf::convert::convert(&dir, &out, OutType::F16, &ConvertOptions::default(), &mut |_, _| {}).unwrap_err());
        assert!(e.contains(exp["chkhsh"].as_str().unwrap()) && e.contains("--tokenizer-pre"), "{case}: {e}");
        assert!(!out.exists());
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = build(&fixtures().join("llama/model"), tmp.path(), "model");
    let cfg = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("LlamaForCausalLM", "FalconForCausalLM");
    std::fs::write(&cfg, text).unwrap();
    let out = tmp.path().join("x.gguf");
    let e = format!("{:#}", gguf::convert::convert(&dir, &out, OutType::F16, &ConvertOptions::default(), &mut |_, _| {}).unwrap_err());
    assert!(e.contains("FalconForCausalLM") && e.contains("config.json"), "{e}");
    assert!(!out.exists());
}

#[test]
fn generated_weights_match_the_fixture_script() {
    // The values the generating script printed for some elements of every
    // manifest (write_checkpoint also checks each file's sha256).
    use ferrotune_testkit::gguf_weights::{read_manifest, value};
    for case in ["llama", "mistral", "qwen2", "qwen3", "qwen3_f32", "gemma2", "gemma3", "phi3", "lora"] {
        let path = fixtures().join(case).join(if case == "lora" { "adapter" } else { "model" }).join("manifest.json");
        let m = read_manifest(&path).unwrap();
        assert!(!m.probes.is_empty(), "{case}: no probes");
        for (name, index, bits) in &m.probes {
            let t = m.tensors.iter().find(|t| &t.name == name).unwrap();
            assert_eq!(value(name, *index, t.center, t.scale).to_bits(), *bits, "{case}: {name}[{index}]");
        }
    }
}

/// A run with `gguf:` exports when it ends, beside the adapter; one whose
/// export could not succeed is refused before it trains.
#[test]
fn a_run_exports_gguf_when_it_ends() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let run = |out: &Path, extra: &[&str]| {
        let mut args = vec!["train".to_string(), "examples/quickstart/quickstart.yml".into()];
        for s in [format!("output_dir={}", out.display()), "num_epochs=1".into(), "device=cpu".into(), "save_steps=null".into(), "gguf=q8_0".into()]
            .into_iter()
            .chain(extra.iter().map(|s| s.to_string()))
        {
            args.push("--set".into());
            args.push(s);
        }
        std::process::Command::new(env!("CARGO_BIN_EXE_ferrotune")).args(&args).current_dir(repo).output().unwrap()
    };
    let tmp = tempfile::tempdir().unwrap();
    let refused = run(&tmp.path().join("a"), &[]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && err.contains("gguf_tokenizer_pre") && err.contains("fingerprint"), "{err}");
    assert!(!tmp.path().join("a/adapter_model.safetensors").exists(), "refused before training");

    let out = tmp.path().join("b");
    let done = run(&out, &["gguf_tokenizer_pre=llama-bpe"]);
    let err = String::from_utf8_lossy(&done.stderr);
    assert!(done.status.success(), "{err}");
    let file = out.join("model.Q8_0.gguf");
    let s = summarize(&std::fs::read(&file).unwrap_or_else(|e| panic!("{}: {e}\n{err}", file.display()))).unwrap();
    let kv = |k: &str| s["kv"].as_array().unwrap().iter().find(|e| e[0] == k).map(|e| e[2].clone());
    assert_eq!(kv("general.architecture"), Some(Value::from("llama")));
    assert_eq!(kv("general.file_type"), Some(Value::from(7)));
    assert!(err.contains("merged") && err.contains("model.Q8_0.gguf"), "{err}");
}

/// llama.cpp scales every LoRA pair by alpha / r. An rsLoRA adapter
/// (alpha / √r) is written with alpha·√r and its factors unchanged; a
/// per-module alpha_pattern scale is folded into that module's lora_b.
#[test]
fn lora_scales_llama_cpp_cannot_say_are_folded_exactly() {
    let exp = expected("lora");
    let tmp = tempfile::tempdir().unwrap();
    let base = build(&fixtures().join("llama/model"), &tmp.path().join("base"), "model");
    let adapter = build(&fixtures().join("lora/adapter"), tmp.path(), exp["adapter_dir_basename"].as_str().unwrap());
    let reference = exp["adapter"].as_array().unwrap().iter().find(|o| o["outtype"] == "f32").unwrap();
    let cfg_path = adapter.join("adapter_config.json");
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    let write = |edit: &dyn Fn(&mut Value)| -> (Vec<u8>, Value) {
        let mut c = cfg.clone();
        edit(&mut c);
        std::fs::write(&cfg_path, serde_json::to_string(&c).unwrap()).unwrap();
        let out = tmp.path().join("x.gguf");
        gguf::lora::convert_lora(&base, &adapter, &out, OutType::F32).unwrap();
        let buf = std::fs::read(&out).unwrap();
        let s = summarize(&buf).unwrap();
        (buf, s)
    };
    let alpha = |s: &Value| s["kv"].as_array().unwrap().iter().find(|e| e[0] == "adapter.lora.alpha").unwrap()[2].as_f64().unwrap();

    let (_, rs) = write(&|c| c["use_rslora"] = Value::from(true));
    assert!((alpha(&rs) - (16.0 * 8f64.sqrt()) as f32 as f64).abs() < 1e-9, "{}", alpha(&rs));
    assert_eq!(rs["tensors"], reference["tensors"], "rsLoRA: the factors are written as they are");

    let (buf, pat) = write(&|c| c["alpha_pattern"] = serde_json::json!({"q_proj": 32}));
    assert_eq!(alpha(&pat), 16.0);
    let lora = ferrotune_testkit::gguf_weights::read_manifest(&fixtures().join("lora/adapter/manifest.json")).unwrap();
    let b = lora.tensors.iter().find(|t| t.name == "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight").unwrap();
    let bv: Vec<f32> = b.bytes().chunks(4).map(|c| 2.0 * f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    let want = gguf::arch::permute_rows(&bv, b.shape[0], 4).unwrap();
    let t = pat["tensors"].as_array().unwrap().iter().find(|t| t[0] == "blk.0.attn_q.weight.lora_b").unwrap();
    let at = (pat["data_start"].as_u64().unwrap() + t[3].as_u64().unwrap()) as usize;
    let got: Vec<f32> = buf[at..at + 4 * want.len()].chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    assert_eq!(got, want, "alpha_pattern q_proj 32 (scale 4 where the file says 2): lora_b doubled");
    let k = |s: &Value, n: &str| s["tensors"].as_array().unwrap().iter().find(|t| t[0] == n).unwrap()[4].clone();
    assert_eq!(k(&pat, "blk.0.attn_k.weight.lora_b"), k(reference, "blk.0.attn_k.weight.lora_b"), "other modules unchanged");
}
