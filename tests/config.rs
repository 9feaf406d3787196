//! The run config through its public API: `load` / `load_str` on YAML text,
//! `--set` overrides, the conversions the trainer uses, and the resolved
//! config written to output_dir.

use ferrotune::adapter::Targets;
use ferrotune::backend::cpu::CpuBackend;
use ferrotune::config::{self, DatasetConfig, Loaded, RESOLVED_CONFIG_FILE, RunConfig, TargetModules};
use ferrotune::train::objectives;
use std::path::Path;

const MINIMAL: &str = "\
base_model: ./model
adapter: lora
datasets:
  - path: data.jsonl
    type: alpaca
learning_rate: 2e-4
";

fn load(text: &str, overrides: &[&str]) -> anyhow::Result<Loaded> {
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    config::load_str(text, "run.yml", &overrides)
}

fn error(text: &str, overrides: &[&str]) -> String {
    format!("{:#}", load(text, overrides).expect_err("the config should be refused"))
}

#[test]
fn minimal_config_takes_axolotls_defaults() {
    let loaded = load(MINIMAL, &[]).unwrap();
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    let c = loaded.config;
    assert_eq!(c.base_model, "./model");
    assert_eq!(c.learning_rate, 2e-4);
    assert_eq!(c.datasets, vec![DatasetConfig { path: "data.jsonl".into(), kind: Some("alpaca".into()), ..Default::default() }]);
    assert_eq!(c.lr_scheduler, "cosine");
    assert_eq!((c.micro_batch_size, c.gradient_accumulation_steps), (1, 1));
    assert_eq!((c.num_epochs, c.logging_steps, c.seed), (1.0, 1, 42));
    assert_eq!(c.max_grad_norm, 1.0);
    assert_eq!((c.adam_beta1, c.adam_beta2, c.adam_epsilon, c.weight_decay), (0.9, 0.999, 1e-8, 0.0));
    assert_eq!(c.sequence_len, 2048);
    assert_eq!(c.excess_length_strategy, "drop");
    assert!(c.shuffle_merged_datasets);
    assert_eq!((c.lora_r, c.lora_alpha, c.lora_dropout), (8, 16.0, 0.0));
    assert_eq!(c.output_dir, "./outputs");
    assert_eq!(c.device, "auto");
    assert_eq!(c.optimizer, "adamw_torch");
    assert!(!c.sample_packing && !c.train_on_inputs && !c.gradient_checkpointing);
    assert_eq!((c.max_steps, c.warmup_steps, c.warmup_ratio, c.save_steps), (None, None, None, None));
    // Every field not in the file is RunConfig::default()'s.
    let expected = RunConfig {
        base_model: c.base_model.clone(),
        adapter: c.adapter.clone(),
        datasets: c.datasets.clone(),
        learning_rate: c.learning_rate,
        ..RunConfig::default()
    };
    assert_eq!(c, expected);
}

#[test]
fn null_means_the_default() {
    let c = load(&format!("{MINIMAL}lora_r:\nwarmup_steps:\nwandb_project:\n"), &[]).unwrap();
    assert_eq!(c.config.lora_r, 8);
    assert!(c.warnings.is_empty(), "an empty ignored key asks for nothing: {:?}", c.warnings);
}

#[test]
fn required_keys() {
    assert_eq!(error("base_model: m\nlearning_rate: 1e-4\n", &[]), "run.yml: datasets is required: the list of datasets to train on");
    assert_eq!(
        error("adapter: lora\ndatasets: [{path: d.jsonl}]\nlearning_rate: 1e-4\n", &[]),
        "run.yml: base_model is required: the model directory or hub id to fine-tune"
    );
    assert_eq!(error("base_model: m\ndatasets: [{path: d.jsonl}]\n", &[]), "run.yml: learning_rate is required: e.g. 2e-4 for LoRA");
    assert_eq!(error("# nothing yet\n", &[]), "run.yml: base_model is required: the model directory or hub id to fine-tune");
    assert_eq!(
        error("base_model: m\ndatasets: [{type: alpaca}]\nlearning_rate: 1e-4\n", &[]),
        "run.yml: datasets[0].path is required: the .jsonl or .json file (or directory) to read"
    );
}

