//! A run's datasets into training and validation sequences: files -> rows
//! -> parallel tokenization and label masking (`formats`) -> length policy
//! -> cache -> merged order -> validation split.

use super::cache::{self, CachedDataset};
use super::chat_template::ChatTemplate;
use super::formats::{ChatOptions, DatasetType, Format};
use super::pretokenized::check_vocab;
use super::rows::{self, RawRow};
use super::tokenizer::TextTokenizer;
use crate::config::{DatasetConfig, RunConfig};
use crate::model::batch::Sequence;
use crate::util::rng::Rng;
use anyhow::{Context, Result, bail};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// What happened to one dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetReport {
    pub path: String,
    /// The dataset type's name ("alpaca", "pre-tokenized", ...).
    pub kind: String,
    /// "train" (datasets:) or "test" (test_datasets:).
    pub split: String,
    pub rows: usize,
    /// Sequences (SFT) or examples (preference datasets) kept.
    pub sequences: usize,
    pub tokens: usize,
    /// Tokens the loss is computed on (`Sequence::trained_tokens`).
    pub trained_tokens: usize,
    /// Kept sequences with no trained token (they add nothing to the loss).
    pub untrained: usize,
    /// Rows cut to sequence_len (excess_length_strategy: truncate).
    pub truncated: usize,
    /// Rows longer than sequence_len left out (excess_length_strategy: drop).
    pub dropped: usize,
    pub from_cache: bool,
    /// A preference dataset (rl, reward_model): its rows are examples of
    /// several sequences, and its report line says so.
    pub preference: bool,
    /// Preference pairs whose chosen and rejected completions are the same
    /// tokens: every pairwise loss is flat there, so they teach nothing.
    pub same_completions: usize,
}

impl fmt::Display for DatasetReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (split, unit) = if self.preference { ("preference", "examples") } else { (self.split.as_str(), "sequences") };
        write!(f, "{} [{}, {split}]: {} rows -> {} {unit}, {} tokens", self.path, self.kind, self.rows, self.sequences, self.tokens)?;
        if self.truncated > 0 {
            write!(f, ", {} truncated", self.truncated)?;
        }
        if self.dropped > 0 {
            write!(f, ", {} dropped (too long)", self.dropped)?;
        }
        if self.same_completions > 0 {
            write!(f, ", {} with chosen = rejected (they teach nothing: check the data's fields)", self.same_completions)?;
        }
        if self.from_cache {
            write!(f, " (cached)")?;
        }
        Ok(())
    }
}

/// The sequences a run trains and validates on.
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    pub train: Vec<Sequence>,
    pub val: Vec<Sequence>,
    pub report: Vec<DatasetReport>,
}

impl fmt::Display for Prepared {
    /// One line per dataset, each ending in a newline.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for r in &self.report {
            writeln!(f, "dataset {r}")?;
        }
        Ok(())
    }
}

/// How long rows are handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExcessLength {
    Drop,
    Truncate,
}

impl ExcessLength {
    pub fn parse(s: &str) -> Result<ExcessLength> {
        match s {
            "drop" | "" => Ok(ExcessLength::Drop),
            "truncate" => Ok(ExcessLength::Truncate),
            other => bail!("excess_length_strategy: \"{other}\" is not one of drop, truncate"),
        }
    }
}

/// The run settings that decide how a dataset is tokenized.
#[derive(Debug, Clone)]
pub struct PrepareOptions {
    pub sequence_len: usize,
    pub train_on_inputs: bool,
    pub excess_length: ExcessLength,
    pub chat_template: Option<String>,
    pub chat_template_jinja: Option<String>,
    pub special_tokens: BTreeMap<String, String>,
    /// None: no cache is read or written.
    pub cache_dir: Option<PathBuf>,
}

impl PrepareOptions {
    pub fn from_config(cfg: &RunConfig) -> Result<PrepareOptions> {
        if cfg.sequence_len == 0 {
            bail!("sequence_len must be at least 1");
        }
        Ok(PrepareOptions {
            sequence_len: cfg.sequence_len,
            train_on_inputs: cfg.train_on_inputs,
            excess_length: ExcessLength::parse(&cfg.excess_length_strategy)?,
            chat_template: cfg.chat_template.clone(),
            chat_template_jinja: cfg.chat_template_jinja.clone(),
            special_tokens: cfg.special_tokens.clone(),
            cache_dir: cache::default_dir(cfg.dataset_prepared_path.as_deref()),
        })
    }
}

