//! QLoRA: LoRA on an NF4 (bitsandbytes 4-bit) base, on the CPU backend.
//!
//! Against transformers + PEFT + bitsandbytes (tests/fixtures/qlora, written
//! by tests/fixtures/qlora.py on bitsandbytes' CPU backend with compute dtype
//! f32): the loss within 1e-4 relative and every LoRA gradient within 1e-4
//! norm-relative, for the base quantized at load (load_in_4bit) and for the
//! 4-bit checkpoint bitsandbytes saved. Then: quantizing at load gives the
//! saved checkpoint's weights bit for bit; `ferrotune train` with
//! load_in_4bit + adapter: qlora learns; `ferrotune merge` of a QLoRA adapter
//! dequantizes into a plain checkpoint; the memory plan of NF4 weights equals
//! what the metered backend holds.

mod common;

use common::{Reference, fixture, max_abs_err, rel_err};
use ferrotune::adapter::merge::{self, MergeOptions};
use ferrotune::adapter::{LoraConfig, Targets, peft};
use ferrotune::backend::cpu::CpuBackend;
use ferrotune_testkit::metered::Metered;
use ferrotune::backend::{Backend, DType};
use ferrotune::model::batch::Batch;
use ferrotune::model::checkpoint::Checkpoint;
use ferrotune::model::graph::BackwardOpts;
use ferrotune::model::{BaseWeights, Model, module_path, synth};
use ferrotune::train::memory::{self, RunShape};
use std::path::{Path, PathBuf};
use std::process::Command;

const CASE: &str = "qlora";
const NF4: BaseWeights = BaseWeights::Nf4 { double_quant: true };

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The dense f32 base (quantized at load) or bitsandbytes' saved 4-bit one.
fn base_dir(prequantized: bool) -> PathBuf {
    if prequantized { fixture(CASE).join("bnb_model") } else { fixture("llama").join("model") }
}

fn qlora_model(be: &CpuBackend, prequantized: bool) -> Model<CpuBackend> {
    let ckpt = Checkpoint::open(&base_dir(prequantized)).unwrap();
    assert_eq!(ckpt.quantization.is_some(), prequantized);
    // A 4-bit checkpoint loads 4-bit whatever `base` says.
    let base = if prequantized { BaseWeights::AsStored } else { NF4 };
    let mut model = Model::load_as(be, &ckpt, base).unwrap();
    peft::load(be, &mut model, &fixture(CASE).join("adapter")).unwrap();
    model
}

#[test]
fn loss_and_lora_gradients_match_peft_on_bitsandbytes() {
    let r = Reference::load(CASE);
    let (seqs, where_) = r.sequences();
    let expected_loss = r.json["loss"].as_f64().unwrap();
    for prequantized in [false, true] {
        let be = CpuBackend::new();
        let mut model = qlora_model(&be, prequantized);
        let batch = Batch::from_sequences(&seqs, model.cfg.vocab).unwrap();
        assert_eq!(batch.n_targets() as u64, r.json["num_target_tokens"].as_u64().unwrap());

        // Logits of the real tokens.
        let logits = model.logits(&be, &batch);
        let shape = r.shape("logits");
        let (t, v) = (shape[1], shape[2]);
        let reference = r.f32("logits");
        let want: Vec<f32> = where_.iter().flat_map(|&(row, col)| reference[(row * t + col) * v..(row * t + col + 1) * v].to_vec()).collect();
        let logit_err = max_abs_err(&logits, &want);

        model.zero_grad(&be);
        let opts = BackwardOpts { grad_scale: 1.0 / batch.n_targets() as f32, gradient_checkpointing: false, dropout_seed: None };
        let loss = model.forward_backward(&be, &batch, opts).mean();
        let loss_rel = (loss - expected_loss).abs() / expected_loss;
        let mut worst: f64 = 0.0;
        let mut n = 0;
        for (li, p, l) in model.loras() {
            let m = module_path(&model.cfg, li, p);
            for (which, g) in [("lora_A", &l.grad_a), ("lora_B", &l.grad_b)] {
                let key = format!("grad.base_model.model.{m}.{which}.weight");
                let err = rel_err(&be.download(g), &r.f32(&key));
                assert!(err <= 1e-4, "prequantized={prequantized}: {key} rel error {err:e} > 1e-4");
                worst = worst.max(err);
                n += 1;
            }
        }
        eprintln!(
            "prequantized={prequantized}: loss {loss:.7} vs {expected_loss:.7} (rel {loss_rel:.2e}); logits max abs err {logit_err:.2e}; \
             worst of {n} LoRA gradients rel {worst:.2e}"
        );
        assert_eq!(n, 2 * 7 * model.cfg.n_layers, "every projection has an adapter");
        assert!(loss_rel <= 1e-4, "loss rel error {loss_rel:e} > 1e-4");
        assert!(logit_err <= 1e-4, "logits max abs error {logit_err:e} > 1e-4");
    }
}

