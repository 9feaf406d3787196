//! Quantized base weights: NF4 as bitsandbytes stores it (`nf4`), the
//! checkpoint layout of bitsandbytes' 4-bit models (`bnb`), and the
//! conversion of a whole checkpoint to that layout (`convert`). A new
//! quantized format adds its codes beside `nf4` and its checkpoint layout
//! beside `bnb`.
pub mod bnb;
pub mod convert;
pub mod nf4;
