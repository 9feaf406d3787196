//! The training-parity fixture (tests/fixtures/train/, written by
//! generate.py with plain torch + PEFT) seen from the library: the first
//! optimizer step's loss and pre-clip gradient norm, recomputed with
//! ferrotune's CPU backend from the same files, match reference.json
//! (loss 1e-5 relative, gradient norm 1e-4 relative). This proves the
//! fixture describes what ferrotune computes before any training loop runs
//! on it.

mod common;

use common::fixture;
use ferrotune::adapter::peft;
use ferrotune::backend::cpu::CpuBackend;
use ferrotune::data::pretokenized;
use ferrotune::model::Model;
use ferrotune::model::batch::Batch;
use ferrotune::model::checkpoint::Checkpoint;
use ferrotune::model::graph::{BackwardOpts, LossSum};
use ferrotune::train::optimizer::Optimizer;
use std::path::PathBuf;

/// Fixture paths in config.yml are relative to the repository root.
fn repo_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

#[test]
fn first_step_loss_and_grad_norm_match_the_reference() {
    let dir = fixture("train");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let hp = &reference["hyperparameters"];
    let (mbs, gas) = (hp["micro_batch_size"].as_u64().unwrap() as usize, hp["gradient_accumulation_steps"].as_u64().unwrap() as usize);
    let step = &reference["steps"][0];

    let be = CpuBackend::new();
    let ckpt = Checkpoint::open(&repo_path(reference["base_model"].as_str().unwrap())).unwrap();
    let mut model = Model::load(&be, &ckpt).unwrap();
    assert_eq!(peft::load(&be, &mut model, &dir.join("start_adapter")).unwrap(), 14);
    let rows = pretokenized::read_jsonl(&dir.join("data.jsonl"), Some(model.cfg.vocab)).unwrap();
    assert_eq!(rows.len(), 12);

    // One optimizer step: gas micro-batches of mbs consecutive rows, each
    // backward scaled by 1 / (target tokens of the whole step).
    let step_rows = &rows[..mbs * gas];
    let micro: Vec<Batch> = step_rows.chunks(mbs).map(|c| Batch::from_sequences(c, model.cfg.vocab).unwrap()).collect();
    let targets: usize = micro.iter().map(Batch::n_targets).sum();
    assert_eq!(targets as u64, step["num_target_tokens"].as_u64().unwrap());
    model.zero_grad(&be);
    let mut loss = LossSum::default();
    for batch in &micro {
        let opts = BackwardOpts { grad_scale: 1.0 / targets as f32, gradient_checkpointing: false, dropout_seed: None };
        loss.add(model.forward_backward(&be, batch, opts));
    }
    let norm = Optimizer::grad_norm(&be, &model);

    let (ref_loss, ref_norm) = (step["loss"].as_f64().unwrap(), step["grad_norm"].as_f64().unwrap());
    let loss_err = (loss.mean() - ref_loss).abs() / ref_loss;
    let norm_err = (norm - ref_norm).abs() / ref_norm;
    eprintln!("step 1: loss {} vs {ref_loss} (rel {loss_err:.1e}); grad norm {norm} vs {ref_norm} (rel {norm_err:.1e})", loss.mean());
    assert!(loss_err <= 1e-5, "step 1 loss {} vs reference {ref_loss}", loss.mean());
    assert!(norm_err <= 1e-4, "step 1 pre-clip grad norm {norm} vs reference {ref_norm}");
    // The fixture is meant to exercise clipping.
    assert!(ref_norm > hp["max_grad_norm"].as_f64().unwrap() && step["clipped"] == true);
}
