//! Which keys a run config may hold, at the top level and inside each
//! datasets[] / test_datasets[] entry:
//!
//! - the keys ferrotune acts on: the fields of `RunConfig` / `DatasetConfig`;
//! - real Axolotl keys ferrotune does not act on (`IGNORED_*`): accepted, with
//!   a warning saying why they have no effect;
//! - Axolotl keys whose meaning ferrotune cannot honour (`UNSUPPORTED_*`): an
//!   error when the value asks for the feature, silently accepted when it does
//!   not (`load_in_4bit: false`);
//! - other spellings of a field (`FOLDED`: beta and dpo_beta for rl_beta),
//!   folded into the field before the checks;
//! - anything else: an error suggesting the nearest valid key.
//!
//! Keys about integrations, other model families and methods ferrotune
//! lacks are in the tables of `keys_extra`, read after these; the reasons
//! both give are in `key_reasons`.

use super::key_reasons::{EVAL_EXTRAS, FROM_CHECKPOINT, HUB, IN_PROCESS, KERNELS, MEMORY, ONE_GPU, PACKING, PRECISION, RL_ONLY, TRACKING};
use super::unsupported::{Unsupported, When, unsupported};
use super::keys_extra::{IGNORED_DATASET_EXTRA, IGNORED_TOP_EXTRA, UNSUPPORTED_DATASET_EXTRA, UNSUPPORTED_TOP_EXTRA};
use super::dataset_types::RL_NAMES;
use super::{DatasetConfig, RunConfig};
use serde_json::Value;
use std::collections::BTreeMap;

/// A config mapping: the top level, or one dataset entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Level {
    Top,
    Dataset,
}

