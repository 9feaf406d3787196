//! A backend wrapper that simulates, on any backend (in practice the f32 CPU
//! reference), the storage precision of the CUDA backend: activations and
//! frozen weights in bf16, arithmetic in f32. It exists to check, without a
//! GPU, that the tolerances the GPU tests assert (`Tolerances::bf16()` in
//! conformance.rs, the model-level ones in tests/gpu.rs) are met by a
//! *correct* bf16 implementation: run the reference against
//! `Bf16Sim<CpuBackend>` and every difference is bf16 storage, nothing else.
//!
//! Every buffer remembers its storage kind (activation or f32, by the rules of
//! src/backend/mod.rs). Every op delegates to the inner backend and then
//! rounds each activation-typed output to bf16 (round to nearest even, as
//! `__float2bfloat16_rn` / `half::bf16::from_f32`), exactly as a GPU writing
//! bf16 would; f32 buffers are never rounded. Besides the stores, the
//! simulation rounds what src/backend/cuda/backend.rs casts to bf16 before a
//! cuBLAS product (`bf16_operand`, `dropped_input`) and the bf16
//! intermediates it keeps between products (LoRA's dxa). Each rounding point
//! is marked `// bf16:` below.
//!
//! Not simulated by default: the flash-attention kernels' internal rounding
//! (the tensor-core kernels for head_dim 64 / 128 round P before P·V, and P
//! and dS before the backward's products; the generic kernel used for other
//! head dims rounds neither). `with_flash_attention` turns on a host-side
//! attention that does round them (for head_dim 64 / 128 only, as the GPU).
//!
//! The buffer-kind rules the CUDA backend enforces (it panics on an f32
//! `inv_rms`, a bf16 `lse`, mixed kinds in `copy_slice`, ...) are enforced
//! here too, so a model-graph mistake that would crash on a GPU also fails on
//! the CPU.

mod flash;

use ferrotune::backend::{
    AdamW, AttnSaved, AttnShape, Backend, CeShape, ColsShape, DeltaGrads, DeltaIn, DeltaShape, DeltaState, DeltaWeights, Dropout, Forward, GluShape, LoraGrads, LoraInputs, LoraShape,
    MatShape, NormShape, Qkv, QkvGrads, RopeShape, Varlen, WeightSource, dropout_keep,
};
use anyhow::Result;

/// The storage kind of a simulated buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// Activation storage (bf16 on the GPU): `zeros`, `upload_activation`,
    /// and `zeros_like` of them.
    Act,
    /// f32 storage: `zeros_f32`, `upload`, and `zeros_like` of them.
    F32,
}

/// A buffer of the inner backend and its simulated storage kind.
pub struct SimBuf<T> {
    pub inner: T,
    kind: Storage,
}

impl<T> SimBuf<T> {
    pub fn kind(&self) -> Storage {
        self.kind
    }
}

/// i32 metadata of the inner backend, with a host copy (the simulated flash
/// attention needs `cu_seqlens` on the host; the trait has no int download).
pub struct SimInts<T> {
    pub inner: T,
    host: Vec<i32>,
}

type Buf<B> = SimBuf<<B as Backend>::Buf>;
type Ints<B> = SimInts<<B as Backend>::IntBuf>;

/// Round to the nearest bf16 (ties to even), back as f32.
pub fn round_bf16(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

fn rounded(mut v: Vec<f32>) -> Vec<f32> {
    v.iter_mut().for_each(|x| *x = round_bf16(*x));
    v
}

/// A product operand: the buffer itself, or a bf16-rounded copy.
enum Operand<'a, T> {
    Borrowed(&'a T),
    Owned(T),
}

impl<T> Operand<'_, T> {
    fn get(&self) -> &T {
        match self {
            Operand::Borrowed(t) => t,
            Operand::Owned(t) => t,
        }
    }
}

