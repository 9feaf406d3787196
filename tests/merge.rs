//! `ferrotune merge` against the unmerged model: the merged checkpoint's
//! logits equal base + adapter on every fixture case, its tensors keep the
//! base's names, dtypes and shapes, transformers loads it (when a Python with
//! transformers is present), and bad inputs give clear errors.
//!
//! Tolerances. f32 output: logits max abs 1e-5 for the f32 bases (llama,
//! mistral) and 1e-5 × max(1, max |logit|) for every base merged with
//! `--dtype f32` (qwen2's logits reach 8): the f32 rounding of W + s·BA and
//! the summation order differ from computing x·W + s·(x·A)·B, a few f32
//! ulps of the largest logit. bf16/f16 output: W' is rounded once to the
//! storage type, a relative change of at most u per weight (u = 2^-8 for
//! bf16, 2^-11 for f16). To first order each rounded matrix on a token's path
//! changes its output by at most u relatively, and k such matrices by k·u:
//! the bound is ‖Δlogits‖/‖logits‖ ≤ k·u with k = the merged projections of
//! the model (llama3: q, v, down × 2 layers = 6 → 2.3e-2; qwen2: q, k, v, o
//! × 2 = 8 → 3.9e-3). The rounding itself is checked exactly: every merged
//! bf16/f16 value is the round-to-nearest-even of the f32 merge.

mod common;

use common::{CASES, Reference, fixture, load_with_adapter, max_abs_err, python_with, rel_err};
use ferrotune::adapter::merge::{self, INFO_FILE, MergeOptions, MergeSummary};
use ferrotune::backend::DType;
use ferrotune::backend::cpu::CpuBackend;
use ferrotune::model::Model;
use ferrotune::model::batch::Batch;
use ferrotune::model::checkpoint::Checkpoint;
use safetensors::SafeTensors;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

fn run_merge(case: &str, out: &Path, opts: &MergeOptions) -> anyhow::Result<MergeSummary> {
    merge::merge(&fixture(case).join("model"), &fixture(case).join("adapter"), out, opts, &mut |_, _| {})
}

fn with_dtype(dtype: DType) -> MergeOptions {
    MergeOptions { dtype: Some(dtype), ..MergeOptions::default() }
}

/// Logits at the reference batch's real tokens.
fn logits(be: &CpuBackend, model: &Model<CpuBackend>, case: &str) -> Vec<f32> {
    let (seqs, _) = Reference::load(case).sequences();
    model.logits(be, &Batch::from_sequences(&seqs, model.cfg.vocab).unwrap())
}

fn merged_logits(be: &CpuBackend, dir: &Path, case: &str) -> Vec<f32> {
    let model = Model::load(be, &Checkpoint::open(dir).unwrap()).unwrap();
    assert!(model.loras().next().is_none());
    logits(be, &model, case)
}

/// Every tensor of a checkpoint directory: name -> (dtype, shape, bytes).
type Tensors = BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)>;

fn read_tensors(dir: &Path) -> Tensors {
    let mut out = BTreeMap::new();
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    for f in files {
        let bytes = std::fs::read(&f).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        for (name, t) in st.tensors() {
            assert!(out.insert(name.clone(), (t.dtype(), t.shape().to_vec(), t.data().to_vec())).is_none(), "{name} twice");
        }
    }
    out
}

fn to_f32(dtype: safetensors::Dtype, bytes: &[u8]) -> Vec<f32> {
    let d = match dtype {
        safetensors::Dtype::F32 => DType::F32,
        safetensors::Dtype::F16 => DType::F16,
        safetensors::Dtype::BF16 => DType::BF16,
        other => panic!("{other:?}"),
    };
    ferrotune::backend::to_f32(d, bytes)
}

/// Half the spacing of representable numbers, relative: the largest relative
/// change one round-to-nearest makes. None for f32 (no storage rounding).
fn unit_roundoff(torch_dtype: &str) -> Option<f64> {
    match torch_dtype {
        "float32" => None,
        "bfloat16" => Some(2f64.powi(-8)),
        "float16" => Some(2f64.powi(-11)),
        other => panic!("unexpected checkpoint dtype {other}"),
    }
}

