#!/usr/bin/env bash
# Side-by-side LoRA training throughput: `ferrotune bench --json` and
# scripts/bench_hf.py --json (transformers + PEFT, SDPA) with the same
# arguments, then both rows and the ratios ferrotune/hf of tokens/s and of
# peak memory.
#
# Usage:
#   scripts/bench_side_by_side.sh [--bin PATH] [bench arguments...]
#   e.g. scripts/bench_side_by_side.sh --preset llama3-8b --seq-len 2048 --device cuda --steps 10
#
# Arguments are passed unchanged to both tools, so use the ones they share:
# --preset --layers --seq-len --micro-batch --lora-r --lora-alpha --targets
# --gradient-checkpointing --warmup --steps --device --peak-tflops --seed.
# Pass --device explicitly: ferrotune's "auto" and bench_hf.py's "auto" need
# not pick the same device.
#
# Environment:
#   FERROTUNE_BIN  ferrotune binary (default: target/release/ferrotune of this
#                  repository); --bin PATH as first argument overrides it
#   PYTHON         interpreter with torch/transformers/peft (default: python3;
#                  see scripts/requirements-bench.txt)
#   HF_EXTRA_ARGS  extra arguments for bench_hf.py only (e.g. "--no-autocast")
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
bin="${FERROTUNE_BIN:-$root/target/release/ferrotune}"
if [[ "${1:-}" == "--bin" ]]; then
    [[ $# -ge 2 ]] || { echo "bench_side_by_side: --bin needs a path" >&2; exit 2; }
    bin="$2"
    shift 2
fi
py="${PYTHON:-python3}"

if [[ ! -x "$bin" ]]; then
    echo "bench_side_by_side: ferrotune binary not found at $bin (cargo build --release, or set FERROTUNE_BIN / --bin)" >&2
    exit 2
fi
if ! command -v "$py" >/dev/null 2>&1; then
    echo "bench_side_by_side: python interpreter '$py' not found (set PYTHON)" >&2
    exit 2
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "== ferrotune: $bin bench --json $*" >&2
"$bin" bench --json "$@" >"$tmp/ferrotune.json"
ft_rc=$?
[[ $ft_rc -eq 0 ]] || echo "bench_side_by_side: ferrotune bench failed (exit $ft_rc)" >&2

# shellcheck disable=SC2086
echo "== transformers+peft: $py $here/bench_hf.py --json $* ${HF_EXTRA_ARGS:-}" >&2
"$py" "$here/bench_hf.py" --json "$@" ${HF_EXTRA_ARGS:-} >"$tmp/hf.json"
hf_rc=$?
[[ $hf_rc -eq 0 ]] || echo "bench_side_by_side: bench_hf.py failed (exit $hf_rc)" >&2

"$py" - "$tmp/ferrotune.json" "$ft_rc" "$tmp/hf.json" "$hf_rc" <<'PY'
import json, sys

def load(path, rc):
    if rc != "0":
        return None
    with open(path) as f:
        lines = [l for l in f.read().splitlines() if l.strip().startswith("{")]
    if not lines:
        return None
    return json.loads(lines[-1])

ft = load(sys.argv[1], sys.argv[2])
hf = load(sys.argv[3], sys.argv[4])
if ft is not None:
    ft.setdefault("impl", "ferrotune")

print("ferrotune:", json.dumps(ft, ensure_ascii=False) if ft else "(failed)")
print("hf:       ", json.dumps(hf, ensure_ascii=False) if hf else "(failed)")

GIB = float(1 << 30)
def fmt(v, kind):
    if v is None:
        return "-"
    if kind == "gib":
        return f"{v / GIB:.3f} GiB"
    if kind == "ms":
        return f"{v * 1e3:.2f} ms"
    if kind == "f1":
        return f"{v:.1f}"
    if kind == "pct":
        return f"{v * 100:.1f}%"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)

fields = [("device", "device", None), ("preset", "preset", None), ("layers", "layers", None),
          ("seq_len x micro_batch", None, None), ("lora_params", "lora_params", None),
          ("tokens/s", "tokens_per_s", "f1"), ("step time", "step_time_s", "ms"),
          ("model TFLOP/s", "model_tflops", None), ("MFU", "mfu", "pct"),
          ("peak memory", "peak_memory_bytes", "gib"), ("peak memory kind", "peak_memory_kind", None),
          ("loss", "loss", None)]
rows = []
for label, key, kind in fields:
    def val(r):
        if r is None:
            return "(failed)"
        if key is None:
            return f"{r.get('seq_len')} x {r.get('micro_batch')}"
        return fmt(r.get(key), kind)
    rows.append((label, val(ft), val(hf)))
w0 = max(len(r[0]) for r in rows)
w1 = max(len("ferrotune"), *(len(r[1]) for r in rows))
print()
print(f"{'':<{w0}}  {'ferrotune':<{w1}}  transformers+peft")
for label, a, b in rows:
    print(f"{label:<{w0}}  {a:<{w1}}  {b}")

if ft is None or hf is None:
    sys.exit(1)

def ratio(key):
    a, b = ft.get(key), hf.get(key)
    return a / b if a and b else None

print()
r_tok, r_mem = ratio("tokens_per_s"), ratio("peak_memory_bytes")
print(f"ferrotune/hf tokens/s     {r_tok:.3f}" if r_tok else "ferrotune/hf tokens/s     n/a")
print(f"ferrotune/hf peak memory  {r_mem:.3f}" if r_mem else "ferrotune/hf peak memory  n/a")

notes = []
for k in ("preset", "layers", "seq_len", "micro_batch", "lora_r", "lora_params", "gradient_checkpointing", "steps"):
    if ft.get(k) != hf.get(k):
        notes.append(f"{k} differs: ferrotune {ft.get(k)!r}, hf {hf.get(k)!r}")
dev_kind = lambda d: str(d or "").split(":")[0].split(" ")[0]
if dev_kind(ft.get("device")) != dev_kind(hf.get("device")):
    notes.append(f"devices differ: ferrotune {ft.get('device')!r}, hf {hf.get('device')!r} (pass --device)")
if ft.get("peak_memory_kind") != hf.get("peak_memory_kind"):
    notes.append(f"peak memory is measured differently: ferrotune {ft.get('peak_memory_kind')!r}, "
                 f"hf {hf.get('peak_memory_kind')!r}")
if hf.get("peak_memory_kind") == "host RSS" and hf.get("host_rss_baseline_bytes"):
    notes.append(f"hf host RSS includes {hf['host_rss_baseline_bytes'] / GIB:.2f} GiB of Python/torch before the model "
                 "was built")
for n in notes:
    print("note:", n)
PY
py_rc=$?
if [[ $ft_rc -ne 0 || $hf_rc -ne 0 ]]; then exit 1; fi
exit $py_rc
