//! Op-by-op conformance of a candidate backend against the reference (the
//! CPU backend): every op of the trait on random inputs, compared with a
//! stated tolerance. The GPU tests run it as CPU vs CUDA; here it also runs
//! CPU vs CPU so the harness itself is exercised without a GPU.
//!
//! Inputs are rounded to bf16 before use when the candidate stores
//! activations in bf16, so both backends see identical values and the
//! comparison measures only what the candidate's arithmetic and storage add.

use ferrotune::backend::{
    AdamW, AttnSaved, AttnShape, Backend, CeShape, Dropout, GluAct, GluShape, LoraGrads, LoraInputs, LoraShape, MatShape,
    NormShape, Qkv, QkvGrads, RopeShape, Varlen, WeightSource,
};
use ferrotune::backend::DType;
use ferrotune::util::rng::Rng;

mod batched_decode;
mod layer_variants;
mod sampling;

pub use batched_decode::DecodeBatch;

/// Largest allowed ‖candidate − reference‖ / ‖reference‖ per kind of output.
#[derive(Debug, Clone, Copy)]
pub struct Tolerances {
    /// Elementwise ops whose output is stored in the activation type.
    pub elementwise: f64,
    /// Matrix products (f32 accumulation) stored in the activation type.
    pub matmul: f64,
    /// Attention forward output.
    pub attention: f64,
    /// Attention gradients (P and dS are rounded to bf16 for the tensor-core
    /// products in a flash backward).
    pub attention_backward: f64,
    /// Outputs kept in f32 (inverse RMS, log-sum-exp, losses, LoRA
    /// gradients, AdamW state).
    pub f32_outputs: f64,
    /// Whether activation inputs are rounded to bf16 first.
    pub bf16_activations: bool,
}

impl Tolerances {
    /// Both backends compute and store in f32: only summation order differs.
    pub fn same_precision() -> Tolerances {
        Tolerances {
            elementwise: 1e-6,
            matmul: 1e-5,
            attention: 1e-5,
            attention_backward: 1e-5,
            f32_outputs: 1e-5,
            bf16_activations: false,
        }
    }

    /// A candidate storing activations in bf16 (8 significant bits): one
    /// rounding of the output costs at most 2^-9 ≈ 2e-3 relative per element,
    /// so the norm-relative error of a once-rounded output is ≤ 2e-3; 4e-3
    /// leaves room for f32 accumulation-order differences. Attention rounds
    /// P to bf16 before P·V (one more rounding: 8e-3), and its backward
    /// rounds P and dS before three products (2e-2). f32 outputs computed
    /// from identical bf16 inputs differ only by accumulation order, except
    /// LoRA gradients, whose A/B are rounded to bf16 for the tensor-core
    /// GEMM (4e-3, counted under `matmul`).
    pub fn bf16() -> Tolerances {
        Tolerances {
            elementwise: 4e-3,
            matmul: 4e-3,
            attention: 8e-3,
            attention_backward: 2e-2,
            f32_outputs: 1e-4,
            bf16_activations: true,
        }
    }
}

/// Realistic (GPU) or small (CPU) shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    Small,
    Realistic,
}

#[derive(Debug, Clone)]
pub struct Check {
    pub op: String,
    pub rel_err: f64,
    pub max_abs_err: f64,
    pub tolerance: f64,
}

impl Check {
    pub fn passed(&self) -> bool {
        self.rel_err.is_finite() && self.rel_err <= self.tolerance
    }
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<44} rel {:>9.2e}  max|Δ| {:>9.2e}  tol {:>8.1e}  {}",
            self.op,
            self.rel_err,
            self.max_abs_err,
            self.tolerance,
            if self.passed() { "ok" } else { "FAIL" }
        )
    }
}

