//! PEFT-format adapters: adapter_config.json + adapter_model.safetensors,
//! with keys "base_model.model.<module path>.lora_A.weight" [r, in] and
//! ".lora_B.weight" [out, r], as `PeftModel.save_pretrained` writes them.
//! A reward model's adapter (PEFT task_type "SEQ_CLS") also holds the
//! sequence-classification head, trained in full as a module to save:
//! "base_model.model.score.weight" [1, hidden].

use super::{Lora, LoraConfig, Targets};
use crate::backend::{Backend, DType};
use crate::model::{Model, Proj, module_path};
use anyhow::{Context, Result, bail};
use safetensors::SafeTensors;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashSet};
use std::path::Path;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// The key of the score head in a SEQ_CLS adapter file.
pub const SCORE_KEY: &str = "base_model.model.score.weight";

/// modules_to_save as `PeftModel.save_pretrained` writes it for a
/// sequence-classification model given modules_to_save ["score"]:
/// PeftModelForSequenceClassification appends its classifier names
/// ["classifier", "score"] to the user's list before saving.
const SEQ_CLS_MODULES_TO_SAVE: [&str; 3] = ["score", "classifier", "score"];

fn key(module: &str, which: &str) -> String {
    format!("base_model.model.{module}.{which}.weight")
}

/// Parse adapter_config.json, refusing what ferrotune cannot reproduce.
pub fn read_config(dir: &Path) -> Result<LoraConfig> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {} (is {} a PEFT adapter directory?)", path.display(), dir.display()))?;
    let v: Value = serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
    let file = path.display();
    let peft_type = v.get("peft_type").and_then(|x| x.as_str()).unwrap_or("LORA");
    if peft_type != "LORA" {
        bail!("{file}: peft_type is \"{peft_type}\"; ferrotune loads LORA adapters only");
    }
    if v.get("use_dora").and_then(|x| x.as_bool()).unwrap_or(false) {
        bail!("{file}: use_dora is true; DoRA adapters are not supported yet");
    }
    if v.get("fan_in_fan_out").and_then(|x| x.as_bool()).unwrap_or(false) {
        bail!("{file}: fan_in_fan_out is true; that layout is for GPT-2 style Conv1D layers, not supported");
    }
    match v.get("bias").and_then(|x| x.as_str()).unwrap_or("none") {
        "none" => {}
        other => bail!("{file}: bias is \"{other}\"; only \"none\" is supported"),
    }
    if let Some(m) = v.get("modules_to_save").filter(|m| !m.is_null()) {
        // The sequence-classification head (PEFT lists it as "score" and
        // adds "classifier" itself) is the one module to save ferrotune
        // trains; its tensor is read by `load_reward`.
        let head_only = m.as_array().is_some_and(|a| a.iter().all(|x| matches!(x.as_str(), Some("score" | "classifier"))));
        if !head_only {
            bail!("{file}: modules_to_save {m} is not supported; only the reward head [\"score\"] is");
        }
    }
    let r = v.get("r").and_then(|x| x.as_u64()).with_context(|| format!("{file}: \"r\" must be a positive integer"))? as usize;
    let alpha = v.get("lora_alpha").and_then(|x| x.as_f64()).unwrap_or(8.0) as f32;
    let targets = match v.get("target_modules") {
        Some(Value::String(s)) if s == "all-linear" => Targets::AllLinear,
        Some(Value::String(s)) => Targets::Regex(s.clone()),
        Some(Value::Array(a)) => Targets::Names(a.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect()),
        _ => bail!("{file}: \"target_modules\" must be a list of module names or a regex string"),
    };
    let mut rank_pattern = BTreeMap::new();
    if let Some(obj) = v.get("rank_pattern").and_then(|x| x.as_object()) {
        for (k, x) in obj {
            rank_pattern.insert(k.clone(), x.as_u64().with_context(|| format!("{file}: rank_pattern.{k} must be an integer"))? as usize);
        }
    }
    let mut alpha_pattern = BTreeMap::new();
    if let Some(obj) = v.get("alpha_pattern").and_then(|x| x.as_object()) {
        for (k, x) in obj {
            alpha_pattern.insert(k.clone(), x.as_f64().with_context(|| format!("{file}: alpha_pattern.{k} must be a number"))? as f32);
        }
    }
    Ok(LoraConfig {
        r,
        alpha,
        dropout: v.get("lora_dropout").and_then(|x| x.as_f64()).unwrap_or(0.0) as f32,
        targets,
        use_rslora: v.get("use_rslora").and_then(|x| x.as_bool()).unwrap_or(false),
        rank_pattern,
        alpha_pattern,
        base_model_name_or_path: v.get("base_model_name_or_path").and_then(|x| x.as_str()).map(str::to_owned),
    })
}

