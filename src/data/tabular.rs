//! Parquet and CSV/TSV dataset files into JSON rows, each located as
//! `file:row N` (N counts data rows from 1), so that they feed the same
//! readers as JSON Lines rows.
//!
//! Parquet: every column of a row, through the parquet crate's record API:
//! strings, integers, floats, booleans and null as themselves, lists as
//! arrays, structs as objects (a chat `messages` column of
//! LIST<STRUCT<role, content>> gives the same row as its JSON Lines twin),
//! maps as objects; binary values as text when they are UTF-8 (else a
//! list of byte values); decimals, dates and timestamps as text. A NaN or infinite float becomes null (JSON has no such number).
//!
//! CSV (`,`) and TSV (tab): the first row names the columns, and each
//! column is typed as pandas' `read_csv` (the datasets library's CSV
//! reader) types it:
//! - the missing-value spellings (empty, NA, N/A, NaN, null, None, ...)
//!   are null everywhere;
//! - a column whose other values are all integers gives numbers (floats
//!   when a value is missing, as pandas stores them); all numbers (some
//!   with a fraction or exponent): floats; all True/true/TRUE/False/
//!   false/FALSE: booleans; anything else: strings, as written.

use anyhow::{Result, anyhow, bail};
use serde_json::{Map, Number, Value};
use std::path::Path;

/// The rows of a parquet file.
pub fn parquet_rows(path: &Path) -> Result<Vec<(String, Value)>> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let name = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|e| anyhow!("cannot read dataset file {name}: {e}"))?;
    let reader =
        SerializedFileReader::new(file).map_err(|e| anyhow!("{name}: not a readable parquet file: {e}"))?;
    let rows = reader.get_row_iter(None).map_err(|e| anyhow!("{name}: cannot read the parquet rows: {e}"))?;
    let mut out = Vec::new();
    for (i, row) in rows.enumerate() {
        let row = row.map_err(|e| anyhow!("{name}:row {}: cannot read the parquet row: {e}", i + 1))?;
        out.push((format!("{name}:row {}", i + 1), row_json(&row)));
    }
    if out.is_empty() {
        bail!("{name}: the dataset file has no rows");
    }
    Ok(out)
}

fn row_json(row: &parquet::record::Row) -> Value {
    Value::Object(row.get_column_iter().map(|(k, v)| (k.clone(), field_json(v))).collect())
}

/// One parquet value as JSON.
fn field_json(f: &parquet::record::Field) -> Value {
    use parquet::record::Field;
    let float = |x: f64| Number::from_f64(x).map(Value::Number).unwrap_or(Value::Null);
    match f {
        Field::Null => Value::Null,
        Field::Bool(b) => Value::Bool(*b),
        Field::Byte(n) => (*n).into(),
        Field::Short(n) => (*n).into(),
        Field::Int(n) => (*n).into(),
        Field::Long(n) => (*n).into(),
        Field::UByte(n) => (*n).into(),
        Field::UShort(n) => (*n).into(),
        Field::UInt(n) => (*n).into(),
        Field::ULong(n) => (*n).into(),
        Field::Float16(x) => float(f64::from(*x)),
        Field::Float(x) => float(f64::from(*x)),
        Field::Double(x) => float(*x),
        Field::Str(s) => Value::String(s.clone()),
        Field::Bytes(b) => match std::str::from_utf8(b.data()) {
            Ok(s) => Value::String(s.to_string()),
            Err(_) => Value::Array(b.data().iter().map(|&x| x.into()).collect()),
        },
        Field::Group(row) => row_json(row),
        Field::ListInternal(list) => Value::Array(list.elements().iter().map(field_json).collect()),
        Field::MapInternal(map) => Value::Object(
            map.entries()
                .iter()
                .map(|(k, v)| {
                    let key = match field_json(k) {
                        Value::String(s) => s,
                        other => other.to_string(),
                    };
                    (key, field_json(v))
                })
                .collect(),
        ),
        // Decimals, dates, times and timestamps: the parquet crate's text.
        other => Value::String(other.to_string().trim_matches('"').to_string()),
    }
}

/// pandas' default missing-value spellings.
const NA: [&str; 19] = [
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A", "NA",
    "NULL", "NaN", "None", "n/a", "nan", "null",
];

/// How a column's values are typed.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Column {
    Int,
    UInt,
    Float,
    Bool,
    Text,
}

fn is_int(s: &str) -> bool {
    let digits = s.strip_prefix(['+', '-']).unwrap_or(s);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "True" | "true" | "TRUE" => Some(true),
        "False" | "false" | "FALSE" => Some(false),
        _ => None,
    }
}

/// A float as pandas reads one: decimal digits with an optional fraction
/// and exponent, or inf/infinity (any case).
fn parse_float(s: &str) -> Option<f64> {
    let body = s.strip_prefix(['+', '-']).unwrap_or(s);
    let word = body.to_ascii_lowercase();
    if word == "inf" || word == "infinity" {
        return s.parse::<f64>().ok();
    }
    let ok = !body.is_empty() && body.bytes().all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-'));
    ok.then(|| s.parse::<f64>().ok()).flatten()
}

/// The type pandas gives a column with these (non-missing) values.
fn column_type<'a>(values: impl Iterator<Item = &'a str> + Clone) -> Column {
    let mut vals = values.filter(|v| !NA.contains(v)).peekable();
    if vals.peek().is_none() {
        return Column::Float;
    }
    let all = |f: &dyn Fn(&str) -> bool| vals.clone().all(f);
    if all(&|v| is_int(v) && v.parse::<i64>().is_ok()) {
        Column::Int
    } else if all(&|v| is_int(v) && v.parse::<u64>().is_ok()) {
        Column::UInt
    } else if all(&|v| parse_float(v).is_some()) {
        Column::Float
    } else if all(&|v| parse_bool(v).is_some()) {
        Column::Bool
    } else {
        Column::Text
    }
}

