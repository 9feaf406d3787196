//! GRPO reward functions end to end through the Python worker: a reward
//! module written to a temp folder (the config's folder), two functions
//! with dataset columns as kwargs, None, NaN and infinities, dotted modules,
//! async functions, user prints, every error case (each one line naming the
//! function and the step), and a parity check against TRL's own
//! GRPOTrainer reward call where TRL is installed. They need only a plain
//! `python3` (FERROTUNE_PYTHON overrides it) and skip, saying so, without one.

mod common;

use ferrotune::train::rewards::{RewardFuncs, Scored};
use serde_json::{Map, Value, json};
use std::path::{Path, PathBuf};

/// The Python to test with: the worker needs only the standard library.
fn python() -> Option<PathBuf> {
    let p = common::python_with(&["json", "asyncio"]);
    if p.is_none() {
        eprintln!("skipped: no python3 (set FERROTUNE_PYTHON)");
    }
    p
}

/// One completion with what TRL passes beside it.
struct Row {
    prompt: Value,
    completion: Value,
    ids: Vec<u32>,
    columns: Map<String, Value>,
}

fn row(prompt: Value, completion: Value, ids: &[u32], columns: Value) -> Row {
    Row { prompt, completion, ids: ids.to_vec(), columns: columns.as_object().unwrap().clone() }
}

fn scored(rows: &[Row]) -> Vec<Scored<'_>> {
    rows.iter().map(|r| Scored { prompt: &r.prompt, completion: &r.completion, completion_ids: &r.ids, columns: &r.columns }).collect()
}

/// Two GSM8K-style prompts, two completions each (TRL repeats the row's
/// columns for each completion).
fn gsm8k_rows() -> Vec<Row> {
    vec![
        row(json!("2+3?"), json!("#### 5"), &[7, 8], json!({"answer": "#### 5", "level": 1})),
        row(json!("2+3?"), json!("it is 6"), &[7, 9, 9], json!({"answer": "#### 5", "level": 1})),
        row(json!("10*10?"), json!("\\boxed{100}"), &[], json!({"answer": "#### 100", "level": 2})),
        row(json!("10*10?"), json!("1,000"), &[4], json!({"answer": "#### 100", "level": 2})),
    ]
}

const MODULE: &str = r##"
import asyncio, functools, os, sys

def correct(prompts, completions, completion_ids, answer, level, trainer_state, **kwargs):
    kwargs["log_extra"]("note", ["x"] * len(prompts))
    kwargs["log_metric"]("seen", 1.0)
    return [float(a.split("#" * 4)[-1].strip() in c) + level_i / 10 for c, a, level_i in zip(completions, answer, level)]

def tokens_or_none(prompts, completions, completion_ids, **kwargs):
    print("(reward test) a print to stdout goes to stderr, not into the worker's replies")
    os.write(1, b"(reward test) so does a write to fd 1\n")
    return [None if len(ids) == 0 else len(ids) for ids in completion_ids]

def state(prompts, completions, completion_ids, trainer_state, **kwargs):
    return [trainer_state.global_step * 1000 + trainer_state.max_steps] * len(prompts)

def kwarg_names(prompts, completions, completion_ids, **kwargs):
    return [float(len(kwargs))] * len(prompts)

def specials(prompts, completions, completion_ids, **kwargs):
    return [float("nan"), float("inf"), -float("inf"), 0.1][: len(prompts)]

def flags(prompts, completions, completion_ids, **kwargs):
    return [True, False, 2, 0.5][: len(prompts)]

async def judge(prompts, completions, completion_ids, **kwargs):
    await asyncio.sleep(0)
    return [len(c) for c in completions]

def _scaled(prompts, completions, completion_ids, scale, **kwargs):
    return [scale * len(ids) for ids in completion_ids]

scaled = functools.partial(_scaled, scale=0.5)

def raises(prompts, completions, completion_ids, **kwargs):
    return [1 / 0 for _ in prompts]

def short(prompts, completions, completion_ids, **kwargs):
    return [1.0]

def text(prompts, completions, completion_ids, **kwargs):
    return [1.0, "good", 0.0, 0.0]

def nothing(prompts, completions, completion_ids, **kwargs):
    return None

def dies(prompts, completions, completion_ids, **kwargs):
    import os
    os._exit(3)

def exits(prompts, completions, completion_ids, **kwargs):
    sys.exit(4)

not_a_function = 3
"##;

