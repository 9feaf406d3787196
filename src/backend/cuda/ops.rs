//! The op set of `CudaBackend` (`impl Backend`): allocation and transfers,
//! the elementwise and per-row kernels, and the cuBLAS products; LoRA's
//! products are in lora.rs, attention's launches in attention.rs, the gated
//! delta-net's in delta_net.rs.

use super::attention;
use super::delta_net;
use super::backend::{BLOCK, CudaBackend, grid_for, launch, rows_grid};
use super::buffers::{CudaBuf, CudaWeight, out_operand, to_bf16_host};
use super::lora;
use super::sample;
use crate::backend::{
    AdamW, AttnSaved, AttnShape, Backend, CeShape, ColsShape, DeltaGrads, DeltaIn, DeltaShape, DeltaState, DeltaWeights, GluAct, GluShape, LoraGrads, LoraInputs, LoraShape, MatShape,
    NormShape, Qkv, QkvGrads, RopeShape, SamplingParams, Varlen, WeightSource,
};
use anyhow::Result;
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use half::bf16;

/// Picks the kernel variant for the activation type of `$buf`.
macro_rules! variant {
    ($base:expr, $buf:expr) => {
        match $buf {
            CudaBuf::F32(_) => concat!($base, "_f32"),
            CudaBuf::Bf16(_) => concat!($base, "_bf16"),
        }
    };
}

impl Backend for CudaBackend {
    type Buf = CudaBuf;
    type Weight = CudaWeight;
    type IntBuf = CudaSlice<i32>;

    fn name(&self) -> String {
        format!("cuda:{} ({})", self.info.ordinal, self.info.name)
    }
    fn check_model(&self, cfg: &crate::model::hparams::ModelConfig) -> anyhow::Result<()> {
        super::check_model(cfg)
    }

    fn zeros(&self, len: usize) -> CudaBuf {
        CudaBuf::Bf16(self.alloc_bf16(len))
    }
    fn zeros_f32(&self, len: usize) -> CudaBuf {
        CudaBuf::F32(self.alloc_f32(len))
    }
    fn zeros_like(&self, like: &CudaBuf) -> CudaBuf {
        match like {
            CudaBuf::F32(s) => CudaBuf::F32(self.alloc_f32(s.len())),
            CudaBuf::Bf16(s) => CudaBuf::Bf16(self.alloc_bf16(s.len())),
        }
    }
    fn upload(&self, data: &[f32]) -> CudaBuf {
        CudaBuf::F32(self.stream.clone_htod(data).expect("CUDA upload"))
    }
    fn upload_activation(&self, data: &[f32]) -> CudaBuf {
        let host: Vec<bf16> = data.iter().map(|&x| bf16::from_f32(x)).collect();
        CudaBuf::Bf16(self.stream.clone_htod(&host).expect("CUDA upload"))
    }
    fn download(&self, buf: &CudaBuf) -> Vec<f32> {
        match buf {
            CudaBuf::F32(s) => self.stream.clone_dtoh(s).expect("CUDA download"),
            CudaBuf::Bf16(s) => self.stream.clone_dtoh(s).expect("CUDA download").into_iter().map(|x| x.to_f32()).collect(),
        }
    }
    fn upload_ints(&self, data: &[i32]) -> CudaSlice<i32> {
        if data.is_empty() {
            return self.stream.alloc_zeros::<i32>(1).expect("CUDA allocation (i32)");
        }
        self.stream.clone_htod(data).expect("CUDA upload")
    }
    fn len(&self, buf: &CudaBuf) -> usize {
        buf.len()
    }
    fn load_weight(&self, src: &WeightSource) -> Result<CudaWeight> {
        let host = to_bf16_host(src)?;
        let w = self.stream.clone_htod(&host).map_err(|e| anyhow::anyhow!("uploading a weight to the GPU failed: {e:?}"))?;
        Ok(CudaWeight::Bf16(w))
    }
    fn weight_from_f32(&self, data: &[f32]) -> CudaWeight {
        use rayon::prelude::*;
        let host: Vec<bf16> = data.par_iter().map(|&x| bf16::from_f32(x)).collect();
        CudaWeight::Bf16(self.stream.clone_htod(&host).expect("CUDA upload"))
    }
    fn weight_from_nf4(&self, t: &crate::quant::nf4::Nf4Tensor) -> Result<CudaWeight> {
        crate::backend::check_nf4(t)?;
        let w = self.upload_nf4(t)?;
        let mut scratch = self.nf4_scratch.lock().unwrap_or_else(|e| e.into_inner());
        if scratch.as_ref().is_none_or(|s| s.len() < t.numel()) {
            // Free the smaller one first (in stream order) so the two never coexist.
            *scratch = None;
            let s = self.stream.alloc_zeros::<bf16>(t.numel().max(1)).map_err(|e| {
                anyhow::anyhow!("allocating the NF4 dequantization scratch ({} bf16) failed: {e:?}", t.numel())
            })?;
            *scratch = Some(Box::new(s));
        }
        Ok(CudaWeight::Nf4(Box::new(w)))
    }
    fn weight_to_f32(&self, w: &CudaWeight) -> Vec<f32> {
        let n = self.weight_len(w);
        let host = match w {
            CudaWeight::Bf16(s) => self.stream.clone_dtoh(s),
            CudaWeight::Nf4(q) => {
                // One lock for the expansion and the read (the scratch lock
                // is not reentrant).
                let mut guard = self.nf4_scratch.lock().unwrap_or_else(|e| e.into_inner());
                let scratch = guard.as_mut().expect("the NF4 scratch is allocated with the first NF4 weight");
                self.dequantize_nf4_into(q, scratch);
                self.stream.clone_dtoh(&scratch.slice(0..n))
            }
        };
        host.expect("CUDA download").into_iter().take(n).map(|x| x.to_f32()).collect()
    }
    fn weight_len(&self, w: &CudaWeight) -> usize {
        match w {
            CudaWeight::Bf16(s) => s.len(),
            CudaWeight::Nf4(q) => q.numel(),
        }
    }

