//! File patterns over a Hub dataset repo's file list, matched as the
//! `datasets` library matches them (fsspec globs on the `hf://` file
//! system), and the file-format tables it picks a reader with.
//!
//! - `*` and `?` never cross `/`; `**` as a whole path segment spans any
//!   number of directories (also none: `**/x` matches `x` at the root); `**`
//!   inside a segment is a `*`; `[...]` and `[!...]` are character classes.
//! - A pattern without `*`, `?` or `[` names one file.
//! - Hidden files and folders (a part starting with `.`), folders starting
//!   with `__`, and the repo's metadata files (README.md, config.json,
//!   dataset_info(s).json, dataset_dict.json, dummy_data.zip) are left out
//!   unless the pattern names them.

use anyhow::{Result, bail};
use regex::Regex;
use std::collections::HashMap;

/// Basenames that are never data unless a pattern names them.
const FILES_TO_IGNORE: [&str; 6] =
    ["README.md", "config.json", "dataset_info.json", "dataset_infos.json", "dummy_data.zip", "dataset_dict.json"];

/// The file formats the `datasets` library has a reader for, by extension:
/// every data file found must carry one of these (any of its suffixes).
const DATA_EXTENSIONS: &[(&str, &str)] = &[
    (".csv", "csv"),
    // The CSV reader with a tab separator: a reader of its own when
    // comparing splits (the datasets library refuses a csv train split
    // with a tsv test split).
    (".tsv", "tsv"),
    (".json", "json"),
    (".jsonl", "json"),
    (".ndjson", "json"),
    (".parquet", "parquet"),
    (".geoparquet", "parquet"),
    (".gpq", "parquet"),
    (".arrow", "arrow"),
    (".txt", "text"),
    (".conll", "conll"),
    (".conllu", "conll"),
    (".tar", "webdataset"),
    (".xml", "xml"),
    (".hdf5", "hdf5"),
    (".h5", "hdf5"),
    (".eval", "eval"),
    (".lance", "lance"),
    (".tsfile", "tsfile"),
];

/// Media folders' extensions (also accepted upper-case); a later table wins
/// an extension listed twice, as in the datasets library.
const MEDIA_EXTENSIONS: &[(&str, &[&str])] = &[
    (
        "imagefolder",
        &[
            ".blp", ".bmp", ".dib", ".bufr", ".cur", ".pcx", ".dcx", ".dds", ".ps", ".eps", ".fit", ".fits", ".fli",
            ".flc", ".ftc", ".ftu", ".gbr", ".gif", ".grib", ".png", ".apng", ".jp2", ".j2k", ".jpc", ".jpf", ".jpx",
            ".j2c", ".icns", ".ico", ".im", ".iim", ".tif", ".tiff", ".jfif", ".jpe", ".jpg", ".jpeg", ".mpg", ".mpeg",
            ".msp", ".pcd", ".pxr", ".pbm", ".pgm", ".ppm", ".pnm", ".psd", ".bw", ".rgb", ".rgba", ".sgi", ".ras",
            ".tga", ".icb", ".vda", ".vst", ".webp", ".wmf", ".emf", ".xbm", ".xpm",
        ],
    ),
    (
        "audiofolder",
        &[
            ".aiff", ".au", ".avr", ".caf", ".flac", ".htk", ".svx", ".mat4", ".mat5", ".mpc2k", ".ogg", ".paf",
            ".pvf", ".raw", ".rf64", ".sd2", ".sds", ".ircam", ".voc", ".w64", ".wav", ".nist", ".wavex", ".wve",
            ".xi", ".mp3", ".opus", ".3gp", ".3g2", ".avi", ".asf", ".flv", ".mp4", ".mov", ".m4v", ".mkv", ".mpg",
            ".webm", ".f4v", ".wmv", ".wma", ".ogm", ".mxf", ".nut",
        ],
    ),
    ("videofolder", &[".mkv", ".mp4", ".avi", ".mpeg", ".mov"]),
    ("meshfolder", &[".glb", ".ply", ".stl"]),
    ("pdffolder", &[".pdf"]),
    ("niftifolder", &[".nii"]),
];

