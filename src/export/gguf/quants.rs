//! Tensor encoders for every type the exporter writes: f32/f16/bf16 and the
//! block quantizers Q8_0, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K.
//!
//! The block quantizers reproduce ggml's reference (no importance matrix)
//! quantizers bit for bit, as an x86-64 build of llama-quantize runs them:
//! plain f32 arithmetic in source order, sums accumulated sequentially,
//! divisions kept as divisions and no fused multiply-adds. Every expression
//! below keeps that order on purpose; "simplifying" one changes output bytes.
//! Rows are independent, so rows are encoded in parallel; the bytes do not
//! depend on the thread count.

use super::types::GgmlType;
use half::f16;
use rayon::prelude::*;

/// Encode `x`, rows of `n_per_row` values, as `ty`. `n_per_row` must be a
/// non-zero multiple of `ty.block_len()` and divide `x.len()` (the caller
/// guarantees it; violating it is a bug and panics).
///
/// F16 is the converter's (numpy's) rounding. llama-quantize's F16, used
/// when a row fits no 32-value block, is the same except for NaN inputs,
/// which it writes as a bare quiet NaN ([`f16_ggml`]).
pub fn quantize(ty: GgmlType, x: &[f32], n_per_row: usize) -> Vec<u8> {
    let mut out = Vec::new();
    quantize_into(ty, x, n_per_row, &mut out);
    out
}

/// As [`quantize`], appending the encoding to `out`.
pub fn quantize_into(ty: GgmlType, x: &[f32], n_per_row: usize, out: &mut Vec<u8>) {
    assert!(
        n_per_row > 0 && n_per_row.is_multiple_of(ty.block_len()) && x.len().is_multiple_of(n_per_row),
        "quantize {}: {} values in rows of {n_per_row}",
        ty.name(),
        x.len()
    );
    let row_bytes = ty.bytes_for(n_per_row);
    let start = out.len();
    out.resize(start + x.len() / n_per_row * row_bytes, 0);
    let dst = &mut out[start..];
    if dst.is_empty() {
        return;
    }
    // About 64K values per task: enough work to amortise scheduling, small
    // enough to balance across cores for tensors of a few rows.
    let rows = (65536 / n_per_row).max(1);
    dst.par_chunks_mut(rows * row_bytes)
        .zip(x.par_chunks(rows * n_per_row))
        .for_each(|(d, s)| encode(ty, s, d));
}

/// Encode whole blocks of `x` into `out` (exactly the right size).
fn encode(ty: GgmlType, x: &[f32], out: &mut [u8]) {
    let bl = ty.block_len();
    let bb = ty.block_bytes();
    let blocks = x.chunks_exact(bl).zip(out.chunks_exact_mut(bb));
    match ty {
        GgmlType::F32 => blocks.for_each(|(x, o)| o.copy_from_slice(&x[0].to_le_bytes())),
        GgmlType::F16 => blocks.for_each(|(x, o)| o.copy_from_slice(&f16_numpy(x[0]).to_le_bytes())),
        GgmlType::BF16 => blocks.for_each(|(x, o)| o.copy_from_slice(&bf16(x[0]).to_le_bytes())),
        GgmlType::Q8_0 => blocks.for_each(|(x, o)| q8_0(x.try_into().unwrap(), o.try_into().unwrap())),
        GgmlType::Q5_0 => blocks.for_each(|(x, o)| q5_0(x.try_into().unwrap(), o.try_into().unwrap())),
        GgmlType::Q5_1 => blocks.for_each(|(x, o)| q5_1(x.try_into().unwrap(), o.try_into().unwrap())),
        GgmlType::Q4K => blocks.for_each(|(x, o)| q4_k(x.try_into().unwrap(), o.try_into().unwrap())),
        GgmlType::Q5K => blocks.for_each(|(x, o)| q5_k(x.try_into().unwrap(), o.try_into().unwrap())),
        GgmlType::Q6K => blocks.for_each(|(x, o)| q6_k(x.try_into().unwrap(), o.try_into().unwrap())),
    }
}

/// f32 -> bf16 as the converter writes it: round to nearest even on the
/// bits; a NaN keeps its upper half with the quiet bit forced.
pub fn bf16(f: f32) -> u16 {
    let mut n = f.to_bits();
    if n & 0x7fff_ffff > 0x7f80_0000 {
        n = (n & 0xffff_0000) | 0x0040_0000;
    }
    ((n as u64 + 0x7fff + ((n as u64 >> 16) & 1)) >> 16) as u16
}

