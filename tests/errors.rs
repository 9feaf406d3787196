//! User errors get one clear message naming the file, tensor or key.

mod common;

use common::fixture;
use ferrotune::backend::cpu::CpuBackend;
use ferrotune::model::Model;
use ferrotune::model::checkpoint::Checkpoint;
use std::path::Path;

/// Copy the llama fixture's model directory, letting `edit` change the
/// config.json and the tensors written to model.safetensors.
fn variant(
    dir: &Path,
    edit_config: impl FnOnce(&mut serde_json::Value),
    edit_tensors: impl FnOnce(&mut Vec<(String, Vec<usize>, Vec<u8>)>),
) {
    let src = fixture("llama").join("model");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    edit_config(&mut config);
    std::fs::write(dir.join("config.json"), serde_json::to_string(&config).unwrap()).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> =
        st.tensors().into_iter().map(|(n, t)| (n, t.shape().to_vec(), t.data().to_vec())).collect();
    edit_tensors(&mut tensors);
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, s, d)| (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d).unwrap()))
        .collect();
    std::fs::write(dir.join("model.safetensors"), safetensors::serialize(views, None).unwrap()).unwrap();
}

fn load_err(dir: &Path) -> String {
    let be = CpuBackend::new();
    let r = Checkpoint::open(dir).and_then(|c| Model::load(&be, &c).map(|_| ()));
    format!("{:#}", r.expect_err("loading should fail"))
}

#[test]
fn unknown_architecture_is_refused_before_weights_are_read() {
    let tmp = tempfile::tempdir().unwrap();
    variant(
        tmp.path(),
        |c| {
            c["architectures"] = serde_json::json!(["FalconForCausalLM"]);
            c["model_type"] = serde_json::json!("falcon");
        },
        |_| {},
    );
    // No weights at all: the refusal must come from config.json alone.
    std::fs::remove_file(tmp.path().join("model.safetensors")).unwrap();
    let msg = load_err(tmp.path());
    assert!(msg.contains("config.json"), "{msg}");
    assert!(msg.contains("unsupported model: architecture FalconForCausalLM"), "{msg}");
    assert!(msg.contains("LlamaForCausalLM") && msg.contains("MistralForCausalLM") && msg.contains("Qwen2ForCausalLM"), "{msg}");
    assert!(msg.contains("ferrotune models"), "{msg}");
}

#[test]
fn missing_tensor_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    variant(tmp.path(), |_| {}, |t| t.retain(|(n, _, _)| n != "model.layers.1.mlp.up_proj.weight"));
    let msg = load_err(tmp.path());
    assert!(msg.contains("tensor model.layers.1.mlp.up_proj.weight is missing"), "{msg}");
}

#[test]
fn misshaped_tensor_names_expected_and_found_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    // The config says the MLP is wider than the stored weights.
    variant(tmp.path(), |c| c["intermediate_size"] = serde_json::json!(96), |_| {});
    let msg = load_err(tmp.path());
    assert!(
        msg.contains("tensor model.layers.0.mlp.gate_proj.weight has shape [80, 32], expected [96, 32]"),
        "{msg}"
    );
}

#[test]
fn unsupported_rope_scaling_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    variant(tmp.path(), |c| c["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0}), |_| {});
    let msg = load_err(tmp.path());
    assert!(msg.contains("rope scaling \"yarn\" is not supported for llama models"), "{msg}");
}

#[test]
fn missing_config_key_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    variant(tmp.path(), |c| { c.as_object_mut().unwrap().remove("hidden_size"); }, |_| {});
    let msg = load_err(tmp.path());
    assert!(msg.contains("required key \"hidden_size\" is missing"), "{msg}");
}
