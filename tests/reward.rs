//! Reward modelling against TRL 1.16 + PEFT (fixtures written by
//! tests/fixtures/reward.py): the tiny llama fixture as
//! LlamaForSequenceClassification with a PEFT SEQ_CLS adapter (LoRA +
//! the `score` head as a module to save).
//! - rewards, TRL's RewardTrainer loss and metrics, and the gradients of
//!   every LoRA tensor and of the score weight match torch's (float64);
//! - the adapter ferrotune saves has the layout PEFT writes, loads back
//!   exactly, and PEFT itself loads it to the same rewards;
//! - AdamW steps the score head with the LoRA tensors (one clipped norm),
//!   and a checkpoint resumes the head and its moments exactly.

mod common;

use common::{fixture, python_with, rel_err};
use ferrotune::adapter::peft::{self, SCORE_KEY};
use ferrotune::backend::Backend;
use ferrotune::backend::cpu::CpuBackend;
use ferrotune::data::preference::RewardPair;
use ferrotune::model::Model;
use ferrotune::model::checkpoint::Checkpoint;
use ferrotune::model::graph::BackwardOpts;
use ferrotune::train::saves::{self, TrainState};
use ferrotune::train::objectives::RewardConfig;
use ferrotune::train::optimizer::{AdamWConfig, Optimizer};
use ferrotune::train::objectives::reward::{self, HeadConfig, ScoreHead};
use safetensors::SafeTensors;
use serde_json::Value;
use std::path::Path;

/// Loss against TRL (float64 there, f32 model here).
const LOSS_TOL: f64 = 1e-5;
/// Each gradient tensor, ‖ours − torch‖ / ‖torch‖.
const GRAD_TOL: f64 = 1e-4;