/// A config folder holding `rewards_mod.py`, a package `pkg.scores`, and
/// modules that fail to import.
fn config_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rewards_mod.py"), MODULE).unwrap();
    std::fs::create_dir(dir.path().join("pkg")).unwrap();
    std::fs::write(dir.path().join("pkg/__init__.py"), "").unwrap();
    std::fs::write(dir.path().join("pkg/scores.py"), "def first_id(prompts, completions, completion_ids, **kw):\n    return [ids[0] if ids else None for ids in completion_ids]\n").unwrap();
    std::fs::write(dir.path().join("broken.py"), "x = 1\ndef f(:\n").unwrap();
    std::fs::write(dir.path().join("needs_dep.py"), "import surely_not_installed_dep\n").unwrap();
    std::fs::write(dir.path().join("raises_on_import.py"), "raise RuntimeError('no GPU here')\n").unwrap();
    dir
}

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn start(python: &Path, dir: &Path, funcs: &[&str]) -> anyhow::Result<RewardFuncs> {
    RewardFuncs::with_python(&names(funcs), dir, python)
}

/// The error of a call, checked to be one line.
fn one_line(e: anyhow::Error) -> String {
    let text = e.to_string();
    assert!(!text.contains('\n') && e.chain().count() == 1, "one line expected: {e:?}");
    text
}

#[test]
fn two_functions_with_columns_and_none() {
    let Some(py) = python() else { return };
    let dir = config_dir();
    let mut funcs = start(&py, dir.path(), &["rewards_mod.correct", "rewards_mod.tokens_or_none"]).unwrap();
    assert_eq!(funcs.names(), ["correct", "tokens_or_none"]);
    let rows = gsm8k_rows();
    let got = funcs.score(1, &scored(&rows)).unwrap();
    // correct: the reference number appears in the completion, plus level/10.
    assert_eq!(got[0], [Some(1.1), Some(0.1), Some(1.2), Some(0.2)]);
    assert_eq!(got[1], [Some(2.0), Some(3.0), None, Some(1.0)]);
    // The worker keeps answering, step after step.
    assert_eq!(funcs.score(2, &scored(&rows[..2])).unwrap()[1], [Some(2.0), Some(3.0)]);
}

#[test]
fn trainer_state_kwargs_and_special_values() {
    let Some(py) = python() else { return };
    let dir = config_dir();
    let list = ["rewards_mod.state", "rewards_mod.kwarg_names", "rewards_mod.specials", "rewards_mod.flags"];
    let mut funcs = start(&py, dir.path(), &list).unwrap();
    funcs.set_max_steps(50);
    let got = funcs.score(7, &scored(&gsm8k_rows())).unwrap();
    // global_step counts finished steps: TRL scores step 7 with 6 done.
    assert_eq!(got[0], [Some(6050.0); 4]);
    // answer, level, trainer_state, log_extra, log_metric.
    assert_eq!(got[1], [Some(5.0); 4]);
    assert!(got[2][0].unwrap().is_nan());
    assert_eq!(got[2][1..], [Some(f64::INFINITY), Some(f64::NEG_INFINITY), Some(0.1)]);
    assert_eq!(got[3], [Some(1.0), Some(0.0), Some(2.0), Some(0.5)]);
}

#[test]
fn dotted_modules_partials_async_and_builtins_together() {
    let Some(py) = python() else { return };
    let dir = config_dir();
    let list = ["builtin:answer_match", "pkg.scores.first_id", "rewards_mod.scaled", "builtin:length:2", "rewards_mod.judge", "builtin:length:1"];
    let mut funcs = start(&py, dir.path(), &list).unwrap();
    assert_eq!(funcs.names(), ["answer_match", "first_id", "_scaled", "length", "judge", "length_2"]);
    let got = funcs.score(1, &scored(&gsm8k_rows())).unwrap();
    assert_eq!(got[0], [Some(1.0), Some(0.0), Some(1.0), Some(0.0)]);
    assert_eq!(got[1], [Some(7.0), Some(7.0), None, Some(4.0)]);
    assert_eq!(got[2], [Some(1.0), Some(1.5), Some(0.0), Some(0.5)]);
    assert_eq!(got[3], [Some(0.0), Some(-0.5), Some(0.0), Some(0.0)]);
    assert_eq!(got[4], [Some(6.0), Some(7.0), Some(11.0), Some(5.0)]);
    assert_eq!(got[5], [Some(-1.0), Some(-2.0), Some(0.0), Some(0.0)]);
    // TRL's combination: weights, None and NaN adding nothing.
    let total = funcs.weighted_sum(&got, Some(&[1.0, 0.0, 2.0, 1.0, 0.0, 1.0])).unwrap();
    assert_eq!(total, [2.0, 0.5, 1.0, 1.0]);
    let short = one_line(funcs.weighted_sum(&got, Some(&[1.0])).unwrap_err());
    assert_eq!(short, "trl.reward_weights has 1 entries but trl.reward_funcs has 6: give one weight per reward function");
}

