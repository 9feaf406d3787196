//! Shared helpers for the integration tests: fixture paths, reference
//! tensors written by tests/fixtures/generate.py, and error measures.
#![allow(dead_code)]

use ferrotune::adapter::peft;
use ferrotune::backend::Backend;
use ferrotune::model::Model;
use ferrotune::model::batch::{Batch, IGNORE_INDEX, Sequence};
use ferrotune::model::checkpoint::Checkpoint;
use ferrotune::model::graph::BackwardOpts;
use safetensors::SafeTensors;
use std::path::PathBuf;

pub const CASES: &[&str] = &["llama", "llama3", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "gemma3_vlm", "phi3", "qwen3_5", "qwen3_5_vlm", "gemma4", "gemma4_vlm"];

/// Cases checked for logits, loss and gradients only: phi3_long's batch is
/// longer than its rope's original context, so the long factors apply
/// (generation would switch factors part-way, as transformers does).
pub const LONG_ROPE_CASES: &[&str] = &["phi3_long"];

/// tests/fixtures/<case>; FERROTUNE_FIXTURES overrides the folder, for test
/// binaries built on one machine and run on another (the GPU check).
pub fn fixture(case: &str) -> PathBuf {
    let root = std::env::var_os("FERROTUNE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"));
    root.join(case)
}

/// The reference tensors of a fixture case.
pub struct Reference {
    bytes: Vec<u8>,
    pub json: serde_json::Value,
}

impl Reference {
    pub fn load(case: &str) -> Reference {
        let dir = fixture(case);
        let bytes = std::fs::read(dir.join("reference.safetensors")).expect("reference.safetensors");
        let json = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
        Reference { bytes, json }
    }

    fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).unwrap()
    }

    pub fn names(&self) -> Vec<String> {
        self.st().names().into_iter().map(|s| s.to_string()).collect()
    }

    pub fn shape(&self, name: &str) -> Vec<usize> {
        self.st().tensor(name).unwrap().shape().to_vec()
    }

    pub fn f32(&self, name: &str) -> Vec<f32> {
        let st = self.st();
        let t = st.tensor(name).unwrap_or_else(|_| panic!("reference tensor {name}"));
        assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
        t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
    }

    pub fn f64(&self, name: &str) -> Vec<f64> {
        let st = self.st();
        let t = st.tensor(name).unwrap_or_else(|_| panic!("reference tensor {name}"));
        assert_eq!(t.dtype(), safetensors::Dtype::F64, "{name}");
        t.data().chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect()
    }

    pub fn i64(&self, name: &str) -> Vec<i64> {
        let st = self.st();
        let t = st.tensor(name).unwrap_or_else(|_| panic!("reference tensor {name}"));
        assert_eq!(t.dtype(), safetensors::Dtype::I64, "{name}");
        t.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()
    }

    /// The padded reference batch as sequences (padding removed), plus
    /// (row, column) of every kept token in order.
    pub fn sequences(&self) -> (Vec<Sequence>, Vec<(usize, usize)>) {
        let shape = self.shape("input_ids");
        let (b, t) = (shape[0], shape[1]);
        let ids = self.i64("input_ids");
        let mask = self.i64("attention_mask");
        let labels = self.i64("labels");
        let mut seqs = Vec::new();
        let mut where_ = Vec::new();
        for r in 0..b {
            let mut s = Sequence { input_ids: vec![], labels: vec![] };
            for c in 0..t {
                if mask[r * t + c] == 1 {
                    s.input_ids.push(ids[r * t + c] as u32);
                    let l = labels[r * t + c];
                    s.labels.push(if l == -100 { IGNORE_INDEX } else { l as i32 });
                    where_.push((r, c));
                }
            }
            seqs.push(s);
        }
        (seqs, where_)
    }
}

/// Model-level tolerances of a bf16 GPU backend against the CPU reference,
/// shared by tests/gpu.rs (the real GPU) and tests/bf16_tolerances.rs (a CPU
/// simulation of bf16 storage, which measured 1.5e-3 worst loss error, 2.2e-2
/// worst gradient error and 4.1e-3 worst curve error on the fixtures):
/// loss relative error, LoRA gradient norm-relative error, and the worst
/// per-step relative error of a 50-step AdamW loss curve.
pub const GPU_LOSS_TOL: f64 = 5e-3;
pub const GPU_GRAD_TOL: f64 = 5e-2;
pub const GPU_CURVE_TOL: f64 = 2e-2;

/// ‖a − b‖ / ‖b‖ in f64.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum();
    (num / den).sqrt()
}

/// ‖got − want‖ / ‖want‖ in f64, with a zero `want` counting as 1e-30
/// (a LoRA A gradient is exactly zero while B is zero).
pub fn rel_err_guarded(got: &[f32], want: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (a, b) in got.iter().zip(want) {
        num += ((a - b) as f64).powi(2);
        den += (*b as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

pub fn max_abs_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).abs()).fold(0.0, f64::max)
}

/// A fixture's model with its PEFT adapter, on any backend.
pub fn load_with_adapter<B: Backend>(be: &B, case: &str) -> Model<B> {
    let ckpt = Checkpoint::open(&fixture(case).join("model")).unwrap();
    let mut model = Model::load(be, &ckpt).unwrap();
    peft::load(be, &mut model, &fixture(case).join("adapter")).unwrap();
    model
}

/// Mean loss of one forward+backward (no dropout, no checkpointing) and
/// every LoRA gradient flattened (A then B, module by module).
pub fn loss_and_grads<B: Backend>(be: &B, model: &mut Model<B>, batch: &Batch) -> (f64, Vec<f32>) {
    model.zero_grad(be);
    let opts = BackwardOpts { grad_scale: 1.0 / batch.n_targets() as f32, gradient_checkpointing: false, dropout_seed: None };
    let loss = model.forward_backward(be, batch, opts).mean();
    let mut g = Vec::new();
    for (_, _, l) in model.loras() {
        g.extend(be.download(&l.grad_a));
        g.extend(be.download(&l.grad_b));
    }
    (loss, g)
}

/// A Python interpreter that can import every module in `modules`, for the
/// checks that compare against the HuggingFace stack directly. Taken from
/// FERROTUNE_PYTHON, else `python3`. None (and the caller says it skipped)
/// where there is none, as on CI.
pub fn python_with(modules: &[&str]) -> Option<PathBuf> {
    let python = std::env::var_os("FERROTUNE_PYTHON").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("python3"));
    let probe = format!("import {}", modules.join(", "));
    let ok = std::process::Command::new(&python)
        .args(["-c", &probe])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok.then_some(python)
}
