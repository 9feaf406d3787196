//! A run's output_dir as a whole: the lock that keeps a second run out of
//! it, the files an earlier run left there (refused, or cleared with
//! `--overwrite`), and the hidden partial files a killed run leaves behind.
//! A new file that `train` writes into output_dir is added to `RUN_FILES`
//! (or, if it is a tokenizer copy, to `TOKENIZER_FILES`), so that an
//! earlier run's copy is seen and cleared like the rest.

use super::saves;
use super::progress::{COMPLETIONS_FILE, METRICS_FILE};
use crate::adapter::peft;
use crate::config::RESOLVED_CONFIG_FILE;
use anyhow::{Context, Result, bail};
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// Held (an OS advisory lock) by the run writing into output_dir. The lock
/// goes with the process, so a killed run's file blocks no one.
pub const LOCK_FILE: &str = ".ferrotune.lock";

/// Tokenizer files copied next to the adapter, so output_dir is usable on
/// its own (as Axolotl leaves it).
pub const TOKENIZER_FILES: &[&str] = &["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"];

/// The files of a run (besides checkpoint-N and the tokenizer copies): any
/// of them, or a checkpoint, means output_dir holds a run.
const RUN_FILES: &[&str] = &[RESOLVED_CONFIG_FILE, METRICS_FILE, COMPLETIONS_FILE, peft::CONFIG_FILE, peft::WEIGHTS_FILE];

/// The lock on an output_dir, released when dropped (or when the process ends).
pub struct RunLock {
    _file: File,
}

/// Take output_dir's lock (creating the folder), or refuse naming the run
/// that holds it. Creating the lock file is also the check that output_dir
/// can be written, so a bad folder is refused before any data is prepared.
pub fn lock(output_dir: &Path) -> Result<RunLock> {
    let shown = output_dir.display();
    if output_dir.is_file() {
        bail!("output_dir {shown} is a file; give a folder for the adapter and checkpoints");
    }
    if let Err(e) = std::fs::create_dir_all(output_dir) {
        bail!("output_dir {shown} cannot be created: {e}; pick a folder you can write to");
    }
    let path = output_dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path);
    let mut file = match file {
        Ok(f) => f,
        Err(e) => bail!("output_dir {shown} is not writable: {e}; pick a folder you can write to"),
    };
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            bail!(
                "output_dir {} is in use by another ferrotune train ({}); wait for it to finish, or choose another output_dir",
                output_dir.display(),
                if holder.is_empty() { "its pid is not recorded yet" } else { holder }
            );
        }
        Err(TryLockError::Error(e)) => bail!("cannot lock {}: {e}", path.display()),
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let holder = format!("pid {}, started {}", std::process::id(), utc(now));
    let written = file.set_len(0).and_then(|_| file.rewind()).and_then(|_| file.write_all(holder.as_bytes()));
    written.with_context(|| format!("cannot write the lock file {}", path.display()))?;
    Ok(RunLock { _file: file })
}

/// Seconds since the Unix epoch as "YYYY-MM-DD HH:MM:SS UTC".
fn utc(secs: u64) -> String {
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Days since 1970-01-01 to a civil date (the proleptic Gregorian calendar).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC", rem / 3600, rem / 60 % 60, rem % 60)
}

/// Whether `name` is a hidden leftover of an interrupted write: a
/// checkpoint being assembled or swapped out, or an atomic write's
/// temporary file of one of the run's files.
fn is_partial(name: &str) -> bool {
    let checkpoint_tmp = name.strip_prefix(".checkpoint-").is_some_and(|r| r.ends_with(".partial") || r.ends_with(".old"));
    let file_tmp = name.strip_suffix(".tmp").is_some_and(|f| RUN_FILES.contains(&f) || TOKENIZER_FILES.contains(&f));
    checkpoint_tmp || file_tmp
}

/// Remove what interrupted writes left in output_dir (the caller holds the
/// lock, so nothing is being written there); returns the names removed.
pub fn remove_partials(output_dir: &Path) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for (name, path) in entries(output_dir)? {
        if !is_partial(&name) {
            continue;
        }
        let gone = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
        gone.with_context(|| format!("cannot remove the stale {}", path.display()))?;
        removed.push(name);
    }
    removed.sort();
    Ok(removed)
}

