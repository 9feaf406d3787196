"""Builds the quickstart's tiny model and dataset (committed; rerun only to
change them): a small Llama-architecture model with random weights, a
byte-level BPE tokenizer trained on the dataset's text, a chat template in
tokenizer_config.json, and data.jsonl (chat conversations to memorise).

    python examples/quickstart/make_quickstart.py   # needs torch, transformers, tokenizers
"""

import json
import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

HERE = os.path.dirname(os.path.abspath(__file__))

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Japan", "Tokyo"), ("Canada", "Ottawa"), ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Chile", "Santiago"), ("Norway", "Oslo"),
    ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Poland", "Warsaw"), ("Greece", "Athens"),
    ("Austria", "Vienna"), ("Ireland", "Dublin"), ("Cuba", "Havana"), ("India", "New Delhi"),
]
FACTS = [
    ("What is ferrotune?", "A fast LoRA fine-tuning trainer written in Rust."),
    ("What does LoRA train?", "Two small matrices per layer; the base weights stay frozen."),
    ("What is QLoRA?", "LoRA on a base model stored in 4-bit NF4."),
    ("Which optimizer does ferrotune use?", "AdamW, with decoupled weight decay."),
    ("What is a chat template?", "A Jinja template that turns messages into one prompt."),
    ("What is sample packing?", "Several short examples share one row, each with its own attention."),
    ("How many legs does a spider have?", "Eight."),
    ("What colour is the sky on a clear day?", "Blue."),
]
SYSTEM = "You are a concise assistant."

# The reply starts on its own line, so the generation prompt ends on a token
# boundary: the first token the model writes is one it was trained on.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}Assistant:\n{{ message['content'] }}{{ eos_token }}\n"
    "{% else %}{{ raise_exception('roles are system, user and assistant') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:\n{% endif %}"
)


def conversations():
    rows = []
    for country, city in CAPITALS:
        rows.append([("user", f"What is the capital of {country}?"), ("assistant", f"The capital of {country} is {city}.")])
    for q, a in FACTS:
        rows.append([("user", q), ("assistant", a)])
    # A few with a system turn, to exercise masking of non-trained roles.
    for q, a in FACTS[:4]:
        rows.append([("system", SYSTEM), ("user", q), ("assistant", a)])
    return [{"messages": [{"role": r, "content": c} for r, c in conv]} for conv in rows]


def build_tokenizer(texts):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        min_frequency=2,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def main():
    rows = conversations()
    with open(os.path.join(HERE, "data.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    texts = [m["content"] for r in rows for m in r["messages"]] + ["User: Assistant:"]
    tokenizer = build_tokenizer(texts)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(cfg)
    # transformers' default init (std 0.02 everywhere) gives a head whose
    # logits cannot move far from uniform, which would cap what any adapter
    # can learn. Scale as a trained model is scaled instead: linear weights
    # ~ 1/sqrt(fan_in), unit-variance embeddings, a head with logits of O(10).
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "norm" in name:
                p.fill_(1.0)
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif "lm_head" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    out = os.path.join(HERE, "model")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for f in os.listdir(out):
        print(f, os.path.getsize(os.path.join(out, f)))


if __name__ == "__main__":
    main()