#[test]
fn unknown_key_names_line_and_nearest_key() {
    let text = "base_model: ./model\n# the optimizer\nlerning_rate: 2e-4\ndatasets:\n  - path: d.jsonl\n";
    assert_eq!(error(text, &[]), "run.yml:3: unknown key \"lerning_rate\" (did you mean \"learning_rate\"?)");
    let text = MINIMAL.replace("    type: alpaca\n", "    type: alpaca\n  - path: e.jsonl\n    tpye: completion\n");
    assert_eq!(error(&text, &[]), "run.yml:7: unknown key \"tpye\" in datasets[1] (did you mean \"type\"?)");
    assert_eq!(error(&format!("{MINIMAL}frobnicate_everything: 3\n"), &[]), "run.yml:7: unknown key \"frobnicate_everything\"");
    assert_eq!(error(&format!("{MINIMAL}max_seq_length: 4096\n"), &[]), "run.yml:7: unknown key \"max_seq_length\" (did you mean \"sequence_len\"?)");
}

#[test]
fn ignored_axolotl_keys_warn_once_each() {
    let text = format!("{MINIMAL}bf16: auto\nflash_attention: true\nwandb_project: my-run\n");
    let loaded = load(&text, &[]).unwrap();
    assert_eq!(loaded.warnings.len(), 3, "{:?}", loaded.warnings);
    assert!(loaded.warnings[0].starts_with("run.yml:7: bf16 is ignored: precision is fixed"), "{}", loaded.warnings[0]);
    assert!(loaded.warnings[1].starts_with("run.yml:8: flash_attention is ignored: ferrotune always runs its own fused kernels"));
    assert!(loaded.warnings[2].starts_with("run.yml:9: wandb_project is ignored:"));
    // Nothing about them reaches the typed config: it equals the one without them.
    assert_eq!(loaded.config, load(MINIMAL, &[]).unwrap().config);

    let text = MINIMAL.replace("    type: alpaca\n", "    type: alpaca\n    ds_type: json\n");
    let loaded = load(&text, &[]).unwrap();
    assert_eq!(loaded.warnings, vec!["run.yml:6: datasets[0].ds_type is ignored: the file format is read from the extension (.jsonl or .json)"]);
}

#[test]
fn missing_adapter_is_a_warning() {
    let loaded = load(&MINIMAL.replace("adapter: lora\n", ""), &[]).unwrap();
    assert_eq!(loaded.warnings.len(), 1);
    assert!(loaded.warnings[0].starts_with("run.yml: adapter is not set"), "{}", loaded.warnings[0]);
}

