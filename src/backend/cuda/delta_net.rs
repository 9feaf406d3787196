//! The gated delta-net on the CUDA backend: launches of cuda/delta_net.cu
//! (its header states the math, the kernels and their launch contract).
//!
//! Forward and decode: `delta_prep_fwd` (conv, SiLU, q/k norms into f32
//! scratch), `delta_scan_fwd` (the recurrence, one block per (sequence,
//! v-head), the gated norm; the forward also writes the chunk-start states),
//! and for decode `delta_conv_state` (the carried conv rows). Backward: the
//! same prep, `delta_scan_bwd` (chunks in reverse from the saved states),
//! `delta_norm_bwd_f32` (the repeat over v-heads, the l2 norms and SiLU,
//! without atomics) and `delta_conv_bwd` (the transposed conv).
//!
//! Scratch (f32, freed in stream order after the op): forward pre and xn
//! [n, C] and the running states [n_seqs, Hv, dk, dv]; backward also dqk
//! [n, Hv, 2, dk], dact [n, C], and per backward block a chunk of start
//! states [64, dk, dv] and dS [dk, dv], at most `MAX_BWD_BLOCKS` blocks
//! (src/train/memory/trace.rs counts the same for the memory planner).

use super::backend::{CudaBackend, launch, rows_grid};
use super::buffers::{CudaBuf, CudaWeight};
use crate::backend::{DELTA_CHUNK, DeltaGrads, DeltaIn, DeltaShape, DeltaState, DeltaWeights, Varlen};
use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
use half::bf16;

/// Threads of the per-token kernels.
const TOKEN_THREADS: u32 = 128;
/// Largest k_dim / v_dim of the scan kernels (their block holds one thread
/// per value column and per-warp partials for at most 4 warps).
pub(super) const MAX_HEAD_DIM: usize = 128;
/// Backward blocks at most: each holds its own chunk of start states.
const MAX_BWD_BLOCKS: usize = 64;

/// Activation storage types: the kernel suffix and the slice of a buffer.
trait Act: DeviceRepr + Sized {
    const SUFFIX: &'static str;
    fn of<'a>(b: &'a CudaBuf, what: &str) -> &'a CudaSlice<Self>;
    fn of_mut<'a>(b: &'a mut CudaBuf, what: &str) -> &'a mut CudaSlice<Self>;
}
impl Act for f32 {
    const SUFFIX: &'static str = "f32";
    fn of<'a>(b: &'a CudaBuf, what: &str) -> &'a CudaSlice<f32> {
        b.f32(what)
    }
    fn of_mut<'a>(b: &'a mut CudaBuf, what: &str) -> &'a mut CudaSlice<f32> {
        b.f32_mut(what)
    }
}
impl Act for bf16 {
    const SUFFIX: &'static str = "bf16";
    fn of<'a>(b: &'a CudaBuf, what: &str) -> &'a CudaSlice<bf16> {
        b.bf16(what)
    }
    fn of_mut<'a>(b: &'a mut CudaBuf, what: &str) -> &'a mut CudaSlice<bf16> {
        b.bf16_mut(what)
    }
}

/// Shape as kernel arguments, checked against the kernels' limits.
struct Dims {
    n: i32,
    n_seqs: i32,
    hk: i32,
    hv: i32,
    dk: i32,
    dv: i32,
    c: i32,
    k: i32,
    eps: f32,
    q_scale: f32,
}

