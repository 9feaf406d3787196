//! Argument groups of the ops: the shapes and constants of one call (small
//! `Copy` structs) and the buffers an op takes together (q/k/v, a LoRA
//! path's x/A/B, their gradients). They keep every op at a handful of
//! arguments and name what each number is at the call site. A new group
//! goes here; a group of buffers is declared with `buffers!` so wrappers
//! can map it onto their inner backend's handles.

use super::Dropout;

/// Shape of a frozen-linear product: x[m, k] · W[n, k]ᵀ = y[m, n].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatShape {
    pub m: usize,
    pub k: usize,
    pub n: usize,
}

/// One LoRA side path: x[m, k], A[r, k], B[n, r], xa[m, r], y[m, n]; the
/// side path's output is multiplied by `scale`, its input dropped out with
/// `dropout`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraShape {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub r: usize,
    pub scale: f32,
    pub dropout: Option<Dropout>,
}

/// RMSNorm over `rows` rows of `hidden` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NormShape {
    pub rows: usize,
    pub hidden: usize,
}

/// Rotary embedding over x[n, heads, head_dim].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RopeShape {
    pub n: usize,
    pub heads: usize,
    pub head_dim: usize,
}

/// The sequences of a varlen batch: `cu_seqlens` (length `n_seqs + 1`) on
/// the backend, see the module docs of `backend`.
pub struct Varlen<'a, I: ?Sized> {
    pub cu_seqlens: &'a I,
    pub n_seqs: usize,
}

impl<I: ?Sized> Clone for Varlen<'_, I> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<I: ?Sized> Copy for Varlen<'_, I> {}

impl<'a, I: ?Sized> Varlen<'a, I> {
    /// The same batch over another backend's handle (wrapper backends).
    pub fn map<J: ?Sized>(self, f: impl Fn(&'a I) -> &'a J) -> Varlen<'a, J> {
        Varlen { cu_seqlens: f(self.cu_seqlens), n_seqs: self.n_seqs }
    }
}

/// Declares a group of buffers an op takes together: read-only (`ref`,
/// `Copy`) or written (`mut`), each with `map` to the same group over
/// another backend's buffers.
macro_rules! buffers {
    ($(#[$doc:meta])* ref $name:ident { $($field:ident),+ }) => {
        $(#[$doc])*
        pub struct $name<'a, T: ?Sized> {
            $(pub $field: &'a T,)+
        }
        impl<T: ?Sized> Clone for $name<'_, T> {
            fn clone(&self) -> Self {
                *self
            }
        }
        impl<T: ?Sized> Copy for $name<'_, T> {}
        impl<'a, T: ?Sized> $name<'a, T> {
            /// The same buffers as another backend's (wrapper backends).
            pub fn map<U: ?Sized>(self, f: impl Fn(&'a T) -> &'a U) -> $name<'a, U> {
                $name { $($field: f(self.$field),)+ }
            }
        }
    };
    ($(#[$doc:meta])* mut $name:ident { $($field:ident),+ }) => {
        $(#[$doc])*
        pub struct $name<'a, T: ?Sized> {
            $(pub $field: &'a mut T,)+
        }
        impl<'a, T: ?Sized> $name<'a, T> {
            /// The same buffers as another backend's (wrapper backends).
            pub fn map<U: ?Sized>(self, mut f: impl FnMut(&'a mut T) -> &'a mut U) -> $name<'a, U> {
                $name { $($field: f(self.$field),)+ }
            }
        }
    };
}

buffers! {
    /// Attention's queries [n, n_heads, d], keys and values [n, n_kv_heads, d].
    ref Qkv { q, k, v }
}
buffers! {
    /// Gradients of q, k and v (overwritten by `attention_backward`).
    mut QkvGrads { dq, dk, dv }
}
buffers! {
    /// What the attention forward saved for its backward: the output
    /// [n, n_heads, d] and the log-sum-exp [n_heads, n].
    ref AttnSaved { out, lse }
}
buffers! {
    /// A LoRA side path's input x[m, k] and adapter matrices A[r, k], B[n, r].
    ref LoraInputs { x, a, b }
}
buffers! {
    /// Gradients of a LoRA side path: dx (accumulated), dA and dB (accumulated).
    mut LoraGrads { dx, da, db }
}
