//! Finding and loading the CUDA libraries before cudarc asks for them.
//!
//! cudarc opens libcuda and libcublas by soname and panics when the dynamic
//! loader cannot find one, which is the usual state of a machine whose CUDA
//! came from pip's nvidia-* wheels, a conda env or a toolkit folder that is
//! not in the loader's path. [`load`] looks in the places a PyTorch user
//! would expect, then opens each library by full path with RTLD_GLOBAL. The
//! loader matches cudarc's later open by soname against the already-loaded
//! library, so cudarc binds to it. A library that cannot be found is one
//! error naming it and every place searched.
//!
//! The search costs nothing that every CPU run would pay: the folders of
//! [`cheap_places`] (LD_LIBRARY_PATH, CUDA_HOME / CUDA_PATH, the active venv
//! or conda env, ./.venv, the system folders, /usr/local/cuda*) are only
//! listed; the places that need a program run (`spawned_places`: the
//! nvidia-* wheels of the `python3` on PATH, the loader cache) are asked
//! only while a required library is still missing, or when `ferrotune env`
//! wants every place ([`the_full_search`]). [`driver_cheaply_found`] lets
//! `--device auto` settle on the CPU without either.
//!
//! A new library is a new [`Wanted`] in [`WANTED`]; a new place to look is a
//! new entry of [`cheap_places`], or of `spawned_places` (libs/spawned.rs)
//! when it needs a program run.

mod spawned;

use spawned::spawned_places;
use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The CUDA major version this build's libraries must have (the cargo
/// feature picks cudarc's bindings, which match one major).
pub const CUDA_MAJOR: u32 = if cfg!(feature = "cuda-13") { 13 } else { 12 };

/// One library ferrotune can use.
pub struct Wanted {
    /// File stem: "cublas" for libcublas.so.12.
    pub stem: &'static str,
    /// What it is, for messages.
    pub what: &'static str,
    /// A symbol it exports, to find the file of an already-loaded copy.
    pub symbol: &'static str,
    /// Its soname's version suffix when it is not the CUDA major (the
    /// driver is libcuda.so.1 whatever CUDA it supports).
    pub fixed_suffix: Option<&'static str>,
    /// Whether training needs it (nvrtc is only reported: the kernels are
    /// precompiled PTX).
    pub required: bool,
    /// The pip wheel that ships it.
    pub wheel: &'static str,
}

pub const DRIVER: usize = 0;
pub const CUBLAS_LT: usize = 1;
pub const CUBLAS: usize = 2;
pub const NVRTC: usize = 3;

/// In load order: libcublas needs libcublasLt loaded first.
pub static WANTED: [Wanted; 4] = [
    Wanted { stem: "cuda", what: "the CUDA driver", symbol: "cuInit", fixed_suffix: Some("1"), required: true, wheel: "" },
    Wanted { stem: "cublasLt", what: "cuBLASLt", symbol: "cublasLtCreate", fixed_suffix: None, required: false, wheel: "nvidia-cublas" },
    Wanted { stem: "cublas", what: "cuBLAS", symbol: "cublasCreate_v2", fixed_suffix: None, required: true, wheel: "nvidia-cublas" },
    Wanted { stem: "nvrtc", what: "NVRTC", symbol: "nvrtcVersion", fixed_suffix: None, required: false, wheel: "nvidia-cuda-nvrtc" },
];

impl Wanted {
    /// The soname cudarc accepts: libcublas.so.12, libcuda.so.1.
    pub fn soname(&self) -> String {
        match self.fixed_suffix {
            Some(s) => format!("lib{}.so.{s}", self.stem),
            None => format!("lib{}.so.{CUDA_MAJOR}", self.stem),
        }
    }
    fn unversioned(&self) -> String {
        format!("lib{}.so", self.stem)
    }
    fn install_hint(&self) -> String {
        if self.stem == "cuda" {
            return "install the NVIDIA driver (>= 550) or run with --device cpu".into();
        }
        format!(
            "install it (`pip install {}-cu{CUDA_MAJOR}`, or the CUDA {CUDA_MAJOR} toolkit) or add its folder to LD_LIBRARY_PATH",
            self.wheel
        )
    }
}

