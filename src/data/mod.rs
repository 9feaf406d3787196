//! Datasets into token sequences, in the order the data flows:
//! `formats` (one reader per dataset type: alpaca, chat_template,
//! completion, input_output, pre-tokenized) using `chat_template` (Jinja
//! templates rendered as transformers renders them) and the tokenizer, then
//! `prepare` (files -> parallel tokenization -> label masking -> length
//! policy -> cache -> validation split -> merged order).
pub mod pretokenized;
