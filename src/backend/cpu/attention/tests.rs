//! The CPU attention ops against naive f64 references, finite differences
//! and each other.

use crate::backend::cpu::CpuBackend;
use crate::backend::cpu::test_util::{
    Rng, assert_bits_eq, assert_close, dot64, fd_grad, to64, with_threads,
};
use crate::backend::{AttnSaved, AttnShape, Backend, Qkv, QkvGrads, Varlen};

/// Naive f64 attention: returns (out [n, h, d], lse [h, n]).
fn attn64(q: &[f64], k: &[f64], v: &[f64], cu: &[i32], s: AttnShape) -> (Vec<f64>, Vec<f64>) {
    let (n, h, kv, d) = (s.n, s.n_heads, s.n_kv_heads, s.head_dim);
    let mut out = vec![0.0; n * h * d];
    let mut lse = vec![0.0; h * n];
    for w in cu.windows(2) {
        let (a, b) = (w[0] as usize, w[1] as usize);
        for i in a..b {
            for head in 0..h {
                let g = head / (h / kv);
                let keys: Vec<usize> = (a..=i)
                    .filter(|&j| s.window.is_none_or(|w| i - j < w))
                    .collect();
                let sc: Vec<f64> = keys
                    .iter()
                    .map(|&j| {
                        let raw = s.scale as f64
                            * (0..d)
                                .map(|x| q[(i * h + head) * d + x] * k[(j * kv + g) * d + x])
                                .sum::<f64>();
                        s.softcap.map_or(raw, |c| (raw / c as f64).tanh() * c as f64)
                    })
                    .collect();
                let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = sc.iter().map(|s| (s - m).exp()).sum();
                lse[head * n + i] = m + z.ln();
                for (&j, s) in keys.iter().zip(&sc) {
                    let p = (s - m).exp() / z;
                    for x in 0..d {
                        out[(i * h + head) * d + x] += p * v[(j * kv + g) * d + x];
                    }
                }
            }
        }
    }
    (out, lse)
}

fn shape(n: usize, window: Option<usize>) -> AttnShape {
    let d = 8;
    AttnShape {
        n,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: d,
        window,
        scale: 1.0 / (d as f32).sqrt(),
        softcap: None,
        max_seqlen: 0,
    }
}

struct Case {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    cu: Vec<i32>,
    s: AttnShape,
}

fn case(seed: u64, lens: &[usize], window: Option<usize>) -> Case {
    let mut rng = Rng::new(seed);
    let n: usize = lens.iter().sum();
    let s = shape(n, window);
    let mut cu = vec![0i32];
    for l in lens {
        cu.push(cu.last().unwrap() + *l as i32);
    }
    // Amplitude 2 so the softmax is far from uniform.
    Case {
        q: rng.vec(n * s.n_heads * s.head_dim, 2.0),
        k: rng.vec(n * s.n_kv_heads * s.head_dim, 2.0),
        v: rng.vec(n * s.n_kv_heads * s.head_dim, 1.0),
        cu,
        s,
    }
}

fn fwd(c: &Case) -> (Vec<f32>, Vec<f32>) {
    let be = CpuBackend::new();
    let mut out = vec![f32::NAN; c.s.n * c.s.n_heads * c.s.head_dim];
    let mut lse = vec![f32::NAN; c.s.n * c.s.n_heads];
    let seqs = Varlen { cu_seqlens: &c.cu, n_seqs: c.cu.len() - 1 };
    be.attention(Qkv { q: &c.q, k: &c.k, v: &c.v }, seqs, c.s, &mut out, &mut lse);
    (out, lse)
}

fn bwd(c: &Case, dout: &[f32], out: &[f32], lse: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (dout, out, lse) = (dout.to_vec(), out.to_vec(), lse.to_vec());
    bwd_impl(c, &dout, &out, &lse)
}

