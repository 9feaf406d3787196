//! The gated delta-net's CUDA kernels (cuda/delta_net.cu) on the SIMT
//! emulator against the CPU reference: forward (outputs and saved
//! chunk-start states), backward (every input gradient) and decode (outputs
//! and both carried states over three calls), with f32 and bf16 activations.
//!
//! Two packed sequences, 70 tokens (two chunks, the second partial) and 29;
//! 2 k-heads, 4 v-heads (two per k-head, so the q/k gradients are summed),
//! k_dim 8, v_dim 12 (not a multiple of 32), conv kernel 4.
//!
//! Tolerances: f32 activations give the CPU's numbers up to f32 rounding
//! (sums in another order, CUDA-side transcendentals): ‖got − want‖ /
//! ‖want‖ ≤ 1e-5 per tensor. bf16 activations: the same inputs (rounded to
//! bf16 for both backends) and f32 math, so each output differs from the
//! CPU's f32 value by its own bf16 rounding (≤ 2⁻⁹ relative) plus that f32
//! noise: |got − want| ≤ 2⁻⁸·|want| + 1e-5·max|want| per element.

#[path = "common/cuda_emu.rs"]
#[allow(dead_code)]
mod cuda_emu;

use ferrotune::backend::cpu::CpuBackend;
use ferrotune::backend::cuda::CudaBackend;
use ferrotune::backend::{Backend, DType, DeltaGrads, DeltaIn, DeltaShape, DeltaState, DeltaWeights, Varlen, WeightSource};

const SHAPE: DeltaShape = DeltaShape { n: 99, k_heads: 2, v_heads: 4, k_dim: 8, v_dim: 12, conv_kernel: 4, norm_eps: 1e-6 };
const CU: [i32; 3] = [0, 70, 99];

fn emulated_gpu() -> CudaBackend {
    cuda_emu::load().unwrap_or_else(|e| panic!("cannot build the SIMT emulator: {e}"));
    let be = CudaBackend::new(0).unwrap_or_else(|e| panic!("CudaBackend on the SIMT emulator: {e:#}"));
    assert!(be.info.name.contains("SIMT emulator"), "bound to a real driver ({}), not the emulator", be.info.name);
    be
}

/// A fixed pseudo-random stream (xorshift64*), uniform in [−scale, scale).
struct Rng(u64);
impl Rng {
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                self.0 ^= self.0 >> 12;
                self.0 ^= self.0 << 25;
                self.0 ^= self.0 >> 27;
                let u = (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 24) as f32;
                (2.0 * u - 1.0) * scale
            })
            .collect()
    }
}

fn bf16_round(v: Vec<f32>) -> Vec<f32> {
    v.into_iter().map(|x| half::bf16::from_f32(x).to_f32()).collect()
}

/// Host data of one call: inputs [qkv, z, b, a] and a gradient seed.
struct Data {
    inputs: [Vec<f32>; 4],
    dout: Vec<f32>,
}

fn data(rng: &mut Rng, s: DeltaShape, bf16: bool) -> Data {
    let (n, c, vw, hv) = (s.n, s.conv_dim(), s.value_width(), s.v_heads);
    let r = |v: Vec<f32>| if bf16 { bf16_round(v) } else { v };
    Data {
        inputs: [r(rng.vec(n * c, 1.0)), r(rng.vec(n * vw, 1.5)), r(rng.vec(n * hv, 2.0)), r(rng.vec(n * hv, 2.0))],
        dout: r(rng.vec(n * vw, 1.0)),
    }
}

/// The frozen weights (bf16 values, as the GPU stores them): conv, A_log, dt_bias, norm.
fn weights(rng: &mut Rng, s: DeltaShape) -> [Vec<f32>; 4] {
    let norm: Vec<f32> = rng.vec(s.v_dim, 0.3).into_iter().map(|x| 1.0 + x).collect();
    [bf16_round(rng.vec(s.conv_dim() * s.conv_kernel, 0.6)), bf16_round(rng.vec(s.v_heads, 1.0)), bf16_round(rng.vec(s.v_heads, 1.0)), bf16_round(norm)]
}

fn load<B: Backend>(be: &B, w: &[Vec<f32>; 4]) -> [B::Weight; 4] {
    w.each_ref().map(|v| {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        be.load_weight(&WeightSource { dtype: DType::F32, bytes: &bytes, numel: v.len() }).expect("weight")
    })
}

