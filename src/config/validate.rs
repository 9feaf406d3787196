//! Value checks on a typed config: each failure is one message naming the
//! key (with its file and line when `load` knows them) and what it must be.

use super::dataset_types::{PLAIN_DATASET_TYPES, PREFERENCE_DATASET_TYPES, Rows, is_preference_spelling, rl_values_reading, rows};
use super::keys::ADAMW_NAMES;
use super::source::{Locator, display_path};
use super::{DatasetConfig, RunConfig};
use anyhow::{Result, anyhow};

pub(crate) const SCHEDULERS: &[&str] = &["constant", "linear", "cosine"];
/// Accepted spellings of a scheduler and the one they mean.
pub(crate) const SCHEDULER_ALIASES: &[(&str, &str)] = &[("constant_with_warmup", "constant")];
pub(crate) const TRAIN_ON_EOS: &[&str] = &["turn", "all", "last", "none"];
pub(crate) const EXCESS_LENGTH: &[&str] = &["drop", "truncate"];

/// One failed check: "<where>key must ...".
fn fail(loc: &Locator, path: &str, msg: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("{}{} {msg}", loc.at(path), display_path(path))
}

macro_rules! check {
    ($cond:expr, $loc:expr, $path:expr, $($msg:tt)+) => {
        // Bound first: a NaN fails the check instead of slipping past a negation.
        let ok: bool = $cond;
        if !ok {
            return Err(fail($loc, $path, format!($($msg)+)));
        }
    };
}

/// Bounds far past any real run, so that sizes computed from them (memory
/// plans, buffer lengths) cannot overflow.
pub const MAX_SEQUENCE_LEN: usize = 1 << 20;
pub const MAX_MICRO_BATCH: usize = 1 << 16;
pub const MAX_LORA_R: usize = 1 << 16;
pub const MAX_EPOCHS: f64 = 1e6;

