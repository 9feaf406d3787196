//! RLOO against TRL 1.16's RLOOTrainer (tests/fixtures/rloo.py): on GRPO's
//! fixture prompts, completions, reward values and adapter, the
//! leave-one-out advantages (reward clip, KL penalty in the reward,
//! normalisation), the generation metrics, every micro-batch's
//! sequence-level loss with its clip ratios, the LoRA gradients of the whole
//! step and the weights after the first clipped AdamW update.

mod common;

use ferrotune::adapter::peft;
use ferrotune::backend::Backend;
use ferrotune::backend::cpu::CpuBackend;
use ferrotune::config::AdamWConfig;
use ferrotune::config::grpo::{GrpoSettings, RlooOptions};
use ferrotune::data::prompts::PromptRow;
use ferrotune::model::Model;
use ferrotune::model::checkpoint::Checkpoint;
use ferrotune::model::graph::BackwardOpts;
use ferrotune::train::objectives::grpo::rloo::{advantages, kl_sums};
use ferrotune::train::objectives::grpo::rollout::{Sample, generation_metrics};
use ferrotune::train::objectives::grpo::train_pass;
use ferrotune::train::optimizer::Optimizer;
use serde_json::Value;
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn doc() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("rloo/cases.json")).unwrap()).unwrap()
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

fn rows_f64(v: &Value) -> Vec<Vec<f64>> {
    v.as_array().unwrap().iter().map(|r| r.as_array().unwrap().iter().map(f).collect()).collect()
}

fn settings(s: &Value) -> GrpoSettings {
    GrpoSettings {
        beta: f(&s["beta"]),
        num_generations: s["num_generations"].as_u64().unwrap() as usize,
        max_completion_length: s["max_completion_length"].as_u64().unwrap() as usize,
        temperature: f(&s["temperature"]),
        epsilon: f(&s["epsilon"]),
        epsilon_high: s["epsilon_high"].as_f64(),
        reward_funcs: vec!["short_and_even".into(), "near_target".into()],
        reward_weights: Some(s["reward_weights"].as_array().unwrap().iter().map(f).collect()),
        mask_truncated_completions: s["mask_truncated_completions"].as_bool().unwrap(),
        rloo: Some(RlooOptions {
            normalize_advantages: s["normalize_advantages"].as_bool().unwrap(),
            reward_clip_range: s["reward_clip_range"].as_array().map(|r| (f(&r[0]), f(&r[1]))),
        }),
        ..GrpoSettings::default()
    }
}

/// |a − b| within `tol` relative to max(|b|, 1) (NaN matches NaN).
fn close(a: f64, b: f64, tol: f64) -> bool {
    (a.is_nan() && b.is_nan()) || (a - b).abs() <= tol * b.abs().max(1.0)
}