fn round_bf16(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

/// One check: the norm-relative and largest absolute difference of `cand`
/// from `reference` (infinite when `cand` has a non-finite value or a
/// different length), against `tolerance`.
pub fn compare(op: String, cand: &[f32], reference: &[f32], tolerance: f64) -> Check {
    let (mut num, mut den, mut max_abs) = (0.0f64, 0.0f64, 0.0f64);
    let mut finite = cand.len() == reference.len();
    for (&c, &r) in cand.iter().zip(reference) {
        finite &= c.is_finite();
        let d = c as f64 - r as f64;
        num += d * d;
        den += (r as f64) * (r as f64);
        max_abs = max_abs.max(d.abs());
    }
    let rel = if !finite {
        f64::INFINITY
    } else if den == 0.0 {
        if num == 0.0 { 0.0 } else { f64::INFINITY }
    } else {
        (num / den).sqrt()
    };
    Check { op, rel_err: rel, max_abs_err: max_abs, tolerance }
}

/// Runs every op on both backends; returns one check per output.
pub struct Harness<'a, R: Backend, C: Backend> {
    pub reference: &'a R,
    pub candidate: &'a C,
    pub tol: Tolerances,
    pub checks: Vec<Check>,
    rng: Rng,
}

impl<'a, R: Backend, C: Backend> Harness<'a, R, C> {
    pub fn new(reference: &'a R, candidate: &'a C, tol: Tolerances, seed: u64) -> Self {
        Harness { reference, candidate, tol, checks: Vec::new(), rng: Rng::new(seed) }
    }

    fn data(&mut self, n: usize, amp: f32) -> Vec<f32> {
        let bf16 = self.tol.bf16_activations;
        (0..n)
            .map(|_| {
                let x = self.rng.uniform_range(-amp, amp);
                if bf16 { round_bf16(x) } else { x }
            })
            .collect()
    }

    /// An activation input on both backends.
    fn act(&mut self, n: usize, amp: f32) -> (R::Buf, C::Buf, Vec<f32>) {
        let d = self.data(n, amp);
        (self.reference.upload_activation(&d), self.candidate.upload_activation(&d), d)
    }

    /// An f32 input on both backends.
    fn f32s(&mut self, n: usize, amp: f32) -> (R::Buf, C::Buf, Vec<f32>) {
        let d = self.data(n, amp);
        (self.reference.upload(&d), self.candidate.upload(&d), d)
    }

    /// A frozen weight, given as bf16 bytes (how checkpoints and GPUs store them).
    fn weight(&mut self, n: usize, amp: f32) -> (R::Weight, C::Weight) {
        let bytes: Vec<u8> = (0..n)
            .flat_map(|_| half::bf16::from_f32(self.rng.uniform_range(-amp, amp)).to_bits().to_le_bytes())
            .collect();
        let src = WeightSource { dtype: DType::BF16, bytes: &bytes, numel: n };
        (
            self.reference.load_weight(&src).expect("reference weight"),
            self.candidate.load_weight(&src).expect("candidate weight"),
        )
    }

    fn ints(&self, v: &[i32]) -> (R::IntBuf, C::IntBuf) {
        (self.reference.upload_ints(v), self.candidate.upload_ints(v))
    }

    fn check(&mut self, op: String, r: &R::Buf, c: &C::Buf, tol: f64) {
        let (rv, cv) = (self.reference.download(r), self.candidate.download(c));
        self.checks.push(compare(op, &cv, &rv, tol));
    }