fn reference() -> Value {
    let path = fixture("reward").join("reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn pairs(doc: &Value, margins: &Value) -> Vec<RewardPair> {
    doc["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, p)| RewardPair { chosen: ids(&p["chosen"]), rejected: ids(&p["rejected"]), margin: margins.get(i).and_then(Value::as_f64) })
        .collect()
}

fn config(v: &Value) -> RewardConfig {
    RewardConfig { center_rewards_coefficient: v["center_rewards_coefficient"].as_f64() }
}

/// The fixture model with the fixture's reward adapter and score head.
fn load(be: &CpuBackend) -> (Model<CpuBackend>, ScoreHead<CpuBackend>) {
    let model_dir = fixture("llama").join("model");
    let mut model = Model::load(be, &Checkpoint::open(&model_dir).unwrap()).unwrap();
    let (count, score) = peft::load_reward(be, &mut model, &fixture("reward").join("adapter")).unwrap();
    assert_eq!(count, 6);
    let hc = HeadConfig::read(&model_dir).unwrap();
    assert_eq!(hc.pad_token_id, Some(reference()["pad_token_id"].as_u64().unwrap() as u32));
    (model, ScoreHead::from_host(be, &score, hc.pad_token_id))
}

fn opts(checkpointing: bool) -> BackwardOpts {
    BackwardOpts { grad_scale: f32::NAN, gradient_checkpointing: checkpointing, dropout_seed: None }
}

struct Grads {
    bytes: Vec<u8>,
}

impl Grads {
    fn load() -> Grads {
        Grads { bytes: std::fs::read(fixture("reward").join("grads.safetensors")).unwrap() }
    }

    fn get(&self, key: &str) -> Vec<f32> {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st.tensor(key).unwrap_or_else(|_| panic!("reference gradient {key}"));
        t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
    }
}

fn close(got: f64, want: f64, tol: f64) -> bool {
    (got - want).abs() <= tol * want.abs().max(1e-3)
}

#[test]
fn rewards_loss_and_gradients_match_trl() {
    let be = CpuBackend::new();
    let (mut model, mut head) = load(&be);
    let doc = reference();
    let grads = Grads::load();
    let mut worst = (0.0f64, 0.0f64);
    for (name, v) in doc["variants"].as_object().unwrap() {
        let pairs = pairs(&doc, &v["margin"]);
        let refs: Vec<&RewardPair> = pairs.iter().collect();
        let cfg = config(v);

        let rewards = reward::rewards(&be, &model, &head, &refs).unwrap();
        for (i, r) in rewards.iter().enumerate() {
            let (c, j) = (v["chosen_rewards"][i].as_f64().unwrap(), v["rejected_rewards"][i].as_f64().unwrap());
            assert!(close(r.chosen, c, 1e-5) && close(r.rejected, j, 1e-5), "{name} pair {i}: rewards {r:?}, TRL ({c}, {j})");
        }

        for checkpointing in [false, true] {
            model.zero_grad(&be);
            head.zero_grad(&be);
            let (loss, tokens) = reward::reward_forward_backward(&be, &mut model, &mut head, &cfg, &refs, 1.0, opts(checkpointing)).unwrap();
            assert_eq!(tokens, pairs.iter().map(|p| p.chosen.len() + p.rejected.len()).sum::<usize>());
            let want = v["loss"].as_f64().unwrap();
            let loss_err = (loss.loss - want).abs() / want.abs();
            assert!(loss_err <= LOSS_TOL, "{name}: loss {} vs TRL {want} (rel {loss_err:.2e})", loss.loss);
            worst.0 = worst.0.max(loss_err);
            for (metric, want) in v["metrics"].as_object().unwrap() {
                let got = loss.metrics.get(metric).unwrap_or_else(|| panic!("{name}: metric {metric} missing"));
                assert!(close(got, want.as_f64().unwrap(), LOSS_TOL), "{name}: {metric} {got} vs TRL {want}");
            }

            let mut checked = 0;
            for (li, p, l) in model.loras() {
                let module = ferrotune::model::module_path(&model.cfg, li, p);
                for (which, g) in [("lora_A", &l.grad_a), ("lora_B", &l.grad_b)] {
                    let key = format!("{name}.base_model.model.{module}.{which}.weight");
                    let e = rel_err(&be.download(g), &grads.get(&key));
                    assert!(e <= GRAD_TOL, "{key}: relative error {e:.2e}");
                    worst.1 = worst.1.max(e);
                    checked += 1;
                }
            }
            assert_eq!(checked, 12);
            let e = rel_err(&head.grad(&be), &grads.get(&format!("{name}.{SCORE_KEY}")));
            assert!(e <= GRAD_TOL, "{name}: score gradient relative error {e:.2e}");
            worst.1 = worst.1.max(e);
        }

        let eval = reward::reward_eval(&be, &model, &head, &cfg, &refs).unwrap();
        assert!(close(eval.loss, v["loss"].as_f64().unwrap(), LOSS_TOL), "{name}: eval loss {}", eval.loss);
    }
    eprintln!("worst loss rel err {:.2e}, worst gradient rel err {:.2e}", worst.0, worst.1);
}

#[test]
fn gradients_scale_and_accumulate_over_micro_batches() {
    // Two micro-batches of two pairs, each scaled by its share (1/2), give
    // the gradient of the mean over all four pairs.
    let be = CpuBackend::new();
    let (mut model, mut head) = load(&be);
    let doc = reference();
    let v = &doc["variants"]["plain"];
    let pairs = pairs(&doc, &v["margin"]);
    let refs: Vec<&RewardPair> = pairs.iter().collect();
    let cfg = config(v);
    for chunk in refs.chunks(2) {
        reward::reward_forward_backward(&be, &mut model, &mut head, &cfg, chunk, 0.5, opts(false)).unwrap();
    }
    let grads = Grads::load();
    let e = rel_err(&head.grad(&be), &grads.get(&format!("plain.{SCORE_KEY}")));
    assert!(e <= GRAD_TOL, "score gradient over two micro-batches: relative error {e:.2e}");
    let (li, p, l) = model.loras().next().unwrap();
    let module = ferrotune::model::module_path(&model.cfg, li, p);
    let e = rel_err(&be.download(&l.grad_b), &grads.get(&format!("plain.base_model.model.{module}.lora_B.weight")));
    assert!(e <= GRAD_TOL, "{module} lora_B over two micro-batches: relative error {e:.2e}");
}

#[test]
fn pooled_token_is_the_last_that_is_not_the_pad_id() {
    let be = CpuBackend::new();
    let head = ScoreHead::from_host(&be, &[0.0; 4], Some(0));
    assert_eq!(head.pooled_position(&[1, 5, 7, 2]), 3);
    assert_eq!(head.pooled_position(&[1, 5, 0, 0]), 1);
    assert_eq!(head.pooled_position(&[0, 0]), 0);
    let no_pad = ScoreHead::from_host(&be, &[0.0; 4], None);
    assert_eq!(no_pad.pooled_position(&[1, 5, 0, 0]), 3);
}

#[test]
fn fresh_head_is_normal_with_the_initializer_range() {
    let be = CpuBackend::new();
    let mut rng = ferrotune::util::rng::Rng::new(7);
    let head = ScoreHead::init(&be, 4096, 0.02, Some(0), &mut rng);
    let w = head.weight(&be);
    let mean = w.iter().map(|&x| x as f64).sum::<f64>() / w.len() as f64;
    let std = (w.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / w.len() as f64).sqrt();
    // 4096 draws: the sample std is within ~1.1% (1σ) of 0.02, the mean within 3e-4 (1σ).
    assert!((std - 0.02).abs() < 0.001 && mean.abs() < 0.0015, "mean {mean}, std {std}");
}

fn read_config(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join(peft::CONFIG_FILE)).unwrap()).unwrap()
}

