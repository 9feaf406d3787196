#!/usr/bin/env python3
"""HuggingFace transformers + PEFT counterpart of `ferrotune bench`.

What it measures
----------------
LoRA training throughput of a synthetic model (random weights, nothing is
downloaded) with the same shapes as `ferrotune bench`: a registry family and
size preset (the dimensions of src/model/synth.rs `preset()`), LoRA on the
given target modules, micro_batch x seq_len random tokens, `--warmup` steps
then `--steps` timed steps. One step is

    loss = model(input_ids, labels=input_ids).loss   # SDPA attention
    loss.backward()
    clip_grad_norm_(lora params, 1.0)                 # ferrotune's AdamW default
    optimizer.step()                                  # torch AdamW, lr 1e-4
    optimizer.zero_grad(set_to_none=True)

It prints tokens/s, step time, model TFLOP/s (by ferrotune's FLOP convention,
ported from src/model/flops.rs, so the numbers are directly comparable), peak
memory (CUDA: torch.cuda.max_memory_allocated, plus reserved; CPU: peak RSS
of the process, VmHWM, like ferrotune) and the last loss. `--json` prints one
JSON object with the same fields as `ferrotune bench --json` plus
"impl": "transformers+peft" and the library versions.

Precision: on CUDA the model is built directly on the GPU in bf16 and, as with
HF Trainer(bf16=True), the forward runs under torch.autocast(bf16); PEFT keeps
the LoRA weights (and so the AdamW state) in f32 (autocast_adapter_dtype).
`--no-autocast` runs the LoRA matmuls in f32 instead. On CPU everything is f32
(smoke test only).

How to run on a GPU machine
---------------------------
    python -m venv venv && venv/bin/pip install -r scripts/requirements-bench.txt
    venv/bin/python scripts/bench_hf.py --preset llama3-8b --seq-len 2048 \
        --micro-batch 1 --gradient-checkpointing --steps 10 --json
    # side by side with ferrotune on the same GPU:
    PYTHON=venv/bin/python scripts/bench_side_by_side.sh --preset llama3-8b \
        --seq-len 2048 --device cuda

CPU smoke test:
    python scripts/bench_hf.py --preset tiny --device cpu --steps 2 --seq-len 64

Packages (scripts/requirements-bench.txt): torch==2.15.0 transformers==5.23.0
peft==0.21.2.
"""

import argparse
import json
import math
import os
import platform
import sys
import time
import warnings

# ferrotune's presets, copied from src/model/synth.rs `preset()` (keep in sync).
# config.json keys common to every preset (synth.rs `config_json`):
# rms_norm_eps 1e-5, max_position_embeddings 8192, hidden_act silu.
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
PRESETS = {
    "tiny": dict(family="llama", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128,
                 vocab=257, tie=False, rope_theta=10000.0, rope_scaling=None),
    "llama3.2-1b": dict(family="llama", hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192,
                        vocab=128256, tie=True, rope_theta=500000.0, rope_scaling=LLAMA3_SCALING),
    "llama3-8b": dict(family="llama", hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336,
                      vocab=128256, tie=False, rope_theta=500000.0, rope_scaling=None),
    # synth.rs: "sliding_window": null
    "mistral-7b": dict(family="mistral", hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336,
                       vocab=32768, tie=False, rope_theta=1e6, rope_scaling=None),
    # synth.rs: "use_sliding_window": false; Qwen2 has q/k/v biases.
    "qwen2-7b": dict(family="qwen2", hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944,
                     vocab=152064, tie=False, rope_theta=1e6, rope_scaling=None),
}
RMS_NORM_EPS = 1e-5
MAX_POSITION_EMBEDDINGS = 8192

# src/model/flops.rs CONVENTION, verbatim.
FLOP_CONVENTION = ("model FLOPs = tokens·(4·N_base + 6·N_lora) + 6·L·d_attn·(causal query-key pairs); "
                   "recompute not counted")


# ---------------------------------------------------------------------------
# FLOP convention, ported from src/model/flops.rs.
# ---------------------------------------------------------------------------
def proj_dims(spec):
    """(in_features, out_features) of q, k, v, o, gate, up, down (src/model/mod.rs Proj::dims)."""
    h = spec["hidden"]
    head_dim = h // spec["heads"]
    qd = spec["heads"] * head_dim
    kvd = spec["kv_heads"] * head_dim
    i = spec["intermediate"]
    return {
        "q_proj": (h, qd), "k_proj": (h, kvd), "v_proj": (h, kvd), "o_proj": (qd, h),
        "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
    }