#[test]
fn conversational_prompts_reach_python_as_messages() {
    let Some(py) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let module = "def roles(prompts, completions, completion_ids, **kw):\n    return [len(p) * 10 + (c[0]['role'] == 'assistant') for p, c in zip(prompts, completions)]\n";
    std::fs::write(dir.path().join("chat_rewards.py"), module).unwrap();
    let mut funcs = start(&py, dir.path(), &["chat_rewards.roles", "builtin:answer_match:solution"]).unwrap();
    let prompt = json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]);
    let rows = [
        row(prompt.clone(), json!([{"role": "assistant", "content": "\\boxed{4}"}]), &[1], json!({"solution": "4"})),
        row(prompt, json!([{"role": "assistant", "content": "five"}]), &[1], json!({"solution": "4"})),
    ];
    let got = funcs.score(1, &scored(&rows)).unwrap();
    assert_eq!(got, [[Some(21.0), Some(21.0)], [Some(1.0), Some(0.0)]]);
}

#[test]
fn builtins_alone_start_no_python() {
    let dir = tempfile::tempdir().unwrap();
    let missing = Path::new("/nonexistent/python3");
    let mut funcs = RewardFuncs::with_python(&names(&["builtin:answer_match", "builtin:format:^####"]), dir.path(), missing).unwrap();
    let got = funcs.score(1, &scored(&gsm8k_rows())).unwrap();
    assert_eq!(got, [[Some(1.0), Some(0.0), Some(1.0), Some(0.0)], [Some(1.0), Some(0.0), Some(0.0), Some(0.0)]]);
    assert_eq!(funcs.names(), ["answer_match", "format"]);
    // torch's nansum over weighted rewards: None and NaN add nothing, an
    // infinity stays, no weights means 1.0 each.
    let rewards = [vec![Some(1.0), None, Some(f64::NAN), Some(f64::INFINITY)], vec![Some(0.5), Some(2.0), Some(3.0), None]];
    assert_eq!(funcs.weighted_sum(&rewards, Some(&[2.0, -1.0])).unwrap(), [1.5, -2.0, -3.0, f64::INFINITY]);
    assert_eq!(funcs.weighted_sum(&rewards, None).unwrap(), [1.5, 2.0, 3.0, f64::INFINITY]);
}

#[test]
fn missing_python_is_one_clear_error() {
    let dir = config_dir();
    let err = one_line(start(Path::new("/nonexistent/python3"), dir.path(), &["rewards_mod.correct"]).unwrap_err());
    assert_eq!(
        err,
        "reward function `rewards_mod.correct`: Python `/nonexistent/python3` was not found; Python reward functions need Python 3 (install it, or set FERROTUNE_PYTHON to its path)"
    );
}

#[test]
fn bad_names_fail_before_python_starts() {
    let dir = tempfile::tempdir().unwrap();
    let missing = Path::new("/nonexistent/python3");
    let err = |n: &str| one_line(RewardFuncs::with_python(&names(&[n]), dir.path(), missing).unwrap_err());
    assert!(err("correct").starts_with("reward function `correct`: a Python reward function is written module.function"));
    assert!(err("rewards.py").contains("name the function, not the file"));
    assert!(err("Qwen/Qwen2.5-0.5B-Reward").contains("reward models are not supported here"));
    assert!(err("builtin:nope").contains("unknown built-in `nope`"));
    assert!(err("builtin:format:[").contains("is not a valid regular expression"));
    let none = one_line(RewardFuncs::with_python(&[], dir.path(), missing).unwrap_err());
    assert!(none.starts_with("trl.reward_funcs is empty"), "{none}");
}

