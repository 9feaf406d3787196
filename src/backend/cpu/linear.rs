//! The frozen-linear forward y[m, n] = x[m, k] · W[n, k]ᵀ (+ bias[n]), with W
//! f32 or kept as bf16 (a bf16 checkpoint as loaded: half the memory and
//! half the bytes to read; widening bf16 to f32 is exact, so the products
//! are those of the f32 copy).
//!
//! Every output is one dot product in a fixed order that depends on k alone:
//! `LANES` partial sums over k (element q goes to lane q % LANES, for q below
//! the largest multiple of LANES), added by a fixed tree, then the remaining
//! k % LANES terms in order, then the bias. So a row of y has the same bits
//! whatever the number of rows beside it (a chunked LM head, a micro-batch
//! split differently, a decoding step and a scoring pass agree exactly) and
//! whatever the number of threads (threads split the W rows only).
//!
//! The loops follow the shapes that matter: a decoding step has a few rows
//! and reads every weight once per step, so W streams from memory once, a
//! chunk of rows per task, prefetched ahead; training products have many
//! rows, so each W chunk stays in L2 while the rows of x pass over it eight
//! at a time from L1. AVX-512 and AVX2+FMA kernels are chosen at run time;
//! other CPUs take a portable loop in AVX2's order.

use rayon::prelude::*;

use super::check_len;
use crate::backend::MatShape;

/// W rows per rayon task: a chunk stays in L2 while x passes over it, and a
/// 1024-row projection still gives the 2–16 threads of a desktop several
/// tasks each.
const ROWS_PER_TASK: usize = 64;

/// Below this many multiply-adds the product runs on the calling thread.
const PAR_THRESHOLD: usize = 1 << 18;

/// A weight matrix's values as stored.
#[derive(Clone, Copy)]
pub(super) enum WeightRows<'a> {
    F32(&'a [f32]),
    /// bf16 bit patterns (the high half of the f32).
    Bf16(&'a [u16]),
}

impl WeightRows<'_> {
    fn len(&self) -> usize {
        match self {
            WeightRows::F32(w) => w.len(),
            WeightRows::Bf16(w) => w.len(),
        }
    }
}

/// Widen a bf16 bit pattern to f32 (exact).
#[inline]
pub(super) fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// y's base pointer, shared by tasks that write disjoint columns.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: tasks write disjoint sets of elements (their own W rows' columns).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// Column j of row 0 (a method, so closures capture the whole `Out`).
    fn col(self, j: usize) -> *mut f32 {
        self.0.wrapping_add(j)
    }
}

/// y[m, n] = x[m, k] · W[n, k]ᵀ (+ bias[n]).
pub(super) fn linear(x: &[f32], w: WeightRows, bias: Option<&[f32]>, y: &mut [f32], shape: MatShape) {
    let MatShape { m, k, n } = shape;
    check_len("linear", "x", x.len(), m * k);
    check_len("linear", "w", w.len(), n * k);
    check_len("linear", "y", y.len(), m * n);
    if let Some(b) = bias {
        check_len("linear", "bias", b.len(), n);
    }
    if m == 0 || n == 0 {
        return;
    }
    let x = &x[..m * k];
    let kernel = Kernel::detect();
    let out = Out(y.as_mut_ptr());
    let run = |t: usize| {
        let j0 = t * ROWS_PER_TASK;
        let rows = ROWS_PER_TASK.min(n - j0);
        let bias = bias.map(|b| &b[j0..j0 + rows]);
        // Columns j0 .. j0+rows of y's m rows (stride n) are this task's
        // alone; y holds m·n elements (checked above).
        let dst = Dst { ptr: out.col(j0), stride: n };
        match w {
            WeightRows::F32(w) => kernel.rows::<false>(x, w[j0 * k..(j0 + rows) * k].as_ptr().cast(), m, k, rows, bias, dst),
            WeightRows::Bf16(w) => kernel.rows::<true>(x, w[j0 * k..(j0 + rows) * k].as_ptr().cast(), m, k, rows, bias, dst),
        }
    };
    let tasks = n.div_ceil(ROWS_PER_TASK);
    if m * n * k >= PAR_THRESHOLD {
        (0..tasks).into_par_iter().for_each(run);
    } else {
        (0..tasks).for_each(run);
    }
}

