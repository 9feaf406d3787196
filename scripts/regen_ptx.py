#!/usr/bin/env python3
"""Compile every cuda/*.cu to ptx/<name>.ptx with the pinned NVRTC 12.4.

NVRTC comes from the PyPI wheel nvidia-cuda-nvrtc-cu12 (loaded with ctypes,
so any Python 3 runs this script), the headers from nvidia-cuda-runtime-cu12;
scripts/cuda-toolchain.txt pins both, and scripts/install_cuda_toolchain.sh
installs them into a venv. No GPU and no system CUDA are needed.

    python3 scripts/regen_ptx.py            # rewrite ptx/ (only files that changed)
    python3 scripts/regen_ptx.py --check    # exit 1 if the committed ptx/ is stale

The toolchain is looked up in: --venv, then $FERROTUNE_NVRTC_VENV, then the
running interpreter's site-packages, then .venv-cuda in the repository.

Output is deterministic: the same cuda/ gives byte-identical PTX on every
machine (no line info, no paths). Every module must declare PTX ISA 8.4
(CUDA 12.4; loaded by drivers >= 550) and target sm_80 (JIT-compiled for
newer GPUs by the driver). Options: see NVRTC_OPTIONS below; a .cu file may
add its own with a line `// nvrtc-options: <options>` (one replaces the
default of the same name, e.g. `// nvrtc-options: --fmad=true` for a
compute-bound kernel).

Exit status: 0 ok, 1 stale ptx/ (--check) or a compile error, 2 toolchain
missing or not the pinned version.
"""

import argparse
import concurrent.futures
import ctypes
import difflib
import glob
import os
import re
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CUDA_DIR = REPO / "cuda"
PTX_DIR = REPO / "ptx"
REQUIREMENTS = REPO / "scripts" / "cuda-toolchain.txt"
DEFAULT_VENV = REPO / ".venv-cuda"

NVRTC_VERSION = (12, 4)
PTX_ISA = "8.4"
PTX_TARGET = "sm_80"
# IEEE semantics for parity with the CPU reference: no fast math, no flush to
# zero, correctly rounded division and sqrt, and no FMA contraction (each
# f32 operation rounds once, as the CPU's does; also makes results
# independent of the driver's JIT). Transcendentals are the precise ones.
NVRTC_OPTIONS = [
    "--gpu-architecture=compute_80",
    "-std=c++17",
    "-default-device",
    "--fmad=false",
    "--ftz=false",
    "--prec-div=true",
    "--prec-sqrt=true",
]
# Packages whose exact version regen_ptx.py relies on (pip name -> version),
# read from the pins file so there is one source of truth.
CHECKED_PACKAGES = ("nvidia-cuda-nvrtc-cu12", "nvidia-cuda-runtime-cu12")


class ToolchainError(Exception):
    pass


def pinned_versions():
    pins = {}
    for line in REQUIREMENTS.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^\s*([A-Za-z0-9_.\-]+)==([^\s\\;]+)", line)
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


def install_hint():
    return (
        "install the pinned toolchain (PyPI: "
        + ", ".join(f"{k}=={v}" for k, v in pinned_versions().items())
        + "):\n"
        "    bash scripts/install_cuda_toolchain.sh            # creates .venv-cuda\n"
        "or point FERROTUNE_NVRTC_VENV (or --venv) at a venv that has them."
    )


def site_packages_of(venv):
    venv = Path(venv)
    hits = sorted(glob.glob(str(venv / "lib" / "python3*" / "site-packages")))
    hits += sorted(glob.glob(str(venv / "Lib" / "site-packages")))
    return [Path(h) for h in hits]


def nvrtc_lib(site):
    return site / "nvidia" / "cuda_nvrtc" / "lib" / "libnvrtc.so.12"


def find_site_packages(venv_arg):
    """Returns the site-packages dir holding the pinned wheels."""
    if venv_arg is not None:
        candidates, origin = site_packages_of(venv_arg), f"--venv {venv_arg}"
    elif os.environ.get("FERROTUNE_NVRTC_VENV"):
        env = os.environ["FERROTUNE_NVRTC_VENV"]
        candidates, origin = site_packages_of(env), f"FERROTUNE_NVRTC_VENV={env}"
    else:
        candidates = [Path(p) for p in sys.path if p.endswith("site-packages")]
        candidates += site_packages_of(DEFAULT_VENV)
        origin = f"this interpreter's site-packages or {DEFAULT_VENV}"
    for site in candidates:
        if nvrtc_lib(site).is_file():
            return site
    raise ToolchainError(f"NVRTC (libnvrtc.so.12) not found in {origin}.\n" + install_hint())