    fn fill(&self, buf: &mut CudaBuf, value: f32) {
        self.launch_in_place(["fill_f32", "fill_bf16"], buf, value);
    }
    fn copy_slice(&self, src: &CudaBuf, src_off: usize, dst: &mut CudaBuf, dst_off: usize, len: usize) {
        if len == 0 {
            return;
        }
        match (src, dst) {
            (CudaBuf::F32(s), CudaBuf::F32(d)) => {
                self.stream.memcpy_dtod(&s.slice(src_off..src_off + len), &mut d.slice_mut(dst_off..dst_off + len))
            }
            (CudaBuf::Bf16(s), CudaBuf::Bf16(d)) => {
                self.stream.memcpy_dtod(&s.slice(src_off..src_off + len), &mut d.slice_mut(dst_off..dst_off + len))
            }
            _ => panic!("copy_slice: source and destination must share a storage type"),
        }
        .expect("CUDA device copy");
    }
    fn add_assign(&self, dst: &mut CudaBuf, src: &CudaBuf) {
        let n = dst.len().min(src.len()) as u64;
        let cfg = grid_for(n as usize);
        match (dst, src) {
            (CudaBuf::F32(d), CudaBuf::F32(s)) => launch!(self, "add_assign_f32", cfg, d, s, &n),
            (CudaBuf::Bf16(d), CudaBuf::Bf16(s)) => launch!(self, "add_assign_bf16", cfg, d, s, &n),
            _ => panic!("add_assign: both buffers must share a storage type"),
        }
    }
    fn softcap(&self, buf: &mut CudaBuf, cap: f32) {
        assert!(cap > 0.0, "softcap: cap {cap} must be positive");
        self.launch_in_place(["softcap_f32", "softcap_bf16"], buf, cap);
    }
    fn copy_cols(&self, src: &CudaBuf, dst: &mut CudaBuf, shape: ColsShape) {
        self.copy_cols_launch(src, dst, shape);
    }
    fn scale(&self, buf: &mut CudaBuf, s: f32) {
        self.launch_in_place(["scale_f32", "scale_bf16"], buf, s);
    }
    fn sum_sq(&self, buf: &CudaBuf) -> f64 {
        // One buffer's chunk partials and their sum: the launches of
        // `sum_sq_all` on a list of one.
        self.sum_sq_all(&[buf])
    }