#[track_caller]
fn expect_kind<T>(buf: &SimBuf<T>, kind: Storage, what: &str) {
    assert!(buf.kind == kind, "{what} must be {kind:?} storage, got {:?} (the CUDA backend panics here)", buf.kind);
}

#[track_caller]
fn same_kind<T>(bufs: &[&SimBuf<T>], what: &str) {
    assert!(
        bufs.windows(2).all(|w| w[0].kind == w[1].kind),
        "{what}: buffers must share a storage type (the CUDA backend panics here)"
    );
}

pub struct Bf16Sim<B: Backend> {
    pub inner: B,
    flash_attention: bool,
}

impl<B: Backend> Bf16Sim<B> {
    /// Storage rounding only; attention delegates to the inner backend and
    /// rounds its outputs (what the GPU's generic attention kernel does).
    pub fn new(inner: B) -> Self {
        Bf16Sim { inner, flash_attention: false }
    }

    /// As `new`, and for head_dim 64 / 128 attention runs on the host with
    /// the tensor-core kernels' internal roundings (P before P·V; P and dS
    /// before the backward's products).
    pub fn with_flash_attention(inner: B) -> Self {
        Bf16Sim { inner, flash_attention: true }
    }

    fn wrap(&self, inner: B::Buf, kind: Storage) -> Buf<B> {
        SimBuf { inner, kind }
    }

    /// bf16: what a bf16 store does to an activation output; f32 outputs are
    /// left alone.
    fn store(&self, buf: &mut Buf<B>) {
        if buf.kind == Storage::Act {
            let v = rounded(self.inner.download(&buf.inner));
            buf.inner = self.inner.upload_activation(&v);
        }
    }

    /// Replace a buffer's contents by `v` (its full length), rounded if it is
    /// an activation buffer.
    fn overwrite(&self, buf: &mut Buf<B>, v: Vec<f32>) {
        buf.inner = match buf.kind {
            // bf16: the store of an activation output.
            Storage::Act => self.inner.upload_activation(&rounded(v)),
            Storage::F32 => self.inner.upload(&v),
        };
    }

    /// bf16: `bf16_operand` in the CUDA backend. A product operand is
    /// bf16; an f32 buffer is cast (rounded) to a bf16 copy first. Activation
    /// buffers already hold bf16 values.
    fn operand<'a>(&self, buf: &'a Buf<B>) -> Operand<'a, B::Buf> {
        match buf.kind {
            Storage::Act => Operand::Borrowed(&buf.inner),
            Storage::F32 => Operand::Owned(self.inner.upload(&rounded(self.inner.download(&buf.inner)))),
        }
    }

    /// bf16: `dropped_input` in the CUDA backend. The LoRA input as a bf16
    /// product operand: x itself (cast if f32), or dropout(x) = x·keep/(1−p)
    /// computed in f32 from the bf16 x and stored in a bf16 temporary.
    fn dropped_input<'a>(&self, x: &'a Buf<B>, dropout: Option<Dropout>, m: usize, k: usize) -> Operand<'a, B::Buf> {
        match dropout.filter(|d| d.p > 0.0) {
            None => self.operand(x),
            Some(d) => {
                let mut v = rounded(self.inner.download(&x.inner));
                apply_mask(&mut v[..m * k], d);
                Operand::Owned(self.inner.upload_activation(&rounded(v)))
            }
        }
    }

    /// The r × r identity (f32): a product with it is exact, which lets the
    /// LoRA ops below run one product of the inner op at a time.
    fn identity(&self, r: usize) -> B::Buf {
        let mut id = vec![0.0f32; r * r];
        (0..r).for_each(|i| id[i * r + i] = 1.0);
        self.inner.upload(&id)
    }

    fn flash(&self, shape: &AttnShape) -> bool {
        self.flash_attention && matches!(shape.head_dim, 64 | 128)
    }
}

