"""Reward functions for the GRPO examples, with TRL's signature:
f(prompts, completions, completion_ids, **kwargs) -> list of floats (or None).
Each dataset column other than "prompt" arrives in kwargs as a list, one
entry per completion ("answer" here)."""

import re


def _text(completion):
    # Conversational prompts give completions as [{"role": "assistant", "content": ...}].
    return completion[-1]["content"] if isinstance(completion, list) else completion


def number_only(prompts, completions, completion_ids, **kwargs):
    """1.0 when the completion is a bare number (the format asked for), else 0.0."""
    return [1.0 if re.fullmatch(r"\s*-?\d+\s*", _text(c)) else 0.0 for c in completions]


def correct_answer(prompts, completions, completion_ids, answer, **kwargs):
    """1.0 when the last number in the completion is the answer after "####"."""
    out = []
    for c, a in zip(completions, answer):
        want = a.split("####")[-1].strip()
        found = re.findall(r"-?\d+", _text(c))
        out.append(1.0 if found and found[-1] == want else 0.0)
    return out