/// What ferrotune does with one key.
pub(crate) enum KeyKind {
    /// A field of the typed config.
    Field,
    /// A real Axolotl key with no effect here; the reason why.
    Ignored(&'static str),
    /// An Axolotl key whose value may ask for a feature ferrotune lacks. Some
    /// are also fields (adapter, optimizer, gradient_checkpointing).
    Unsupported(&'static Unsupported),
    /// Another spelling of a field, folded into it before the key checks
    /// (`load::fold_aliases`).
    Alias,
    Unknown,
}

/// optimizer values that mean torch's AdamW, which ferrotune implements.
pub(crate) const ADAMW_NAMES: &[&str] = &["adamw_torch", "adamw_torch_fused", "adamw_hf", "adamw"];

/// AdamW with its state quantized or paged (bitsandbytes, torchao): the
/// same update rule, run here as AdamW with f32 state and a warning, so
/// configs copied from Axolotl's examples train as written.
pub(crate) const ADAMW_LOW_MEMORY: &[&str] =
    &["adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit", "adamw_torch_8bit", "adamw_torch_4bit", "paged_adamw_32bit", "paged_adamw"];

/// Every optimizer value a run accepts: ADAMW_NAMES, then ADAMW_LOW_MEMORY.
const ADAMW_ACCEPTED: &[&str] = &[
    "adamw_torch", "adamw_torch_fused", "adamw_hf", "adamw",
    "adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit", "adamw_torch_8bit", "adamw_torch_4bit", "paged_adamw_32bit", "paged_adamw",
];

/// Real Axolotl top-level keys that have no effect in ferrotune.
pub(crate) const IGNORED_TOP: &[(&str, &str)] = &[
    ("bf16", PRECISION),
    ("fp16", PRECISION),
    ("tf32", PRECISION),
    ("bfloat16", PRECISION),
    ("float16", PRECISION),
    ("float32", PRECISION),
    ("flash_attention", KERNELS),
    ("sdp_attention", KERNELS),
    ("xformers_attention", KERNELS),
    ("flex_attention", KERNELS),
    ("s2_attention", KERNELS),
    ("eager_attention", KERNELS),
    ("sage_attention", KERNELS),
    ("flash_attn_cross_entropy", KERNELS),
    ("flash_attn_rms_norm", KERNELS),
    ("flash_attn_fuse_qkv", KERNELS),
    ("flash_attn_fuse_mlp", KERNELS),
    ("unsloth_cross_entropy_loss", KERNELS),
    ("unsloth_lora_mlp", KERNELS),
    ("unsloth_lora_qkv", KERNELS),
    ("unsloth_lora_o", KERNELS),
    ("unsloth_rms_norm", KERNELS),
    ("unsloth_rope", KERNELS),
    ("lora_mlp_kernel", KERNELS),
    ("lora_qkv_kernel", KERNELS),
    ("lora_o_kernel", KERNELS),
    ("liger_rope", KERNELS),
    ("liger_rms_norm", KERNELS),
    ("liger_layer_norm", KERNELS),
    ("liger_glu_activation", KERNELS),
    ("liger_cross_entropy", KERNELS),
    ("liger_fused_linear_cross_entropy", KERNELS),
    ("cut_cross_entropy", KERNELS),
    ("chunked_cross_entropy", KERNELS),
    ("plugins", KERNELS),
    ("torch_compile", "there is no torch: the kernels are compiled ahead of time"),
    ("torch_compile_backend", "there is no torch: the kernels are compiled ahead of time"),
    ("torch_compile_mode", "there is no torch: the kernels are compiled ahead of time"),
    ("strict", "ferrotune always checks config keys strictly"),
    ("wandb_project", TRACKING),
    ("wandb_entity", TRACKING),
    ("wandb_watch", TRACKING),
    ("wandb_name", TRACKING),
    ("wandb_run_id", TRACKING),
    ("wandb_log_model", TRACKING),
    ("wandb_mode", TRACKING),
    ("use_wandb", TRACKING),
    ("mlflow_tracking_uri", TRACKING),
    ("mlflow_experiment_name", TRACKING),
    ("mlflow_run_name", TRACKING),
    ("hf_mlflow_log_artifacts", TRACKING),
    ("use_mlflow", TRACKING),
    ("use_tensorboard", TRACKING),
    ("comet_api_key", TRACKING),
    ("comet_workspace", TRACKING),
    ("comet_project_name", TRACKING),
    ("comet_experiment_key", TRACKING),
    ("comet_mode", TRACKING),
    ("comet_online", TRACKING),
    ("use_comet", TRACKING),
    ("hub_model_id", HUB),
    ("hub_strategy", HUB),
    ("hub_revision", HUB),
    ("push_dataset_to_hub", HUB),
    ("hf_use_auth_token", HUB),
    ("ddp", ONE_GPU),
    ("ddp_timeout", ONE_GPU),
    ("ddp_bucket_cap_mb", ONE_GPU),
    ("ddp_broadcast_buffers", ONE_GPU),
    ("ddp_find_unused_parameters", ONE_GPU),
    ("deepspeed", ONE_GPU),
    ("fsdp", ONE_GPU),
    ("fsdp_config", ONE_GPU),
    ("fsdp_version", ONE_GPU),
    ("local_rank", ONE_GPU),
    ("sequence_parallel_degree", ONE_GPU),
    ("context_parallel_size", ONE_GPU),
    ("tensor_parallel_size", ONE_GPU),
    ("dp_shard_size", ONE_GPU),
    ("use_ray", ONE_GPU),
    ("ray_num_workers", ONE_GPU),
    ("dataloader_num_workers", IN_PROCESS),
    ("dataloader_pin_memory", IN_PROCESS),
    ("dataloader_prefetch_factor", IN_PROCESS),
    ("dataloader_drop_last", IN_PROCESS),
    ("dataset_processes", IN_PROCESS),
    ("dataset_num_proc", IN_PROCESS),
    ("dataset_keep_in_memory", IN_PROCESS),
    ("skip_prepare_dataset", IN_PROCESS),
    ("base_model_config", FROM_CHECKPOINT),
    ("tokenizer_use_fast", FROM_CHECKPOINT),
    ("tokenizer_legacy", FROM_CHECKPOINT),
    ("is_llama_derived_model", FROM_CHECKPOINT),
    ("is_mistral_derived_model", FROM_CHECKPOINT),
    ("is_qwen_derived_model", FROM_CHECKPOINT),
    ("is_falcon_derived_model", FROM_CHECKPOINT),
    ("trust_remote_code", "ferrotune runs no Python model code; architectures come from its registry (models/)"),
    ("device_map", MEMORY),
    ("max_memory", MEMORY),
    ("gpu_memory_limit", MEMORY),
    ("low_cpu_mem_usage", MEMORY),
    ("auto_find_batch_size", MEMORY),
    ("lora_on_cpu", MEMORY),
    (
        "gradient_checkpointing_kwargs",
        "ferrotune's checkpointing keeps each layer's input and recomputes the rest; it has no variants",
    ),
    ("group_by_length", "batches follow the (shuffled) dataset order; grouping rows by length is not implemented"),
    ("pad_to_sequence_len", "each batch is padded only as far as its own rows need"),
    ("eval_sample_packing", "evaluation batches are built the same way as training batches"),
    ("sample_packing_eff_est", PACKING),
    ("sample_packing_group_size", PACKING),
    ("sample_packing_bin_size", PACKING),
    ("sample_packing_sequentially", PACKING),
    ("multipack_real_batches", PACKING),
    ("total_num_tokens", PACKING),
    ("early_stopping_patience", "early stopping is not implemented; training runs for num_epochs or max_steps"),
    ("load_best_model_at_end", "the final adapter is the last step's; earlier ones stay in the checkpoint-N directories"),
    ("metric_for_best_model", "the final adapter is the last step's; earlier ones stay in the checkpoint-N directories"),
    ("greater_is_better", "the final adapter is the last step's; earlier ones stay in the checkpoint-N directories"),
    ("eval_batch_size", "evaluation uses micro_batch_size"),
    ("eval_table_size", EVAL_EXTRAS),
    ("eval_max_new_tokens", EVAL_EXTRAS),
    ("do_causal_lm_eval", EVAL_EXTRAS),
    ("eval_causal_lm_metrics", EVAL_EXTRAS),
    ("do_bench_eval", EVAL_EXTRAS),
    ("bench_dataset", EVAL_EXTRAS),
    ("save_strategy", "checkpoints follow save_steps or saves_per_epoch"),
    ("eval_strategy", "evaluation follows eval_steps or evals_per_epoch"),
    ("evaluation_strategy", "evaluation follows eval_steps or evals_per_epoch"),
    ("save_safetensors", "adapters are always written as safetensors"),
    ("save_first_step", "checkpoints follow save_steps or saves_per_epoch"),
    ("save_only_model", "checkpoints always hold what an exact resume needs"),
    ("auto_resume_from_checkpoints", "resuming is explicit: set resume_from_checkpoint: true"),
    ("dpo_use_weighting", RL_ONLY),
    ("max_prompt_len", RL_ONLY),
    ("debug", "ferrotune has no debug mode"),
    ("debug_num_examples", "ferrotune has no debug mode"),
    ("profiler_steps", "per-op profiles come from `ferrotune bench`"),
    ("include_tokens_per_second", "throughput is measured by `ferrotune bench`"),
    ("include_tkps", "throughput is measured by `ferrotune bench`"),
    ("loss_watchdog_threshold", "the loss watchdog is not implemented"),
    ("loss_watchdog_patience", "the loss watchdog is not implemented"),
    ("gc_steps", "there is no Python garbage collector to run"),
    ("resize_token_embeddings_to_32x", "the embeddings are never resized"),
    ("shuffle_before_merging_datasets", "shuffling follows shuffle_merged_datasets"),
    ("lr_div_factor", "only used by lr_scheduler one_cycle, which is not implemented"),
    ("log_sweep_min_lr", "only used by lr_scheduler log_sweep, which is not implemented"),
    ("log_sweep_max_lr", "only used by lr_scheduler log_sweep, which is not implemented"),
];

/// Real Axolotl dataset-entry keys that have no effect in ferrotune.
pub(crate) const IGNORED_DATASET: &[(&str, &str)] = &[
    ("ds_type", "the file format is read from the extension (.jsonl or .json)"),
    ("trust_remote_code", "no dataset code is ever run"),
    ("preprocess_shards", IN_PROCESS),
];

/// Axolotl top-level keys ferrotune cannot honour: ignoring them would
/// silently change the run.
pub(crate) const UNSUPPORTED_TOP: &[Unsupported] = &[
    unsupported("rl", When::NotOneOf(&RL_NAMES), true, "the other online objectives (EBFT, GDPO, ...) are not implemented: DPO, IPO, ORPO, SimPO, KTO, GRPO and RLOO are", "use rl: dpo, ipo, orpo, simpo, kto, grpo or rloo, or remove rl to run supervised fine-tuning"),
    unsupported("process_reward_model", When::True, true, "reward-model training is not implemented", "remove process_reward_model"),
    unsupported("adapter", When::NotOneOf(&["lora", "qlora"]), true, "only LoRA and QLoRA adapters are trained (the other adapter types are not implemented)", "use adapter: lora, or adapter: qlora with load_in_4bit: true"),
    unsupported("load_in_8bit", When::True, false, "8-bit (LLM.int8) base weights are not implemented", "use load_in_4bit: true with adapter: qlora for a quantized base, or set load_in_8bit: false and adapter: lora to train on a bf16 base"),
    unsupported("gptq", When::True, false, "GPTQ-quantized bases cannot be loaded", "use an unquantized (bf16 or fp16) checkpoint"),
    unsupported("peft_use_dora", When::True, true, "DoRA is not implemented", "remove peft_use_dora to train plain LoRA"),
    unsupported("lora_modules_to_save", When::Set, false, "only LoRA parameters are trained; whole modules (embed_tokens, lm_head) are not", "remove lora_modules_to_save (it is only needed when adding tokens)"),
    unsupported("lora_fan_in_fan_out", When::True, false, "fan_in_fan_out (GPT-2 Conv1D weights) does not apply to the supported architectures", "remove lora_fan_in_fan_out"),
    unsupported("peft_layers_to_transform", When::Set, false, "adapting only some layers is not implemented", "remove peft_layers_to_transform, or target modules with a regex in lora_target_modules"),
    unsupported("peft_layers_pattern", When::Set, false, "adapting only some layers is not implemented", "remove peft_layers_pattern, or target modules with a regex in lora_target_modules"),
    unsupported("unfrozen_parameters", When::Set, false, "only LoRA parameters are trained; base weights stay frozen", "remove unfrozen_parameters"),
    unsupported("gradient_checkpointing", When::NotBool, false, "activation offloading is not implemented; gradient checkpointing is on or off", "use gradient_checkpointing: true"),
    unsupported("optimizer", When::NotOneOf(ADAMW_ACCEPTED), true, "only AdamW is implemented (its 8-bit, 4-bit and paged variants run as AdamW; other optimizers are not)", "use optimizer: adamw_torch (adamw_torch_fused, adamw_hf and adamw mean the same)"),
    unsupported("optim_args", When::Set, false, "extra optimizer arguments are not implemented", "use adam_beta1, adam_beta2, adam_epsilon and weight_decay"),
    unsupported("optim_target_modules", When::Set, false, "per-module optimizers are not implemented", "remove optim_target_modules"),
    unsupported("lr_scheduler_kwargs", When::Set, false, "scheduler arguments are not implemented", "use lr_scheduler with warmup_steps or warmup_ratio"),
    unsupported("cosine_min_lr_ratio", When::Set, true, "a floor under the cosine schedule is not implemented (it decays to 0)", "remove cosine_min_lr_ratio"),
    unsupported("cosine_constant_lr_ratio", When::Set, true, "a constant phase in the cosine schedule is not implemented", "remove cosine_constant_lr_ratio"),
    unsupported("lr_quadratic_warmup", When::True, false, "quadratic warmup is not implemented (warmup is linear)", "remove lr_quadratic_warmup"),
    unsupported("loraplus_lr_ratio", When::Set, true, "LoRA+ learning rates are not implemented", "remove loraplus_lr_ratio"),
    unsupported("loraplus_lr_embedding", When::Set, true, "LoRA+ learning rates are not implemented", "remove loraplus_lr_embedding"),
    unsupported("lr_groups", When::Set, false, "per-module learning-rate groups are not implemented", "remove lr_groups"),
    unsupported("embedding_lr", When::Set, false, "embeddings are frozen; only LoRA parameters are trained", "remove embedding_lr"),
    unsupported("embedding_lr_scale", When::Set, false, "embeddings are frozen; only LoRA parameters are trained", "remove embedding_lr_scale"),
    unsupported("relora_steps", When::Set, false, "ReLoRA is not implemented", "remove the relora_* keys"),
    unsupported("neftune_noise_alpha", When::Set, false, "NEFTune embedding noise is not implemented", "remove neftune_noise_alpha"),
    unsupported("noisy_embedding_alpha", When::Set, false, "NEFTune embedding noise is not implemented", "remove noisy_embedding_alpha"),
    unsupported("tokens", When::Set, false, "adding tokens needs trained embeddings, which are frozen here", "use tokens already in the vocabulary (special_tokens may name them)"),
    unsupported("added_tokens_overrides", When::Set, false, "rewriting the vocabulary is not implemented", "remove added_tokens_overrides"),
    unsupported("fix_untrained_tokens", When::Set, false, "embeddings are frozen; untrained tokens cannot be fixed", "remove fix_untrained_tokens"),
    unsupported("rope_scaling", When::Set, false, "overriding the checkpoint's RoPE settings is not implemented", "remove rope_scaling (the checkpoint's config.json is used)"),
    unsupported("overrides_of_model_config", When::Set, false, "overriding the checkpoint's config.json is not implemented", "edit a copy of the checkpoint's config.json"),
    unsupported("pretraining_dataset", When::Set, false, "streaming pretraining datasets are not implemented", "use a datasets entry with type: completion"),
    unsupported("default_system_message", When::Set, false, "injecting a system message is not implemented", "put the system message in the data"),
    unsupported("chat_template_kwargs", When::Set, false, "extra chat-template variables are not implemented", "write a template with chat_template: jinja and chat_template_jinja"),
    unsupported("dataset_exact_deduplication", When::True, false, "deduplication is not implemented", "deduplicate the files beforehand"),
    unsupported("dataset_shard_num", When::Set, false, "dataset sharding is not implemented", "split the file beforehand"),
    unsupported("dataset_shard_idx", When::Set, false, "dataset sharding is not implemented", "split the file beforehand"),
    unsupported("curriculum_sampling", When::True, false, "curriculum sampling is spelt differently here", "set shuffle_merged_datasets: false to keep the file order"),
    unsupported("batch_size", When::Set, false, "batch_size is deprecated in Axolotl", "set micro_batch_size and gradient_accumulation_steps"),
];

/// Axolotl dataset-entry keys ferrotune cannot honour.
pub(crate) const UNSUPPORTED_DATASET: &[Unsupported] = &[
    unsupported("message_field_role", When::Set, false, "this key is deprecated in Axolotl", "use message_property_mappings: {role: <key>, content: <key>}"),
    unsupported("message_field_content", When::Set, false, "this key is deprecated in Axolotl", "use message_property_mappings: {role: <key>, content: <key>}"),
    unsupported("message_field_training", When::Set, false, "per-message training flags are not implemented", "use roles_to_train"),
    unsupported("message_field_training_detail", When::Set, false, "per-message training spans are not implemented", "use roles_to_train"),
    unsupported("roles", When::Set, false, "remapping role names is not implemented", "write the roles in the data as system, user and assistant"),
    unsupported("drop_system_message", When::True, false, "dropping system messages is not implemented", "remove the system messages from the data"),
    unsupported("conversation", When::Set, false, "the old sharegpt conversation styles are not implemented", "use type: chat_template with chat_template (e.g. chatml)"),
    unsupported("field_system", When::Set, false, "custom field names are not implemented", "rename the fields in the data"),
    unsupported("field_instruction", When::Set, false, "custom field names are not implemented", "rename the fields in the data (alpaca: instruction, input, output)"),
    unsupported("field_input", When::Set, false, "custom field names are not implemented", "rename the fields in the data (alpaca: instruction, input, output)"),
    unsupported("field_output", When::Set, false, "custom field names are not implemented", "rename the fields in the data (alpaca: instruction, input, output)"),
    unsupported("field_tools", When::Set, false, "tool definitions in chat templates are not implemented", "remove field_tools"),
    unsupported("split_thinking", When::True, false, "splitting reasoning content is not implemented", "remove split_thinking"),
    unsupported("shards", When::Set, false, "dataset sharding is not implemented", "split the file beforehand"),
    unsupported("shards_idx", When::Set, false, "dataset sharding is not implemented", "split the file beforehand"),
];

/// Axolotl's other spellings of a field, with the field: `load` folds each
/// into its field (an error when both are set and differ).
pub(crate) const FOLDED: &[(&str, &str)] = &[("beta", "rl_beta"), ("dpo_beta", "rl_beta"), ("type_of_model", "model_type")];

/// Names people bring from TRL, Unsloth or HF scripts, with the key meant.
const ALIASES: &[(&str, &str)] = &[
    ("lr", "learning_rate"),
    ("epochs", "num_epochs"),
    ("num_train_epochs", "num_epochs"),
    ("max_seq_length", "sequence_len"),
    ("max_seq_len", "sequence_len"),
    ("max_length", "sequence_len"),
    ("seq_len", "sequence_len"),
    ("per_device_train_batch_size", "micro_batch_size"),
    ("lora_rank", "lora_r"),
    ("r", "lora_r"),
    ("target_modules", "lora_target_modules"),
    ("model", "base_model"),
    ("model_name_or_path", "base_model"),
    ("base_model_name_or_path", "base_model"),
    ("use_rslora", "peft_use_rslora"),
    ("scheduler", "lr_scheduler"),
    ("lr_scheduler_type", "lr_scheduler"),
    ("optim", "optimizer"),
    ("packing", "sample_packing"),
    ("dataset", "datasets"),
];

/// The keys of the typed config at this level.
pub(crate) fn field_names(level: Level) -> Vec<String> {
    let value = match level {
        Level::Top => serde_json::to_value(RunConfig::default()),
        Level::Dataset => serde_json::to_value(every_dataset_field()),
    };
    match value {
        Ok(Value::Object(map)) => map.keys().cloned().collect(),
        _ => Vec::new(),
    }
}

/// A dataset entry with every field set, so that serializing it lists every
/// key (unset options are skipped when serializing). Written without
/// `..Default::default()` so a new field cannot be forgotten here.
fn every_dataset_field() -> DatasetConfig {
    DatasetConfig {
        path: String::new(),
        kind: Some(String::new()),
        split: Some(String::new()),
        data_files: Some(Vec::new()),
        name: Some(String::new()),
        revision: Some(String::new()),
        field: Some(String::new()),
        field_messages: Some(String::new()),
        message_property_mappings: Some(BTreeMap::new()),
        roles_to_train: Some(Vec::new()),
        train_on_eos: Some(String::new()),
        chat_template: Some(String::new()),
        field_text: Some(String::new()),
    }
}

fn ignored_table(level: Level) -> impl Iterator<Item = &'static (&'static str, &'static str)> {
    let (core, extra) = match level {
        Level::Top => (IGNORED_TOP, IGNORED_TOP_EXTRA),
        Level::Dataset => (IGNORED_DATASET, IGNORED_DATASET_EXTRA),
    };
    core.iter().chain(extra)
}

fn unsupported_table(level: Level) -> impl Iterator<Item = &'static Unsupported> {
    let (core, extra) = match level {
        Level::Top => (UNSUPPORTED_TOP, UNSUPPORTED_TOP_EXTRA),
        Level::Dataset => (UNSUPPORTED_DATASET, UNSUPPORTED_DATASET_EXTRA),
    };
    core.iter().chain(extra)
}

