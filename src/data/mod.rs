//! Datasets into token sequences, in the order the data flows:
//! `formats` (one reader per dataset type: alpaca, chat_template,
//! completion, input_output, pre-tokenized) using `chat_template` (Jinja
//! templates rendered as transformers renders them) and `tokenizer` (the
//! tokenizer with the run's special-token overrides), then `prepare` (files
//! -> parallel tokenization -> label masking -> length policy -> `cache` ->
//! merged order -> validation split). `rows` turns a file into JSON rows
//! (JSON Lines and JSON itself, parquet and CSV/TSV through `tabular`).
//! `hub_splits` chooses a Hub dataset repo's files for a split by the
//! `datasets` library's rules (its patterns matched by `hub_glob`).
//! `preference` reads the DPO-family,
//! KTO and reward-model datasets into prompt and completion ids. `show`
//! renders prepared examples token by token for `ferrotune preprocess`.
//!
//! A new dataset type is named in `config::PLAIN_DATASET_TYPES` (or
//! `config::PREFERENCE_DATASET_TYPES`) and read in `formats` (or
//! `preference`).
pub mod cache;
pub mod chat_template;
pub mod pairs;
pub mod formats;
pub mod hub_glob;
pub mod hub_splits;
pub mod preference;
pub mod prepare;
pub mod prompts;
pub mod pretokenized;
pub mod rows;
pub mod show;
pub mod tabular;
pub mod tokenizer;