/// One value of a column typed `kind`; `missing` is whether the column has
/// a missing value (an integer column then holds floats).
fn typed(v: &str, kind: Column, missing: bool) -> Value {
    if NA.contains(&v) {
        return Value::Null;
    }
    let float = |x: f64| Number::from_f64(x).map(Value::Number).unwrap_or(Value::Null);
    match kind {
        Column::Int if missing => float(v.parse::<i64>().map(|x| x as f64).unwrap_or(f64::NAN)),
        Column::UInt if missing => float(v.parse::<u64>().map(|x| x as f64).unwrap_or(f64::NAN)),
        Column::Int => v.parse::<i64>().map(|x| Value::Number(x.into())).unwrap_or(Value::Null),
        Column::UInt => v.parse::<u64>().map(|x| Value::Number(x.into())).unwrap_or(Value::Null),
        Column::Float => float(parse_float(v).unwrap_or(f64::NAN)),
        Column::Bool => parse_bool(v).map(Value::Bool).unwrap_or(Value::Null),
        Column::Text => Value::String(v.to_string()),
    }
}

/// The rows of a CSV (`tab`: TSV) file's bytes.
pub fn csv_rows(bytes: &[u8], name: &str, tab: bool) -> Result<Vec<(String, Value)>> {
    let text = super::rows::text(bytes, name)?;
    let mut reader = csv::ReaderBuilder::new().delimiter(if tab { b'\t' } else { b',' }).from_reader(text.as_bytes());
    let header: Vec<String> = reader
        .headers()
        .map_err(|e| anyhow!("{name}:1: malformed header row: {e}"))?
        .iter()
        .map(str::to_string)
        .collect();
    if header.iter().all(String::is_empty) {
        bail!("{name}: the first row must name the columns");
    }
    if let Some(dup) = header.iter().enumerate().find(|(i, h)| header[..*i].contains(h)).map(|(_, h)| h) {
        bail!("{name}:1: the column \"{dup}\" is named twice");
    }
    let mut records = Vec::new();
    for (i, rec) in reader.records().enumerate() {
        let rec = rec.map_err(|e| {
            let line = e.position().map(|p| p.line()).unwrap_or(i as u64 + 2);
            anyhow!("{name}:{line}: malformed row: {e}")
        })?;
        if rec.len() != header.len() {
            let line = rec.position().map(|p| p.line()).unwrap_or(i as u64 + 2);
            bail!("{name}:{line}: the row has {} values for {} columns", rec.len(), header.len());
        }
        records.push(rec);
    }
    if records.is_empty() {
        bail!("{name}: the dataset file has no rows");
    }
    let kinds: Vec<(Column, bool)> = (0..header.len())
        .map(|c| {
            let col = records.iter().map(move |r| &r[c]);
            (column_type(col.clone()), col.clone().any(|v| NA.contains(&v)))
        })
        .collect();
    Ok(records
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let row: Map<String, Value> =
                header.iter().zip(r.iter()).zip(&kinds).map(|((h, v), (k, m))| (h.clone(), typed(v, *k, *m))).collect();
            (format!("{name}:row {}", i + 1), Value::Object(row))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rows(text: &str) -> Vec<Value> {
        csv_rows(text.as_bytes(), "f.csv", false).unwrap().into_iter().map(|(_, v)| v).collect()
    }

    #[test]
    fn csv_columns_are_typed_as_pandas_types_them() {
        let got = rows("i,f,s,b,im,na,big\n1,1.5,x,True,1,,18446744073709551615\n-2,2,None,false,,NA,1\n+3,1e3,7,TRUE,3,,2\n");
        assert_eq!(
            got,
            [
                json!({"i": 1, "f": 1.5, "s": "x", "b": true, "im": 1.0, "na": null, "big": 18446744073709551615u64}),
                json!({"i": -2, "f": 2.0, "s": null, "b": false, "im": null, "na": null, "big": 1u64}),
                json!({"i": 3, "f": 1000.0, "s": "7", "b": true, "im": 3.0, "na": null, "big": 2u64}),
            ]
        );
    }

    #[test]
    fn csv_locations_and_errors_name_the_row() {
        let r = csv_rows(b"a,b\n1,2\n\"x\ny\",3\n", "f.csv", false).unwrap();
        assert_eq!(r.iter().map(|(l, _)| l.as_str()).collect::<Vec<_>>(), ["f.csv:row 1", "f.csv:row 2"]);
        assert_eq!(r[1].1, json!({"a": "x\ny", "b": 3}));
        let e = csv_rows(b"a,b\n1,2\n3\n", "f.csv", false).unwrap_err().to_string();
        assert!(e.starts_with("f.csv:3:"), "{e}");
        assert_eq!(csv_rows(b"a,b\n", "f.csv", false).unwrap_err().to_string(), "f.csv: the dataset file has no rows");
        assert_eq!(csv_rows(b"a,a\n1,2\n", "f.csv", false).unwrap_err().to_string(), "f.csv:1: the column \"a\" is named twice");
        // Blank lines are skipped, as pandas skips them.
        assert_eq!(rows("a,b\n1,2\n\n3,4\n"), [json!({"a": 1, "b": 2}), json!({"a": 3, "b": 4})]);
        let tsv = csv_rows(b"q\tr\nhello, world\t1\n", "f.tsv", true).unwrap();
        assert_eq!(tsv[0].1, json!({"q": "hello, world", "r": 1}));
    }
}
