//! The GGUF v3 container, written as gguf-py's GGUFWriter and ggml's
//! gguf.cpp write it: header, metadata, tensor infos, zero padding to the
//! alignment, then each tensor's data followed by zero padding (the last one
//! included). Everything is little-endian; the alignment is 32 (neither the
//! converter nor llama-quantize writes general.alignment).
//!
//! The file is written under a temporary name beside the target and renamed
//! into place by `finish`: a failure or an interrupt leaves no partial .gguf.

use super::types::{GgmlType, Kvs, Value};
use anyhow::{Context, Result, bail};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

pub const ALIGNMENT: u64 = 32;
const MAGIC: &[u8; 4] = b"GGUF";
const VERSION: u32 = 3;

/// One tensor's entry in the header. `ne` is in ggml order: ne[0] is the
/// row length (the reverse of the torch shape).
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub ne: Vec<u64>,
    pub ty: GgmlType,
}

impl TensorInfo {
    pub fn n_values(&self) -> u64 {
        self.ne.iter().product()
    }

    pub fn n_bytes(&self) -> u64 {
        self.ty.bytes_for(self.n_values() as usize) as u64
    }
}

fn pad(n: u64) -> u64 {
    n.div_ceil(ALIGNMENT) * ALIGNMENT
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    out.extend_from_slice(&v.type_id().to_le_bytes());
    match v {
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(b) => out.push(*b as u8),
        Value::Str(s) => put_str(out, s),
        Value::ArrStr(xs) => {
            out.extend_from_slice(&8u32.to_le_bytes());
            out.extend_from_slice(&(xs.len() as u64).to_le_bytes());
            xs.iter().for_each(|s| put_str(out, s));
        }
        Value::ArrI32(xs) => {
            out.extend_from_slice(&5u32.to_le_bytes());
            out.extend_from_slice(&(xs.len() as u64).to_le_bytes());
            xs.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
        }
        Value::ArrF32(xs) => {
            out.extend_from_slice(&6u32.to_le_bytes());
            out.extend_from_slice(&(xs.len() as u64).to_le_bytes());
            xs.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
        }
    }
}

/// The bytes before the data section: header, metadata, tensor infos with
/// their offsets, and the padding to the alignment.
pub fn header_bytes(kvs: &Kvs, tensors: &[TensorInfo]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(kvs.0.len() as u64).to_le_bytes());
    for (k, v) in &kvs.0 {
        put_str(&mut out, k);
        put_value(&mut out, v);
    }
    let mut offset = 0u64;
    for t in tensors {
        put_str(&mut out, &t.name);
        out.extend_from_slice(&(t.ne.len() as u32).to_le_bytes());
        t.ne.iter().for_each(|n| out.extend_from_slice(&n.to_le_bytes()));
        out.extend_from_slice(&(t.ty as u32).to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        offset += pad(t.n_bytes());
    }
    out.resize(pad(out.len() as u64) as usize, 0);
    out
}

/// A GGUF file being written: the header first, then each tensor's data
/// in the order of the infos, each exactly its size.
pub struct GgufWriter {
    out: BufWriter<File>,
    tmp: PathBuf,
    dest: PathBuf,
    infos: Vec<TensorInfo>,
    next: usize,
    /// Bytes written of the current tensor.
    part: u64,
    written: u64,
    finished: bool,
}

impl GgufWriter {
    pub fn create(dest: &Path, kvs: &Kvs, infos: Vec<TensorInfo>) -> Result<GgufWriter> {
        let name = dest.file_name().with_context(|| format!("--out {}: not a file path", dest.display()))?;
        let tmp = dest.with_file_name(format!(".{}.partial", name.to_string_lossy()));
        let file = File::create(&tmp).with_context(|| format!("cannot write {} (is its folder writable?)", tmp.display()))?;
        let header = header_bytes(kvs, &infos);
        let mut w = GgufWriter {
            out: BufWriter::with_capacity(8 << 20, file),
            tmp,
            dest: dest.to_path_buf(),
            infos,
            next: 0,
            part: 0,
            written: header.len() as u64,
            finished: false,
        };
        // From here on, dropping `w` removes the temporary file.
        w.out.write_all(&header).with_context(|| format!("writing {}", w.tmp.display()))?;
        Ok(w)
    }

    /// Append the whole data of the next tensor.
    pub fn write_tensor(&mut self, data: &[u8]) -> Result<()> {
        self.begin_tensor()?;
        self.write_part(data)?;
        self.end_tensor()
    }

    /// Start the next tensor; its data follows in parts.
    pub fn begin_tensor(&mut self) -> Result<()> {
        if self.next >= self.infos.len() {
            bail!("internal: more tensor data than tensor infos");
        }
        self.part = 0;
        Ok(())
    }

    pub fn write_part(&mut self, data: &[u8]) -> Result<()> {
        self.part += data.len() as u64;
        self.out.write_all(data).with_context(|| format!("writing {}", self.tmp.display()))
    }

    /// Close the current tensor: its size must be exactly its info's; the
    /// zero padding to the alignment follows.
    pub fn end_tensor(&mut self) -> Result<()> {
        let info = &self.infos[self.next];
        if self.part != info.n_bytes() {
            bail!("internal: tensor {} has {} bytes of data, its info says {}", info.name, self.part, info.n_bytes());
        }
        let padded = pad(self.part);
        self.out.write_all(&vec![0u8; (padded - self.part) as usize]).with_context(|| format!("writing {}", self.tmp.display()))?;
        self.written += padded;
        self.next += 1;
        Ok(())
    }

    /// Flush, sync and rename the file into place; returns its size.
    pub fn finish(mut self) -> Result<u64> {
        if self.next != self.infos.len() {
            bail!("internal: {} of {} tensors written", self.next, self.infos.len());
        }
        self.out.flush().with_context(|| format!("writing {}", self.tmp.display()))?;
        self.out.get_ref().sync_all().with_context(|| format!("writing {}", self.tmp.display()))?;
        std::fs::rename(&self.tmp, &self.dest).with_context(|| format!("cannot move {} to {}", self.tmp.display(), self.dest.display()))?;
        self.finished = true;
        Ok(self.written)
    }
}

impl Drop for GgufWriter {
    fn drop(&mut self) {
        if !self.finished {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_layout_is_gguf_v3() {
        let mut kvs = Kvs::default();
        kvs.set("general.architecture", Value::Str("llama".into()));
        kvs.set("x.n", Value::U32(7));
        let infos = vec![TensorInfo { name: "a".into(), ne: vec![3], ty: GgmlType::F32 }, TensorInfo { name: "b".into(), ne: vec![2, 2], ty: GgmlType::F16 }];
        let h = header_bytes(&kvs, &infos);
        assert_eq!(&h[..4], b"GGUF");
        assert_eq!(u32::from_le_bytes(h[4..8].try_into().unwrap()), 3);
        assert_eq!(u64::from_le_bytes(h[8..16].try_into().unwrap()), 2);
        assert_eq!(u64::from_le_bytes(h[16..24].try_into().unwrap()), 2);
        assert_eq!(h.len() % 32, 0);
        // The second tensor starts at the first one's 12 bytes padded to 32.
        let pos = h.windows(1 + 8 + 4 + 16 + 4).position(|w| w[0] == b'b').unwrap();
        let off_at = pos + 1 + 4 + 16 + 4;
        assert_eq!(u64::from_le_bytes(h[off_at..off_at + 8].try_into().unwrap()), 32);
    }
}
