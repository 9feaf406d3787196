//! The CUDA backend's checks against the CPU reference, shared by the GPU
//! check (tests/gpu.rs: realistic shapes on a real GPU) and the emulator
//! check (tests/cuda_emu.rs: small shapes on the SIMT emulator, in CI).
//! Each takes the backend and the sizes; tolerances are the bf16 ones
//! documented in tests/gpu.rs.
#![allow(dead_code)]

use crate::common::{
    CASES, GPU_CURVE_TOL, GPU_GRAD_TOL, GPU_LOSS_TOL, Reference, fixture, load_with_adapter, loss_and_grads, rel_err,
};
use crate::generation;
use ferrotune::backend::Backend;
use ferrotune_testkit::conformance::{ATTN_TEST_CAP, DecodeBatch, Harness, Scale, Tolerances, random_nf4};
use ferrotune::backend::cpu::CpuBackend;
use ferrotune::backend::cuda::CudaBackend;
use ferrotune::model::batch::Batch;
use ferrotune::train::optimizer::{AdamWConfig, Optimizer};
use ferrotune::util::rng::Rng;

fn assert_checks_pass(h: &Harness<'_, CpuBackend, CudaBackend>, what: &str) {
    let mut failed = 0;
    for c in &h.checks {
        eprintln!("{c}");
        failed += !c.passed() as usize;
    }
    assert_eq!(failed, 0, "{failed} of {} {what} checks failed", h.checks.len());
}

/// Every op of the backend against the CPU (testkit/src/conformance.rs).
pub fn every_kernel(cuda: &CudaBackend, scale: Scale) {
    let cpu = CpuBackend::new();
    let mut h = Harness::new(&cpu, cuda, Tolerances::bf16(), 7);
    h.run(scale);
    assert_checks_pass(&h, "kernel");
}

/// Flash attention on varlen batches whose sequences span several 64-row
/// tiles (lengths `seqs`), for the tensor-core head dims and a generic one;
/// then soft-capped (the online softmax across tiles of capped scores), on
/// every kernel path including the generic one at head_dim 256.
pub fn attention_tiles(cuda: &CudaBackend, seqs: &[usize]) {
    let cpu = CpuBackend::new();
    let mut h = Harness::new(&cpu, cuda, Tolerances::bf16(), 13);
    for (d, heads, kv, window) in [(64, 4, 2, None), (128, 2, 1, None), (64, 2, 2, Some(65)), (128, 4, 2, Some(7)), (40, 2, 1, Some(70))] {
        h.attention(seqs, heads, kv, d, window);
    }
    for (d, heads, kv, window) in [(64, 4, 2, Some(65)), (128, 2, 1, None), (256, 2, 1, Some(70))] {
        h.attention_capped(seqs, heads, kv, d, window, ATTN_TEST_CAP);
    }
    assert_checks_pass(&h, "attention");
}

/// The LoRA products at shapes that exercise the fused dropout kernels'
/// edges: ranks over one 16-rank chunk and partial chunks, several row
/// splits of the dA product, widths that are not a multiple of the block.
pub fn lora_shapes(cuda: &CudaBackend, shapes: &[(usize, usize, usize, usize)]) {
    use ferrotune::backend::Dropout;
    let cpu = CpuBackend::new();
    let mut h = Harness::new(&cpu, cuda, Tolerances::bf16(), 17);
    for &(m, k, n, r) in shapes {
        for dropout in [None, Some(Dropout { p: 0.1, seed: 5 }), Some(Dropout { p: 0.5, seed: 6 })] {
            h.lora(m, k, n, r, dropout);
        }
    }
    assert_checks_pass(&h, "lora");
}

