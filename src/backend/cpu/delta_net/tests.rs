//! The forward and backward against transformers' Qwen3_5GatedDeltaNet (when
//! a Python with torch and transformers is at hand), the chunked form
//! against the recurrence, the backward against f64 finite differences,
//! decode against forward, and packing / thread-count independence (bitwise).

use super::super::test_util::{Rng, assert_bits_eq, assert_close, dot64, fd_grad, to64, with_threads};
use super::*;

/// One random problem; the inputs are packed sequences of `lens` tokens.
#[derive(Clone)]
struct Case {
    s: DeltaNetShape,
    cu: Vec<i32>,
    qkv: Vec<f32>,
    z: Vec<f32>,
    b: Vec<f32>,
    a: Vec<f32>,
    conv: Vec<f32>,
    a_log: Vec<f32>,
    dt_bias: Vec<f32>,
    norm: Vec<f32>,
}

fn cu_of(lens: &[usize]) -> Vec<i32> {
    std::iter::once(0).chain(lens.iter().scan(0, |acc, &l| {
        *acc += l as i32;
        Some(*acc)
    }))
    .collect()
}

impl Case {
    fn new(seed: u64, lens: &[usize], [hk, hv, dk, dv, k]: [usize; 5]) -> Case {
        let mut rng = Rng::new(seed);
        let n = lens.iter().sum();
        let s = DeltaNetShape { n, k_heads: hk, v_heads: hv, k_dim: dk, v_dim: dv, conv_kernel: k, norm_eps: 1e-6 };
        let c = s.conv_dim();
        Case {
            s,
            cu: cu_of(lens),
            qkv: rng.vec(n * c, 1.5),
            z: rng.vec(n * hv * dv, 2.0),
            b: rng.vec(n * hv, 3.0),
            a: rng.vec(n * hv, 2.0),
            conv: rng.vec(c * k, 0.8),
            // Decays e^g from about 0.3 to 0.95 per token: long memory and short.
            a_log: rng.vec(hv, 1.0).iter().map(|v| v - 1.5).collect(),
            dt_bias: rng.vec(hv, 1.0),
            norm: rng.vec(dv, 0.3).iter().map(|v| 1.0 + v).collect(),
        }
    }