#[test]
fn merged_logits_equal_base_plus_adapter() {
    let be = CpuBackend::new();
    for case in CASES {
        let expected = logits(&be, &load_with_adapter(&be, case), case);
        let tmp = tempfile::tempdir().unwrap();

        // f32 output: the merge itself, no storage rounding.
        let f32_dir = tmp.path().join("f32");
        run_merge(case, &f32_dir, &with_dtype(DType::F32)).unwrap();
        let err = max_abs_err(&merged_logits(&be, &f32_dir, case), &expected);
        let scale = expected.iter().fold(1f64, |m, x| m.max(x.abs() as f64));
        eprintln!("{case}: f32 merge, logits max abs err {err:.2e} (max |logit| {scale:.1})");
        assert!(err <= 1e-5 * scale, "{case}: f32 merge logits max abs error {err:e} > 1e-5 · {scale}");

        // The base's own dtype (the default).
        let native = tmp.path().join("native");
        let summary = run_merge(case, &native, &MergeOptions::default()).unwrap();
        assert_eq!(summary.shards, 1);
        let got = merged_logits(&be, &native, case);
        let dtype = Reference::load(case).json["checkpoint_dtype"].as_str().unwrap().to_string();
        if let Some(u) = unit_roundoff(&dtype) {
            let bound = summary.merged as f64 * u;
            let err = rel_err(&got, &expected);
            eprintln!("{case}: {dtype} merge of {} projections, logits ‖Δ‖/‖ref‖ {err:.2e} (bound {bound:.2e})", summary.merged);
            assert!(err <= bound, "{case}: {dtype} merge logits relative error {err:e} > {bound:e}");
            // Exactly one rounding: each merged value is RNE(f32 merge).
            let (f32_t, nat_t) = (read_tensors(&f32_dir), read_tensors(&native));
            let base = read_tensors(&fixture(case).join("model"));
            let mut merged = 0;
            for (name, (dt, _, bytes)) in &nat_t {
                let exact = to_f32(safetensors::Dtype::F32, &f32_t[name].2);
                let rounded: Vec<u8> = match dt {
                    safetensors::Dtype::BF16 => exact.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect(),
                    safetensors::Dtype::F16 => exact.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect(),
                    other => panic!("{name}: {other:?}"),
                };
                assert!(rounded == *bytes, "{case}: {name} is not the rounded f32 merge");
                merged += usize::from(base[name].2 != *bytes);
            }
            assert_eq!(merged, summary.merged, "{case}: tensors changed by the merge");
        } else {
            let err = max_abs_err(&got, &expected);
            assert!(err <= 1e-5, "{case}: logits max abs error {err:e} > 1e-5");
        }
    }
}

#[test]
fn output_keeps_names_dtypes_shapes_and_side_files() {
    for case in CASES {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("merged");
        let summary = run_merge(case, &out, &MergeOptions::default()).unwrap();
        let model = fixture(case).join("model");
        let (input, output) = (read_tensors(&model), read_tensors(&out));
        assert_eq!(output.len(), summary.tensors);
        let layout = |t: &Tensors| t.iter().map(|(n, (d, s, _))| (n.clone(), *d, s.clone())).collect::<Vec<_>>();
        assert_eq!(layout(&input), layout(&output), "{case}: names, dtypes and shapes");
        // Only the adapted projections change, and each of them does.
        // (PEFT's module names, in the checkpoint's naming.)
        let cfg = ferrotune::model::checkpoint::read_config(&model).unwrap();
        let adapter = std::fs::read(fixture(case).join("adapter/adapter_model.safetensors")).unwrap();
        let adapted: Vec<String> = SafeTensors::deserialize(&adapter)
            .unwrap()
            .names()
            .iter()
            .filter_map(|k| k.strip_suffix(".lora_A.weight"))
            .map(|m| format!("{}.weight", ferrotune::model::checkpoint_module(&cfg, m.strip_prefix("base_model.model.").unwrap())))
            .collect();
        assert_eq!(adapted.len(), summary.merged);
        for (name, (_, _, bytes)) in &input {
            assert_eq!(adapted.contains(name), output[name].2 != *bytes, "{case}: {name}");
        }
        for f in ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
            assert_eq!(std::fs::read(model.join(f)).unwrap(), std::fs::read(out.join(f)).unwrap(), "{case}: {f}");
        }
        assert!(out.join("model.safetensors").is_file() && !out.join("model.safetensors.index.json").exists());
        let info: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join(INFO_FILE)).unwrap()).unwrap();
        assert_eq!(info["merged_modules"], summary.merged);
        // Nothing left beside the output.
        let siblings: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(siblings, vec![std::ffi::OsString::from("merged")]);
    }
}

#[test]
fn dtype_change_rewrites_config_and_every_float_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    // llama's config.json has the old "torch_dtype" key, llama3's the new "dtype".
    for (case, key) in [("llama", "torch_dtype"), ("llama3", "dtype")] {
        let out = tmp.path().join(case);
        run_merge(case, &out, &with_dtype(DType::F16)).unwrap();
        let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg[key], "float16", "{case}");
        assert!(read_tensors(&out).values().all(|(d, _, _)| *d == safetensors::Dtype::F16), "{case}");
    }
}