/// Tokenize a run's datasets (from the cache where possible), merge them in
/// config order, shuffle if asked, and split off the validation set.
/// Every id and label is checked against the model's `vocab`.
pub fn prepare(cfg: &RunConfig, tokenizer_dir: &Path, vocab: usize) -> Result<Prepared> {
    if cfg.datasets.is_empty() {
        bail!("datasets: the run config lists no datasets");
    }
    let opts = PrepareOptions::from_config(cfg)?;
    let all: Vec<&DatasetConfig> = cfg.datasets.iter().chain(&cfg.test_datasets).collect();
    let tok = load_tokenizer_if_needed(&all, tokenizer_dir, &opts)?;
    let mut report = Vec::new();
    // One list of the config (`key`) in order, each dataset's report kept.
    let mut prepare_list = |key: &str, list: &[DatasetConfig], split: &str| -> Result<Vec<Sequence>> {
        let mut out = Vec::new();
        for (i, ds) in list.iter().enumerate() {
            let (seqs, r) = prepare_dataset(ds, &opts, tok.as_ref(), tokenizer_dir, vocab, split)
                .with_context(|| format!("{key}[{i}] ({})", ds.path))?;
            out.extend(seqs);
            report.push(r);
        }
        Ok(out)
    };
    let mut train = prepare_list("datasets", &cfg.datasets, "train")?;
    if cfg.shuffle_merged_datasets {
        shuffle(&mut train, cfg.seed);
    }
    let val = if !cfg.test_datasets.is_empty() {
        prepare_list("test_datasets", &cfg.test_datasets, "test")?
    } else {
        let n = val_count(cfg.val_set_size, train.len())?;
        train.split_off(train.len() - n)
    };
    Ok(Prepared { train, val, report })
}

/// How many of `total` sequences `val_set_size` holds out: a fraction < 1
/// (rounded up, as `datasets`' train_test_split) or a count.
pub fn val_count(val_set_size: f64, total: usize) -> Result<usize> {
    if !(val_set_size >= 0.0 && val_set_size.is_finite()) {
        bail!("val_set_size must be a fraction in [0, 1) or a count >= 1, found {val_set_size}");
    }
    let n = if val_set_size < 1.0 {
        (val_set_size * total as f64).ceil() as usize
    } else {
        if val_set_size.fract() != 0.0 {
            bail!("val_set_size {val_set_size}: a value >= 1 is a count of examples and must be a whole number");
        }
        val_set_size as usize
    };
    if n > 0 && n >= total {
        bail!("val_set_size {val_set_size} holds out {n} of the {total} training sequences, leaving none to train on");
    }
    Ok(n)
}

/// The run's examples from every dataset: `read(dataset, "train" | "test")`
/// reads one (with its report); the training datasets are merged and
/// shuffled when asked, and the validation split is `val_set_size` of them,
/// or test_datasets when listed. Errors name the dataset entry.
pub fn merge_datasets<T>(
    cfg: &RunConfig,
    mut read: impl FnMut(&DatasetConfig, &str) -> Result<(Vec<T>, DatasetReport)>,
) -> Result<(Vec<T>, Vec<T>, Vec<DatasetReport>)> {
    if cfg.datasets.is_empty() {
        bail!("datasets: the run config lists no datasets");
    }
    let (mut train, mut report) = (Vec::new(), Vec::new());
    for (i, ds) in cfg.datasets.iter().enumerate() {
        let (items, r) = read(ds, "train").with_context(|| format!("datasets[{i}] ({})", ds.path))?;
        train.extend(items);
        report.push(r);
    }
    if cfg.shuffle_merged_datasets {
        shuffle(&mut train, cfg.seed);
    }
    let val = if cfg.test_datasets.is_empty() {
        let n = val_count(cfg.val_set_size, train.len())?;
        train.split_off(train.len() - n)
    } else {
        let mut val = Vec::new();
        for (i, ds) in cfg.test_datasets.iter().enumerate() {
            let (items, r) = read(ds, "test").with_context(|| format!("test_datasets[{i}] ({})", ds.path))?;
            val.extend(items);
            report.push(r);
        }
        val
    };
    Ok((train, val, report))
}