/// A source of folders to look in, as reported to the user.
pub struct Place {
    /// "LD_LIBRARY_PATH", "CUDA_HOME", "python3 site-packages", ...
    pub source: String,
    pub dirs: Vec<PathBuf>,
    /// Why it gave no folders ("unset", "no python3 on PATH").
    pub note: Option<String>,
}

/// Where one library was found, or not.
pub struct Located {
    pub path: Option<PathBuf>,
    /// It was already in this process (loaded by whoever started it).
    pub preloaded: bool,
    /// Copies of other CUDA majors seen on the way (libcublas.so.13 when this
    /// build needs .so.12).
    pub other_majors: Vec<PathBuf>,
}

impl Located {
    /// The version in the file name the soname links to (12.4.5.8), if any.
    pub fn version(&self) -> Option<String> {
        let real = std::fs::canonicalize(self.path.as_ref()?).ok()?;
        let name = real.file_name()?.to_string_lossy().into_owned();
        let v = name.split_once(".so.")?.1.to_string();
        (!v.is_empty()).then_some(v)
    }
}

/// The outcome of a search: every library in [`WANTED`] order, and the places.
pub struct Search {
    pub libs: Vec<Located>,
    pub places: Vec<Place>,
}

impl Search {
    /// "LD_LIBRARY_PATH (/a, /b); CUDA_HOME (unset); ..." for messages.
    pub fn searched(&self) -> String {
        let parts: Vec<String> = self
            .places
            .iter()
            .map(|p| {
                if p.dirs.is_empty() {
                    format!("{} ({})", p.source, p.note.as_deref().unwrap_or("none"))
                } else {
                    let d: Vec<String> = p.dirs.iter().map(|d| d.display().to_string()).collect();
                    format!("{} ({})", p.source, d.join(", "))
                }
            })
            .collect();
        parts.join("; ")
    }

    /// One line for a library that is missing: its name, any copy of another
    /// CUDA major, what to do, and every place searched.
    pub fn missing_message(&self, i: usize) -> String {
        let w = &WANTED[i];
        let loc = &self.libs[i];
        let mut msg = format!("{} ({}) not found", w.soname(), w.what);
        if !loc.other_majors.is_empty() {
            let found: Vec<String> = loc.other_majors.iter().map(|p| p.display().to_string()).collect();
            let hint = if cfg!(feature = "cuda-13") { "the default features (CUDA 12)" } else { "--no-default-features --features cuda-13" };
            msg += &format!(
                "; found {}, another CUDA major version: this build needs CUDA {CUDA_MAJOR}'s (or rebuild ferrotune with {hint})",
                found.join(", ")
            );
        }
        format!("{msg}; {}; searched: {}", w.install_hint(), self.searched())
    }
}

fn env_dirs(var: &str) -> Place {
    match std::env::var_os(var).filter(|v| !v.is_empty()) {
        Some(v) => Place { source: var.into(), dirs: std::env::split_paths(&v).filter(|d| !d.as_os_str().is_empty()).collect(), note: None },
        None => Place { source: var.into(), dirs: vec![], note: Some("unset".into()) },
    }
}

/// The lib folders of the nvidia-* wheels in a site-packages folder
/// (site-packages/nvidia/cublas/lib, nvidia/cuda_nvrtc/lib, ...).
fn wheel_dirs(site_packages: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(site_packages.join("nvidia")) else { return vec![] };
    let mut dirs: Vec<PathBuf> = entries.filter_map(|e| Some(e.ok()?.path().join("lib"))).filter(|d| d.is_dir()).collect();
    dirs.sort();
    dirs
}

/// site-packages folders of a venv or conda env (lib/python3.*/site-packages).
fn env_site_packages(root: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(root.join("lib")) else { return vec![] };
    let mut sp: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("python3")))
        .map(|p| p.join("site-packages"))
        .filter(|p| p.is_dir())
        .collect();
    sp.sort();
    sp
}