    pub fn run(&mut self, scale: Scale) -> &[Check] {
        let (n, hidden, inter, vocab) = match scale {
            Scale::Small => (37, 64, 96, 211),
            Scale::Realistic => (1024, 4096, 14336, 32000),
        };
        self.elementwise(n * hidden);
        self.embedding(n, hidden, vocab);
        self.linear(n, hidden, hidden / 4 * 3, true);
        self.linear(n, inter.min(4096), hidden, false);
        for nested in [false, true] {
            self.nf4_linear(n, hidden, hidden / 4 * 3, nested);
        }
        for dropout in [None, Some(Dropout { p: 0.1, seed: 99 })] {
            self.lora(n, hidden, hidden, 16, dropout);
        }
        self.rmsnorm(n, hidden);
        self.rope(n, 8, 128);
        self.layer_variants(n, hidden, inter);
        self.glu(n * inter);
        self.cross_entropy(n.min(256), vocab);
        self.sample_rows(n.min(16), vocab);
        self.adamw(4096 + 17);
        let seqs: Vec<usize> = match scale {
            Scale::Small => vec![13, 1, 23],
            Scale::Realistic => vec![1024, 700, 300, 24],
        };
        for (d, heads, kv, window) in [(64, 8, 2, None), (128, 4, 4, None), (128, 8, 2, Some(129)), (8, 4, 2, Some(5))] {
            self.attention(&seqs, heads, kv, d, window);
        }
        // Generation: one new token after a long cache, and a few at once.
        let decode_steps: [(usize, usize); 2] = match scale {
            Scale::Small => [(20, 1), (17, 3)],
            Scale::Realistic => [(2047, 1), (500, 16)],
        };
        for (d, heads, kv, window) in [(64, 8, 2, None), (128, 32, 8, Some(300)), (8, 4, 2, Some(5))] {
            for (past, new) in decode_steps {
                self.decode_attention(past, new, heads, kv, d, window);
            }
        }
        // Soft-capped scores (Gemma 2): the tensor-core kernels and the
        // generic one at Gemma's head_dim of 256, then decoding.
        for (d, heads, kv, window) in [(64, 4, 2, None), (128, 4, 2, Some(9)), (256, 2, 1, None)] {
            self.attention_capped(&seqs, heads, kv, d, window, ATTN_TEST_CAP);
        }
        for (d, heads, kv, window) in [(256, 4, 1, None), (64, 8, 2, Some(5))] {
            self.decode_attention_capped(decode_steps[1].0, decode_steps[1].1, heads, kv, d, window, ATTN_TEST_CAP);
        }
        // Batched decoding: sequences at the first and last cache rows and between.
        let (positions, capacity): (&[usize], usize) = match scale {
            Scale::Small => (&[0, 23, 9, 17], 24),
            Scale::Realistic => (&[0, 2047, 700, 1500, 31, 1], 2048),
        };
        let batch = DecodeBatch { positions, capacity };
        self.scatter_rows(positions, 2 * 64, capacity);
        for (d, heads, kv, window) in [(64, 8, 2, None), (128, 32, 8, Some(300)), (8, 4, 2, Some(5))] {
            self.decode_attention_batch(batch, heads, kv, d, window);
        }
        self.decode_attention_batch_capped(batch, 4, 1, 256, None, ATTN_TEST_CAP);
        &self.checks
    }

    fn elementwise(&mut self, len: usize) {
        let t = self.tol;
        let (mut ra, mut ca, _) = self.act(len, 1.0);
        let (rb, cb, _) = self.act(len, 1.0);
        self.reference.add_assign(&mut ra, &rb);
        self.candidate.add_assign(&mut ca, &cb);
        self.check("add_assign".into(), &ra, &ca, t.elementwise);
        self.reference.scale(&mut ra, 0.37);
        self.candidate.scale(&mut ca, 0.37);
        self.check("scale".into(), &ra, &ca, t.elementwise);
        // Logits of a few units against a cap of 2: the cap bites.
        let (mut rx, mut cx, _) = self.act(len, 6.0);
        self.reference.softcap(&mut rx, 2.0);
        self.candidate.softcap(&mut cx, 2.0);
        self.check("softcap".into(), &rx, &cx, t.elementwise);
        // Sums of squares of inputs both backends hold identically (a value
        // already rounded differently, like `ra` above, would measure the
        // rounding, not the reduction).
        let (rs, cs) = (self.reference.sum_sq(&rb), self.candidate.sum_sq(&cb));
        self.checks.push(compare("sum_sq".into(), &[cs as f32], &[rs as f32], t.f32_outputs));
        let (rc, cc, _) = self.act(len / 3 + 1, 1.0);
        let (rs, cs) = (self.reference.sum_sq_all(&[&rb, &rc]), self.candidate.sum_sq_all(&[&cb, &cc]));
        self.checks.push(compare("sum_sq_all".into(), &[cs as f32], &[rs as f32], t.f32_outputs));
        let mut rd = self.reference.zeros_like(&rb);
        let mut cd = self.candidate.zeros_like(&cb);
        self.reference.copy_slice(&rb, 5, &mut rd, 11, len / 2);
        self.candidate.copy_slice(&cb, 5, &mut cd, 11, len / 2);
        self.check("copy_slice".into(), &rd, &cd, 0.0);
        self.reference.fill(&mut rd, 0.25);
        self.candidate.fill(&mut cd, 0.25);
        self.check("fill".into(), &rd, &cd, 0.0);
    }

