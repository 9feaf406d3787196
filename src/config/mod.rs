//! The run config: one YAML file with Axolotl's key names, validated into a
//! `RunConfig` before any weight or dataset is touched.
//!
//! Loading (unknown keys, accepted-but-ignored Axolotl keys, `--set`
//! overrides) lives in `load`, the key tables in `keys` (and `keys_extra`;
//! what an unsupported key's error says in `unsupported`),
//! the value checks in `validate`, the checks of model_type / tokenizer_type
//! / tokenizer_config against the checkpoint in `checkpoint_match`, the
//! dataset `type:` names in `dataset_types`, the adapter's target modules
//! in `targets`; this file holds the typed shape, its defaults and the
//! conversions the trainer uses. Config is the bottom layer (every other
//! part reads it), so a conversion into an upper layer's type lives with
//! that type (`RunConfig::lora_config` in `adapter`). A new run key is a
//! field here plus its row in `keys` (and a check in `validate` if its
//! values are limited).

mod checkpoint_match;
mod dataset_types;
pub mod grpo;
pub mod rloo;
mod key_reasons;
mod keys;
mod keys_extra;
mod load;
mod overrides;
mod source;
mod targets;
mod unsupported;
mod validate;

pub use checkpoint_match::check_checkpoint;
pub use dataset_types::{PLAIN_DATASET_TYPES, PREFERENCE_DATASET_TYPES};
pub use load::{Loaded, load, load_str};
pub use targets::Targets;
pub use validate::{MAX_LORA_R, MAX_MICRO_BATCH, MAX_SEQUENCE_LEN};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// The file `save_resolved` writes into output_dir.
pub const RESOLVED_CONFIG_FILE: &str = "resolved_config.yml";

/// PEFT's default target modules for llama, mistral and qwen2 (used when
/// neither lora_target_modules nor lora_target_linear is set).
pub const DEFAULT_TARGET_MODULES: [&str; 2] = ["q_proj", "v_proj"];

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
#[serde(default, deny_unknown_fields)]
pub struct DatasetConfig {
    /// A local data file (.jsonl, .json, .parquet, .csv, .tsv) or a
    /// directory of them, or a Hub dataset id.
    pub path: String,
    /// alpaca | chat_template | completion | input_output; absent: pre-tokenized rows.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<String>,
    /// Files (or, for a Hub dataset, patterns) to read: one or a list.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "one_or_many")]
    pub data_files: Option<Vec<String>>,
    /// The Hub dataset's configuration (a `configs:` entry of its README).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The Hub dataset's revision: a branch, tag or commit (default main).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
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

/// A string or a list of strings, as a list (Axolotl's `data_files`).
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged, expecting = "a file name or a list of file names")]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(Option::<OneOrMany>::deserialize(d)?.map(|v| match v {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    }))
}

/// The AdamW optimizer's settings (the trainer's optimizer reads them;
/// `RunConfig::adamw_config` fills them from adam_beta1 and the rest).
#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Clip the global gradient norm to this (None or <= 0: no clipping).
    pub max_grad_norm: Option<f32>,
}

impl Default for AdamWConfig {
    /// torch.optim.AdamW's defaults, with weight decay 0 as Axolotl/TRL use.
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, max_grad_norm: Some(1.0) }
    }
}

/// Where the config file was read from (GRPO imports Python reward
/// functions from that folder). Not part of the config's value: two
/// configs with the same keys are equal wherever their files are.
#[derive(Debug, Clone, Default)]
pub struct ConfigDir(pub Option<std::path::PathBuf>);

impl PartialEq for ConfigDir {
    fn eq(&self, _: &ConfigDir) -> bool {
        true
    }
}

/// `bnb_config_kwargs`: Axolotl's pass-through to bitsandbytes'
/// BitsAndBytesConfig, for `load_in_4bit` runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BnbConfigKwargs {
    /// nf4 (fp4 is not implemented).
    pub bnb_4bit_quant_type: String,
    /// Quantize the block scales too (bitsandbytes' double quantization).
    pub bnb_4bit_use_double_quant: bool,
    /// Accepted for compatibility: products run in the backend's precision
    /// (bf16 on a GPU, f32 on the CPU).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bnb_4bit_compute_dtype: Option<String>,
    /// Accepted for compatibility: the codes are the same bytes in any storage type.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bnb_4bit_quant_storage: Option<String>,
    /// Accepted for compatibility: only used by 8-bit bases.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub llm_int8_has_fp16_weight: Option<bool>,
}