impl Dims {
    fn new(op: &str, s: DeltaShape, n_seqs: usize) -> Dims {
        assert!(s.k_heads > 0 && s.v_heads.is_multiple_of(s.k_heads), "{op}: v_heads {} is not a multiple of k_heads {}", s.v_heads, s.k_heads);
        assert!(
            (1..=MAX_HEAD_DIM).contains(&s.k_dim) && (1..=MAX_HEAD_DIM).contains(&s.v_dim),
            "{op}: the CUDA kernels take k_dim and v_dim from 1 to {MAX_HEAD_DIM}, got {} and {}",
            s.k_dim,
            s.v_dim
        );
        assert!(s.conv_kernel > 0, "{op}: conv_kernel must be at least 1");
        Dims {
            n: s.n as i32,
            n_seqs: n_seqs as i32,
            hk: s.k_heads as i32,
            hv: s.v_heads as i32,
            dk: s.k_dim as i32,
            dv: s.v_dim as i32,
            c: s.conv_dim() as i32,
            k: s.conv_kernel as i32,
            eps: s.norm_eps,
            // As the CPU: dk^−½ in f64, rounded once.
            q_scale: (s.k_dim as f64).powf(-0.5) as f32,
        }
    }
    fn token_grid(&self) -> LaunchConfig {
        rows_grid(self.n as usize, TOKEN_THREADS)
    }
    /// One block per (sequence, v-head), a thread per value column.
    fn scan_grid(&self, max_blocks: usize) -> LaunchConfig {
        let pairs = (self.n_seqs * self.hv) as usize;
        let threads = (self.dv as u32).div_ceil(32) * 32;
        LaunchConfig { grid_dim: (pairs.clamp(1, max_blocks) as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
    }
}

/// Backward blocks for `n_seqs` sequences.
fn bwd_blocks(n_seqs: usize, v_heads: usize) -> usize {
    (n_seqs * v_heads).clamp(1, MAX_BWD_BLOCKS)
}

fn dims_check(op: &str, d: &Dims, i: &DeltaIn<'_, CudaBuf>) {
    let (n, c, vw, hv) = (d.n as usize, d.c as usize, (d.hv * d.dv) as usize, d.hv as usize);
    for (what, got, want) in [("qkv", i.qkv.len(), n * c), ("z", i.z.len(), n * vw), ("b", i.b.len(), n * hv), ("a", i.a.len(), n * hv)] {
        assert!(got >= want, "{op}: {what} holds {got} values, needs {want}");
    }
}

fn weights<'a>(op: &str, w: &DeltaWeights<'a, CudaWeight>) -> [&'a CudaSlice<bf16>; 4] {
    [w.conv.dense(op), w.a_log.dense(op), w.dt_bias.dense(op), w.norm.dense(op)]
}

/// The per-token gate inputs of the scan kernels: z, b, a.
fn gates<'a, T: Act>(i: &DeltaIn<'a, CudaBuf>) -> [&'a CudaSlice<T>; 3] {
    [T::of(i.z, "delta_net z"), T::of(i.b, "delta_net b"), T::of(i.a, "delta_net a")]
}

/// What each launch sequence (forward, decode, backward) starts from: the
/// shape checked against the kernels' limits and the inputs, the frozen
/// weights [conv, a_log, dt_bias, norm], and the prep kernel's pre and xn.
struct Prepared<'w> {
    d: Dims,
    w: [&'w CudaSlice<bf16>; 4],
    pre: CudaSlice<f32>,
    xn: CudaSlice<f32>,
}

/// Checks and prep for op `op`; `hist` = a decode's carried conv rows.
fn prepare<'w, T: Act>(
    be: &CudaBackend,
    op: &str,
    i: &DeltaIn<'_, CudaBuf>,
    w: &DeltaWeights<'w, CudaWeight>,
    seqs: &Varlen<'_, CudaSlice<i32>>,
    s: DeltaShape,
    hist: Option<&CudaSlice<f32>>,
) -> Prepared<'w> {
    let d = Dims::new(op, s, seqs.n_seqs);
    dims_check(op, &d, i);
    let w = weights(op, w);
    let [pre, xn] = prep(be, &d, T::of(i.qkv, &format!("{op} qkv")), w[0], hist, seqs.cu_seqlens);
    Prepared { d, w, pre, xn }
}

/// Runs `f::<T>(args)` for the activation type T that `qkv` is stored in.
macro_rules! by_act {
    ($qkv:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match $qkv {
            CudaBuf::F32(_) => $f::<f32>($($arg),*),
            CudaBuf::Bf16(_) => $f::<bf16>($($arg),*),
        }
    };
}