/// Lance's metadata extensions, accepted as data-file extensions too.
const METADATA_EXTENSIONS: [&str; 3] = [".idx", ".txn", ".manifest"];
/// Folder datasets' metadata files: they never decide the format.
const METADATA_FILE_NAMES: [&str; 4] = ["metadata.csv", "metadata.jsonl", "metadata.parquet", "latest_version_hint.json"];

/// Extension -> reader name (exact case: media extensions are also listed
/// upper-case, data extensions only lower-case).
fn extension_table() -> HashMap<String, &'static str> {
    let mut t: HashMap<String, &'static str> = DATA_EXTENSIONS.iter().map(|(e, m)| (e.to_string(), *m)).collect();
    for (module, exts) in MEDIA_EXTENSIONS {
        for e in *exts {
            t.insert(e.to_string(), module);
            t.insert(e.to_uppercase(), module);
        }
    }
    t
}

/// The extensions of the reader `module`, plus `.zip` (archives of them).
pub fn module_extensions(module: &str) -> Vec<String> {
    let same = |m: &str| m == module || (matches!(m, "csv" | "tsv") && matches!(module, "csv" | "tsv"));
    let mut v: Vec<String> = extension_table().into_iter().filter(|(_, m)| same(m)).map(|(e, _)| e).collect();
    v.sort();
    v.push(".zip".into());
    v
}

fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// `.suffix` of every dot-separated part after the first of the basename.
fn suffixes(path: &str) -> impl Iterator<Item = String> + '_ {
    basename(path).split('.').skip(1).map(|s| format!(".{s}"))
}

/// Whether any suffix of the file is a data, archive or metadata extension.
fn has_allowed_extension(path: &str, table: &HashMap<String, &'static str>) -> bool {
    suffixes(path).any(|s| table.contains_key(&s) || s == ".zip" || METADATA_EXTENSIONS.contains(&s.as_str()))
}

/// Whether the pattern has glob characters (else it names one file).
pub fn has_magic(pattern: &str) -> bool {
    pattern.contains(['*', '?', '['])
}

/// A compiled fsspec pattern.
pub struct Glob(Regex);

impl Glob {
    pub fn new(pattern: &str) -> Result<Glob> {
        let parts: Vec<&str> = pattern.split('/').collect();
        let last = parts.len() - 1;
        let mut re = String::from("^(?s:");
        for (i, part) in parts.iter().enumerate() {
            match *part {
                "*" => re.push_str(if i < last { "[^/]+/" } else { "[^/]+" }),
                "**" if i < last => {
                    if parts[i + 1] != "**" {
                        re.push_str("(?:.+/)?");
                    }
                }
                "**" => re.push_str(".*"),
                _ => {
                    segment(part, &mut re);
                    if i < last {
                        re.push('/');
                    }
                }
            }
        }
        re.push_str(")\\z");
        match Regex::new(&re) {
            Ok(r) => Ok(Glob(r)),
            Err(e) => bail!("data_files pattern \"{pattern}\" is not a valid pattern: {e}"),
        }
    }

    pub fn matches(&self, path: &str) -> bool {
        self.0.is_match(path)
    }
}

/// One path segment in fnmatch terms (`*` and `?` stay inside the segment).
fn segment(part: &str, re: &mut String) {
    let chars: Vec<char> = part.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        i += 1;
        match c {
            '*' => {
                while chars.get(i) == Some(&'*') {
                    i += 1;
                }
                re.push_str("[^/]*");
            }
            '?' => re.push_str("[^/]"),
            '[' => {
                let mut j = i;
                if chars.get(j) == Some(&'!') {
                    j += 1;
                }
                if chars.get(j) == Some(&']') {
                    j += 1;
                }
                while j < chars.len() && chars[j] != ']' {
                    j += 1;
                }
                if j >= chars.len() {
                    re.push_str("\\[");
                    continue;
                }
                let mut class: &[char] = &chars[i..j];
                re.push('[');
                if class.first() == Some(&'!') {
                    re.push('^');
                    class = &class[1..];
                }
                for &k in class {
                    // Characters a Rust class treats specially are escaped.
                    if matches!(k, '\\' | ']' | '[' | '^' | '&' | '~') {
                        re.push('\\');
                    }
                    re.push(k);
                }
                re.push(']');
                i = j + 1;
            }
            _ => re.push_str(&regex::escape(&c.to_string())),
        }
    }
}