#[test]
fn unsupported_features_are_refused() {
    // QLoRA: load_in_4bit needs adapter: qlora; only NF4 is implemented.
    assert_eq!(
        error(&format!("{MINIMAL}load_in_4bit: true\n"), &[]),
        "run.yml:7: load_in_4bit is true, so adapter must be qlora (got lora): a 4-bit base trains a QLoRA adapter"
    );
    let qlora = MINIMAL.replace("adapter: lora", "adapter: qlora");
    let fp4 = error(&format!("{qlora}load_in_4bit: true\nbnb_config_kwargs:\n  bnb_4bit_quant_type: fp4\n"), &[]);
    assert!(fp4.contains("bnb_config_kwargs.bnb_4bit_quant_type must be nf4 (got fp4"), "{fp4}");
    assert!(error(&MINIMAL.replace("adapter: lora", "adapter: ia3"), &[]).starts_with("run.yml:2: adapter: ia3 is not supported yet"));
    assert!(error(&format!("{MINIMAL}rl: ebft\n"), &[]).starts_with("run.yml:7: rl: ebft is not supported yet: the other online objectives"));
    // GRPO is supported; its reward functions are required.
    let grpo = error(&format!("{MINIMAL}rl: grpo\n"), &[]);
    assert!(grpo.contains("datasets[0].type must be left out with rl: grpo"), "{grpo}");
    let prompts = MINIMAL.replace("    type: alpaca\n", "");
    let grpo = error(&format!("{prompts}rl: grpo\n"), &[]);
    assert!(grpo.contains("trl.reward_funcs is required for rl: grpo"), "{grpo}");
    let grpo = error(&format!("{prompts}rl: grpo\ntrl:\n  reward_funcs: [builtin:length:9]\n  num_generations: 3\n"), &[]);
    assert!(grpo.contains("must be a multiple of trl.num_generations (3)"), "{grpo}");
    // rl: rloo reads the same section with RLOOConfig's names and checks.
    let rloo = error(&format!("{prompts}rl: rloo\ntrl:\n  reward_funcs: [builtin:length:9]\n  loss_type: dapo\n"), &[]);
    assert!(rloo.contains("trl.loss_type is not an RLOO setting"), "{rloo}");
    let rloo = error(&format!("{prompts}rl: rloo\ntrl:\n  reward_funcs: [builtin:length:9]\n  reward_clip_range: [1, 0]\n"), &[]);
    assert!(rloo.contains("trl.reward_clip_range must be [min, max]"), "{rloo}");
    let rloo = error(&format!("{prompts}rl: rloo\ntrl:\n  reward_funcs: [builtin:length:9]\n  num_generations: 3\n"), &[]);
    assert!(rloo.contains("must be a multiple of trl.num_generations (3)"), "{rloo}");
    let rloo = error(&format!("{prompts}rl: rloo\n"), &[]);
    assert!(rloo.contains("trl.reward_funcs is required for rl: rloo"), "{rloo}");
    // rl changes what the datasets must be: alpaca rows are not preference data.
    let rl_alpaca = error(&format!("{MINIMAL}rl: dpo\n"), &[]);
    assert!(rl_alpaca.contains("with rl, must be one of chatml.intel"), "{rl_alpaca}");
    assert!(error(&format!("{MINIMAL}peft_use_dora: true\n"), &[]).contains("DoRA is not implemented"));
    assert!(error(&format!("{MINIMAL}lora_modules_to_save: [embed_tokens, lm_head]\n"), &[]).starts_with(
        "run.yml:7: lora_modules_to_save: [\"embed_tokens\",\"lm_head\"] is not supported: only LoRA parameters are trained"
    ));
    assert!(error(&format!("{MINIMAL}gradient_checkpointing: offload\n"), &[]).contains("use gradient_checkpointing: true"));
    assert!(error(&format!("{MINIMAL}optimizer: muon\n"), &[]).contains("use optimizer: adamw_torch"));
    // reward_model is supported; its datasets are pairs, not alpaca rows.
    let rm = error(&format!("{MINIMAL}reward_model: true\n"), &[]);
    assert!(rm.contains("must be left out with reward_model"), "{rm}");
    assert!(error(&format!("{MINIMAL}reward_model: true\nrl: dpo\n"), &[]).contains("reward_model and rl are both set"));
    assert!(error(&format!("{MINIMAL}load_in_8bit: true\n"), &[]).starts_with("run.yml:7: load_in_8bit: true is not supported:"));
    let sharegpt = error(&MINIMAL.replace("type: alpaca", "type: sharegpt"), &[]);
    assert!(sharegpt.starts_with("run.yml:5: datasets[0].type sharegpt is no longer supported"), "{sharegpt}");
    assert!(sharegpt.contains("message_property_mappings: {role: from, content: value}"));

    // A QLoRA run: adapter qlora with load_in_4bit and Axolotl's bnb_config_kwargs.
    let loaded = load(
        &format!("{qlora}load_in_4bit: true\nbnb_config_kwargs:\n  bnb_4bit_use_double_quant: false\n  llm_int8_has_fp16_weight: false\n"),
        &[],
    )
    .unwrap();
    assert!(loaded.config.qlora() && loaded.config.load_in_4bit && !loaded.config.bnb_config_kwargs.bnb_4bit_use_double_quant);
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    assert!(load(&qlora, &[]).unwrap().config.bnb_config_kwargs.bnb_4bit_use_double_quant, "double quantization is the default");

    // The same keys asking for nothing are fine, and silent.
    let text = format!(
        "{MINIMAL}load_in_4bit: false\nload_in_8bit: false\npeft_use_dora: false\nlora_modules_to_save: []\n\
         gradient_checkpointing: true\noptimizer: adamw_torch_fused\nrl:\n"
    );
    let loaded = load(&text, &[]).unwrap();
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    assert!(loaded.config.gradient_checkpointing);
    assert_eq!(loaded.config.optimizer, "adamw_torch", "AdamW aliases resolve to one name");
}