fn venv_place(source: &str, root: Option<PathBuf>, with_lib: bool) -> Place {
    let Some(root) = root else { return Place { source: source.into(), dirs: vec![], note: Some("unset".into()) } };
    let mut dirs = Vec::new();
    if with_lib {
        dirs.push(root.join("lib"));
    }
    for sp in env_site_packages(&root) {
        dirs.extend(wheel_dirs(&sp));
    }
    let note = dirs.is_empty().then(|| format!("no nvidia-* wheels under {}", root.display()));
    Place { source: source.into(), dirs, note }
}

fn existing(source: &str, candidates: Vec<PathBuf>) -> Place {
    let dirs: Vec<PathBuf> = candidates.into_iter().filter(|d| d.is_dir()).collect();
    let note = dirs.is_empty().then(|| "none".to_string());
    Place { source: source.into(), dirs, note }
}

/// The places looked in first, in order: folders named by the environment
/// or fixed, listed without running anything.
pub fn cheap_places() -> Vec<Place> {
    let home_dirs = |var: &str| -> Place {
        match std::env::var_os(var).filter(|v| !v.is_empty()) {
            Some(v) => {
                let root = PathBuf::from(v);
                Place { source: var.into(), dirs: vec![root.join("lib64"), root.join("lib"), root.join("targets/x86_64-linux/lib")], note: None }
            }
            None => Place { source: var.into(), dirs: vec![], note: Some("unset".into()) },
        }
    };
    let mut usr_local: Vec<PathBuf> = vec![PathBuf::from("/usr/local/cuda")];
    if let Ok(entries) = std::fs::read_dir("/usr/local") {
        let mut versioned: Vec<PathBuf> = entries
            .filter_map(|e| Some(e.ok()?.path()))
            .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("cuda-")))
            .collect();
        // Newest first.
        versioned.sort();
        versioned.reverse();
        usr_local.extend(versioned);
    }
    let usr_local: Vec<PathBuf> = usr_local.iter().flat_map(|r| [r.join("lib64"), r.join("targets/x86_64-linux/lib")]).chain([PathBuf::from("/opt/cuda/lib64")]).collect();
    let system = ["/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/lib64", "/lib", "/usr/lib/wsl/lib"];
    vec![
        env_dirs("LD_LIBRARY_PATH"),
        home_dirs("CUDA_HOME"),
        home_dirs("CUDA_PATH"),
        venv_place("VIRTUAL_ENV", std::env::var_os("VIRTUAL_ENV").filter(|v| !v.is_empty()).map(PathBuf::from), false),
        venv_place("CONDA_PREFIX", std::env::var_os("CONDA_PREFIX").filter(|v| !v.is_empty()).map(PathBuf::from), true),
        if Path::new(".venv").is_dir() {
            venv_place("./.venv", Some(PathBuf::from(".venv")), false)
        } else {
            Place { source: "./.venv".into(), dirs: vec![], note: Some("none here".into()) }
        },
        existing("system folders", system.iter().map(PathBuf::from).collect()),
        existing("/usr/local/cuda*", usr_local),
    ]
}

/// The CUDA major a library file is, from its name or the name its symlinks
/// resolve to (libcublas.so -> libcublas.so.12.4.5.8); None when the name
/// carries none (an unversioned build, as the emulator's).
fn major_of(path: &Path, stem: &str) -> Option<u32> {
    let prefix = format!("lib{stem}.so.");
    let name_major = |p: &Path| -> Option<u32> {
        let name = p.file_name()?.to_string_lossy().into_owned();
        name.strip_prefix(&prefix)?.split('.').next()?.parse().ok()
    };
    name_major(path).or_else(|| name_major(&std::fs::canonicalize(path).ok()?))
}