def installed_version(site, package):
    stem = package.replace("-", "_")
    for dist in glob.glob(str(site / f"{stem}-*.dist-info")):
        meta = Path(dist) / "METADATA"
        if meta.is_file():
            for line in meta.read_text(errors="replace").splitlines():
                if line.startswith("Version:"):
                    return line.split(":", 1)[1].strip()
    return None


def check_pins(site):
    pins = pinned_versions()
    for package in CHECKED_PACKAGES:
        want, got = pins[package], installed_version(site, package)
        if got != want:
            raise ToolchainError(
                f"{package} in {site} is {got or 'missing'}, the pin is {want}: the committed "
                "PTX is only reproducible with the pinned NVRTC.\n" + install_hint()
            )


class Nvrtc:
    def __init__(self, site):
        self.site = site
        path = nvrtc_lib(site)
        try:
            self.lib = ctypes.CDLL(str(path))
        except OSError as e:
            raise ToolchainError(f"cannot load {path}: {e}\n" + install_hint())
        lib = self.lib
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        lib.nvrtcGetErrorString.argtypes = [ctypes.c_int]
        lib.nvrtcVersion.argtypes = [ctypes.POINTER(ctypes.c_int)] * 2
        lib.nvrtcCreateProgram.argtypes = [
            ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int,
            ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(ctypes.c_char_p),
        ]
        lib.nvrtcCompileProgram.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        for fn in ("nvrtcGetProgramLogSize", "nvrtcGetPTXSize"):
            getattr(lib, fn).argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)]
        for fn in ("nvrtcGetProgramLog", "nvrtcGetPTX"):
            getattr(lib, fn).argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nvrtcDestroyProgram.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
        major, minor = ctypes.c_int(), ctypes.c_int()
        self.check(lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
        self.version = (major.value, minor.value)
        if self.version != NVRTC_VERSION:
            raise ToolchainError(
                f"{path} is NVRTC {self.version[0]}.{self.version[1]}, need "
                f"{NVRTC_VERSION[0]}.{NVRTC_VERSION[1]}.\n" + install_hint()
            )
        self.include = site / "nvidia" / "cuda_runtime" / "include"
        if not (self.include / "cuda_bf16.h").is_file():
            raise ToolchainError(f"cuda_bf16.h not found under {self.include}.\n" + install_hint())

    def check(self, result, what):
        if result != 0:
            raise RuntimeError(f"{what}: {self.lib.nvrtcGetErrorString(result).decode()}")

    def compile(self, source_path, extra_options):
        """Returns (ptx text, log text); raises CompileError on failure."""
        lib = self.lib
        src = source_path.read_bytes()
        prog = ctypes.c_void_p()
        self.check(
            lib.nvrtcCreateProgram(ctypes.byref(prog), src, source_path.name.encode(), 0, None, None),
            "nvrtcCreateProgram",
        )
        try:
            # A file's own option replaces the default of the same name.
            overridden = {o.split("=", 1)[0] for o in extra_options}
            base = [o for o in NVRTC_OPTIONS if o.split("=", 1)[0] not in overridden]
            options = base + [f"-I{CUDA_DIR}", f"-I{self.include}"] + extra_options
            argv = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
            result = lib.nvrtcCompileProgram(prog, len(options), argv)
            size = ctypes.c_size_t()
            self.check(lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)), "nvrtcGetProgramLogSize")
            buf = ctypes.create_string_buffer(size.value)
            self.check(lib.nvrtcGetProgramLog(prog, buf), "nvrtcGetProgramLog")
            log = buf.value.decode(errors="replace").strip()
            if result != 0:
                raise CompileError(source_path, lib.nvrtcGetErrorString(result).decode(), log)
            self.check(lib.nvrtcGetPTXSize(prog, ctypes.byref(size)), "nvrtcGetPTXSize")
            buf = ctypes.create_string_buffer(size.value)
            self.check(lib.nvrtcGetPTX(prog, buf), "nvrtcGetPTX")
            return buf.value.decode("utf-8"), log
        finally:
            lib.nvrtcDestroyProgram(ctypes.byref(prog))


class CompileError(Exception):
    def __init__(self, path, status, log):
        super().__init__(f"{path.relative_to(REPO)}: {status}\n{log}")


def file_options(source):
    opts = []
    for line in source.splitlines():
        m = re.match(r"^\s*//\s*nvrtc-options:(.*)$", line)
        if m:
            opts += m.group(1).split()
    return opts