/// pre and xn [n, C] (f32) for the recurrence; `hist` = carried conv rows.
fn prep<T: Act>(be: &CudaBackend, d: &Dims, qkv: &CudaSlice<T>, conv: &CudaSlice<bf16>, hist: Option<&CudaSlice<f32>>, cu: &CudaSlice<i32>) -> [CudaSlice<f32>; 2] {
    let nc = (d.n * d.c) as usize;
    let (mut pre, mut xn) = (be.alloc_f32(nc), be.alloc_f32(nc));
    let dummy;
    let (hist, has) = match hist {
        Some(h) => (h, 1i32),
        None => {
            dummy = be.alloc_f32(1);
            (&dummy, 0i32)
        }
    };
    let name = format!("delta_prep_fwd_{}", T::SUFFIX);
    launch!(be, &name, d.token_grid(), qkv, conv, hist, cu, &mut pre, &mut xn, &d.n, &d.n_seqs, &d.hk, &d.dk, &d.c, &d.k, &has, &d.q_scale);
    [pre, xn]
}

#[allow(clippy::too_many_arguments)]
fn scan_fwd<T: Act>(
    be: &CudaBackend,
    d: &Dims,
    xn: &CudaSlice<f32>,
    i: &DeltaIn<'_, CudaBuf>,
    w: [&CudaSlice<bf16>; 4],
    cu: &CudaSlice<i32>,
    state: &mut CudaSlice<f32>,
    out: &mut CudaBuf,
    saved: Option<&mut CudaSlice<f32>>,
) {
    let [z, b, a] = gates::<T>(i);
    let out = T::of_mut(out, "delta_net out");
    let dummy;
    let (saved, save): (&CudaSlice<f32>, i32) = match saved {
        Some(s) => (s, 1),
        None => {
            dummy = be.alloc_f32(1);
            (&dummy, 0)
        }
    };
    let [_, a_log, dt_bias, norm] = w;
    let name = format!("delta_scan_fwd_{}", T::SUFFIX);
    let cfg = d.scan_grid(65_535);
    launch!(be, &name, cfg, xn, z, b, a, a_log, dt_bias, norm, cu, state, out, saved, &d.n_seqs, &d.hk, &d.hv, &d.dk, &d.dv, &d.eps, &save);
}

fn forward_t<T: Act>(be: &CudaBackend, i: DeltaIn<'_, CudaBuf>, w: DeltaWeights<'_, CudaWeight>, seqs: Varlen<'_, CudaSlice<i32>>, s: DeltaShape, out: &mut CudaBuf, saved: &mut CudaBuf) {
    let p = prepare::<T>(be, "delta_net", &i, &w, &seqs, s, None);
    let mut state = be.alloc_f32(seqs.n_seqs * s.state_size());
    scan_fwd::<T>(be, &p.d, &p.xn, &i, p.w, seqs.cu_seqlens, &mut state, out, Some(saved.f32_mut("delta_net saved")));
}

pub(super) fn forward(be: &CudaBackend, i: DeltaIn<'_, CudaBuf>, w: DeltaWeights<'_, CudaWeight>, seqs: Varlen<'_, CudaSlice<i32>>, s: DeltaShape, out: &mut CudaBuf, saved: &mut CudaBuf) {
    by_act!(i.qkv, forward_t(be, i, w, seqs, s, out, saved))
}

fn decode_t<T: Act>(be: &CudaBackend, i: DeltaIn<'_, CudaBuf>, w: DeltaWeights<'_, CudaWeight>, seqs: Varlen<'_, CudaSlice<i32>>, s: DeltaShape, st: DeltaState<'_, CudaBuf>, out: &mut CudaBuf) {
    let conv_state = st.conv.f32_mut("delta_net_decode conv state");
    let p = prepare::<T>(be, "delta_net_decode", &i, &w, &seqs, s, Some(&*conv_state));
    scan_fwd::<T>(be, &p.d, &p.xn, &i, p.w, seqs.cu_seqlens, st.rec.f32_mut("delta_net_decode recurrent state"), out, None);
    if p.d.k > 1 {
        let cfg = rows_grid(seqs.n_seqs, TOKEN_THREADS);
        let name = format!("delta_conv_state_{}", T::SUFFIX);
        let qkv = T::of(i.qkv, "delta_net_decode qkv");
        launch!(be, &name, cfg, qkv, seqs.cu_seqlens, conv_state, &p.d.n_seqs, &p.d.c, &p.d.k);
    }
}

