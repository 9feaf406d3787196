//! Buffer-level ops of the CPU backend: weight loading (checkpoint bytes to
//! f32, bf16 kept as bf16), the elementwise ops, `sum_sq` and the embedding
//! gather.

use anyhow::{Result, bail};
use half::f16;
use rayon::prelude::*;

use super::linear::bf16_to_f32;
use super::{CpuWeight, check_len};
use crate::backend::{DType, WeightSource};

/// Elements per rayon task for elementwise ops (fixed, so results never
/// depend on the thread count; elementwise ops are order-free anyway).
pub(super) const CHUNK: usize = 1 << 14;

/// Decodes little-endian F32/F16/BF16 checkpoint bytes: BF16 stays bf16
/// (every op widens it exactly), F32 and F16 become f32. The bytes may sit at
/// any alignment (e.g. inside a memory map), so they are decoded with
/// `from_le_bytes` on fixed-size chunks, never cast in place.
pub(super) fn load_weight(src: &WeightSource) -> Result<CpuWeight> {
    let size = src.dtype.size();
    let Some(expected) = src.numel.checked_mul(size) else {
        bail!(
            "load_weight: numel {} x {} bytes overflows",
            src.numel,
            size
        );
    };
    if src.bytes.len() != expected {
        bail!(
            "load_weight: {:?} tensor of {} elements needs {} bytes, got {}",
            src.dtype,
            src.numel,
            expected,
            src.bytes.len()
        );
    }
    if src.dtype == DType::BF16 {
        let mut out = vec![0u16; src.numel];
        out.par_chunks_mut(CHUNK).zip(src.bytes.par_chunks(CHUNK * 2)).for_each(|(dst, bytes)| {
            for (d, b) in dst.iter_mut().zip(bytes.chunks_exact(2)) {
                *d = u16::from_le_bytes([b[0], b[1]]);
            }
        });
        return Ok(CpuWeight::Bf16(out));
    }
    let mut out = vec![0.0f32; src.numel];
    out.par_chunks_mut(CHUNK)
        .zip(src.bytes.par_chunks(CHUNK * size))
        .for_each(|(dst, bytes)| match src.dtype {
            DType::F32 => {
                for (d, b) in dst.iter_mut().zip(bytes.chunks_exact(4)) {
                    *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            DType::F16 => {
                for (d, b) in dst.iter_mut().zip(bytes.chunks_exact(2)) {
                    *d = f16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
            DType::BF16 => unreachable!("bf16 is kept as bf16 above"),
        });
    Ok(CpuWeight::Dense(out))
}

/// bf16 bit patterns widened to f32 (exact).
pub(super) fn widen_bf16(v: &[u16]) -> Vec<f32> {
    let mut out = vec![0f32; v.len()];
    out.par_chunks_mut(CHUNK).zip(v.par_chunks(CHUNK)).for_each(|(d, s)| {
        for (d, &b) in d.iter_mut().zip(s) {
            *d = bf16_to_f32(b);
        }
    });
    out
}

pub(super) fn fill(buf: &mut [f32], value: f32) {
    buf.par_chunks_mut(CHUNK).for_each(|c| c.fill(value));
}

pub(super) fn copy_slice(src: &[f32], src_off: usize, dst: &mut [f32], dst_off: usize, len: usize) {
    let src_end = src_off
        .checked_add(len)
        .expect("copy_slice: src range overflows");
    let dst_end = dst_off
        .checked_add(len)
        .expect("copy_slice: dst range overflows");
    check_len("copy_slice", "src", src.len(), src_end);
    check_len("copy_slice", "dst", dst.len(), dst_end);
    dst[dst_off..dst_end]
        .par_chunks_mut(CHUNK)
        .zip(src[src_off..src_end].par_chunks(CHUNK))
        .for_each(|(d, s)| d.copy_from_slice(s));
}

/// Row s of `src` [rows, width] to row s·capacity + positions[s] of `dst`;
/// see `Backend::scatter_rows`.
pub(super) fn scatter_rows(src: &[f32], dst: &mut [f32], positions: &[i32], rows: usize, width: usize, capacity: usize) {
    const OP: &str = "scatter_rows";
    check_len(OP, "src", src.len(), rows * width);
    check_len(OP, "positions", positions.len(), rows);
    for (s, &p) in positions[..rows].iter().enumerate() {
        let p = usize::try_from(p).ok().filter(|&p| p < capacity);
        let p = p.unwrap_or_else(|| panic!("{OP}: position {} of row {s} is outside the capacity {capacity}", positions[s]));
        let at = (s * capacity + p) * width;
        check_len(OP, "dst", dst.len(), at + width);
        dst[at..at + width].copy_from_slice(&src[s * width..(s + 1) * width]);
    }
}

/// buf = cap · tanh(buf / cap), f32.
pub(super) fn softcap(buf: &mut [f32], cap: f32) {
    assert!(cap > 0.0, "softcap: cap {cap} must be positive");
    buf.par_chunks_mut(CHUNK).for_each(|c| {
        for x in c {
            *x = cap * (*x / cap).tanh();
        }
    });
}

/// dst[r, dst_off + j] = src[r, src_off + j] for r < rows, j < width.
pub(super) fn copy_cols(src: &[f32], dst: &mut [f32], shape: crate::backend::ColsShape) {
    let crate::backend::ColsShape { rows, src_cols, src_off, dst_cols, dst_off, width } = shape;
    assert!(src_off + width <= src_cols, "copy_cols: columns {src_off}..{} outside a source of {src_cols}", src_off + width);
    assert!(dst_off + width <= dst_cols, "copy_cols: columns {dst_off}..{} outside a destination of {dst_cols}", dst_off + width);
    check_len("copy_cols", "src", src.len(), rows * src_cols);
    check_len("copy_cols", "dst", dst.len(), rows * dst_cols);
    if rows == 0 || width == 0 {
        return;
    }
    dst[..rows * dst_cols]
        .par_chunks_mut(dst_cols)
        .zip(src[..rows * src_cols].par_chunks(src_cols))
        .for_each(|(d, s)| d[dst_off..dst_off + width].copy_from_slice(&s[src_off..src_off + width]));
}

pub(super) fn add_assign(dst: &mut [f32], src: &[f32]) {
    assert_eq!(dst.len(), src.len(), "add_assign: length mismatch");
    dst.par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .for_each(|(d, s)| {
            for (d, s) in d.iter_mut().zip(s) {
                *d += *s;
            }
        });
}

pub(super) fn scale(buf: &mut [f32], s: f32) {
    buf.par_chunks_mut(CHUNK).for_each(|c| {
        for x in c {
            *x *= s;
        }
    });
}

/// Σ x² in f64: sequential within fixed chunks of `CHUNK` elements, then the
/// chunk sums are added sequentially in chunk order.
pub(super) fn sum_sq(buf: &[f32]) -> f64 {
    let partials: Vec<f64> = buf
        .par_chunks(CHUNK)
        .map(|c| {
            c.iter()
                .map(|&x| (x as f64) * (x as f64))
                .fold(0.0, |a, b| a + b)
        })
        .collect();
    partials.iter().fold(0.0, |a, b| a + b)
}

pub(super) fn embedding(table: &CpuWeight, ids: &[i32], out: &mut [f32], n: usize, hidden: usize) {
    check_len("embedding", "ids", ids.len(), n);
    check_len("embedding", "out", out.len(), n * hidden);
    if n == 0 || hidden == 0 {
        return;
    }
    match table {
        CpuWeight::Dense(t) => gather(t, ids, out, n, hidden, |v| v),
        CpuWeight::Bf16(t) => gather(t, ids, out, n, hidden, bf16_to_f32),
        CpuWeight::Nf4(_) => panic!("embedding: NF4 weights are only accepted by linear and linear_backward_input"),
    }
}

/// out[i, :] = widen(table[ids[i], :]).
fn gather<T: Copy + Sync>(table: &[T], ids: &[i32], out: &mut [f32], n: usize, hidden: usize, widen: impl Fn(T) -> f32 + Sync) {
    let vocab = table.len() / hidden;
    out[..n * hidden].par_chunks_mut(hidden).zip(&ids[..n]).for_each(|(row, &id)| {
        assert!(id >= 0 && (id as usize) < vocab, "embedding: token id {id} outside [0, {vocab})");
        let id = id as usize;
        for (d, &v) in row.iter_mut().zip(&table[id * hidden..(id + 1) * hidden]) {
            *d = widen(v);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::super::{CpuBackend, CpuWeight};
    use super::super::test_util::Rng;
    use crate::backend::{Backend, DType, WeightSource};

    #[test]
    fn load_weight_all_dtypes_and_unaligned() {
        let be = CpuBackend::new();
        let vals = [1.0f32, -2.5, 0.1, 65504.0, -0.0, 3.140625];

        // Every dtype, at every byte offset 0..4 inside a buffer, so at least
        // one slice start is misaligned for f32 and for the 16-bit types.
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let mut enc = Vec::new();
            let mut want = Vec::new();
            for v in vals {
                match dtype {
                    DType::F32 => {
                        enc.extend_from_slice(&v.to_le_bytes());
                        want.push(v);
                    }
                    DType::F16 => {
                        let h = half::f16::from_f32(v);
                        enc.extend_from_slice(&h.to_le_bytes());
                        want.push(h.to_f32());
                    }
                    DType::BF16 => {
                        let h = half::bf16::from_f32(v);
                        enc.extend_from_slice(&h.to_le_bytes());
                        want.push(h.to_f32());
                    }
                }
            }
            let mut misaligned_seen = false;
            for off in 0..4 {
                let mut raw = vec![0xAAu8; off];
                raw.extend_from_slice(&enc);
                let bytes = &raw[off..];
                misaligned_seen |= !(bytes.as_ptr() as usize).is_multiple_of(dtype.size());
                let w = be
                    .load_weight(&WeightSource {
                        dtype,
                        bytes,
                        numel: vals.len(),
                    })
                    .unwrap();
                assert_eq!(
                    be.weight_to_f32(&w).iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    want.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    "{dtype:?} at offset {off}"
                );
            }
            assert!(
                misaligned_seen,
                "{dtype:?}: test never exercised a misaligned slice"
            );
        }
        // Spot-check exact known encodings.
        let one_bf16 = 0x3F80u16.to_le_bytes();
        let one_f16 = 0x3C00u16.to_le_bytes();
        let w = be
            .load_weight(&WeightSource {
                dtype: DType::BF16,
                bytes: &one_bf16,
                numel: 1,
            })
            .unwrap();
        assert_eq!(be.weight_to_f32(&w), vec![1.0]);
        let w = be
            .load_weight(&WeightSource {
                dtype: DType::F16,
                bytes: &one_f16,
                numel: 1,
            })
            .unwrap();
        assert_eq!(be.weight_to_f32(&w), vec![1.0]);
    }

    #[test]
    fn load_weight_large_crosses_chunks() {
        let be = CpuBackend::new();
        let n = super::CHUNK * 2 + 17;
        let mut rng = Rng::new(3);
        let vals: Vec<f32> = rng.vec(n, 10.0);
        let mut raw = vec![0u8; 3];
        for v in &vals {
            raw.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes());
        }
        let w = be
            .load_weight(&WeightSource {
                dtype: DType::BF16,
                bytes: &raw[3..],
                numel: n,
            })
            .unwrap();
        for (g, v) in be.weight_to_f32(&w).iter().zip(&vals) {
            assert_eq!(*g, half::bf16::from_f32(*v).to_f32());
        }
    }

    #[test]
    fn load_weight_size_mismatch_errors() {
        let be = CpuBackend::new();
        let bytes = [0u8; 10];
        for (dtype, numel) in [
            (DType::F32, 3),
            (DType::F16, 4),
            (DType::BF16, 6),
            (DType::F32, 0),
        ] {
            let err = be
                .load_weight(&WeightSource {
                    dtype,
                    bytes: &bytes,
                    numel,
                })
                .unwrap_err();
            assert!(err.to_string().contains("needs"), "{err}");
        }
        assert!(
            be.load_weight(&WeightSource {
                dtype: DType::F16,
                bytes: &bytes,
                numel: 5
            })
            .is_ok()
        );
        let empty = be
            .load_weight(&WeightSource {
                dtype: DType::F16,
                bytes: &[],
                numel: 0,
            })
            .unwrap();
        assert_eq!(be.weight_len(&empty), 0);
    }

    #[test]
    fn elementwise_ops() {
        let be = CpuBackend::new();
        let mut rng = Rng::new(1);
        let a = rng.vec(1000, 2.0);
        let b = rng.vec(1000, 2.0);

        let mut d = be.upload(&a);
        be.add_assign(&mut d, &b);
        for i in 0..1000 {
            assert_eq!(d[i], a[i] + b[i]);
        }
        be.scale(&mut d, 0.5);
        for i in 0..1000 {
            assert_eq!(d[i], (a[i] + b[i]) * 0.5);
        }
        be.fill(&mut d, 7.0);
        assert!(d.iter().all(|&x| x == 7.0));

        let mut dst = be.zeros(20);
        be.copy_slice(&a, 5, &mut dst, 10, 8);
        assert_eq!(&dst[10..18], &a[5..13]);
        assert!(dst[..10].iter().chain(&dst[18..]).all(|&x| x == 0.0));
        assert_eq!(be.len(&dst), 20);
        assert_eq!(be.download(&dst), dst);

        let want: f64 = a.iter().map(|&x| (x as f64) * (x as f64)).sum();
        assert!((be.sum_sq(&a) - want).abs() <= 1e-12 * want);
        // Large buffer: chunked f64 sum agrees with a plain sequential f64 sum
        // to f64 rounding, and is bit-identical across thread counts.
        let big = rng.vec(super::CHUNK * 3 + 5, 1.0);
        let seq: f64 = big.iter().map(|&x| (x as f64) * (x as f64)).sum();
        let s1 = super::super::test_util::with_threads(1, || be.sum_sq(&big));
        let s2 = super::super::test_util::with_threads(2, || be.sum_sq(&big));
        assert_eq!(s1.to_bits(), s2.to_bits());
        assert!((s1 - seq).abs() <= 1e-12 * seq);
    }

    #[test]
    fn embedding_gathers_rows() {
        let be = CpuBackend::new();
        let table: Vec<f32> = (0..5 * 3).map(|i| i as f32).collect();
        let ids = be.upload_ints(&[4, 0, 2, 2]);
        let mut out = be.zeros(4 * 3);
        be.embedding(&be.weight_from_f32(&table), &ids, &mut out, 4, 3);
        assert_eq!(out, vec![12., 13., 14., 0., 1., 2., 6., 7., 8., 6., 7., 8.]);
    }

    #[test]
    fn a_bf16_checkpoint_stays_bf16_and_gathers_its_widened_rows() {
        let be = CpuBackend::new();
        let vals: Vec<f32> = (0..4 * 3).map(|i| i as f32 * 0.3 - 1.0).collect();
        let raw: Vec<u8> = vals.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect();
        let table = be.load_weight(&WeightSource { dtype: DType::BF16, bytes: &raw, numel: 12 }).unwrap();
        assert!(matches!(table, CpuWeight::Bf16(_)), "{table:?}");
        let widened: Vec<f32> = vals.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
        assert_eq!(be.weight_to_f32(&table), widened);
        let ids = be.upload_ints(&[3, 0, 3]);
        let mut out = be.zeros(3 * 3);
        be.embedding(&table, &ids, &mut out, 3, 3);
        let want: Vec<f32> = [3, 0, 3].iter().flat_map(|&r| widened[r * 3..r * 3 + 3].to_vec()).collect();
        assert_eq!(out, want);
    }

    #[test]
    #[should_panic(expected = "token id 5 outside")]
    fn embedding_rejects_bad_id() {
        let be = CpuBackend::new();
        let mut out = be.zeros(3);
        be.embedding(&be.weight_from_f32(&[0.0; 15]), &vec![5], &mut out, 1, 3);
    }

    #[test]
    fn copy_cols_moves_one_block_of_columns() {
        // A fused [q | k | v] row layout (widths 4, 2, 2) split and reassembled.
        use crate::backend::ColsShape;
        let be = CpuBackend::new();
        let (rows, cols) = (3, 8);
        let fused: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        let mut k = vec![f32::NAN; rows * 2];
        be.copy_cols(&fused, &mut k, ColsShape { rows, src_cols: cols, src_off: 4, dst_cols: 2, dst_off: 0, width: 2 });
        assert_eq!(k, vec![4.0, 5.0, 12.0, 13.0, 20.0, 21.0]);
        let mut back = vec![-1.0; rows * cols];
        be.copy_cols(&k, &mut back, ColsShape { rows, src_cols: 2, src_off: 0, dst_cols: cols, dst_off: 4, width: 2 });
        for r in 0..rows {
            for c in 0..cols {
                let want = if (4..6).contains(&c) { fused[r * cols + c] } else { -1.0 };
                assert_eq!(back[r * cols + c], want, "row {r} col {c}");
            }
        }
    }
}