    fn sum_sq_all(&self, bufs: &[&CudaBuf]) -> f64 {
        // Chunks of 16384 as the CPU backend; every buffer's partials (f64) into
        // one array, then one block sums them: one read back.
        const CHUNK: u64 = 16384;
        let counts: Vec<u64> = bufs.iter().map(|b| (b.len() as u64).div_ceil(CHUNK).max(1)).collect();
        let total: u64 = counts.iter().sum();
        let mut partials = self.stream.alloc_zeros::<f64>(total.max(1) as usize).expect("CUDA allocation");
        let mut off = 0usize;
        for (buf, &count) in bufs.iter().zip(&counts) {
            let n = buf.len() as u64;
            let mut part = partials.slice_mut(off..off + count as usize);
            let cfg = rows_grid(count as usize, BLOCK);
            match buf {
                CudaBuf::F32(s) => launch!(self, "sum_sq_partials_f32", cfg, s, &n, &CHUNK, &mut part),
                CudaBuf::Bf16(s) => launch!(self, "sum_sq_partials_bf16", cfg, s, &n, &CHUNK, &mut part),
            }
            off += count as usize;
        }
        let mut out = self.stream.alloc_zeros::<f64>(1).expect("CUDA allocation");
        launch!(self, "sum_sq_finalize_f64", rows_grid(1, BLOCK), &partials, &total, &mut out);
        self.stream.clone_dtoh(&out).expect("CUDA download")[0]
    }

    fn embedding(&self, table: &CudaWeight, ids: &CudaSlice<i32>, out: &mut CudaBuf, n: usize, hidden: usize) {
        let table = table.dense("embedding");
        let (ni, hi, vocab) = (n as i32, hidden as i32, (table.len() / hidden.max(1)) as i32);
        let cfg = rows_grid(n, BLOCK);
        match out {
            CudaBuf::F32(o) => launch!(self, "embedding_fwd_f32", cfg, table, ids, o, &ni, &hi, &vocab),
            CudaBuf::Bf16(o) => launch!(self, "embedding_fwd_bf16", cfg, table, ids, o, &ni, &hi, &vocab),
        }
    }

    fn linear(&self, x: &CudaBuf, w: &CudaWeight, bias: Option<&CudaWeight>, y: &mut CudaBuf, shape: MatShape) {
        let MatShape { m, k, n } = shape;
        let xb = self.bf16_operand(x);
        let beta = match bias {
            Some(b) => {
                let b = b.dense("linear (bias)");
                // Rows of y start as the bias; the product accumulates onto them.
                let (mi, ni) = (m as i32, n as i32);
                let cfg = grid_for(m * n);
                match y {
                    CudaBuf::F32(yy) => launch!(self, "broadcast_rows_bf16_to_f32", cfg, b, yy, &mi, &ni),
                    CudaBuf::Bf16(yy) => launch!(self, "broadcast_rows_bf16_to_bf16", cfg, b, yy, &mi, &ni),
                }
                1.0
            }
            None => 0.0,
        };
        let c = out_operand(y, &self.stream);
        self.with_weight_operand(w, |wo| self.gemm(m, n, k, xb.op(), false, wo, true, c, 1.0, beta));
    }

    fn linear_backward_input(&self, dy: &CudaBuf, w: &CudaWeight, dx: &mut CudaBuf, shape: MatShape, acc: bool) {
        let MatShape { m, k, n } = shape;
        let dyb = self.bf16_operand(dy);
        let c = out_operand(dx, &self.stream);
        self.with_weight_operand(w, |wo| self.gemm(m, k, n, dyb.op(), false, wo, false, c, 1.0, if acc { 1.0 } else { 0.0 }));
    }