fn act<B: Backend>(be: &B, v: &[f32], bf16: bool) -> B::Buf {
    if bf16 { be.upload_activation(v) } else { be.upload(v) }
}

/// Forward then backward: [out, saved, dqkv, dz, db, da].
fn train_pass<B: Backend>(be: &B, w: &[Vec<f32>; 4], d: &Data, cu: &[i32], s: DeltaShape, bf16: bool) -> Vec<Vec<f32>> {
    let [conv, a_log, dt_bias, norm] = load(be, w);
    let wts = DeltaWeights { conv: &conv, a_log: &a_log, dt_bias: &dt_bias, norm: &norm };
    let [qkv, z, b, a] = d.inputs.each_ref().map(|v| act(be, v, bf16));
    let inp = DeltaIn { qkv: &qkv, z: &z, b: &b, a: &a };
    let cu_buf = be.upload_ints(cu);
    let seqs = Varlen { cu_seqlens: &cu_buf, n_seqs: cu.len() - 1 };
    let lens = cu.windows(2).map(|w| (w[1] - w[0]) as usize);
    let mut out = act(be, &vec![0.0; s.n * s.value_width()], bf16);
    let mut saved = be.zeros_f32(s.saved_len(lens));
    be.delta_net(inp, wts, seqs, s, &mut out, &mut saved);
    let dout = act(be, &d.dout, bf16);
    let mut g = [s.n * s.conv_dim(), s.n * s.value_width(), s.n * s.v_heads, s.n * s.v_heads].map(|len| act(be, &vec![0.0; len], bf16));
    let [gq, gz, gb, ga] = &mut g;
    be.delta_net_backward(&dout, inp, wts, seqs, s, &saved, DeltaGrads { qkv: gq, z: gz, b: gb, a: ga });
    let mut r = vec![be.download(&out), be.download(&saved)];
    r.extend(g.iter().map(|b| be.download(b)));
    r
}

/// Three decode calls from zero states: [out, conv state, rec state] after each.
fn decode_steps<B: Backend>(be: &B, w: &[Vec<f32>; 4], steps: &[(Data, Vec<i32>)], bf16: bool) -> Vec<Vec<f32>> {
    let [conv, a_log, dt_bias, norm] = load(be, w);
    let wts = DeltaWeights { conv: &conv, a_log: &a_log, dt_bias: &dt_bias, norm: &norm };
    let ns = steps[0].1.len() - 1;
    let mut conv_state = be.zeros_f32(ns * (SHAPE.conv_kernel - 1) * SHAPE.conv_dim());
    let mut rec = be.zeros_f32(ns * SHAPE.state_size());
    let mut r = Vec::new();
    for (d, cu) in steps {
        let s = DeltaShape { n: *cu.last().unwrap() as usize, ..SHAPE };
        let [qkv, z, b, a] = d.inputs.each_ref().map(|v| act(be, v, bf16));
        let cu_buf = be.upload_ints(cu);
        let seqs = Varlen { cu_seqlens: &cu_buf, n_seqs: ns };
        let mut out = act(be, &vec![0.0; s.n * s.value_width()], bf16);
        let st = DeltaState { conv: &mut conv_state, rec: &mut rec };
        be.delta_net_decode(DeltaIn { qkv: &qkv, z: &z, b: &b, a: &a }, wts, seqs, s, st, &mut out);
        r.extend([be.download(&out), be.download(&conv_state), be.download(&rec)]);
    }
    r
}

fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let num: f64 = got.iter().zip(want).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum();
    let den: f64 = want.iter().map(|&y| (y as f64).powi(2)).sum();
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

/// Checks every tensor; `f32_only` marks the ones kept in f32 whatever the activations (saved and carried states).
fn compare(what: &str, names: &[&str], got: &[Vec<f32>], want: &[Vec<f32>], bf16: bool, f32_only: &[bool]) {
    for (((name, g), w), &f32_kept) in names.iter().zip(got).zip(want).zip(f32_only) {
        if w.iter().all(|&x| x == 0.0) {
            // (No chunk begins after a sequence's first token: saved states are zero.)
            assert!(g.iter().all(|&x| x == 0.0), "{what} {name}: the CPU's are all zero, the GPU's are not");
            continue;
        }
        if bf16 && !f32_kept {
            let max = w.iter().fold(0.0f32, |m, &x| m.max(x.abs())) as f64;
            for (i, (&g, &w)) in g.iter().zip(w).enumerate() {
                let tol = (w as f64).abs() / 256.0 + 1e-5 * max;
                assert!(((g - w) as f64).abs() <= tol, "{what} {name}[{i}]: {g} vs the CPU's {w} (tolerance {tol:e})");
            }
        } else {
            // bf16 runs: states are f32 but computed from the same bf16 inputs.
            let e = rel_err(g, w);
            let tol = if bf16 { 2e-5 } else { 1e-5 };
            assert!(e <= tol, "{what} {name}: rel error {e:e} > {tol:e}");
            println!("{what} {name}: rel error {e:.2e}");
        }
    }
}