/// Where a task's output (i, j) goes: `ptr[i·stride + j]`, for its m rows
/// and its W rows j.
#[derive(Clone, Copy)]
struct Dst {
    ptr: *mut f32,
    stride: usize,
}

/// The instruction set the kernel uses on this CPU.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kernel {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

impl Kernel {
    fn detect() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                return Kernel::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Kernel::Avx2;
            }
        }
        Kernel::Portable
    }

    /// dst(i, j) = Σ_q x[i·k + q] · W[j·k + q] (+ bias[j]) for i < m, j <
    /// rows; `w` points at rows·k elements (f32, or bf16 when `BF16`).
    #[allow(clippy::too_many_arguments)]
    fn rows<const BF16: bool>(self, x: &[f32], w: *const u8, m: usize, k: usize, rows: usize, bias: Option<&[f32]>, dst: Dst) {
        debug_assert!(x.len() >= m * k && bias.is_none_or(|b| b.len() >= rows));
        let bias = bias.map_or(std::ptr::null(), <[f32]>::as_ptr);
        match self {
            // SAFETY: the CPU has the instruction set (`detect`); `x` holds m
            // rows of k, `w` rows·k elements and `bias` (when not null) rows
            // values (sliced by the caller), and `dst` m rows of at least
            // `rows` columns — every index the kernels touch is below those.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => unsafe { x86::rows_avx512::<BF16>(x.as_ptr(), w, m, k, rows, bias, dst) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { x86::rows_avx2::<BF16>(x.as_ptr(), w, m, k, rows, bias, dst) },
            // SAFETY: as above.
            Kernel::Portable => unsafe { portable_rows::<BF16>(x, w, m, k, rows, bias, dst) },
        }
    }
}

/// Lanes of the portable loop and of the AVX2 kernel (the AVX-512 kernel
/// has 16): the portable loop sums in AVX2's order.
const PORTABLE_LANES: usize = 8;

/// The portable kernel: the same lanes and order as the AVX2 one.
///
/// # Safety
/// As `Kernel::rows`.
unsafe fn portable_rows<const BF16: bool>(x: &[f32], w: *const u8, m: usize, k: usize, rows: usize, bias: *const f32, dst: Dst) {
    // SAFETY: the caller's bounds (j < rows, q < k).
    let wv = |j: usize, q: usize| unsafe {
        if BF16 { bf16_to_f32(*w.cast::<u16>().add(j * k + q)) } else { *w.cast::<f32>().add(j * k + q) }
    };
    let kv = k / PORTABLE_LANES * PORTABLE_LANES;
    for i in 0..m {
        let xr = &x[i * k..(i + 1) * k];
        for j in 0..rows {
            let mut lanes = [0f32; PORTABLE_LANES];
            for q0 in (0..kv).step_by(PORTABLE_LANES) {
                for (l, acc) in lanes.iter_mut().enumerate() {
                    *acc = xr[q0 + l].mul_add(wv(j, q0 + l), *acc);
                }
            }
            let mut s = reduce8(&lanes);
            for (q, &xq) in xr.iter().enumerate().skip(kv) {
                s = xq.mul_add(wv(j, q), s);
            }
            // SAFETY: i < m, j < rows, as the caller guarantees.
            unsafe {
                if !bias.is_null() {
                    s += *bias.add(j);
                }
                *dst.ptr.add(i * dst.stride + j) = s;
            }
        }
    }
}

