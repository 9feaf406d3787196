//! The CPU backend against HuggingFace transformers + PEFT: logits, loss and
//! every LoRA gradient on the committed fixtures (tests/fixtures/, written
//! by generate.py with the real libraries, computed in f32 with eager
//! attention). Tolerances: logits max abs 1e-4, loss 1e-5 relative, LoRA
//! gradients 1e-4 relative (‖Δ‖/‖ref‖).

mod common;

use common::{CASES, LONG_ROPE_CASES, Reference, fixture, load_with_adapter, max_abs_err, rel_err};
use ferrotune::backend::cpu::CpuBackend;
use ferrotune::model::batch::Batch;
use ferrotune::model::checkpoint::{load_tokenizer, load_tokenizer_config};
use ferrotune::model::graph::BackwardOpts;
use ferrotune::model::{Model, module_path};
use std::collections::BTreeMap;

fn load(case: &str) -> (CpuBackend, Model<CpuBackend>) {
    let be = CpuBackend::new();
    let model = load_with_adapter(&be, case);
    (be, model)
}

/// LoRA gradients keyed by PEFT tensor name.
fn grads(be: &CpuBackend, model: &Model<CpuBackend>) -> BTreeMap<String, Vec<f32>> {
    use ferrotune::backend::Backend;
    let mut out = BTreeMap::new();
    for (li, p, l) in model.loras() {
        let m = module_path(&model.cfg, li, p);
        out.insert(format!("base_model.model.{m}.lora_A.weight"), be.download(&l.grad_a));
        out.insert(format!("base_model.model.{m}.lora_B.weight"), be.download(&l.grad_b));
    }
    out
}

fn train_grads(case: &str, checkpointing: bool, micro_batches: usize) -> (f64, BTreeMap<String, Vec<f32>>) {
    let (be, mut model) = load(case);
    let r = Reference::load(case);
    let (seqs, _) = r.sequences();
    let vocab = model.cfg.vocab;
    let total_targets = Batch::from_sequences(&seqs, vocab).unwrap().n_targets();
    let per = seqs.len().div_ceil(micro_batches);
    let mut loss = ferrotune::model::graph::LossSum::default();
    model.zero_grad(&be);
    for chunk in seqs.chunks(per) {
        let batch = Batch::from_sequences(chunk, vocab).unwrap();
        let opts = BackwardOpts {
            grad_scale: 1.0 / total_targets as f32,
            gradient_checkpointing: checkpointing,
            dropout_seed: None,
        };
        loss.add(model.forward_backward(&be, &batch, opts));
    }
    (loss.mean(), grads(&be, &model))
}

#[test]
fn logits_match_transformers() {
    for case in CASES.iter().chain(LONG_ROPE_CASES) {
        let (be, model) = load(case);
        let r = Reference::load(case);
        let (seqs, where_) = r.sequences();
        let batch = Batch::from_sequences(&seqs, model.cfg.vocab).unwrap();
        let logits = model.logits(&be, &batch);
        let shape = r.shape("logits");
        let (t, v) = (shape[1], shape[2]);
        assert_eq!(v, model.cfg.vocab, "{case}: vocab");
        let reference = r.f32("logits");
        // Only real tokens: transformers' logits at padded positions are not meaningful.
        let expected: Vec<f32> =
            where_.iter().flat_map(|&(row, col)| reference[(row * t + col) * v..(row * t + col + 1) * v].to_vec()).collect();
        let err = max_abs_err(&logits, &expected);
        eprintln!("{case}: logits max abs err {err:.3e} over {} tokens", where_.len());
        assert!(err <= 1e-4, "{case}: logits max abs error {err:e} > 1e-4");
    }
}