fn layout(dir: &Path) -> Vec<(String, Vec<usize>, safetensors::Dtype)> {
    let bytes = std::fs::read(dir.join(peft::WEIGHTS_FILE)).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<_> = st.tensors().into_iter().map(|(k, t)| (k, t.shape().to_vec(), t.dtype())).collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn saved_reward_adapter_has_peft_layout_and_loads_back() {
    let be = CpuBackend::new();
    let (model, head) = load(&be);
    let peft_dir = fixture("reward").join("adapter");
    let lc = peft::read_config(&peft_dir).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    peft::save_reward(&be, &model, &lc, &head.weight(&be), tmp.path()).unwrap();

    assert_eq!(layout(tmp.path()), layout(&peft_dir));
    let (ours, theirs) = (read_config(tmp.path()), read_config(&peft_dir));
    for field in ["peft_type", "task_type", "modules_to_save", "r", "target_modules", "bias", "use_rslora", "use_dora"] {
        assert_eq!(ours[field], theirs[field], "adapter_config.json field {field}");
    }
    // Numbers compare as numbers (ferrotune writes lora_alpha 8 as 8.0).
    for field in ["lora_alpha", "lora_dropout"] {
        assert_eq!(ours[field].as_f64(), theirs[field].as_f64(), "adapter_config.json field {field}");
    }

    // Loads back to the same tensors, bit for bit.
    let mut again = Model::load(&be, &Checkpoint::open(&fixture("llama").join("model")).unwrap()).unwrap();
    let (count, score) = peft::load_reward(&be, &mut again, tmp.path()).unwrap();
    assert_eq!(count, 6);
    assert_eq!(score, head.weight(&be));
    for ((_, _, a), (_, _, b)) in model.loras().zip(again.loras()) {
        assert_eq!(be.download(&a.a), be.download(&b.a));
        assert_eq!(be.download(&a.b), be.download(&b.b));
    }

    // A language-model load refuses it, saying why.
    let mut lm = Model::load(&be, &Checkpoint::open(&fixture("llama").join("model")).unwrap()).unwrap();
    let err = peft::load(&be, &mut lm, tmp.path()).unwrap_err().to_string();
    assert!(err.contains("reward-model adapter") && err.contains(SCORE_KEY), "{err}");
    // A causal-LM adapter has no score head for load_reward.
    let err = peft::load_reward(&be, &mut lm, &fixture("llama").join("adapter")).unwrap_err().to_string();
    assert!(err.contains(SCORE_KEY) && err.contains("missing"), "{err}");
}

#[test]
fn modules_to_save_other_than_the_score_head_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = read_config(&fixture("reward").join("adapter"));
    cfg["modules_to_save"] = serde_json::json!(["score", "lm_head"]);
    std::fs::write(tmp.path().join(peft::CONFIG_FILE), cfg.to_string()).unwrap();
    let err = peft::read_config(tmp.path()).unwrap_err().to_string();
    assert!(err.contains("modules_to_save") && err.contains("lm_head") && err.contains("adapter_config.json"), "{err}");
}

