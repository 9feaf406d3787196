//! The run config: one YAML file with Axolotl's key names, validated into a
//! `RunConfig` before any weight or dataset is touched.
//!
//! Loading (unknown keys, accepted-but-ignored Axolotl keys, `--set`
//! overrides, validation) lives in `load`; this file holds the typed shape.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// `lora_target_modules`: a list of module names or one regex string.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    Names(Vec<String>),
    Regex(String),
}

/// `resume_from_checkpoint`: a checkpoint directory, or true for the latest
/// checkpoint-N in output_dir.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ResumeFrom {
    Latest(bool),
    Path(String),
}

/// One entry of `datasets:`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DatasetConfig {
    /// A local .jsonl or .json file (or a directory of them).
    pub path: String,
    /// alpaca | chat_template | completion | input_output; absent: pre-tokenized rows.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_files: Option<Vec<String>>,
    /// For .json files: the key holding the list of rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// chat_template: the row key holding the messages (default "messages").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field_messages: Option<String>,
    /// chat_template: {role: <key>, content: <key>} inside each message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_property_mappings: Option<BTreeMap<String, String>>,
    /// chat_template: roles whose turns are trained (default ["assistant"]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roles_to_train: Option<Vec<String>>,
    /// chat_template: "turn" (default: EOS after each trained turn), "all", "last" or "none".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_on_eos: Option<String>,
    /// Per-dataset chat template (overrides the run's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<String>,
    /// completion: the row key holding the text (default "text").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field_text: Option<String>,
}

/// The whole run. Field names are Axolotl's; defaults are Axolotl's where it
/// has one (noted otherwise).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    /// Model directory or hub id in the HF cache.
    pub base_model: String,
    /// Tokenizer directory (default: the model's own).
    pub tokenizer_config: Option<String>,
    /// "lora" (QLoRA is a later addition).
    pub adapter: Option<String>,
    pub lora_r: usize,
    pub lora_alpha: f32,
    pub lora_dropout: f32,
    pub lora_target_modules: Option<TargetModules>,
    pub lora_target_linear: bool,
    pub peft_use_rslora: bool,
    /// Start from this PEFT adapter instead of a fresh one.
    pub lora_model_dir: Option<String>,

    pub datasets: Vec<DatasetConfig>,
    /// Explicit validation datasets (otherwise val_set_size splits the training data).
    pub test_datasets: Vec<DatasetConfig>,
    /// A built-in name (chatml, llama3), "tokenizer_default", or "jinja" with chat_template_jinja.
    pub chat_template: Option<String>,
    pub chat_template_jinja: Option<String>,
    pub sequence_len: usize,
    pub sample_packing: bool,
    /// Rows longer than sequence_len: "drop" (Axolotl's default) or "truncate".
    pub excess_length_strategy: String,
    pub train_on_inputs: bool,
    /// Fraction (< 1) or count (>= 1) of examples held out for eval.
    pub val_set_size: f64,
    pub shuffle_merged_datasets: bool,
    /// Where tokenized datasets are cached (default: the user cache dir).
    pub dataset_prepared_path: Option<String>,
    pub special_tokens: BTreeMap<String, String>,

    pub micro_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub num_epochs: f64,
    pub max_steps: Option<usize>,
    pub learning_rate: f64,
    /// constant | linear | cosine (Axolotl's default: cosine).
    pub lr_scheduler: String,
    pub warmup_steps: Option<usize>,
    pub warmup_ratio: Option<f64>,
    /// adamw_torch and its aliases.
    pub optimizer: String,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub gradient_checkpointing: bool,

    pub eval_steps: Option<usize>,
    pub evals_per_epoch: Option<usize>,
    pub save_steps: Option<usize>,
    pub saves_per_epoch: Option<usize>,
    /// Keep at most this many checkpoint-N directories (None: keep all).
    pub save_total_limit: Option<usize>,
    pub logging_steps: usize,
    pub seed: u64,
    pub output_dir: String,
    pub resume_from_checkpoint: Option<ResumeFrom>,

    /// ferrotune: cpu, cuda, cuda:N or auto (the `--device` flag overrides).
    pub device: String,
}