/// Path parts that start with `prefix`, ignoring "." and ".." alone.
fn special_parts(parts: &[&str], prefix: &str) -> usize {
    parts.iter().filter(|p| p.starts_with(prefix) && !p.chars().all(|c| c == '.')).count()
}

/// The files of `files` (repo paths) that `pattern` selects, sorted; with
/// `data_only`, only files with a data extension. A pattern that names one
/// file which is not there is an error; a glob may select nothing.
pub fn resolve(pattern: &str, files: &[String], data_only: bool) -> Result<Vec<String>> {
    let table = extension_table();
    let glob = Glob::new(pattern)?;
    let pattern_parts: Vec<&str> = pattern.split('/').collect();
    let pattern_dirs = &pattern_parts[..pattern_parts.len() - 1];
    let named = basename(pattern);
    let mut out: Vec<String> = files
        .iter()
        .filter(|f| if has_magic(pattern) { glob.matches(f) } else { f.as_str() == pattern })
        .filter(|f| {
            let parts: Vec<&str> = f.split('/').collect();
            let dirs = &parts[..parts.len() - 1];
            let name = basename(f);
            !(FILES_TO_IGNORE.contains(&name) && name != named)
                && special_parts(dirs, "__") == special_parts(pattern_dirs, "__")
                && special_parts(&parts, ".") == special_parts(&pattern_parts, ".")
                && (!data_only || has_allowed_extension(f, &table))
        })
        .cloned()
        .collect();
    out.sort();
    if out.is_empty() && !has_magic(pattern) {
        bail!("no file \"{pattern}\"");
    }
    Ok(out)
}

/// The reader the datasets library picks for these files: the most common
/// extension (metadata files count last; ties: .parquet, .lance, .arrow,
/// .jsonl, .json, .csv, then the extension's name), `"zip"` for archives.
pub fn infer_module(files: &[String]) -> Option<&'static str> {
    let table = extension_table();
    let mut counts: HashMap<(String, bool), usize> = HashMap::new();
    for f in files {
        let meta = METADATA_FILE_NAMES.contains(&basename(f));
        for s in suffixes(f) {
            *counts.entry((s.to_lowercase(), meta)).or_default() += 1;
        }
    }
    let rank = |e: &str| [".parquet", ".lance", ".arrow", ".jsonl", ".json", ".csv"].iter().position(|p| *p == e);
    let mut ranked: Vec<((String, bool), usize)> = counts.into_iter().collect();
    // Descending by (not metadata, count, favourite, extension).
    ranked.sort_by(|((ea, ma), ca), ((eb, mb), cb)| {
        (!mb, cb)
            .cmp(&(!ma, ca))
            .then_with(|| rank(ea).unwrap_or(usize::MAX).cmp(&rank(eb).unwrap_or(usize::MAX)))
            .then_with(|| eb.cmp(ea))
    });
    for ((ext, _), _) in ranked {
        if let Some(m) = table.get(&ext) {
            return Some(m);
        }
        if ext == ".zip" {
            return Some("zip");
        }
    }
    None
}

/// Whether one of `exts` ends the path, or is followed by another suffix
/// (`x.jsonl.gz` is a JSON file, compressed).
pub fn has_module_extension(path: &str, exts: &[String]) -> bool {
    exts.iter().any(|e| {
        path.match_indices(e.as_str()).any(|(i, _)| {
            let rest = &path[i + e.len()..];
            rest.is_empty() || (rest.starts_with('.') && rest.len() > 1)
        })
    })
}