/// The whole model's loss and LoRA gradients on every fixture.
pub fn model_parity(cuda: &CudaBackend) {
    let cpu = CpuBackend::new();
    let mut worst = Vec::new();
    for case in CASES {
        let (seqs, _) = Reference::load(case).sequences();
        let mut m_cpu = load_with_adapter(&cpu, case);
        let mut m_gpu = load_with_adapter(cuda, case);
        let batch = Batch::from_sequences(&seqs, m_cpu.cfg.vocab).unwrap();
        let (l_cpu, g_cpu) = loss_and_grads(&cpu, &mut m_cpu, &batch);
        let (l_gpu, g_gpu) = loss_and_grads(cuda, &mut m_gpu, &batch);
        let loss_rel = (l_gpu - l_cpu).abs() / l_cpu;
        let grad_rel = rel_err(&g_gpu, &g_cpu);
        eprintln!("{case}: loss cpu {l_cpu:.6} gpu {l_gpu:.6} (rel {loss_rel:.2e}); LoRA gradients rel {grad_rel:.2e}");
        worst.push((case, loss_rel, grad_rel));
    }
    for (case, loss_rel, grad_rel) in worst {
        assert!(loss_rel <= GPU_LOSS_TOL, "{case}: loss rel error {loss_rel:e} > {GPU_LOSS_TOL:e}");
        assert!(grad_rel <= GPU_GRAD_TOL, "{case}: LoRA gradient rel error {grad_rel:e} > {GPU_GRAD_TOL:e}");
    }
}

/// `steps` AdamW steps on the llama3 fixture, on both backends side by side.
pub fn adamw_curve(cuda: &CudaBackend, steps: usize) {
    let cpu = CpuBackend::new();
    let case = "llama3";
    let (seqs, _) = Reference::load(case).sequences();
    let mut m_cpu = load_with_adapter(&cpu, case);
    let mut m_gpu = load_with_adapter(cuda, case);
    let batch = Batch::from_sequences(&seqs, m_cpu.cfg.vocab).unwrap();
    let mut o_cpu = Optimizer::new(&cpu, &m_cpu, AdamWConfig::default());
    let mut o_gpu = Optimizer::new(cuda, &m_gpu, AdamWConfig::default());
    let mut worst: f64 = 0.0;
    let (mut first, mut last) = (0.0, 0.0);
    for step in 0..steps {
        let (l_cpu, _) = loss_and_grads(&cpu, &mut m_cpu, &batch);
        let (l_gpu, _) = loss_and_grads(cuda, &mut m_gpu, &batch);
        o_cpu.step(&cpu, &mut m_cpu, 1e-3);
        o_gpu.step(cuda, &mut m_gpu, 1e-3);
        let rel = (l_gpu - l_cpu).abs() / l_cpu;
        worst = worst.max(rel);
        if step % 10 == 0 || step + 1 == steps {
            eprintln!("step {step:>2}: loss cpu {l_cpu:.5} gpu {l_gpu:.5} (rel {rel:.2e})");
        }
        if step == 0 {
            first = l_cpu;
        }
        last = l_cpu;
    }
    assert!(last < first, "the CPU run itself did not learn ({first} -> {last})");
    assert!(worst <= GPU_CURVE_TOL, "loss curves diverge: worst step rel error {worst:e} > {GPU_CURVE_TOL:e}");
}

/// cuda/decode_attn.cu against the CPU reference over head dims (the
/// tensor-core sizes, odd and largest), GQA ratios, windows shorter and
/// longer than the cache, and the (past, new) token counts given; then
/// soft-capped scores.
/// Tolerance: Tolerances::bf16().attention (8e-3): the kernel rounds only
/// its output to bf16 (2^-9 relative), from identical bf16 inputs, so the
/// error is that one rounding plus f32 summation order.
pub fn decode_attention(cuda: &CudaBackend, steps: &[(usize, usize)]) {
    let cpu = CpuBackend::new();
    let mut h = Harness::new(&cpu, cuda, Tolerances::bf16(), 11);
    for (d, heads, kv, window) in
        [(64, 8, 8, None), (128, 32, 8, None), (128, 28, 4, Some(4096)), (96, 6, 2, Some(17)), (256, 8, 1, Some(1)), (8, 4, 2, None)]
    {
        for &(past, new) in steps {
            h.decode_attention(past, new, heads, kv, d, window);
        }
    }
    // Soft-capped, where a query sees enough keys for the cap to matter.
    for (d, heads, kv, window) in [(256, 8, 4, None), (128, 8, 2, Some(17))] {
        for &(past, new) in steps.iter().filter(|(past, new)| past + new >= 8) {
            h.decode_attention_capped(past, new, heads, kv, d, window, ATTN_TEST_CAP);
        }
    }
    assert_checks_pass(&h, "decode_attention");
}