impl Default for BnbConfigKwargs {
    /// Axolotl's defaults: NF4 with double quantization.
    fn default() -> Self {
        BnbConfigKwargs {
            bnb_4bit_quant_type: "nf4".into(),
            bnb_4bit_use_double_quant: true,
            bnb_4bit_compute_dtype: None,
            bnb_4bit_quant_storage: None,
            llm_int8_has_fp16_weight: None,
        }
    }
}

/// The whole run. Field names are Axolotl's; defaults are Axolotl's where it
/// has one (noted otherwise). `load` requires base_model, learning_rate and
/// datasets; every other key falls back to `RunConfig::default()`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    /// Model directory or hub id in the HF cache.
    pub base_model: String,
    /// Tokenizer directory (default: the model's own).
    pub tokenizer_config: Option<String>,
    /// Checked against config.json's architectures[0] (Auto* names match any).
    pub model_type: Option<String>,
    /// Checked against tokenizer_config.json's tokenizer_class (Auto* names match any).
    pub tokenizer_type: Option<String>,
    /// "lora", or "qlora": LoRA on a 4-bit NF4 base (load_in_4bit, or a
    /// checkpoint bitsandbytes quantized).
    pub adapter: Option<String>,
    /// Quantize the decoder layers' linear weights to NF4 at load (QLoRA).
    pub load_in_4bit: bool,
    /// bitsandbytes settings of a load_in_4bit run.
    pub bnb_config_kwargs: BnbConfigKwargs,
    pub lora_r: usize,
    pub lora_alpha: f32,
    pub lora_dropout: f32,
    pub lora_target_modules: Option<TargetModules>,
    pub lora_target_linear: bool,
    pub peft_use_rslora: bool,
    /// Start from this PEFT adapter instead of a fresh one.
    pub lora_model_dir: Option<String>,
    /// The Hub revision (branch, tag or commit) of base_model (default main).
    pub revision_of_model: Option<String>,

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
    /// Clear an earlier run's files from output_dir before training (as
    /// HF's overwrite_output_dir; `train --overwrite` sets it).
    pub overwrite_output_dir: bool,
    pub resume_from_checkpoint: Option<ResumeFrom>,

    /// Preference training instead of SFT: dpo, ipo, orpo, simpo or kto.
    pub rl: Option<String>,
    /// β of DPO/IPO, SimPO and KTO, and ORPO's λ when set (TRL's default
    /// 0.1). Also spelt beta, dpo_beta or trl.beta.
    pub rl_beta: Option<f64>,
    /// DPO's loss: sigmoid (default), ipo, hinge or robust.
    pub dpo_loss_type: Option<String>,
    pub dpo_label_smoothing: f64,
    /// ORPO's λ (TRL's beta; default 0.1).
    pub orpo_alpha: Option<f64>,
    /// SimPO's target margin γ (default 0.5).
    pub simpo_gamma: Option<f64>,
    /// SimPO/CPO: weight of the chosen completion's NLL (0 = pure SimPO).
    pub cpo_alpha: Option<f64>,
    /// Train a reward model (a scalar `score` head on the last token, with
    /// the adapter) on chosen/rejected pairs, as TRL's RewardTrainer.
    pub reward_model: bool,
    /// Reward modelling: adds this × mean((r_chosen + r_rejected)²).
    pub center_rewards_coefficient: Option<f64>,
    /// Compute the reference policy's log-probs once before training instead
    /// of in every step (pairs: dpo, ipo).
    pub precompute_ref_log_probs: bool,
    /// KTO's weights of desirable and undesirable examples (default 1).
    pub kto_desirable_weight: Option<f64>,
    pub kto_undesirable_weight: Option<f64>,
    /// GGUF files to export when training ends, beside the adapter (the
    /// base with the adapter merged in): outtypes of `ferrotune export gguf`
    /// (q4_k_m, q5_k_m, q6_k, q8_0, f16, bf16, f32, auto). A string or a list.
    #[serde(default, deserialize_with = "one_or_many")]
    pub gguf: Option<Vec<String>>,
    /// The tokenizer's pre-tokenizer as llama.cpp names it, for a `gguf:`
    /// export of a tokenizer whose fingerprint llama.cpp does not know
    /// (`export gguf --tokenizer-pre`).
    pub gguf_tokenizer_pre: Option<String>,
    /// TRL's settings for `rl: grpo` and `rl: rloo` (GRPOConfig / RLOOConfig names; `grpo::read` and `rloo::read` type them).
    pub trl: Option<serde_json::Map<String, serde_json::Value>>,
    /// The directory of the config file (GRPO's Python reward functions are
    /// imported from it); set by `load`, never read from the file.
    #[serde(skip)]
    pub config_dir: ConfigDir,

    /// ferrotune: cpu, cuda, cuda:N or auto (the `--device` flag overrides).
    pub device: String,
}