#[test]
fn type_errors_name_the_key_and_the_type() {
    assert_eq!(
        error(&MINIMAL.replace("learning_rate: 2e-4", "learning_rate: fast"), &[]),
        "run.yml:6: learning_rate must be a number, not the string \"fast\""
    );
    assert_eq!(error(&format!("{MINIMAL}lora_r: -4\n"), &[]), "run.yml:7: lora_r must be a whole number, 0 or more, not the number -4");
    assert_eq!(error(&format!("{MINIMAL}sample_packing: sometimes\n"), &[]), "run.yml:7: sample_packing must be true or false, not the string \"sometimes\"");
    assert_eq!(
        error(&format!("{MINIMAL}lora_target_modules: {{q: 1}}\n"), &[]),
        "run.yml:7: lora_target_modules must be a list of module names or one regular expression, not a mapping ({\"q\":1})"
    );
    assert_eq!(
        error(&MINIMAL.replace("    type: alpaca", "    roles_to_train: assistant"), &[]),
        "run.yml:5: datasets[0].roles_to_train must be a list, not the string \"assistant\""
    );
    assert_eq!(
        error("base_model: m\ndatasets: d.jsonl\nlearning_rate: 1e-4\n", &[]),
        "run.yml:2: datasets must be a list of dataset entries (- path: ...), not the string \"d.jsonl\""
    );
    assert_eq!(error("- a\n- b\n", &[]), "run.yml: a run config is a mapping of keys (base_model: ..., datasets: ...), not a list ([\"a\",\"b\"])");
    let bad_yaml = error("a: 1\n  b: [\n", &[]);
    assert!(bad_yaml.starts_with("run.yml: not valid YAML: ") && bad_yaml.contains("line 2"), "{bad_yaml}");
}

#[test]
fn validation_errors_carry_the_line() {
    assert_eq!(error(&format!("{MINIMAL}lora_r: 0\n"), &[]), "run.yml:7: lora_r must be at least 1 (got 0)");
    assert_eq!(
        error(&format!("{MINIMAL}warmup_steps: 10\nwarmup_ratio: 0.1\n"), &[]),
        "run.yml:8: warmup_ratio and warmup_steps are both set: keep one"
    );
    assert_eq!(error(&format!("{MINIMAL}device: gpu\n"), &[]), "run.yml:7: device must be cpu, cuda, cuda:N or auto (got gpu)");
    assert_eq!(error(&format!("{MINIMAL}lr_scheduler: one_cycle\n"), &[]).split(" (or").next().unwrap(), "run.yml:7: lr_scheduler must be constant, linear or cosine");
    let loaded = load(&format!("{MINIMAL}lr_scheduler: constant_with_warmup\nwarmup_steps: 5\n"), &[]).unwrap();
    assert_eq!(loaded.config.lr_scheduler, "constant");
}