def matmul_params(spec):
    """Base weights that take part in matrix products: every projection plus the LM head
    (counted even when tied; the embedding gather is not a matmul)."""
    per_layer = sum(i * o for i, o in proj_dims(spec).values())
    return spec["layers"] * per_layer + spec["vocab"] * spec["hidden"]


def attention_pairs(seq_lens, window=None):
    """Query-key pairs one layer computes (causal; fewer under a sliding window)."""
    total = 0
    for s in seq_lens:
        if window is not None and window < s:
            total += window * (window + 1) // 2 + (s - window) * window
        else:
            total += s * (s + 1) // 2
    return total


def training_flops(spec, n_lora, seq_lens, layer_windows=None):
    tokens = sum(seq_lens)
    dense = float(tokens) * (4.0 * matmul_params(spec) + 6.0 * n_lora)
    d_attn = float(spec["heads"] * (spec["hidden"] // spec["heads"]))
    windows = layer_windows or [None] * spec["layers"]
    attn = sum(6.0 * d_attn * attention_pairs(seq_lens, windows[l]) for l in range(spec["layers"]))
    return dense + attn


def n_params(spec):
    """Total parameters, as ModelConfig::n_params (src/model/config.rs), biases not counted."""
    h = spec["hidden"]
    dims = proj_dims(spec)
    per_layer = sum(i * o for i, o in dims.values()) + 2 * h
    embed = spec["vocab"] * h
    return embed + (0 if spec["tie"] else embed) + h + spec["layers"] * per_layer


def peak_rss_bytes():
    """Peak resident memory of this process (Linux VmHWM), as ferrotune's peak_rss_bytes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kb * (1 if sys.platform == "darwin" else 1024)
    except Exception:
        return None


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def die(msg):
    print(f"bench_hf: error: {msg}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="transformers+PEFT LoRA training benchmark with ferrotune bench's shapes",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="tiny", help="size preset: " + ", ".join(PRESETS))
    p.add_argument("--layers", type=int, default=None, help="override the preset's number of layers")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per step")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=None, help="defaults to 2 x lora_r")
    p.add_argument("--targets", default="all-linear", help="comma-separated module names (q_proj,v_proj,...) or all-linear")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda if available, else cpu)")
    p.add_argument("--dtype", choices=["bf16", "f32"], default=None, help="model dtype; default bf16 on CUDA, f32 on CPU")
    p.add_argument("--no-autocast", action="store_true",
                   help="on CUDA bf16, do not run the forward under torch.autocast(bf16) (LoRA matmuls then run in f32)")
    p.add_argument("--max-grad-norm", type=float, default=1.0,
                   help="global-norm gradient clipping, as ferrotune's AdamW default; <= 0 disables")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense peak of the device in TFLOP/s, for MFU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    a = p.parse_args(argv)
    if a.preset not in PRESETS:
        die(f'unknown preset "{a.preset}"; choose one of {", ".join(PRESETS)}')
    if a.seq_len < 1 or a.micro_batch < 1 or a.steps < 1:
        die("--seq-len, --micro-batch and --steps must be at least 1")
    if a.warmup < 0:
        die("--warmup must be at least 0")
    if a.lora_r < 1:
        die("--lora-r must be at least 1")
    if a.layers is not None and a.layers < 1:
        die("--layers must be at least 1")
    return a


def resolve_device(torch, name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        idx = 0
        if name.startswith("cuda:"):
            try:
                idx = int(name[5:])
            except ValueError:
                die(f"--device {name}: expected cpu, cuda, cuda:N or auto")
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA support" if torch.version.cuda is None else \
                f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no usable GPU (driver / CUDA_VISIBLE_DEVICES?)"
            die(f"--device {name} requested but CUDA is not available: {why}. Use --device cpu for a smoke test.")
        if idx >= torch.cuda.device_count():
            die(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return torch.device("cuda", idx)
    die(f"--device {name}: expected cpu, cuda, cuda:N or auto")


def build_config(spec, family):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    rope = {"rope_type": "default", "rope_theta": spec["rope_theta"]}
    if spec["rope_scaling"]:
        rope = dict(spec["rope_scaling"], rope_theta=spec["rope_theta"])
    common = dict(
        vocab_size=spec["vocab"],
        hidden_size=spec["hidden"],
        intermediate_size=spec["intermediate"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["kv_heads"],
        hidden_act="silu",
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        rms_norm_eps=RMS_NORM_EPS,
        tie_word_embeddings=spec["tie"],
        rope_parameters=rope,
        initializer_range=0.02,  # ferrotune's random weights are N(0, 0.02) too
        use_cache=False,
    )
    if family == "llama":
        return LlamaConfig(**common)
    if family == "mistral":
        return MistralConfig(sliding_window=None, **common)
    if family == "qwen2":
        return Qwen2Config(use_sliding_window=False, **common)
    die(f"unknown family {family}")


def main(argv=None):
    a = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    import torch
    import transformers
    import peft
    from transformers import AutoModelForCausalLM
    from peft import LoraConfig, get_peft_model

    device = resolve_device(torch, a.device)
    # RSS with the libraries loaded but no model: the interpreter + torch share of a CPU peak.
    rss_baseline = peak_rss_bytes()
    is_cuda = device.type == "cuda"
    dtype_name = a.dtype or ("bf16" if is_cuda else "f32")
    dtype = {"bf16": torch.bfloat16, "f32": torch.float32}[dtype_name]
    use_autocast = is_cuda and dtype == torch.bfloat16 and not a.no_autocast

    spec = dict(PRESETS[a.preset])
    if a.layers is not None:
        spec["layers"] = a.layers
    lora_alpha = a.lora_alpha if a.lora_alpha is not None else 2.0 * a.lora_r
    if a.targets == "all-linear":
        target_modules = "all-linear"
    else:
        target_modules = [t.strip() for t in a.targets.split(",") if t.strip()]
        if not target_modules:
            die("--targets is empty")

    torch.manual_seed(a.seed)
    if is_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    t0 = time.perf_counter()
    cfg = build_config(spec, spec["family"])
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    model.config.use_cache = False
    if a.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lcfg = LoraConfig(r=a.lora_r, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=target_modules,
                      bias="none", task_type="CAUSAL_LM")
    try:
        model = get_peft_model(model, lcfg)
    except ValueError as e:
        die(f"--targets {a.targets}: {e}")
    model.train()

    trainable = [p for p in model.parameters() if p.requires_grad]
    n_lora = sum(p.numel() for p in trainable)
    # Cross-check the FLOP port against the model actually built.
    base_linear = 0
    for name, mod in model.named_modules():
        if name.split(".")[-1] in proj_dims(spec):
            base_linear += (mod.base_layer if hasattr(mod, "base_layer") else mod).weight.numel()
    expect_linear = matmul_params(spec) - spec["vocab"] * spec["hidden"]
    if base_linear != expect_linear:
        print(f"bench_hf: warning: model has {base_linear} projection weights, FLOP port expects {expect_linear}",
              file=sys.stderr)
    lora_dtype = str(trainable[0].dtype).replace("torch.", "") if trainable else None

    opt_kwargs = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    fused = False
    if is_cuda:
        try:
            opt = torch.optim.AdamW(trainable, fused=True, **opt_kwargs)
            fused = True
        except (RuntimeError, TypeError):
            opt = torch.optim.AdamW(trainable, **opt_kwargs)
    else:
        opt = torch.optim.AdamW(trainable, **opt_kwargs)

    gen = torch.Generator(device="cpu").manual_seed(a.seed ^ 0x5EED)
    input_ids = torch.randint(0, spec["vocab"], (a.micro_batch, a.seq_len), generator=gen).to(device)
    setup_s = time.perf_counter() - t0

    if not a.json:
        print(
            f"bench: {spec['family']} preset {a.preset} ({spec['layers']} layers, hidden {spec['hidden']}, "
            f"{n_params(spec) / 1e9:.2f}B params) on {device}{' (' + torch.cuda.get_device_name(device) + ')' if is_cuda else ''}"
            f" [transformers+peft, {dtype_name}{', autocast bf16' if use_autocast else ''}, sdpa], LoRA r={a.lora_r} on "
            f"{a.targets}, {a.micro_batch} x {a.seq_len} tokens"
            f"{', gradient checkpointing' if a.gradient_checkpointing else ''}; set-up {setup_s:.1f}s",
            file=sys.stderr,
        )

    def step():
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_autocast):
            loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        if a.max_grad_norm and a.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(trainable, a.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    if is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(a.warmup):
        step()
    if is_cuda:
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    last = None
    for _ in range(a.steps):
        last = step()
    if is_cuda:
        torch.cuda.synchronize()
    step_s = (time.perf_counter() - t1) / a.steps
    last_loss = float(last.float().item())

    seq_lens = [a.seq_len] * a.micro_batch
    step_flops = training_flops(spec, n_lora, seq_lens)
    tokens = a.seq_len * a.micro_batch
    tokens_per_s = tokens / step_s
    tflops = step_flops / step_s / 1e12
    mfu = tflops / a.peak_tflops if a.peak_tflops else None
    rss = peak_rss_bytes()
    if is_cuda:
        peak_mem = torch.cuda.max_memory_allocated(device)
        peak_reserved = torch.cuda.max_memory_reserved(device)
        mem_kind = "cuda max_memory_allocated"
        dev_name = torch.cuda.get_device_name(device)
    else:
        peak_mem, peak_reserved, mem_kind = rss, None, "host RSS"
        dev_name = cpu_name()

    row = {
        "impl": "transformers+peft",
        "device": str(device), "device_name": dev_name, "preset": a.preset, "family": spec["family"],
        "layers": spec["layers"], "seq_len": a.seq_len, "micro_batch": a.micro_batch, "lora_r": a.lora_r,
        "lora_alpha": lora_alpha, "targets": a.targets, "lora_params": n_lora,
        "gradient_checkpointing": a.gradient_checkpointing, "warmup": a.warmup, "steps": a.steps,
        "tokens_per_s": tokens_per_s, "step_time_s": step_s, "model_tflops": tflops,
        "step_tflop": step_flops / 1e12, "mfu": mfu,
        "peak_memory_bytes": peak_mem, "peak_memory_kind": mem_kind,
        "peak_memory_reserved_bytes": peak_reserved, "peak_host_rss_bytes": rss,
        "host_rss_baseline_bytes": rss_baseline,
        "loss": last_loss, "flop_convention": FLOP_CONVENTION,
        "dtype": dtype_name, "autocast": use_autocast, "lora_dtype": lora_dtype, "attn_implementation": "sdpa",
        "optimizer": f"torch.optim.AdamW(lr=1e-4, weight_decay=0{', fused' if fused else ''})",
        "max_grad_norm": a.max_grad_norm if a.max_grad_norm and a.max_grad_norm > 0 else None,
        "setup_s": setup_s, "torch_threads": torch.get_num_threads(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "cuda": torch.version.cuda, "transformers": transformers.__version__, "peft": peft.__version__},
    }
    if a.json:
        print(json.dumps(row))
    else:
        gib = float(1 << 30)
        print(f"tokens/s      {tokens_per_s:.1f}")
        print(f"step time     {step_s * 1e3:.1f} ms ({a.steps} steps after {a.warmup} warm-up)")
        print(f"model TFLOP/s {tflops:.4f}  ({step_flops / 1e12:.3f} TFLOP per step)")
        if mfu is not None:
            print(f"MFU           {mfu * 100:.1f}% of {a.peak_tflops} TFLOP/s")
        else:
            print(f"MFU           n/a (pass --peak-tflops)")
        if peak_mem is None:
            print("peak memory   n/a")
        elif is_cuda:
            print(f"peak memory   {peak_mem / gib:.2f} GiB allocated, {peak_reserved / gib:.2f} GiB reserved (CUDA)")
        else:
            base = f"; {rss_baseline / gib:.2f} GiB of it before the model" if rss_baseline else ""
            print(f"peak memory   {peak_mem / gib:.2f} GiB (host RSS{base})")
        print(f"loss          {last_loss:.4f}")
        print(f"LoRA params   {n_lora / 1e6:.2f}M ({lora_dtype})")
        print(f"versions      torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")
        print(f"convention    {FLOP_CONVENTION}")
    if not math.isfinite(last_loss):
        print(f"bench_hf: warning: loss is {last_loss}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