impl Default for RunConfig {
    /// Axolotl's defaults; base_model, datasets and learning_rate have none
    /// (they are empty / 0 here and `load` refuses a file without them).
    fn default() -> Self {
        RunConfig {
            base_model: String::new(),
            tokenizer_config: None,
            model_type: None,
            tokenizer_type: None,
            adapter: None,
            load_in_4bit: false,
            bnb_config_kwargs: BnbConfigKwargs::default(),
            lora_r: 8,
            lora_alpha: 16.0,
            lora_dropout: 0.0,
            lora_target_modules: None,
            lora_target_linear: false,
            peft_use_rslora: false,
            lora_model_dir: None,
            revision_of_model: None,
            datasets: Vec::new(),
            test_datasets: Vec::new(),
            chat_template: None,
            chat_template_jinja: None,
            sequence_len: 2048,
            sample_packing: false,
            excess_length_strategy: "drop".into(),
            train_on_inputs: false,
            val_set_size: 0.0,
            shuffle_merged_datasets: true,
            dataset_prepared_path: None,
            special_tokens: BTreeMap::new(),
            micro_batch_size: 1,
            gradient_accumulation_steps: 1,
            num_epochs: 1.0,
            max_steps: None,
            learning_rate: 0.0,
            lr_scheduler: "cosine".into(),
            warmup_steps: None,
            warmup_ratio: None,
            optimizer: "adamw_torch".into(),
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            gradient_checkpointing: false,
            eval_steps: None,
            evals_per_epoch: None,
            save_steps: None,
            saves_per_epoch: None,
            save_total_limit: None,
            logging_steps: 1,
            seed: 42,
            output_dir: "./outputs".into(),
            overwrite_output_dir: false,
            resume_from_checkpoint: None,
            rl: None,
            rl_beta: None,
            dpo_loss_type: None,
            dpo_label_smoothing: 0.0,
            orpo_alpha: None,
            simpo_gamma: None,
            cpo_alpha: None,
            reward_model: false,
            center_rewards_coefficient: None,
            precompute_ref_log_probs: false,
            kto_desirable_weight: None,
            kto_undesirable_weight: None,
            gguf: None,
            gguf_tokenizer_pre: None,
            trl: None,
            config_dir: ConfigDir::default(),
            device: "auto".into(),
        }
    }
}

impl RunConfig {
    /// The settings of an `rl: grpo` or `rl: rloo` run (`trl:` with TRL's defaults;
    /// `load` has already checked them).
    pub fn grpo(&self) -> Result<grpo::GrpoSettings> {
        let read = if self.rl.as_deref() == Some("rloo") { rloo::read } else { grpo::read };
        read(self.trl.as_ref(), self.rl_beta).map(|(s, _)| s).map_err(|(k, m)| anyhow::anyhow!("{k} {m}"))
    }
}

impl RunConfig {
    /// The checks `load` runs, for a RunConfig built in code.
    pub fn validate(&self) -> Result<()> {
        validate::validate(self, &source::Locator::none())
    }

    /// Whether the run trains on a 4-bit base (adapter: qlora).
    pub fn qlora(&self) -> bool {
        self.adapter.as_deref() == Some("qlora")
    }

    /// The optimizer settings; max_grad_norm <= 0 turns clipping off.
    pub fn adamw_config(&self) -> AdamWConfig {
        AdamWConfig {
            beta1: self.adam_beta1 as f32,
            beta2: self.adam_beta2 as f32,
            eps: self.adam_epsilon as f32,
            weight_decay: self.weight_decay as f32,
            max_grad_norm: (self.max_grad_norm > 0.0).then_some(self.max_grad_norm as f32),
        }
    }

    /// The fully resolved config as YAML: every key with its value, defaults
    /// included, so a run can be repeated from it exactly.
    pub fn to_yaml(&self) -> String {
        // The shape holds only strings, numbers, lists and string-keyed maps,
        // all of which serialize; the fallback only keeps this panic-free.
        self.yaml().unwrap_or_else(|e| format!("# could not serialize the run config: {e:#}\n"))
    }

    fn yaml(&self) -> Result<String> {
        let body = serde_saphyr::to_string(self).context("cannot serialize the run config")?;
        Ok(format!("# The resolved run config: every key with the value the run used.\n{body}"))
    }

    /// Write `to_yaml()` to output_dir/resolved_config.yml, atomically
    /// (output_dir exists: `train` created it when it took its lock).
    pub fn save_resolved(&self, output_dir: &Path) -> Result<()> {
        crate::util::atomic_write(&output_dir.join(RESOLVED_CONFIG_FILE), self.yaml()?.as_bytes())
    }
}
