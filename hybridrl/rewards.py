"""Rule rewards keyed by `data_source`, and users' verl-style reward functions.

- "openai/gsm8k": `gsm8k_compute_score`, verl's semantics (last 300 characters; strict = last
  "#### number", flexible = last number; `score` on an exact string match, else `format_score`,
  0 when nothing is extracted).
- "reasoning_gym/<task>": the task's own `score_answer` on the answer extracted by
  `extract_final_answer` (the "Answer: <answer>" line that data.REASONING_GYM_INSTRUCTION asks for).
- anything else: a user function set by `custom_reward_function.path` / `.name`:
      def compute_score(data_source, solution_str, ground_truth, extra_info=None) -> float | dict
  (a dict must hold "score"; its other keys are logged).

`load_reward_fn(cfg)` returns fn(data_source, solution_str, ground_truth, extra_info) -> {"score": float, ...};
`score_samples(samples, fn, timeout_s)` runs it over a batch on a few threads, each call bounded by
`timeout_s`, and turns a hang, an exception or a non-finite score into a HybridRLError naming the sample.
"""
from __future__ import annotations

import functools
import importlib.util
import inspect
import json
import math
import os
import queue
import re
import threading
import time
from typing import Any, Callable

from hybridrl import HybridRLError

GSM8K_CLIP_CHARS = 300  # verl scores only the tail: the answer is at the end
ANSWER_LINE = re.compile(r"answer\s*(?:is\s*:?|:)\s*(.+)$", re.IGNORECASE)
CUSTOM_FIX = "fix: set custom_reward_function.path (a .py file) and custom_reward_function.name (a function in it)"


# ---------------------------------------------------------------- GSM8K

def gsm8k_extract(solution_str: str, method: str = "strict") -> str | None:
    """The answer string: strict = last '#### number' (',' and '$' removed); flexible = last number."""
    if method not in ("strict", "flexible"):
        raise HybridRLError(f"GSM8K method must be strict or flexible, got {method!r}; fix: reward.gsm8k_method")
    text = solution_str[-GSM8K_CLIP_CHARS:]
    if method == "strict":
        found = re.findall(r"#### (\-?[0-9\.\,]+)", text)
        return found[-1].replace(",", "").replace("$", "") if found else None
    numbers = [n for n in re.findall(r"(\-?[0-9\.\,]+)", text) if n not in ("", ".")]
    return numbers[-1] if numbers else None


def gsm8k_compute_score(solution_str: str, ground_truth: str, method: str = "strict", format_score: float = 0.0,
                        score: float = 1.0) -> float:
    """`score` when the extracted answer equals ground_truth as a string, else `format_score`; 0 if none."""
    answer = gsm8k_extract(solution_str, method)
    if answer is None:
        return 0.0
    return float(score) if answer == str(ground_truth) else float(format_score)


# ---------------------------------------------------------------- reasoning-gym

def extract_final_answer(solution_str: str) -> str:
    """The final answer of a reasoning-gym response, tried in this order:

    1. the last <answer>...</answer> block;
    2. the last line "Answer: X" (also "The answer is X"), X up to the end of that line;
    3. the last non-empty line; when it holds "=", what follows the last "=" ("5 - 3 = 2." → "2").
    A trailing period and surrounding markdown (`**`) are removed.
    """
    tagged = re.findall(r"<answer>(.*?)</answer>", solution_str, flags=re.DOTALL | re.IGNORECASE)
    if tagged:
        return _clean(tagged[-1])
    lines = [ln for ln in solution_str.strip().splitlines() if ln.strip()]
    for line in reversed(lines):
        match = ANSWER_LINE.search(line)
        if match:
            return _clean(match.group(1))
    if not lines:
        return ""
    last = _clean(lines[-1])
    return _clean(last.rsplit("=", 1)[1]) if "=" in last else last


def _clean(text: str) -> str:
    """Strip spaces, markdown bold and one trailing period."""
    text = text.strip().strip("*").strip()
    return text[:-1].rstrip() if text.endswith(".") else text


@functools.lru_cache(maxsize=None)
def _rg_scorer(task: str):
    from reasoning_gym.factory import DATASETS, get_score_answer_fn

    if task not in DATASETS:
        raise HybridRLError(f"unknown reasoning-gym task {task!r} in data_source; fix: use reasoning_gym/<task> "
                            f"with a task from reasoning_gym.factory.DATASETS")
    return get_score_answer_fn(task)