pub(crate) fn validate(c: &RunConfig, loc: &Locator) -> Result<()> {
    check!(
        !(c.reward_model && c.gguf.as_ref().is_some_and(|g| !g.is_empty())),
        loc,
        "gguf",
        "cannot be set with reward_model: true (a reward model's score head has no GGUF form)"
    );
    for (i, t) in c.gguf.iter().flatten().enumerate() {
        check!(
            crate::export::gguf::OutType::parse(t).is_ok(),
            loc,
            &format!("gguf[{i}]"),
            "is {t:?}; expected one of {}",
            crate::export::gguf::OutType::NAMES
        );
    }
    check!(
        !(c.reward_model && c.rl.is_some()),
        loc,
        "reward_model",
        "and rl are both set: a run trains either a reward model or a policy (remove one)"
    );
    if let Some(t) = c.dpo_loss_type.as_deref() {
        check!(["sigmoid", "ipo", "hinge", "robust"].contains(&t), loc, "dpo_loss_type", "must be sigmoid, ipo, hinge or robust (got {t})");
    }
    check!(
        (0.0..0.5).contains(&c.dpo_label_smoothing),
        loc,
        "dpo_label_smoothing",
        "must be in [0, 0.5) (got {})",
        c.dpo_label_smoothing
    );
    for (key, v) in [
        ("rl_beta", c.rl_beta),
        ("orpo_alpha", c.orpo_alpha),
        ("kto_desirable_weight", c.kto_desirable_weight),
        ("kto_undesirable_weight", c.kto_undesirable_weight),
    ] {
        if let Some(v) = v {
            // GRPO's and RLOO's beta may be 0 (no KL term, no reference pass).
            let grpo_beta = key == "rl_beta" && matches!(c.rl.as_deref(), Some("grpo" | "rloo"));
            if grpo_beta {
                check!(v >= 0.0, loc, key, "(GRPO's and RLOO's beta) must be 0 or more (got {v})");
            } else {
                check!(v > 0.0, loc, key, "must be positive (got {v})");
            }
        }
    }
    if c.rl.as_deref() == Some("orpo")
        && let (Some(b), Some(a)) = (c.rl_beta, c.orpo_alpha)
    {
        check!(
            a == b,
            loc,
            "orpo_alpha",
            "{a} and rl_beta {b} are both set for rl: orpo: Axolotl passes rl_beta as ORPO's lambda and ignores orpo_alpha; keep one"
        );
    }
    check!(!c.base_model.trim().is_empty(), loc, "base_model", "must name a model directory or hub id");
    check!(
        c.adapter.as_deref().is_none_or(|a| a == "lora" || a == "qlora"),
        loc,
        "adapter",
        "must be lora or qlora (got {})",
        c.adapter.as_deref().unwrap_or("")
    );
    check!(
        !c.load_in_4bit || c.qlora(),
        loc,
        "load_in_4bit",
        "is true, so adapter must be qlora (got {}): a 4-bit base trains a QLoRA adapter",
        c.adapter.as_deref().unwrap_or("none")
    );
    let bnb = &c.bnb_config_kwargs;
    check!(
        bnb.bnb_4bit_quant_type == "nf4",
        loc,
        "bnb_config_kwargs.bnb_4bit_quant_type",
        "must be nf4 (got {}; fp4 is not implemented)",
        bnb.bnb_4bit_quant_type
    );
    if let Some(d) = &bnb.bnb_4bit_compute_dtype {
        check!(
            ["bfloat16", "float16", "float32", "bf16", "fp16", "fp32"].contains(&d.as_str()),
            loc,
            "bnb_config_kwargs.bnb_4bit_compute_dtype",
            "must be bfloat16, float16 or float32 (got {d})"
        );
    }
    check!(c.lora_r >= 1, loc, "lora_r", "must be at least 1 (got {})", c.lora_r);
    check!(c.lora_r <= MAX_LORA_R, loc, "lora_r", "must be at most {MAX_LORA_R} (got {})", c.lora_r);
    check!(c.lora_alpha > 0.0, loc, "lora_alpha", "must be greater than 0 (got {})", c.lora_alpha);
    check!((0.0..1.0).contains(&c.lora_dropout), loc, "lora_dropout", "must be at least 0 and below 1 (got {})", c.lora_dropout);
    c.targets().map_err(|e| anyhow!("{}{e:#}", loc.at("lora_target_modules")))?;

    check!(!c.datasets.is_empty(), loc, "datasets", "is empty: list at least one dataset (path, and type unless the rows are pre-tokenized)");
    for (list, entries) in [("datasets", &c.datasets), ("test_datasets", &c.test_datasets)] {
        for (i, d) in entries.iter().enumerate() {
            validate_dataset(d, c.rl.as_deref(), rows(c.rl.as_deref(), c.reward_model), &format!("{list}.{i}"), loc)?;
        }
    }
    if c.chat_template.as_deref() == Some("jinja") {
        check!(c.chat_template_jinja.is_some(), loc, "chat_template", "is jinja, so chat_template_jinja must hold the template");
    }
    check!(c.sequence_len >= 2, loc, "sequence_len", "must be at least 2 (got {})", c.sequence_len);
    check!(
        c.sequence_len <= MAX_SEQUENCE_LEN,
        loc,
        "sequence_len",
        "must be at most {MAX_SEQUENCE_LEN}, past any supported model's context (got {})",
        c.sequence_len
    );
    check!(
        EXCESS_LENGTH.contains(&c.excess_length_strategy.as_str()),
        loc,
        "excess_length_strategy",
        "must be drop or truncate (got {})",
        c.excess_length_strategy
    );
    check!(c.val_set_size >= 0.0, loc, "val_set_size", "must be at least 0 (got {})", c.val_set_size);
    check!(
        c.val_set_size < 1.0 || c.val_set_size.fract() == 0.0,
        loc,
        "val_set_size",
        "must be a fraction below 1 or a whole number of examples (got {})",
        c.val_set_size
    );

    check!(c.micro_batch_size >= 1, loc, "micro_batch_size", "must be at least 1 (got {})", c.micro_batch_size);
    check!(
        c.micro_batch_size <= MAX_MICRO_BATCH,
        loc,
        "micro_batch_size",
        "must be at most {MAX_MICRO_BATCH} (got {}); use gradient_accumulation_steps for larger batches",
        c.micro_batch_size
    );
    check!(
        c.gradient_accumulation_steps >= 1,
        loc,
        "gradient_accumulation_steps",
        "must be at least 1 (got {})",
        c.gradient_accumulation_steps
    );
    check!(c.num_epochs > 0.0, loc, "num_epochs", "must be greater than 0 (got {})", c.num_epochs);
    check!(c.num_epochs <= MAX_EPOCHS, loc, "num_epochs", "must be at most {MAX_EPOCHS} (got {}); use max_steps for a step count", c.num_epochs);
    if let Some(n) = c.max_steps {
        check!(n >= 1, loc, "max_steps", "must be at least 1 when set (got {n})");
    }
    check!(c.learning_rate > 0.0, loc, "learning_rate", "must be greater than 0 (got {})", c.learning_rate);
    let scheduler_ok = SCHEDULERS.contains(&c.lr_scheduler.as_str())
        || SCHEDULER_ALIASES.iter().any(|(alias, _)| *alias == c.lr_scheduler);
    check!(
        scheduler_ok,
        loc,
        "lr_scheduler",
        "must be constant, linear or cosine (or constant_with_warmup, the same as constant) (got {})",
        c.lr_scheduler
    );
    if let Some(r) = c.warmup_ratio {
        check!((0.0..1.0).contains(&r), loc, "warmup_ratio", "must be at least 0 and below 1 (got {r})");
        check!(c.warmup_steps.is_none(), loc, "warmup_ratio", "and warmup_steps are both set: keep one");
    }
    check!(
        ADAMW_NAMES.contains(&c.optimizer.as_str()),
        loc,
        "optimizer",
        "must be adamw_torch (or adamw_torch_fused, adamw_hf, adamw) (got {})",
        c.optimizer
    );
    check!((0.0..1.0).contains(&c.adam_beta1), loc, "adam_beta1", "must be at least 0 and below 1 (got {})", c.adam_beta1);
    check!((0.0..1.0).contains(&c.adam_beta2), loc, "adam_beta2", "must be at least 0 and below 1 (got {})", c.adam_beta2);
    check!(c.adam_epsilon > 0.0, loc, "adam_epsilon", "must be greater than 0 (got {})", c.adam_epsilon);
    check!(c.weight_decay >= 0.0, loc, "weight_decay", "must be at least 0 (got {})", c.weight_decay);

    check!(c.logging_steps >= 1, loc, "logging_steps", "must be at least 1 (got {})", c.logging_steps);
    for (key, v) in [
        ("save_steps", c.save_steps),
        ("saves_per_epoch", c.saves_per_epoch),
        ("eval_steps", c.eval_steps),
        ("evals_per_epoch", c.evals_per_epoch),
        ("save_total_limit", c.save_total_limit),
    ] {
        if let Some(n) = v {
            check!(n >= 1, loc, key, "must be at least 1 when set (got {n})");
        }
    }
    check!(
        c.save_steps.is_none() || c.saves_per_epoch.is_none(),
        loc,
        "saves_per_epoch",
        "and save_steps are both set: keep one"
    );
    check!(
        c.eval_steps.is_none() || c.evals_per_epoch.is_none(),
        loc,
        "evals_per_epoch",
        "and eval_steps are both set: keep one"
    );
    check!(valid_device(&c.device), loc, "device", "must be cpu, cuda, cuda:N or auto (got {})", c.device);
    Ok(())
}

