"""ferrotune's reward worker: imports the run's Python reward functions and
calls them with TRL's GRPOTrainer signature. It ships inside the ferrotune
binary and needs only the standard library.

Protocol: one JSON object per line. Requests come on the original stdin,
replies go to the original stdout; the user's prints (fd 1) go to stderr, so
they cannot corrupt a reply. argv[1] is the config file's folder, put first
on sys.path.

  {"op": "load", "funcs": ["mod.func", ...]}
      -> {"names": [__name__, ...]} | {"error": text, "func": i}
  {"op": "score", "global_step": n, "max_steps": m, "prompts": [...],
   "completions": [...], "completion_ids": [[...]], "columns": {key: [...]}}
      -> zero or more {"running": i}, then
         {"rewards": [[repr(float) | null, ...] per function]}
         | {"error": text, "func": i}
"""

import asyncio
import functools
import importlib
import inspect
import json
import os
import signal
import sys
import traceback

# Keep the protocol's ends, then point fds 0 and 1 elsewhere: whatever the
# user's code prints (Python or C level) lands on stderr.
_replies = os.fdopen(os.dup(1), "w", encoding="utf-8")
_requests = os.fdopen(os.dup(0), "rb")
os.dup2(2, 1)
_null = os.open(os.devnull, os.O_RDONLY)
os.dup2(_null, 0)
sys.stdout = sys.stderr
sys.stdin = open(os.devnull)
# Ctrl-C reaches the whole process group: the trainer stops the run cleanly,
# so the worker must not die mid-step on it.
signal.signal(signal.SIGINT, signal.SIG_IGN)

sys.path.insert(0, sys.argv[1])


class Failure(Exception):
    """An error to report as-is, naming the function it concerns."""


class TrainerState:
    """The part of transformers' TrainerState that reward functions read."""

    def __init__(self, global_step, max_steps):
        self.global_step = global_step
        self.max_steps = max_steps

    def __repr__(self):
        return "TrainerState(global_step=%d, max_steps=%d)" % (self.global_step, self.max_steps)


def _ignore(*args, **kwargs):
    """log_extra / log_metric: accepted, not recorded."""


def reply(obj):
    _replies.write(json.dumps(obj) + "\n")
    _replies.flush()


def exception_text(e):
    """The exception's last line, with where it was raised."""
    text = traceback.format_exception_only(type(e), e)[-1].strip()
    if isinstance(e, SyntaxError) and e.filename:
        return "%s (%s line %s)" % (text, e.filename, e.lineno)
    # The innermost frame with a real file: import machinery shows up as
    # "<frozen importlib._bootstrap>", which says nothing to the user.
    frames = [f for f in traceback.extract_tb(e.__traceback__) if not f.filename.startswith("<")]
    if frames:
        return "%s (at %s line %s)" % (text, frames[-1].filename, frames[-1].lineno)
    return text


def display_name(func):
    """The name TRL logs: partials unwrapped, callable objects by class."""
    while isinstance(func, functools.partial):
        func = func.func
    return getattr(func, "__name__", type(func).__name__)


def load(name):
    module_name, _, attr = name.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        missing = e.name or ""
        if missing == module_name or module_name.startswith(missing + "."):
            raise Failure(
                "module `%s` was not found (looked in %s, then Python's path)" % (module_name, sys.path[0])
            )
        raise Failure("importing module `%s` raised %s" % (module_name, exception_text(e)))
    except BaseException as e:
        raise Failure("importing module `%s` raised %s" % (module_name, exception_text(e)))
    if not hasattr(module, attr):
        import difflib

        callables = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n, None))]
        close = difflib.get_close_matches(attr, callables, 1)
        hint = "; did you mean `%s`?" % close[0] if close else ""
        where = getattr(module, "__file__", None) or module_name
        raise Failure("module `%s` (%s) has no function `%s`%s" % (module_name, where, attr, hint))
    func = getattr(module, attr)
    if not callable(func):
        raise Failure("`%s` is not a function (its type is %s)" % (name, type(func).__name__))
    return func


def short(value):
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def rewards_of(out, n):
    """The function's output as JSON: a repr(float) string or null each."""
    if isinstance(out, (str, bytes, dict)) or not hasattr(out, "__iter__"):
        raise Failure("returned %s (%s), expected a list of %d numbers or None" % (short(out), type(out).__name__, n))
    values = list(out)
    if len(values) != n:
        raise Failure("returned %d rewards, expected %d (one per completion)" % (len(values), n))
    result = []
    for j, v in enumerate(values):
        if v is None:
            result.append(None)
            continue
        number = None
        if not isinstance(v, (str, bytes)):
            try:
                number = float(v)
            except (TypeError, ValueError):
                pass
        if number is None:
            raise Failure(
                "returned %s (%s) for completion %d, expected a number or None" % (short(v), type(v).__name__, j)
            )
        result.append(repr(number))
    return result


def score(funcs, request):
    n = len(request["prompts"])
    kwargs = dict(request["columns"])
    kwargs["trainer_state"] = TrainerState(request["global_step"], request["max_steps"])
    kwargs["log_extra"] = _ignore
    kwargs["log_metric"] = _ignore
    results = [None] * len(funcs)
    pending = []
    try:
        for i, func in enumerate(funcs):
            reply({"running": i})
            try:
                out = func(
                    prompts=request["prompts"],
                    completions=request["completions"],
                    completion_ids=request["completion_ids"],
                    **kwargs
                )
            except BaseException as e:
                return {"error": "raised " + exception_text(e), "func": i}
            if inspect.isawaitable(out):
                pending.append((i, out))
                continue
            try:
                results[i] = rewards_of(out, n)
            except Failure as e:
                return {"error": str(e), "func": i}
        if pending:
            # Async functions (an LLM judge, say) run together, as in TRL.
            reply({"running": pending[0][0]})

            async def together():
                return await asyncio.gather(*(c for _, c in pending), return_exceptions=True)

            outs = asyncio.run(together())
            for (i, _), out in zip(pending, outs):
                if isinstance(out, BaseException):
                    return {"error": "raised " + exception_text(out), "func": i}
                try:
                    results[i] = rewards_of(out, n)
                except Failure as e:
                    return {"error": str(e), "func": i}
            pending = []
        return {"rewards": results}
    finally:
        for _, c in pending:
            c.close()


def main():
    funcs = []
    for line in _requests:
        request = json.loads(line)
        if request["op"] == "load":
            funcs = []
            names = []
            for i, name in enumerate(request["funcs"]):
                try:
                    func = load(name)
                except Failure as e:
                    reply({"error": str(e), "func": i})
                    break
                funcs.append(func)
                names.append(display_name(func))
            else:
                reply({"names": names})
        elif request["op"] == "score":
            reply(score(funcs, request))


main()