pub(crate) fn is_field(level: Level, key: &str) -> bool {
    field_names(level).iter().any(|k| k == key)
}

/// What ferrotune does with `key` at this level. Unsupported comes first:
/// adapter, optimizer and gradient_checkpointing are also fields.
pub(crate) fn classify(level: Level, key: &str) -> KeyKind {
    if let Some(u) = unsupported_table(level).find(|u| u.key == key) {
        return KeyKind::Unsupported(u);
    }
    if is_field(level, key) {
        return KeyKind::Field;
    }
    if let Some((_, reason)) = ignored_table(level).find(|(k, _)| *k == key) {
        return KeyKind::Ignored(reason);
    }
    if level == Level::Top
        && FOLDED.iter().any(|(alias, _)| *alias == key)
    {
        return KeyKind::Alias;
    }
    KeyKind::Unknown
}

/// The valid key nearest to a misspelt one, if one is close enough to be
/// the likely intent: a known alias, or an edit distance of at most a
/// third of the key's length (at least 1, at most 3).
pub(crate) fn suggest(level: Level, key: &str) -> Option<String> {
    let fields = field_names(level);
    if let Some((_, meant)) = ALIASES.iter().find(|(alias, _)| *alias == key)
        && fields.iter().any(|f| f == meant)
    {
        return Some(meant.to_string());
    }
    let candidates = fields
        .iter()
        .map(String::as_str)
        .chain(ignored_table(level).map(|(k, _)| *k))
        .chain(unsupported_table(level).map(|u| u.key));
    let limit = (key.chars().count() / 3).clamp(1, 3);
    candidates
        .map(|c| (strsim::damerau_levenshtein(key, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c.to_string())
}

/// The expected type of a field, in words, for keys whose Rust type does
/// not say it well.
pub(crate) fn expected_override(key: &str) -> Option<&'static str> {
    match key {
        "lora_target_modules" => Some("a list of module names or one regular expression"),
        "resume_from_checkpoint" => Some("true, false or a checkpoint directory"),
        "special_tokens" => Some("a mapping of token names to strings (pad_token: \"<|pad|>\")"),
        "message_property_mappings" => Some("a mapping like {role: from, content: value}"),
        "datasets" | "test_datasets" => Some("a list of dataset entries (each a mapping with at least path)"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_do_not_overlap_and_name_no_field_twice() {
        for level in [Level::Top, Level::Dataset] {
            let fields = field_names(level);
            let mut seen = std::collections::HashSet::new();
            for (k, _) in ignored_table(level) {
                assert!(seen.insert(*k), "{k} listed twice");
                assert!(!fields.iter().any(|f| f == k), "{k} is a field and ignored");
            }
            for u in unsupported_table(level) {
                assert!(seen.insert(u.key), "{} listed twice", u.key);
            }
            for (alias, field) in FOLDED.iter().filter(|_| level == Level::Top) {
                assert!(!seen.contains(alias) && !fields.iter().any(|f| f == alias), "{alias} is folded and listed");
                assert!(fields.iter().any(|f| f == field), "{alias} folds into {field}, which is not a field");
            }
        }
    }

    #[test]
    fn every_dataset_field_is_listed() {
        let names = field_names(Level::Dataset);
        assert!(names.contains(&"type".to_string()) && names.contains(&"path".to_string()));
        assert_eq!(names.len(), 13);
    }

    #[test]
    fn accepted_optimizers_are_adamw_and_its_low_memory_variants() {
        assert_eq!(ADAMW_ACCEPTED, [ADAMW_NAMES, ADAMW_LOW_MEMORY].concat());
        assert!(!When::NotOneOf(ADAMW_ACCEPTED).applies(&serde_json::json!("paged_adamw_8bit")));
        assert!(When::NotOneOf(ADAMW_ACCEPTED).applies(&serde_json::json!("lion_8bit")));
        assert!(When::Above(1).applies(&serde_json::json!(2)) && !When::Above(1).applies(&serde_json::json!(1)));
        assert!(When::NotTrue.applies(&serde_json::json!("pissa")) && When::NotTrue.applies(&Value::Bool(false)));
        assert!(!When::NotTrue.applies(&Value::Bool(true)) && !When::NotTrue.applies(&Value::Null));
        assert!(When::Mapping.applies(&serde_json::json!({"field_instruction": "q"})) && !When::Mapping.applies(&serde_json::json!("alpaca")));
    }

    #[test]
    fn suggestions() {
        assert_eq!(suggest(Level::Top, "lerning_rate").as_deref(), Some("learning_rate"));
        assert_eq!(suggest(Level::Top, "num_epoch").as_deref(), Some("num_epochs"));
        assert_eq!(suggest(Level::Top, "max_seq_length").as_deref(), Some("sequence_len"));
        assert_eq!(suggest(Level::Dataset, "pth").as_deref(), Some("path"));
        assert_eq!(suggest(Level::Top, "completely_unrelated_key"), None);
    }

    #[test]
    fn when_rules() {
        assert!(When::True.applies(&Value::Bool(true)));
        assert!(!When::True.applies(&Value::Bool(false)));
        assert!(!When::Set.applies(&serde_json::json!([])));
        assert!(When::Set.applies(&serde_json::json!(["lm_head"])));
        assert!(!When::NotOneOf(ADAMW_NAMES).applies(&serde_json::json!("adamw_torch_fused")));
        assert!(When::NotOneOf(ADAMW_NAMES).applies(&serde_json::json!("paged_adamw_8bit")));
        assert!(When::NotBool.applies(&serde_json::json!("offload")));
        assert!(!When::NotBool.applies(&Value::Bool(true)));
    }
}
