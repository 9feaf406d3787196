#!/usr/bin/env bash
# GGUF export speed: a synthetic checkpoint of Llama 3 8B's shape (bf16,
# 16 GB at 32 layers) to q4_k_m, in MB/s of checkpoint, against reading the
# safetensors (the floor: an export cannot beat reading its input) and, when
# a Python with llama-cpp-python 0.3.36 and the converter's sources are
# given, against llama.cpp's converter (bf16) + llama_model_quantize.
#
#   benches/gguf_export.sh [DIR]
#   LAYERS=4 benches/gguf_export.sh          # a smaller checkpoint of the same shape
#   LLAMA_PY=/path/venv/bin/python LLAMA_CPP=/path/vendor/llama.cpp CONVERT_PY=/path/python benches/gguf_export.sh
#
# The page cache is not dropped: every command reads a checkpoint another
# one has just read when it fits in memory; on a machine where it does not,
# all three read from disk.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-${TMPDIR:-/tmp}/ferrotune-gguf-bench}
layers=${LAYERS:-32}
mkdir -p "$dir"
cargo build --release --quiet
bin=target/release/ferrotune

model="$dir/llama3-8b-L$layers"
if [ ! -f "$model/config.json" ]; then
    "$bin" synth --preset llama3-8b --layers "$layers" --out "$model"
    # A Llama 3 style BPE tokenizer (ids past its vocabulary are padding, as
    # the converter writes them).
    cp tests/fixtures/gguf/models/llama/model/tokenizer.json tests/fixtures/gguf/models/llama/model/tokenizer_config.json "$model/"
fi
mb=$(du -bc "$model"/*.safetensors | tail -1 | awk '{print $1 / 1e6}')

now() { date +%s.%N; }
rate() { awk -v mb="$mb" -v s="$1" 'BEGIN { printf "%.1f s, %.0f MB/s", s, mb / s }'; }

t0=$(now); cat "$model"/*.safetensors > /dev/null; t1=$(now)
read_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')
echo "read safetensors ($mb MB): $(rate "$read_s")"

t0=$(now)
"$bin" export gguf --model "$model" --outtype q4_k_m --out "$dir/ferrotune-q4_k_m.gguf" --tokenizer-pre llama-bpe --no-modelfile
t1=$(now)
ft_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')
echo "ferrotune export q4_k_m: $(rate "$ft_s")"

if [ -n "${LLAMA_PY:-}" ] && [ -n "${LLAMA_CPP:-}" ]; then
    # The converter needs transformers and torch (CONVERT_PY), and the
    # quantizer llama-cpp-python (LLAMA_PY). The synthetic tokenizer's
    # fingerprint is unknown to the converter, so the pre-tokenizer is forced
    # as --tokenizer-pre does.
    conv=$(mktemp)
    cat > "$conv" <<PY
import sys
sys.path.insert(0, "$LLAMA_CPP"); sys.path.insert(0, "$LLAMA_CPP/gguf-py")
import conversion.base as b
b.TextModel.get_vocab_base_pre = lambda self, tokenizer: "llama-bpe"
sys.argv = ["convert_hf_to_gguf.py"] + sys.argv[1:]
exec(compile(open("$LLAMA_CPP/convert_hf_to_gguf.py").read(), "convert_hf_to_gguf.py", "exec"))
PY
    t0=$(now)
    "${CONVERT_PY:-$LLAMA_PY}" "$conv" "$model" --outtype bf16 --outfile "$dir/llama-bf16.gguf" > "$dir/convert.log" 2>&1
    t1=$(now)
    "$LLAMA_PY" -c "
import llama_cpp, sys
p = llama_cpp.llama_model_quantize_default_params(); p.ftype = 15
sys.exit(llama_cpp.llama_model_quantize(b'$dir/llama-bf16.gguf', b'$dir/llama-q4_k_m.gguf', p))"
    t2=$(now)
    conv_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')
    quant_s=$(awk -v a="$t1" -v b="$t2" 'BEGIN { print b - a }')
    both=$(awk -v a="$conv_s" -v b="$quant_s" 'BEGIN { print a + b }')
    echo "llama.cpp convert bf16: $(rate "$conv_s"); quantize q4_k_m: $(rate "$quant_s"); both: $(rate "$both")"
    if cmp -s "$dir/ferrotune-q4_k_m.gguf" "$dir/llama-q4_k_m.gguf"; then echo "the two q4_k_m files are identical"; else echo "THE TWO q4_k_m FILES DIFFER"; fi
    rm -f "$conv"
fi
