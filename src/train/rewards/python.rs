//! The Python reward worker: one `python` process (FERROTUNE_PYTHON, else
//! the `python3` on PATH) running `worker.py`, which ships inside the binary,
//! and imports and calls every Python reward function. They talk JSON lines
//! over the worker's stdin and stdout; its stderr is the run's, so the user's
//! prints and tracebacks show where the run's output does.

use super::Scored;
use anyhow::{Result, anyhow, bail};
use serde_json::{Map, Value, json};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

const WORKER: &str = include_str!("worker.py");

/// A running worker with its functions imported.
#[derive(Debug)]
pub struct Worker {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    python: PathBuf,
    /// The functions as written in the config, in the worker's order.
    funcs: Vec<String>,
}

/// Checks that `name` can be a Python `module.function` before any Python
/// starts, with a hint for the usual slips.
pub fn check_name(name: &str) -> Result<()> {
    let hint = if name.contains('/') || name.contains('\\') {
        "a path or a model id is not a reward function (reward models are not supported here); name a Python function as module.function"
    } else if name.ends_with(".py") {
        "name the function, not the file: rewards.py holding `def correct(...)` is `rewards.correct`"
    } else {
        "a Python reward function is written module.function (the module on the config's folder or Python's path)"
    };
    let parts: Vec<&str> = name.split('.').collect();
    let identifier = |p: &&str| {
        let mut c = p.chars();
        c.next().is_some_and(|f| f.is_alphabetic() || f == '_') && c.all(|x| x.is_alphanumeric() || x == '_')
    };
    if parts.len() < 2 || !parts.iter().all(identifier) || name.ends_with(".py") {
        bail!("reward function `{name}`: {hint}, or use a built-in: {}", super::builtin::KNOWN);
    }
    Ok(())
}

/// The interpreter to run: FERROTUNE_PYTHON, else `python3`.
pub fn interpreter() -> PathBuf {
    std::env::var_os("FERROTUNE_PYTHON").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("python3"))
}

impl Worker {
    /// Starts the worker and imports `funcs`; returns it with each
    /// function's `__name__`.
    pub fn start(python: &Path, funcs: &[String], config_dir: &Path) -> Result<(Worker, Vec<String>)> {
        let python = python.to_path_buf();
        let listed = funcs.iter().map(|f| format!("`{f}`")).collect::<Vec<_>>().join(", ");
        let dir = if config_dir.as_os_str().is_empty() { Path::new(".") } else { config_dir };
        let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
        let mut child = Command::new(&python)
            .arg("-c")
            .arg(WORKER)
            .arg(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| {
                let why = if e.kind() == std::io::ErrorKind::NotFound {
                    "was not found".to_string()
                } else {
                    format!("could not be started ({e})")
                };
                anyhow!(
                    "reward function {listed}: Python `{}` {why}; Python reward functions need Python 3 (install it, or set FERROTUNE_PYTHON to its path)",
                    python.display()
                )
            })?;
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut worker = Worker { child, stdin, stdout, python, funcs: funcs.to_vec() };
        let reply = worker.request(&json!({"op": "load", "funcs": funcs}), |f| format!("reward function {f}"))?;
        let names = match reply.get("names").and_then(Value::as_array) {
            Some(n) if n.len() == funcs.len() => n.iter().map(|v| v.as_str().unwrap_or_default().to_string()).collect(),
            _ => bail!("reward function {listed}: the Python worker sent an unexpected reply: {reply}"),
        };
        Ok((worker, names))
    }

