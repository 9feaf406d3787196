//! The exact backward of the delta-net forward: per (sequence, v-head) the
//! recurrence in reverse, then per token the l2norms, SiLU and the conv.

use rayon::prelude::*;

use super::{CHUNK, Geo, Grads, Io, Prep, Real, axpy, decay_read, dot, l2_inv, norm_inv, prep, silu, softplus, tok, write_read};

/// One (sequence, v-head)'s input gradients, per token of the sequence.
struct HeadGrads<T> {
    /// [len, dk]: of the normed (and scaled) q, k this head read.
    dq: Vec<T>,
    dk: Vec<T>,
    /// [len, dv]
    dv: Vec<T>,
    dz: Vec<T>,
    /// [len]: of b and a themselves.
    db: Vec<T>,
    da: Vec<T>,
}

/// Reverse pass of one (sequence, v-head), chunk by chunk from the last:
/// the chunk's per-token start states are recomputed from the saved one,
/// then the tokens run backwards carrying dS (the gradient of the state
/// after the token). Per token, with n = o·r, r = 1/√(mean(o²) + eps):
/// - out = (w ⊙ n) ⊙ silu(z): dn = dout ⊙ w ⊙ silu(z), dz = dout ⊙ w ⊙ n ⊙ silu'(z),
///   do = r·dn − o·r³·(dn·o)/dv;
/// - o = Sᵀq: dS += q·doᵀ, dq = S·do;
/// - S = S' + k·uᵀ: dS' = dS, dk = dS·u, du = dSᵀk;
/// - u = β(v − S'ᵀk): dβ = du·(v − S'ᵀk), dv = β·du, and with dkv = −β·du,
///   dk += S'·dkv, dS' += k·dkvᵀ;
/// - S' = e^g·S: dg = Σ S' ⊙ dS', and the carried dS becomes e^g·dS';
/// - β = σ(b): db = dβ·β(1 − β); g = −e^{A_log}·softplus(a + dt_bias): da = −e^{A_log}·softplus'·dg.
fn head_backward<T: Real>(geo: &Geo, io: &Io<T>, p: &Prep<T>, dout: &[T], saved: &[T], sq: usize, h: usize) -> HeadGrads<T> {
    let s = &geo.s;
    let (dk, dv, hv, ss) = (s.k_dim, s.v_dim, s.v_heads, s.k_dim * s.v_dim);
    let (s0, s1) = geo.seqs[sq];
    let len = s1 - s0;
    let z = |n: usize| vec![T::ZERO; n];
    let mut r = HeadGrads { dq: z(len * dk), dk: z(len * dk), dv: z(len * dv), dz: z(len * dv), db: z(len), da: z(len) };
    let (mut ds, mut sp, mut st, mut starts) = (z(ss), z(ss), z(ss), z(len.min(CHUNK) * ss));
    let (mut kv, mut u, mut o, mut dn, mut du, mut dkv) = (z(dv), z(dv), z(dv), z(dv), z(dv), z(dv));
    let (a_scale, inv_dv) = (-io.a_log[h].exp(), T::ONE / T::of(dv as f64));
    for ch in (0..len.div_ceil(CHUNK)).rev() {
        let (t0, t1) = (s0 + ch * CHUNK, s1.min(s0 + (ch + 1) * CHUNK));
        st.copy_from_slice(&saved[((geo.chunk_base[sq] + ch) * hv + h) * ss..][..ss]);
        for t in t0..t1 {
            starts[(t - t0) * ss..][..ss].copy_from_slice(&st);
            let x = tok(geo, io, p, t, h);
            decay_read(&mut st, &x, &mut kv, &mut u);
            write_read(&mut st, &x, &u, &mut o);
        }
        for t in (t0..t1).rev() {
            let (x, i) = (tok(geo, io, p, t, h), t - s0);
            // Recompute S' (sp), kv, u, S (st), o exactly as the forward did.
            sp.copy_from_slice(&starts[(t - t0) * ss..][..ss]);
            decay_read(&mut sp, &x, &mut kv, &mut u);
            st.copy_from_slice(&sp);
            write_read(&mut st, &x, &u, &mut o);
            // The gated norm.
            let inv = norm_inv(&o, io.eps);
            let dy = &dout[(t * hv + h) * dv..][..dv];
            let dz = &mut r.dz[i * dv..][..dv];
            for ((((dn, dz), &dy), &w), (&o, &z)) in dn.iter_mut().zip(dz).zip(dy).zip(io.norm).zip(o.iter().zip(x.z)) {
                let (sz, slope) = silu(z);
                *dn = dy * w * sz;
                *dz = dy * w * (o * inv) * slope;
            }
            let c = inv * inv * inv * dot(&dn, &o) * inv_dv;
            let dov: Vec<T> = dn.iter().zip(&o).map(|(&dn, &o)| inv * dn - o * c).collect();
            // o = Sᵀq, then S = S' + k·uᵀ.
            du.fill(T::ZERO);
            let (dq, dkr) = (&mut r.dq[i * dk..][..dk], &mut r.dk[i * dk..][..dk]);
            for ((((dsr, sr), &qi), &ki), (dq, dkr)) in
                ds.chunks_exact_mut(dv).zip(st.chunks_exact(dv)).zip(x.q).zip(x.k).zip(dq.iter_mut().zip(dkr.iter_mut()))
            {
                *dq = dot(sr, &dov);
                axpy(dsr, qi, &dov);
                *dkr = dot(dsr, &u);
                axpy(&mut du, ki, dsr);
            }
            // u = β(v − kv), kv = S'ᵀk.
            let mut dbeta = T::ZERO;
            for ((((dvv, dkv), &du), &v), &kv) in r.dv[i * dv..][..dv].iter_mut().zip(dkv.iter_mut()).zip(&du).zip(x.v).zip(&kv) {
                dbeta += du * (v - kv);
                *dvv = x.beta * du;
                *dkv = -(x.beta * du);
            }
            // S' = e^g·S.
            let (e, mut dg) = (x.g.exp(), T::ZERO);
            for ((dsr, spr), (&ki, dkr)) in ds.chunks_exact_mut(dv).zip(sp.chunks_exact(dv)).zip(x.k.iter().zip(r.dk[i * dk..][..dk].iter_mut())) {
                *dkr += dot(spr, &dkv);
                axpy(dsr, ki, &dkv);
                dg += dot(spr, dsr);
                dsr.iter_mut().for_each(|d| *d *= e);
            }
            r.db[i] = dbeta * x.beta * (T::ONE - x.beta);
            r.da[i] = dg * a_scale * softplus(io.a[t * hv + h] + io.dt_bias[h]).1;
        }
    }
    r
}

