//! A GGUF file summarised as the GGUF fixture script summarises the files
//! llama.cpp's tools write (tests/fixtures/gguf_models.py `read_gguf`):
//! every key with its type name and value (arrays longer than 8 as their
//! length and the sha256 of Python's `json.dumps` of the list), every tensor
//! with its type, ne, offset and the sha256 of its data, and the file's
//! sha256. Comparing two summaries names the first key or tensor that
//! differs, which a whole-file digest cannot.

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

fn hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Python's repr of a float (what json.dumps writes): the shortest digits
/// that round-trip, in fixed notation for exponents -4..16, otherwise
/// scientific with a signed two-digit exponent.
pub fn py_float(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    let sci = format!("{x:e}");
    let (mant, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("integer exponent");
    let (sign, mant) = mant.strip_prefix('-').map_or(("", mant), |m| ("-", m));
    let digits: String = mant.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let point = exp + 1;
        let body = if point <= 0 {
            format!("0.{}{digits}", "0".repeat((-point) as usize))
        } else if point as usize >= digits.len() {
            format!("{digits}{}.0", "0".repeat(point as usize - digits.len()))
        } else {
            format!("{}.{}", &digits[..point as usize], &digits[point as usize..])
        };
        format!("{sign}{body}")
    } else {
        let m = if digits.len() > 1 { format!("{}.{}", &digits[..1], &digits[1..]) } else { digits };
        format!("{sign}{m}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
    }
}

/// Python's json.dumps of a string (ensure_ascii).
pub fn py_str(s: &str) -> String {
    let mut out = String::new();
    ferrotune::util::write_json_str(&mut out, s, true);
    out
}

/// One array element, as `py_dumps` writes it and as the JSON value kept.
enum Item {
    Int(i64),
    UInt(u64),
    Float(f64),
    Bool(bool),
    Str(String),
}

impl Item {
    fn py(&self) -> String {
        match self {
            Item::Int(i) => i.to_string(),
            Item::UInt(u) => u.to_string(),
            Item::Float(f) => py_float(*f),
            Item::Bool(b) => if *b { "true".into() } else { "false".into() },
            Item::Str(s) => py_str(s),
        }
    }

    fn json(&self) -> Value {
        match self {
            Item::Int(i) => json!(i),
            Item::UInt(u) => json!(u),
            Item::Float(f) => json!(f),
            Item::Bool(b) => json!(b),
            Item::Str(s) => json!(s),
        }
    }
}

const VTYPES: [&str; 13] = ["UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "FLOAT32", "BOOL", "STRING", "ARRAY", "UINT64", "INT64", "FLOAT64"];

fn gtype(id: u32) -> Option<(&'static str, u64, u64)> {
    Some(match id {
        0 => ("F32", 1, 4),
        1 => ("F16", 1, 2),
        6 => ("Q5_0", 32, 22),
        7 => ("Q5_1", 32, 24),
        8 => ("Q8_0", 32, 34),
        12 => ("Q4_K", 256, 144),
        13 => ("Q5_K", 256, 176),
        14 => ("Q6_K", 256, 210),
        30 => ("BF16", 1, 2),
        _ => return None,
    })
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N]> {
        let s = self.buf.get(self.pos..self.pos + N).context("truncated GGUF")?;
        self.pos += N;
        Ok(s.try_into().expect("N bytes"))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take()?))
    }
    fn string(&mut self) -> Result<String> {
        let n = self.u64()? as usize;
        let s = self.buf.get(self.pos..self.pos + n).context("truncated GGUF string")?;
        self.pos += n;
        Ok(String::from_utf8(s.to_vec())?)
    }
    fn item(&mut self, t: u32) -> Result<Item> {
        Ok(match t {
            0 => Item::UInt(self.take::<1>()?[0] as u64),
            1 => Item::Int(self.take::<1>()?[0] as i8 as i64),
            2 => Item::UInt(u16::from_le_bytes(self.take()?) as u64),
            3 => Item::Int(i16::from_le_bytes(self.take()?) as i64),
            4 => Item::UInt(self.u32()? as u64),
            5 => Item::Int(i32::from_le_bytes(self.take()?) as i64),
            6 => Item::Float(f32::from_le_bytes(self.take()?) as f64),
            7 => Item::Bool(self.take::<1>()?[0] != 0),
            8 => Item::Str(self.string()?),
            10 => Item::UInt(self.u64()?),
            11 => Item::Int(i64::from_le_bytes(self.take()?)),
            12 => Item::Float(f64::from_le_bytes(self.take()?)),
            _ => bail!("GGUF value type {t}"),
        })
    }
}

