//! CPU backend throughput: one LoRA forward+backward step on a synthetic
//! Llama-shaped model. Prints tokens/s (no assertions: speed targets live in
//! benchmarks, never in tests).
//!
//!   cargo bench --bench cpu_step

use ferrotune::adapter::{LoraConfig, Targets};
use ferrotune::backend::cpu::CpuBackend;
use ferrotune::model::batch::{Batch, Sequence};
use ferrotune::model::checkpoint::Checkpoint;
use ferrotune::model::graph::BackwardOpts;
use ferrotune::model::{Model, synth};
use ferrotune::util::rng::Rng;
use std::time::Instant;

fn main() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut spec = synth::preset("tiny").unwrap();
    (spec.hidden, spec.layers, spec.heads, spec.kv_heads, spec.intermediate, spec.vocab) = (256, 4, 8, 4, 688, 4096);
    synth::write(&spec, tmp.path(), 1).unwrap();
    let be = CpuBackend::new();
    let mut model = Model::load(&be, &Checkpoint::open(tmp.path()).unwrap()).unwrap();
    let mut rng = Rng::new(3);
    model.attach_lora(&be, &LoraConfig::new(16, 32.0, Targets::AllLinear), &mut rng).unwrap();

    let (seqs_per_batch, seq_len) = (4, 256);
    let seqs: Vec<Sequence> = (0..seqs_per_batch)
        .map(|_| Sequence::unmasked((0..seq_len).map(|_| (rng.next_u64() % spec.vocab as u64) as u32).collect()))
        .collect();
    let batch = Batch::from_sequences(&seqs, spec.vocab).unwrap();
    for checkpointing in [false, true] {
        let opts = BackwardOpts { grad_scale: 1.0 / batch.n_targets() as f32, gradient_checkpointing: checkpointing, dropout_seed: Some(7) };
        model.forward_backward(&be, &batch, opts); // warm-up
        let steps = 5;
        let t0 = Instant::now();
        for _ in 0..steps {
            model.zero_grad(&be);
            model.forward_backward(&be, &batch, opts);
        }
        let dt = t0.elapsed().as_secs_f64() / steps as f64;
        println!(
            "cpu_step hidden=256 layers=4 lora_r=16 tokens/step={} checkpointing={checkpointing}: {:.1} ms/step, {:.0} tokens/s",
            batch.n_tokens(),
            dt * 1e3,
            batch.n_tokens() as f64 / dt
        );
    }
}