    fn inputs(&self) -> DeltaNetInputs<'_> {
        DeltaNetInputs { qkv: &self.qkv, z: &self.z, b: &self.b, a: &self.a }
    }

    fn weights(&self) -> DeltaNetWeights<'_> {
        DeltaNetWeights { conv: &self.conv, a_log: &self.a_log, dt_bias: &self.dt_bias, norm: &self.norm }
    }

    /// (out, saved) of the public f32 forward.
    fn forward(&self) -> (Vec<f32>, Vec<f32>) {
        let mut out = vec![f32::NAN; self.s.n * self.s.value_width()];
        let mut saved = vec![f32::NAN; saved_states_len(&self.cu, &self.s)];
        forward(self.inputs(), self.weights(), &self.cu, &self.s, &mut out, &mut saved);
        (out, saved)
    }

    /// The public f32 backward: [dqkv, dz, db, da].
    fn backward(&self, dout: &[f32], saved: &[f32]) -> [Vec<f32>; 4] {
        let nan = |v: &Vec<f32>| vec![f32::NAN; v.len()];
        let (mut q, mut z, mut b, mut a) = (nan(&self.qkv), nan(&self.z), nan(&self.b), nan(&self.a));
        let grads = DeltaNetGrads { qkv: &mut q, z: &mut z, b: &mut b, a: &mut a };
        backward(dout, self.inputs(), self.weights(), &self.cu, &self.s, saved, grads);
        [q, z, b, a]
    }

    /// The inputs concatenated: qkv | z | b | a.
    fn packed_inputs(&self) -> Vec<f32> {
        [&self.qkv, &self.z, &self.b, &self.a].into_iter().flatten().copied().collect()
    }

    /// Sequence `i` alone.
    fn alone(&self, i: usize) -> Case {
        let (t0, t1) = (self.cu[i] as usize, self.cu[i + 1] as usize);
        let rows = |v: &[f32]| v[t0 * (v.len() / self.s.n)..t1 * (v.len() / self.s.n)].to_vec();
        let s = DeltaNetShape { n: t1 - t0, ..self.s };
        Case { s, cu: vec![0, (t1 - t0) as i32], qkv: rows(&self.qkv), z: rows(&self.z), b: rows(&self.b), a: rows(&self.a), ..self.clone() }
    }

    /// The same math in f64 on packed inputs `x` (qkv | z | b | a): the
    /// forward's out, or with `dout` the backward's packed gradients.
    fn eval64(&self, x: &[f64], dout: Option<&[f64]>) -> Vec<f64> {
        let geo = Geo::new("test", &self.cu, &self.s);
        let (n, c, vw, hv) = (self.s.n, geo.c, self.s.value_width(), self.s.v_heads);
        let (qkv, rest) = x.split_at(n * c);
        let (z, rest) = rest.split_at(n * vw);
        let (b, a) = rest.split_at(n * hv);
        let (conv, a_log, dt_bias, norm) = (to64(&self.conv), to64(&self.a_log), to64(&self.dt_bias), to64(&self.norm));
        let io = Io { qkv, z, b, a, conv: &conv, a_log: &a_log, dt_bias: &dt_bias, norm: &norm, eps: self.s.norm_eps as f64 };
        let mut states = vec![0.0; geo.seqs.len() * self.s.state_size()];
        let (mut out, mut saved) = (vec![0.0; n * vw], vec![0.0; geo.saved_len()]);
        run(&geo, &io, None, &mut states, &mut out, Some(&mut saved));
        let Some(dout) = dout else { return out };
        let mut gr = vec![0.0; x.len()];
        let (gq, rest) = gr.split_at_mut(n * c);
        let (gz, rest) = rest.split_at_mut(n * vw);
        let (gb, ga) = rest.split_at_mut(n * hv);
        backward::backward_impl(&geo, &io, dout, &saved, Grads { qkv: gq, z: gz, b: gb, a: ga });
        gr
    }
}

/// Max |got − want| / max(max |want|, 1e-3).
fn rel_err(got: &[f64], want: &[f64]) -> f64 {
    let mag = want.iter().fold(1e-3f64, |m, w| m.max(w.abs()));
    got.iter().zip(want).fold(0.0f64, |m, (g, w)| m.max((g - w).abs())) / mag
}

#[test]
fn chunked_core_matches_the_recurrence() {
    let (len, dk, dv) = (150, 8, 12);
    let mut rng = Rng::new(11);
    let unit_rows = |rng: &mut Rng, scale: f32| -> Vec<f32> {
        let mut x = rng.vec(len * dk, 1.0);
        for row in x.chunks_exact_mut(dk) {
            let inv = 1.0 / row.iter().map(|v| v * v).sum::<f32>().sqrt();
            row.iter_mut().for_each(|v| *v *= inv * scale);
        }
        x
    };
    let q = unit_rows(&mut rng, (dk as f32).powf(-0.5));
    let k = unit_rows(&mut rng, 1.0);
    let v = rng.vec(len * dv, 1.0);
    let g: Vec<f32> = rng.vec(len, 1.0).iter().map(|u| -0.3 * (1.0 + u)).collect();
    let beta: Vec<f32> = rng.vec(len, 3.0).iter().map(|&u| sigmoid(u)).collect();
    // The recurrence in f64 from the same f32 inputs.
    let (q64, k64, v64) = (to64(&q), to64(&k), to64(&v));
    let (mut st, mut kv, mut u) = (vec![0.0f64; dk * dv], vec![0.0; dv], vec![0.0; dv]);
    let mut want = vec![0.0f64; len * dv];
    for (t, o) in want.chunks_exact_mut(dv).enumerate() {
        let x = Tok { q: &q64[t * dk..][..dk], k: &k64[t * dk..][..dk], v: &v64[t * dv..][..dv], z: &[], g: g[t] as f64, beta: beta[t] as f64 };
        decay_read(&mut st, &x, &mut kv, &mut u);
        write_read(&mut st, &x, &u, o);
    }
    // Three chunks of 64 (the last partial), and 22 of 7, against the exact
    // recurrence: outputs are O(1) and the f32 chunked form's rounding
    // (~6e-8 per operation, compounded through the triangular solve and
    // 150 steps) stays near 1e-7, so 1e-5 absolute leaves ample margin,
    // while a wrong term in the algebra is off by O(0.1).
    for chunk in [64, 7] {
        let mut out = vec![f32::NAN; len * dv];
        chunked_core(&q, &k, &v, &g, &beta, len, dk, dv, chunk, &mut out);
        let err = out.iter().zip(&want).fold(0.0f64, |m, (&o, &w)| m.max((o as f64 - w).abs()));
        assert!(err <= 1e-5, "chunk {chunk}: max abs diff {err:e} vs the recurrence");
    }
}