    fn lora_forward(&self, inputs: LoraInputs<'_, CudaBuf>, xa: &mut CudaBuf, y: &mut CudaBuf, shape: LoraShape) {
        lora::forward(self, inputs, xa, y, shape);
    }
    fn lora_backward(
        &self,
        dy: &CudaBuf,
        inputs: LoraInputs<'_, CudaBuf>,
        xa: &CudaBuf,
        grads: LoraGrads<'_, CudaBuf>,
        shape: LoraShape,
    ) {
        lora::backward(self, dy, inputs, xa, grads, shape);
    }

    fn rmsnorm(&self, x: &CudaBuf, w: &CudaWeight, y: &mut CudaBuf, inv: &mut CudaBuf, shape: NormShape, eps: f32) {
        let NormShape { rows, hidden, plus_one } = shape;
        let w = w.dense("rmsnorm");
        let (ri, hi, p1) = (rows as i32, hidden as i32, plus_one as i32);
        let inv = inv.f32_mut("rmsnorm inv_rms");
        let (names, cfg) = norm_kernels(["rmsnorm_fwd_f32", "rmsnorm_fwd_bf16"], ["rmsnorm_warp_fwd_f32", "rmsnorm_warp_fwd_bf16"], shape);
        match (x, y) {
            (CudaBuf::F32(x), CudaBuf::F32(y)) => launch!(self, names[0], cfg, x, w, y, inv, &ri, &hi, &eps, &p1),
            (CudaBuf::Bf16(x), CudaBuf::Bf16(y)) => launch!(self, names[1], cfg, x, w, y, inv, &ri, &hi, &eps, &p1),
            _ => panic!("rmsnorm: x and y must share a storage type"),
        }
    }
    fn rmsnorm_backward(&self, dy: &CudaBuf, x: &CudaBuf, w: &CudaWeight, inv: &CudaBuf, dx: &mut CudaBuf, shape: NormShape) {
        let NormShape { rows, hidden, plus_one } = shape;
        let w = w.dense("rmsnorm_backward");
        let (ri, hi, p1) = (rows as i32, hidden as i32, plus_one as i32);
        let inv = inv.f32("rmsnorm_backward inv_rms");
        let (names, cfg) = norm_kernels(["rmsnorm_bwd_f32", "rmsnorm_bwd_bf16"], ["rmsnorm_warp_bwd_f32", "rmsnorm_warp_bwd_bf16"], shape);
        match (dy, x, dx) {
            (CudaBuf::F32(dy), CudaBuf::F32(x), CudaBuf::F32(dx)) => {
                launch!(self, names[0], cfg, dy, x, w, inv, dx, &ri, &hi, &p1)
            }
            (CudaBuf::Bf16(dy), CudaBuf::Bf16(x), CudaBuf::Bf16(dx)) => {
                launch!(self, names[1], cfg, dy, x, w, inv, dx, &ri, &hi, &p1)
            }
            _ => panic!("rmsnorm_backward: dy, x and dx must share a storage type"),
        }
    }

    fn rope(&self, x: &mut CudaBuf, pos: &CudaSlice<i32>, inv_freq: &CudaBuf, shape: RopeShape) {
        self.rope_launch(variant!("rope_fwd", &*x), x, pos, inv_freq, shape);
    }
    fn rope_backward(&self, dx: &mut CudaBuf, pos: &CudaSlice<i32>, inv_freq: &CudaBuf, shape: RopeShape) {
        self.rope_launch(variant!("rope_bwd", &*dx), dx, pos, inv_freq, shape);
    }