/// Looks for `w` in `dir`: its soname, else an unversioned file of no other
/// major; copies of other majors go to `others`.
fn look_in(dir: &Path, w: &Wanted, others: &mut Vec<PathBuf>) -> Option<PathBuf> {
    let exact = dir.join(w.soname());
    if exact.is_file() {
        return Some(exact);
    }
    let want_major = if w.fixed_suffix.is_some() { None } else { Some(CUDA_MAJOR) };
    let plain = dir.join(w.unversioned());
    let mut plain_is_other = false;
    if plain.is_file() {
        match (major_of(&plain, w.stem), want_major) {
            (Some(m), Some(want)) if m != want => plain_is_other = true,
            _ => return Some(plain),
        }
    }
    if want_major.is_some()
        && let Ok(entries) = std::fs::read_dir(dir)
    {
        let prefix = format!("lib{}.so.", w.stem);
        let mut seen: Vec<PathBuf> = entries
            .filter_map(|e| Some(e.ok()?.path()))
            .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&prefix)))
            .collect();
        seen.sort();
        // Name the sonames (libcublas.so.11), not also each one's full
        // version (libcublas.so.11.2.3), when there are any.
        let sonames: Vec<PathBuf> =
            seen.iter().filter(|p| p.file_name().is_some_and(|n| !n.to_string_lossy()[prefix.len()..].contains('.'))).cloned().collect();
        let mut named = if sonames.is_empty() { seen } else { sonames };
        if named.is_empty() && plain_is_other {
            named.push(plain);
        }
        others.extend(named.into_iter().filter(|p| !others.contains(p)).collect::<Vec<_>>());
    }
    None
}

/// Whether a library of this soname (or the unversioned name) is already in
/// the process, and its file.
fn already_loaded(w: &Wanted) -> Option<PathBuf> {
    for name in [w.soname(), w.unversioned()] {
        let c = CString::new(name).ok()?;
        // SAFETY: RTLD_NOLOAD only looks the name up among loaded objects.
        let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_LAZY | libc::RTLD_NOLOAD) };
        if h.is_null() {
            continue;
        }
        let sym = CString::new(w.symbol).ok()?;
        // SAFETY: h is a live handle; dladdr fills `info` for an address
        // inside a loaded object.
        let path = unsafe {
            let f = libc::dlsym(h, sym.as_ptr());
            let mut info: libc::Dl_info = std::mem::zeroed();
            let p = if !f.is_null() && libc::dladdr(f, &mut info) != 0 && !info.dli_fname.is_null() {
                Some(PathBuf::from(CStr::from_ptr(info.dli_fname).to_string_lossy().into_owned()))
            } else {
                None
            };
            libc::dlclose(h);
            p
        };
        return Some(path.unwrap_or_else(|| PathBuf::from(w.soname())));
    }
    None
}

/// How far [`search`] looks.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    /// The spawned places only while a required library is still missing.
    AsNeeded,
    /// Every place, for `ferrotune env`'s list.
    Everywhere,
}

/// Looks for `w` in `places`' folders, in order; other majors seen go to `others`.
fn find_in(places: &[Place], w: &Wanted, others: &mut Vec<PathBuf>) -> Option<PathBuf> {
    places.iter().flat_map(|p| p.dirs.iter()).find_map(|d| look_in(d, w, others))
}

/// Looks for every library in [`WANTED`]; loads nothing. A library is taken
/// from the first place that has it, the cheap places before the spawned
/// ones, so both depths pick the same required libraries.
pub fn search(depth: Depth) -> Search {
    let mut places = cheap_places();
    let mut libs: Vec<Located> = WANTED
        .iter()
        .map(|w| {
            if let Some(path) = already_loaded(w) {
                return Located { path: Some(path), preloaded: true, other_majors: vec![] };
            }
            let mut others = Vec::new();
            let path = find_in(&places, w, &mut others);
            // Other majors are kept even when a right copy was found:
            // `ferrotune env` lists them.
            Located { path, preloaded: false, other_majors: others }
        })
        .collect();
    let missing_required = WANTED.iter().zip(&libs).any(|(w, l)| w.required && l.path.is_none());
    if missing_required || depth == Depth::Everywhere {
        let spawned = spawned_places();
        for (w, l) in WANTED.iter().zip(libs.iter_mut()) {
            if l.path.is_none() {
                l.path = find_in(&spawned, w, &mut l.other_majors);
            }
        }
        places.extend(spawned);
    }
    // cuBLASLt from cuBLAS's own folder: the two come from one release.
    if let Some(dir) = libs[CUBLAS].path.as_ref().and_then(|p| p.parent()).filter(|_| !libs[CUBLAS].preloaded) {
        let lt = dir.join(WANTED[CUBLAS_LT].soname());
        if lt.is_file() && !libs[CUBLAS_LT].preloaded {
            libs[CUBLAS_LT].path = Some(lt);
        }
    }
    Search { libs, places }
}