#[test]
fn backward_matches_finite_differences() {
    // Two sequences, one spanning two chunks; head 1's softplus argument sits
    // above torch's threshold of 20 (the linear branch, slope 1).
    let mut case = Case::new(21, &[70, 9], [1, 2, 4, 4, 4]);
    case.dt_bias[1] = 25.0;
    case.a_log[1] = -3.0;
    let n = case.s.n;
    let r = Rng::new(22).vec(n * case.s.value_width(), 1.0);
    let (x, r64) = (to64(&case.packed_inputs()), to64(&r));
    // Central differences of L = Σ out·r in f64, step 1e-5: truncation
    // ~h²·L''' and rounding ~1e-16·|L|/h are both below 1e-9.
    let fd = fd_grad(&x, 1e-5, |x| dot64(&case.eval64(x, None), &r64));
    // The same code in f64 is the exact derivative: agreement to 1e-7 of the
    // largest gradient checks every term of the derivation.
    let exact = case.eval64(&x, Some(&r64));
    let err = rel_err(&exact, &fd);
    assert!(err <= 1e-7, "f64 backward vs finite differences: relative error {err:e}");
    // The public f32 path: its forward agrees with the f64 one, and each
    // gradient with the finite differences, to f32 rounding accumulated over
    // 70 steps of the recurrence and its reverse (1e-5 relative).
    let (out, saved) = case.forward();
    assert_close("out", &out, &case.eval64(&x, None), 1e-5);
    let grads = case.backward(&r, &saved);
    let mut off = 0;
    for (name, g) in ["dqkv", "dz", "db", "da"].iter().zip(&grads) {
        assert_close(name, g, &fd[off..off + g.len()], 1e-5);
        off += g.len();
    }
}

#[test]
fn decode_continues_forward_bit_for_bit() {
    // A: a 40-token prefill then 30 one-token steps; B starts in the same
    // prefill call with one token (its conv window still partly before the
    // start) and then steps alongside.
    let case = Case::new(31, &[70, 31], [2, 4, 4, 6, 4]);
    let (s, c, vw) = (case.s, case.s.conv_dim(), case.s.value_width());
    let (want, _) = case.forward();
    let (mut conv_state, mut rec_state) = (vec![0.0f32; 2 * 3 * c], vec![0.0f32; 2 * s.state_size()]);
    let mut got = vec![f32::NAN; want.len()];
    let a_end = |step: usize| if step == 0 { 40 } else { 40 + step };
    for step in 0..=30 {
        // Token ranges of A (0..70) and B (70..101) in this call.
        let ranges = if step == 0 { [0..40, 70..71] } else { [a_end(step) - 1..a_end(step), 70 + step..71 + step] };
        let pick = |v: &[f32]| -> Vec<f32> {
            let w = v.len() / s.n;
            ranges.iter().flat_map(|r| v[r.start * w..r.end * w].to_vec()).collect()
        };
        let (qkv, z, b, a) = (pick(&case.qkv), pick(&case.z), pick(&case.b), pick(&case.a));
        let lens: Vec<usize> = ranges.iter().map(|r| r.len()).collect();
        let ds = DeltaNetShape { n: lens.iter().sum(), ..s };
        let mut out = vec![f32::NAN; ds.n * vw];
        let inp = DeltaNetInputs { qkv: &qkv, z: &z, b: &b, a: &a };
        decode(inp, case.weights(), &cu_of(&lens), &ds, &mut conv_state, &mut rec_state, &mut out);
        let mut rows = out.chunks_exact(vw);
        for t in ranges.iter().flat_map(|r| r.clone()) {
            got[t * vw..][..vw].copy_from_slice(rows.next().unwrap());
        }
    }
    // The same arithmetic in the same order: bitwise (stronger than 1e-5).
    assert_bits_eq("decoded out", &got, &want);
    let last3 = |end: usize| case.qkv[(end - 3) * c..end * c].to_vec();
    assert_bits_eq("conv_state", &conv_state, &[last3(70), last3(101)].concat());
}