#[test]
fn large_checkpoints_are_sharded_with_an_index() {
    let be = CpuBackend::new();
    let tmp = tempfile::tempdir().unwrap();
    let (single, sharded) = (tmp.path().join("single"), tmp.path().join("sharded"));
    run_merge("llama", &single, &MergeOptions::default()).unwrap();
    let opts = MergeOptions { max_shard_bytes: 40_000, ..MergeOptions::default() };
    let summary = run_merge("llama", &sharded, &opts).unwrap();
    assert!(summary.shards >= 3, "{summary:?}");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(sharded.join("model.safetensors.index.json")).unwrap()).unwrap();
    let map = index["weight_map"].as_object().unwrap();
    assert_eq!(map.len(), summary.tensors);
    assert_eq!(index["metadata"]["total_size"], summary.bytes);
    for i in 1..=summary.shards {
        let name = format!("model-{i:05}-of-{:05}.safetensors", summary.shards);
        let size = std::fs::metadata(sharded.join(&name)).unwrap().len();
        let tensors = map.values().filter(|f| *f == name.as_str()).count();
        assert!(tensors > 0, "{name} holds no tensor");
        // A shard passes the limit only when it holds one tensor larger than it.
        assert!(tensors == 1 || size < 40_000 + 4096, "{name}: {size} bytes, {tensors} tensors");
    }
    assert!(!sharded.join("model.safetensors").exists());
    assert_eq!(read_tensors(&single), read_tensors(&sharded));
    assert_eq!(merged_logits(&be, &single, "llama"), merged_logits(&be, &sharded, "llama"));

    // Merging again into a previous output (no --force) replaces it: the shards go.
    run_merge("llama", &sharded, &MergeOptions::default()).unwrap();
    let mut files: Vec<String> =
        std::fs::read_dir(&sharded).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    files.sort();
    assert_eq!(
        files,
        ["config.json", INFO_FILE, "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    );
}

#[test]
fn bad_inputs_give_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let opts = MergeOptions::default();
    let merge = |model: &Path, adapter: &Path, out: &Path, opts: &MergeOptions| {
        merge::merge(model, adapter, out, opts, &mut |_, _| {}).unwrap_err().to_string()
    };
    let (llama, llama3) = (fixture("llama"), fixture("llama3"));

    // An adapter for another model (hidden 64 vs 32).
    let err = merge(&llama.join("model"), &llama3.join("adapter"), &out, &opts);
    assert!(
        err.contains("adapter_model.safetensors: tensor base_model.model.model.layers.0.mlp.down_proj.lora_A.weight has shape [4, 160]")
            && err.contains("model.layers.0.mlp.down_proj.weight is [32, 80]")
            && err.contains("another model"),
        "{err}"
    );
    assert!(!out.exists(), "nothing is written when the adapter does not fit");

    // An adapter whose modules the base does not have.
    let odd = tmp.path().join("odd_adapter");
    std::fs::create_dir(&odd).unwrap();
    std::fs::copy(llama.join("adapter/adapter_config.json"), odd.join("adapter_config.json")).unwrap();
    let a = [0f32; 4 * 32];
    let view = |s: Vec<usize>| safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s, bytemuck::cast_slice(&a)).unwrap();
    let data = safetensors::serialize(
        [
            ("base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight", view(vec![4, 32])),
            ("base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight", view(vec![32, 4])),
        ],
        None,
    )
    .unwrap();
    std::fs::write(odd.join("adapter_model.safetensors"), data).unwrap();
    let err = merge(&llama.join("model"), &odd, &out, &opts);
    assert!(err.contains("adapts model.layers.9.self_attn.q_proj.weight, which the base checkpoint does not have"), "{err}");

    // --out is the model's own directory (also spelled differently).
    let err = merge(&llama.join("model"), &llama.join("adapter"), &llama.join("model/../model"), &opts);
    assert!(err.contains("is the base model's own directory"), "{err}");

    // A non-empty directory that is not a merge output needs --force.
    let busy = tmp.path().join("busy");
    std::fs::create_dir(&busy).unwrap();
    std::fs::write(busy.join("notes.txt"), "mine").unwrap();
    let err = merge(&llama.join("model"), &llama.join("adapter"), &busy, &opts);
    assert!(err.contains("is not empty and is not the output of a previous `ferrotune merge`") && err.contains("--force"), "{err}");
    let forced = MergeOptions { force: true, ..MergeOptions::default() };
    merge::merge(&llama.join("model"), &llama.join("adapter"), &busy, &forced, &mut |_, _| {}).unwrap();
    assert_eq!(std::fs::read_to_string(busy.join("notes.txt")).unwrap(), "mine", "--force keeps unrelated files");
    assert!(busy.join("model.safetensors").is_file());

    // Not a PEFT adapter.
    let err = merge(&llama.join("model"), &llama.join("model"), &out, &opts);
    assert!(err.contains("adapter_config.json"), "{err}");
}