/// The AVX2 kernel's horizontal sum of 8 lanes: (l0+l4, l1+l5, l2+l6,
/// l3+l7), then pairs (0+2, 1+3), then the two.
fn reduce8(l: &[f32; 8]) -> f32 {
    let a = [l[0] + l[4], l[1] + l[5], l[2] + l[6], l[3] + l[7]];
    let b = [a[0] + a[2], a[1] + a[3]];
    b[0] + b[1]
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The x86-64 kernels. A tile is NB rows of W against MR rows of x: NB·MR
    //! accumulators of one vector each over the whole of k, every W vector
    //! loaded (and widened) once per tile, every x vector once per W tile.

    use super::Dst;
    use std::arch::x86_64::*;

    /// How far ahead of its use a W row is prefetched: W streams from memory
    /// in a decoding step, and the hardware prefetcher alone leaves the loads
    /// waiting while a tile's FMAs run.
    const PREFETCH_BYTES: usize = 2048;

    /// Loads 16 (AVX-512) or 8 (AVX2) W values at element `q` of row `j` as
    /// f32; bf16 widens by a zero-extend and a 16-bit shift.
    macro_rules! load_w {
        (512, $bf16:expr, $w:expr, $k:expr, $j:expr, $q:expr) => {
            if $bf16 {
                let h = _mm256_loadu_si256($w.cast::<u16>().add($j * $k + $q).cast());
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
            } else {
                _mm512_loadu_ps($w.cast::<f32>().add($j * $k + $q))
            }
        };
        (256, $bf16:expr, $w:expr, $k:expr, $j:expr, $q:expr) => {
            if $bf16 {
                let h = _mm_loadu_si128($w.cast::<u16>().add($j * $k + $q).cast());
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
            } else {
                _mm256_loadu_ps($w.cast::<f32>().add($j * $k + $q))
            }
        };
    }

    /// One W value as f32 (the k tail).
    #[inline(always)]
    unsafe fn w_at<const BF16: bool>(w: *const u8, k: usize, j: usize, q: usize) -> f32 {
        // SAFETY: the caller's bounds (j < rows, q < k).
        unsafe {
            if BF16 { super::bf16_to_f32(*w.cast::<u16>().add(j * k + q)) } else { *w.cast::<f32>().add(j * k + q) }
        }
    }

    /// Sum of 16 lanes: the two halves added lane by lane, then `reduce8`.
    #[target_feature(enable = "avx512f")]
    fn reduce16(v: __m512) -> f32 {
        let lo = _mm512_castps512_ps256(v);
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
        reduce8(_mm256_add_ps(lo, hi))
    }

    /// Sum of 8 lanes: (l0+l4, .., l3+l7), then (0+2, 1+3), then the two —
    /// the order of the portable `reduce8`.
    #[target_feature(enable = "avx2")]
    fn reduce8(v: __m256) -> f32 {
        let a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let b = _mm_add_ps(a, _mm_movehl_ps(a, a));
        _mm_cvtss_f32(_mm_add_ss(b, _mm_shuffle_ps::<1>(b, b)))
    }

    macro_rules! tile_fn {
        ($name:ident, $feat:literal, $bits:tt, $lanes:expr, $zero:ident, $loadx:ident, $fma:ident, $reduce:ident) => {
            /// dst(i, j) for W rows j0 .. j0+NB and x rows i0 .. i0+MR.
            #[target_feature(enable = $feat)]
            #[allow(clippy::too_many_arguments)]
            unsafe fn $name<const BF16: bool, const NB: usize, const MR: usize>(
                x: *const f32,
                w: *const u8,
                k: usize,
                j0: usize,
                i0: usize,
                bias: *const f32,
                dst: Dst,
            ) {
                let kv = k / $lanes * $lanes;
                let mut acc = [[$zero(); MR]; NB];
                let mut q = 0;
                // SAFETY (all pointer reads and writes below): j0+NB ≤ rows,
                // i0+MR ≤ m, q < k, as the caller guarantees; a prefetch
                // never faults.
                unsafe {
                    while q < kv {
                        for jj in 0..NB {
                            let ahead = ((j0 + jj) * k + q) * if BF16 { 2 } else { 4 } + PREFETCH_BYTES;
                            _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(ahead).cast());
                        }
                        let mut wv = [$zero(); NB];
                        for (jj, v) in wv.iter_mut().enumerate() {
                            *v = load_w!($bits, BF16, w, k, j0 + jj, q);
                        }
                        for ii in 0..MR {
                            let xv = $loadx(x.add((i0 + ii) * k + q));
                            for jj in 0..NB {
                                acc[jj][ii] = $fma(wv[jj], xv, acc[jj][ii]);
                            }
                        }
                        q += $lanes;
                    }
                    for jj in 0..NB {
                        for ii in 0..MR {
                            let mut s = $reduce(acc[jj][ii]);
                            for q in kv..k {
                                s = (*x.add((i0 + ii) * k + q)).mul_add(w_at::<BF16>(w, k, j0 + jj, q), s);
                            }
                            if !bias.is_null() {
                                s += *bias.add(j0 + jj);
                            }
                            *dst.ptr.add((i0 + ii) * dst.stride + j0 + jj) = s;
                        }
                    }
                }
            }
        };
    }

    tile_fn!(tile512, "avx512f", 512, 16, _mm512_setzero_ps, _mm512_loadu_ps, _mm512_fmadd_ps, reduce16);
    tile_fn!(tile256, "avx2,fma", 256, 8, _mm256_setzero_ps, _mm256_loadu_ps, _mm256_fmadd_ps, reduce8);

    macro_rules! rows_fn {
        ($name:ident, $feat:literal, $tile:ident, $nb:literal, $mr:literal, $nb1:literal) => {
            /// Every tile of `rows` W rows against the m rows of x: MR rows
            /// of x at a time (the rest in one smaller tile), each against
            /// the task's W rows NB at a time (single rows at the end; NB1 at
            /// a time when x has one row, for more loads in flight).
            #[target_feature(enable = $feat)]
            pub(super) unsafe fn $name<const BF16: bool>(
                x: *const f32,
                w: *const u8,
                m: usize,
                k: usize,
                rows: usize,
                bias: *const f32,
                dst: Dst,
            ) {
                // SAFETY: forwarded bounds (see `Kernel::rows`).
                unsafe {
                    let mut i = 0;
                    while i < m {
                        let mr = (m - i).min($mr);
                        let mut j = 0;
                        while j < rows {
                            macro_rules! go {
                                ($n:literal) => {
                                    match mr {
                                        1 => $tile::<BF16, $n, 1>(x, w, k, j, i, bias, dst),
                                        2 => $tile::<BF16, $n, 2>(x, w, k, j, i, bias, dst),
                                        3 => $tile::<BF16, $n, 3>(x, w, k, j, i, bias, dst),
                                        4 => $tile::<BF16, $n, 4>(x, w, k, j, i, bias, dst),
                                        5 => $tile::<BF16, $n, 5>(x, w, k, j, i, bias, dst),
                                        6 => $tile::<BF16, $n, 6>(x, w, k, j, i, bias, dst),
                                        7 => $tile::<BF16, $n, 7>(x, w, k, j, i, bias, dst),
                                        _ => $tile::<BF16, $n, $mr>(x, w, k, j, i, bias, dst),
                                    }
                                };
                            }
                            let left = rows - j;
                            if m == 1 && left >= $nb1 {
                                $tile::<BF16, $nb1, 1>(x, w, k, j, i, bias, dst);
                                j += $nb1;
                            } else if left >= $nb {
                                go!($nb);
                                j += $nb;
                            } else {
                                go!(1);
                                j += 1;
                            }
                        }
                        i += mr;
                    }
                }
            }
        };
    }

    // AVX-512: 32 registers hold 3×8 accumulators, 3 W vectors and x.
    rows_fn!(rows_avx512, "avx512f", tile512, 3, 8, 8);
    // AVX2: 16 registers hold 2×4 accumulators, 2 W vectors and x.
    rows_fn!(rows_avx2, "avx2,fma", tile256, 2, 4, 8);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::test_util::{Rng, assert_bits_eq, assert_close, with_threads};

    fn naive(x: &[f32], w: &[f32], bias: Option<&[f32]>, m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut y = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let b = bias.map_or(0.0, |b| b[j] as f64);
                y[i * n + j] = b + (0..k).map(|q| x[i * k + q] as f64 * w[j * k + q] as f64).sum::<f64>();
            }
        }
        y
    }

    fn to_bf16(v: &[f32]) -> Vec<u16> {
        v.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect()
    }

    fn kernels() -> Vec<Kernel> {
        let mut kernels = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                kernels.push(Kernel::Avx512);
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                kernels.push(Kernel::Avx2);
            }
        }
        kernels
    }

    fn run(kernel: Kernel, x: &[f32], w: WeightRows, bias: Option<&[f32]>, m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut y = vec![f32::NAN; m * n];
        let dst = Dst { ptr: y.as_mut_ptr(), stride: n };
        match w {
            WeightRows::F32(w) => kernel.rows::<false>(x, w.as_ptr().cast(), m, k, n, bias, dst),
            WeightRows::Bf16(w) => kernel.rows::<true>(x, w.as_ptr().cast(), m, k, n, bias, dst),
        }
        y
    }

    /// Every kernel this CPU has, on shapes with x-row, W-row and k tails,
    /// f32 and bf16 weights, with and without bias, against an f64 product of
    /// the same (widened) values.
    #[test]
    fn every_kernel_matches_the_f64_product() {
        let mut rng = Rng::new(21);
        for &(m, k, n) in &[(1, 1, 1), (1, 64, 9), (3, 37, 6), (5, 100, 13), (8, 256, 70), (16, 48, 5), (19, 40, 11)] {
            let x = rng.vec(m * k, 1.0);
            let w = rng.vec(n * k, 1.0);
            let b = rng.vec(n, 1.0);
            let wb = to_bf16(&w);
            let widened: Vec<f32> = wb.iter().map(|&b| bf16_to_f32(b)).collect();
            for kernel in kernels() {
                for bias in [None, Some(&b[..])] {
                    let got = run(kernel, &x, WeightRows::F32(&w), bias, m, k, n);
                    // f32 sums of ≤ 256 products of values in [-1, 1].
                    assert_close(&format!("{kernel:?} f32 {m}x{k}x{n}"), &got, &naive(&x, &w, bias, m, k, n), 1e-5);
                    let got = run(kernel, &x, WeightRows::Bf16(&wb), bias, m, k, n);
                    assert_close(&format!("{kernel:?} bf16 {m}x{k}x{n}"), &got, &naive(&x, &widened, bias, m, k, n), 1e-5);
                }
            }
        }
    }

    /// The AVX2 kernel and the portable loop add in the same order: equal bits.
    #[test]
    fn portable_loop_sums_in_the_avx2_order() {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            let mut rng = Rng::new(22);
            let (m, k, n) = (11, 203, 11);
            let x = rng.vec(m * k, 1.0);
            let w = rng.vec(n * k, 1.0);
            let b = rng.vec(n, 1.0);
            let avx2 = run(Kernel::Avx2, &x, WeightRows::F32(&w), Some(&b), m, k, n);
            assert_bits_eq("avx2 vs portable", &avx2, &run(Kernel::Portable, &x, WeightRows::F32(&w), Some(&b), m, k, n));
        }
    }

    /// A row of y has the same bits whether it is computed alone, among a
    /// few rows or among many, and for any thread count.
    #[test]
    fn rows_do_not_depend_on_the_rows_beside_them_or_the_threads() {
        let mut rng = Rng::new(23);
        let (m, k, n) = (40, 512, 300);
        let x = rng.vec(m * k, 1.0);
        let w = to_bf16(&rng.vec(n * k, 1.0));
        let b = rng.vec(n, 1.0);
        let all = |threads, rows: std::ops::Range<usize>| {
            with_threads(threads, || {
                let mut y = vec![f32::NAN; rows.len() * n];
                let shape = MatShape { m: rows.len(), k, n };
                linear(&x[rows.start * k..rows.end * k], WeightRows::Bf16(&w), Some(&b), &mut y, shape);
                y
            })
        };
        let whole = all(1, 0..m);
        assert_bits_eq("1 vs 3 threads", &whole, &all(3, 0..m));
        for rows in [0..1, 3..8, 8..24, 24..40] {
            let part = all(2, rows.clone());
            assert_bits_eq(&format!("rows {rows:?} alone"), &part, &whole[rows.start * n..rows.end * n]);
        }
        let widened: Vec<f32> = w.iter().map(|&b| bf16_to_f32(b)).collect();
        assert_close("linear + bias", &whole, &naive(&x, &widened, Some(&b), m, k, n), 1e-5);
    }
}