#[test]
fn set_overrides_apply_before_checks() {
    let c = load(
        MINIMAL,
        &[
            "learning_rate=1e-5",
            "lora_r=32",
            "sample_packing=true",
            "lora_target_modules=[q_proj,v_proj]",
            "datasets.0.path=other.jsonl",
            "datasets.1.path=extra.jsonl",
            "datasets.1.type=completion",
            "special_tokens.pad_token=<pad>",
            "output_dir=runs/a",
            "max_steps=",
        ],
    )
    .unwrap()
    .config;
    assert_eq!(c.learning_rate, 1e-5);
    assert_eq!(c.lora_r, 32);
    assert!(c.sample_packing);
    assert_eq!(c.lora_target_modules, Some(TargetModules::Names(vec!["q_proj".into(), "v_proj".into()])));
    assert_eq!(c.datasets[0].path, "other.jsonl");
    assert_eq!(c.datasets[1], DatasetConfig { path: "extra.jsonl".into(), kind: Some("completion".into()), ..Default::default() });
    assert_eq!(c.special_tokens.get("pad_token").map(String::as_str), Some("<pad>"));
    assert_eq!(c.output_dir, "runs/a");
    assert_eq!(c.max_steps, None);

    // A required key may come from --set alone.
    let c = load(&MINIMAL.replace("learning_rate: 2e-4\n", ""), &["learning_rate=3e-4"]).unwrap().config;
    assert_eq!(c.learning_rate, 3e-4);
}

#[test]
fn set_errors_name_the_argument() {
    assert_eq!(error(MINIMAL, &["lerning_rate=1e-4"]), "--set lerning_rate=1e-4: unknown key \"lerning_rate\" (did you mean \"learning_rate\"?)");
    assert_eq!(error(MINIMAL, &["datasets.0.pth=x"]), "--set datasets.0.pth=x: unknown key \"pth\" in a dataset entry (did you mean \"path\"?)");
    assert_eq!(error(MINIMAL, &["lora_r=0"]), "--set lora_r=0: lora_r must be at least 1 (got 0)");
    assert_eq!(error(MINIMAL, &["learning_rate=fast"]), "--set learning_rate=fast: learning_rate must be a number, not the string \"fast\"");
    assert!(error(MINIMAL, &["load_in_4bit=true"]).starts_with("--set load_in_4bit=true: load_in_4bit is true, so adapter must be qlora"));
    assert!(error(MINIMAL, &["lora_r"]).contains("expected key=value"));
}

#[test]
fn lora_and_adamw_conversions() {
    let c = load(MINIMAL, &[]).unwrap().config;
    let lora = c.lora_config().unwrap();
    assert_eq!((lora.r, lora.alpha, lora.dropout, lora.use_rslora), (8, 16.0, 0.0, false));
    assert_eq!(lora.targets, Targets::Names(vec!["q_proj".into(), "v_proj".into()]), "PEFT's default for llama/mistral/qwen2");
    assert_eq!(lora.base_model_name_or_path.as_deref(), Some("./model"));

    let c = load(MINIMAL, &["lora_target_linear=true", "lora_target_modules=[q_proj]", "peft_use_rslora=true"]).unwrap().config;
    let lora = c.lora_config().unwrap();
    assert_eq!(lora.targets, Targets::AllLinear);
    assert!(lora.use_rslora);
    let c = load(MINIMAL, &[r"lora_target_modules=.*\.(q|v)_proj"]).unwrap().config;
    assert_eq!(c.lora_config().unwrap().targets, Targets::Regex(r".*\.(q|v)_proj".into()));
    let c = load(MINIMAL, &["lora_target_modules=all-linear"]).unwrap().config;
    assert_eq!(c.lora_config().unwrap().targets, Targets::AllLinear);

    let c = load(MINIMAL, &["adam_beta2=0.95", "weight_decay=0.01", "adam_epsilon=1e-6"]).unwrap().config;
    let adamw = c.adamw_config();
    assert_eq!((adamw.beta1, adamw.beta2, adamw.eps, adamw.weight_decay), (0.9, 0.95, 1e-6, 0.01));
    assert_eq!(adamw.max_grad_norm, Some(1.0));
    assert_eq!(load(MINIMAL, &["max_grad_norm=0"]).unwrap().config.adamw_config().max_grad_norm, None);
}

