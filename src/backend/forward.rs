//! The one forwarding mechanism of wrapper backends (a backend around
//! another that observes its calls: timing in `profiled`, byte counts in
//! the testkit's meter; the testkit's bf16 simulation, which re-routes the
//! ops, forwards only the read-only methods through it).
//!
//! A wrapper implements [`Forward`] (how its handles reach the inner
//! backend's, and what runs around each call), writes the methods that
//! create handles (`zeros*`, `upload*`, `load_weight`, `weight_from_*`)
//! itself, and invokes [`forward_ops!`](crate::forward_ops) inside its
//! `impl Backend` for every other method. A new op of the trait is one more
//! line in the table of `forward_ops!`.

use super::Backend;

/// How a wrapper backend reaches the backend it wraps.
pub trait Forward: Backend {
    type Inner: Backend;
    fn inner(&self) -> &Self::Inner;
    fn buf(b: &Self::Buf) -> &<Self::Inner as Backend>::Buf;
    fn buf_mut(b: &mut Self::Buf) -> &mut <Self::Inner as Backend>::Buf;
    fn weight(w: &Self::Weight) -> &<Self::Inner as Backend>::Weight;
    fn ints(i: &Self::IntBuf) -> &<Self::Inner as Backend>::IntBuf;
    /// Runs `call`, the inner backend's `op` (named as the op table of
    /// `forward_ops!` names it). A wrapper that only re-routes keeps this.
    fn around<T>(&self, op: &'static str, call: impl FnOnce() -> T) -> T {
        let _ = op;
        call()
    }
}