/// The summary of the GGUF file in `buf`, in the fixture's JSON shape:
/// {"sha256", "size", "kv": [[key, type, value]], "tensors": [[name, type, ne, offset, sha256]]},
/// plus "data_start", the file offset tensor offsets count from.
pub fn summarize(buf: &[u8]) -> Result<Value> {
    let mut c = Cursor { buf, pos: 0 };
    if c.take::<4>()? != *b"GGUF" {
        bail!("not a GGUF file");
    }
    let version = c.u32()?;
    if version != 3 {
        bail!("GGUF version {version}");
    }
    let (n_tensors, n_kv) = (c.u64()?, c.u64()?);
    let mut kv = Vec::new();
    for _ in 0..n_kv {
        let key = c.string()?;
        let t = c.u32()?;
        if t == 9 {
            let (et, n) = (c.u32()?, c.u64()?);
            let items = (0..n).map(|_| c.item(et)).collect::<Result<Vec<Item>>>()?;
            let v = if n <= 8 {
                Value::Array(items.iter().map(Item::json).collect())
            } else {
                let py = format!("[{}]", items.iter().map(Item::py).collect::<Vec<_>>().join(", "));
                json!({"len": n, "sha256": hex(py.as_bytes())})
            };
            kv.push(json!([key, format!("ARRAY[{}]", VTYPES.get(et as usize).context("value type")?), v]));
        } else {
            let v = c.item(t)?.json();
            kv.push(json!([key, VTYPES.get(t as usize).context("value type")?, v]));
        }
    }
    let mut infos = Vec::new();
    for _ in 0..n_tensors {
        let name = c.string()?;
        let nd = c.u32()?;
        let ne = (0..nd).map(|_| c.u64()).collect::<Result<Vec<u64>>>()?;
        let (gt, off) = (c.u32()?, c.u64()?);
        infos.push((name, gt, ne, off));
    }
    let data_start = c.pos.div_ceil(32) * 32;
    let mut tensors = Vec::new();
    for (name, gt, ne, off) in infos {
        let (tn, blk, bs) = gtype(gt).with_context(|| format!("tensor {name}: ggml type {gt}"))?;
        let nbytes = (ne.iter().product::<u64>() / blk * bs) as usize;
        let at = data_start + off as usize;
        let data = buf.get(at..at + nbytes).with_context(|| format!("tensor {name} lies outside the file"))?;
        tensors.push(json!([name, tn, ne, off, hex(data)]));
    }
    Ok(json!({"sha256": hex(buf), "size": buf.len(), "data_start": data_start, "kv": kv, "tensors": tensors}))
}

/// The differences between two summaries, first ones first (empty: equal).
pub fn diff(ours: &Value, want: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let list = |v: &Value, k: &str| v.get(k).and_then(Value::as_array).cloned().unwrap_or_default();
    for what in ["kv", "tensors"] {
        let (a, b) = (list(ours, what), list(want, what));
        for i in 0..a.len().max(b.len()) {
            match (a.get(i), b.get(i)) {
                (Some(x), Some(y)) if x == y => {}
                (x, y) => out.push(format!("{what}[{i}]: ours {} / reference {}", x.map_or("-".into(), |v| v.to_string()), y.map_or("-".into(), |v| v.to_string()))),
            }
        }
    }
    if out.is_empty() && ours.get("sha256") != want.get("sha256") {
        out.push(format!("same keys and tensors, different files: sizes {} / {}", ours["size"], want["size"]));
    }
    out
}
