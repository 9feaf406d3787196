#!/usr/bin/env bash
# The whole GPU check in two halves, for a GPU machine with no Rust toolchain.
#
#   scripts/gpu_check.sh build [cuda-12|cuda-13]
#       here (x86-64, Rust): builds the GPU test binary and the release
#       ferrotune binary with the chosen CUDA library feature into gpu_bundle/
#       (git-ignored), with a run script.
#   gpu_bundle/run.sh [all|tests|bench]
#       on the GPU machine, from the repository root: runs every GPU test
#       (kernels vs the CPU reference, model parity on the fixtures, the
#       50-step optimisation) and the benchmarks (training throughput, the
#       quickstart on GPU and CPU, one GRPO step at Qwen3-0.6B's size with its
#       sampling speed and memory peak), and writes every figure to
#       $OUT/gpu_report.md (or ./gpu_report.md without $OUT). `tests` and
#       `bench` run one half each (gpu_report-tests.md / gpu_report-bench.md),
#       for machines that limit how long one command may run.
set -euo pipefail
cd "$(dirname "$0")/.."

cmd=${1:-build}
feature=${2:-cuda-13}
bundle=gpu_bundle

if [[ "$cmd" != build ]]; then
    echo "usage: scripts/gpu_check.sh build [cuda-12|cuda-13]" >&2
    exit 2
fi

rm -rf "$bundle"
mkdir -p "$bundle"
features=(--no-default-features --features "$feature")
cargo build --release --locked "${features[@]}" --bin ferrotune
cp target/release/ferrotune "$bundle/ferrotune"
# The test executable's path comes from cargo's JSON messages.
exe=$(cargo test --release --locked "${features[@]}" --test gpu --no-run --message-format=json 2>/dev/null |
    python3 -c 'import sys, json
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "gpu":
        print(m["executable"])')
cp "$exe" "$bundle/gpu_tests"
strip "$bundle/ferrotune" "$bundle/gpu_tests" 2>/dev/null || true

cat > "$bundle/run.sh" <<'RUN'
#!/usr/bin/env bash
# Runs on the GPU machine from the repository root (fixtures in tests/fixtures).
set -uo pipefail
part=${1:-all}
case "$part" in all | tests | bench) ;; *) echo "usage: run.sh [all|tests|bench]" >&2; exit 2 ;; esac
out=${OUT:-.}
report="$out/gpu_report.md"
[[ "$part" != all ]] && report="$out/gpu_report-$part.md"
b=$(dirname "$0")
export FERROTUNE_FIXTURES="$PWD/tests/fixtures"
{
    echo "# ferrotune GPU check ($part)"
    echo
    echo '```'
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | head -3
    echo '```'
    echo
    if [[ "$part" != bench ]]; then
    echo "## Tests (kernels vs CPU reference, model parity, 50-step optimisation)"
    echo '```'
    timeout 300 "$b/gpu_tests" --ignored --nocapture --test-threads 1 2>&1
    echo "exit: $?"
    echo '```'
    echo
    fi
    if [[ "$part" != tests ]]; then
    echo "## Benchmarks"
    for args in \
        "--preset llama3-8b --seq-len 2048 --micro-batch 1 --lora-r 16" \
        "--preset llama3-8b --seq-len 2048 --micro-batch 1 --lora-r 16 --gradient-checkpointing" \
        "--preset llama3-8b --seq-len 2048 --micro-batch 1 --lora-r 16 --gradient-checkpointing --lora-dropout 0.05" \
        "--preset llama3-8b --seq-len 2048 --micro-batch 1 --lora-r 16 --gradient-checkpointing --qlora" \
        "--preset llama3.2-1b --seq-len 2048 --micro-batch 4 --lora-r 16"; do
        echo '```'
        echo "ferrotune bench --device cuda $args --json"
        timeout 120 "$b/ferrotune" bench --device cuda $args --steps 5 --warmup 2 --json 2>&1
        echo "exit: $?"
        echo '```'
    done
    echo
    echo "## Training run (the quickstart on the GPU and on the CPU: loss curves side by side)"
    echo '```'
    for dev in cuda cpu; do
        timeout 120 "$b/ferrotune" train examples/quickstart/quickstart.yml --device $dev \
            --set output_dir="$out/quickstart-$dev" --set save_steps=null --overwrite 2>&1 | tail -3
        echo "exit ($dev): $?"
    done
    python3 - "$out" <<'PY' 2>&1 || true
import json, sys
rows = {d: [json.loads(l) for l in open(f"{sys.argv[1]}/quickstart-{d}/metrics.jsonl")] for d in ("cuda", "cpu")}
for g, c in zip(rows["cuda"], rows["cpu"]):
    if "loss" in g:
        print(f"step {g['step']:4d}  loss cuda {g['loss']:.5f}  cpu {c['loss']:.5f}  rel {abs(g['loss'] - c['loss']) / max(c['loss'], 1e-9):.2e}")
PY
    echo '```'
    echo '```'
    echo
    echo "## One GRPO step at Qwen3-0.6B's size (G = 8, 256 new tokens; plan vs measured peak)"
    echo '```'
    q06="$out/qwen3-0.6b-synth"
    "$b/ferrotune" synth --preset qwen3-0.6b --word-tokenizer --out "$q06" --force 2>&1
    prompt=$(python3 -c 'import json; print(json.loads(open("examples/grpo/gpu_check.jsonl").readline())["prompt"])')
    echo "the sampler alone: 8 sequences x 256 tokens of one prompt"
    timeout 120 "$b/ferrotune" generate --device cuda --model "$q06" --prompt "$prompt" --num-return-sequences 8 \
        --max-new-tokens 256 --ignore-eos --temperature 1 --seed 1 2>&1 >/dev/null | tail -2
    echo "one GRPO step: ferrotune train examples/grpo/gpu_check.yml"
    t0=$(date +%s.%N)
    timeout 300 "$b/ferrotune" train examples/grpo/gpu_check.yml --device cuda --set base_model="$q06" \
        --set output_dir="$out/grpo-gpu-check" --overwrite 2>&1 | tail -20
    echo "exit: ${PIPESTATUS[0]}; wall $(python3 -c 'import sys, time; print(round(time.time() - float(sys.argv[1]), 1))' "$t0") s"
    cat "$out/grpo-gpu-check/metrics.jsonl" 2>&1
    echo '```'
    echo "ferrotune bench --device cuda --preset llama3-8b --seq-len 2048 --profile"
    timeout 120 "$b/ferrotune" bench --device cuda --preset llama3-8b --seq-len 2048 --steps 3 --warmup 1 --profile 2>&1
    echo '```'
    fi
} > "$report" 2>&1
cat "$report"
RUN
chmod +x "$bundle/run.sh"
du -sh "$bundle"
echo "bundle ready: carry gpu_bundle and run gpu_bundle/run.sh on the GPU machine"
