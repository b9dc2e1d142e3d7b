"""Rule rewards keyed by `data_source`, and users' verl-style reward functions.

- "openai/gsm8k": `gsm8k_compute_score`, verl's semantics (last 300 characters; strict = last
  "#### number", flexible = last number; `score` on an exact string match, else `format_score`,
  0 when nothing is extracted).
- "reasoning_gym/<task>": the task's own `score_answer` on the answer extracted by
  `extract_final_answer` (the "Answer: <answer>" line that data.REASONING_GYM_INSTRUCTION asks for).
- anything else: a user function set by `custom_reward_function.path` / `.name`:
      def compute_score(data_source, solution_str, ground_truth, extra_info=None) -> float | dict
  (a dict must hold "score"; its other keys are logged).

`load_reward_fn(cfg)` returns fn(data_source, solution_str, ground_truth, extra_info) -> {"score": float, ...}.
"""
from __future__ import annotations

import functools
import importlib.util
import inspect
import json
import math
import os
import re
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
    """A reward result as {"score": float, ...}."""
    if isinstance(value, dict):
        if "score" not in value:
            raise HybridRLError(f"reward function {where} returned a dict without 'score' (keys {sorted(value)}); "
                                f"fix: return a float or a dict with a 'score' key")
        return {**value, "score": float(value["score"])}
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise HybridRLError(f"reward function {where} returned {type(value).__name__} {value!r}; "
                            f"fix: return a float or a dict with a 'score' key") from None
    if math.isnan(score):
        raise HybridRLError(f"reward function {where} returned NaN; fix: return a finite float")
    return {"score": score}


def load_reward_fn(reward_cfg) -> Callable[[str, str, Any, dict], dict]:
    """fn(data_source, solution_str, ground_truth, extra_info) -> {"score": float, ...} for this config."""
    if reward_cfg.custom_path:
        user_fn = _load_custom(reward_cfg.custom_path, reward_cfg.custom_name or "compute_score")
        where = f"{reward_cfg.custom_name} in {reward_cfg.custom_path}"

        def custom(data_source, solution_str, ground_truth, extra_info=None) -> dict:
            return _as_dict(user_fn(data_source, solution_str, ground_truth, extra_info), where)

        return custom
    gsm8k_kwargs = {"method": reward_cfg.gsm8k_method, "format_score": reward_cfg.format_score}

    def default(data_source, solution_str, ground_truth, extra_info=None) -> dict:
        kwargs = gsm8k_kwargs if data_source in ("openai/gsm8k", "gsm8k") else {}
        value = default_compute_score(data_source, solution_str, ground_truth, extra_info, **kwargs)
        return _as_dict(value, "default_compute_score")

    return default