    fn embedding(&mut self, n: usize, hidden: usize, vocab: usize) {
        let (rt, ct) = self.weight(vocab * hidden, 1.0);
        let ids: Vec<i32> = (0..n).map(|i| ((i * 7919) % vocab) as i32).collect();
        let (ri, ci) = self.ints(&ids);
        let mut ro = self.reference.zeros(n * hidden);
        let mut co = self.candidate.zeros(n * hidden);
        self.reference.embedding(&rt, &ri, &mut ro, n, hidden);
        self.candidate.embedding(&ct, &ci, &mut co, n, hidden);
        // A gather of bf16 values into bf16 or f32 storage is exact.
        self.check("embedding".into(), &ro, &co, 0.0);
    }

    fn linear(&mut self, m: usize, k: usize, n: usize, bias: bool) {
        let t = self.tol;
        let (rx, cx, _) = self.act(m * k, 1.0);
        let (rw, cw) = self.weight(n * k, 1.0 / (k as f32).sqrt());
        let rb_cb = bias.then(|| self.weight(n, 0.5));
        let mut ry = self.reference.zeros(m * n);
        let mut cy = self.candidate.zeros(m * n);
        self.reference.linear(&rx, &rw, rb_cb.as_ref().map(|b| &b.0), &mut ry, MatShape { m, k, n });
        self.candidate.linear(&cx, &cw, rb_cb.as_ref().map(|b| &b.1), &mut cy, MatShape { m, k, n });
        self.check(format!("linear {m}x{k}->{n} bias={bias}"), &ry, &cy, t.matmul);
        let (rdy, cdy, _) = self.act(m * n, 1.0);
        for acc in [false, true] {
            let (mut rdx, mut cdx, _) = self.act(m * k, 1.0);
            self.reference.linear_backward_input(&rdy, &rw, &mut rdx, MatShape { m, k, n }, acc);
            self.candidate.linear_backward_input(&cdy, &cw, &mut cdx, MatShape { m, k, n }, acc);
            self.check(format!("linear_backward_input {m}x{n}->{k} acc={acc}"), &rdx, &cdx, t.matmul);
        }
    }

    /// `linear` and `linear_backward_input` with an NF4 weight (plain or
    /// double-quantized scales). The reference dequantizes to f32, a bf16
    /// candidate to bf16 (one more rounding of W: within `matmul`).
    pub fn nf4_linear(&mut self, m: usize, k: usize, n: usize, nested: bool) {
        let t = self.tol;
        let q = random_nf4(&mut self.rng, [n, k], nested);
        let rw = self.reference.weight_from_nf4(&q).expect("reference NF4 weight");
        let cw = self.candidate.weight_from_nf4(&q).expect("candidate NF4 weight");
        let tag = format!("{m}x{k}->{n} nested={nested}");
        let (rx, cx, _) = self.act(m * k, 1.0);
        let mut ry = self.reference.zeros(m * n);
        let mut cy = self.candidate.zeros(m * n);
        self.reference.linear(&rx, &rw, None, &mut ry, MatShape { m, k, n });
        self.candidate.linear(&cx, &cw, None, &mut cy, MatShape { m, k, n });
        self.check(format!("linear nf4 {tag}"), &ry, &cy, t.matmul);
        let (rdy, cdy, _) = self.act(m * n, 1.0);
        for acc in [false, true] {
            let (mut rdx, mut cdx, _) = self.act(m * k, 1.0);
            self.reference.linear_backward_input(&rdy, &rw, &mut rdx, MatShape { m, k, n }, acc);
            self.candidate.linear_backward_input(&cdy, &cw, &mut cdx, MatShape { m, k, n }, acc);
            self.check(format!("linear_backward_input nf4 {tag} acc={acc}"), &rdx, &cdx, t.matmul);
        }
    }