/// Deterministic Fisher-Yates shuffle with the run's seed.
pub fn shuffle<T>(items: &mut [T], seed: u64) {
    let mut rng = Rng::new(seed);
    for i in (1..items.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
}

/// One dataset file for `ferrotune eval`: `kind` as `type:` (None:
/// pre-tokenized), `chat_template` as the run key. Not cached.
pub fn prepare_eval(
    data: &Path,
    kind: Option<&str>,
    chat_template: Option<&str>,
    tokenizer_dir: &Path,
    vocab: usize,
    sequence_len: usize,
) -> Result<(Vec<Sequence>, DatasetReport)> {
    let ds = DatasetConfig { path: data.display().to_string(), kind: kind.map(str::to_string), ..Default::default() };
    let opts = PrepareOptions {
        sequence_len: sequence_len.max(1),
        train_on_inputs: false,
        excess_length: ExcessLength::Drop,
        chat_template: chat_template.map(str::to_string),
        chat_template_jinja: None,
        special_tokens: BTreeMap::new(),
        cache_dir: None,
    };
    let tok = load_tokenizer_if_needed(&[&ds], tokenizer_dir, &opts)?;
    prepare_dataset(&ds, &opts, tok.as_ref(), tokenizer_dir, vocab, "eval")
}

fn load_tokenizer_if_needed(
    datasets: &[&DatasetConfig],
    tokenizer_dir: &Path,
    opts: &PrepareOptions,
) -> Result<Option<TextTokenizer>> {
    let mut needed = false;
    for ds in datasets {
        needed |= DatasetType::parse(ds.kind.as_deref()).with_context(|| ds.path.clone())?.needs_tokenizer();
    }
    if !needed {
        return Ok(None);
    }
    Ok(Some(TextTokenizer::load(tokenizer_dir, &opts.special_tokens)?))
}

/// One dataset: from the cache when an intact entry for exactly these
/// inputs exists, else tokenized (in parallel, row order kept) and cached.
pub fn prepare_dataset(
    ds: &DatasetConfig,
    opts: &PrepareOptions,
    tok: Option<&TextTokenizer>,
    tokenizer_dir: &Path,
    vocab: usize,
    split: &str,
) -> Result<(Vec<Sequence>, DatasetReport)> {
    let kind = DatasetType::parse(ds.kind.as_deref())?;
    let files = dataset_files(ds, split)?;
    let contents = files
        .iter()
        .map(|f| std::fs::read(f).with_context(|| format!("cannot read dataset file {}", f.display())))
        .collect::<Result<Vec<_>>>()?;
    let template = match kind {
        DatasetType::ChatTemplate => {
            let tok = tok.expect("tokenizer loaded for chat_template");
            let name = ds.chat_template.as_deref().or(opts.chat_template.as_deref());
            let mut t = ChatTemplate::resolve(name, opts.chat_template_jinja.as_deref(), tokenizer_dir)?;
            t.set_tokens(tok.special_tokens().clone());
            Some(t)
        }
        _ => None,
    };
    let key = cache_key(ds, opts, &files, &contents, template.as_ref(), kind.needs_tokenizer().then_some(tokenizer_dir))?;
    let cache_path = opts.cache_dir.as_deref().map(|d| cache::path_for(d, &key));
    let mut report = DatasetReport {
        path: ds.path.clone(),
        kind: kind.name().to_string(),
        split: split.to_string(),
        rows: 0,
        sequences: 0,
        tokens: 0,
        truncated: 0,
        dropped: 0,
        from_cache: false,
        trained_tokens: 0,
        untrained: 0,
        preference: false,
        same_completions: 0,
    };
    let cached = cache_path.as_deref().and_then(|p| cache::load(p, &key));
    let data = match cached {
        Some(data) => {
            for (j, s) in data.sequences.iter().enumerate() {
                check_vocab(s, vocab, &format!("{}: sequence {j} (cached)", ds.path))?;
            }
            report.from_cache = true;
            data
        }
        None => {
            let format = Format {
                kind,
                tokenizer: tok,
                template,
                chat: if kind == DatasetType::ChatTemplate { Some(ChatOptions::from_config(ds)?) } else { None },
                field_text: ds.field_text.clone().unwrap_or_else(|| "text".to_string()),
                train_on_inputs: opts.train_on_inputs,
                sequence_len: opts.sequence_len,
            };
            let data = tokenize_files(&format, ds, &files, &contents, opts, vocab)?;
            if let Some(Err(e)) = cache_path.as_deref().map(|p| cache::store(p, &key, &data)) {
                eprintln!("warning: the tokenized dataset is not cached: {e:#}");
            }
            data
        }
    };
    report.rows = data.rows;
    report.truncated = data.truncated;
    report.dropped = data.dropped;
    report.sequences = data.sequences.len();
    report.tokens = data.sequences.iter().map(|s| s.input_ids.len()).sum();
    report.trained_tokens = data.sequences.iter().map(Sequence::trained_tokens).sum();
    report.untrained = data.sequences.iter().filter(|s| s.trained_tokens() == 0).count();
    Ok((data.sequences, report))
}

/// The files of a dataset: `path` itself, or the data files (.jsonl,
/// .json, .parquet, .csv, .tsv) of the directory it names (sorted), or
/// `data_files` (relative to a directory path); or, for a Hub dataset id,
/// the files of its split (`split:`, else `default_split`: train for
/// `datasets`, test for `test_datasets`) fetched into the Hugging Face cache.
pub fn dataset_files(ds: &DatasetConfig, default_split: &str) -> Result<Vec<PathBuf>> {
    let root = PathBuf::from(&ds.path);
    // `org/name` that is not a local path is a Hub dataset, unless it ends
    // like a data file (a mistyped local path, e.g. data/train.jsonl).
    if !root.exists() && ds.path.split('/').count() == 2 && crate::hub::is_repo_id(&ds.path) && !rows::is_data_file(&root) {
        return super::hub_splits::fetch_split(ds, ds.split.as_deref().unwrap_or(default_split));
    }
    if let Some(s) = ds.split.as_deref().filter(|s| *s != "train") {
        bail!("split: \"{s}\": local files have only the train split (use test_datasets for validation files)");
    }
    let is_data = |p: &Path| rows::is_data_file(p);
    let files: Vec<PathBuf> = if let Some(list) = &ds.data_files {
        let base = if root.is_dir() { root.clone() } else { PathBuf::new() };
        list.iter().map(|f| base.join(f)).collect()
    } else if root.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(&root)
            .with_context(|| format!("cannot list dataset directory {}", root.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && is_data(p))
            .collect();
        v.sort();
        if v.is_empty() {
            bail!("dataset directory {} holds no .jsonl, .json, .parquet, .csv or .tsv files", root.display());
        }
        v
    } else if root.is_file() {
        vec![root.clone()]
    } else {
        bail!(
            "dataset {} does not exist (expected a .jsonl, .json, .parquet, .csv or .tsv file, or a directory of them)",
            root.display()
        );
    };
    for f in &files {
        if !f.is_file() {
            bail!("dataset file {} does not exist", f.display());
        }
        if !is_data(f) {
            bail!("dataset file {}: expected a .jsonl, .json, .parquet, .csv or .tsv file", f.display());
        }
    }
    Ok(files)
}

/// A blake3 hash of everything that decides the cached sequences. Each
/// part is length-prefixed so no two different inputs hash the same bytes.
fn cache_key(
    ds: &DatasetConfig,
    opts: &PrepareOptions,
    files: &[PathBuf],
    contents: &[Vec<u8>],
    template: Option<&ChatTemplate>,
    tokenizer_dir: Option<&Path>,
) -> Result<blake3::Hash> {
    let mut h = blake3::Hasher::new();
    let mut part = |bytes: &[u8]| {
        h.update(&(bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    part(&cache::FORMAT_VERSION.to_le_bytes());
    for (f, bytes) in files.iter().zip(contents) {
        part(f.extension().and_then(|e| e.to_str()).unwrap_or("").as_bytes());
        part(bytes);
    }
    part(serde_json::to_string(ds)?.as_bytes());
    part(template.map(|t| t.source()).unwrap_or("").as_bytes());
    if let Some(dir) = tokenizer_dir {
        for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"] {
            part(&std::fs::read(dir.join(name)).unwrap_or_default());
        }
    }
    part(&(opts.sequence_len as u64).to_le_bytes());
    part(&[opts.train_on_inputs as u8, opts.excess_length as u8]);
    part(serde_json::to_string(&opts.special_tokens)?.as_bytes());
    Ok(h.finalize())
}

fn tokenize_files(
    format: &Format,
    ds: &DatasetConfig,
    files: &[PathBuf],
    contents: &[Vec<u8>],
    opts: &PrepareOptions,
    vocab: usize,
) -> Result<CachedDataset> {
    let mut all: Vec<(String, RawRow)> = Vec::new();
    for (f, bytes) in files.iter().zip(contents) {
        all.extend(rows::file_rows(f, bytes, ds.field.as_deref())?);
    }
    // Large datasets take a while to tokenize: show it on a terminal.
    let bar = if std::io::IsTerminal::is_terminal(&std::io::stderr()) && all.len() >= 10_000 {
        let bar = indicatif::ProgressBar::with_draw_target(Some(all.len() as u64), indicatif::ProgressDrawTarget::stderr());
        bar.set_style(
            indicatif::ProgressStyle::with_template("tokenizing {msg} {bar:28} {pos}/{len} rows {per_sec} eta {eta}")
                .expect("valid progress template"),
        );
        bar.set_message(ds.path.clone());
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let converted: Vec<Result<Vec<Sequence>>> = all
        .par_iter()
        .map(|(loc, raw)| {
            bar.inc(1);
            let v = raw.parse(loc)?;
            let seqs = format.to_sequences(&v, loc)?;
            for s in &seqs {
                check_vocab(s, vocab, loc)?;
            }
            Ok(seqs)
        })
        .collect();
    bar.finish_and_clear();
    let mut data = CachedDataset { sequences: Vec::with_capacity(all.len()), rows: all.len(), truncated: 0, dropped: 0 };
    for seqs in converted {
        for mut s in seqs? {
            if s.input_ids.len() > opts.sequence_len {
                match opts.excess_length {
                    ExcessLength::Drop => {
                        data.dropped += 1;
                        continue;
                    }
                    ExcessLength::Truncate => {
                        s.input_ids.truncate(opts.sequence_len);
                        s.labels.truncate(opts.sequence_len);
                        data.truncated += 1;
                    }
                }
            }
            data.sequences.push(s);
        }
    }
    if data.sequences.is_empty() {
        bail!(
            "{}: every one of its {} rows is longer than sequence_len {} and was dropped \
             (raise sequence_len or set excess_length_strategy: truncate)",
            ds.path,
            data.rows,
            opts.sequence_len
        );
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_local_data_file_is_not_taken_for_a_hub_id() {
        // No network is needed: a path ending like a data file stays local.
        let ds = DatasetConfig { path: "nowhere/train.jsonl".into(), ..Default::default() };
        let err = dataset_files(&ds, "train").unwrap_err().to_string();
        assert!(err.contains("dataset nowhere/train.jsonl does not exist"), "{err}");
    }

    #[test]
    fn val_count_fraction_rounds_up_and_counts_are_exact() {
        assert_eq!(val_count(0.0, 10).unwrap(), 0);
        assert_eq!(val_count(0.25, 10).unwrap(), 3);
        assert_eq!(val_count(2.0, 10).unwrap(), 2);
        assert!(val_count(10.0, 10).unwrap_err().to_string().contains("leaving none"));
        assert!(val_count(2.5, 10).unwrap_err().to_string().contains("whole number"));
        assert!(val_count(-1.0, 10).is_err());
    }

    #[test]
    fn shuffle_is_a_seeded_permutation() {
        let mut a: Vec<u32> = (0..50).collect();
        let mut b = a.clone();
        shuffle(&mut a, 3);
        shuffle(&mut b, 3);
        assert_eq!(a, b);
        assert_ne!(a, (0..50).collect::<Vec<_>>());
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
    }
}