pub(super) fn backward_impl<T: Real>(geo: &Geo, io: &Io<T>, dout: &[T], saved: &[T], g: Grads<T>) {
    let s = &geo.s;
    let (n, c, k, hk, dk, hv, dv) = (s.n, geo.c, s.conv_kernel, s.k_heads, s.k_dim, s.v_heads, s.v_dim);
    let p = prep(geo, io, None);
    let heads: Vec<HeadGrads<T>> =
        (0..geo.seqs.len() * hv).into_par_iter().map(|i| head_backward(geo, io, &p, dout, saved, i / hv, i % hv)).collect();
    // Scatter: q/k gradients per v-head (summed below), the rest in place.
    let (mut dqh, mut dkh, mut dvh) = (vec![T::ZERO; n * hv * dk], vec![T::ZERO; n * hv * dk], vec![T::ZERO; n * hv * dv]);
    for (i, r) in heads.iter().enumerate() {
        let (sq, h) = (i / hv, i % hv);
        let s0 = geo.seqs[sq].0;
        for j in 0..r.db.len() {
            let (t, th) = (s0 + j, (s0 + j) * hv + h);
            dqh[th * dk..][..dk].copy_from_slice(&r.dq[j * dk..][..dk]);
            dkh[th * dk..][..dk].copy_from_slice(&r.dk[j * dk..][..dk]);
            dvh[th * dv..][..dv].copy_from_slice(&r.dv[j * dv..][..dv]);
            g.z[th * dv..][..dv].copy_from_slice(&r.dz[j * dv..][..dv]);
            g.b[t * hv + h] = r.db[j];
            g.a[t * hv + h] = r.da[j];
        }
    }
    // Per token: the repeat (sum over the v-heads sharing a k-head), the
    // l2norms (y = x·r: dx = r·dy − x·r³·(x·dy)), then SiLU: gradient of the conv output.
    let scale = T::of((dk as f64).powf(-0.5));
    let mut dpre = vec![T::ZERO; n * c];
    dpre.par_chunks_mut(c).enumerate().for_each(|(t, row)| {
        for (part, src, sc) in [(0, &dqh, scale), (1, &dkh, T::ONE)] {
            for kh in 0..hk {
                let off = part * hk * dk + kh * dk;
                let x = &p.act[t * c + off..][..dk];
                let mut dy = vec![T::ZERO; dk];
                for vh in kh * geo.ratio..(kh + 1) * geo.ratio {
                    axpy(&mut dy, T::ONE, &src[(t * hv + vh) * dk..][..dk]);
                }
                let inv = l2_inv(x);
                let cx = inv * inv * inv * dot(x, &dy) * sc;
                for ((d, &dy), &x) in row[off..][..dk].iter_mut().zip(&dy).zip(x) {
                    *d = inv * (dy * sc) - x * cx;
                }
            }
        }
        row[2 * hk * dk..].copy_from_slice(&dvh[t * hv * dv..][..hv * dv]);
        for (d, &x) in row.iter_mut().zip(&p.pre[t * c..][..c]) {
            *d *= silu(x).1;
        }
    });
    // The conv transposed: x_t feeds conv outputs t + K − 1 − j of its own sequence.
    g.qkv[..n * c].par_chunks_mut(c).enumerate().for_each(|(t, row)| {
        let s1 = geo.seqs[geo.seq_of[t]].1;
        row.fill(T::ZERO);
        for j in 0..k {
            let out_t = t + k - 1 - j;
            if out_t < s1 {
                for (ch, (d, &dp)) in row.iter_mut().zip(&dpre[out_t * c..][..c]).enumerate() {
                    *d += io.conv[ch * k + j] * dp;
                }
            }
        }
    });
}