#[test]
fn loss_matches_transformers() {
    for case in CASES.iter().chain(LONG_ROPE_CASES) {
        let (be, model) = load(case);
        let r = Reference::load(case);
        let (seqs, _) = r.sequences();
        let batch = Batch::from_sequences(&seqs, model.cfg.vocab).unwrap();
        let loss = model.eval_loss(&be, &batch);
        let expected = r.json["loss"].as_f64().unwrap();
        assert_eq!(loss.n_targets as u64, r.json["num_target_tokens"].as_u64().unwrap(), "{case}: target count");
        let rel = (loss.mean() - expected).abs() / expected.abs();
        eprintln!("{case}: loss {} vs {expected} (rel {rel:.2e})", loss.mean());
        assert!(rel <= 1e-5, "{case}: loss {} vs transformers {expected}: rel {rel:e} > 1e-5", loss.mean());
    }
}

#[test]
fn lora_gradients_match_peft() {
    for case in CASES.iter().chain(LONG_ROPE_CASES) {
        let r = Reference::load(case);
        let (loss, got) = train_grads(case, false, 1);
        let expected_loss = r.json["loss"].as_f64().unwrap();
        assert!((loss - expected_loss).abs() / expected_loss <= 1e-5, "{case}: training loss {loss} vs {expected_loss}");
        let ref_names: Vec<String> = r.names().into_iter().filter(|n| n.starts_with("grad.")).collect();
        assert_eq!(ref_names.len(), got.len(), "{case}: number of LoRA tensors");
        let mut worst = 0.0f64;
        for name in ref_names {
            let key = name.strip_prefix("grad.").unwrap();
            let g = got.get(key).unwrap_or_else(|| panic!("{case}: no gradient for {key}"));
            let e = rel_err(g, &r.f32(&name));
            worst = worst.max(e);
            assert!(e <= 1e-4, "{case}: gradient of {key}: rel error {e:e} > 1e-4");
        }
        eprintln!("{case}: worst LoRA gradient rel err {worst:.3e}");
    }
}

#[test]
fn gradient_checkpointing_gives_identical_gradients() {
    for case in CASES {
        let (l1, plain) = train_grads(case, false, 1);
        let (l2, ckpt) = train_grads(case, true, 1);
        assert_eq!(l1.to_bits(), l2.to_bits(), "{case}: loss");
        for (k, g) in &plain {
            let h = &ckpt[k];
            assert!(g.iter().zip(h).all(|(a, b)| a.to_bits() == b.to_bits()), "{case}: {k} differs under checkpointing");
        }
    }
}

#[test]
fn gradient_accumulation_normalises_by_all_target_tokens() {
    // Three sequences in 3 micro-batches, each scaled by 1 / (targets of the
    // whole step), give the full batch's loss and gradients.
    for case in ["llama", "qwen2"] {
        let (l1, full) = train_grads(case, false, 1);
        let (l3, accum) = train_grads(case, false, 3);
        assert!((l1 - l3).abs() / l1 <= 1e-6, "{case}: loss {l1} vs accumulated {l3}");
        for (k, g) in &full {
            let e = rel_err(&accum[k], g);
            assert!(e <= 1e-5, "{case}: {k} accumulated rel err {e:e}");
        }
    }
}

#[test]
fn tokenizer_matches_transformers() {
    for case in CASES {
        let r = Reference::load(case);
        let check = &r.json["tokenizer_check"];
        let tok = load_tokenizer(&fixture(case).join("model")).unwrap();
        let enc = tok.encode(check["text"].as_str().unwrap(), true).unwrap();
        let expected: Vec<u32> = check["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        assert_eq!(enc.get_ids(), expected.as_slice(), "{case}: token ids");
        // tokenizer_config.json names the special tokens; their ids agree
        // with the model's config.json.
        let tc = load_tokenizer_config(&fixture(case).join("model")).unwrap().expect("tokenizer_config.json");
        let eos = tc["eos_token"].as_str().unwrap();
        let model_cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixture(case).join("model/config.json")).unwrap()).unwrap();
        // (An image-text checkpoint keeps it in text_config.)
        let eos_id = model_cfg["eos_token_id"].as_u64().or(model_cfg["text_config"]["eos_token_id"].as_u64());
        assert_eq!(tok.token_to_id(eos).map(u64::from), eos_id, "{case}: eos id");
    }
}