/// The files of an earlier run in output_dir, by name (empty: none).
pub fn earlier_run(output_dir: &Path) -> Result<Vec<String>> {
    let mut found: Vec<String> = entries(output_dir)?
        .into_iter()
        .map(|(name, _)| name)
        .filter(|n| RUN_FILES.contains(&n.as_str()) || saves::step_of(n).is_some())
        .collect();
    found.sort();
    Ok(found)
}

/// Remove an earlier run's files from output_dir: its checkpoints, adapter,
/// metrics, resolved config and tokenizer copies; nothing else.
pub fn clear_earlier_run(output_dir: &Path) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for (name, path) in entries(output_dir)? {
        let gone = if saves::step_of(&name).is_some() && path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else if RUN_FILES.contains(&name.as_str()) || TOKENIZER_FILES.contains(&name.as_str()) {
            std::fs::remove_file(&path)
        } else {
            continue;
        };
        gone.with_context(|| format!("cannot remove {} of the earlier run", path.display()))?;
        removed.push(name);
    }
    removed.sort();
    Ok(removed)
}

/// A resume from `checkpoint_dir`, accepted, at `step`: when it is an
/// earlier checkpoint of output_dir itself, the run's later checkpoints go
/// (this run redoes those steps, and metrics.jsonl drops their records too;
/// left, they would outrank the new ones in save_total_limit and resume).
pub fn abandon_after(output_dir: &Path, checkpoint_dir: &Path, step: usize) -> Result<()> {
    if !is_inside(checkpoint_dir, output_dir) {
        return Ok(());
    }
    let mut removed = Vec::new();
    for (n, dir) in saves::list(output_dir).into_iter().filter(|(n, _)| *n > step) {
        std::fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
        removed.push(format!("checkpoint-{n}"));
    }
    if !removed.is_empty() {
        eprintln!("removed {} (after the resumed step {step}: this run redoes those steps)", describe(&removed));
    }
    Ok(())
}

/// The run's files as messages list them: at most six names.
pub fn describe(names: &[String]) -> String {
    crate::model::st_files::first_names(names, 6)
}

/// Whether `checkpoint_dir` is a checkpoint of output_dir itself (then a
/// resume continues the run that is there).
pub fn is_inside(checkpoint_dir: &Path, output_dir: &Path) -> bool {
    let canon = |p: &Path| std::fs::canonicalize(p).ok();
    match (checkpoint_dir.parent().and_then(canon), canon(output_dir)) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

fn entries(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let Ok(list) = std::fs::read_dir(dir) else { return Ok(Vec::new()) };
    let mut out = Vec::new();
    for e in list {
        let e = e.with_context(|| format!("cannot list {}", dir.display()))?;
        out.push((e.file_name().to_string_lossy().into_owned(), e.path()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_names_are_only_ferrotunes_own() {
        for ours in [".checkpoint-5.partial", ".checkpoint-12.old", "metrics.jsonl.tmp", "adapter_model.safetensors.tmp", "tokenizer.json.tmp"] {
            assert!(is_partial(ours), "{ours}");
        }
        for theirs in ["notes.tmp", "checkpoint-5", ".checkpoint-5", "metrics.jsonl", "data.jsonl.tmp", ".ferrotune.lock"] {
            assert!(!is_partial(theirs), "{theirs}");
        }
    }

    #[test]
    fn an_earlier_run_is_found_and_cleared_leaving_other_files() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        for f in ["metrics.jsonl", "resolved_config.yml", "tokenizer.json", "notes.txt"] {
            std::fs::write(d.join(f), "x").unwrap();
        }
        std::fs::create_dir_all(d.join("checkpoint-120")).unwrap();
        std::fs::create_dir_all(d.join("checkpoint-best")).unwrap();
        assert_eq!(earlier_run(d).unwrap(), ["checkpoint-120", "metrics.jsonl", "resolved_config.yml"]);
        let removed = clear_earlier_run(d).unwrap();
        assert_eq!(removed, ["checkpoint-120", "metrics.jsonl", "resolved_config.yml", "tokenizer.json"]);
        assert!(d.join("notes.txt").is_file() && d.join("checkpoint-best").is_dir());
        assert!(earlier_run(d).unwrap().is_empty());
    }

    #[test]
    fn the_lock_time_is_a_utc_date() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(1_700_000_000), "2023-11-14 22:13:20 UTC");
        assert_eq!(utc(951_825_600), "2000-02-29 12:00:00 UTC");
    }
}