fn bwd_impl(
    c: &Case,
    dout: &Vec<f32>,
    out: &Vec<f32>,
    lse: &Vec<f32>,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let be = CpuBackend::new();
    let mut dq = vec![f32::NAN; c.q.len()];
    let mut dk = vec![f32::NAN; c.k.len()];
    let mut dv = vec![f32::NAN; c.v.len()];
    be.attention_backward(
        dout,
        Qkv { q: &c.q, k: &c.k, v: &c.v },
        AttnSaved { out, lse },
        Varlen { cu_seqlens: &c.cu, n_seqs: c.cu.len() - 1 },
        c.s,
        QkvGrads { dq: &mut dq, dk: &mut dk, dv: &mut dv },
    );
    (dq, dk, dv)
}

#[test]
fn attention_forward_matches_naive() {
    for window in [None, Some(2), Some(3), Some(100)] {
        let c = case(50, &[5, 3], window);
        let (out, lse) = fwd(&c);
        let (o64, l64) = attn64(&to64(&c.q), &to64(&c.k), &to64(&c.v), &c.cu, c.s);
        // f32 dot products / softmax over <= 5 keys: 1e-5 relative.
        assert_close("attn out", &out, &o64, 1e-5);
        assert_close("attn lse", &lse, &l64, 1e-5);
    }
}

#[test]
fn attention_backward_matches_fd() {
    // GQA 4 query heads over 2 kv heads, two sequences of different
    // lengths; full causal and a window shorter than the sequences.
    for window in [None, Some(2)] {
        let c = case(51, &[5, 3], window);
        let (out, lse) = fwd(&c);
        let rr = Rng::new(52).vec(out.len(), 1.0);
        let (dq, dk, dv) = bwd(&c, &rr, &out, &lse);
        let (q64, k64, v64, r64) = (to64(&c.q), to64(&c.k), to64(&c.v), to64(&rr));
        let l = |q: &[f64], k: &[f64], v: &[f64]| dot64(&attn64(q, k, v, &c.cu, c.s).0, &r64);
        // L = Σ out ⊙ R, central FD in f64 with h = 1e-6 (truncation
        // ~1e-12, rounding ~1e-10); the f32 backward is held to 1e-5
        // relative to each gradient tensor's magnitude.
        let gq = fd_grad(&q64, 1e-6, |q| l(q, &k64, &v64));
        let gk = fd_grad(&k64, 1e-6, |k| l(&q64, k, &v64));
        let gv = fd_grad(&v64, 1e-6, |v| l(&q64, &k64, v));
        assert_close(&format!("dq {window:?}"), &dq, &gq, 1e-5);
        assert_close(&format!("dk {window:?}"), &dk, &gk, 1e-5);
        assert_close(&format!("dv {window:?}"), &dv, &gv, 1e-5);
    }
}

#[test]
fn soft_capped_attention_matches_naive_and_fd() {
    // Gemma 2's attention soft-cap, with a cap of 1 against scores of a few
    // units (amplitude-2 q and k), so the cap bites; with and without a window.
    for window in [None, Some(2)] {
        let mut c = case(54, &[5, 3], window);
        c.s.softcap = Some(1.0);
        let (out, lse) = fwd(&c);
        let (q64, k64, v64) = (to64(&c.q), to64(&c.k), to64(&c.v));
        let (o64, l64) = attn64(&q64, &k64, &v64, &c.cu, c.s);
        assert_close("capped attn out", &out, &o64, 1e-5);
        assert_close("capped attn lse", &lse, &l64, 1e-5);
        let uncapped = attn64(&q64, &k64, &v64, &c.cu, AttnShape { softcap: None, ..c.s }).0;
        let moved = o64.iter().zip(&uncapped).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(moved > 1e-2, "the cap must change the output (moved {moved})");
        let rr = Rng::new(55).vec(out.len(), 1.0);
        let (dq, dk, dv) = bwd(&c, &rr, &out, &lse);
        let r64 = to64(&rr);
        let l = |q: &[f64], k: &[f64], v: &[f64]| dot64(&attn64(q, k, v, &c.cu, c.s).0, &r64);
        assert_close("capped dq", &dq, &fd_grad(&q64, 1e-6, |q| l(q, &k64, &v64)), 1e-5);
        assert_close("capped dk", &dk, &fd_grad(&k64, 1e-6, |k| l(&q64, k, &v64)), 1e-5);
        assert_close("capped dv", &dv, &fd_grad(&v64, 1e-6, |v| l(&q64, &k64, v)), 1e-5);
    }
}

