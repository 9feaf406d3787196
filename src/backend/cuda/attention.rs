//! Flash attention launches (cuda/flash_attn.cu; its header comment is the
//! launch contract these follow): tensor-core kernels for head_dim 64 and
//! 128, generic one-warp-per-row kernels (cuda/flash_attn_generic.cu) for
//! any other head_dim <= 256 and, with twice the registers per lane, for
//! 257..=512 (kernels are looked up by name, in any module).
//! The backward runs the preprocess (dsum = Σ dout·out), then dq and dk/dv
//! as separate deterministic kernels (no atomics). A soft-capped shape runs
//! the `*_capped_*` twin of each kernel (one more argument, the cap), so the
//! plain kernels are untouched by it. Generation's decode_attention (new
//! tokens against a KV cache) and its batched form are cuda/decode_attn.cu;
//! the batch's scatter of new keys and values into the cache is
//! `scatter_rows` of cuda/copy_cols.cu.

use super::backend::{BLOCK, CudaBackend, launch, rows_grid};
use super::buffers::CudaBuf;
use crate::backend::{AttnSaved, AttnShape, Qkv, QkvGrads, Varlen};
use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

const TILE: usize = 64;
const THREADS: u32 = 128;
/// The largest head_dim of the generic prefill kernels and of the decode
/// kernels: their wide instantiation (cuda/flash_attn_generic.cu,
/// cuda/decode_attn.cu) holds 16 elements of a row per lane.
pub(super) const MAX_HEAD_DIM: usize = 512;
/// The largest head_dim of their narrow instantiation (8 per lane), the
/// one every head up to this size runs.
const NARROW_HEAD_DIM: usize = 256;

/// Dynamic shared memory of each tensor-core kernel (from the contract).
pub const SMEM: &[(&str, u32)] = &[
    ("flash_attn_fwd_d64", 18432),
    ("flash_attn_fwd_d128", 34816),
    ("flash_attn_bwd_dq_d64", 36864),
    ("flash_attn_bwd_dq_d128", 69632),
    ("flash_attn_bwd_dkdv_d64", 37376),
    ("flash_attn_bwd_dkdv_d128", 52480),
    // The soft-capped twins: the same tiles.
    ("flash_attn_fwd_capped_d64", 18432),
    ("flash_attn_fwd_capped_d128", 34816),
    ("flash_attn_bwd_dq_capped_d64", 36864),
    ("flash_attn_bwd_dq_capped_d128", 69632),
    ("flash_attn_bwd_dkdv_capped_d64", 37376),
    ("flash_attn_bwd_dkdv_capped_d128", 52480),
];

/// Allow the kernels above 48 KiB their dynamic shared memory (once, at start).
pub fn configure(be: &CudaBackend) -> anyhow::Result<()> {
    for (name, bytes) in SMEM {
        if *bytes > 49152 {
            be.func(name)
                .set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, *bytes as i32)
                .map_err(|e| anyhow::anyhow!("cannot give {name} {bytes} bytes of shared memory: {e:?}"))?;
        }
    }
    Ok(())
}

/// The attention kernels in one phrase, for the start-up line and `ferrotune env`.
pub const SUMMARY: &str =
    "flash attention, fused (tensor-core kernels for head_dim 64 and 128, a fused generic kernel for other head_dim <= 512)";

/// Which attention kernel a model of `head_dim` runs, in words: a model
/// off the tensor-core sizes is told so, never left to a silent fallback.
pub fn path_for(head_dim: usize) -> String {
    match head_dim {
        64 | 128 => format!("flash attention, fused, tensor cores (head_dim {head_dim})"),
        d if (1..=MAX_HEAD_DIM).contains(&d) => {
            format!("flash attention, fused, generic kernel without tensor cores (head_dim {d}; tensor-core kernels cover 64 and 128)")
        }
        d => format!("none: head_dim {d} is over the kernels' limit of {MAX_HEAD_DIM}"),
    }
}

/// "d64", "d128", "generic" (head_dim <= 256) or "generic_d512". A model
/// with a larger head is refused at load (`check_model`), so one here is a
/// caller's bug.
fn kind(head_dim: usize) -> &'static str {
    match head_dim {
        64 => "d64",
        128 => "d128",
        d if (1..=NARROW_HEAD_DIM).contains(&d) => "generic",
        d if d <= MAX_HEAD_DIM => "generic_d512",
        d => panic!("attention: head_dim {d} is not supported (at most {MAX_HEAD_DIM})"),
    }
}

