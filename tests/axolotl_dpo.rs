//! Axolotl's minimal DPO QLoRA config, key for key as people copy it
//! (top-level `beta`, `model_type`, `tokenizer_type`, an 8-bit paged
//! optimizer, tracker keys left blank, a 100-step warmup), trains on the
//! quickstart model; and the config's claims about the checkpoint
//! (model_type, tokenizer_type, tokenizer_config) are checked before any
//! weight is read.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn model() -> PathBuf {
    repo().join("examples/quickstart/model")
}

/// chatml.intel rows: {system, question, chosen, rejected}.
fn write_pairs(dir: &Path) -> PathBuf {
    let rows: Vec<String> = [("France", "Paris"), ("Japan", "Tokyo"), ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Chile", "Santiago"), ("Norway", "Oslo")]
        .iter()
        .map(|(country, city)| {
            serde_json::json!({
                "system": "You answer in one sentence.",
                "question": format!("What is the capital of {country}?"),
                "chosen": format!("The capital of {country} is {city}."),
                "rejected": "I do not know.",
            })
            .to_string()
        })
        .collect();
    let path = dir.join("pairs.jsonl");
    std::fs::write(&path, rows.join("\n") + "\n").unwrap();
    path
}

/// The config as it circulates, with base_model, the dataset path and
/// output_dir pointing into this test.
fn config(base_model: &Path, data: &Path, out: &Path) -> String {
    format!(
        "\
base_model: {base}
model_type: LlamaForCausalLM
tokenizer_type: AutoTokenizer

load_in_8bit: false
load_in_4bit: true
strict: false

rl: dpo
beta: 0.1
chat_template: chatml
datasets:
  - path: {data}
    split: train
    type: chatml.intel
dataset_prepared_path:
val_set_size: 0.0
output_dir: {out}

adapter: qlora
lora_model_dir:

sequence_len: 512
sample_packing: false
pad_to_sequence_len: false

lora_r: 8
lora_alpha: 16
lora_dropout: 0.05
lora_target_linear: true
lora_fan_in_fan_out:

wandb_project:
wandb_entity:
wandb_watch:
wandb_name:
wandb_log_model:

gradient_accumulation_steps: 1
micro_batch_size: 2
num_epochs: 1
optimizer: paged_adamw_8bit
lr_scheduler: cosine
learning_rate: 5e-5

train_on_inputs: false
group_by_length: false
bf16: auto
fp16:
tf32: false

gradient_checkpointing: true
early_stopping_patience:
resume_from_checkpoint:
local_rank:
logging_steps: 1
xformers_attention:
flash_attention: true

warmup_steps: 100
evals_per_epoch: 4
eval_table_size:
eval_max_new_tokens: 128
saves_per_epoch: 1
debug:
deepspeed:
weight_decay: 0.0
fsdp:
fsdp_config:
special_tokens:
  pad_token: \"<pad>\"
",
        base = base_model.display(),
        data = data.display(),
        out = out.display()
    )
}

fn train(cfg: &Path, set: &[&str]) -> Output {
    let mut args = vec!["train".to_string(), cfg.display().to_string(), "--device".into(), "cpu".into()];
    for s in set {
        args.extend(["--set".to_string(), s.to_string()]);
    }
    Command::new(env!("CARGO_BIN_EXE_ferrotune")).args(&args).output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn the_copied_axolotl_dpo_config_trains_and_says_the_warmup_overruns() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("dpo.yml");
    std::fs::write(&cfg, config(&model(), &write_pairs(tmp.path()), &tmp.path().join("out"))).unwrap();
    let out = train(&cfg, &["max_steps=3"]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    // 3 steps of a 100-step warmup: the last runs at 2/100 of 5e-5.
    assert!(
        err.contains(
            "warning: warmup_steps 100 reaches past the run's 3 optimizer steps: the learning rate peaks at 1e-6 and never reaches \
             learning_rate 5e-5"
        ),
        "{err}"
    );
    assert!(err.contains("optimizer: paged_adamw_8bit runs as AdamW with f32 moments"), "{err}");
    assert!(!err.contains("model_type") && !err.contains("tokenizer_type") && !err.contains("beta"), "matching keys are silent:\n{err}");
    let adapter = tmp.path().join("out/adapter_model.safetensors");
    assert!(adapter.is_file(), "no adapter at {}:\n{err}", adapter.display());
    let resolved = std::fs::read_to_string(tmp.path().join("out/resolved_config.yml")).unwrap();
    assert!(resolved.contains("rl_beta: 0.1") && resolved.contains("optimizer: adamw_torch"), "{resolved}");
}

/// A copy of the quickstart model whose tokenizer_config.json names `class`.
fn model_with_tokenizer_class(dir: &Path, class: &str) -> PathBuf {
    let copy = dir.join("model");
    std::fs::create_dir_all(&copy).unwrap();
    for entry in std::fs::read_dir(model()).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, copy.join(p.file_name().unwrap())).unwrap();
    }
    let file = copy.join("tokenizer_config.json");
    let mut tc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    tc["tokenizer_class"] = class.into();
    std::fs::write(&file, tc.to_string()).unwrap();
    copy
}

#[test]
fn claims_about_the_checkpoint_are_checked_before_the_weights_load() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("dpo.yml");
    let base = model_with_tokenizer_class(tmp.path(), "LlamaTokenizerFast");
    std::fs::write(&cfg, config(&base, &write_pairs(tmp.path()), &tmp.path().join("out"))).unwrap();

    let out = train(&cfg, &["model_type=MistralForCausalLM"]);
    let err = stderr(&out);
    let config_json = base.join("config.json");
    assert!(!out.status.success());
    assert!(
        err.contains(&format!(
            "model_type: MistralForCausalLM does not match the checkpoint: {} has architectures[0] LlamaForCausalLM",
            config_json.display()
        )),
        "{err}"
    );

    let out = train(&cfg, &["tokenizer_type=Qwen2TokenizerFast"]);
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!(
            "tokenizer_type: Qwen2TokenizerFast does not match the tokenizer: {} has tokenizer_class LlamaTokenizerFast",
            base.join("tokenizer_config.json").display()
        )),
        "{err}"
    );

    let empty = tmp.path().join("no_tokenizer");
    std::fs::create_dir_all(&empty).unwrap();
    let out = train(&cfg, &[&format!("tokenizer_config={}", empty.display())]);
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(err.contains(&format!("tokenizer_config: {} has no tokenizer.json", empty.display())), "{err}");
    let out = train(&cfg, &[&format!("tokenizer_config={}", tmp.path().join("missing").display())]);
    assert!(stderr(&out).contains("is not a directory"), "{}", stderr(&out));

    // eval --config checks the same claims before it reads any weight.
    let text = std::fs::read_to_string(&cfg).unwrap().replace("model_type: LlamaForCausalLM", "model_type: Qwen2ForCausalLM");
    let eval_cfg = tmp.path().join("eval.yml");
    std::fs::write(&eval_cfg, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .args(["eval", "--config", eval_cfg.to_str().unwrap(), "--device", "cpu"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("model_type: Qwen2ForCausalLM does not match the checkpoint"), "{}", stderr(&out));

    // The same names spelt the way the checkpoint does are silent.
    let out = train(&cfg, &["tokenizer_type=LlamaTokenizer", "max_steps=1", "warmup_steps=0"]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("tokenizer_type") && !err.contains("warmup"), "{err}");
}