#[test]
fn varlen_batch_equals_each_sequence_alone() {
    for window in [None, Some(3)] {
        let c = case(53, &[6, 4], window);
        let (out, lse) = fwd(&c);
        let rr = Rng::new(54).vec(out.len(), 1.0);
        let (dq, dk, dv) = bwd(&c, &rr, &out, &lse);
        let (h, kv, d) = (c.s.n_heads, c.s.n_kv_heads, c.s.head_dim);
        for w in c.cu.windows(2) {
            let (a, b) = (w[0] as usize, w[1] as usize);
            let len = b - a;
            let solo = Case {
                q: c.q[a * h * d..b * h * d].to_vec(),
                k: c.k[a * kv * d..b * kv * d].to_vec(),
                v: c.v[a * kv * d..b * kv * d].to_vec(),
                cu: vec![0, len as i32],
                s: shape(len, window),
            };
            let (o1, l1) = fwd(&solo);
            assert_bits_eq("out", &o1, &out[a * h * d..b * h * d]);
            for head in 0..h {
                assert_bits_eq(
                    "lse",
                    &l1[head * len..(head + 1) * len],
                    &lse[head * c.s.n + a..head * c.s.n + b],
                );
            }
            let (dq1, dk1, dv1) = bwd(&solo, &rr[a * h * d..b * h * d], &o1, &l1);
            assert_bits_eq("dq", &dq1, &dq[a * h * d..b * h * d]);
            assert_bits_eq("dk", &dk1, &dk[a * kv * d..b * kv * d]);
            assert_bits_eq("dv", &dv1, &dv[a * kv * d..b * kv * d]);
        }
    }
}

#[test]
fn window_masks_exactly_the_old_keys() {
    // One sequence of 7, window 3: query i sees keys i-2..=i only.
    let w = 3;
    let c = case(55, &[7], Some(w));
    let (out, _) = fwd(&c);
    let (h, kv, d) = (c.s.n_heads, c.s.n_kv_heads, c.s.head_dim);
    let j = 2; // perturb key/value token 2 (both kv heads)
    let mut c2 = case(55, &[7], Some(w));
    for x in &mut c2.k[j * kv * d..(j + 1) * kv * d] {
        *x += 1.0;
    }
    for x in &mut c2.v[j * kv * d..(j + 1) * kv * d] {
        *x -= 1.0;
    }
    let (out2, _) = fwd(&c2);
    for i in 0..7 {
        let (r1, r2) = (
            &out[i * h * d..(i + 1) * h * d],
            &out2[i * h * d..(i + 1) * h * d],
        );
        let sees = j <= i && i - j < w;
        if sees {
            assert!(r1 != r2, "query {i} should see key {j}");
        } else {
            assert_bits_eq(&format!("query {i} must not see key {j}"), r1, r2);
        }
    }
    // Window 1: each query sees only itself, so out = v of its kv head.
    let c1 = case(56, &[4, 3], Some(1));
    let (out1, lse1) = fwd(&c1);
    for i in 0..7 {
        for head in 0..h {
            let g = head / (h / kv);
            assert_eq!(
                &out1[(i * h + head) * d..][..d],
                &c1.v[(i * kv + g) * d..][..d]
            );
        }
    }
    // lse = the single score.
    let (q64, k64) = (to64(&c1.q), to64(&c1.k));
    for i in 0..7 {
        let s: f64 = (0..d)
            .map(|x| q64[i * h * d + x] * k64[i * kv * d + x])
            .sum::<f64>()
            * c1.s.scale as f64;
        assert!((lse1[i] as f64 - s).abs() < 1e-5);
    }
}