def reasoning_gym_compute_score(data_source: str, solution_str: str, ground_truth: Any,
                                extra_info: dict | None = None) -> float:
    """reasoning-gym's own `score_answer` on the extracted answer, against the stored entry."""
    extra_info = extra_info or {}
    task = data_source.split("/", 1)[1] if "/" in data_source else extra_info.get("task", "")
    entry = extra_info.get("entry")
    entry = json.loads(entry) if isinstance(entry, str) else entry
    if not isinstance(entry, dict):
        entry = {"question": "", "answer": ground_truth, "metadata": {}}
    entry.setdefault("answer", ground_truth)
    entry.setdefault("metadata", {})
    scorer = _rg_scorer(task)
    try:
        value = scorer(extract_final_answer(solution_str), entry)
    except Exception:  # a scorer choking on odd model output must not stop training: it is simply wrong
        return 0.0
    return float(value or 0.0)


# ---------------------------------------------------------------- dispatch

def default_compute_score(data_source: str, solution_str: str, ground_truth: Any, extra_info: dict | None = None,
                          **kwargs) -> float | dict:
    """Built-in rule rewards by data_source; kwargs (method, format_score) go to the GSM8K scorer."""
    if data_source in ("openai/gsm8k", "gsm8k"):
        return gsm8k_compute_score(solution_str, str(ground_truth), **kwargs)
    if data_source.startswith("reasoning_gym/"):
        return reasoning_gym_compute_score(data_source, solution_str, ground_truth, extra_info)
    raise HybridRLError(f"no built-in reward for data_source {data_source!r} (built in: openai/gsm8k, "
                        f"reasoning_gym/<task>); fix: write compute_score(data_source, solution_str, ground_truth, "
                        f"extra_info=None) and set custom_reward_function.path / custom_reward_function.name")