#[test]
fn resolved_config_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{MINIMAL}lora_target_modules: [q_proj, k_proj]\nlora_dropout: 0.05\nspecial_tokens: {{pad_token: \"<|end|>\"}}\n\
         resume_from_checkpoint: true\nmax_steps: 7\nwarmup_ratio: 0.03\noutput_dir: \"123\"\nchat_template: \"yes\"\n\
         test_datasets:\n  - path: t.jsonl\n    type: chat_template\n    message_property_mappings: {{role: from, content: value}}\n"
    );
    let original = load(&text, &[]).unwrap().config;
    let out = dir.path().join("run");
    std::fs::create_dir_all(&out).unwrap();
    original.save_resolved(&out).unwrap();
    let saved = out.join(RESOLVED_CONFIG_FILE);
    let reloaded = config::load(&saved, &[]).unwrap();
    assert_eq!(reloaded.config, original);
    assert!(reloaded.warnings.is_empty(), "{:?}", reloaded.warnings);
    // Every top-level key is written, defaults included.
    let yaml = std::fs::read_to_string(&saved).unwrap();
    for key in ["lr_scheduler: cosine", "seed: 42", "device: auto", "warmup_steps: null", "lora_r: 8"] {
        assert!(yaml.lines().any(|l| l == key), "{key} missing from\n{yaml}");
    }
    assert_eq!(yaml, original.to_yaml());
    // No temporary file is left behind.
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);
}

#[test]
fn every_example_config_loads() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/configs");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yml") {
            continue;
        }
        let loaded = config::load(&path, &[]).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
        assert!(loaded.warnings.is_empty(), "{}: {:?}", path.display(), loaded.warnings);
        loaded.config.lora_config().unwrap();
        let resolved = config::load_str(&loaded.config.to_yaml(), "resolved", &[]).unwrap();
        assert_eq!(resolved.config, loaded.config, "{}", path.display());
        seen += 1;
    }
    assert!(seen >= 3, "expected the example configs in {}", dir.display());
}

const DPO: &str = "\
base_model: ./model
adapter: lora
rl: dpo
datasets:
  - path: pairs.jsonl
    type: chatml.intel
learning_rate: 5e-5
";

#[test]
fn beta_dpo_beta_and_trl_beta_are_rl_beta() {
    for (key, text) in [
        ("beta", format!("{DPO}beta: 0.25\n")),
        ("dpo_beta", format!("{DPO}dpo_beta: 0.25\n")),
        ("trl.beta", format!("{DPO}trl:\n  beta: 0.25\n")),
        ("all three, equal", format!("{DPO}beta: 0.25\ndpo_beta: 0.25\nrl_beta: 0.25\ntrl:\n  beta: 0.25\n")),
    ] {
        let loaded = load(&text, &[]).unwrap_or_else(|e| panic!("{key}: {e:#}"));
        assert!(loaded.warnings.is_empty(), "{key}: {:?}", loaded.warnings);
        assert_eq!(loaded.config.rl_beta, Some(0.25), "{key}");
    }
    // trl's other keys are still GRPO's, and still said to do nothing.
    let loaded = load(&format!("{DPO}trl:\n  beta: 0.25\n  max_completion_length: 256\n"), &[]).unwrap();
    assert_eq!(loaded.config.rl_beta, Some(0.25));
    assert_eq!(loaded.warnings.len(), 1);
    assert!(loaded.warnings[0].starts_with("run.yml:8: trl is ignored:"), "{:?}", loaded.warnings);
    // --set reaches beta too.
    assert_eq!(load(DPO, &["beta=0.5"]).unwrap().config.rl_beta, Some(0.5));
    assert_eq!(load(DPO, &["trl.beta=0.3"]).unwrap().config.rl_beta, Some(0.3));
    // beta is ORPO's lambda too, as Axolotl passes it.
    let orpo = load(&format!("{}beta: 0.2\n", DPO.replace("rl: dpo", "rl: orpo")), &[]).unwrap().config;
    assert_eq!(objectives::select::<CpuBackend>(&orpo).unwrap().settings().unwrap(), "Orpo(OrpoConfig { beta: 0.2 })");
}