    pub fn lora(&mut self, m: usize, k: usize, n: usize, r: usize, dropout: Option<Dropout>) {
        let t = self.tol;
        let tag = if dropout.is_some() { " dropout" } else { "" };
        let (rx, cx, _) = self.act(m * k, 1.0);
        let (ra, ca, _) = self.f32s(r * k, 1.0 / (k as f32).sqrt());
        let (rb, cb, _) = self.f32s(n * r, 0.1);
        let (mut ry, mut cy, _) = self.act(m * n, 1.0);
        let mut rxa = self.reference.zeros(m * r);
        let mut cxa = self.candidate.zeros(m * r);
        self.reference.lora_forward(LoraInputs { x: &rx, a: &ra, b: &rb }, &mut rxa, &mut ry, LoraShape { m, k, n, r, scale: 2.0, dropout });
        self.candidate.lora_forward(LoraInputs { x: &cx, a: &ca, b: &cb }, &mut cxa, &mut cy, LoraShape { m, k, n, r, scale: 2.0, dropout });
        self.check(format!("lora_forward xa{tag}"), &rxa, &cxa, t.matmul);
        self.check(format!("lora_forward y{tag}"), &ry, &cy, t.matmul);
        let (rdy, cdy, _) = self.act(m * n, 1.0);
        let (mut rdx, mut cdx, _) = self.act(m * k, 1.0);
        let (mut rda, mut cda, _) = self.f32s(r * k, 0.01);
        let (mut rdb, mut cdb, _) = self.f32s(n * r, 0.01);
        self.reference.lora_backward(&rdy, LoraInputs { x: &rx, a: &ra, b: &rb }, &rxa, LoraGrads { dx: &mut rdx, da: &mut rda, db: &mut rdb }, LoraShape { m, k, n, r, scale: 2.0, dropout });
        // The candidate uses its own saved xa, as in a real step.
        self.candidate.lora_backward(&cdy, LoraInputs { x: &cx, a: &ca, b: &cb }, &cxa, LoraGrads { dx: &mut cdx, da: &mut cda, db: &mut cdb }, LoraShape { m, k, n, r, scale: 2.0, dropout });
        self.check(format!("lora_backward dx{tag}"), &rdx, &cdx, t.matmul);
        self.check(format!("lora_backward dA{tag}"), &rda, &cda, t.matmul);
        self.check(format!("lora_backward dB{tag}"), &rdb, &cdb, t.matmul);
    }

    fn rmsnorm(&mut self, rows: usize, hidden: usize) {
        let t = self.tol;
        let (rx, cx, _) = self.act(rows * hidden, 2.0);
        let (rw, cw) = self.weight(hidden, 1.5);
        let mut ry = self.reference.zeros(rows * hidden);
        let mut cy = self.candidate.zeros(rows * hidden);
        let mut rinv = self.reference.zeros_f32(rows);
        let mut cinv = self.candidate.zeros_f32(rows);
        self.reference.rmsnorm(&rx, &rw, &mut ry, &mut rinv, NormShape::new(rows, hidden), 1e-5);
        self.candidate.rmsnorm(&cx, &cw, &mut cy, &mut cinv, NormShape::new(rows, hidden), 1e-5);
        self.check("rmsnorm y".into(), &ry, &cy, t.elementwise);
        self.check("rmsnorm inv_rms".into(), &rinv, &cinv, t.f32_outputs);
        let (rdy, cdy, _) = self.act(rows * hidden, 1.0);
        let (mut rdx, mut cdx, _) = self.act(rows * hidden, 1.0);
        self.reference.rmsnorm_backward(&rdy, &rx, &rw, &rinv, &mut rdx, NormShape::new(rows, hidden));
        self.candidate.rmsnorm_backward(&cdy, &cx, &cw, &cinv, &mut cdx, NormShape::new(rows, hidden));
        self.check("rmsnorm_backward dx (accumulated)".into(), &rdx, &cdx, t.elementwise);
    }

    fn rope(&mut self, n: usize, heads: usize, d: usize) {
        let t = self.tol;
        let inv: Vec<f32> = (0..d / 2).map(|i| 1.0 / 500000f32.powf(2.0 * i as f32 / d as f32)).collect();
        let (rf, cf) = (self.reference.upload(&inv), self.candidate.upload(&inv));
        // Packed rows: positions restart, and reach large values.
        let pos: Vec<i32> = (0..n).map(|i| if i < n / 2 { i as i32 } else { (i * 97 % 8192) as i32 }).collect();
        let (rp, cp) = self.ints(&pos);
        let (mut rx, mut cx, _) = self.act(n * heads * d, 1.0);
        self.reference.rope(&mut rx, &rp, &rf, RopeShape::full(n, heads, d));
        self.candidate.rope(&mut cx, &cp, &cf, RopeShape::full(n, heads, d));
        self.check("rope".into(), &rx, &cx, t.elementwise);
        self.reference.rope_backward(&mut rx, &rp, &rf, RopeShape::full(n, heads, d));
        self.candidate.rope_backward(&mut cx, &cp, &cf, RopeShape::full(n, heads, d));
        self.check("rope_backward (of rope)".into(), &rx, &cx, t.elementwise);
    }