#[test]
fn cli_merges_and_reports() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let run = |extra: &[&str]| {
        let model = fixture("qwen2").join("model");
        let adapter = fixture("qwen2").join("adapter");
        let mut args = vec!["merge", "--model", model.to_str().unwrap(), "--adapter", adapter.to_str().unwrap()];
        args.extend(["--out", out.to_str().unwrap()]);
        args.extend(extra);
        Command::new(env!("CARGO_BIN_EXE_ferrotune")).args(&args).output().unwrap()
    };
    let o = run(&["--dtype", "bf16", "--max-shard-size", "50KB"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains("merged 8 LoRA modules") && stderr.contains("tensors"), "{stderr}");
    assert!(out.join("model.safetensors.index.json").is_file());
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["dtype"], "bfloat16");
    let o = run(&["--dtype", "int8"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--dtype int8: expected bf16, f16 or f32"));
    let o = run(&["--max-shard-size", "lots"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("--max-shard-size"));
}

/// transformers loads the merged directory and gives the loss PEFT gives
/// with base + adapter (f32 case, 1e-5 relative); the bf16 and f16 merges
/// load with their stored dtype.
#[test]
fn transformers_loads_the_merged_checkpoint() {
    let Some(python) = python_with(&["torch", "transformers", "peft"]) else {
        eprintln!("skipped: no Python with transformers (set FERROTUNE_PYTHON)");
        return;
    };
    const SCRIPT: &str = r#"
import json, sys, torch, transformers
from safetensors.torch import load_file
from peft import PeftModel
model_dir, adapter_dir, merged_dir, ref_path = sys.argv[1:5]
ref = load_file(ref_path)
batch = dict(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"], labels=ref["labels"])
kw = dict(dtype=torch.float32, attn_implementation="eager")
# The checkpoint's own class: AutoModelForCausalLM builds the text-only model
# from an image-text checkpoint, whose names the adapter's keys do not match.
with open(model_dir + "/config.json") as f:
    Model = getattr(transformers, json.load(f)["architectures"][0])
with torch.no_grad():
    peft = PeftModel.from_pretrained(Model.from_pretrained(model_dir, **kw), adapter_dir).eval()
    peft_loss = peft(**batch).loss.item()
    merged = Model.from_pretrained(merged_dir, **kw).eval()
    merged_loss = merged(**batch).loss.item()
    native = Model.from_pretrained(merged_dir, dtype="auto")
    native_dtype = str(next(native.parameters()).dtype).replace("torch.", "")
print(json.dumps(dict(peft=peft_loss, merged=merged_loss, dtype=native_dtype)))
"#;
    let tmp = tempfile::tempdir().unwrap();
    for case in CASES {
        let out = tmp.path().join(case);
        let summary = run_merge(case, &out, &MergeOptions::default()).unwrap();
        let dir = fixture(case);
        let o = Command::new(&python)
            .args(["-c", SCRIPT])
            .args([dir.join("model"), dir.join("adapter"), out.clone(), dir.join("reference.safetensors")])
            .output()
            .unwrap();
        assert!(o.status.success(), "{case}: {}", String::from_utf8_lossy(&o.stderr));
        let line = String::from_utf8_lossy(&o.stdout);
        let v: serde_json::Value = serde_json::from_str(line.lines().last().unwrap()).unwrap();
        let (peft, merged) = (v["peft"].as_f64().unwrap(), v["merged"].as_f64().unwrap());
        let rel = (merged - peft).abs() / peft;
        let stored = Reference::load(case).json["checkpoint_dtype"].as_str().unwrap().to_string();
        eprintln!("{case}: transformers loss merged {merged} vs peft {peft} (rel {rel:.1e}), loads as {}", v["dtype"]);
        assert_eq!(v["dtype"], stored.as_str(), "{case}");
        // f32: 1e-5; bf16/f16: the first-order bound of the logits (top of the file).
        let bound = unit_roundoff(&stored).map_or(1e-5, |u| summary.merged as f64 * u);
        assert!(rel <= bound, "{case}: merged loss {merged} vs peft {peft}: relative {rel:e} > {bound:e}");
    }
}

#[test]
fn out_under_folders_that_do_not_exist_yet_is_created() {
    let tmp = tempfile::tempdir().unwrap();
    let case = CASES[0];
    let out = tmp.path().join("new/deeper/merged");
    let summary = run_merge(case, &out, &MergeOptions::default()).unwrap();
    assert_eq!(read_tensors(&out).len(), summary.tensors);
    // Nothing but the output is left beside it (the temporary folder went).
    let beside: Vec<_> = std::fs::read_dir(tmp.path().join("new/deeper")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(beside, ["merged"]);
}