fn smem(name: &str) -> u32 {
    SMEM.iter().find(|(n, _)| *n == name).map(|(_, b)| *b).unwrap_or(0)
}

/// Grid of a tensor-core kernel over (query or key tiles, heads, sequences),
/// or of a generic kernel over (rows / 4, heads).
fn grid(name: &str, shape: &AttnShape, n_seqs: usize, heads: usize) -> LaunchConfig {
    assert!(n_seqs <= 65_535, "attention: {n_seqs} sequences in one batch (the grid allows 65535)");
    assert!(heads <= 65_535, "attention: {heads} heads (the grid allows 65535)");
    let grid_dim = if name.contains("_generic") {
        (shape.n.div_ceil(4) as u32, heads as u32, 1)
    } else {
        let max_len = if shape.max_seqlen == 0 { shape.n } else { shape.max_seqlen };
        (max_len.div_ceil(TILE).max(1) as u32, heads as u32, n_seqs as u32)
    };
    LaunchConfig { grid_dim, block_dim: (THREADS, 1, 1), shared_mem_bytes: smem(name) }
}

fn window_arg(shape: &AttnShape) -> i32 {
    shape.window.map(|w| w.min(i32::MAX as usize) as i32).unwrap_or(0)
}

/// The soft-cap, checked as the CPU reference checks it: Some(c > 0).
fn softcap_arg(op: &str, shape: &AttnShape) -> Option<f32> {
    if let Some(c) = shape.softcap {
        assert!(c > 0.0, "{op}: soft-cap {c} must be positive");
    }
    shape.softcap
}

/// The name of flash kernel `stem` (`fwd`, `bwd_dq`, `bwd_dkdv`) for a
/// head_dim, the capped twin with a soft-cap.
fn flash_name(stem: &str, shape: &AttnShape, cap: Option<f32>) -> String {
    let capped = if cap.is_some() { "capped_" } else { "" };
    format!("flash_attn_{stem}_{capped}{}", kind(shape.head_dim))
}

pub fn forward(
    be: &CudaBackend,
    qkv: Qkv<'_, CudaBuf>,
    seqs: Varlen<'_, CudaSlice<i32>>,
    shape: AttnShape,
    out: &mut CudaBuf,
    lse: &mut CudaSlice<f32>,
) {
    let (Qkv { q, k, v }, Varlen { cu_seqlens: cu, n_seqs }) = (qkv, seqs);
    if shape.n == 0 {
        return;
    }
    let cap = softcap_arg("attention", &shape);
    let name = flash_name("fwd", &shape, cap);
    let cfg = grid(&name, &shape, n_seqs, shape.n_heads);
    let (q, k, v) = (q.bf16("q"), k.bf16("k"), v.bf16("v"));
    let out = out.bf16_mut("out");
    let (n, ns, nh, nkv, hd) =
        (shape.n as i32, n_seqs as i32, shape.n_heads as i32, shape.n_kv_heads as i32, shape.head_dim as i32);
    let (window, scale) = (window_arg(&shape), shape.scale);
    match cap {
        None => launch!(be, &name, cfg, q, k, v, cu, out, lse, &n, &ns, &nh, &nkv, &hd, &window, &scale),
        Some(c) => launch!(be, &name, cfg, q, k, v, cu, out, lse, &n, &ns, &nh, &nkv, &hd, &window, &scale, &c),
    }
}