fn valid_device(s: &str) -> bool {
    matches!(s, "cpu" | "cuda" | "auto") || s.strip_prefix("cuda:").is_some_and(|n| n.parse::<usize>().is_ok())
}

fn validate_dataset(d: &DatasetConfig, rl: Option<&str>, rows: Rows, at: &str, loc: &Locator) -> Result<()> {
    let key = |k: &str| format!("{at}.{k}");
    check!(!d.path.trim().is_empty(), loc, &key("path"), "is required: the .jsonl or .json file (or directory) to read");
    if let Some(kind) = d.kind.as_deref() {
        check!(
            !(kind == "sharegpt" || kind.starts_with("sharegpt:") || kind.starts_with("sharegpt.")),
            loc,
            &key("type"),
            "{kind} is no longer supported (Axolotl removed it too): use type: chat_template with \
             field_messages: conversations and message_property_mappings: {{role: from, content: value}}"
        );
        let preference = is_preference_spelling(kind);
        let rl = rl.unwrap_or_default();
        match rows {
            Rows::Labelled => {
                check!(
                    false,
                    loc,
                    &key("type"),
                    "must be left out with rl: {rl}: {} datasets are {{prompt, completion, label}} rows (got {kind})",
                    rl.to_uppercase()
                );
            }
            Rows::ScoredPairs => {
                check!(
                    false,
                    loc,
                    &key("type"),
                    "must be left out with reward_model: its datasets are {{prompt?, chosen, rejected, margin?}} rows (got {kind})"
                );
            }
            Rows::Prompts => {
                check!(
                    false,
                    loc,
                    &key("type"),
                    "must be left out with rl: grpo and rl: rloo: their datasets are {{prompt, other columns...}} rows (got {kind})"
                );
            }
            Rows::Pairs | Rows::Sequences => {}
        }
        if rows == Rows::Pairs {
            check!(
                PREFERENCE_DATASET_TYPES.contains(&kind),
                loc,
                &key("type"),
                "with rl, must be one of {} or absent for {{prompt, chosen, rejected}} rows (got {kind})",
                PREFERENCE_DATASET_TYPES.join(", ")
            );
            return Ok(());
        }
        check!(
            !preference,
            loc,
            &key("type"),
            "{kind} is a preference dataset type: set rl ({}) to train on it",
            rl_values_reading(Rows::Pairs)
        );
        check!(
            PLAIN_DATASET_TYPES.contains(&kind),
            loc,
            &key("type"),
            "must be alpaca, chat_template, completion or input_output, or absent for pre-tokenized rows (got {kind})"
        );
    }
    if let Some(eos) = d.train_on_eos.as_deref() {
        check!(TRAIN_ON_EOS.contains(&eos), loc, &key("train_on_eos"), "must be turn, all, last or none (got {eos})");
    }
    if let Some(map) = &d.message_property_mappings {
        let unknown = map.keys().find(|k| *k != "role" && *k != "content");
        check!(
            unknown.is_none(),
            loc,
            &key("message_property_mappings"),
            "maps only role and content to the keys of each message (got {})",
            unknown.map(String::as_str).unwrap_or("")
        );
    }
    if let Some(roles) = &d.roles_to_train {
        check!(!roles.is_empty(), loc, &key("roles_to_train"), "is empty: list the roles whose turns are trained (e.g. [assistant])");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> RunConfig {
        RunConfig {
            base_model: "m".into(),
            learning_rate: 1e-4,
            datasets: vec![DatasetConfig { path: "d.jsonl".into(), kind: Some("alpaca".into()), ..Default::default() }],
            ..RunConfig::default()
        }
    }

    fn err(f: impl FnOnce(&mut RunConfig)) -> String {
        let mut c = base();
        f(&mut c);
        validate(&c, &Locator::none()).unwrap_err().to_string()
    }

    #[test]
    fn defaults_with_the_required_keys_are_valid() {
        validate(&base(), &Locator::none()).unwrap();
    }

    #[test]
    fn every_check_has_its_message() {
        assert_eq!(err(|c| c.lora_r = 0), "lora_r must be at least 1 (got 0)");
        assert_eq!(err(|c| c.lora_alpha = 0.0), "lora_alpha must be greater than 0 (got 0)");
        assert_eq!(err(|c| c.lora_dropout = 1.0), "lora_dropout must be at least 0 and below 1 (got 1)");
        assert_eq!(err(|c| c.lora_dropout = -0.1), "lora_dropout must be at least 0 and below 1 (got -0.1)");
        assert_eq!(err(|c| c.micro_batch_size = 0), "micro_batch_size must be at least 1 (got 0)");
        assert_eq!(err(|c| c.gradient_accumulation_steps = 0), "gradient_accumulation_steps must be at least 1 (got 0)");
        assert_eq!(err(|c| c.sequence_len = 1), "sequence_len must be at least 2 (got 1)");
        assert_eq!(err(|c| c.learning_rate = 0.0), "learning_rate must be greater than 0 (got 0)");
        assert_eq!(err(|c| c.num_epochs = 0.0), "num_epochs must be greater than 0 (got 0)");
        assert_eq!(err(|c| c.max_steps = Some(0)), "max_steps must be at least 1 when set (got 0)");
        assert_eq!(
            err(|c| c.lr_scheduler = "one_cycle".into()),
            "lr_scheduler must be constant, linear or cosine (or constant_with_warmup, the same as constant) (got one_cycle)"
        );
        assert_eq!(err(|c| c.warmup_ratio = Some(1.0)), "warmup_ratio must be at least 0 and below 1 (got 1)");
        assert_eq!(err(|c| (c.warmup_ratio, c.warmup_steps) = (Some(0.1), Some(10))), "warmup_ratio and warmup_steps are both set: keep one");
        assert_eq!(err(|c| c.val_set_size = -1.0), "val_set_size must be at least 0 (got -1)");
        assert_eq!(
            err(|c| c.val_set_size = 2.5),
            "val_set_size must be a fraction below 1 or a whole number of examples (got 2.5)"
        );
        assert_eq!(err(|c| c.excess_length_strategy = "split".into()), "excess_length_strategy must be drop or truncate (got split)");
        assert_eq!(
            err(|c| c.datasets.clear()),
            "datasets is empty: list at least one dataset (path, and type unless the rows are pre-tokenized)"
        );
        assert_eq!(
            err(|c| c.datasets[0].kind = Some("oasst".into())),
            "datasets[0].type must be alpaca, chat_template, completion or input_output, or absent for pre-tokenized rows (got oasst)"
        );
        assert!(err(|c| c.datasets[0].kind = Some("sharegpt".into())).contains("use type: chat_template with field_messages: conversations"));
        assert!(err(|c| c.datasets[0].kind = Some("chatml.intel".into())).contains("preference dataset type"));
        assert_eq!(err(|c| c.datasets[0].path = String::new()), "datasets[0].path is required: the .jsonl or .json file (or directory) to read");
        assert_eq!(err(|c| c.datasets[0].train_on_eos = Some("first".into())), "datasets[0].train_on_eos must be turn, all, last or none (got first)");
        assert_eq!(
            err(|c| c.test_datasets.push(DatasetConfig { path: "t.jsonl".into(), train_on_eos: Some("x".into()), ..Default::default() })),
            "test_datasets[0].train_on_eos must be turn, all, last or none (got x)"
        );
        assert_eq!(
            err(|c| c.datasets[0].message_property_mappings = Some([("speaker".to_string(), "from".to_string())].into())),
            "datasets[0].message_property_mappings maps only role and content to the keys of each message (got speaker)"
        );
        assert_eq!(
            err(|c| c.datasets[0].roles_to_train = Some(vec![])),
            "datasets[0].roles_to_train is empty: list the roles whose turns are trained (e.g. [assistant])"
        );
        assert_eq!(err(|c| c.logging_steps = 0), "logging_steps must be at least 1 (got 0)");
        assert_eq!(err(|c| c.save_steps = Some(0)), "save_steps must be at least 1 when set (got 0)");
        assert_eq!(err(|c| c.eval_steps = Some(0)), "eval_steps must be at least 1 when set (got 0)");
        assert_eq!(err(|c| (c.save_steps, c.saves_per_epoch) = (Some(10), Some(2))), "saves_per_epoch and save_steps are both set: keep one");
        assert_eq!(err(|c| (c.eval_steps, c.evals_per_epoch) = (Some(10), Some(2))), "evals_per_epoch and eval_steps are both set: keep one");
        assert_eq!(err(|c| c.device = "gpu".into()), "device must be cpu, cuda, cuda:N or auto (got gpu)");
        assert_eq!(err(|c| c.device = "cuda:x".into()), "device must be cpu, cuda, cuda:N or auto (got cuda:x)");
        assert_eq!(err(|c| c.adam_beta2 = 1.0), "adam_beta2 must be at least 0 and below 1 (got 1)");
        let bad_regex = err(|c| c.lora_target_modules = Some(super::super::TargetModules::Regex("(".into())));
        assert!(bad_regex.starts_with("lora_target_modules: \"(\" is not a valid regular expression"), "{bad_regex}");
        assert_eq!(
            err(|c| c.lora_target_modules = Some(super::super::TargetModules::Names(vec![]))),
            "lora_target_modules is an empty list: name at least one module (e.g. [q_proj, v_proj]) or set lora_target_linear: true"
        );
    }

    #[test]
    fn accepted_spellings() {
        for device in ["cpu", "cuda", "cuda:1", "auto"] {
            let mut c = base();
            c.device = device.into();
            validate(&c, &Locator::none()).unwrap();
        }
        let mut c = base();
        c.lr_scheduler = "constant_with_warmup".into();
        c.optimizer = "adamw_torch_fused".into();
        c.val_set_size = 100.0;
        validate(&c, &Locator::none()).unwrap();
    }
}
