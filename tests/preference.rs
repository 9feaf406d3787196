//! Preference objectives and datasets against TRL 1.16 (fixtures written by
//! tests/fixtures/preference.py):
//! - train::objectives, given the per-sequence log-probs TRL's loss code
//!   consumed, reproduces TRL's loss and logged metrics, and its dL/dlogp
//!   equals torch autograd's, for every objective variant;
//! - data::preference gives the token ids TRL's tokenization of Axolotl's
//!   formatting gives, per format; bad rows give errors naming file:line and
//!   what was expected.

mod common;

use ferrotune::data::chat_template::ChatTemplate;
use ferrotune::data::preference::{PreferenceFormat, PreferenceReader, read_rows};
use ferrotune::data::tokenizer::TextTokenizer;
use ferrotune::train::objectives::{
    CpoConfig, CpoLoss, DpoConfig, DpoLoss, KtoConfig, KtoExample, Metrics, NllSum, OrpoConfig, PairLoss,
    PairLogps, PairObjective, PairRewards as RewardPair, RewardConfig, SeqLogps,
};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Relative tolerance against TRL. Its DPO and KTO losses run in float32 on
/// float32 log-probs (its fused LM head computes them so), and ORPO casts
/// its log-probs to float32: float64 on the same inputs differs by at most
/// 6.4e-7 relative (ORPO's rewards/margins, a difference of two float32
/// rewards 20 times its size), 7e-8 for every loss.
const REL_TOL: f64 = 1e-6;

/// Metrics TRL computes from the model's logits or token counts, not from
/// the per-sequence log-probs: the training loop logs them.
const MODEL_SIDE_METRICS: &[&str] = &["entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy"];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn read_json(name: &str) -> Value {
    let path = fixtures().join("preference").join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn close(got: f64, want: f64) -> bool {
    (got - want).abs() <= REL_TOL * want.abs().max(1e-3)
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("expected a number, found {v}"))
}

fn seq(v: &Value) -> SeqLogps {
    SeqLogps { policy: f(&v["policy"]), reference: f(&v["reference"]), tokens: v["tokens"].as_u64().unwrap() as usize }
}

/// A fixture variant's objective with its settings.
#[derive(Debug)]
enum Objective {
    Dpo(DpoConfig),
    Orpo(OrpoConfig),
    Cpo(CpoConfig),
    Kto(KtoConfig),
    Reward(RewardConfig),
}

impl Objective {
    /// The library's pairwise loss of this variant.
    fn pair(&self) -> &dyn PairObjective {
        match self {
            Objective::Dpo(c) => c,
            Objective::Orpo(c) => c,
            Objective::Cpo(c) => c,
            Objective::Kto(_) | Objective::Reward(_) => panic!("{self:?} is not a pairwise objective"),
        }
    }
}

impl PairObjective for Objective {
    fn loss(&self, pairs: &[PairLogps]) -> anyhow::Result<PairLoss> {
        self.pair().loss(pairs)
    }
    fn needs_reference(&self) -> bool {
        self.pair().needs_reference()
    }
    fn needs_nll(&self) -> bool {
        self.pair().needs_nll()
    }
    fn nll_whole_chosen(&self) -> bool {
        self.pair().nll_whole_chosen()
    }
}

fn objective(kind: &str, c: &Value) -> Objective {
    let num = |k: &str| f(&c[k]);
    match kind {
        "dpo" => Objective::Dpo(DpoConfig {
            loss_type: DpoLoss::parse(c["loss_type"].as_str().unwrap()).unwrap(),
            beta: num("beta"),
            label_smoothing: num("label_smoothing"),
        }),
        "orpo" => Objective::Orpo(OrpoConfig { beta: num("beta") }),
        "cpo" => Objective::Cpo(CpoConfig {
            loss_type: match c["loss_type"].as_str().unwrap() {
                "sigmoid" => CpoLoss::Sigmoid,
                "simpo" => CpoLoss::Simpo,
                other => panic!("no fixture variant uses CPO loss {other}"),
            },
            beta: num("beta"),
            label_smoothing: num("label_smoothing"),
            simpo_gamma: num("simpo_gamma"),
            cpo_alpha: num("cpo_alpha"),
        }),
        "kto" => Objective::Kto(KtoConfig {
            beta: num("beta"),
            desirable_weight: num("desirable_weight"),
            undesirable_weight: num("undesirable_weight"),
        }),
        "reward" => Objective::Reward(RewardConfig { center_rewards_coefficient: c["center_rewards_coefficient"].as_f64() }),
        other => panic!("unknown fixture kind {other}"),
    }
}