#[test]
fn quantizing_at_load_gives_the_bitsandbytes_checkpoint_bit_for_bit() {
    let be = CpuBackend::new();
    let at_load = Model::load_as(&be, &Checkpoint::open(&base_dir(false)).unwrap(), NF4).unwrap();
    let saved = Model::load(&be, &Checkpoint::open(&base_dir(true)).unwrap()).unwrap();
    let dense = Model::load(&be, &Checkpoint::open(&base_dir(false)).unwrap()).unwrap();
    let mut changed = 0usize;
    for ((a, b), d) in at_load.layers.iter().zip(&saved.layers).zip(&dense.layers) {
        for (((_, pa), (_, pb)), (_, pd)) in a.linears().zip(b.linears()).zip(d.linears()) {
            let (wa, wb) = (be.weight_to_f32(&pa.weight), be.weight_to_f32(&pb.weight));
            assert!(wa.iter().zip(&wb).all(|(x, y)| x.to_bits() == y.to_bits()));
            changed += wa.iter().zip(be.weight_to_f32(&pd.weight)).filter(|(x, y)| *x != y).count();
        }
        // Norms stay as stored.
        assert_eq!(be.weight_to_f32(&a.input_norm), be.weight_to_f32(&d.input_norm));
    }
    assert!(changed > 1000, "the projections are quantized ({changed} values differ from the f32 base)");
    assert_eq!(be.weight_to_f32(&at_load.embed), be.weight_to_f32(&dense.embed));
    assert_eq!(be.weight_to_f32(at_load.head()), be.weight_to_f32(dense.head()));
}

fn ferrotune(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ferrotune")).args(args).current_dir(repo()).output().expect("run ferrotune")
}

#[test]
fn train_with_load_in_4bit_learns_and_refuses_qlora_without_a_4bit_base() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = format!("output_dir={}", tmp.path().display());
    let config = "examples/quickstart/quickstart.yml";
    let common = ["--set", &out_dir, "--set", "num_epochs=6", "--set", "logging_steps=3", "--set", "device=cpu", "--set", "save_steps=null"];
    let mut args = vec!["train", config, "--set", "adapter=qlora", "--set", "load_in_4bit=true"];
    args.extend(common);
    let out = ferrotune(&args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ferrotune failed:\n{err}");
    let losses: Vec<f64> = std::fs::read_to_string(tmp.path().join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?.get("loss")?.as_f64())
        .collect();
    eprintln!("QLoRA quickstart losses: {losses:?}");
    assert!(losses.len() >= 3 && losses.last().unwrap() < &(losses[0] * 0.7), "the loss should fall: {losses:?}");
    assert!(tmp.path().join("adapter_model.safetensors").is_file());

    // adapter: qlora on a dense base without load_in_4bit: refused, saying what to set.
    let mut args = vec!["train", config, "--set", "adapter=qlora"];
    args.extend(common);
    let out = ferrotune(&args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("adapter: qlora needs a 4-bit base: set load_in_4bit: true"), "{err}");
}