    fn attention(
        &self,
        qkv: Qkv<'_, CudaBuf>,
        seqs: Varlen<'_, CudaSlice<i32>>,
        shape: AttnShape,
        out: &mut CudaBuf,
        lse: &mut CudaBuf,
    ) {
        attention::forward(self, qkv, seqs, shape, out, lse.f32_mut("attention lse"));
    }
    fn attention_backward(
        &self,
        dout: &CudaBuf,
        qkv: Qkv<'_, CudaBuf>,
        saved: AttnSaved<'_, CudaBuf>,
        seqs: Varlen<'_, CudaSlice<i32>>,
        shape: AttnShape,
        grads: QkvGrads<'_, CudaBuf>,
    ) {
        attention::backward(self, dout, qkv, saved, seqs, shape, grads);
    }
    fn decode_attention(&self, q: &CudaBuf, k_cache: &CudaBuf, v_cache: &CudaBuf, past: usize, shape: AttnShape, out: &mut CudaBuf) {
        attention::decode(self, q, k_cache, v_cache, past, shape, out);
    }

    fn decode_attention_batch(
        &self,
        q: &CudaBuf,
        k_cache: &CudaBuf,
        v_cache: &CudaBuf,
        positions: &CudaSlice<i32>,
        capacity: usize,
        shape: AttnShape,
        out: &mut CudaBuf,
    ) {
        attention::decode_batch(self, q, k_cache, v_cache, positions, capacity, shape, out);
    }
    fn scatter_rows(&self, src: &CudaBuf, dst: &mut CudaBuf, positions: &CudaSlice<i32>, rows: usize, width: usize, capacity: usize) {
        attention::scatter_rows(self, src, dst, positions, rows, width, capacity);
    }

    fn glu(&self, gate: &CudaBuf, up: &CudaBuf, out: &mut CudaBuf, shape: GluShape) {
        let GluShape { len, act } = shape;
        let names = match act {
            GluAct::Silu => ["swiglu_fwd_f32", "swiglu_fwd_bf16"],
            GluAct::GeluTanh => ["geglu_fwd_f32", "geglu_fwd_bf16"],
            GluAct::Sigmoid => ["sigmoid_gate_fwd_f32", "sigmoid_gate_fwd_bf16"],
        };
        let n = len as u64;
        let cfg = grid_for(len);
        match (gate, up, out) {
            (CudaBuf::F32(g), CudaBuf::F32(u), CudaBuf::F32(o)) => launch!(self, names[0], cfg, g, u, o, &n),
            (CudaBuf::Bf16(g), CudaBuf::Bf16(u), CudaBuf::Bf16(o)) => launch!(self, names[1], cfg, g, u, o, &n),
            _ => panic!("glu: buffers must share a storage type"),
        }
    }
    fn glu_backward(&self, dout: &CudaBuf, gate: &CudaBuf, up: &CudaBuf, dg: &mut CudaBuf, du: &mut CudaBuf, shape: GluShape) {
        let GluShape { len, act } = shape;
        let names = match act {
            GluAct::Silu => ["swiglu_bwd_f32", "swiglu_bwd_bf16"],
            GluAct::GeluTanh => ["geglu_bwd_f32", "geglu_bwd_bf16"],
            GluAct::Sigmoid => ["sigmoid_gate_bwd_f32", "sigmoid_gate_bwd_bf16"],
        };
        let n = len as u64;
        let cfg = grid_for(len);
        match (dout, gate, up, dg, du) {
            (CudaBuf::F32(d), CudaBuf::F32(g), CudaBuf::F32(u), CudaBuf::F32(dg), CudaBuf::F32(du)) => {
                launch!(self, names[0], cfg, d, g, u, dg, du, &n)
            }
            (CudaBuf::Bf16(d), CudaBuf::Bf16(g), CudaBuf::Bf16(u), CudaBuf::Bf16(dg), CudaBuf::Bf16(du)) => {
                launch!(self, names[1], cfg, d, g, u, dg, du, &n)
            }
            _ => panic!("glu_backward: buffers must share a storage type"),
        }
    }