#[test]
fn two_spellings_of_beta_that_differ_are_refused_naming_both() {
    assert_eq!(
        error(&format!("{DPO}rl_beta: 0.1\nbeta: 0.2\n"), &[]),
        "run.yml:9: beta 0.2 and rl_beta 0.1 are both set and differ: they are the same setting (rl_beta); keep one"
    );
    assert_eq!(
        error(&format!("{DPO}beta: 0.1\ndpo_beta: 0.3\n"), &[]),
        "run.yml:9: dpo_beta 0.3 and beta 0.1 are both set and differ: they are the same setting (rl_beta); keep one"
    );
    assert_eq!(
        error(&format!("{DPO}beta: 0.1\ntrl:\n  beta: 0.3\n"), &[]),
        "run.yml:10: trl.beta 0.3 and beta 0.1 are both set and differ: they are the same setting (rl_beta); keep one"
    );
    assert_eq!(
        error(&format!("{DPO}beta: high\n"), &[]),
        "run.yml:8: beta must be a number (the objective's beta, as rl_beta), not the string \"high\""
    );
    let orpo = DPO.replace("rl: dpo", "rl: orpo");
    assert_eq!(
        error(&format!("{orpo}rl_beta: 0.2\norpo_alpha: 0.1\n"), &[]),
        "run.yml:9: orpo_alpha 0.1 and rl_beta 0.2 are both set for rl: orpo: Axolotl passes rl_beta as ORPO's lambda and ignores orpo_alpha; keep one"
    );
}

#[test]
fn low_memory_adamw_variants_run_as_adamw_with_a_warning() {
    let loaded = load(&format!("{MINIMAL}optimizer: paged_adamw_8bit\n"), &[]).unwrap();
    assert_eq!(loaded.config.optimizer, "adamw_torch");
    assert_eq!(loaded.warnings.len(), 1);
    assert!(
        loaded.warnings[0].starts_with(
            "run.yml:7: optimizer: paged_adamw_8bit runs as AdamW with f32 moments (the same update rule, without 8-bit state): \
             its state takes 8 bytes per trainable parameter instead of about 2"
        ),
        "{}",
        loaded.warnings[0]
    );
    let paged = load(&format!("{MINIMAL}optimizer: paged_adamw_32bit\n"), &[]).unwrap();
    assert!(paged.warnings[0].contains("not paged to CPU memory"), "{:?}", paged.warnings);
}

