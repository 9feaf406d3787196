//! Gemma 4 beyond the parity checks every case gets (tests/parity.rs,
//! families.rs, generate*.rs): LoRA gradients within 1e-5 of transformers'
//! computed in float64 (its float32 ones are themselves ~1e-5 away), both
//! config.json layouts of the full layers' head size, and the refusals,
//! each on both checkpoint layouts: Gemma4ForCausalLM (`gemma4`) and the
//! hub's Gemma4ForConditionalGeneration (`gemma4_vlm`, the text model's
//! numbers under text_config). The fixtures are tests/fixtures/gemma4.py's.
mod common;
use common::{Reference, fixture, load_with_adapter, rel_err};
use ferrotune::backend::Backend;
use ferrotune::backend::cpu::CpuBackend;
use ferrotune::model::batch::Batch;
use ferrotune::model::graph::BackwardOpts;
use ferrotune::model::hparams::ModelConfig;
use ferrotune::model::module_path;
use ferrotune::registry;
use serde_json::Value;
use std::path::Path;

const LAYOUTS: [&str; 2] = ["gemma4", "gemma4_vlm"];

#[test]
fn lora_gradients_are_within_1e_5_of_transformers_in_float64() {
    for case in LAYOUTS {
        lora_gradients_within_1e_5_of_float64(case);
    }
}

fn lora_gradients_within_1e_5_of_float64(case: &str) {
    let be = CpuBackend::new();
    let mut model = load_with_adapter(&be, case);
    let r = Reference::load(case);
    let (seqs, _) = r.sequences();
    let batch = Batch::from_sequences(&seqs, model.cfg.vocab).unwrap();
    model.zero_grad(&be);
    let opts = BackwardOpts { grad_scale: 1.0 / batch.n_targets() as f32, gradient_checkpointing: false, dropout_seed: None };
    let loss = model.forward_backward(&be, &batch, opts).mean();
    let want = r.f64("loss64")[0];
    assert!((loss - want).abs() / want <= 1e-6, "{case}: loss {loss} vs float64 {want}");
    let mut worst = 0.0f64;
    let mut checked = 0;
    for (li, p, l) in model.loras() {
        let m = module_path(&model.cfg, li, p);
        for (which, got) in [("lora_A", &l.grad_a), ("lora_B", &l.grad_b)] {
            let e = rel_err(&be.download(got), &r.f32(&format!("grad64.base_model.model.{m}.{which}.weight")));
            worst = worst.max(e);
            assert!(e <= 1e-5, "{case}: gradient of {m}.{which}: rel error {e:e} > 1e-5 against float64");
            checked += 1;
        }
    }
    assert_eq!(checked, r.names().iter().filter(|n| n.starts_with("grad64.")).count(), "{case}: every grad64 tensor is checked");
    eprintln!("{case}: worst LoRA gradient rel err vs float64 {worst:.3e} over {checked} tensors");
}

fn config_json(case: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(case).join("model/config.json")).unwrap()).unwrap()
}

/// The object holding the text model's numbers: the file itself, or its
/// text_config in the hub layout.
fn text_numbers<'a>(raw: &'a mut Value, case: &str) -> &'a mut serde_json::Map<String, Value> {
    let obj = raw.as_object_mut().unwrap();
    if case == "gemma4_vlm" { obj.get_mut("text_config").unwrap().as_object_mut().unwrap() } else { obj }
}

fn resolve(raw: Value) -> anyhow::Result<ModelConfig> {
    let family = registry::lookup(&raw, "config.json")?;
    ModelConfig::from_json(raw, family, Path::new("config.json"))
}

#[test]
fn per_layer_config_is_read_layer_by_layer() {
    for case in LAYOUTS {
        per_layer_config_read_layer_by_layer(case);
    }
    let (text, hub) = (resolve(config_json("gemma4")).unwrap(), resolve(config_json("gemma4_vlm")).unwrap());
    assert_eq!((text.family.family.as_str(), hub.family.family.as_str()), ("gemma4", "gemma4_vlm"));
    assert_eq!(hub.gemma4, text.gemma4, "the same text config in both layouts");
}