fn tensor_f32(st: &SafeTensors, name: &str, expected: &[usize], file: &Path) -> Result<Vec<f32>> {
    let t = st.tensor(name).map_err(|_| anyhow::anyhow!("{}: tensor {name} is missing", file.display()))?;
    if t.shape() != expected {
        bail!("{}: tensor {name} has shape {:?}, expected {:?}", file.display(), t.shape(), expected);
    }
    let dtype = match t.dtype() {
        safetensors::Dtype::F32 => DType::F32,
        safetensors::Dtype::F16 => DType::F16,
        safetensors::Dtype::BF16 => DType::BF16,
        other => bail!("{}: tensor {name} has dtype {other:?}; expected F32, F16 or BF16", file.display()),
    };
    Ok(crate::backend::to_f32(dtype, t.data()))
}

/// Load a PEFT LoRA adapter into the model. Every LoRA tensor in the file
/// must belong to a projection of the model; the modules adapted are those
/// whose tensors are present. Returns the number of adapted modules. A
/// reward model's adapter (with a score head) is refused: see `load_reward`.
pub fn load<B: Backend>(be: &B, model: &mut Model<B>, dir: &Path) -> Result<usize> {
    let (count, score) = load_with_head(be, model, dir)?;
    if score.is_some() {
        bail!(
            "{}: this is a reward-model adapter (it holds the sequence-classification head {SCORE_KEY}); \
             it scores sequences and cannot be used as a language-model adapter",
            dir.join(WEIGHTS_FILE).display()
        );
    }
    Ok(count)
}

/// Whether `dir` holds a reward model's adapter (task_type SEQ_CLS, with
/// its score head).
pub fn is_reward_adapter(dir: &Path) -> Result<bool> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {} (is {} a PEFT adapter directory?)", path.display(), dir.display()))?;
    let v: Value = serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
    Ok(v.get("task_type").and_then(|t| t.as_str()) == Some("SEQ_CLS"))
}

/// Load a reward model's PEFT adapter (task_type SEQ_CLS, modules_to_save
/// ["score"]): the LoRA tensors into the model, and the score head's
/// weight [1, hidden], returned with the number of adapted modules.
pub fn load_reward<B: Backend>(be: &B, model: &mut Model<B>, dir: &Path) -> Result<(usize, Vec<f32>)> {
    let (count, score) = load_with_head(be, model, dir)?;
    let score = score.with_context(|| {
        format!("{}: tensor {SCORE_KEY} is missing (a reward adapter saves the score head as a module to save)", dir.join(WEIGHTS_FILE).display())
    })?;
    Ok((count, score))
}

/// The LoRA tensors into the model, and the score head when the file has one.
fn load_with_head<B: Backend>(be: &B, model: &mut Model<B>, dir: &Path) -> Result<(usize, Option<Vec<f32>>)> {
    let lc = read_config(dir)?;
    let file = dir.join(WEIGHTS_FILE);
    if !file.is_file() {
        if dir.join("adapter_model.bin").is_file() {
            bail!("{}: only adapter_model.bin found; ferrotune reads safetensors adapters (re-save with safe_serialization=True)", dir.display());
        }
        bail!("{}: {WEIGHTS_FILE} not found", dir.display());
    }
    let bytes = std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| anyhow::anyhow!("{} is not a valid safetensors file: {e}", file.display()))?;
    let mut used = HashSet::new();
    let mut count = 0;
    for li in 0..model.layers.len() {
        for &p in Proj::of_layer(&model.cfg, li) {
            let module = module_path(&model.cfg, li, p);
            let (ka, kb) = (key(&module, "lora_A"), key(&module, "lora_B"));
            let Some(shape_a) = st.tensor(&ka).ok().map(|t| t.shape().to_vec()) else {
                if st.tensor(&kb).is_ok() {
                    bail!("{}: {kb} is present but {ka} is missing", file.display());
                }
                continue;
            };
            let lin = model.layers[li].p_mut(p);
            let (r, scale) = lc.rank_and_scale(&module)?;
            if shape_a != [r, lin.in_f] {
                bail!("{}: tensor {ka} has shape {shape_a:?}, expected [{r}, {}] (rank from adapter_config.json)", file.display(), lin.in_f);
            }
            let a = tensor_f32(&st, &ka, &[r, lin.in_f], &file)?;
            let b = tensor_f32(&st, &kb, &[lin.out_f, r], &file)?;
            lin.lora = Some(Lora::from_host(be, &a, &b, r, scale, lc.dropout));
            used.insert(ka);
            used.insert(kb);
            count += 1;
        }
    }
    let score = if st.tensor(SCORE_KEY).is_ok() {
        used.insert(SCORE_KEY.to_string());
        Some(tensor_f32(&st, SCORE_KEY, &[1, model.cfg.hidden], &file)?)
    } else {
        None
    };
    let mut unknown: Vec<String> = st.names().into_iter().filter(|n| !used.contains(*n)).map(|n| n.to_string()).collect();
    unknown.sort();
    if !unknown.is_empty() {
        bail!(
            "{}: {} tensor(s) match no module of this model, e.g. {} (model modules look like base_model.model.{}.lora_A.weight)",
            file.display(),
            unknown.len(),
            unknown[0],
            module_path(&model.cfg, 0, Proj::of(&model.cfg)[0])
        );
    }
    if count == 0 {
        bail!("{}: no LoRA tensors found", file.display());
    }
    Ok((count, score))
}