/// Batched decoding (cuda/decode_attn.cu's batch kernel and cuda/copy_cols.cu's
/// scatter_rows) against the CPU reference: for each batch of sequences at
/// their positions (first and last cache rows among them), the new keys and
/// values scattered, then one token per sequence attended, over the head
/// dims of `decode_attention` (64, 128, 256, odd ones), GQA ratios, windows
/// and soft-capped scores. Caches exact; outputs per sequence within
/// Tolerances::bf16().attention (8e-3), as `decode_attention`: the same
/// block body, one output rounding plus f32 summation order.
pub fn decode_attention_batch(cuda: &CudaBackend, batches: &[DecodeBatch<'_>]) {
    let cpu = CpuBackend::new();
    let mut h = Harness::new(&cpu, cuda, Tolerances::bf16(), 19);
    for b in batches {
        for width in [1, 2 * 64, 8 * 128 + 8] {
            h.scatter_rows(b.positions, width, b.capacity);
        }
    }
    for (d, heads, kv, window) in
        [(64, 8, 8, None), (128, 32, 8, None), (128, 28, 4, Some(4096)), (96, 6, 2, Some(17)), (256, 8, 1, Some(1)), (8, 4, 2, None)]
    {
        for &b in batches {
            h.decode_attention_batch(b, heads, kv, d, window);
        }
    }
    // Soft-capped, on batches where some query sees enough keys for the cap to matter.
    for (d, heads, kv, window) in [(256, 8, 4, None), (128, 8, 2, Some(17)), (64, 4, 1, Some(40))] {
        for &b in batches.iter().filter(|b| b.positions.iter().any(|&p| p >= 8)) {
            h.decode_attention_batch_capped(b, heads, kv, d, window, ATTN_TEST_CAP);
        }
    }
    assert_checks_pass(&h, "decode_attention_batch");
}

/// Heads over 256 (Gemma 4's full-attention layers have 512): the wide
/// instantiations of the generic flash kernels (forward, dq, dk/dv) and of
/// the decode kernels (one sequence and batched), against the CPU
/// reference. Prefill on varlen batches of `seqs` with GQA, MQA, a sliding
/// window and an odd size (300: partly filled lanes), then soft-capped;
/// decoding after each (past, new) of `steps` and for `batch`, plain and
/// soft-capped. Tolerances: Tolerances::bf16() (attention 8e-3, backward as
/// `attention_tiles`): the same math per element as at 256, only more
/// elements per lane.
pub fn wide_head_attention(cuda: &CudaBackend, seqs: &[usize], steps: &[(usize, usize)], batch: DecodeBatch<'_>) {
    let cpu = CpuBackend::new();
    let mut h = Harness::new(&cpu, cuda, Tolerances::bf16(), 29);
    for (d, heads, kv, window) in [(512, 4, 2, None), (512, 2, 1, Some(5)), (300, 2, 2, Some(3))] {
        h.attention(seqs, heads, kv, d, window);
    }
    h.attention_capped(seqs, 4, 1, 512, Some(9), ATTN_TEST_CAP);
    for (d, heads, kv, window) in [(512, 4, 2, None), (300, 2, 1, Some(5))] {
        for &(past, new) in steps {
            h.decode_attention(past, new, heads, kv, d, window);
        }
        h.decode_attention_batch(batch, heads, kv, d, window);
    }
    for &(past, new) in steps.iter().filter(|(past, new)| past + new >= 8) {
        h.decode_attention_capped(past, new, 4, 1, 512, None, ATTN_TEST_CAP);
    }
    h.decode_attention_batch_capped(batch, 4, 2, 512, Some(9), ATTN_TEST_CAP);
    assert_checks_pass(&h, "head_dim > 256 attention");
}

/// A position outside [0, capacity) is a caller's bug that the GPU cannot
/// report without a host round trip: scatter_rows must leave the cache as
/// it was for that row and decode_attention_batch must write NaN for that
/// sequence (so the bug is loud), while the valid sequences in the same
/// batch still match the CPU (tolerance as `decode_attention_batch`).
pub fn decode_batch_bad_positions(cuda: &CudaBackend) {
    let cpu = CpuBackend::new();
    let (capacity, heads, kv, d) = (6, 4, 2, 64);
    let positions = [3, 6, -1, 5];
    let valid = [true, false, false, true];
    let n = positions.len();
    let mut rng = Rng::new(23);
    let mut rand = |len: usize| -> Vec<f32> {
        (0..len).map(|_| half::bf16::from_f32(rng.uniform_range(-1.0, 1.0)).to_f32()).collect()
    };
    let (q, k, new_k) = (rand(n * heads * d), rand(n * capacity * kv * d), rand(n * kv * d));
    let shape = ferrotune::backend::AttnShape { n, n_heads: heads, n_kv_heads: kv, head_dim: d, window: None, scale: 0.125, softcap: None, max_seqlen: 0 };
    let width = kv * d;
    let mut gk = cuda.upload_activation(&k);
    cuda.scatter_rows(&cuda.upload_activation(&new_k), &mut gk, &cuda.upload_ints(&positions), n, width, capacity);
    let got_k = cuda.download(&gk);
    // The reference: the valid rows written, the others untouched.
    let mut want_k = k.clone();
    for (s, &p) in positions.iter().enumerate().filter(|(s, _)| valid[*s]) {
        let at = (s * capacity + p as usize) * width;
        want_k[at..at + width].copy_from_slice(&new_k[s * width..(s + 1) * width]);
    }
    assert!(got_k == want_k, "scatter_rows with positions {positions:?} wrote outside the valid rows");
    let mut gout = cuda.zeros(n * heads * d);
    cuda.decode_attention_batch(&cuda.upload_activation(&q), &gk, &gk, &cuda.upload_ints(&positions), capacity, shape, &mut gout);
    let got = cuda.download(&gout);
    // The CPU reference of the valid sequences: the same caches, their positions.
    let mut cpu_pos = positions;
    for (p, ok) in cpu_pos.iter_mut().zip(valid) {
        if !ok {
            *p = 0;
        }
    }
    let (ck, mut cout) = (cpu.upload(&got_k), cpu.zeros(n * heads * d));
    cpu.decode_attention_batch(&cpu.upload(&q), &ck, &ck, &cpu.upload_ints(&cpu_pos), capacity, shape, &mut cout);
    let want = cpu.download(&cout);
    let row = heads * d;
    for s in 0..n {
        let (g, w) = (&got[s * row..(s + 1) * row], &want[s * row..(s + 1) * row]);
        if valid[s] {
            let err = rel_err(g, w);
            assert!(err <= Tolerances::bf16().attention, "sequence {s} (position {}): rel error {err:e}", positions[s]);
        } else {
            assert!(g.iter().all(|x| x.is_nan()), "sequence {s} at position {} (capacity {capacity}): output not NaN", positions[s]);
        }
    }
}

/// Prefill + 19 cached steps, fed the CPU's greedy tokens, against the CPU's
/// cached logits (which tests/generate.rs holds to the full recomputation).
/// Bound: GPU_LOGITS_TOL (see its comment).
pub fn cached_generation(cuda: &CudaBackend) {
    let mut worst = Vec::new();
    for case in CASES.iter().filter(|c| !generation::BF16_UNSTABLE_GENERATION.contains(c)) {
        let err = generation::teacher_forced_logits_rel_err(cuda, case);
        eprintln!("{case}: cached logits rel error {err:.2e} (bound {:.0e})", generation::GPU_LOGITS_TOL);
        worst.push((case, err));
    }
    for (case, err) in worst {
        assert!(err <= generation::GPU_LOGITS_TOL, "{case}: cached logits rel error {err:e} > {:e}", generation::GPU_LOGITS_TOL);
    }
}

/// cuda/nf4.cu against bf16(CPU dequantize), every value bit for bit (both
/// compute code·absmax, and nested_map·nested_absmax + offset, as
/// single-rounded f32 operations), plain and double-quantized.
pub fn nf4_bit_exact(cuda: &CudaBackend, shapes: &[[usize; 2]]) {
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(5);
    for nested in [false, true] {
        for &shape in shapes {
            let t = random_nf4(&mut rng, shape, nested);
            let want: Vec<u32> = cpu
                .weight_to_f32(&cpu.weight_from_nf4(&t).unwrap())
                .iter()
                .map(|&x| half::bf16::from_f32(x).to_f32().to_bits())
                .collect();
            let got: Vec<u32> = cuda.weight_to_f32(&cuda.weight_from_nf4(&t).unwrap()).iter().map(|x| x.to_bits()).collect();
            let diff = got.iter().zip(&want).filter(|(a, b)| a != b).count();
            eprintln!("nf4 dequantize {shape:?} nested={nested}: {diff} of {} values differ", want.len());
            assert_eq!(diff, 0, "{shape:?} nested={nested}: the GPU dequantization is not bit-exact");
        }
    }
}

/// The QLoRA fixture (4-bit base + adapter) against the CPU: the GPU's
/// dequantized weights are the CPU's rounded to bf16 (checked bit for bit by
/// nf4_bit_exact), so the model-level bounds are the bf16 ones.
pub fn qlora_parity(cuda: &CudaBackend) {
    use ferrotune::adapter::peft;
    use ferrotune::model::Model;
    use ferrotune::model::checkpoint::Checkpoint;
    let cpu = CpuBackend::new();
    let ckpt = Checkpoint::open(&fixture("qlora").join("bnb_model")).unwrap();
    let adapter = fixture("qlora").join("adapter");
    let mut m_cpu = Model::load(&cpu, &ckpt).unwrap();
    peft::load(&cpu, &mut m_cpu, &adapter).unwrap();
    let mut m_gpu = Model::load(cuda, &ckpt).unwrap();
    peft::load(cuda, &mut m_gpu, &adapter).unwrap();
    let (seqs, _) = Reference::load("qlora").sequences();
    let batch = Batch::from_sequences(&seqs, m_cpu.cfg.vocab).unwrap();
    let (l_cpu, g_cpu) = loss_and_grads(&cpu, &mut m_cpu, &batch);
    let (l_gpu, g_gpu) = loss_and_grads(cuda, &mut m_gpu, &batch);
    let loss_rel = (l_gpu - l_cpu).abs() / l_cpu;
    let grad_rel = rel_err(&g_gpu, &g_cpu);
    eprintln!("qlora: loss cpu {l_cpu:.6} gpu {l_gpu:.6} (rel {loss_rel:.2e}); LoRA gradients rel {grad_rel:.2e}");
    assert!(loss_rel <= GPU_LOSS_TOL, "loss rel error {loss_rel:e} > {GPU_LOSS_TOL:e}");
    assert!(grad_rel <= GPU_GRAD_TOL, "LoRA gradient rel error {grad_rel:e} > {GPU_GRAD_TOL:e}");
}