fn check(bf16: bool) {
    let gpu = emulated_gpu();
    let cpu = CpuBackend::new();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let w = weights(&mut rng, SHAPE);
    let d = data(&mut rng, SHAPE, bf16);
    let names = ["out", "saved", "d qkv", "d z", "d b", "d a"];
    let want = train_pass(&cpu, &w, &d, &CU, SHAPE, false);
    let got = train_pass(&gpu, &w, &d, &CU, SHAPE, bf16);
    let tag = if bf16 { "bf16 training pass" } else { "f32 training pass" };
    compare(tag, &names, &got, &want, bf16, &[false, true, false, false, false, false]);
    // Decode: 5 + 2 tokens (fewer than K − 1 in the second), then 1 + 1, then 3 + 0.
    let steps: Vec<(Data, Vec<i32>)> = [vec![0, 5, 7], vec![0, 1, 2], vec![0, 3, 3]]
        .into_iter()
        .map(|cu| (data(&mut rng, DeltaShape { n: cu[2] as usize, ..SHAPE }, bf16), cu))
        .collect();
    let want = decode_steps(&cpu, &w, &steps, false);
    let got = decode_steps(&gpu, &w, &steps, bf16);
    let names: Vec<String> = (1..=3).flat_map(|i| ["out", "conv state", "rec state"].map(|n| format!("step {i} {n}"))).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    // conv state holds the (bf16-valued) inputs themselves: exact either way.
    let kept = [false, true, true].repeat(3);
    compare(if bf16 { "bf16 decode" } else { "f32 decode" }, &names, &got, &want, bf16, &kept);
}

#[test]
fn delta_net_forward_backward_and_decode_match_the_cpu_with_f32_activations() {
    check(false);
}

#[test]
fn delta_net_forward_backward_and_decode_match_the_cpu_with_bf16_activations() {
    check(true);
}

/// Value heads wider than a warp (dk, dv = 40: two warps per scan block,
/// the per-warp partials summed across them) and more (sequence, v-head)
/// pairs (17 × 4) than the backward's 64 blocks, so blocks take several
/// pairs in turn; f32 activations, the same 1e-5 bound; and bit-identical
/// results under every thread schedule of the emulator.
#[test]
fn delta_net_with_two_warp_heads_and_more_pairs_than_backward_blocks_matches_the_cpu() {
    let gpu = emulated_gpu();
    let cpu = CpuBackend::new();
    let mut cu = vec![0i32];
    for i in 0..17 {
        cu.push(cu[i] + 1 + (i as i32 * 7) % 13);
    }
    let s = DeltaShape { n: *cu.last().unwrap() as usize, k_dim: 40, v_dim: 40, ..SHAPE };
    let mut rng = Rng(0x5151_2024_ABCD_0001);
    let w = weights(&mut rng, s);
    let d = data(&mut rng, s, false);
    let want = train_pass(&cpu, &w, &d, &cu, s, false);
    let got = train_pass(&gpu, &w, &d, &cu, s, false);
    compare("two-warp heads", &["out", "saved", "d qkv", "d z", "d b", "d a"], &got, &want, false, &[false; 6]);
    // Fixed reduction trees, no atomics: bit-identical under every thread
    // schedule (the emulator's schedule is per process; other tests'
    // kernels are schedule-independent too).
    for schedule in ["reverse", "random", "greedy", "greedy-last"] {
        cuda_emu::set_schedule(schedule);
        let again = train_pass(&gpu, &w, &d, &cu, s, false);
        cuda_emu::set_schedule("forward");
        for (a, b) in again.iter().zip(&got) {
            assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()), "results differ under the {schedule} schedule");
        }
    }
}