fn per_layer_config_read_layer_by_layer(case: &str) {
    let cfg = resolve(config_json(case)).unwrap();
    let g = cfg.gemma4.as_ref().unwrap();
    assert_eq!(g.head_dim, [8, 16, 8, 8, 16]);
    assert_eq!(g.kv_heads, [2, 1, 2, 2, 1]);
    assert_eq!(g.kv_source, [None, None, None, Some(2), Some(1)]);
    assert_eq!(g.k_eq_v, [false, true, false, false, false]);
    assert_eq!(g.intermediate, [48, 48, 48, 96, 96]);
    assert_eq!((g.ple, g.ple_vocab, g.rope_dims), (8, 131, [16, 8]));
    assert_eq!(cfg.attn_scale, 1.0);
    // Full layers: 2 of 8 pairs turn (θ 1e6 over 16), the rest not at all.
    let full = cfg.ropes[0].inv_freq(16, false);
    assert_eq!(full.len(), 8);
    assert!((full[1] - 1e6f32.powf(-2.0 / 16.0)).abs() < 1e-7 && full[2..].iter().all(|&f| f == 0.0), "{full:?}");
}

#[test]
fn the_hub_layout_with_global_head_dim_reads_the_same() {
    for case in LAYOUTS {
        let mut raw = config_json(case);
        let obj = text_numbers(&mut raw, case);
        obj.remove("per_layer_config");
        obj.insert("global_head_dim".into(), 16.into());
        obj.insert("num_global_key_value_heads".into(), 1.into());
        let hub = resolve(raw).unwrap();
        assert_eq!(hub.gemma4, resolve(config_json(case)).unwrap().gemma4, "{case}");
    }
}

#[test]
fn unsupported_gemma4_settings_are_refused_by_key() {
    for case in LAYOUTS {
        unsupported_settings_refused_by_key(case);
    }
}

fn unsupported_settings_refused_by_key(case: &str) {
    let with = |key: &str, value: Value| {
        let mut raw = config_json(case);
        text_numbers(&mut raw, case).insert(key.into(), value);
        resolve(raw).unwrap_err().to_string()
    };
    let e = with("enable_moe_block", true.into());
    assert!(e.contains("config.json: \"enable_moe_block\" is true") && e.contains("not supported"), "{e}");
    let e = with("per_layer_config", serde_json::json!({"7": {"head_dim": 16}}));
    assert!(e.contains("per_layer_config has key \"7\"") && e.contains("0..4"), "{e}");
    let e = with("num_kv_shared_layers", 4.into());
    assert!(e.contains("layer 1 shares K/V") && e.contains("no earlier layer of its type"), "{e}");
    let e = with("use_bidirectional_attention", "all".into());
    assert!(e.contains("\"use_bidirectional_attention\" is \"all\""), "{e}");
}

#[test]
fn bidirectional_attention_on_vision_tokens_only_is_causal_text() {
    // The hub checkpoints' "vision": transformers runs text-only input
    // causally, as with null (the gemma4_vlm fixture checks it, bit for bit).
    for case in LAYOUTS {
        let mut raw = config_json(case);
        text_numbers(&mut raw, case).insert("use_bidirectional_attention".into(), "vision".into());
        let cfg = resolve(raw).unwrap();
        assert_eq!(cfg.gemma4, resolve(config_json(case)).unwrap().gemma4, "{case}");
    }
}

#[test]
fn the_hub_layouts_towers_are_named_at_load() {
    use ferrotune::model::checkpoint::Checkpoint;
    let note = Checkpoint::open(&fixture("gemma4_vlm").join("model")).unwrap().untrained_note().unwrap();
    assert!(note.starts_with("Gemma4ForConditionalGeneration: the text model is trained"), "{note}");
    for part in ["vision tower (model.vision_tower.*", "vision embedder (model.embed_vision.*, 1 tensor)", "audio tower (model.audio_tower.*", "audio embedder (model.embed_audio.*, 1 tensor)"] {
        assert!(note.contains(part), "{part} in {note}");
    }
    assert_eq!(Checkpoint::open(&fixture("gemma4").join("model")).unwrap().untrained_note(), None);
}