/// Writes, inside `impl Backend for W` where `W: Forward`, every method of
/// the trait except those that create handles, each as
/// `self.around(name, || inner.op(args mapped to the inner handles))`;
/// `forward_ops!(name)`, `forward_ops!(reads)` and `forward_ops!(ops)` write
/// one part each (`name`; the read-only methods; the ops), for a wrapper
/// that writes the others itself.
///
/// Table rows: `name method(arg: kind, ...) [-> ret];`, where `name` is the
/// op's name for `around` (`_`: called directly, no `around`) and `kind`
/// says how the argument reaches the inner backend: `buf`, `buf_mut`,
/// `weight`, `opt_weight`, `ints`, `buf_list` (`&[&Buf]`), `bufs[Group]` /
/// `bufs_mut[Group]` / `weights[Group]` (a group of `backend::args`), `seqs` (a `Varlen`) or
/// `val[Type]` (passed as is).
#[macro_export]
macro_rules! forward_ops {
    () => {
        $crate::forward_ops!(name);
        $crate::forward_ops!(reads);
        $crate::forward_ops!(ops);
    };
    (name) => {
        $crate::forward_ops! { @table
            _ name() -> String;
            _ check_model(cfg: val[&$crate::model::hparams::ModelConfig]) -> ::anyhow::Result<()>;
        }
    };
    // Methods that only read (a wrapper that re-routes the ops may still
    // forward these).
    (reads) => {
        $crate::forward_ops! { @table
            "download" download(buf: buf) -> Vec<f32>;
            _ len(buf: buf) -> usize;
            _ weight_to_f32(w: weight) -> Vec<f32>;
            _ weight_len(w: weight) -> usize;
            "sum_sq" sum_sq(buf: buf) -> f64;
            "sum_sq" sum_sq_all(bufs: buf_list) -> f64;
            "sample_rows" sample_rows(logits: buf, rows: val[usize], vocab: val[usize], params: val[&$crate::backend::SamplingParams], uniforms: val[&[f64]]) -> Vec<u32>;
        }
    };
    // The ops proper: one line per op of the trait.
    (ops) => {
        $crate::forward_ops! { @table
            "fill" fill(buf: buf_mut, value: val[f32]);
            "copy" copy_slice(src: buf, src_off: val[usize], dst: buf_mut, dst_off: val[usize], len: val[usize]);
            "add" add_assign(dst: buf_mut, src: buf);
            "scale" scale(buf: buf_mut, s: val[f32]);
            "softcap" softcap(buf: buf_mut, cap: val[f32]);
            "copy_cols" copy_cols(src: buf, dst: buf_mut, shape: val[$crate::backend::ColsShape]);
            "embedding" embedding(table: weight, ids: ints, out: buf_mut, n: val[usize], hidden: val[usize]);
            "linear" linear(x: buf, w: weight, bias: opt_weight, y: buf_mut, shape: val[$crate::backend::MatShape]);
            "linear_backward_input" linear_backward_input(dy: buf, w: weight, dx: buf_mut, shape: val[$crate::backend::MatShape], accumulate: val[bool]);
            "lora_forward" lora_forward(inputs: bufs[LoraInputs], xa: buf_mut, y: buf_mut, shape: val[$crate::backend::LoraShape]);
            "lora_backward" lora_backward(dy: buf, inputs: bufs[LoraInputs], xa: buf, grads: bufs_mut[LoraGrads], shape: val[$crate::backend::LoraShape]);
            "rmsnorm" rmsnorm(x: buf, w: weight, y: buf_mut, inv_rms: buf_mut, shape: val[$crate::backend::NormShape], eps: val[f32]);
            "rmsnorm_backward" rmsnorm_backward(dy: buf, x: buf, w: weight, inv_rms: buf, dx: buf_mut, shape: val[$crate::backend::NormShape]);
            "rope" rope(x: buf_mut, positions: ints, inv_freq: buf, shape: val[$crate::backend::RopeShape]);
            "rope_backward" rope_backward(dx: buf_mut, positions: ints, inv_freq: buf, shape: val[$crate::backend::RopeShape]);
            "attention" attention(qkv: bufs[Qkv], seqs: seqs, shape: val[$crate::backend::AttnShape], out: buf_mut, lse: buf_mut);
            "attention_backward" attention_backward(dout: buf, qkv: bufs[Qkv], saved: bufs[AttnSaved], seqs: seqs, shape: val[$crate::backend::AttnShape], grads: bufs_mut[QkvGrads]);
            "decode_attention" decode_attention(q: buf, k_cache: buf, v_cache: buf, past: val[usize], shape: val[$crate::backend::AttnShape], out: buf_mut);
            "decode_attention_batch" decode_attention_batch(q: buf, k_cache: buf, v_cache: buf, positions: ints, capacity: val[usize], shape: val[$crate::backend::AttnShape], out: buf_mut);
            "scatter_rows" scatter_rows(src: buf, dst: buf_mut, positions: ints, rows: val[usize], width: val[usize], capacity: val[usize]);
            "delta_net" delta_net(inputs: bufs[DeltaIn], w: weights[DeltaWeights], seqs: seqs, shape: val[$crate::backend::DeltaShape], out: buf_mut, saved: buf_mut);
            "delta_net_backward" delta_net_backward(dout: buf, inputs: bufs[DeltaIn], w: weights[DeltaWeights], seqs: seqs, shape: val[$crate::backend::DeltaShape], saved: buf, grads: bufs_mut[DeltaGrads]);
            "delta_net_decode" delta_net_decode(inputs: bufs[DeltaIn], w: weights[DeltaWeights], seqs: seqs, shape: val[$crate::backend::DeltaShape], state: bufs_mut[DeltaState], out: buf_mut);
            "glu" glu(gate: buf, up: buf, out: buf_mut, shape: val[$crate::backend::GluShape]);
            "glu_backward" glu_backward(dout: buf, gate: buf, up: buf, dgate: buf_mut, dup: buf_mut, shape: val[$crate::backend::GluShape]);
            "cross_entropy" cross_entropy(logits: buf_mut, targets: ints, losses: buf_mut, shape: val[$crate::backend::CeShape], grad_scale: val[Option<f32>]);
            "adamw" adamw(param: buf_mut, grad: buf, m: buf_mut, v: buf_mut, hp: val[$crate::backend::AdamW]);
            _ enter(phase: val[$crate::backend::Phase]);
        }
    };
    (@table $( $name:tt $op:ident ( $( $arg:ident : $kind:ident $( [ $($ty:tt)* ] )? ),* ) $( -> $ret:ty )? ; )* ) => {
        $(
            fn $op(&self $(, $arg: $crate::forward_ops!(@ty $kind $( $($ty)* )?) )*) $( -> $ret )? {
                $crate::forward_ops!(@call self, $name, $crate::backend::Forward::inner(self).$op(
                    $( $crate::forward_ops!(@arg $kind $arg) ),*
                ))
            }
        )*
    };
    (@call $self:ident, _, $call:expr) => { $call };
    (@call $self:ident, $name:literal, $call:expr) => { $crate::backend::Forward::around($self, $name, || $call) };
    (@ty buf) => { &Self::Buf };
    (@ty buf_mut) => { &mut Self::Buf };
    (@ty weight) => { &Self::Weight };
    (@ty opt_weight) => { Option<&Self::Weight> };
    (@ty ints) => { &Self::IntBuf };
    (@ty buf_list) => { &[&Self::Buf] };
    (@ty bufs $group:ident) => { $crate::backend::$group<'_, Self::Buf> };
    (@ty bufs_mut $group:ident) => { $crate::backend::$group<'_, Self::Buf> };
    (@ty weights $group:ident) => { $crate::backend::$group<'_, Self::Weight> };
    (@ty seqs) => { $crate::backend::Varlen<'_, Self::IntBuf> };
    (@ty val $($ty:tt)*) => { $($ty)* };
    (@arg buf $a:ident) => { <Self as $crate::backend::Forward>::buf($a) };
    (@arg buf_mut $a:ident) => { <Self as $crate::backend::Forward>::buf_mut($a) };
    (@arg weight $a:ident) => { <Self as $crate::backend::Forward>::weight($a) };
    (@arg opt_weight $a:ident) => { $a.map(<Self as $crate::backend::Forward>::weight) };
    (@arg ints $a:ident) => { <Self as $crate::backend::Forward>::ints($a) };
    (@arg buf_list $a:ident) => {
        &$a.iter().map(|b| <Self as $crate::backend::Forward>::buf(b)).collect::<Vec<_>>()
    };
    (@arg bufs $a:ident) => { $a.map(<Self as $crate::backend::Forward>::buf) };
    (@arg bufs_mut $a:ident) => { $a.map(<Self as $crate::backend::Forward>::buf_mut) };
    (@arg weights $a:ident) => { $a.map(<Self as $crate::backend::Forward>::weight) };
    (@arg seqs $a:ident) => { $a.map(<Self as $crate::backend::Forward>::ints) };
    (@arg val $a:ident) => { $a };
}