/// Whether the CUDA driver can be had without running a program: already
/// in the process, in a cheap place, or found by the default loader (which
/// reads the loader cache itself). When not, `--device auto` is the CPU and
/// nothing was spawned. A driver the default loader finds stays loaded: it
/// is the one cudarc would open by soname anyway.
pub fn driver_cheaply_found() -> bool {
    let w = &WANTED[DRIVER];
    if already_loaded(w).is_some() || find_in(&cheap_places(), w, &mut Vec::new()).is_some() {
        return true;
    }
    let Ok(c) = CString::new(w.soname()) else { return false };
    // SAFETY: opening a shared library by soname; the handle is kept.
    !unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_LAZY | libc::RTLD_GLOBAL) }.is_null()
}

/// dlerror's text for the last failure.
fn dl_error() -> String {
    // SAFETY: dlerror returns null or a NUL-terminated string.
    let e: *const c_char = unsafe { libc::dlerror() };
    if e.is_null() { "unknown error".into() } else { unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned() }
}

fn open_global(path: &Path) -> Result<*mut c_void, String> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    let flags: c_int = libc::RTLD_NOW | libc::RTLD_GLOBAL;
    // SAFETY: opening a shared library by path; the handle is kept for the
    // life of the process (cudarc holds its own to the same object).
    let h = unsafe { libc::dlopen(c.as_ptr(), flags) };
    if h.is_null() { Err(dl_error()) } else { Ok(h) }
}

/// Loads only the driver, when [`load`] failed for another library, so that
/// `ferrotune env` can still describe the GPUs.
pub fn load_driver(search: &Search) -> Result<(), String> {
    let path = search.libs[DRIVER].path.as_ref().ok_or_else(|| search.missing_message(DRIVER))?;
    if search.libs[DRIVER].preloaded {
        return Ok(());
    }
    open_global(path).map(|_| ()).map_err(|e| format!("cannot load {}: {e}", path.display()))
}

static SEARCH: OnceLock<Search> = OnceLock::new();

/// The search of this process, made once (by [`load`] or its first caller),
/// looking in the spawned places only as needed.
pub fn the_search() -> &'static Search {
    SEARCH.get_or_init(|| search(Depth::AsNeeded))
}

/// The search of this process looking in every place, when called before
/// anything else searched (as `ferrotune env` does); [`load`] then uses it.
pub fn the_full_search() -> &'static Search {
    SEARCH.get_or_init(|| search(Depth::Everywhere))
}

/// What [`load`] found.
pub struct Loaded {
    pub search: &'static Search,
}

/// Finds and loads the driver, cuBLASLt and cuBLAS, once per process. Err is
/// one line: the missing or unloadable library and every place searched.
/// A missing driver is `Err` with "no CUDA driver found".
pub fn load() -> Result<&'static Loaded, String> {
    static LOADED: OnceLock<Result<Loaded, String>> = OnceLock::new();
    LOADED.get_or_init(load_uncached).as_ref().map_err(|e| e.clone())
}

