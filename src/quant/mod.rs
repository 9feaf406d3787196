//! Quantized base weights: NF4 as bitsandbytes stores it (`nf4`), and the
//! checkpoint layout of bitsandbytes' 4-bit models (`bnb`).
pub mod bnb;
pub mod nf4;