/// The loss, metrics and per-sequence derivatives (named as in the fixture's
/// "dlogp") objectives.rs gives for one variant's inputs.
fn evaluate(obj: &Objective, inputs: &[Value]) -> (f64, Metrics, BTreeMap<&'static str, Vec<f64>>) {
    let mut d = BTreeMap::new();
    match obj {
        Objective::Kto(cfg) => {
            let ex: Vec<KtoExample> = inputs
                .iter()
                .map(|e| KtoExample {
                    logps: seq(e),
                    desirable: e["desirable"].as_bool().unwrap(),
                    kl_policy: f(&e["kl_policy"]),
                    kl_reference: f(&e["kl_reference"]),
                })
                .collect();
            let out = cfg.loss(&ex).unwrap();
            d.insert("example", out.grads);
            (out.loss, out.metrics, d)
        }
        Objective::Reward(cfg) => {
            let pairs: Vec<RewardPair> = inputs
                .iter()
                .map(|p| RewardPair { chosen: f(&p["chosen"]), rejected: f(&p["rejected"]), margin: f(&p["margin"]) })
                .collect();
            let out = cfg.loss(&pairs).unwrap();
            d.insert("chosen", out.grads.iter().map(|g| g.chosen).collect());
            d.insert("rejected", out.grads.iter().map(|g| g.rejected).collect());
            (out.loss, out.metrics, d)
        }
        _ => {
            let pairs: Vec<PairLogps> = inputs
                .iter()
                .map(|p| PairLogps {
                    chosen: seq(&p["chosen"]),
                    rejected: seq(&p["rejected"]),
                    chosen_nll: (!p["chosen_nll"].is_null()).then(|| NllSum {
                        sum: f(&p["chosen_nll"]["sum"]),
                        tokens: p["chosen_nll"]["tokens"].as_u64().unwrap() as usize,
                    }),
                })
                .collect();
            let out = obj.pair().loss(&pairs).unwrap();
            d.insert("chosen", out.grads.iter().map(|g| g.chosen).collect());
            d.insert("rejected", out.grads.iter().map(|g| g.rejected).collect());
            d.insert("chosen_nll", out.grads.iter().map(|g| g.chosen_nll).collect());
            (out.loss, out.metrics, d)
        }
    }
}

