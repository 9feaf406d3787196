//! Matrix products through the `gemm` crate (the frozen linear's backward,
//! attention and LoRA products), and the backend-level tests of both
//! frozen-linear ops (the forward is linear.rs).

use gemm::Parallelism;

use super::check_len;
use crate::backend::MatShape;

/// Products with fewer multiply-adds than this run single-threaded.
const PAR_THRESHOLD: usize = 1 << 18;

/// Read-only strided matrix view: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(super) struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major `[rows, cols]` matrix stored at the start of `data`.
    pub(super) fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        MatRef {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose (no copy).
    pub(super) fn t(self) -> Self {
        MatRef {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    #[track_caller]
    fn check(&self, op: &str, what: &str) {
        if self.rows > 0 && self.cols > 0 {
            let need = (self.rows - 1) * self.rs + (self.cols - 1) * self.cs + 1;
            check_len(op, what, self.data.len(), need);
        }
    }
}

/// `dst[m, n]` (row-major, contiguous) = (`accumulate` ? dst : 0) + alpha · a[m, k] · b[k, n].
///
/// `gemm` parallelises over output blocks and blocks the depth by cache
/// size only, so the result is bit-identical for any thread count.
#[track_caller]
pub(super) fn matmul(
    op: &str,
    dst: &mut [f32],
    a: MatRef,
    b: MatRef,
    alpha: f32,
    accumulate: bool,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(
        b.rows, k,
        "{op}: inner dimensions differ ({k} vs {})",
        b.rows
    );
    a.check(op, "lhs");
    b.check(op, "rhs");
    check_len(op, "dst", dst.len(), m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    let par = if m * n * k >= PAR_THRESHOLD {
        Parallelism::Rayon(0)
    } else {
        Parallelism::None
    };
    // SAFETY: the views were bounds-checked above for every index the strides
    // reach, `dst` holds m*n elements, and `dst` (a unique borrow) cannot
    // alias the shared `a.data` / `b.data`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            alpha,
            false,
            false,
            false,
            par,
        );
    }
}

/// dx[m, k] (+)= dy[m, n] · W[n, k].
pub(super) fn linear_backward_input(dy: &[f32], w: &[f32], dx: &mut [f32], shape: MatShape, accumulate: bool) {
    let MatShape { m, k, n } = shape;
    check_len("linear_backward_input", "dy", dy.len(), m * n);
    check_len("linear_backward_input", "w", w.len(), n * k);
    check_len("linear_backward_input", "dx", dx.len(), m * k);
    matmul(
        "linear_backward_input",
        dx,
        MatRef::new(dy, m, n),
        MatRef::new(w, n, k),
        1.0,
        accumulate,
    );
}

#[cfg(test)]
mod tests {
    use super::super::CpuBackend;
    use super::super::test_util::{
        Rng, assert_bits_eq, assert_close, dot64, fd_grad, to64, with_threads,
    };
    use crate::backend::{Backend, MatShape};

    /// y = x·Wᵀ + b in f64.
    fn linear64(x: &[f64], w: &[f64], b: Option<&[f64]>, m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut y = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = b.map_or(0.0, |b| b[j]);
                for l in 0..k {
                    s += x[i * k + l] * w[j * k + l];
                }
                y[i * n + j] = s;
            }
        }
        y
    }

    #[test]
    fn linear_matches_naive() {
        let be = CpuBackend::new();
        let mut rng = Rng::new(10);
        // Small (single-threaded path) and large enough for the rayon path.
        for &(m, k, n) in &[(1, 1, 1), (3, 5, 7), (17, 33, 9), (70, 80, 60)] {
            let x = rng.vec(m * k, 1.0);
            let w = rng.vec(n * k, 1.0);
            let b = rng.vec(n, 1.0);
            for with_bias in [false, true] {
                let mut y = vec![f32::NAN; m * n];
                let bias = be.weight_from_f32(&b);
                be.linear(&x, &be.weight_from_f32(&w), with_bias.then_some(&bias), &mut y, MatShape { m, k, n });
                let want = linear64(
                    &to64(&x),
                    &to64(&w),
                    with_bias.then_some(&to64(&b)[..]),
                    m,
                    k,
                    n,
                );
                // f32 dot products of length <= 80 over values in [-1, 1].
                assert_close("linear", &y, &want, 1e-5);
            }
        }
    }

    #[test]
    fn linear_backward_input_matches_naive_and_fd() {
        let be = CpuBackend::new();
        let mut rng = Rng::new(11);
        let (m, k, n) = (6, 9, 5);
        let x = rng.vec(m * k, 1.0);
        let w = rng.vec(n * k, 1.0);
        let r = rng.vec(m * n, 1.0);
        // L = Σ (x·Wᵀ) ⊙ R; dL/dx by central differences in f64 (h = 1e-6,
        // the function is linear so FD is exact up to rounding ~1e-10).
        let (w64, r64) = (to64(&w), to64(&r));
        let fd = fd_grad(&to64(&x), 1e-6, |x| {
            dot64(&linear64(x, &w64, None, m, k, n), &r64)
        });
        let mut dx = vec![f32::NAN; m * k];
        be.linear_backward_input(&r, &be.weight_from_f32(&w), &mut dx, MatShape { m, k, n }, false);
        assert_close("dx (overwrite)", &dx, &fd, 1e-5);

        // accumulate = true adds onto what is there.
        let base = rng.vec(m * k, 1.0);
        let mut dx2 = base.clone();
        be.linear_backward_input(&r, &be.weight_from_f32(&w), &mut dx2, MatShape { m, k, n }, true);
        let want: Vec<f64> = fd.iter().zip(&base).map(|(g, b)| g + *b as f64).collect();
        assert_close("dx (accumulate)", &dx2, &want, 1e-5);
    }

    #[test]
    fn gemm_is_deterministic_across_runs_and_thread_counts() {
        let be = CpuBackend::new();
        let mut rng = Rng::new(12);
        let (m, k, n) = (131, 257, 190);
        let x = rng.vec(m * k, 1.0);
        let w = rng.vec(n * k, 1.0);
        let run = |threads| {
            with_threads(threads, || {
                let mut y = vec![0.0; m * n];
                be.linear(&x, &be.weight_from_f32(&w), None, &mut y, MatShape { m, k, n });
                y
            })
        };
        let a = run(1);
        let b = run(4);
        let c = run(4);
        assert_bits_eq("gemm 1 vs 4 threads", &a, &b);
        assert_bits_eq("gemm run to run", &b, &c);
        // And it is right.
        let want = linear64(&to64(&x), &to64(&w), None, m, k, n);
        assert_close("big linear", &a, &want, 1e-5);
    }

    #[test]
    fn larger_buffers_only_prefix_touched() {
        let be = CpuBackend::new();
        let x = vec![1.0, 2.0, 3.0, 4.0, 99.0];
        let w = vec![1.0, 1.0];
        let mut y = vec![-7.0; 4];
        be.linear(&x, &be.weight_from_f32(&w), None, &mut y, MatShape { m: 2, k: 2, n: 1 });
        assert_eq!(y, vec![3.0, 7.0, -7.0, -7.0]);
    }
}
