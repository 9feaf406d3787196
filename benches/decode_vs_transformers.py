#!/usr/bin/env python3
"""Decoding speed of `ferrotune generate` against transformers' generate, on
the CPU, in one run on one machine:

  (a) one sequence, greedy: `ferrotune generate --temperature 0 --ignore-eos`
      vs `model.generate(do_sample=False, min_new_tokens=N, max_new_tokens=N)`;
  (b) 8 sampled sequences of one prompt: `--num-return-sequences 8
      --ignore-eos` vs `generate(do_sample=True, num_return_sequences=8, ...)`.

Both run in f32 on every core. Reported: decoded tokens per second (every
token after each sequence's first), model loading and prefill excluded:
ferrotune's own stderr figures; for transformers, the time of a generate of N
tokens minus that of a generate of 1 token (the prefill and first choice),
each the best of --repeats.

Without --model, a random-weight model of Qwen3-0.6B's shape (hidden 1024,
16 heads, 8 KV heads of 128, MLP 3072, vocabulary 151936, tied embeddings)
with --layers layers is written to --work, with a word-level tokenizer of
the same vocabulary ("t0" .. "t151935"). With --model, the directory must
hold a tokenizer; the prompt is then the tokenizer's ids of --prompt-text.

  cargo build --release
  python benches/decode_vs_transformers.py [--bin target/release/ferrotune] [--layers 28] [--new-tokens 64]

Needs torch, transformers and tokenizers (scripts/requirements-bench.txt).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

VOCAB = 151936


def make_model(out: Path, layers: int) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import Qwen3Config, Qwen3ForCausalLM

    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        cfg = json.loads((out / "config.json").read_text())
        if cfg.get("num_hidden_layers") == layers:
            return
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = Qwen3Config(
        hidden_size=1024, intermediate_size=3072, num_hidden_layers=layers, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, vocab_size=VOCAB, max_position_embeddings=40960,
        tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6, eos_token_id=VOCAB - 1, bos_token_id=None,
    )
    model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text("{}\n")


def run_ferrotune(bin_path: str, model: Path, prompt: str, new_tokens: int, extra: list[str]) -> float:
    """Decode tokens/s from ferrotune's stderr."""
    cmd = [bin_path, "generate", "--model", str(model), "--prompt", prompt, "--max-new-tokens", str(new_tokens),
           "--ignore-eos", "--device", "cpu", *extra]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"ferrotune failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr}")
    m = re.search(r"decode: (\d+) tokens in ([\d.]+)s \(([\d.]+) tokens/s\)", p.stderr)
    if not m:
        sys.exit(f"no decode figures in ferrotune's stderr:\n{p.stderr}")
    return float(m.group(3))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="a model directory (default: write a Qwen3-shaped one to --work)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/ferrotune-decode-bench"))
    ap.add_argument("--layers", type=int, default=28, help="layers of the written model (Qwen3-0.6B has 28)")
    ap.add_argument("--bin", default=None, help="ferrotune binary (default: $CARGO_TARGET_DIR or target/, release)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32, help="prompt tokens of the written model's prompt")
    ap.add_argument("--prompt-text", default="The quick brown fox jumps over the lazy dog.", help="with --model")
    ap.add_argument("--sequences", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2, help="best of this many runs, each side")
    a = ap.parse_args()

    root = Path(__file__).resolve().parent.parent
    bin_path = a.bin or str(Path(os.environ.get("CARGO_TARGET_DIR", root / "target")) / "release" / "ferrotune")
    if not Path(bin_path).is_file():
        sys.exit(f"no ferrotune binary at {bin_path}: cargo build --release, or pass --bin")

    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    if a.model is None:
        model_dir = a.work / f"qwen3-0.6b-shape-{a.layers}l"
        make_model(model_dir, a.layers)
        prompt = " ".join(f"t{(i * 7919 + 11) % VOCAB}" for i in range(a.prompt_len))
    else:
        model_dir, prompt = a.model, a.prompt_text
    ids = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(prompt).ids
    n = a.new_tokens
    print(f"model {model_dir}, prompt {len(ids)} tokens, {n} new tokens, torch threads {torch.get_num_threads()}",
          file=sys.stderr)

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    x = torch.tensor([ids])

    def hf_seconds(tokens: int, **kw) -> float:
        """transformers' generate call alone."""
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(x, min_new_tokens=tokens, max_new_tokens=tokens, pad_token_id=0, **kw)
        assert out.shape[-1] == len(ids) + tokens, out.shape
        return time.perf_counter() - t

    def hf_decode_rate(seqs: int, **kw) -> float:
        """Tokens after each sequence's first, per second: N tokens minus 1."""
        return seqs * (n - 1) / (hf_seconds(n, **kw) - hf_seconds(1, **kw))

    greedy_args = ["--temperature", "0"]
    sample_args = ["--temperature", "1", "--top-k", "50", "--num-return-sequences", str(a.sequences), "--seed", "1"]
    greedy = dict(do_sample=False)
    sampled = dict(do_sample=True, temperature=1.0, top_k=50, top_p=1.0, num_return_sequences=a.sequences)
    hf_seconds(2, **greedy)  # warm-up
    # The two sides alternate, so a change in the machine's load touches both;
    # each figure is the best of --repeats.
    ft_a = ft_b = hf_a = hf_b = 0.0
    for _ in range(a.repeats):
        ft_a = max(ft_a, run_ferrotune(bin_path, model_dir, prompt, n, greedy_args))
        hf_a = max(hf_a, hf_decode_rate(1, **greedy))
        ft_b = max(ft_b, run_ferrotune(bin_path, model_dir, prompt, n, sample_args))
        hf_b = max(hf_b, hf_decode_rate(a.sequences, **sampled))

    rows = [("(a) 1 sequence, greedy", ft_a, hf_a, 2.0), (f"(b) {a.sequences} sequences, sampled", ft_b, hf_b, 3.0)]
    print(f"{'decode tokens/s':32} {'ferrotune':>10} {'transformers':>13} {'ratio':>7} {'target':>7}")
    for name, ft, hf, target in rows:
        print(f"{name:32} {ft:10.1f} {hf:13.1f} {ft / hf:6.2f}x {target:6.1f}x")


if __name__ == "__main__":
    main()