#[test]
fn packed_sequences_equal_each_alone_and_any_thread_count() {
    let case = Case::new(41, &[70, 9], [2, 4, 4, 6, 3]);
    let dout = Rng::new(42).vec(case.s.n * case.s.value_width(), 1.0);
    let run_all = |case: &Case, dout: &[f32]| {
        let (out, saved) = case.forward();
        let grads = case.backward(dout, &saved);
        (out, saved, grads)
    };
    let (out, saved, grads) = with_threads(3, || run_all(&case, &dout));
    let (out1, saved1, grads1) = with_threads(1, || run_all(&case, &dout));
    assert_bits_eq("out, 1 vs 3 threads", &out1, &out);
    assert_bits_eq("saved, 1 vs 3 threads", &saved1, &saved);
    for (g1, g) in grads1.iter().zip(&grads) {
        assert_bits_eq("grads, 1 vs 3 threads", g1, g);
    }
    let mut saved_off = 0;
    for i in 0..2 {
        let one = case.alone(i);
        let (t0, t1) = (case.cu[i] as usize, case.cu[i + 1] as usize);
        let rows = |v: &[f32]| v[t0 * (v.len() / case.s.n)..t1 * (v.len() / case.s.n)].to_vec();
        let (o, sv, g) = run_all(&one, &rows(&dout));
        assert_bits_eq("out alone", &o, &rows(&out));
        assert_bits_eq("saved alone", &sv, &saved[saved_off..saved_off + sv.len()]);
        saved_off += sv.len();
        for (name, (g1, gp)) in ["dqkv", "dz", "db", "da"].iter().zip(g.iter().zip(&grads)) {
            assert_bits_eq(name, g1, &rows(gp));
        }
    }
    assert_eq!(saved_off, saved.len());
}

#[test]
#[should_panic(expected = "delta_net_forward: cu_seqlens ends at 9 but n = 10")]
fn forward_rejects_mismatched_cu_seqlens() {
    let mut case = Case::new(51, &[10], [1, 1, 2, 2, 2]);
    case.cu = vec![0, 9];
    case.forward();
}

/// Runs transformers' Qwen3_5GatedDeltaNet with selection matrices as its
/// input projections (hidden = [qkv | z | b | a]) and the first Hv·dv
/// columns of an identity as out_proj, so its output is this module's out;
/// each sequence is its own batch row. Writes out.bin and the gradient of
/// Σ out·r w.r.t. hidden, dx.bin.
const TRANSFORMERS_SCRIPT: &str = r#"
import sys, numpy as np, torch
from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5TextConfig
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5GatedDeltaNet
d = sys.argv[1]
hk, hv, dk, dv, K = (int(v) for v in sys.argv[2:7])
lens = [int(v) for v in sys.argv[7].split(",")]
C, vw = 2 * hk * dk + hv * dv, hv * dv
H = C + vw + 2 * hv
rd = lambda name: torch.from_numpy(np.fromfile(f"{d}/{name}.bin", dtype="<f4"))
cfg = Qwen3_5TextConfig(hidden_size=H, linear_num_key_heads=hk, linear_num_value_heads=hv, linear_key_head_dim=dk,
    linear_value_head_dim=dv, linear_conv_kernel_dim=K, rms_norm_eps=1e-6, num_hidden_layers=1, layer_types=["linear_attention"])
