//! The chunked (UT transform) form of one head's recurrence: the reference
//! for a GPU kernel that processes a chunk of tokens with matrix products.

use super::{axpy, check_len, dot};

/// The core recurrence of one head in chunked form (the UT transform, chunk `chunk`, as
/// torch_chunk_gated_delta_rule computes it): q, k [len, dk] (already normed/scaled), v [len, dv], g, beta [len]
/// -> out [len, dv]. Reference for the GPU kernel's chunked form; tested against the recurrence.
///
/// Within a chunk (positions i, j; cum_i = Σ_{m≤i} g_m):
/// (I + A)·[W | Kc] = [β·v | β·k·e^cum] with A_ij = β_i (k_i·k_j) e^{cum_i − cum_j} for j < i
/// (forward substitution); v_new = W − Kc·S; out_i = e^{cum_i} q_i·S +
/// Σ_{j≤i} (q_i·k_j) e^{cum_i − cum_j} v_new_j; S ← e^{cum_last} S + Σ_j e^{cum_last − cum_j} k_j v_new_jᵀ.
#[allow(clippy::too_many_arguments)]
pub fn chunked_core(q: &[f32], k: &[f32], v: &[f32], g: &[f32], beta: &[f32], len: usize, k_dim: usize, v_dim: usize, chunk: usize, out: &mut [f32]) {
    const OP: &str = "delta_net_chunked_core";
    assert!(chunk > 0, "{OP}: chunk must be at least 1");
    let (dk, dv) = (k_dim, v_dim);
    check_len(OP, "q", q.len(), len * dk);
    check_len(OP, "k", k.len(), len * dk);
    check_len(OP, "v", v.len(), len * dv);
    check_len(OP, "g", g.len(), len);
    check_len(OP, "beta", beta.len(), len);
    check_len(OP, "out", out.len(), len * dv);
    let wd = dv + dk;
    let mut s = vec![0.0f32; dk * dv];
    for c0 in (0..len).step_by(chunk) {
        let l = chunk.min(len - c0);
        let mut cum = vec![0.0f32; l];
        let mut acc = 0.0f32;
        for (i, c) in cum.iter_mut().enumerate() {
            acc += g[c0 + i];
            *c = acc;
        }
        let row = |x: &[f32], i: usize, d: usize| -> Vec<f32> { x[(c0 + i) * d..][..d].to_vec() };
        let (kc, qc): (Vec<_>, Vec<_>) = (0..l).map(|i| (row(k, i, dk), row(q, i, dk))).unzip();
        // Rows of [W | Kc], solved by forward substitution.
        let mut x = vec![0.0f32; l * wd];
        for i in 0..l {
            let bi = beta[c0 + i];
            let kb: Vec<f32> = kc[i].iter().map(|&v| v * bi).collect();
            let (done, xi) = x.split_at_mut(i * wd);
            let xi = &mut xi[..wd];
            for (x, &v) in xi[..dv].iter_mut().zip(&v[(c0 + i) * dv..][..dv]) {
                *x = v * bi;
            }
            let e = cum[i].exp();
            for (x, &kb) in xi[dv..].iter_mut().zip(&kb) {
                *x = kb * e;
            }
            for (j, xj) in done.chunks_exact(wd).enumerate() {
                let a = dot(&kb, &kc[j]) * (cum[i] - cum[j]).exp();
                axpy(xi, -a, xj);
            }
        }
        // v_new = W − Kc·S
        let mut vnew = vec![0.0f32; l * dv];
        for (vn, xi) in vnew.chunks_exact_mut(dv).zip(x.chunks_exact(wd)) {
            vn.copy_from_slice(&xi[..dv]);
            for (&kcm, srow) in xi[dv..].iter().zip(s.chunks_exact(dv)) {
                axpy(vn, -kcm, srow);
            }
        }
        for i in 0..l {
            let o = &mut out[(c0 + i) * dv..][..dv];
            o.fill(0.0);
            let e = cum[i].exp();
            for (&qm, srow) in qc[i].iter().zip(s.chunks_exact(dv)) {
                axpy(o, qm * e, srow);
            }
            for (j, vn) in vnew.chunks_exact(dv).enumerate().take(i + 1) {
                axpy(o, dot(&qc[i], &kc[j]) * (cum[i] - cum[j]).exp(), vn);
            }
        }
        let last = cum[l - 1];
        let e = last.exp();
        s.iter_mut().for_each(|x| *x *= e);
        for (kj, (vn, &cj)) in kc.iter().zip(vnew.chunks_exact(dv).zip(&cum)) {
            let d = (last - cj).exp();
            for (srow, &km) in s.chunks_exact_mut(dv).zip(kj) {
                axpy(srow, km * d, vn);
            }
        }
    }
}