/// `v[i] = keep(i) ? v[i] · 1/(1−p) : 0` (the mask of cpu/lora.rs and
/// cuda/lora_dropout.cu, indexed by the flat element of the [m, k] matrix).
fn apply_mask(v: &mut [f32], d: Dropout) {
    let inv = 1.0 / (1.0 - d.p);
    for (i, x) in v.iter_mut().enumerate() {
        *x = if dropout_keep(d.seed, i as u64, d.p) { *x * inv } else { 0.0 };
    }
}

impl<B: Backend> Forward for Bf16Sim<B> {
    type Inner = B;
    fn inner(&self) -> &B {
        &self.inner
    }
    fn buf(b: &Buf<B>) -> &B::Buf {
        &b.inner
    }
    fn buf_mut(b: &mut Buf<B>) -> &mut B::Buf {
        &mut b.inner
    }
    fn weight(w: &B::Weight) -> &B::Weight {
        w
    }
    fn ints(i: &Ints<B>) -> &B::IntBuf {
        &i.inner
    }
}

impl<B: Backend> Backend for Bf16Sim<B> {
    type Buf = Buf<B>;
    type Weight = B::Weight;
    type IntBuf = Ints<B>;

    // Reads (download, len, weight_to_f32, weight_len, sum_sq, sum_sq_all)
    // see stored values as they are: plain forwarding.
    ferrotune::forward_ops!(reads);