/// f32 -> f16 as numpy's astype(float16) does it (the converter's f16):
/// round to nearest even, overflow to infinity; a NaN keeps its sign and
/// the top ten bits of its payload (not made quiet), and stays a NaN when
/// those are all zero.
pub fn f16_numpy(f: f32) -> u16 {
    if f.is_nan() {
        let b = f.to_bits();
        let m = ((b & 0x007f_ffff) >> 13) as u16;
        return ((b >> 16) & 0x8000) as u16 | 0x7c00 | m.max(1);
    }
    f16::from_f32(f).to_bits()
}

/// f32 -> f16 as ggml stores block scales and llama-quantize writes F16
/// tensors: round to nearest even, overflow to infinity, every NaN to a
/// bare quiet NaN with its sign.
pub fn f16_ggml(f: f32) -> u16 {
    if f.is_nan() {
        return ((f.to_bits() >> 16) & 0x8000) as u16 | 0x7e00;
    }
    f16::from_f32(f).to_bits()
}

fn f16_to_f32(h: u16) -> f32 {
    f16::from_bits(h).to_f32()
}

/// ggml's round-half-to-even through the f32 mantissa (valid for
/// |f| < 2^22; other inputs give the same wrapped values as ggml's).
#[inline(always)]
fn nearest_int(f: f32) -> i32 {
    let v = f + 12_582_912.0;
    (v.to_bits() as i32 & 0x007f_ffff) - 0x0040_0000
}

/// C's float -> int conversion on x86-64 (cvttss2si): truncation, and
/// 0x80000000 for NaN and out-of-range values. Narrower C integer targets
/// keep the low byte of that, so an infinite x*id stores 0 where Rust's
/// saturating `as` would store 127.
#[inline(always)]
fn c_trunc(f: f32) -> i32 {
    if f > -2_147_483_904.0 && f < 2_147_483_648.0 { f as i32 } else { i32::MIN }
}

/// C's `a > b ? a : b` (the NaN behaviour differs from f32::max).
#[inline(always)]
fn c_max(a: f32, b: f32) -> f32 {
    if a > b { a } else { b }
}

fn put_f16(o: &mut [u8], at: usize, h: u16) {
    o[at..at + 2].copy_from_slice(&h.to_le_bytes());
}

fn q8_0(x: &[f32; 32], o: &mut [u8; 34]) {
    let mut amax = 0f32;
    for &v in x {
        amax = c_max(amax, v.abs());
    }
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(o, 0, f16_ggml(d));
    for (q, &v) in o[2..].iter_mut().zip(x) {
        *q = c_trunc((v * id).round()) as u8;
    }
}

/// Pack 5-bit values: low nibbles of j and j+16 share byte j; bit 4 goes to
/// the 32-bit qh word (bit j for the first half, j+16 for the second).
fn pack5_32(q: &[u8; 32], o: &mut [u8]) {
    let mut qh = 0u32;
    for j in 0..16 {
        let (a, b) = (q[j], q[j + 16]);
        o[4 + j] = (a & 0x0f) | ((b & 0x0f) << 4);
        qh |= (((a & 0x10) >> 4) as u32) << j;
        qh |= (((b & 0x10) >> 4) as u32) << (j + 16);
    }
    o[..4].copy_from_slice(&qh.to_le_bytes());
}

fn q5_0(x: &[f32; 32], o: &mut [u8; 22]) {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -16.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(o, 0, f16_ggml(d));
    let mut q = [0u8; 32];
    for (q, &v) in q.iter_mut().zip(x) {
        // The int8 cast truncates toward zero before the clamp.
        *q = (c_trunc(v * id + 16.5) as i8 as i32).min(31) as u8;
    }
    pack5_32(&q, &mut o[2..]);
}

fn q5_1(x: &[f32; 32], o: &mut [u8; 24]) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    let d = (max - min) / 31.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(o, 0, f16_ggml(d));
    put_f16(o, 2, f16_ggml(min));
    let mut q = [0u8; 32];
    for (q, &v) in q.iter_mut().zip(x) {
        *q = c_trunc((v - min) * id + 0.5) as u8;
    }
    pack5_32(&q, &mut o[4..]);
}