fn load_uncached() -> Result<Loaded, String> {
    let search = the_search();
    let loc = |i: usize| &search.libs[i];
    if loc(DRIVER).path.is_none() {
        return Err(format!("no CUDA driver found: {}", search.missing_message(DRIVER)));
    }
    for i in [DRIVER, CUBLAS_LT, CUBLAS] {
        let (w, l) = (&WANTED[i], loc(i));
        let Some(path) = l.path.as_ref().filter(|_| !l.preloaded) else {
            if l.path.is_none() && w.required {
                return Err(search.missing_message(i));
            }
            continue;
        };
        let handle = match open_global(path) {
            Ok(h) => h,
            Err(e) => {
                let mut msg = format!("cannot load {} ({}) from {}: {e}", w.soname(), w.what, path.display());
                if i == CUBLAS && loc(CUBLAS_LT).path.is_none() {
                    msg += &format!("; {} was not found either (searched: {})", WANTED[CUBLAS_LT].soname(), search.searched());
                }
                return Err(msg);
            }
        };
        // A file by the right name that is some other library would make
        // cudarc fail later on a missing symbol; say so now.
        let sym = CString::new(w.symbol).map_err(|e| e.to_string())?;
        // SAFETY: a live handle and a NUL-terminated name; only looked up.
        if unsafe { libc::dlsym(handle, sym.as_ptr()) }.is_null() {
            return Err(format!("{} is not {}: it does not export {}", path.display(), w.what, w.symbol));
        }
    }
    Ok(Loaded { search })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, b"").unwrap();
        p
    }

    #[test]
    fn a_folder_gives_the_soname_or_an_unversioned_file_of_the_right_major() {
        let t = tempfile::tempdir().unwrap();
        let cublas = &WANTED[CUBLAS];
        let mut others = Vec::new();
        assert_eq!(look_in(t.path(), cublas, &mut others), None);

        // Another major only: not taken, remembered.
        let other = touch(t.path(), &format!("libcublas.so.{}", CUDA_MAJOR + 1));
        assert_eq!(look_in(t.path(), cublas, &mut others), None);
        assert_eq!(others, vec![other.clone()]);

        // An unversioned link to another major is refused too.
        let old = t.path().join("old");
        std::fs::create_dir(&old).unwrap();
        let real = touch(&old, &format!("libcublas.so.{}.0.1", CUDA_MAJOR - 1));
        std::os::unix::fs::symlink(&real, old.join("libcublas.so")).unwrap();
        let mut others_old = Vec::new();
        assert_eq!(look_in(&old, cublas, &mut others_old), None);
        assert_eq!(others_old, vec![real.clone()]);
        let soname = old.join(format!("libcublas.so.{}", CUDA_MAJOR - 1));
        std::os::unix::fs::symlink(&real, &soname).unwrap();
        let mut others_old = Vec::new();
        assert_eq!(look_in(&old, cublas, &mut others_old), None);
        assert_eq!(others_old, vec![soname]);
        assert_eq!(major_of(&old.join("libcublas.so"), "cublas"), Some(CUDA_MAJOR - 1));

        // An unversioned file with no version anywhere is taken; the soname wins over it.
        let plain = touch(t.path(), "libcublas.so");
        assert_eq!(look_in(t.path(), cublas, &mut Vec::new()), Some(plain));
        let exact = touch(t.path(), &cublas.soname());
        assert_eq!(look_in(t.path(), cublas, &mut Vec::new()), Some(exact));
        // cuBLASLt is not cuBLAS.
        assert_eq!(look_in(&old, &WANTED[CUBLAS_LT], &mut Vec::new()), None);
        // The driver is libcuda.so.1 whatever the CUDA version.
        assert_eq!(WANTED[DRIVER].soname(), "libcuda.so.1");
    }

    #[test]
    fn a_missing_library_names_itself_what_to_do_and_every_place() {
        let places = vec![
            Place { source: "LD_LIBRARY_PATH".into(), dirs: vec![PathBuf::from("/a"), PathBuf::from("/b")], note: None },
            Place { source: "CUDA_HOME".into(), dirs: vec![], note: Some("unset".into()) },
        ];
        let none = || Located { path: None, preloaded: false, other_majors: vec![] };
        let mut libs: Vec<Located> = (0..WANTED.len()).map(|_| none()).collect();
        libs[CUBLAS].other_majors = vec![PathBuf::from("/b/libcublas.so.99")];
        let s = Search { libs, places };
        let m = s.missing_message(CUBLAS);
        assert!(m.starts_with(&format!("libcublas.so.{CUDA_MAJOR} (cuBLAS) not found; found /b/libcublas.so.99, another CUDA major version")), "{m}");
        assert!(m.contains(&format!("pip install nvidia-cublas-cu{CUDA_MAJOR}")), "{m}");
        assert!(m.ends_with("; searched: LD_LIBRARY_PATH (/a, /b); CUDA_HOME (unset)"), "{m}");
        assert!(!m.contains('\n'));
    }
}