    fn name(&self) -> String {
        format!("bf16-sim({})", self.inner.name())
    }
    fn zeros(&self, len: usize) -> Buf<B> {
        self.wrap(self.inner.zeros(len), Storage::Act)
    }
    fn zeros_f32(&self, len: usize) -> Buf<B> {
        self.wrap(self.inner.zeros_f32(len), Storage::F32)
    }
    fn zeros_like(&self, like: &Buf<B>) -> Buf<B> {
        self.wrap(self.inner.zeros_like(&like.inner), like.kind)
    }
    fn upload(&self, data: &[f32]) -> Buf<B> {
        self.wrap(self.inner.upload(data), Storage::F32)
    }
    fn upload_activation(&self, data: &[f32]) -> Buf<B> {
        // bf16: activation storage holds bf16 values.
        self.wrap(self.inner.upload_activation(&rounded(data.to_vec())), Storage::Act)
    }
    fn upload_ints(&self, data: &[i32]) -> Ints<B> {
        SimInts { inner: self.inner.upload_ints(data), host: data.to_vec() }
    }
    fn load_weight(&self, src: &WeightSource) -> Result<B::Weight> {
        // bf16: weights are stored in bf16 (f32 and f16 checkpoints are
        // rounded, bf16 ones are unchanged). The inner load validates `src`.
        let w = self.inner.load_weight(src)?;
        Ok(self.inner.weight_from_f32(&rounded(self.inner.weight_to_f32(&w))))
    }
    fn weight_from_f32(&self, data: &[f32]) -> B::Weight {
        // bf16: weights are stored in bf16.
        self.inner.weight_from_f32(&rounded(data.to_vec()))
    }
    fn weight_from_nf4(&self, t: &ferrotune::quant::nf4::Nf4Tensor) -> Result<B::Weight> {
        // bf16: the GPU dequantizes each product's NF4 weight into a bf16
        // scratch, bf16(code · absmax) with the f32 product rounded once; the
        // simulation stores those bf16 values (dense: the 4-bit saving is a
        // memory matter, not a numerical one).
        ferrotune::backend::check_nf4(t)?;
        Ok(self.inner.weight_from_f32(&rounded(t.dequantize())))
    }
    fn fill(&self, buf: &mut Buf<B>, value: f32) {
        self.inner.fill(&mut buf.inner, value);
        self.store(buf); // bf16: the filled value as stored.
    }
    fn copy_slice(&self, src: &Buf<B>, src_off: usize, dst: &mut Buf<B>, dst_off: usize, len: usize) {
        same_kind(&[src, dst], "copy_slice");
        // Same kind on both sides: a copy of stored values, exact.
        self.inner.copy_slice(&src.inner, src_off, &mut dst.inner, dst_off, len)
    }
    fn add_assign(&self, dst: &mut Buf<B>, src: &Buf<B>) {
        same_kind(&[dst, src], "add_assign");
        self.inner.add_assign(&mut dst.inner, &src.inner);
        self.store(dst); // bf16: the sum is stored in the activation type.
    }
    fn scale(&self, buf: &mut Buf<B>, s: f32) {
        self.inner.scale(&mut buf.inner, s);
        self.store(buf); // bf16: the product is stored in the activation type.
    }
    fn softcap(&self, buf: &mut Buf<B>, cap: f32) {
        self.inner.softcap(&mut buf.inner, cap);
        self.store(buf); // bf16: the capped value is stored in the buffer's type.
    }
    fn copy_cols(&self, src: &Buf<B>, dst: &mut Buf<B>, shape: ColsShape) {
        same_kind(&[src, dst], "copy_cols");
        // Same kind on both sides: a copy of stored values, exact.
        self.inner.copy_cols(&src.inner, &mut dst.inner, shape)
    }
    fn embedding(&self, table: &B::Weight, ids: &Ints<B>, out: &mut Buf<B>, n: usize, hidden: usize) {
        self.inner.embedding(table, &ids.inner, &mut out.inner, n, hidden);
        self.store(out); // bf16: a gather of bf16 weights; exact, kept for uniformity.
    }
    fn linear(&self, x: &Buf<B>, w: &B::Weight, bias: Option<&B::Weight>, y: &mut Buf<B>, shape: MatShape) {
        // bf16: x is a bf16 GEMM operand (an f32 x is cast); W and the bias
        // are bf16 since load.
        let xb = self.operand(x);
        self.inner.linear(xb.get(), w, bias, &mut y.inner, shape);
        // bf16: y in its type (the LM head writes f32 logits: not rounded).
        self.store(y);
    }
    fn linear_backward_input(&self, dy: &Buf<B>, w: &B::Weight, dx: &mut Buf<B>, shape: MatShape, acc: bool) {
        // bf16: dy is a bf16 GEMM operand; the logits gradient (f32) is cast
        // to bf16 before the LM head's backward product.
        let dyb = self.operand(dy);
        self.inner.linear_backward_input(dyb.get(), w, &mut dx.inner, shape, acc);
        self.store(dx); // bf16: dx (+ its old value, f32 accumulate) stored once.
    }
    fn lora_forward(&self, inputs: LoraInputs<'_, Buf<B>>, xa: &mut Buf<B>, y: &mut Buf<B>, shape: LoraShape) {
        let LoraInputs { x, a, b } = inputs;
        let LoraShape { m, k, r, dropout, .. } = shape;
        // bf16: A and B (f32 masters) are cast to bf16 copies for the
        // tensor-core products; the masters stay f32.
        let (ab, bb) = (self.operand(a), self.operand(b));
        // bf16: the input operand, dropout(x) in a bf16 temporary.
        let xd = self.dropped_input(x, dropout, m, k);
        // xa = xd · Aᵀ, alone: the inner op with a one-column y to discard.
        let mut y_scratch = self.inner.zeros_f32(m);
        let b_scratch = self.inner.zeros_f32(r);
        let first = LoraShape { n: 1, dropout: None, ..shape };
        self.inner.lora_forward(LoraInputs { x: xd.get(), a: ab.get(), b: &b_scratch }, &mut xa.inner, &mut y_scratch, first);
        // bf16: xa stored in its type (activation), then used as the bf16
        // operand of the second product (cast if f32).
        self.store(xa);
        let xab = self.operand(xa);
        // y += scale · xa · Bᵀ: the inner op on x = xa, A = I (xa·Iᵀ = xa exactly).
        let mut xa_scratch = self.inner.zeros_f32(m * r);
        let id = self.identity(r);
        let second = LoraShape { k: r, dropout: None, ..shape };
        self.inner.lora_forward(LoraInputs { x: xab.get(), a: &id, b: bb.get() }, &mut xa_scratch, &mut y.inner, second);
        self.store(y); // bf16: y + the side path, f32 accumulate, stored once.
    }
    fn lora_backward(
        &self,
        dy: &Buf<B>,
        inputs: LoraInputs<'_, Buf<B>>,
        xa: &Buf<B>,
        grads: LoraGrads<'_, Buf<B>>,
        shape: LoraShape,
    ) {
        let LoraInputs { x, a, b } = inputs;
        let LoraGrads { dx, da, db } = grads;
        let LoraShape { m, k, r, dropout, .. } = shape;
        // bf16: dy, xa, A, B are bf16 GEMM operands (f32 ones cast).
        let (dyb, xab, ab, bb) = (self.operand(dy), self.operand(xa), self.operand(a), self.operand(b));
        let id = self.identity(r);
        // 1. dB += s · dyᵀ · xa, and dxa = s · dy · B: the inner op with
        //    k = r, x = 0 and A = I, so its "dx" (from zero) is dxa·I = dxa.
        let x0 = self.inner.zeros_f32(m * r);
        let mut dxa = self.inner.zeros_f32(m * r);
        let mut da_scratch = self.inner.zeros_f32(r * r);
        self.inner.lora_backward(
            dyb.get(),
            LoraInputs { x: &x0, a: &id, b: bb.get() },
            xab.get(),
            LoraGrads { dx: &mut dxa, da: &mut da_scratch, db: &mut db.inner },
            LoraShape { k: r, dropout: None, ..shape },
        );
        self.store(db); // bf16 only if dB were an activation buffer (it is f32).
        // bf16: the GPU keeps dxa in a bf16 temporary (an operand of the next
        // two products).
        let dxa = self.inner.upload_activation(&rounded(self.inner.download(&dxa)));
        // bf16: the dropped input, as in the forward.
        let xd = self.dropped_input(x, dropout, m, k);
        // 2. dA += dxaᵀ · xd and (dx or a temporary) += dxa · A: the inner op
        //    with dy = dxa, n = r, B = I (so its own dxa is 1·dxa·I = dxa).
        let xa0 = self.inner.zeros_f32(m * r);
        let mut db_scratch = self.inner.zeros_f32(r * r);
        let (second, b_id) = (LoraShape { n: r, scale: 1.0, dropout: None, ..shape }, LoraInputs { x: xd.get(), a: ab.get(), b: &id });
        match dropout.filter(|d| d.p > 0.0) {
            None => {
                let grads = LoraGrads { dx: &mut dx.inner, da: &mut da.inner, db: &mut db_scratch };
                self.inner.lora_backward(&dxa, b_id, &xa0, grads, second);
                self.store(dx); // bf16: dx + dxa·A, f32 accumulate, stored once.
            }
            Some(d) => {
                let mut tmp = self.zeros_like(dx);
                let grads = LoraGrads { dx: &mut tmp.inner, da: &mut da.inner, db: &mut db_scratch };
                self.inner.lora_backward(&dxa, b_id, &xa0, grads, second);
                // bf16: tmp = dxa·A is stored in dx's type, then the dropout
                // kernel adds mask ⊙ tmp / (1−p) into dx and stores it.
                self.store(&mut tmp);
                let mut t = self.inner.download(&tmp.inner);
                apply_mask(&mut t[..m * k], d);
                let mut v = self.inner.download(&dx.inner);
                v[..m * k].iter_mut().zip(&t[..m * k]).for_each(|(o, t)| *o += t);
                self.overwrite(dx, v);
            }
        }
        self.store(da); // bf16 only if dA were an activation buffer (it is f32).
    }
    fn rmsnorm(&self, x: &Buf<B>, w: &B::Weight, y: &mut Buf<B>, inv: &mut Buf<B>, shape: NormShape, eps: f32) {
        expect_kind(inv, Storage::F32, "rmsnorm inv_rms");
        same_kind(&[x, y], "rmsnorm");
        self.inner.rmsnorm(&x.inner, w, &mut y.inner, &mut inv.inner, shape, eps);
        // bf16: y stored in the activation type; inv_rms stays f32. (1 + w)
        // is formed in f32 from the bf16 weight, as the kernel does: no rounding.
        self.store(y);
    }
    fn rmsnorm_backward(&self, dy: &Buf<B>, x: &Buf<B>, w: &B::Weight, inv: &Buf<B>, dx: &mut Buf<B>, shape: NormShape) {
        expect_kind(inv, Storage::F32, "rmsnorm_backward inv_rms");
        same_kind(&[dy, x, dx], "rmsnorm_backward");
        self.inner.rmsnorm_backward(&dy.inner, &x.inner, w, &inv.inner, &mut dx.inner, shape);
        self.store(dx); // bf16: dx + the norm's gradient, stored once.
    }
    fn rope(&self, x: &mut Buf<B>, pos: &Ints<B>, inv_freq: &Buf<B>, shape: RopeShape) {
        expect_kind(inv_freq, Storage::F32, "rope inv_freq");
        self.inner.rope(&mut x.inner, &pos.inner, &inv_freq.inner, shape);
        // bf16: rotated in place, stored back (the dims past rot_dim are
        // not written: already bf16, the store leaves them exact).
        self.store(x);
    }
    fn rope_backward(&self, dx: &mut Buf<B>, pos: &Ints<B>, inv_freq: &Buf<B>, shape: RopeShape) {
        expect_kind(inv_freq, Storage::F32, "rope inv_freq");
        self.inner.rope_backward(&mut dx.inner, &pos.inner, &inv_freq.inner, shape);
        self.store(dx); // bf16: rotated in place, stored back.
    }
    fn attention(&self, qkv: Qkv<'_, Buf<B>>, seqs: Varlen<'_, Ints<B>>, shape: AttnShape, out: &mut Buf<B>, lse: &mut Buf<B>) {
        let Qkv { q, k, v } = qkv;
        for (b, what) in [(q, "q"), (k, "k"), (v, "v"), (&*out, "out")] {
            expect_kind(b, Storage::Act, &format!("attention {what}"));
        }
        expect_kind(lse, Storage::F32, "attention lse");
        if self.flash(&shape) {
            let (qh, kh, vh) = (self.download(q), self.download(k), self.download(v));
            let seqs_host = Varlen { cu_seqlens: seqs.cu_seqlens.host.as_slice(), n_seqs: seqs.n_seqs };
            let (o, l) = flash::forward(Qkv { q: &qh[..], k: &kh[..], v: &vh[..] }, seqs_host, &shape);
            let (mut ov, mut lv) = (self.download(out), self.download(lse));
            ov[..o.len()].copy_from_slice(&o);
            lv[..l.len()].copy_from_slice(&l);
            self.overwrite(out, ov); // bf16: out stored in the activation type.
            self.overwrite(lse, lv);
        } else {
            let inner_seqs = seqs.map(|i| &i.inner);
            self.inner.attention(qkv.map(|b| &b.inner), inner_seqs, shape, &mut out.inner, &mut lse.inner);
            self.store(out); // bf16: out stored in the activation type; lse stays f32.
        }
    }
    fn attention_backward(
        &self,
        dout: &Buf<B>,
        qkv: Qkv<'_, Buf<B>>,
        saved: AttnSaved<'_, Buf<B>>,
        seqs: Varlen<'_, Ints<B>>,
        shape: AttnShape,
        grads: QkvGrads<'_, Buf<B>>,
    ) {
        let (Qkv { q, k, v }, AttnSaved { out, lse }) = (qkv, saved);
        let QkvGrads { dq, dk, dv } = grads;
        for (b, what) in [(dout, "dout"), (q, "q"), (k, "k"), (v, "v"), (out, "out"), (&*dq, "dq"), (&*dk, "dk"), (&*dv, "dv")] {
            expect_kind(b, Storage::Act, &format!("attention_backward {what}"));
        }
        expect_kind(lse, Storage::F32, "attention_backward lse");
        if self.flash(&shape) {
            let h = |b: &Buf<B>| self.download(b);
            let (qh, kh, vh, oh, lh) = (h(q), h(k), h(v), h(out), h(lse));
            let seqs_host = Varlen { cu_seqlens: seqs.cu_seqlens.host.as_slice(), n_seqs: seqs.n_seqs };
            let (gq, gk, gv) = flash::backward(
                &h(dout),
                Qkv { q: &qh[..], k: &kh[..], v: &vh[..] },
                AttnSaved { out: &oh[..], lse: &lh[..] },
                seqs_host,
                &shape,
            );
            for (buf, g) in [(dq, gq), (dk, gk), (dv, gv)] {
                let mut cur = self.download(buf);
                cur[..g.len()].copy_from_slice(&g);
                self.overwrite(buf, cur); // bf16: each gradient stored in the activation type.
            }
        } else {
            self.inner.attention_backward(
                &dout.inner,
                qkv.map(|b| &b.inner),
                saved.map(|b| &b.inner),
                seqs.map(|i| &i.inner),
                shape,
                QkvGrads { dq: &mut dq.inner, dk: &mut dk.inner, dv: &mut dv.inner },
            );
            // bf16: dq, dk, dv stored in the activation type.
            self.store(dq);
            self.store(dk);
            self.store(dv);
        }
    }
    fn decode_attention(
        &self,
        q: &Buf<B>,
        k_cache: &Buf<B>,
        v_cache: &Buf<B>,
        past: usize,
        shape: AttnShape,
        out: &mut Buf<B>,
    ) {
        for (b, what) in [(q, "q"), (k_cache, "k_cache"), (v_cache, "v_cache"), (&*out, "out")] {
            expect_kind(b, Storage::Act, &format!("decode_attention {what}"));
        }
        // cuda/decode_attn.cu computes in f32 from bf16 inputs with no
        // internal rounding (whatever the head_dim): only out is stored.
        self.inner.decode_attention(&q.inner, &k_cache.inner, &v_cache.inner, past, shape, &mut out.inner);
        self.store(out); // bf16: out stored in the activation type.
    }
    fn decode_attention_batch(
        &self,
        q: &Buf<B>,
        k_cache: &Buf<B>,
        v_cache: &Buf<B>,
        positions: &Ints<B>,
        capacity: usize,
        shape: AttnShape,
        out: &mut Buf<B>,
    ) {
        for (b, what) in [(q, "q"), (k_cache, "k_cache"), (v_cache, "v_cache"), (&*out, "out")] {
            expect_kind(b, Storage::Act, &format!("decode_attention_batch {what}"));
        }
        // As decode_attention: f32 from bf16 inputs, only out stored.
        self.inner.decode_attention_batch(&q.inner, &k_cache.inner, &v_cache.inner, Self::ints(positions), capacity, shape, &mut out.inner);
        self.store(out);
    }
    fn scatter_rows(&self, src: &Buf<B>, dst: &mut Buf<B>, positions: &Ints<B>, rows: usize, width: usize, capacity: usize) {
        same_kind(&[src, dst], "scatter_rows");
        // A copy of stored values: nothing to round.
        self.inner.scatter_rows(&src.inner, &mut dst.inner, Self::ints(positions), rows, width, capacity);
    }
    fn delta_net(&self, i: DeltaIn<'_, Buf<B>>, w: DeltaWeights<'_, B::Weight>, seqs: Varlen<'_, Ints<B>>, shape: DeltaShape, out: &mut Buf<B>, saved: &mut Buf<B>) {
        same_kind(&[i.qkv, i.z, i.b, i.a, out], "delta_net");
        expect_kind(saved, Storage::F32, "delta_net saved states");
        self.inner.delta_net(i.map(|b| &b.inner), w, seqs.map(Self::ints), shape, &mut out.inner, &mut saved.inner);
        // bf16: the output stored in the activation type; the states stay f32.
        self.store(out);
    }
    fn delta_net_backward(
        &self,
        dout: &Buf<B>,
        i: DeltaIn<'_, Buf<B>>,
        w: DeltaWeights<'_, B::Weight>,
        seqs: Varlen<'_, Ints<B>>,
        shape: DeltaShape,
        saved: &Buf<B>,
        g: DeltaGrads<'_, Buf<B>>,
    ) {
        let DeltaGrads { qkv, z, b, a } = g;
        self.inner.delta_net_backward(
            &dout.inner,
            i.map(|b| &b.inner),
            w,
            seqs.map(Self::ints),
            shape,
            &saved.inner,
            DeltaGrads { qkv: &mut qkv.inner, z: &mut z.inner, b: &mut b.inner, a: &mut a.inner },
        );
        // bf16: every input gradient stored in the activation type.
        for buf in [qkv, z, b, a] {
            self.store(buf);
        }
    }
    fn delta_net_decode(&self, i: DeltaIn<'_, Buf<B>>, w: DeltaWeights<'_, B::Weight>, seqs: Varlen<'_, Ints<B>>, shape: DeltaShape, state: DeltaState<'_, Buf<B>>, out: &mut Buf<B>) {
        let DeltaState { conv, rec } = state;
        self.inner.delta_net_decode(i.map(|b| &b.inner), w, seqs.map(Self::ints), shape, DeltaState { conv: &mut conv.inner, rec: &mut rec.inner }, &mut out.inner);
        // bf16: the output in the activation type; the states are kept f32.
        self.store(out);
    }
    fn glu(&self, gate: &Buf<B>, up: &Buf<B>, out: &mut Buf<B>, shape: GluShape) {
        same_kind(&[gate, up, out], "glu");
        self.inner.glu(&gate.inner, &up.inner, &mut out.inner, shape);
        self.store(out); // bf16: out stored in the activation type.
    }
    fn glu_backward(&self, dout: &Buf<B>, gate: &Buf<B>, up: &Buf<B>, dg: &mut Buf<B>, du: &mut Buf<B>, shape: GluShape) {
        same_kind(&[dout, gate, up, dg, du], "glu_backward");
        self.inner.glu_backward(&dout.inner, &gate.inner, &up.inner, &mut dg.inner, &mut du.inner, shape);
        // bf16: both gradients stored in the activation type.
        self.store(dg);
        self.store(du);
    }
    fn cross_entropy(
        &self,
        logits: &mut Buf<B>,
        targets: &Ints<B>,
        losses: &mut Buf<B>,
        shape: CeShape,
        grad_scale: Option<f32>,
    ) {
        expect_kind(losses, Storage::F32, "cross_entropy losses");
        self.inner.cross_entropy(&mut logits.inner, &targets.inner, &mut losses.inner, shape, grad_scale);
        // bf16 only for activation-typed logits (the model's are f32): the
        // gradient written in place is stored in their type.
        if grad_scale.is_some() {
            self.store(logits);
        }
    }
    fn adamw(&self, param: &mut Buf<B>, grad: &Buf<B>, m: &mut Buf<B>, v: &mut Buf<B>, hp: AdamW) {
        for (b, what) in [(&*param, "adamw param"), (grad, "adamw grad"), (&*m, "adamw exp_avg"), (&*v, "adamw exp_avg_sq")] {
            expect_kind(b, Storage::F32, what);
        }
        self.inner.adamw(&mut param.inner, &grad.inner, &mut m.inner, &mut v.inner, hp)
    }
}