def _load_custom(path: str, name: str) -> Callable:
    """The function `name` from the python file at `path`, loaded by file path (no sys.path changes)."""
    if not os.path.isfile(path):
        raise HybridRLError(f"custom reward file {path} not found; {CUSTOM_FIX}")
    spec = importlib.util.spec_from_file_location(f"hybridrl_custom_reward_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the user's file: say where it failed, not a deep trace
        raise HybridRLError(f"custom reward file {path} failed to import ({type(e).__name__}: {e}); "
                            f"fix: run `python {path}` to see the error") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        found = [n for n, v in vars(module).items() if inspect.isfunction(v) and v.__module__ == module.__name__]
        raise HybridRLError(f"custom reward file {path} has no function {name!r} (functions: {found}); {CUSTOM_FIX}")
    return fn


def _as_dict(value: Any, where: str) -> dict:
    """A reward result as {"score": float, ...}; the score must be a finite real number (not a string)."""
    if isinstance(value, dict):
        if "score" not in value:
            raise HybridRLError(f"reward function {where} returned a dict without 'score' (keys {sorted(value)}); "
                                f"fix: return a float or a dict with a 'score' key")
        return {**value, "score": _finite(value["score"], where)}
    return {"score": _finite(value, where)}


def _finite(value: Any, where: str) -> float:
    """A score as a finite float; a str ("1.0") is a bug in the function, not a score."""
    try:
        if isinstance(value, (str, bytes)):
            raise TypeError
        score = float(value)   # int, float, bool, numpy and 0-d torch numbers
    except (TypeError, ValueError):
        raise HybridRLError(f"reward function {where} returned {type(value).__name__} {str(value)[:40]!r} as the "
                            f"score; fix: return a float or a dict with a float 'score'") from None
    if not math.isfinite(score):
        raise HybridRLError(f"reward function {where} returned {score} as the score; fix: return a finite float")
    return score


def load_reward_fn(reward_cfg) -> Callable[[str, str, Any, dict], dict]:
    """fn(data_source, solution_str, ground_truth, extra_info) -> {"score": float, ...} for this config."""
    if reward_cfg.custom_path:
        user_fn = _load_custom(reward_cfg.custom_path, reward_cfg.custom_name or "compute_score")
        where = f"{reward_cfg.custom_name} in {reward_cfg.custom_path}"

        def custom(data_source, solution_str, ground_truth, extra_info=None) -> dict:
            return _as_dict(user_fn(data_source, solution_str, ground_truth, extra_info), where)

        custom.__qualname__ = where   # the name score_samples' errors give
        return custom
    gsm8k_kwargs = {"method": reward_cfg.gsm8k_method, "format_score": reward_cfg.format_score}

    def default(data_source, solution_str, ground_truth, extra_info=None) -> dict:
        kwargs = gsm8k_kwargs if data_source in ("openai/gsm8k", "gsm8k") else {}
        value = default_compute_score(data_source, solution_str, ground_truth, extra_info, **kwargs)
        return _as_dict(value, "default_compute_score")

    default.__qualname__ = "default_compute_score"
    return default


# ---------------------------------------------------------------- scoring a batch

REWARD_TIMEOUT_FIX = "fix: make the function return for every response, or raise reward.timeout_s"


def score_samples(samples: list, reward_fn: Callable, timeout_s: float = 60.0, workers: int = 4) -> None:
    """Set `reward` and `reward_extra` on every Sample from reward_fn(data_source, response_text, ...)."""
    calls = [(s.data_source, s.response_text, s.ground_truth, s.extra_info) for s in samples]
    for s, out in zip(samples, score_calls(calls, reward_fn, timeout_s, workers)):
        s.reward = out["score"]
        s.reward_extra = {**s.reward_extra, **{k: v for k, v in out.items() if k != "score"}}   # keeps the rollout's (tool stats)


def score_calls(calls: list[tuple], reward_fn: Callable, timeout_s: float = 60.0, workers: int = 4) -> list[dict]:
    """reward_fn(*call) for each (data_source, text, ground_truth, extra_info), as {"score": float, ...}.

    Up to `workers` calls run at once on daemon threads (so reward functions must be thread-safe; pure
    ones are). A call running longer than `timeout_s` raises HybridRLError: a thread cannot be killed,
    so the hung call is left behind on its daemon thread, which never blocks the process from exiting.
    The main thread waits in short slices, so Ctrl-C stops scoring at once.
    """
    name = getattr(reward_fn, "__qualname__", type(reward_fn).__name__)
    todo, done, stop = queue.SimpleQueue(), queue.SimpleQueue(), threading.Event()
    started: dict[int, float] = {}
    for i in range(len(calls)):
        todo.put(i)

    def work() -> None:
        while not stop.is_set():
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            started[i] = time.monotonic()
            try:
                done.put((i, reward_fn(*calls[i]), None))
            except BaseException as e:  # noqa: BLE001 - even sys.exit(): reported below with its sample
                done.put((i, None, e))

    for k in range(min(workers, len(calls))):
        threading.Thread(target=work, name=f"hybridrl-reward-{k}", daemon=True).start()
    results: list = [None] * len(calls)
    try:
        for _ in calls:
            i, out, err = _next_result(done, started, results, timeout_s, calls, name)
            results[i] = _checked(out, err, i, calls[i], name)
    finally:
        stop.set()   # idle workers exit; a hung one stays behind, as a daemon
    return results


def _next_result(done, started: dict, results: list, timeout_s: float, calls: list, name: str):
    """The next finished call; HybridRLError when a running call is past its timeout."""
    while True:
        try:
            return done.get(timeout=0.05)
        except queue.Empty:
            now = time.monotonic()
            for i, t in list(started.items()):
                if results[i] is None and now - t > timeout_s:
                    raise HybridRLError(f"reward function {name} did not return within {timeout_s:g} s "
                                        f"(reward.timeout_s) on {_where(i, calls[i])}; {REWARD_TIMEOUT_FIX}")


def _checked(out: Any, err: BaseException | None, i: int, call: tuple, name: str) -> dict:
    """The call's result as {"score": float, ...}, or HybridRLError naming the sample."""
    if isinstance(err, HybridRLError):   # already names the function and the fix
        raise HybridRLError(f"{err} (on {_where(i, call)})") from None
    if err is not None:
        raise HybridRLError(f"reward function {name} raised {type(err).__name__}: {str(err)[:200]} on "
                            f"{_where(i, call)}; fix: it must return a finite float for any response (a wrong or "
                            "odd answer scores 0)") from err
    try:
        return _as_dict(out, name)
    except HybridRLError as e:
        raise HybridRLError(f"{e} (on {_where(i, call)})") from None


def _where(i: int, call: tuple) -> str:
    return f"sample {i} (data_source {call[0]!r}, response {call[1][:80]!r})"