fn ints(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn advantages_and_generation_metrics_match_trl() {
    let d = doc();
    let per_func: Vec<Vec<f64>> = rows_f64(&d["rewards_per_func"]);
    let completions: Vec<Vec<u32>> = d["completion_ids"].as_array().unwrap().iter().map(ints).collect();
    let eos = d["eos"].as_u64().unwrap() as u32;
    let names: Vec<(&'static str, &'static str)> = vec![
        ("rewards/short_and_even/mean", "rewards/short_and_even/std"),
        ("rewards/near_target/mean", "rewards/near_target/std"),
    ];
    for case in d["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let s = settings(&case["settings"]);
        // The sampling policy's log-probs are the policy's (the fixture's
        // old_logps are perturbed afterwards, for the loss only).
        let (sums, kl) = kl_sums(&rows_f64(&case["logps"]), &rows_f64(&case["ref_logps"]));
        let got = advantages(&per_func, &s.weights(), s.num_generations, s.rloo.unwrap(), s.beta, &sums);
        for (i, (a, b)) in got.advantages.iter().zip(case["advantages"].as_array().unwrap()).enumerate() {
            assert!(close(*a, f(b), 1e-5), "{name}: advantage {i}: {a} vs TRL {}", f(b));
        }
        let lens: Vec<usize> = completions.iter().map(Vec::len).collect();
        let ended: Vec<bool> = completions.iter().map(|c| c.last() == Some(&eos)).collect();
        let mut m = generation_metrics(&per_func, &got, &lens, &ended, &names);
        if s.beta != 0.0 {
            m.push("kl", kl);
        }
        let want = case["generation_metrics"].as_object().unwrap();
        assert!(want.contains_key("kl") == (s.beta != 0.0), "{name}: TRL logs kl exactly when beta != 0");
        for (k, v) in want {
            if k == "num_tokens" {
                continue; // not logged by ferrotune
            }
            let ours = m.get(k).unwrap_or_else(|| panic!("{name}: metric {k} is not logged"));
            assert!(close(ours, f(v), 1e-5), "{name}: {k} = {ours}, TRL {}", f(v));
        }
    }
}

#[test]
fn loss_gradients_and_first_update_match_trl() {
    let d = doc();
    let be = CpuBackend::new();
    let prompts: Vec<PromptRow> = d["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|ids| PromptRow { prompt: Value::Null, ids: ints(ids), columns: Default::default() })
        .collect();
    let completions: Vec<Vec<u32>> = d["completion_ids"].as_array().unwrap().iter().map(ints).collect();
    let g = d["num_generations"].as_u64().unwrap() as usize;
    let micro = d["micro_batch_size"].as_u64().unwrap() as usize;
    let lr = f(&d["learning_rate"]);
    let st_bytes = std::fs::read(fixtures().join("rloo/grads.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&st_bytes).unwrap();
    let tensor = |key: &str| -> Vec<f32> {
        let t = st.tensor(key).unwrap_or_else(|_| panic!("{key} missing from the fixture"));
        t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    };
    for case in d["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let s = settings(&case["settings"]);
        let mut model = Model::load(&be, &Checkpoint::open(&fixtures().join("llama/model")).unwrap()).unwrap();
        peft::load(&be, &mut model, &fixtures().join("grpo/adapter")).unwrap();
        let masks: Vec<usize> = case["completion_mask_tokens"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
        let advs: Vec<f64> = case["advantages"].as_array().unwrap().iter().map(f).collect();
        let old = rows_f64(&case["old_logps"]);
        let samples: Vec<Sample> = (0..completions.len())
            .map(|i| Sample { prompt: i / g, completion: completions[i].clone(), mask: masks[i], advantage: advs[i], old: Some(old[i].clone()) })
            .collect();

        model.zero_grad(&be);
        let opts = |_| BackwardOpts { grad_scale: 0.0, gradient_checkpointing: false, dropout_seed: None };
        let pass = train_pass(&be, &mut model, &s, &prompts, &samples, micro, opts).unwrap();

        // TRL's _compute_loss is the micro-batch mean; the Trainer divides it by
        // gradient accumulation, ferrotune's micro-batch loss already is.
        let want_losses: Vec<f64> = case["micro_losses"].as_array().unwrap().iter().map(f).collect();
        let ga = want_losses.len() as f64;
        assert_eq!(pass.micro.len(), want_losses.len(), "{name}: micro-batches");
        for (mi, (out, want)) in pass.micro.iter().zip(&want_losses).enumerate() {
            assert!(close(out.loss * ga, *want, 1e-5), "{name}: micro-batch {mi} loss {} vs TRL {want}", out.loss * ga);
            let wm = &case["micro_metrics"][mi];
            for (k, ours) in [
                ("clip_ratio/low_mean", out.clip_low),
                ("clip_ratio/low_min", out.clip_low_min),
                ("clip_ratio/high_mean", out.clip_high),
                ("clip_ratio/high_max", out.clip_high_max),
                ("clip_ratio/region_mean", out.clip_region),
            ] {
                assert!(close(ours, f(&wm[k]), 1e-6), "{name}: micro-batch {mi} {k} = {ours}, TRL {}", f(&wm[k]));
            }
        }

        // The step's LoRA gradients, then one clipped AdamW step.
        let mut worst = 0f64;
        for (li, p, l) in model.loras() {
            let module = ferrotune::model::module_path(&model.cfg, li, p);
            for (which, grad) in [("lora_A", &l.grad_a), ("lora_B", &l.grad_b)] {
                let want = tensor(&format!("{name}.base_model.model.{module}.{which}.weight"));
                let got = be.download(grad);
                let rel = common::rel_err_guarded(&got, &want);
                worst = worst.max(rel);
                assert!(rel <= 1e-4, "{name}: {module}.{which} gradient differs from TRL's by {rel:.2e} (relative)");
            }
        }
        let mut opt = Optimizer::new(&be, &model, AdamWConfig::default());
        opt.step(&be, &mut model, lr as f32);
        let mut worst_w = 0f64;
        for (li, p, l) in model.loras() {
            let module = ferrotune::model::module_path(&model.cfg, li, p);
            for (which, w) in [("lora_A", &l.a), ("lora_B", &l.b)] {
                let want = tensor(&format!("{name}.updated.base_model.model.{module}.{which}.weight"));
                for (a, b) in be.download(w).iter().zip(&want) {
                    worst_w = worst_w.max((a - b).abs() as f64);
                }
            }
        }
        assert!(worst_w <= 1e-5, "{name}: LoRA weights after the first AdamW step differ from TRL's by up to {worst_w:.2e}");
        eprintln!(
            "{name}: step loss {:.6} (TRL {:.6}), worst gradient rel err {worst:.2e}, worst updated weight abs err {worst_w:.2e}",
            pass.loss,
            want_losses.iter().sum::<f64>() / ga
        );
    }
}