/// The outputs of queries past..past+n of `c` (one sequence) by
/// decode_attention over the cache holding its first past+n tokens.
fn decode(c: &Case, past: usize, n: usize) -> Vec<f32> {
    let (h, kv, d) = (c.s.n_heads, c.s.n_kv_heads, c.s.head_dim);
    let total = past + n;
    // A cache longer than needed, its tail poisoned: only 0..past+n may be read.
    let cap = total + 3;
    let mut kc = vec![f32::NAN; cap * kv * d];
    let mut vc = vec![f32::NAN; cap * kv * d];
    kc[..total * kv * d].copy_from_slice(&c.k[..total * kv * d]);
    vc[..total * kv * d].copy_from_slice(&c.v[..total * kv * d]);
    let q = c.q[past * h * d..total * h * d].to_vec();
    let mut out = vec![f32::NAN; n * h * d];
    CpuBackend::new().decode_attention(&q, &kc, &vc, past, AttnShape { n, ..c.s }, &mut out);
    out
}

#[test]
fn prefill_then_decode_equals_one_prefill() {
    // One sequence of 11 (GQA 4/2): attention over all of it, against a
    // prefix of `first` tokens by attention and the rest by
    // decode_attention in steps of `step` tokens. Same row computation,
    // so the outputs agree bit for bit.
    let len = 11;
    for window in [None, Some(1), Some(3), Some(20)] {
        let c = case(58, &[len], window);
        let (full, _) = fwd(&c);
        let (h, kv, d) = (c.s.n_heads, c.s.n_kv_heads, c.s.head_dim);
        for (first, step) in [(1, 1), (4, 1), (5, 3), (0, 11), (0, 2)] {
            let mut got = Vec::new();
            if first > 0 {
                let prefix = Case {
                    q: c.q[..first * h * d].to_vec(),
                    k: c.k[..first * kv * d].to_vec(),
                    v: c.v[..first * kv * d].to_vec(),
                    cu: vec![0, first as i32],
                    s: AttnShape { n: first, ..c.s },
                };
                got.extend(fwd(&prefix).0);
            }
            let mut past = first;
            while past < len {
                let n = step.min(len - past);
                got.extend(decode(&c, past, n));
                past += n;
            }
            assert_bits_eq(&format!("window {window:?}, prefill {first}, decode by {step}"), &got, &full);
        }
    }
}

#[test]
fn decode_attention_matches_naive() {
    // Independent of the shared row code: the last 3 queries of a
    // sequence of 9 against the f64 reference.
    for window in [None, Some(4)] {
        let c = case(59, &[9], window);
        let (o64, _) = attn64(&to64(&c.q), &to64(&c.k), &to64(&c.v), &c.cu, c.s);
        let row = c.s.n_heads * c.s.head_dim;
        assert_close("decode out", &decode(&c, 6, 3), &o64[6 * row..], 1e-5);
    }
}

#[test]
fn attention_backward_is_deterministic() {
    // Bigger case so rayon actually splits the work.
    let mut rng = Rng::new(57);
    let lens = [37usize, 64, 27];
    let n: usize = lens.iter().sum();
    let s = AttnShape {
        n,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 16,
        window: Some(20),
        scale: 0.25,
        softcap: None,
        max_seqlen: 64,
    };
    let mut cu = vec![0i32];
    for l in lens {
        cu.push(cu.last().unwrap() + l as i32);
    }
    let c = Case {
        q: rng.vec(n * 4 * 16, 1.0),
        k: rng.vec(n * 2 * 16, 1.0),
        v: rng.vec(n * 2 * 16, 1.0),
        cu,
        s,
    };
    let rr = rng.vec(n * 4 * 16, 1.0);
    let run = |threads| {
        with_threads(threads, || {
            let (out, lse) = fwd(&c);
            let (dq, dk, dv) = bwd(&c, &rr, &out, &lse);
            [out, lse, dq, dk, dv]
        })
    };
    let a = run(1);
    let b = run(3);
    let b2 = run(3);
    for t in 0..5 {
        assert_bits_eq("1 vs 3 threads", &a[t], &b[t]);
        assert_bits_eq("run to run", &b[t], &b2[t]);
    }
}