    /// Scores `batch` with every Python function: one list per function.
    pub fn score(&mut self, step: usize, max_steps: usize, batch: &[Scored]) -> Result<Vec<Vec<Option<f64>>>> {
        // TRL passes every column of the first row except these three, each
        // as a list over the batch.
        let keys: Vec<&String> = batch
            .first()
            .map(|s| s.columns.keys().filter(|k| !matches!(k.as_str(), "prompt" | "completion" | "completion_ids")).collect())
            .unwrap_or_default();
        let columns: Map<String, Value> = keys
            .iter()
            .map(|k| ((*k).clone(), Value::Array(batch.iter().map(|s| s.columns.get(*k).cloned().unwrap_or(Value::Null)).collect())))
            .collect();
        let request = json!({
            "op": "score",
            "global_step": step.saturating_sub(1),
            "max_steps": max_steps,
            "prompts": batch.iter().map(|s| s.prompt).collect::<Vec<_>>(),
            "completions": batch.iter().map(|s| s.completion).collect::<Vec<_>>(),
            "completion_ids": batch.iter().map(|s| s.completion_ids).collect::<Vec<_>>(),
            "columns": columns,
        });
        let reply = self.request(&request, |f| format!("reward function {f} at step {step}"))?;
        let all = self.funcs.iter().map(|f| format!("`{f}`")).collect::<Vec<_>>().join(", ");
        let bad = |why: &str| anyhow!("reward function {all} at step {step}: the Python worker sent {why}");
        let lists = reply.get("rewards").and_then(Value::as_array).ok_or_else(|| bad("an unexpected reply"))?;
        if lists.len() != self.funcs.len() {
            return Err(bad("the wrong number of reward lists"));
        }
        lists
            .iter()
            .map(|list| {
                let list = list.as_array().filter(|l| l.len() == batch.len()).ok_or_else(|| bad("a malformed reward list"))?;
                list.iter()
                    .map(|v| match v {
                        Value::Null => Ok(None),
                        // repr(float): exact, and NaN and infinities kept.
                        Value::String(s) => s.parse::<f64>().map(Some).map_err(|_| bad("an unreadable number")),
                        _ => Err(bad("a malformed reward")),
                    })
                    .collect()
            })
            .collect()
    }

    /// Sends one request and reads replies up to the final one, keeping
    /// track of which function runs so a crash names it. `who` makes the
    /// error's prefix from the function's name (all of them, when unknown).
    fn request(&mut self, request: &Value, who: impl Fn(&str) -> String) -> Result<Value> {
        let all = self.funcs.iter().map(|f| format!("`{f}`")).collect::<Vec<_>>().join(", ");
        let mut running: Option<usize> = None;
        let mut line = serde_json::to_vec(request).expect("JSON values serialise");
        line.push(b'\n');
        let sent = match self.stdin.as_mut() {
            Some(s) => s.write_all(&line).and_then(|_| s.flush()).is_ok(),
            None => false,
        };
        if !sent {
            return Err(self.died(&who, None, &all));
        }
        loop {
            let mut text = String::new();
            match self.stdout.read_line(&mut text) {
                Ok(0) | Err(_) => return Err(self.died(&who, running, &all)),
                Ok(_) => {}
            }
            let reply: Value = serde_json::from_str(&text).map_err(|_| {
                anyhow!("{}: the Python worker sent an unreadable reply: {}", who_of(&who, &self.funcs, running, &all), text.trim())
            })?;
            if let Some(i) = reply.get("running").and_then(Value::as_u64) {
                running = Some(i as usize);
                continue;
            }
            if let Some(message) = reply.get("error").and_then(Value::as_str) {
                let func = reply.get("func").and_then(Value::as_u64).map(|i| i as usize);
                bail!("{}: {message}", who_of(&who, &self.funcs, func, &all));
            }
            return Ok(reply);
        }
    }

    /// The error for a worker that stopped answering.
    fn died(&mut self, who: &impl Fn(&str) -> String, running: Option<usize>, all: &str) -> anyhow::Error {
        let status = wait_briefly(&mut self.child, Duration::from_secs(5));
        let status = match status {
            Some(s) => format!("exited ({s})"),
            None => "stopped answering".into(),
        };
        anyhow!(
            "{}: the Python worker (`{}`) {status}; its error output, above, says why",
            who_of(who, &self.funcs, running, all),
            self.python.display()
        )
    }
}

/// The prefix naming the function concerned (all of them when unknown).
fn who_of(who: &impl Fn(&str) -> String, funcs: &[String], func: Option<usize>, all: &str) -> String {
    match func.and_then(|i| funcs.get(i)) {
        Some(f) => who(&format!("`{f}`")),
        None => who(all),
    }
}

/// The child's exit status once it exits, waiting at most `limit`.
fn wait_briefly(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) if start.elapsed() < limit => std::thread::sleep(Duration::from_millis(20)),
            _ => return None,
        }
    }
}

impl Drop for Worker {
    /// Closing stdin ends the worker's loop; one that does not exit soon
    /// (a function still running) is killed.
    fn drop(&mut self) {
        self.stdin.take();
        if wait_briefly(&mut self.child, Duration::from_secs(5)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