/// Logits of a checkpoint directory (dense or 4-bit) with an optional adapter.
fn logits_of(be: &CpuBackend, dir: &Path, adapter: Option<&Path>) -> Vec<f32> {
    let mut model = Model::load(be, &Checkpoint::open(dir).unwrap()).unwrap();
    if let Some(a) = adapter {
        peft::load(be, &mut model, a).unwrap();
    }
    let (seqs, _) = Reference::load(CASE).sequences();
    model.logits(be, &Batch::from_sequences(&seqs, model.cfg.vocab).unwrap())
}

#[test]
fn merging_into_a_4bit_base_dequantizes() {
    let be = CpuBackend::new();
    let adapter = fixture(CASE).join("adapter");
    let base = base_dir(true);
    let qlora = logits_of(&be, &base, Some(&adapter));
    let tmp = tempfile::tempdir().unwrap();
    let scale = qlora.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
    // f32 output: W' = dequant(W) + s·BA rounded once in f32; the logits
    // differ from the unmerged model's only by f32 summation order (1e-5
    // of the largest logit). bf16 output: W' rounded to 8 bits (2^-9
    // relative), through two layers: 2e-2 of the largest logit.
    for (dtype, tol) in [(Some(DType::F32), 1e-5), (None, 1e-5), (Some(DType::BF16), 2e-2)] {
        let out = tmp.path().join(format!("merged-{dtype:?}"));
        let opts = MergeOptions { dtype, ..MergeOptions::default() };
        let summary = merge::merge(&base, &adapter, &out, &opts, &mut |_, _| {}).unwrap();
        assert_eq!(summary.merged, 14);
        let config: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
        assert!(config.get("quantization_config").is_none(), "the merged config.json is not a 4-bit one");
        let ckpt = Checkpoint::open(&out).unwrap();
        assert!(ckpt.quantization.is_none());
        let merged = logits_of(&be, &out, None);
        let err = max_abs_err(&merged, &qlora) / scale;
        eprintln!("merge --dtype {dtype:?}: logits max abs err {err:.2e} of the largest logit (bound {tol:.0e})");
        assert!(err <= tol, "{dtype:?}: {err:e} > {tol:e}");
    }

    // An adapter trained with load_in_4bit on the dense base: merged into
    // the base's NF4 round trip it gives the QLoRA model's logits; merged
    // into the dense base it does not (the quantization matters here).
    let dense_base = base_dir(false);
    for (round_trip, want_close) in [(Some(true), true), (None, false)] {
        let out = tmp.path().join(format!("merged-dense-{round_trip:?}"));
        let opts = MergeOptions { dtype: Some(DType::F32), nf4_round_trip: round_trip, ..MergeOptions::default() };
        merge::merge(&dense_base, &adapter, &out, &opts, &mut |_, _| {}).unwrap();
        let err = max_abs_err(&logits_of(&be, &out, None), &qlora) / scale;
        eprintln!("merge into the dense base, NF4 round trip {round_trip:?}: logits max abs err {err:.2e} of the largest logit");
        assert_eq!(err <= 1e-5, want_close, "round trip {round_trip:?}: {err:e}");
    }
}

#[test]
fn the_memory_plan_of_nf4_weights_is_what_the_backend_holds() {
    let cfg = synth::model_config(&synth::preset("tiny").unwrap()).unwrap();
    let lc = LoraConfig::new(4, 8.0, Targets::AllLinear);
    for double_quant in [true, false] {
        let base = BaseWeights::Nf4 { double_quant };
        for (act, w) in [(4, 4), (2, 2)] {
            let shape = RunShape { act_bytes: act, weight_bytes: w, ..RunShape::cpu(1, 32) };
            let plan = memory::plan_lora_as(&cfg, &lc, &shape, base).unwrap();
            let be = Metered::new(CpuBackend::new(), act, w);
            let _model = Model::random_as(&be, cfg.clone(), 3, base).unwrap();
            assert_eq!(plan.weights, be.usage().live.weights as u64, "double_quant={double_quant}, {w} B/weight");
            let dense = memory::plan_lora(&cfg, &lc, &shape).unwrap();
            assert!(plan.weights < dense.weights, "NF4 holds less than dense");
        }
    }
}