#[test]
fn more_axolotl_keys_act_warn_or_are_refused_with_the_reason() {
    // model_type / tokenizer_type are checked against the checkpoint when it is opened, not ignored.
    let loaded = load(&format!("{MINIMAL}model_type: LlamaForCausalLM\ntokenizer_type: AutoTokenizer\ntype_of_model: LlamaForCausalLM\n"), &[]).unwrap();
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    assert_eq!((loaded.config.model_type.as_deref(), loaded.config.tokenizer_type.as_deref()), (Some("LlamaForCausalLM"), Some("AutoTokenizer")));

    let text = format!("{MINIMAL}attn_implementation: flash_attention_2\nuse_swanlab: false\ndynamic_checkpoint: true\nremove_unused_columns: false\n");
    let w = load(&text, &[]).unwrap().warnings;
    assert_eq!(w.len(), 4, "{w:?}");
    assert!(w[0].starts_with("run.yml:7: attn_implementation is ignored: ferrotune always runs its own fused kernels"), "{}", w[0]);
    assert!(w[1].starts_with("run.yml:8: use_swanlab is ignored: ferrotune has no experiment-tracker integration"), "{}", w[1]);
    assert!(w[2].starts_with("run.yml:9: dynamic_checkpoint is ignored: gradient checkpointing keeps each layer's input"), "{}", w[2]);
    assert!(w[3].starts_with("run.yml:10: remove_unused_columns is ignored: rows are read by field name"), "{}", w[3]);

    assert_eq!(
        error(&format!("{DPO}rpo_alpha: 0.5\n"), &[]),
        "run.yml:8: rpo_alpha: 0.5 is not supported: RPO (DPO plus the chosen completion's NLL) is not implemented; remove rpo_alpha to train plain DPO"
    );
    assert!(error(&format!("{MINIMAL}num_labels: 3\n"), &[]).starts_with("run.yml:7: num_labels: 3 is not supported: classification heads"));
    assert!(load(&format!("{MINIMAL}num_labels: 1\n"), &[]).unwrap().warnings.is_empty());
    assert!(error(&format!("{MINIMAL}activation_offloading: legacy\n"), &[]).contains("activation offloading is not implemented"));
    assert!(error(&format!("{MINIMAL}liger_use_token_scaling: true\n"), &[]).contains("scaling each token's loss"));
    assert!(error(&format!("{MINIMAL}lora_target_parameters: [mlp.experts.gate_up_proj]\n"), &[]).contains("adapting parameters directly"));
    assert!(error(&format!("{MINIMAL}peft_init_lora_weights: pissa\n"), &[]).contains("LoRA initialisations other than PEFT's default"));
    assert!(load(&format!("{MINIMAL}peft_init_lora_weights: true\n"), &[]).unwrap().warnings.is_empty());

    // Dataset entries: the default field names are accepted silently, others refused.
    let dpo = DPO.replace("type: chatml.intel", "type: chat_template.default\n    field_chosen: chosen\n    field_rejected: rejected");
    let loaded = load(&dpo, &[]).unwrap();
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    let renamed = DPO.replace("type: chatml.intel", "type: chat_template.default\n    field_chosen: better");
    assert_eq!(
        error(&renamed, &[]),
        "run.yml:7: datasets[0].field_chosen: better is not supported: other names for the chosen field are not implemented; rename the field to chosen in the data"
    );
    let mapping = MINIMAL.replace("type: alpaca", "type:\n      field_instruction: q\n      format: \"{instruction}\"");
    assert!(error(&mapping, &[]).starts_with("run.yml:5: datasets[0].type: {"), "{}", error(&mapping, &[]));
    assert!(error(&mapping, &[]).contains("user-defined prompt formats"));
}

#[test]
fn axolotl_list_and_zero_spellings() {
    // Axolotl's dpo_loss_type is a list; one entry is that loss.
    let c = load(&format!("{DPO}dpo_loss_type: [ipo]\n"), &[]).unwrap().config;
    assert_eq!(c.dpo_loss_type.as_deref(), Some("ipo"));
    assert_eq!(
        error(&format!("{DPO}dpo_loss_type: [sigmoid, sft]\n"), &[]),
        "run.yml:8: dpo_loss_type lists 2 losses: weighted mixtures of DPO losses are not implemented; list one (e.g. [sigmoid])"
    );
    // evals_per_epoch: 0 is Axolotl's "no evaluation schedule".
    let c = load(&format!("{MINIMAL}evals_per_epoch: 0\n"), &[]).unwrap().config;
    assert_eq!(c.evals_per_epoch, None);
}