    fn glu(&mut self, len: usize) {
        let t = self.tol;
        let shape = GluShape { len, act: GluAct::Silu };
        let (rg, cg, _) = self.act(len, 4.0);
        let (ru, cu, _) = self.act(len, 2.0);
        let mut ro = self.reference.zeros(len);
        let mut co = self.candidate.zeros(len);
        self.reference.glu(&rg, &ru, &mut ro, shape);
        self.candidate.glu(&cg, &cu, &mut co, shape);
        self.check("swiglu".into(), &ro, &co, t.elementwise);
        let (rd, cd, _) = self.act(len, 1.0);
        let (mut rdg, mut cdg) = (self.reference.zeros(len), self.candidate.zeros(len));
        let (mut rdu, mut cdu) = (self.reference.zeros(len), self.candidate.zeros(len));
        self.reference.glu_backward(&rd, &rg, &ru, &mut rdg, &mut rdu, shape);
        self.candidate.glu_backward(&cd, &cg, &cu, &mut cdg, &mut cdu, shape);
        self.check("swiglu_backward dgate".into(), &rdg, &cdg, t.elementwise);
        self.check("swiglu_backward dup".into(), &rdu, &cdu, t.elementwise);
    }

    fn cross_entropy(&mut self, rows: usize, vocab: usize) {
        let t = self.tol;
        let targets: Vec<i32> = (0..rows).map(|i| if i % 5 == 3 { -100 } else { ((i * 31) % vocab) as i32 }).collect();
        let (rt, ct) = self.ints(&targets);
        // Uncapped, and capped at 5 (logits up to 8: the cap bites).
        for (softcap, tag) in [(None, ""), (Some(5.0f32), " softcap=5")] {
            for grad in [None, Some(0.01f32)] {
                let (mut rl, mut cl, _) = self.f32s(rows * vocab, 8.0);
                let mut rloss = self.reference.zeros_f32(rows);
                let mut closs = self.candidate.zeros_f32(rows);
                self.reference.cross_entropy(&mut rl, &rt, &mut rloss, CeShape { rows, vocab, softcap }, grad);
                self.candidate.cross_entropy(&mut cl, &ct, &mut closs, CeShape { rows, vocab, softcap }, grad);
                self.check(format!("cross_entropy losses grad={}{tag}", grad.is_some()), &rloss, &closs, t.f32_outputs);
                if grad.is_some() {
                    self.check(format!("cross_entropy dlogits{tag}"), &rl, &cl, t.f32_outputs);
                }
            }
        }
    }

