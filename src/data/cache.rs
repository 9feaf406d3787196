//! The tokenized-dataset cache: one compact binary file per dataset, named
//! by a blake3 key over everything that decides its contents. A file whose
//! header, key, length or checksum does not match is ignored (and rebuilt by
//! the caller), never trusted.
//!
//! Layout (little-endian): magic "FTDS", u32 version, 32-byte key, u64 rows,
//! u64 truncated, u64 dropped, u64 sequence count, then per sequence u32
//! length, length × u32 ids, length × i32 labels; last, the 32-byte blake3
//! hash of all the bytes before it.

use crate::model::batch::Sequence;
use anyhow::Result;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 4] = b"FTDS";
/// Bump when the bytes of a cached dataset would change for the same inputs
/// (file layout, or how rows are tokenized and labelled).
pub const FORMAT_VERSION: u32 = 1;

/// A tokenized dataset and the counts its report needs.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedDataset {
    pub sequences: Vec<Sequence>,
    pub rows: usize,
    pub truncated: usize,
    pub dropped: usize,
}

/// Where datasets are cached: `dataset_prepared_path`, else
/// $XDG_CACHE_HOME/ferrotune/datasets, else ~/.cache/ferrotune/datasets.
pub fn default_dir(dataset_prepared_path: Option<&str>) -> Option<PathBuf> {
    if let Some(p) = dataset_prepared_path {
        return Some(PathBuf::from(p));
    }
    let base = match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        Some(x) => PathBuf::from(x),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".cache"),
    };
    Some(base.join("ferrotune").join("datasets"))
}

/// The cache file of a key.
pub fn path_for(dir: &Path, key: &blake3::Hash) -> PathBuf {
    dir.join(format!("{}.ftds", key.to_hex()))
}

pub fn encode(key: &blake3::Hash, data: &CachedDataset) -> Vec<u8> {
    let n_tokens: usize = data.sequences.iter().map(|s| s.input_ids.len()).sum();
    let mut out = Vec::with_capacity(4 + 4 + 32 + 32 + data.sequences.len() * 4 + n_tokens * 8 + 32);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(key.as_bytes());
    for n in [data.rows, data.truncated, data.dropped, data.sequences.len()] {
        out.extend_from_slice(&(n as u64).to_le_bytes());
    }
    for s in &data.sequences {
        out.extend_from_slice(&(s.input_ids.len() as u32).to_le_bytes());
        out.extend(s.input_ids.iter().flat_map(|t| t.to_le_bytes()));
        out.extend(s.labels.iter().flat_map(|l| l.to_le_bytes()));
    }
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

/// The dataset in `bytes`, if they are an intact cache file for `key`.
pub fn decode(bytes: &[u8], key: &blake3::Hash) -> Option<CachedDataset> {
    let body_len = bytes.len().checked_sub(32)?;
    let (body, sum) = bytes.split_at(body_len);
    if blake3::hash(body).as_bytes() != sum {
        return None;
    }
    let mut r = Reader { buf: body, pos: 0 };
    if r.take(4)? != MAGIC || r.u32()? != FORMAT_VERSION || r.take(32)? != key.as_bytes() {
        return None;
    }
    let rows = r.u64()? as usize;
    let truncated = r.u64()? as usize;
    let dropped = r.u64()? as usize;
    let n = r.u64()? as usize;
    // Each sequence takes at least 4 bytes: a count beyond that is corrupt.
    if n > body.len() / 4 {
        return None;
    }
    let mut sequences = Vec::with_capacity(n);
    for _ in 0..n {
        let len = r.u32()? as usize;
        let ids = r.take(len.checked_mul(4)?)?;
        let labels = r.take(len * 4)?;
        sequences.push(Sequence {
            input_ids: ids.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect(),
            labels: labels.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap())).collect(),
        });
    }
    if r.pos != body.len() {
        return None;
    }
    Some(CachedDataset { sequences, rows, truncated, dropped })
}

/// Read a cache file; None when it is absent, unreadable or not intact.
pub fn load(path: &Path, key: &blake3::Hash) -> Option<CachedDataset> {
    decode(&std::fs::read(path).ok()?, key)
}

/// Write a cache file atomically (a crash leaves the old file or none).
pub fn store(path: &Path, key: &blake3::Hash, data: &CachedDataset) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("cannot create the dataset cache directory {}: {e}", dir.display()))?;
    }
    crate::util::atomic_write(path, &encode(key, data))
}

/// Remove the temporary files (`<key>.ftds.tmp`) that a run killed while
/// storing left in `dir`, when older than `age` (a younger one may be
/// another run's write in progress); returns the paths removed.
pub fn remove_stale(dir: &Path, age: std::time::Duration) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut removed = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let old = e.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok()).is_some_and(|a| a >= age);
        if name.ends_with(".ftds.tmp") && old && std::fs::remove_file(e.path()).is_ok() {
            removed.push(e.path());
        }
    }
    removed
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CachedDataset {
        CachedDataset {
            sequences: vec![
                Sequence { input_ids: vec![1, 2, 3], labels: vec![-100, 2, 3] },
                Sequence { input_ids: vec![7], labels: vec![7] },
            ],
            rows: 3,
            truncated: 1,
            dropped: 1,
        }
    }

    #[test]
    fn round_trips_and_rejects_any_damage() {
        let key = blake3::hash(b"k");
        let bytes = encode(&key, &sample());
        assert_eq!(decode(&bytes, &key), Some(sample()));
        assert_eq!(decode(&bytes, &blake3::hash(b"other")), None);
        for cut in [0, 1, 10, bytes.len() - 1] {
            assert_eq!(decode(&bytes[..cut], &key), None, "truncated at {cut}");
        }
        for i in [0, 5, 40, 80, bytes.len() - 1] {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            assert_eq!(decode(&bad, &key), None, "byte {i} flipped");
        }
    }
}