    fn cross_entropy(&self, logits: &mut CudaBuf, targets: &CudaSlice<i32>, losses: &mut CudaBuf, shape: CeShape, grad_scale: Option<f32>) {
        let CeShape { rows, vocab, softcap } = shape;
        if let Some(c) = softcap {
            assert!(c > 0.0, "cross_entropy: soft-cap {c} must be positive");
        }
        let cap = softcap.unwrap_or(0.0); // 0: the kernel's uncapped path
        let (ri, vi) = (rows as i32, vocab as i32);
        let (scale, write) = (grad_scale.unwrap_or(0.0), grad_scale.is_some() as i32);
        let losses = losses.f32_mut("cross_entropy losses");
        let cfg = rows_grid(rows, 1024);
        match logits {
            CudaBuf::F32(l) => launch!(self, "cross_entropy_f32", cfg, l, targets, losses, &ri, &vi, &scale, &write, &cap),
            CudaBuf::Bf16(l) => launch!(self, "cross_entropy_bf16", cfg, l, targets, losses, &ri, &vi, &scale, &write, &cap),
        }
    }

    fn sample_rows(&self, logits: &CudaBuf, rows: usize, vocab: usize, params: &SamplingParams, uniforms: &[f64]) -> Vec<u32> {
        sample::sample_rows(self, logits, rows, vocab, params, uniforms)
    }

    fn delta_net(&self, inputs: DeltaIn<'_, CudaBuf>, w: DeltaWeights<'_, CudaWeight>, seqs: Varlen<'_, CudaSlice<i32>>, shape: DeltaShape, out: &mut CudaBuf, saved: &mut CudaBuf) {
        delta_net::forward(self, inputs, w, seqs, shape, out, saved);
    }
    fn delta_net_backward(
        &self,
        dout: &CudaBuf,
        inputs: DeltaIn<'_, CudaBuf>,
        w: DeltaWeights<'_, CudaWeight>,
        seqs: Varlen<'_, CudaSlice<i32>>,
        shape: DeltaShape,
        saved: &CudaBuf,
        grads: DeltaGrads<'_, CudaBuf>,
    ) {
        delta_net::backward(self, dout, inputs, w, seqs, shape, saved, grads);
    }
    fn delta_net_decode(
        &self,
        inputs: DeltaIn<'_, CudaBuf>,
        w: DeltaWeights<'_, CudaWeight>,
        seqs: Varlen<'_, CudaSlice<i32>>,
        shape: DeltaShape,
        state: DeltaState<'_, CudaBuf>,
        out: &mut CudaBuf,
    ) {
        delta_net::decode(self, inputs, w, seqs, shape, state, out);
    }

    fn adamw(&self, param: &mut CudaBuf, grad: &CudaBuf, m: &mut CudaBuf, v: &mut CudaBuf, hp: AdamW) {
        // The same scalars as the CPU reference (f64, cast to f32).
        let sc = hp.scalars();
        let (decay, step_size, bc2_sqrt) = (sc.decay, sc.step_size, sc.bias_c2_sqrt);
        let (one_m_b1, one_m_b2) = (sc.one_minus_beta1, sc.one_minus_beta2);
        let n = param.len() as u64;
        let cfg = grid_for(param.len());
        let (p, g) = (param.f32_mut("adamw param"), grad.f32("adamw grad"));
        let (mm, vv) = (m.f32_mut("adamw exp_avg"), v.f32_mut("adamw exp_avg_sq"));
        launch!(
            self, "adamw_f32", cfg, p, g, mm, vv, &n, &decay, &hp.beta1, &hp.beta2, &one_m_b1, &one_m_b2, &step_size,
            &bc2_sqrt, &hp.eps
        );
    }
}

impl CudaBackend {
    /// An elementwise kernel over all of `buf` in place, with one f32
    /// argument (`fill`, `scale`): `names` are its f32 and bf16 variants.
    fn launch_in_place(&self, names: [&str; 2], buf: &mut CudaBuf, value: f32) {
        let n = buf.len() as u64;
        let cfg = grid_for(buf.len());
        match buf {
            CudaBuf::F32(s) => launch!(self, names[0], cfg, s, &n, &value),
            CudaBuf::Bf16(s) => launch!(self, names[1], cfg, s, &n, &value),
        }
    }