m = Qwen3_5GatedDeltaNet(cfg, 0).float()
eye = torch.eye(H)
with torch.no_grad():
    m.in_proj_qkv.weight.copy_(eye[:C]); m.in_proj_z.weight.copy_(eye[C:C + vw])
    m.in_proj_b.weight.copy_(eye[C + vw:C + vw + hv]); m.in_proj_a.weight.copy_(eye[C + vw + hv:])
    m.out_proj.weight.copy_(torch.eye(H, vw))
    m.conv1d.weight.copy_(rd("conv").reshape(C, 1, K))
    m.A_log.copy_(rd("a_log")); m.dt_bias.copy_(rd("dt_bias")); m.norm.weight.copy_(rd("norm"))
x = rd("x").reshape(-1, H).requires_grad_(True)
outs, s0 = [], 0
for n in lens:
    outs.append(m(x[s0:s0 + n][None])[0, :, :vw]); s0 += n
out = torch.cat(outs)
(out * rd("r").reshape(-1, vw)).sum().backward()
out.detach().numpy().astype("<f4").tofile(f"{d}/out.bin")
x.grad.numpy().astype("<f4").tofile(f"{d}/dx.bin")
"#;

#[test]
fn matches_transformers() {
    let python = std::env::var_os("FERROTUNE_PYTHON").unwrap_or_else(|| "python3".into());
    let probe = std::process::Command::new(&python)
        .args(["-c", "import numpy, torch, transformers.models.qwen3_5.modeling_qwen3_5"])
        .stderr(std::process::Stdio::null())
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        eprintln!("skipped: no Python with torch and transformers' qwen3_5 (set FERROTUNE_PYTHON)");
        return;
    }
    let dims = [2, 4, 8, 6, 4];
    let case = Case::new(61, &[70, 9], dims);
    let (n, c, vw, hv) = (case.s.n, case.s.conv_dim(), case.s.value_width(), case.s.v_heads);
    let r = Rng::new(62).vec(n * vw, 1.0);
    let cols = [(&case.qkv, c), (&case.z, vw), (&case.b, hv), (&case.a, hv)];
    let x: Vec<f32> = (0..n).flat_map(|t| cols.iter().flat_map(move |(v, w)| v[t * w..(t + 1) * w].to_vec())).collect();
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, v: &[f32]| {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        std::fs::write(dir.path().join(format!("{name}.bin")), bytes).unwrap();
    };
    let read = |name: &str| -> Vec<f64> {
        let bytes = std::fs::read(dir.path().join(format!("{name}.bin"))).unwrap();
        bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64).collect()
    };
    for (name, v) in [("x", &x), ("r", &r), ("conv", &case.conv), ("a_log", &case.a_log), ("dt_bias", &case.dt_bias), ("norm", &case.norm)] {
        write(name, v);
    }
    let mut args: Vec<String> = vec!["-c".into(), TRANSFORMERS_SCRIPT.into(), dir.path().display().to_string()];
    args.extend(dims.iter().map(|d| d.to_string()));
    args.push("70,9".into());
    let status = std::process::Command::new(&python).args(&args).status().unwrap();
    assert!(status.success(), "the transformers script failed");
    // Both sides are f32; transformers runs the chunked form and autograd
    // through it, this module the recurrence: they differ by rounding, ~1e-6
    // of the largest value, so 1e-5 relative.
    let (out, saved) = case.forward();
    assert_close("out vs transformers", &out, &read("out"), 1e-5);
    let grads = case.backward(&r, &saved);
    let dx = read("dx");
    let mut lo = 0;
    for (name, (g, (_, w))) in ["dqkv", "dz", "db", "da"].iter().zip(grads.iter().zip(cols)) {
        let want: Vec<f64> = dx.chunks_exact(c + vw + 2 * hv).flat_map(|row| row[lo..lo + w].to_vec()).collect();
        assert_close(name, g, &want, 1e-5);
        lo += w;
    }
}
