//! Datasets into token sequences. This version reads pre-tokenized rows;
//! the other dataset formats build on the same `Sequence`.
pub mod pretokenized;