/// The flash backward: the dsum preprocess, then dq, then dk and dv (the
/// arguments of `Backend::attention_backward`).
pub fn backward(
    be: &CudaBackend, dout: &CudaBuf, qkv: Qkv<'_, CudaBuf>, saved: AttnSaved<'_, CudaBuf>,
    seqs: Varlen<'_, CudaSlice<i32>>, shape: AttnShape, grads: QkvGrads<'_, CudaBuf>,
) {
    let (Qkv { q, k, v }, Varlen { cu_seqlens: cu, n_seqs }) = (qkv, seqs);
    let (out, lse) = (saved.out, saved.lse.f32("attention lse"));
    let QkvGrads { dq, dk, dv } = grads;
    if shape.n == 0 {
        return;
    }
    let (dout, q, k, v, out) = (dout.bf16("dout"), q.bf16("q"), k.bf16("k"), v.bf16("v"), out.bf16("out"));
    let (n, ns, nh, nkv, hd) =
        (shape.n as i32, n_seqs as i32, shape.n_heads as i32, shape.n_kv_heads as i32, shape.head_dim as i32);
    let (window, scale) = (window_arg(&shape), shape.scale);
    let cap = softcap_arg("attention_backward", &shape);

    // dsum[h*n + t] = Σ_d dout·out: one warp per (token, head) row.
    let mut dsum = be.stream.alloc_zeros::<f32>(shape.n * shape.n_heads).expect("CUDA allocation");
    let rows = shape.n * shape.n_heads;
    let pre = LaunchConfig {
        grid_dim: (rows.div_ceil(256 / 32).clamp(1, 1 << 20) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    launch!(be, "flash_attn_bwd_preprocess", pre, dout, out, &mut dsum, &n, &nh, &hd);

    let name = flash_name("bwd_dq", &shape, cap);
    let cfg = grid(&name, &shape, n_seqs, shape.n_heads);
    let dq = dq.bf16_mut("dq");
    match cap {
        None => launch!(be, &name, cfg, q, k, v, dout, lse, &dsum, cu, dq, &n, &ns, &nh, &nkv, &hd, &window, &scale),
        Some(c) => {
            launch!(be, &name, cfg, q, k, v, dout, lse, &dsum, cu, dq, &n, &ns, &nh, &nkv, &hd, &window, &scale, &c)
        }
    }

    let name = flash_name("bwd_dkdv", &shape, cap);
    let cfg = grid(&name, &shape, n_seqs, shape.n_kv_heads);
    let (dk, dv) = (dk.bf16_mut("dk"), dv.bf16_mut("dv"));
    match cap {
        None => launch!(be, &name, cfg, q, k, v, dout, lse, &dsum, cu, dk, dv, &n, &ns, &nh, &nkv, &hd, &window, &scale),
        Some(c) => {
            launch!(be, &name, cfg, q, k, v, dout, lse, &dsum, cu, dk, dv, &n, &ns, &nh, &nkv, &hd, &window, &scale, &c)
        }
    }
}

/// Threads per block of the decode kernels (their launch contract).
const DECODE_THREADS: u32 = 256;

/// The head layout every decode kernel requires (its __trap() preconditions).
fn check_decode_heads(op: &str, shape: &AttnShape) {
    let (nh, nkv, d) = (shape.n_heads, shape.n_kv_heads, shape.head_dim);
    assert!((1..=MAX_HEAD_DIM).contains(&d), "{op}: head_dim {d} is not supported (1..={MAX_HEAD_DIM})");
    assert!(nkv > 0 && nh.is_multiple_of(nkv), "{op}: n_heads {nh} not a multiple of n_kv_heads {nkv}");
    assert!(nh <= 65_535, "{op}: {nh} heads (the grid allows 65535)");
}

/// The decode kernel `stem` (`decode_attention`, `decode_attention_batch`)
/// for a head_dim: the narrow instantiation up to 256, the wide one above.
fn decode_name(stem: &str, head_dim: usize) -> String {
    if head_dim <= NARROW_HEAD_DIM { format!("{stem}_bf16") } else { format!("{stem}_d512_bf16") }
}

fn check_lens(op: &str, lens: &[(&str, usize, usize)]) {
    for &(what, len, need) in lens {
        assert!(len >= need, "{op}: `{what}` has {len} elements, the shape needs {need}");
    }
}

/// The newest `shape.n` tokens of one sequence against its cache
/// (cuda/decode_attn.cu: one block per (query, head)).
pub fn decode(
    be: &CudaBackend,
    q: &CudaBuf,
    k_cache: &CudaBuf,
    v_cache: &CudaBuf,
    past: usize,
    shape: AttnShape,
    out: &mut CudaBuf,
) {
    const OP: &str = "decode_attention";
    if shape.n == 0 {
        return;
    }
    check_decode_heads(OP, &shape);
    let (nh, nkv, d) = (shape.n_heads, shape.n_kv_heads, shape.head_dim);
    let total = past + shape.n;
    assert!(total <= i32::MAX as usize, "{OP}: {total} cached positions exceed i32");
    check_lens(OP, &[
        ("q", q.len(), shape.n * nh * d),
        ("k_cache", k_cache.len(), total * nkv * d),
        ("v_cache", v_cache.len(), total * nkv * d),
        ("out", out.len(), shape.n * nh * d),
    ]);
    let cfg = LaunchConfig {
        grid_dim: (shape.n as u32, nh as u32, 1),
        block_dim: (DECODE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let (q, k, v) = (q.bf16("q"), k_cache.bf16("k_cache"), v_cache.bf16("v_cache"));
    let out = out.bf16_mut("out");
    let (n, past, nh, nkv, hd) = (shape.n as i32, past as i32, nh as i32, nkv as i32, d as i32);
    let (window, scale) = (window_arg(&shape), shape.scale);
    // 0 = no cap (the kernel's plain path).
    let cap = softcap_arg(OP, &shape).unwrap_or(0.0);
    let name = decode_name(OP, d);
    launch!(be, &name, cfg, q, k, v, out, &n, &past, &nh, &nkv, &hd, &window, &scale, &cap);
}

/// Batched decoding (see `Backend::decode_attention_batch`): one block per
/// (sequence, head) of `decode_attention_batch_bf16`, which reads each
/// sequence's position on the device (no host synchronisation).
#[allow(clippy::too_many_arguments)]
pub fn decode_batch(
    be: &CudaBackend,
    q: &CudaBuf,
    k_cache: &CudaBuf,
    v_cache: &CudaBuf,
    positions: &CudaSlice<i32>,
    capacity: usize,
    shape: AttnShape,
    out: &mut CudaBuf,
) {
    const OP: &str = "decode_attention_batch";
    let n_seqs = shape.n;
    if n_seqs == 0 {
        return;
    }
    check_decode_heads(OP, &shape);
    let (nh, nkv, d) = (shape.n_heads, shape.n_kv_heads, shape.head_dim);
    assert!(n_seqs <= i32::MAX as usize, "{OP}: {n_seqs} sequences exceed i32 (the grid allows 2^31 - 1)");
    assert!((1..=i32::MAX as usize).contains(&capacity), "{OP}: capacity {capacity} must be in 1..=2^31-1");
    let cache = n_seqs * capacity * nkv * d;
    check_lens(OP, &[
        ("positions", positions.len(), n_seqs),
        ("q", q.len(), n_seqs * nh * d),
        ("k_cache", k_cache.len(), cache),
        ("v_cache", v_cache.len(), cache),
        ("out", out.len(), n_seqs * nh * d),
    ]);
    let cfg = LaunchConfig {
        grid_dim: (n_seqs as u32, nh as u32, 1),
        block_dim: (DECODE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let (q, k, v) = (q.bf16("q"), k_cache.bf16("k_cache"), v_cache.bf16("v_cache"));
    let out = out.bf16_mut("out");
    let (ns, cap_rows, nh, nkv, hd) = (n_seqs as i32, capacity as i32, nh as i32, nkv as i32, d as i32);
    let (window, scale) = (window_arg(&shape), shape.scale);
    // 0 = no cap (the kernel's plain path).
    let cap = softcap_arg(OP, &shape).unwrap_or(0.0);
    let name = decode_name(OP, d);
    launch!(be, &name, cfg, q, k, v, positions, out, &ns, &cap_rows, &nh, &nkv, &hd, &window, &scale, &cap);
}

/// Row s of `src` into row s·capacity + positions[s] of `dst` (see
/// `Backend::scatter_rows`): `scatter_rows_{f32,bf16}` of cuda/copy_cols.cu,
/// one block per row, positions read on the device.
pub fn scatter_rows(
    be: &CudaBackend,
    src: &CudaBuf,
    dst: &mut CudaBuf,
    positions: &CudaSlice<i32>,
    rows: usize,
    width: usize,
    capacity: usize,
) {
    const OP: &str = "scatter_rows";
    if rows == 0 || width == 0 {
        return;
    }
    for (what, v) in [("rows", rows), ("width", width), ("capacity", capacity)] {
        assert!(v <= i32::MAX as usize, "{OP}: {what} {v} exceeds i32");
    }
    assert!(capacity > 0, "{OP}: capacity 0 holds no row");
    // Any position may be capacity − 1, so dst must hold every region.
    check_lens(OP, &[
        ("positions", positions.len(), rows),
        ("src", src.len(), rows * width),
        ("dst", dst.len(), rows * capacity * width),
    ]);
    let cfg = rows_grid(rows, BLOCK);
    let [r, w, c] = [rows, width, capacity].map(|v| v as i32);
    match (src, dst) {
        (CudaBuf::F32(s), CudaBuf::F32(d)) => launch!(be, "scatter_rows_f32", cfg, s, d, positions, &r, &w, &c),
        (CudaBuf::Bf16(s), CudaBuf::Bf16(d)) => launch!(be, "scatter_rows_bf16", cfg, s, d, positions, &r, &w, &c),
        _ => panic!("{OP}: source and destination must share a storage type"),
    }
}