pub(super) fn decode(be: &CudaBackend, i: DeltaIn<'_, CudaBuf>, w: DeltaWeights<'_, CudaWeight>, seqs: Varlen<'_, CudaSlice<i32>>, s: DeltaShape, st: DeltaState<'_, CudaBuf>, out: &mut CudaBuf) {
    by_act!(i.qkv, decode_t(be, i, w, seqs, s, st, out))
}

#[allow(clippy::too_many_arguments)]
fn backward_t<T: Act>(
    be: &CudaBackend,
    dout: &CudaBuf,
    i: DeltaIn<'_, CudaBuf>,
    w: DeltaWeights<'_, CudaWeight>,
    seqs: Varlen<'_, CudaSlice<i32>>,
    s: DeltaShape,
    saved: &CudaBuf,
    g: DeltaGrads<'_, CudaBuf>,
) {
    let Prepared { d, w: [conv, a_log, dt_bias, norm], pre, xn } = prepare::<T>(be, "delta_net_backward", &i, &w, &seqs, s, None);
    let cu = seqs.cu_seqlens;
    let (n, nc, ss) = (s.n, s.n * s.conv_dim(), s.k_dim * s.v_dim);
    let blocks = bwd_blocks(seqs.n_seqs, s.v_heads);
    let mut starts = be.alloc_f32(blocks * DELTA_CHUNK * ss);
    let mut dstate = be.alloc_f32(blocks * ss);
    let mut dqk = be.alloc_f32(n * s.v_heads * 2 * s.k_dim);
    let mut dact = be.alloc_f32(nc);
    let [z, b, a] = gates::<T>(&i);
    let dout = T::of(dout, "delta_net_backward dout");
    let saved = saved.f32("delta_net_backward saved");
    {
        let gz = T::of_mut(g.z, "delta_net_backward grads.z");
        let name = format!("delta_scan_bwd_{}", T::SUFFIX);
        let cfg = d.scan_grid(blocks);
        let gb = T::of_mut(g.b, "delta_net_backward grads.b");
        let ga = T::of_mut(g.a, "delta_net_backward grads.a");
        launch!(
            be, &name, cfg, &xn, z, b, a, a_log, dt_bias, norm, cu, saved, dout, &mut starts, &mut dstate, &mut dqk, &mut dact, gz, gb, ga,
            &d.n_seqs, &d.hk, &d.hv, &d.dk, &d.dv, &d.eps
        );
    }
    launch!(be, "delta_norm_bwd_f32", d.token_grid(), &pre, &dqk, &mut dact, &d.n, &d.hk, &d.hv, &d.dk, &d.c, &d.q_scale);
    let gq = T::of_mut(g.qkv, "delta_net_backward grads.qkv");
    let name = format!("delta_conv_bwd_{}", T::SUFFIX);
    launch!(be, &name, d.token_grid(), &dact, conv, cu, gq, &d.n, &d.n_seqs, &d.c, &d.k);
}

#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
    be: &CudaBackend,
    dout: &CudaBuf,
    i: DeltaIn<'_, CudaBuf>,
    w: DeltaWeights<'_, CudaWeight>,
    seqs: Varlen<'_, CudaSlice<i32>>,
    s: DeltaShape,
    saved: &CudaBuf,
    g: DeltaGrads<'_, CudaBuf>,
) {
    by_act!(i.qkv, backward_t(be, dout, i, w, seqs, s, saved, g))
}