    fn adamw(&mut self, len: usize) {
        let t = self.tol;
        let (mut rp, mut cp, _) = self.f32s(len, 1.0);
        let (mut rm, mut cm) = (self.reference.zeros_f32(len), self.candidate.zeros_f32(len));
        let (mut rv, mut cv) = (self.reference.zeros_f32(len), self.candidate.zeros_f32(len));
        for step in 1..=3 {
            let (rg, cg, _) = self.f32s(len, 0.1);
            let hp = AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, step };
            self.reference.adamw(&mut rp, &rg, &mut rm, &mut rv, hp);
            self.candidate.adamw(&mut cp, &cg, &mut cm, &mut cv, hp);
        }
        self.check("adamw param (3 steps)".into(), &rp, &cp, t.f32_outputs);
        self.check("adamw exp_avg".into(), &rm, &cm, t.f32_outputs);
        self.check("adamw exp_avg_sq".into(), &rv, &cv, t.f32_outputs);
    }

    pub fn attention(&mut self, seqs: &[usize], heads: usize, kv: usize, d: usize, window: Option<usize>) {
        self.attention_with(seqs, heads, kv, d, window, None);
    }

    /// `attention` with the scores soft-capped at `cap` (forward and
    /// backward). Panics if the inputs are such that the reference's output
    /// hardly moves with the cap (the check would then prove nothing).
    pub fn attention_capped(&mut self, seqs: &[usize], heads: usize, kv: usize, d: usize, window: Option<usize>, cap: f32) {
        self.attention_with(seqs, heads, kv, d, window, Some(cap));
    }

    fn attention_with(&mut self, seqs: &[usize], heads: usize, kv: usize, d: usize, window: Option<usize>, softcap: Option<f32>) {
        let t = self.tol;
        let n: usize = seqs.iter().sum();
        let mut cu = vec![0i32];
        for s in seqs {
            cu.push(cu.last().unwrap() + *s as i32);
        }
        let (rcu, ccu) = self.ints(&cu);
        let max_seqlen = seqs.iter().copied().max().unwrap_or(0);
        let shape = AttnShape { n, n_heads: heads, n_kv_heads: kv, head_dim: d, window, scale: 1.0 / (d as f32).sqrt(), softcap, max_seqlen };
        let (rq, cq, _) = self.act(n * heads * d, 2.0);
        let (rk, ck, _) = self.act(n * kv * d, 2.0);
        let (rv, cv, _) = self.act(n * kv * d, 1.0);
        let mut ro = self.reference.zeros(n * heads * d);
        let mut co = self.candidate.zeros(n * heads * d);
        let mut rl = self.reference.zeros_f32(heads * n);
        let mut cl = self.candidate.zeros_f32(heads * n);
        let ns = seqs.len();
        self.reference.attention(Qkv { q: &rq, k: &rk, v: &rv }, Varlen { cu_seqlens: &rcu, n_seqs: ns }, shape, &mut ro, &mut rl);
        self.candidate.attention(Qkv { q: &cq, k: &ck, v: &cv }, Varlen { cu_seqlens: &ccu, n_seqs: ns }, shape, &mut co, &mut cl);
        if softcap.is_some() {
            let mut uo = self.reference.zeros(n * heads * d);
            let mut ul = self.reference.zeros_f32(heads * n);
            let plain = AttnShape { softcap: None, ..shape };
            self.reference.attention(Qkv { q: &rq, k: &rk, v: &rv }, Varlen { cu_seqlens: &rcu, n_seqs: ns }, plain, &mut uo, &mut ul);
            self.assert_cap_bites(&uo, &ro, "attention");
        }
        let cap_tag = softcap.map(|c| format!(" softcap={c}")).unwrap_or_default();
        let tag = format!("d={d} h={heads}/{kv} window={window:?}{cap_tag}");
        self.check(format!("attention out {tag}"), &ro, &co, t.attention);
        self.check(format!("attention lse {tag}"), &rl, &cl, t.f32_outputs);
        let (rdo, cdo, _) = self.act(n * heads * d, 1.0);
        let (mut rdq, mut cdq) = (self.reference.zeros(n * heads * d), self.candidate.zeros(n * heads * d));
        let (mut rdk, mut cdk) = (self.reference.zeros(n * kv * d), self.candidate.zeros(n * kv * d));
        let (mut rdv, mut cdv) = (self.reference.zeros(n * kv * d), self.candidate.zeros(n * kv * d));
        self.reference.attention_backward(&rdo, Qkv { q: &rq, k: &rk, v: &rv }, AttnSaved { out: &ro, lse: &rl }, Varlen { cu_seqlens: &rcu, n_seqs: ns }, shape, QkvGrads { dq: &mut rdq, dk: &mut rdk, dv: &mut rdv });
        // The candidate uses its own forward output and lse, as in a real step.
        self.candidate.attention_backward(&cdo, Qkv { q: &cq, k: &ck, v: &cv }, AttnSaved { out: &co, lse: &cl }, Varlen { cu_seqlens: &ccu, n_seqs: ns }, shape, QkvGrads { dq: &mut cdq, dk: &mut cdk, dv: &mut cdv });
        self.check(format!("attention_backward dq {tag}"), &rdq, &cdq, t.attention_backward);
        self.check(format!("attention_backward dk {tag}"), &rdk, &cdk, t.attention_backward);
        self.check(format!("attention_backward dv {tag}"), &rdv, &cdv, t.attention_backward);
    }

    /// decode_attention of `new` tokens after `past` cached ones (also run
    /// by `run`; public for wider shape sweeps).
    pub fn decode_attention(&mut self, past: usize, new: usize, heads: usize, kv: usize, d: usize, window: Option<usize>) {
        self.decode_attention_with(past, new, heads, kv, d, window, None);
    }

    /// `decode_attention` with the scores soft-capped at `cap` (panics, as
    /// `attention_capped`, if the cap hardly moves the reference).
    #[allow(clippy::too_many_arguments)]
    pub fn decode_attention_capped(&mut self, past: usize, new: usize, heads: usize, kv: usize, d: usize, window: Option<usize>, cap: f32) {
        self.decode_attention_with(past, new, heads, kv, d, window, Some(cap));
    }

    #[allow(clippy::too_many_arguments)]
    fn decode_attention_with(&mut self, past: usize, new: usize, heads: usize, kv: usize, d: usize, window: Option<usize>, softcap: Option<f32>) {
        let t = self.tol;
        let shape = AttnShape { n: new, n_heads: heads, n_kv_heads: kv, head_dim: d, window, scale: 1.0 / (d as f32).sqrt(), softcap, max_seqlen: 0 };
        // A cache with room to spare (capacity past + new + 5), as a generation loop holds it.
        let cap = past + new + 5;
        let (rq, cq, _) = self.act(new * heads * d, 2.0);
        let (rk, ck, _) = self.act(cap * kv * d, 2.0);
        let (rv, cv, _) = self.act(cap * kv * d, 1.0);
        let mut ro = self.reference.zeros(new * heads * d);
        let mut co = self.candidate.zeros(new * heads * d);
        self.reference.decode_attention(&rq, &rk, &rv, past, shape, &mut ro);
        self.candidate.decode_attention(&cq, &ck, &cv, past, shape, &mut co);
        if softcap.is_some() {
            let mut uo = self.reference.zeros(new * heads * d);
            self.reference.decode_attention(&rq, &rk, &rv, past, AttnShape { softcap: None, ..shape }, &mut uo);
            self.assert_cap_bites(&uo, &ro, "decode_attention");
        }
        let cap_tag = softcap.map(|c| format!(" softcap={c}")).unwrap_or_default();
        let tag = format!("past={past} new={new} d={d} h={heads}/{kv} window={window:?}{cap_tag}");
        self.check(format!("decode_attention {tag}"), &ro, &co, t.attention);
    }

    /// A capped check proves something only if the cap moves the output by
    /// far more than the tolerance: the reference's uncapped and capped
    /// outputs must differ by ten times it.
    fn assert_cap_bites(&self, uncapped: &R::Buf, capped: &R::Buf, op: &str) {
        let (u, c) = (self.reference.download(uncapped), self.reference.download(capped));
        let moved = compare(op.into(), &u, &c, 0.0).rel_err;
        assert!(moved > 10.0 * self.tol.attention, "{op}: the soft-cap moves the output by only {moved:e}; use a smaller cap");
    }
}