/// ggml's make_qkx2_quants for 32 values, squared error: an asymmetric
/// (scale, min) fit searched over `nstep + 1` trial scales. Writes the
/// levels to `l` and returns (scale, -min).
fn make_qkx2(x: &[f32; 32], w: &[f32; 32], nmax: i32, rmin: f32, nstep: i32, l: &mut [u8]) -> (f32, f32) {
    let rdelta = 0.1f32;
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = w[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..32 {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l[..32].fill(0);
        return (0.0, -min);
    }
    let nmaxf = nmax as f32;
    let mut iscale = nmaxf / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..32 {
        let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l[i] = q as u8;
        let diff = scale * q as f32 + min - x[i];
        best_error += w[i] * (diff * diff);
    }
    let mut laux = [0u8; 32];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmaxf) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..32 {
            let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = q as u8;
            let lf = q as f32;
            sum_l += w[i] * lf;
            sum_l2 += w[i] * lf * lf;
            sum_xl += w[i] * lf * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0f32;
            for i in 0..32 {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                cur_error += w[i] * (diff * diff);
            }
            if cur_error < best_error {
                l[..32].copy_from_slice(&laux);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// The shared half of Q4_K and Q5_K: per 32-value sub-block (scale, min)
/// fits, their 6-bit codes packed into `scales`, the f16 super-block
/// scales, then the levels requantized against the coded scales.
/// Returns the 256 levels (0..=nmax) and writes d, dmin and scales to
/// `o[0..16]`.
fn k_scale_min(x: &[f32; 256], nmax: i32, rmin: f32, nstep: i32, o: &mut [u8]) -> [u8; 256] {
    let mut l = [0u8; 256];
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..8 {
        let xs: &[f32; 32] = x[32 * j..32 * j + 32].try_into().unwrap();
        let mut sum_x2 = 0f32;
        for &v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        let mut w = [0f32; 32];
        for (w, &v) in w.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        let (s, m) = make_qkx2(xs, &w, nmax, rmin, nstep, &mut l[32 * j..]);
        scales[j] = s;
        mins[j] = m;
        if s > max_scale {
            max_scale = s;
        }
        if m > max_min {
            max_min = m;
        }
    }
    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let sc = &mut o[4..16];
    sc.fill(0);
    for j in 0..8 {
        // Cast to u8 first (wrapping), then clamp: a negative code wraps
        // high and becomes 63.
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            sc[j] = ls;
            sc[j + 4] = lm;
        } else {
            sc[j + 4] = (ls & 0xf) | ((lm & 0xf) << 4);
            sc[j - 4] |= (ls >> 4) << 6;
            sc[j] |= (lm >> 4) << 6;
        }
    }
    let dh = f16_ggml(max_scale / 63.0);
    let dmh = f16_ggml(max_min / 63.0);
    put_f16(o, 0, dh);
    put_f16(o, 2, dmh);
    let (df, dmf) = (f16_to_f32(dh), f16_to_f32(dmh));
    for j in 0..8 {
        let (s, m) = if j < 4 {
            (o[4 + j] & 63, o[4 + j + 4] & 63)
        } else {
            ((o[4 + j + 4] & 0xf) | ((o[4 + j - 4] >> 6) << 4), (o[4 + j + 4] >> 4) | ((o[4 + j] >> 6) << 4))
        };
        let d = df * s as f32;
        // A zero scale keeps the levels of the fit above.
        if d == 0.0 {
            continue;
        }
        let dm = dmf * m as f32;
        for i in 32 * j..32 * j + 32 {
            l[i] = nearest_int((x[i] + dm) / d).clamp(0, nmax) as u8;
        }
    }
    l
}

fn q4_k(x: &[f32; 256], o: &mut [u8; 144]) {
    let l = k_scale_min(x, 15, -1.0, 20, o);
    let qs = &mut o[16..];
    for (g, q) in qs.chunks_exact_mut(32).enumerate() {
        let j = 64 * g;
        for i in 0..32 {
            q[i] = l[j + i] | (l[j + i + 32] << 4);
        }
    }
}

fn q5_k(x: &[f32; 256], o: &mut [u8; 176]) {
    let l = k_scale_min(x, 31, -0.5, 15, o);
    let (qh, ql) = o[16..].split_at_mut(32);
    qh.fill(0);
    let (mut m1, mut m2) = (1u8, 2u8);
    for (g, q) in ql.chunks_exact_mut(32).enumerate() {
        let n = 64 * g;
        for j in 0..32 {
            let mut l1 = l[n + j];
            if l1 > 15 {
                l1 -= 16;
                qh[j] |= m1;
            }
            let mut l2 = l[n + j + 32];
            if l2 > 15 {
                l2 -= 16;
                qh[j] |= m2;
            }
            q[j] = l1 | (l2 << 4);
        }
        m1 <<= 2;
        m2 <<= 2;
    }
}

/// ggml's make_qx_quants for 16 values, nmax 32, weights x²: a symmetric
/// scale searched over 19 trial scales. Writes levels (0..64) to `l`.
fn make_qx_16(x: &[f32], l: &mut [i8]) -> f32 {
    const NMAX: i32 = 32;
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in &x[..16] {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < 1e-15 {
        l[..16].fill(0);
        return 0.0;
    }
    let mut iscale = -(NMAX as f32) / max;
    let (mut sumlx, mut suml2) = (0f32, 0f32);
    for i in 0..16 {
        let q = nearest_int(iscale * x[i]).clamp(-NMAX, NMAX - 1);
        l[i] = (q + NMAX) as i8;
        let w = x[i] * x[i];
        sumlx += w * x[i] * q as f32;
        suml2 += w * q as f32 * q as f32;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9i32..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(NMAX as f32 + 0.1 * is as f32) / max;
        sumlx = 0.0;
        suml2 = 0.0;
        for &v in &x[..16] {
            let q = nearest_int(iscale * v).clamp(-NMAX, NMAX - 1) as f32;
            let w = v * v;
            sumlx += w * v * q;
            suml2 += w * q * q;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for i in 0..16 {
                l[i] = (NMAX + nearest_int(iscale * x[i]).clamp(-NMAX, NMAX - 1)) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

fn q6_k(x: &[f32; 256], o: &mut [u8; 210]) {
    let mut l = [0i8; 256];
    let mut scales = [0f32; 16];
    let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
    for ib in 0..16 {
        let s = make_qx_16(&x[16 * ib..], &mut l[16 * ib..]);
        scales[ib] = s;
        if s.abs() > max_abs_scale {
            max_abs_scale = s.abs();
            max_scale = s;
        }
    }
    if max_abs_scale < 1e-15 {
        o.fill(0);
        return;
    }
    let iscale = -128.0 / max_scale;
    let dh = f16_ggml(1.0 / iscale);
    put_f16(o, 208, dh);
    let mut sc = [0i8; 16];
    for ib in 0..16 {
        sc[ib] = nearest_int(iscale * scales[ib]).min(127) as i8;
        o[192 + ib] = sc[ib] as u8;
    }
    let df = f16_to_f32(dh);
    for (j, &s) in sc.iter().enumerate() {
        let d = df * s as f32;
        if d == 0.0 {
            continue;
        }
        for i in 16 * j..16 * j + 16 {
            l[i] = (nearest_int(x[i] / d).clamp(-32, 31) + 32) as i8;
        }
    }
    let (ql, qh) = o[..192].split_at_mut(128);
    for h in 0..2 {
        let (j, ql, qh) = (128 * h, &mut ql[64 * h..64 * h + 64], &mut qh[32 * h..32 * h + 32]);
        for i in 0..32 {
            let [a, b, c, d] = [l[j + i], l[j + i + 32], l[j + i + 64], l[j + i + 96]].map(|v| v as u8);
            ql[i] = (a & 0xf) | ((c & 0xf) << 4);
            ql[i + 32] = (b & 0xf) | ((d & 0xf) << 4);
            qh[i] = (a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((d >> 4) << 6);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value as J;

    fn fixture(name: &str) -> Vec<u8> {
        let p = format!("{}/tests/fixtures/gguf/quants/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&p).unwrap_or_else(|e| panic!("{p}: {e}"))
    }

    /// Every fixture case encoded as `ty` must equal the reference bytes
    /// (ggml's quantizers, numpy's f16, gguf-py's bf16) exactly.
    fn check(ty: GgmlType, file: &str) {
        let cases: J = serde_json::from_slice(&fixture("cases.json")).unwrap();
        let xs: Vec<f32> =
            fixture("inputs.f32").chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        let want = fixture(file);
        let (mut at_x, mut at_out, mut n_cases) = (0usize, 0usize, 0);
        for c in cases.as_array().unwrap() {
            let n = c["n_per_row"].as_u64().unwrap() as usize;
            let len = n * c["nrows"].as_u64().unwrap() as usize;
            let x = &xs[at_x..at_x + len];
            at_x += len;
            if !c["types"].as_array().unwrap().iter().any(|t| t == file.trim_end_matches(".bin")) {
                continue;
            }
            let got = quantize(ty, x, n);
            let exp = &want[at_out..at_out + got.len()];
            at_out += got.len();
            n_cases += 1;
            if let Some(i) = got.iter().zip(exp).position(|(a, b)| a != b) {
                let bb = ty.block_bytes();
                panic!(
                    "{} case {}: block {} byte {} differs: got {:#04x}, want {:#04x}\n got  {:02x?}\n want {:02x?}",
                    ty.name(),
                    c["name"],
                    i / bb,
                    i % bb,
                    got[i],
                    exp[i],
                    &got[i / bb * bb..(i / bb + 1) * bb],
                    &exp[i / bb * bb..(i / bb + 1) * bb]
                );
            }
        }
        assert_eq!(at_x, xs.len(), "inputs.f32 holds more values than cases.json lists");
        assert_eq!(at_out, want.len(), "{file} holds more bytes than the cases produce");
        assert!(n_cases >= 2, "{file}: only {n_cases} cases");
    }

    #[test]
    fn f16_matches_numpy() {
        check(GgmlType::F16, "f16.bin");
    }
    #[test]
    fn bf16_matches_gguf_py() {
        check(GgmlType::BF16, "bf16.bin");
    }
    #[test]
    fn q8_0_matches_ggml() {
        check(GgmlType::Q8_0, "q8_0.bin");
    }
    #[test]
    fn q5_0_matches_ggml() {
        check(GgmlType::Q5_0, "q5_0.bin");
    }
    #[test]
    fn q5_1_matches_ggml() {
        check(GgmlType::Q5_1, "q5_1.bin");
    }
    #[test]
    fn q4_k_matches_ggml() {
        check(GgmlType::Q4K, "q4_k.bin");
    }
    #[test]
    fn q5_k_matches_ggml() {
        check(GgmlType::Q5K, "q5_k.bin");
    }
    #[test]
    fn q6_k_matches_ggml() {
        check(GgmlType::Q6K, "q6_k.bin");
    }

    /// ggml's f16 (checked against ggml_quantize_chunk(GGML_TYPE_F16) on
    /// these inputs) equals numpy's except for NaNs, which lose their payload.
    #[test]
    fn ggml_f16_differs_from_numpy_only_for_nan() {
        let xs = fixture("inputs.f32");
        let xs = xs.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap()));
        for x in xs.filter(|x| !x.is_nan()) {
            assert_eq!(f16_ggml(x), f16_numpy(x), "{x:e}");
        }
        assert_eq!(f16_ggml(f32::from_bits(0x7fa0_0001)), 0x7e00);
        assert_eq!(f16_numpy(f32::from_bits(0x7fa0_0001)), 0x7d00);
        assert_eq!(f16_ggml(f32::from_bits(0xffc1_2345)), 0xfe00);
        assert_eq!(f16_numpy(f32::from_bits(0xffc1_2345)), 0xfe09);
    }

    #[test]
    fn rows_encode_independently_of_the_split() {
        // 300 rows of 256: several parallel tasks; each row alone must give
        // the same bytes as its slice of the whole.
        let x: Vec<f32> = (0..300 * 256).map(|i| ((i * 7919 % 10007) as f32 / 10007.0 - 0.5) * 0.1).collect();
        for ty in [GgmlType::Q4K, GgmlType::Q6K, GgmlType::Q8_0, GgmlType::F32] {
            let all = quantize(ty, &x, 256);
            let rb = ty.bytes_for(256);
            assert_eq!(all.len(), 300 * rb);
            for r in [0, 1, 255, 256, 299] {
                assert_eq!(&all[r * rb..(r + 1) * rb], &quantize(ty, &x[r * 256..(r + 1) * 256], 256)[..]);
            }
        }
        let mut out = vec![9u8];
        quantize_into(GgmlType::F32, &[1.5], 1, &mut out);
        assert_eq!(out, [9, 0, 0, 0xc0, 0x3f]);
    }
}