#[test]
fn objectives_reproduce_trl_losses_metrics_and_derivatives() {
    let fx = read_json("objectives.json");
    let variants = fx["variants"].as_object().unwrap();
    assert!(variants.len() >= 14, "fixture has {} variants", variants.len());
    let (mut failures, mut unmatched) = (Vec::new(), Vec::new());
    let mut worst = 0.0f64;
    for (name, v) in variants {
        let obj = objective(v["kind"].as_str().unwrap(), &v["config"]);
        let (loss, metrics, d) = evaluate(&obj, v["inputs"].as_array().unwrap());
        let mut check = |what: String, got: f64, want: f64| {
            worst = worst.max((got - want).abs() / want.abs().max(1e-3));
            if !close(got, want) {
                failures.push(format!("{name}: {what}: got {got}, TRL {want}"));
            }
        };
        check("loss".into(), loss, f(&v["loss"]));
        let trl_metrics = v["metrics"].as_object().unwrap();
        for (k, got) in &metrics.0 {
            match trl_metrics.get(*k) {
                Some(want) => check(format!("metric {k}"), *got, f(want)),
                None => unmatched.push(format!("{name}: metric {k} is not one TRL logs")),
            }
        }
        for k in trl_metrics.keys() {
            if metrics.get(k).is_none() && !MODEL_SIDE_METRICS.contains(&k.as_str()) {
                unmatched.push(format!("{name}: TRL logs {k}, objectives.rs does not"));
            }
        }
        for (k, want) in v["dlogp"].as_object().unwrap() {
            let got = d.get(k.as_str()).unwrap_or_else(|| panic!("{name}: no derivative {k}"));
            let want = want.as_array().unwrap();
            assert_eq!(got.len(), want.len(), "{name}: {k}");
            for (i, (g, w)) in got.iter().zip(want).enumerate() {
                check(format!("dL/dlogp {k}[{i}]"), *g, f(w));
            }
        }
    }
    eprintln!("worst relative difference from TRL over all variants: {worst:.2e}");
    failures.extend(unmatched);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn tokenizer(which: &str) -> TextTokenizer {
    let dir = match which {
        "llama" => fixtures().join("llama/model"),
        "chat" => fixtures().join("chat_templates/tokenizer"),
        other => panic!("unknown tokenizer {other}"),
    };
    TextTokenizer::load(&dir, &BTreeMap::new()).unwrap()
}

fn template(name: Option<&str>, tok: &TextTokenizer) -> Option<ChatTemplate> {
    name.map(|n| {
        let mut t = ChatTemplate::resolve(Some(n), None, tok.dir()).unwrap();
        t.set_tokens(tok.special_tokens().clone());
        t
    })
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn formats_give_the_ids_trl_gives_after_axolotl_formatting() {
    let fx = read_json("formats.json");
    let cases = fx["cases"].as_array().unwrap();
    assert!(cases.len() >= 20);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let tok = tokenizer(case["tokenizer"].as_str().unwrap());
        let tmpl = template(case["chat_template"].as_str(), &tok);
        let kind = case["type"].as_str();
        let format = match kind {
            Some("kto" | "reward") => PreferenceFormat::Standard,
            k => PreferenceFormat::parse(k).unwrap(),
        };
        let reader = PreferenceReader { format, tokenizer: &tok, template: tmpl.as_ref(), fields: Default::default() };
        for (i, (row, want)) in case["rows"].as_array().unwrap().iter().zip(case["expected"].as_array().unwrap()).enumerate() {
            let loc = format!("{name}[{i}]");
            match kind {
                Some("kto") => {
                    let got = reader.kto(row, &loc).unwrap();
                    assert_eq!(got.prompt, ids(&want["prompt"]), "{loc} prompt");
                    assert_eq!(got.completion, ids(&want["completion"]), "{loc} completion");
                    assert_eq!(got.desirable, want["label"].as_bool().unwrap(), "{loc} label");
                }
                Some("reward") => {
                    let got = reader.reward(row, &loc).unwrap();
                    assert_eq!(got.chosen, ids(&want["chosen"]), "{loc} chosen");
                    assert_eq!(got.rejected, ids(&want["rejected"]), "{loc} rejected");
                    assert_eq!(got.margin, want["margin"].as_f64(), "{loc} margin");
                }
                _ => {
                    let got = reader.pair(row, &loc).unwrap_or_else(|e| panic!("{e:#}"));
                    assert_eq!(got.prompt, ids(&want["prompt"]), "{loc} prompt");
                    assert_eq!(got.chosen, ids(&want["chosen"]), "{loc} chosen");
                    assert_eq!(got.rejected, ids(&want["rejected"]), "{loc} rejected");
                }
            }
        }
    }
}

fn pair_error(kind: Option<&str>, template: Option<&str>, row: Value) -> String {
    let tok = tokenizer("chat");
    let tmpl = self::template(template, &tok);
    let reader = PreferenceReader {
        format: PreferenceFormat::parse(kind).unwrap(),
        tokenizer: &tok,
        template: tmpl.as_ref(),
        fields: Default::default(),
    };
    format!("{:#}", reader.pair(&row, "d.jsonl:4").unwrap_err())
}

#[test]
fn bad_rows_say_where_and_what_was_expected() {
    let e = pair_error(Some("chatml.intel"), None, json!({"question": "q", "chosen": ["a"], "rejected": "b"}));
    assert!(e.starts_with("d.jsonl:4: \"chosen\" must be a string, found a list"), "{e}");
    let e = pair_error(Some("chatml.ultra"), None, json!({"prompt": "q", "chosen": "a", "rejected": "b"}));
    assert!(e.contains("d.jsonl:4: \"chosen\" must be a list of messages, found a string"), "{e}");
    let e = pair_error(Some("chatml.ultra"), None, json!({"prompt": "q", "chosen": [{"role": "user", "content": "q"}], "rejected": []}));
    assert!(e.contains("\"chosen\" has 1 message(s); its message 1 is the one used"), "{e}");
    let e = pair_error(Some("llama3.intel"), None, json!({"prompt": "q", "chosen": "a", "rejected": "b"}));
    assert!(e.contains("missing \"question\"") && e.contains("{system?, question, chosen, rejected}"), "{e}");
    let e = pair_error(Some("chatml.prompt_pairs"), None, json!({"system": ["s"], "prompt": "q", "chosen": "a", "rejected": "b"}));
    assert!(e.contains("\"system\" must be a string, found a list"), "{e}");
    let e = pair_error(None, None, json!({"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}));
    assert!(e.contains("must all be strings or all lists of messages"), "{e}");
    let e = pair_error(None, None, json!({"prompt": [{"role": "user", "content": "q"}], "chosen": [], "rejected": []}));
    assert!(e.contains("need a chat template"), "{e}");
    let e = pair_error(None, Some("chatml"), json!({"prompt": [{"role": "bot", "content": "q"}], "chosen": [], "rejected": []}));
    assert!(e.contains("\"prompt\"[0]: unknown role \"bot\""), "{e}");
    let e = pair_error(None, None, json!({"prompt": 3, "chosen": "a", "rejected": "b"}));
    assert!(e.contains("\"prompt\" must be a string or a list of messages, found a number"), "{e}");
    let e = pair_error(Some("chat_template.default"), Some("chatml"), json!({"messages": [{"role": "user", "content": "q"}], "chosen": 5, "rejected": "b"}));
    assert!(e.contains("\"chosen\" must be a message {role, content}, found a number"), "{e}");
    let e = pair_error(Some("chat_template.default"), Some("llama3"), json!({"messages": "q", "chosen": " a ", "rejected": "b"}));
    assert!(e.contains("the content of \"chosen\" does not appear in what the chat template (built-in llama3) renders"), "{e}");
    let e = pair_error(None, None, json!(["not", "an", "object"]));
    assert!(e.contains("expected a JSON object"), "{e}");

    let tok = tokenizer("llama");
    let reader = PreferenceReader { format: PreferenceFormat::Standard, tokenizer: &tok, template: None, fields: Default::default() };
    let e = format!("{:#}", reader.kto(&json!({"prompt": "p", "completion": "c", "label": "yes"}), "k.jsonl:2").unwrap_err());
    assert!(e.contains("k.jsonl:2: \"label\" must be true (desirable) or false (undesirable), found a string"), "{e}");
    let e = format!("{:#}", reader.reward(&json!({"chosen": "a", "rejected": "b", "margin": "big"}), "r.jsonl:9").unwrap_err());
    assert!(e.contains("r.jsonl:9: \"margin\" must be a number, found a string"), "{e}");
}

#[test]
fn files_are_read_row_by_row_with_their_line_numbers() {
    let dir = std::env::temp_dir().join(format!("ferrotune-preference-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let tok = tokenizer("llama");
    let reader = PreferenceReader { format: PreferenceFormat::Standard, tokenizer: &tok, template: None, fields: Default::default() };
    let good = r#"{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}"#;
    let path = dir.join("pairs.jsonl");
    std::fs::write(&path, format!("{good}\n\n{good}\n")).unwrap();
    let pairs = read_rows(&path, |row, loc| reader.pair(row, loc)).unwrap();
    assert_eq!(pairs.len(), 2);
    let want = read_json("formats.json")["cases"][0]["expected"][0].clone();
    assert_eq!(pairs[1].chosen, ids(&want["chosen"]));

    std::fs::write(&path, format!("{good}\n{good}\n{{\"prompt\": \"p\", \"chosen\": \"c\"}}\n")).unwrap();
    let e = format!("{:#}", read_rows(&path, |row, loc| reader.pair(row, loc)).unwrap_err());
    assert!(e.contains(&format!("{}:3: missing \"rejected\"", path.display())), "{e}");
    std::fs::write(&path, format!("{good}\n{{\"prompt\": \n")).unwrap();
    let e = format!("{:#}", read_rows(&path, |row, loc| reader.pair(row, loc)).unwrap_err());
    assert!(e.contains(&format!("{}:2: malformed JSON", path.display())), "{e}");

    let json_path = dir.join("pairs.json");
    std::fs::write(&json_path, format!("[\n{good},\n{{\"prompt\": \"p\", \"chosen\": 1, \"rejected\": \"r\"}}\n]")).unwrap();
    let e = format!("{:#}", read_rows(&json_path, |row, loc| reader.pair(row, loc)).unwrap_err());
    assert!(e.contains(&format!("{}:3: \"chosen\" must be a string or a list of messages, found a number", json_path.display())), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Every LoRA gradient of `model` against the fixture's `<variant>.<key>`
/// tensors (1e-4 relative each); returns the worst relative error.
fn worst_grad_error(
    be: &ferrotune::backend::cpu::CpuBackend,
    model: &ferrotune::model::Model<ferrotune::backend::cpu::CpuBackend>,
    st: &safetensors::SafeTensors,
    name: &str,
) -> f64 {
    use ferrotune::backend::Backend;
    let mut worst = 0f64;
    for (li, p, l) in model.loras() {
        let module = ferrotune::model::module_path(&model.cfg, li, p);
        for (which, g) in [("lora_A", &l.grad_a), ("lora_B", &l.grad_b)] {
            let key = format!("{name}.base_model.model.{module}.{which}.weight");
            let t = st.tensor(&key).unwrap_or_else(|_| panic!("{key} missing from the fixture"));
            let want: Vec<f32> = t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            let got = be.download(g);
            let rel = common::rel_err_guarded(&got, &want);
            worst = worst.max(rel);
            assert!(rel <= 1e-4, "{name}: {key} gradient differs from TRL's by {rel:.2e} (relative)");
        }
    }
    worst
}

/// The whole chain on the model: pairs through `train::preference` (chosen
/// and rejected in one batch, the reference from the same model with its
/// adapter off, per-token weights from dL/dlogp) give the LoRA gradients
/// torch autograd gives through TRL's loss on transformers + PEFT (float64
/// there, f32 here: 1e-4 relative).
#[test]
fn objectives_give_the_lora_gradients_of_trl_through_the_model() {
    use ferrotune::adapter::peft;
    use ferrotune::backend::cpu::CpuBackend;
    use ferrotune::data::preference::PreferencePair;
    use ferrotune::model::Model;
    use ferrotune::model::checkpoint::Checkpoint;
    use ferrotune::model::graph::BackwardOpts;
    use ferrotune::train::objectives::pairs::pair_forward_backward;

    let doc = read_json("objectives.json");
    let pairs: Vec<PreferencePair> = doc["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| PreferencePair { prompt: ids(&p["prompt"]), chosen: ids(&p["chosen_ids"]), rejected: ids(&p["rejected_ids"]) })
        .collect();
    let refs: Vec<&PreferencePair> = pairs.iter().collect();
    let bytes = std::fs::read(fixtures().join("preference/grads.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let be = CpuBackend::new();
    let opts = BackwardOpts { grad_scale: 0.0, gradient_checkpointing: false, dropout_seed: None };
    let mut checked = 0;
    for (name, v) in doc["variants"].as_object().unwrap() {
        let kind = v["kind"].as_str().unwrap();
        if kind == "kto" || kind == "reward" {
            continue; // not pairwise log-prob objectives
        }
        let obj = objective(kind, &v["config"]);
        let mut model = Model::load(&be, &Checkpoint::open(&fixtures().join("llama/model")).unwrap()).unwrap();
        peft::load(&be, &mut model, &fixtures().join("preference/adapter")).unwrap();
        model.zero_grad(&be);
        let (loss, _) = pair_forward_backward(&be, &mut model, &obj, &refs, 1.0, opts, None).unwrap();
        let want_loss = f(&v["loss"]);
        assert!((loss.loss - want_loss).abs() <= 1e-5 * want_loss.abs().max(1e-3), "{name}: loss {} vs TRL {want_loss}", loss.loss);
        let worst = worst_grad_error(&be, &model, &st, name);
        eprintln!("{name}: loss {:.8} (TRL {want_loss:.8}), worst LoRA gradient rel err {worst:.2e}", loss.loss);
        checked += 1;
    }
    assert_eq!(checked, 10, "every pairwise variant is checked");

    // KTO: the examples, their mismatched KL pairs (no gradient), the same chain.
    use ferrotune::data::preference::KtoExample as KtoIds;
    use ferrotune::train::objectives::kto::kto_forward_backward;
    let exs: Vec<KtoIds> = doc["kto_examples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| KtoIds { prompt: ids(&e["prompt"]), completion: ids(&e["completion"]), desirable: e["label"].as_bool().unwrap() })
        .collect();
    let refs: Vec<&KtoIds> = exs.iter().collect();
    for name in ["kto", "kto_weighted"] {
        let v = &doc["variants"][name];
        let Objective::Kto(cfg) = objective("kto", &v["config"]) else { unreachable!() };
        let mut model = Model::load(&be, &Checkpoint::open(&fixtures().join("llama/model")).unwrap()).unwrap();
        peft::load(&be, &mut model, &fixtures().join("preference/adapter")).unwrap();
        model.zero_grad(&be);
        let (loss, _) = kto_forward_backward(&be, &mut model, &cfg, &refs, 1.0, opts).unwrap();
        let want_loss = f(&v["loss"]);
        assert!((loss.loss - want_loss).abs() <= 1e-5 * want_loss.abs().max(1e-3), "{name}: loss {} vs TRL {want_loss}", loss.loss);
        let worst = worst_grad_error(&be, &model, &st, name);
        eprintln!("{name}: loss {:.8} (TRL {want_loss:.8}), worst LoRA gradient rel err {worst:.2e}", loss.loss);
    }
}