def validate_ptx(name, ptx):
    problems = []
    if not re.search(rf"^\.version {re.escape(PTX_ISA)}$", ptx, re.M):
        found = re.search(r"^\.version (\S+)", ptx, re.M)
        problems.append(f"declares PTX ISA {found.group(1) if found else '?'}, need {PTX_ISA}")
    if not re.search(rf"^\.target {PTX_TARGET}\b", ptx, re.M):
        problems.append(f"does not target {PTX_TARGET}")
    if not re.search(r"^\.visible \.entry ", ptx, re.M):
        problems.append("has no kernel entry point (extern \"C\" __global__)")
    if problems:
        raise CompileError(CUDA_DIR / f"{name}.cu", "bad PTX", "; ".join(problems))


def build_all(nvrtc):
    """Returns {name: ptx} for every cuda/*.cu. Warnings are errors."""
    sources = sorted(CUDA_DIR.glob("*.cu"))
    if not sources:
        raise SystemExit(f"error: no .cu files in {CUDA_DIR}")

    def one(path):
        try:
            ptx, log = nvrtc.compile(path, file_options(path.read_text(encoding="utf-8")))
            if log:
                raise CompileError(path, "warnings (treated as errors)", log)
            validate_ptx(path.stem, ptx)
            return path.stem, ptx, None
        except CompileError as e:
            return path.stem, None, str(e)

    # NVRTC compiles independent programs concurrently (ctypes drops the GIL).
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = list(pool.map(one, sources))
    out = {name: ptx for name, ptx, err in results if err is None}
    failures = [err for _, _, err in results if err is not None]
    if failures:
        for f in failures:
            print(f"error: {f}", file=sys.stderr)
        raise SystemExit(1)
    return out


def committed():
    return {p.stem: p.read_bytes().decode("utf-8") for p in sorted(PTX_DIR.glob("*.ptx"))}


def check(fresh):
    have = committed()
    tmp = Path(tempfile.mkdtemp(prefix="ferrotune-ptx-"))
    for name, ptx in fresh.items():
        (tmp / f"{name}.ptx").write_bytes(ptx.encode("utf-8"))
    bad = []
    for name in sorted(set(fresh) | set(have)):
        if name not in have:
            bad.append(f"ptx/{name}.ptx is missing (cuda/{name}.cu has no committed PTX)")
        elif name not in fresh:
            bad.append(f"ptx/{name}.ptx is stale: cuda/{name}.cu does not exist")
        elif have[name] != fresh[name]:
            diff = list(difflib.unified_diff(
                have[name].splitlines(), fresh[name].splitlines(),
                f"ptx/{name}.ptx (committed)", f"{tmp}/{name}.ptx (from cuda/{name}.cu)", lineterm="", n=1))
            shown = "\n".join("    " + l for l in diff[:16])
            more = f"\n    ... ({len(diff) - 16} more diff lines)" if len(diff) > 16 else ""
            bad.append(f"ptx/{name}.ptx differs from what cuda/{name}.cu compiles to:\n{shown}{more}")
    if bad:
        print("error: the committed ptx/ is not what cuda/ compiles to:", file=sys.stderr)
        for b in bad:
            print(f"  - {b}", file=sys.stderr)
        print(f"fresh PTX kept in {tmp}; run `python3 scripts/regen_ptx.py` and commit ptx/.",
              file=sys.stderr)
        return 1
    for p in tmp.iterdir():
        p.unlink()
    tmp.rmdir()
    print(f"ptx/ is up to date: {len(fresh)} modules, NVRTC {NVRTC_VERSION[0]}.{NVRTC_VERSION[1]}, "
          f"PTX ISA {PTX_ISA}")
    return 0


def write(fresh, quiet):
    PTX_DIR.mkdir(exist_ok=True)
    have = committed()
    changed = 0
    for name, ptx in fresh.items():
        if have.get(name) != ptx:
            dst = PTX_DIR / f"{name}.ptx"
            tmp = dst.with_suffix(".ptx.tmp")
            tmp.write_bytes(ptx.encode("utf-8"))
            os.replace(tmp, dst)
            print(f"updated ptx/{name}.ptx")
            changed += 1
    for name in sorted(set(have) - set(fresh)):
        (PTX_DIR / f"{name}.ptx").unlink()
        print(f"removed ptx/{name}.ptx (no cuda/{name}.cu)")
        changed += 1
    if not quiet:
        print(f"ptx/: {len(fresh)} modules, {changed} changed")
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true",
                    help="compile to a temp dir and fail if the committed ptx/ differs")
    ap.add_argument("--venv", help="venv holding the pinned wheels (default: see module doc)")
    ap.add_argument("--quiet", action="store_true", help="print only what changed")
    args = ap.parse_args()
    try:
        site = find_site_packages(args.venv)
        check_pins(site)
        nvrtc = Nvrtc(site)
    except ToolchainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    fresh = build_all(nvrtc)
    return check(fresh) if args.check else write(fresh, args.quiet)


if __name__ == "__main__":
    sys.exit(main())