#[test]
fn import_errors_name_the_function() {
    let Some(py) = python() else { return };
    let dir = config_dir();
    let shown = dir.path().canonicalize().unwrap();
    let err = |n: &str| one_line(start(&py, dir.path(), &["rewards_mod.correct", n]).unwrap_err());
    assert_eq!(
        err("no_such_module.f"),
        format!("reward function `no_such_module.f`: module `no_such_module` was not found (looked in {}, then Python's path)", shown.display())
    );
    assert_eq!(err("pkg.missing.f"), format!("reward function `pkg.missing.f`: module `pkg.missing` was not found (looked in {}, then Python's path)", shown.display()));
    let missing_fn = err("rewards_mod.corect");
    assert!(
        missing_fn.starts_with("reward function `rewards_mod.corect`: module `rewards_mod` (")
            && missing_fn.ends_with("rewards_mod.py) has no function `corect`; did you mean `correct`?"),
        "{missing_fn}"
    );
    assert_eq!(err("rewards_mod.not_a_function"), "reward function `rewards_mod.not_a_function`: `rewards_mod.not_a_function` is not a function (its type is int)");
    let syntax = err("broken.f");
    assert!(syntax.starts_with("reward function `broken.f`: importing module `broken` raised SyntaxError") && syntax.contains("broken.py line 2"), "{syntax}");
    let dep = err("needs_dep.f");
    assert!(
        dep.starts_with("reward function `needs_dep.f`: importing module `needs_dep` raised ModuleNotFoundError: No module named 'surely_not_installed_dep' (at ")
            && dep.ends_with("needs_dep.py line 1)"),
        "{dep}"
    );
    let raised = err("raises_on_import.f");
    assert!(raised.starts_with("reward function `raises_on_import.f`: importing module `raises_on_import` raised RuntimeError: no GPU here (at "), "{raised}");
}

/// The error `func` gives at step 3, after `rewards_mod.correct` ran fine.
fn score_error(py: &Path, dir: &Path, func: &str) -> String {
    let mut funcs = start(py, dir, &["rewards_mod.correct", func]).unwrap();
    one_line(funcs.score(3, &scored(&gsm8k_rows())).unwrap_err())
}

#[test]
fn errors_while_scoring_name_the_function_and_step() {
    let Some(py) = python() else { return };
    let dir = config_dir();
    let d = dir.path();
    let raised = score_error(&py, d, "rewards_mod.raises");
    assert!(raised.starts_with("reward function `rewards_mod.raises` at step 3: raised ZeroDivisionError: division by zero (at "), "{raised}");
    assert!(raised.ends_with("rewards_mod.py line 36)"), "{raised}");
    assert_eq!(score_error(&py, d, "rewards_mod.short"), "reward function `rewards_mod.short` at step 3: returned 1 rewards, expected 4 (one per completion)");
    assert_eq!(score_error(&py, d, "rewards_mod.text"), "reward function `rewards_mod.text` at step 3: returned 'good' (str) for completion 1, expected a number or None");
    assert_eq!(score_error(&py, d, "rewards_mod.nothing"), "reward function `rewards_mod.nothing` at step 3: returned None (NoneType), expected a list of 4 numbers or None");
    assert_eq!(score_error(&py, d, "rewards_mod.exits"), "reward function `rewards_mod.exits` at step 3: raised SystemExit: 4 (at ".to_string() + &d.join("rewards_mod.py").canonicalize().unwrap().display().to_string() + " line 52)");
    let died = score_error(&py, d, "rewards_mod.dies");
    assert_eq!(
        died,
        format!("reward function `rewards_mod.dies` at step 3: the Python worker (`{}`) exited (exit status: 3); its error output, above, says why", py.display())
    );
}

/// Records what each call received beside the config, so the same calls
/// through TRL and through ferrotune can be compared.
const PROBE: &str = r#"
import json, os

_calls = os.path.join(os.path.dirname(os.path.abspath(__file__)), "calls.jsonl")

def _record(name, prompts, completions, completion_ids, kwargs):
    rest = {k: v for k, v in kwargs.items() if k not in ("trainer_state", "log_extra", "log_metric")}
    call = {
        "func": name, "prompts": prompts, "completions": completions,
        "completion_ids": [list(ids) for ids in completion_ids], "columns": rest, "kwarg_names": sorted(kwargs),
        "global_step": kwargs["trainer_state"].global_step,
        "loggers": [callable(kwargs["log_extra"]), callable(kwargs["log_metric"])],
    }
    with open(_calls, "a") as f:
        f.write(json.dumps(call, sort_keys=True) + "\n")

def overlap(prompts, completions, completion_ids, answer, **kwargs):
    _record("overlap", prompts, completions, completion_ids, dict(kwargs, answer=answer))
    kwargs["log_metric"]("probe", 1.0)
    kwargs["log_extra"]("probe", [1] * len(prompts))
    return [len(set(str(c)) & set(a)) / 7 for c, a in zip(completions, answer)]

def maybe(prompts, completions, completion_ids, **kwargs):
    _record("maybe", prompts, completions, completion_ids, kwargs)
    return [None if i % 3 == 0 else sum(ids) / 3 for i, ids in enumerate(completion_ids)]
"#;