/// The attention soft-cap of the capped checks: against scores of std ~1.3
/// (q, k of amplitude 2, scale 1/√d), a cap of 2 bends most of them.
pub const ATTN_TEST_CAP: f32 = 2.0;

/// A random NF4 tensor of `shape` in bitsandbytes' layout (blocks of 64,
/// random codes; scales like those of a weight with std ~1/√in; with
/// `nested`, 8-bit scale codes over a 256-entry map in blocks of 256 plus an
/// offset), for checking backends against each other. Not a quantization of
/// anything: `quant::nf4::quantize` makes real ones.
pub fn random_nf4(rng: &mut Rng, shape: [usize; 2], nested: bool) -> ferrotune::quant::nf4::Nf4Tensor {
    use ferrotune::quant::nf4::{Absmax, BLOCKSIZE, NESTED_BLOCKSIZE, NF4_CODE, Nf4Tensor};
    let n = shape[0] * shape[1];
    let blocks = n.div_ceil(BLOCKSIZE);
    let packed = (0..n.div_ceil(2)).map(|_| (rng.next_u64() & 0xff) as u8).collect();
    let scale = 2.5 / (shape[1].max(1) as f32).sqrt();
    let absmax = if nested {
        Absmax::Nested {
            codes: (0..blocks).map(|_| (rng.next_u64() & 0xff) as u8).collect(),
            nested_absmax: (0..blocks.div_ceil(NESTED_BLOCKSIZE)).map(|_| rng.uniform_range(0.2, 0.4) * scale).collect(),
            nested_map: (0..256).map(|i| (i as f32 - 127.5) / 127.5).collect(),
            offset: scale,
            nested_blocksize: NESTED_BLOCKSIZE,
        }
    } else {
        Absmax::Plain((0..blocks).map(|_| rng.uniform_range(0.7, 1.3) * scale).collect())
    };
    Nf4Tensor { shape, blocksize: BLOCKSIZE, packed, absmax, code: NF4_CODE }
}