fn state(step: usize) -> TrainState {
    TrainState {
        format_version: saves::FORMAT_VERSION,
        global_step: step,
        total_steps: 2,
        epoch: 0,
        next_micro_batch: step,
        seed: 1,
        tokens_seen: 0,
        fingerprint: "reward-test".into(),
    }
}

/// One optimiser step on the fixture pairs; returns the pre-clip norm.
fn train_step(
    be: &CpuBackend,
    model: &mut Model<CpuBackend>,
    head: &mut ScoreHead<CpuBackend>,
    opt: &mut Optimizer<CpuBackend>,
    pairs: &[&RewardPair],
) -> f64 {
    model.zero_grad(be);
    head.zero_grad(be);
    reward::reward_forward_backward(be, model, head, &RewardConfig::default(), pairs, 1.0, opts(false)).unwrap();
    opt.step_with(be, model, &mut [&mut head.param], 1e-2).unwrap()
}

fn lora_values(be: &CpuBackend, model: &Model<CpuBackend>) -> Vec<f32> {
    model.loras().flat_map(|(_, _, l)| [be.download(&l.a), be.download(&l.b)]).flatten().collect()
}

#[test]
fn adamw_steps_the_head_and_a_checkpoint_resumes_exactly() {
    let be = CpuBackend::new();
    let doc = reference();
    let pairs = pairs(&doc, &Value::Null);
    let refs: Vec<&RewardPair> = pairs.iter().collect();
    // Clipping on: the fixture's gradient norm is well above 0.5.
    let cfg = AdamWConfig { max_grad_norm: Some(0.5), ..AdamWConfig::default() };

    let (mut model, mut head) = load(&be);
    let mut opt = Optimizer::with_extras(&be, &model, &[&head.param], cfg);

    // The clipped norm covers the head: it is √(Σ LoRA² + Σ head²).
    model.zero_grad(&be);
    head.zero_grad(&be);
    reward::reward_forward_backward(&be, &mut model, &mut head, &RewardConfig::default(), &refs, 1.0, opts(false)).unwrap();
    let lora_sq = Optimizer::grad_norm(&be, &model).powi(2);
    let head_sq: f64 = head.grad(&be).iter().map(|&x| (x as f64).powi(2)).sum();
    let norm = Optimizer::grad_norm_with(&be, &model, &[&mut head.param]);
    assert!(close(norm, (lora_sq + head_sq).sqrt(), 1e-12) && head_sq > 0.0, "norm {norm}");
    assert!(norm > 0.5, "the test needs clipping to be active (norm {norm})");

    let w0 = head.weight(&be);
    let norm1 = train_step(&be, &mut model, &mut head, &mut opt, &refs);
    assert!(close(norm1, norm, 1e-12));
    // First AdamW step moves every weight by ~lr (the update is m̂/√v̂ ≈ ±1).
    let w1 = head.weight(&be);
    assert!(w0.iter().zip(&w1).all(|(a, b)| ((a - b).abs() - 1e-2).abs() < 1e-4), "the head moved by lr");

    let tmp = tempfile::tempdir().unwrap();
    let dir = saves::save_reward(&be, &model, &head, &opt, &peft::read_config(&fixture("reward").join("adapter")).unwrap(), &state(1), tmp.path()).unwrap();
    train_step(&be, &mut model, &mut head, &mut opt, &refs);

    // Resume from the checkpoint: adapter + head, LoRA and head moments.
    let mut resumed = Model::load(&be, &Checkpoint::open(&fixture("llama").join("model")).unwrap()).unwrap();
    let (_, score) = peft::load_reward(&be, &mut resumed, &dir).unwrap();
    let mut rhead = ScoreHead::from_host(&be, &score, head.pad_token_id);
    let mut ropt = Optimizer::with_extras(&be, &resumed, &[&rhead.param], cfg);
    let (step, moments) = saves::read_moments(&resumed, &dir).unwrap();
    ropt.load_moments(&be, &moments).unwrap();
    ropt.load_extra_moments(&be, &saves::read_extra_moments(&dir, &[&rhead.param]).unwrap()).unwrap();
    ropt.step = step;
    assert_eq!(step, 1);
    train_step(&be, &mut resumed, &mut rhead, &mut ropt, &refs);

    assert_eq!(rhead.weight(&be), head.weight(&be), "score head after resume");
    assert_eq!(lora_values(&be, &resumed), lora_values(&be, &model), "LoRA tensors after resume");

    // The extras must be passed as the optimiser was built.
    let err = ropt.step_with(&be, &mut resumed, &mut [], 1e-2).unwrap_err().to_string();
    assert!(err.contains("score.weight"), "{err}");
}