/// Runs TRL's GRPOTrainer._calculate_rewards on a stand-in trainer (the
/// attributes it reads) and prints rewards[function][completion].
const TRL_SCRIPT: &str = r#"
import json, math, sys, types
sys.path.insert(0, sys.argv[1])
from accelerate import PartialState
PartialState()
from transformers import TrainerState
from trl import GRPOTrainer
import probe
req = json.load(open(sys.argv[2]))
state = TrainerState()
state.global_step = req["global_step"]
trainer = types.SimpleNamespace(
    accelerator=types.SimpleNamespace(device="cpu", is_main_process=True),
    args=types.SimpleNamespace(report_to=[]),
    reward_funcs=[probe.overlap, probe.maybe], reward_processing_classes=[None, None],
    reward_func_names=["overlap", "maybe"], state=state, environments=None,
    _log_completion_extra=lambda column, values: None, _log_metric=lambda name, value: None,
)
inputs = req["inputs"]
r = GRPOTrainer._calculate_rewards.__wrapped__(trainer, inputs, [x["prompt"] for x in inputs], req["completions"], req["completion_ids"])
print(json.dumps([[None if math.isnan(v) else v for v in col] for col in r.T.tolist()]))
"#;

#[test]
fn calls_and_rewards_match_trl_grpo_trainer() {
    let Some(py) = common::python_with(&["trl", "accelerate", "transformers"]) else {
        eprintln!("skipped: no Python with trl (set FERROTUNE_PYTHON)");
        return;
    };
    let prompt = json!([{"role": "user", "content": "What is 6*7?"}]);
    let rows = [
        row(prompt.clone(), json!([{"role": "assistant", "content": "42"}]), &[52, 17], json!({"answer": "42", "meta": {"src": "a"}, "id": 0})),
        row(prompt.clone(), json!([{"role": "assistant", "content": "It is 24"}]), &[9, 3, 2], json!({"answer": "42", "meta": {"src": "a"}, "id": 0})),
        row(json!([{"role": "user", "content": "Name a colour."}]), json!([{"role": "assistant", "content": "teal"}]), &[5], json!({"answer": "blue", "meta": null, "id": 1})),
        row(json!([{"role": "user", "content": "Name a colour."}]), json!([{"role": "assistant", "content": "blue!"}]), &[], json!({"answer": "blue", "meta": null, "id": 1})),
    ];
    let step = 5;

    // TRL: the dataset rows with their prompt, and the completions beside.
    let trl_dir = tempfile::tempdir().unwrap();
    std::fs::write(trl_dir.path().join("probe.py"), PROBE).unwrap();
    let inputs: Vec<Value> = rows
        .iter()
        .map(|r| {
            let mut m = r.columns.clone();
            m.insert("prompt".into(), r.prompt.clone());
            Value::Object(m)
        })
        .collect();
    let request = json!({
        "global_step": step - 1,
        "inputs": inputs,
        "completions": rows.iter().map(|r| r.completion.clone()).collect::<Vec<_>>(),
        "completion_ids": rows.iter().map(|r| r.ids.clone()).collect::<Vec<_>>(),
    });
    std::fs::write(trl_dir.path().join("request.json"), request.to_string()).unwrap();
    let out = std::process::Command::new(&py)
        .args(["-c", TRL_SCRIPT])
        .arg(trl_dir.path())
        .arg(trl_dir.path().join("request.json"))
        .output()
        .unwrap();
    assert!(out.status.success(), "TRL reference failed: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let trl: Vec<Vec<Option<f64>>> = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();

    let ours_dir = tempfile::tempdir().unwrap();
    std::fs::write(ours_dir.path().join("probe.py"), PROBE).unwrap();
    let mut funcs = start(&py, ours_dir.path(), &["probe.overlap", "probe.maybe"]).unwrap();
    assert_eq!(funcs.names(), ["overlap", "maybe"]);
    let ours = funcs.score(step, &scored(&rows)).unwrap();

    // TRL holds rewards as float32: ours, rounded so, are the same numbers.
    let rounded: Vec<Vec<Option<f64>>> = ours.iter().map(|f| f.iter().map(|r| r.map(|v| v as f32 as f64)).collect()).collect();
    assert_eq!(rounded, trl);
    assert_eq!(ours[1][0], None);
    // And every function saw the same arguments.
    let calls = |dir: &Path| -> Vec<Value> {
        std::fs::read_to_string(dir.join("calls.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let (theirs, mine) = (calls(trl_dir.path()), calls(ours_dir.path()));
    assert_eq!(theirs.len(), 2);
    assert_eq!(mine, theirs);
}