    fn rope_launch(&self, name: &str, x: &mut CudaBuf, pos: &CudaSlice<i32>, inv_freq: &CudaBuf, shape: RopeShape) {
        let RopeShape { n, heads, head_dim: d, rot_dim, mscale } = shape;
        // Shapes come from the model graph, not from the user: a bad one is
        // a bug, refused before the kernel could read out of bounds.
        assert!(rot_dim.is_multiple_of(2) && rot_dim <= d, "rope: rot_dim {rot_dim} must be even and at most head_dim {d}");
        assert!(inv_freq.len() >= rot_dim / 2, "rope: inv_freq has {} entries, rot_dim {rot_dim} needs {}", inv_freq.len(), rot_dim / 2);
        assert!(x.len() >= n * heads * d && pos.len() >= n, "rope: x or positions shorter than {n} tokens of {heads}x{d}");
        let (ni, hi, di, ri) = (n as i32, heads as i32, d as i32, rot_dim as i32);
        let inv = inv_freq.f32("rope inv_freq");
        let cfg = grid_for(n * rot_dim / 2);
        match x {
            CudaBuf::F32(s) => launch!(self, name, cfg, s, pos, inv, &ni, &hi, &di, &ri, &mscale),
            CudaBuf::Bf16(s) => launch!(self, name, cfg, s, pos, inv, &ni, &hi, &di, &ri, &mscale),
        }
    }

    fn copy_cols_launch(&self, src: &CudaBuf, dst: &mut CudaBuf, shape: ColsShape) {
        let ColsShape { rows, src_cols, src_off, dst_cols, dst_off, width } = shape;
        assert!(src_off + width <= src_cols, "copy_cols: columns {src_off}..{} outside a source of {src_cols}", src_off + width);
        assert!(dst_off + width <= dst_cols, "copy_cols: columns {dst_off}..{} outside a destination of {dst_cols}", dst_off + width);
        assert!(src.len() >= rows * src_cols, "copy_cols: src holds {} values, not {rows}x{src_cols}", src.len());
        assert!(dst.len() >= rows * dst_cols, "copy_cols: dst holds {} values, not {rows}x{dst_cols}", dst.len());
        if rows == 0 || width == 0 {
            return;
        }
        let [r, sc, so, dc, d_off, w] = [rows, src_cols, src_off, dst_cols, dst_off, width].map(|v| v as i32);
        let cfg = rows_grid(rows, BLOCK);
        match (src, dst) {
            (CudaBuf::F32(s), CudaBuf::F32(d)) => launch!(self, "copy_cols_f32", cfg, s, d, &r, &sc, &so, &dc, &d_off, &w),
            (CudaBuf::Bf16(s), CudaBuf::Bf16(d)) => launch!(self, "copy_cols_bf16", cfg, s, d, &r, &sc, &so, &dc, &d_off, &w),
            _ => panic!("copy_cols: source and destination must share a storage type"),
        }
    }
}

/// Rows of at most this many values are normalised one warp per row (the
/// per-head q/k norms, head_dim <= 256); longer ones, the model's hidden
/// size, one block per row (cuda/rmsnorm.cu).
const NORM_WARP_ROW_MAX: usize = 256;

/// The rmsnorm kernels (f32, bf16) for `shape` and their launch: the
/// block-per-row ones, or their warp-per-row twins for short rows.
fn norm_kernels(block: [&'static str; 2], warp: [&'static str; 2], shape: NormShape) -> ([&'static str; 2], LaunchConfig) {
    if shape.hidden <= NORM_WARP_ROW_MAX {
        (warp, rows_grid(shape.rows.div_ceil((BLOCK / 32) as usize), BLOCK))
    } else {
        (block, rows_grid(shape.rows, BLOCK))
    }
}