#[test]
fn peft_loads_the_saved_reward_adapter_to_the_same_rewards() {
    let Some(python) = python_with(&["torch", "transformers", "peft"]) else {
        eprintln!("skipped: no Python with transformers and peft (set FERROTUNE_PYTHON)");
        return;
    };
    const SCRIPT: &str = r#"
import json, sys, torch
from transformers import LlamaForSequenceClassification
from peft import PeftModel
model_dir, adapter_dir, pairs_path = sys.argv[1:4]
pairs = json.load(open(pairs_path))
base = LlamaForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager",
                                                      num_labels=1, pad_token_id=0)
model = PeftModel.from_pretrained(base, adapter_dir).eval()
rows = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
T = max(len(r) for r in rows)
ids = torch.zeros((len(rows), T), dtype=torch.long)
att = torch.zeros((len(rows), T), dtype=torch.long)
for i, r in enumerate(rows):
    ids[i, :len(r)] = torch.tensor(r)
    att[i, :len(r)] = 1
with torch.no_grad():
    r = model(input_ids=ids, attention_mask=att).logits.squeeze(-1).tolist()
print(json.dumps(r))
"#;
    let be = CpuBackend::new();
    let (mut model, mut head) = load(&be);
    let doc = reference();
    let pairs = pairs(&doc, &Value::Null);
    let refs: Vec<&RewardPair> = pairs.iter().collect();
    // One AdamW step first, so the saved adapter is not the fixture's.
    let mut opt = Optimizer::with_extras(&be, &model, &[&head.param], AdamWConfig::default());
    train_step(&be, &mut model, &mut head, &mut opt, &refs);

    let tmp = tempfile::tempdir().unwrap();
    let adapter = tmp.path().join("adapter");
    peft::save_reward(&be, &model, &peft::read_config(&fixture("reward").join("adapter")).unwrap(), &head.weight(&be), &adapter).unwrap();
    let pairs_path = tmp.path().join("pairs.json");
    std::fs::write(&pairs_path, doc["pairs"].to_string()).unwrap();
    let out = std::process::Command::new(&python)
        .args(["-c", SCRIPT])
        .arg(fixture("llama").join("model"))
        .arg(&adapter)
        .arg(&pairs_path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let theirs: Vec<f64> = serde_json::from_slice(&out.stdout).unwrap();
    let ours = reward::rewards(&be, &model, &head, &refs).unwrap();
    let k = ours.len();
    for (i, r) in ours.iter().enumerate() {
        assert!(close(r.chosen, theirs[i], 1e-5) && close(r.rejected, theirs[k + i], 1e-5), "pair {i}: ours {r:?}, PEFT ({}, {})", theirs[i], theirs[k + i]);
    }
}