/// Write the model's adapters as PEFT does, atomically (temp files renamed
/// into place).
pub fn save<B: Backend>(be: &B, model: &Model<B>, lc: &LoraConfig, dir: &Path) -> Result<()> {
    save_with_head(be, model, lc, None, dir)
}

/// Write a reward model's adapter as PEFT does for task_type SEQ_CLS with
/// modules_to_save ["score"]: the LoRA tensors plus the score head's
/// weight (`score`, [1, hidden] row-major) under `SCORE_KEY`.
pub fn save_reward<B: Backend>(be: &B, model: &Model<B>, lc: &LoraConfig, score: &[f32], dir: &Path) -> Result<()> {
    if score.len() != model.cfg.hidden {
        bail!("the score head has {} values; the model's hidden size is {}", score.len(), model.cfg.hidden);
    }
    save_with_head(be, model, lc, Some(score), dir)
}

fn save_with_head<B: Backend>(be: &B, model: &Model<B>, lc: &LoraConfig, score: Option<&[f32]>, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut modules = BTreeMap::new();
    for (li, p, l) in model.loras() {
        let module = module_path(&model.cfg, li, p);
        let lin = model.layers[li].p(p);
        let a = be.download(&l.a);
        let b = be.download(&l.b);
        tensors.push((key(&module, "lora_A"), vec![l.r, lin.in_f], bytemuck::cast_slice(&a).to_vec()));
        tensors.push((key(&module, "lora_B"), vec![lin.out_f, l.r], bytemuck::cast_slice(&b).to_vec()));
        modules.insert(p.path(&model.cfg).rsplit('.').next().unwrap_or_default().to_string(), ());
    }
    if let Some(w) = score {
        tensors.push((SCORE_KEY.to_string(), vec![1, w.len()], bytemuck::cast_slice(w).to_vec()));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(k, s, d)| Ok((k.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d)?)))
        .collect::<Result<_, safetensors::SafeTensorError>>()
        .map_err(|e| anyhow::anyhow!("cannot serialise adapter: {e}"))?;
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let data = safetensors::serialize(views, Some(meta)).map_err(|e| anyhow::anyhow!("cannot serialise adapter: {e}"))?;
    crate::util::atomic_write(&dir.join(WEIGHTS_FILE), &data)?;

    let target_modules: Value = match &lc.targets {
        Targets::Names(_) | Targets::AllLinear => json!(modules.keys().collect::<Vec<_>>()),
        Targets::Regex(re) => json!(re),
    };
    let config = json!({
        "alpha_pattern": lc.alpha_pattern,
        "auto_mapping": null,
        "base_model_name_or_path": lc.base_model_name_or_path,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layers_pattern": null,
        "layers_to_transform": null,
        "lora_alpha": lc.alpha,
        "lora_dropout": lc.dropout,
        "modules_to_save": score.map(|_| SEQ_CLS_MODULES_TO_SAVE),
        "peft_type": "LORA",
        "r": lc.r,
        "rank_pattern": lc.rank_pattern,
        "revision": null,
        "target_modules": target_modules,
        "task_type": if score.is_some() { "SEQ_CLS" } else { "CAUSAL_LM" },
        "use_dora": false,
        "use_rslora": lc.use_rslora,
    });
    crate::util::atomic_write(&dir.join(CONFIG_FILE), serde_json::to_string_pretty(&config)?.as_bytes())?;
    Ok(())
}
