"""Multi-turn rollout with tools, in token space (verl's ToolAgentLoop, slime's `append(..., trainable)`).

    tools = load_tools(cfg_path)                          # hybridrl.rollout.tools
    samples = await multi_turn_rollout(engine, prompts, sampling, tokenizer, tools, MultiTurnConfig(enable=True))

Each of the `sampling.n` samples of a prompt is its own state machine with its own seed:

    generate -> parse tool calls -> (none: stop) -> run them (concurrently, each with a timeout)
             -> append the templated tool turn (not trainable) -> generate ...

Tokens trained on are the tokens the engine saw. The model's tokens are appended exactly as generated
(end-of-turn token included); a tool turn is templated once and its tokens appended, the running token
list is never re-tokenized from text. `sampling.max_new_tokens` is the budget of the whole response (model
and tool tokens over all turns, as verl's response_length).

Templating a tool turn (`tool_turn_ids`): render a fixed dummy conversation that ends with an assistant
message whose content is a marker, then the same plus the tool messages and a generation prompt; the text
after the marker is the assistant's closing (e.g. `<|im_end|>\\n`), the tool turn and `<|im_start|>assistant\\n`.
The end-of-turn text the model already generated is cut from its start, and the rest is tokenized on its own:
it starts right after a special token, so its tokens are those of the full conversation, and they do not
depend on the history. `tokenization_sanity_check_mode="strict"` checks exactly that at the end.

finish_reason: stop (no tool call) | length (budget spent) | turn_cap | context_overflow (max_model_len)
| tool_error (max_tool_errors failed calls) | abort (the engine aborted).
"""
from __future__ import annotations

import asyncio
import copy
import json
import re
from dataclasses import dataclass, replace

from hybridrl import HybridRLError
from hybridrl.rollout.agent import request_seed
from hybridrl.rollout.base import SamplingParams
from hybridrl.rollout.tools import BaseTool, ToolCall, parse_tool_calls, truncate
from hybridrl.types import Sample


@dataclass
class MultiTurnConfig:
    """verl's actor_rollout_ref.rollout.multi_turn keys, plus the limits this loop enforces."""

    enable: bool = False
    max_assistant_turns: int | None = None     # None: no cap (the budget ends the loop)
    max_user_turns: int | None = None          # tool turns count as user turns (as verl)
    max_parallel_calls: int = 1                # calls run per turn; more get an error message
    max_tool_response_length: int = 256        # characters of a tool's output kept
    tool_response_truncate_side: str = "middle"    # left | right | middle
    tool_timeout_s: float = 30.0
    max_tool_errors: int | None = None         # failed calls (malformed, unknown, raised, timed out) before tool_error
    format: str = "hermes"                     # hermes | llama3_json | function_tag
    tokenization_sanity_check_mode: str = "strict"     # strict | ignore_strippable | disable
    max_model_len: int | None = None           # prompt + response cap (None: no cap)

    def __post_init__(self):
        if self.tokenization_sanity_check_mode not in ("strict", "ignore_strippable", "disable"):
            raise HybridRLError("tokenization_sanity_check_mode must be strict, ignore_strippable or disable, "
                                f"got {self.tokenization_sanity_check_mode!r}")
        if self.tool_response_truncate_side not in ("left", "right", "middle"):
            raise HybridRLError(f"tool_response_truncate_side must be left, right or middle, "
                                f"got {self.tool_response_truncate_side!r}")
        if self.max_parallel_calls < 1:
            raise HybridRLError(f"max_parallel_calls must be >= 1, got {self.max_parallel_calls}")


# ---------------------------------------------------------------- templating

_MARKER = "\x00HYBRIDRL_ASSISTANT\x00"
_DUMMY = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
          {"role": "assistant", "content": _MARKER}]


def _after_marker(tokenizer, extra: list[dict], generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(_DUMMY + extra, tokenize=False, add_generation_prompt=generation_prompt)
    return text[text.index(_MARKER) + len(_MARKER):]


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False) if text else []


def tool_turn_ids(tokenizer, tool_messages: list[dict], ended_turn: bool) -> list[int]:
    """Tokens that follow a model turn: its closing (unless the model generated it: ended_turn), the tool
    messages as the chat template renders them, and the next assistant turn's generation prompt."""
    text = _after_marker(tokenizer, tool_messages, generation_prompt=True)
    if ended_turn and text.startswith(tokenizer.eos_token):
        text = text[len(tokenizer.eos_token):]
    return _encode(tokenizer, text)


def _closing_ids(tokenizer, ended_turn: bool) -> list[int]:
    """What the template puts after the last assistant message's content (minus a generated end-of-turn)."""
    text = _after_marker(tokenizer, [], generation_prompt=False)
    if ended_turn and text.startswith(tokenizer.eos_token):
        text = text[len(tokenizer.eos_token):]
    return _encode(tokenizer, text)


def sanity_check(tokenizer, sample: Sample, messages: list[dict], ended_turn: bool, mode: str,
                 tools: list[dict] | None = None) -> bool | None:
    """Does templating the whole conversation from its messages give the tokens the engine saw?

    strict: token for token (plus the template's closing after the last turn); ignore_strippable: the decoded
    texts agree once whitespace is removed. None when the prompt has no messages to re-template."""
    if mode == "disable" or not (isinstance(sample.raw_prompt, list) and sample.raw_prompt):
        return None
    seen = sample.prompt_ids + sample.response_ids
    for tool_list in ([None, tools] if tools else [None]):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False, tools=tool_list)
        full = _encode(tokenizer, text)
        if mode == "strict" and full == seen + _closing_ids(tokenizer, ended_turn):
            return True
        if mode == "ignore_strippable":
            squash = lambda ids: re.sub(r"\s+", "", tokenizer.decode(ids, skip_special_tokens=False))  # noqa: E731
            if squash(full) == squash(seen + _closing_ids(tokenizer, ended_turn)):
                return True
    return False


def tokenization_mismatch_rate(samples: list[Sample]) -> float:
    """Fraction of checked samples whose tokens differ from their re-templated conversation (0.0 if none)."""
    checked = [s.reward_extra["tokenization_ok"] for s in samples if s.reward_extra.get("tokenization_ok") is not None]
    return sum(not ok for ok in checked) / len(checked) if checked else 0.0


# ---------------------------------------------------------------- tools

async def _run_call(tools: dict[str, BaseTool], ids: dict[str, str], call: ToolCall, cfg: MultiTurnConfig,
                    create_kwargs: dict, lock: asyncio.Lock) -> tuple[str, float, bool]:
    """One call -> (text for the model, reward, failed). Never raises (but for cancellation)."""
    tool = tools.get(call.name)
    if tool is None:
        return f"Error: unknown tool {call.name!r}; available: {', '.join(sorted(tools)) or 'none'}", 0.0, True

    async def create_and_execute():
        async with lock:            # parallel calls of one tool share one instance, created once
            if call.name not in ids:
                made = await tool.create(None, **create_kwargs.get(call.name, {}).get("create_kwargs", {}))
                ids[call.name] = made[0] if isinstance(made, tuple) else made   # verl's newer create -> (id, resp)
        return await tool.execute(ids[call.name], call.arguments)

    try:
        text, reward, _ = await asyncio.wait_for(create_and_execute(), cfg.tool_timeout_s)
    except asyncio.TimeoutError:    # (TimeoutError itself on Python >= 3.11)
        return f"Error: tool {call.name!r} timed out after {cfg.tool_timeout_s:g} s", 0.0, True
    except Exception as e:  # the model sees what went wrong and may try again
        return f"Error: {type(e).__name__}: {e}", 0.0, True
    text = text if isinstance(text, str) else str(getattr(text, "text", text))
    return truncate(text, cfg.max_tool_response_length, cfg.tool_response_truncate_side), float(reward), False


async def _run_turn(tools, ids, calls, errors, cfg, create_kwargs) -> tuple[list[str], float, int]:
    """All calls of one model turn -> (tool message texts in order, summed reward, failed calls)."""
    run, extra = calls[:cfg.max_parallel_calls], calls[cfg.max_parallel_calls:]
    lock = asyncio.Lock()
    results = await asyncio.gather(*[_run_call(tools, ids, c, cfg, create_kwargs, lock) for c in run])
    texts = [t for t, _, _ in results]
    texts += [f"Error: at most {cfg.max_parallel_calls} tool calls per turn; {c.name!r} was not run" for c in extra]
    texts += [f"Error: malformed tool call: {e}" for e in errors]
    failed = sum(f for _, _, f in results) + len(extra) + len(errors)
    return texts, sum(r for _, r, _ in results), failed


# ---------------------------------------------------------------- the loop

async def multi_turn_rollout(engine, prompts: list[Sample], sampling: SamplingParams, tokenizer,
                             tools: dict[str, BaseTool] | list[BaseTool], cfg: MultiTurnConfig,
                             step: int = 0, first: int = 0) -> list[Sample]:
    """`sampling.n` multi-turn samples per prompt, grouped by prompt (group = first + prompt position)."""
    tools = tools if isinstance(tools, dict) else {t.name: t for t in tools}
    jobs = [one_trajectory(engine, p, first + i, j, sampling, tokenizer, tools, cfg, step)
            for i, p in enumerate(prompts) for j in range(sampling.n)]
    tasks = [asyncio.ensure_future(j) for j in jobs]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:                 # one failed: stop the others (cancelling aborts them on the engine)
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _content(tokenizer, ids: list[int], ended_turn: bool) -> str:
    """A model turn as the message content the chat template would wrap (its end-of-turn token cut)."""
    return tokenizer.decode(ids[:-1] if ended_turn else ids, skip_special_tokens=False)


async def one_trajectory(engine, prompt: Sample, group: int, k: int, sampling: SamplingParams, tokenizer,
                         tools: dict[str, BaseTool], cfg: MultiTurnConfig, step: int) -> Sample:
    """Sample k of prompt `group`: the state machine generate -> tools -> generate ... until a stop."""
    s = copy.copy(prompt)
    s.group, s.response_ids, s.loss_mask, s.rollout_logprobs = group, [], [], []
    index = group * sampling.n + k                                  # this sample's number in the step
    messages = [dict(m) for m in prompt.raw_prompt] if isinstance(prompt.raw_prompt, list) else []
    end_ids = {tokenizer.eos_token_id, *sampling.stop_token_ids}
    create_kwargs = (prompt.extra_info or {}).get("tools_kwargs", {})
    ids: dict[str, str] = {}                                       # tool name -> instance id
    turns = user_turns = calls_made = failures = 0
    tool_reward, versions, status, ended = 0.0, [], "", False
    try:
        while True:
            left = sampling.max_new_tokens - len(s.response_ids)
            room = None if cfg.max_model_len is None else cfg.max_model_len - len(s.prompt_ids) - len(s.response_ids)
            if left <= 0 or (room is not None and room <= 0):
                status = "length" if left <= 0 else "context_overflow"
                break
            seed = None if sampling.seed is None else request_seed(request_seed(sampling.seed, step, index), 0, turns)
            sp = replace(sampling, n=1, seed=seed, max_new_tokens=left if room is None else min(left, room))
            out = (await engine.generate(s.prompt_ids + s.response_ids, sp,
                                         request_id=f"s{step}-p{group}-n{k}-t{turns}"))[0]
            turns += 1
            versions.append(out.weight_version)
            s.append(out.output_ids, out.logprobs, trainable=True)
            ended = bool(out.output_ids) and out.output_ids[-1] in end_ids
            messages.append({"role": "assistant", "content": _content(tokenizer, out.output_ids, ended)})
            if out.finish_reason != "stop":
                status = "abort" if out.finish_reason == "abort" else (
                    "length" if sp.max_new_tokens == left else "context_overflow")
                break
            calls, errors = parse_tool_calls(messages[-1]["content"], cfg.format)
            if not calls and not errors:
                status = "stop"
                break
            if (cfg.max_assistant_turns is not None and turns >= cfg.max_assistant_turns) or \
                    (cfg.max_user_turns is not None and user_turns >= cfg.max_user_turns):
                status = "turn_cap"
                break
            texts, reward, failed = await _run_turn(tools, ids, calls, errors, cfg, create_kwargs)
            calls_made, failures, tool_reward = calls_made + len(calls), failures + failed, tool_reward + reward
            if cfg.max_tool_errors is not None and failures >= cfg.max_tool_errors:
                status = "tool_error"
                break
            tool_msgs = [{"role": "tool", "content": t} for t in texts]
            delta = tool_turn_ids(tokenizer, tool_msgs, ended)
            if len(s.response_ids) + len(delta) > sampling.max_new_tokens:
                status = "length"
                break
            total = len(s.prompt_ids) + len(s.response_ids) + len(delta)
            if cfg.max_model_len is not None and total >= cfg.max_model_len:
                status = "context_overflow"
                break
            s.append(delta, None, trainable=False)
            messages.extend(tool_msgs)
            user_turns += 1
    finally:
        for name, iid in ids.items():
            await tools[name].release(iid)
    s.finish_reason = status
    s.weight_version = min(versions) if versions else -1       # the oldest weights that produced a token
    s.response_text = tokenizer.decode(s.response_ids, skip_special_tokens=True)
    s.extra_info = {**(prompt.extra_info or {}), "messages": messages}
    schemas = [t.get_openai_tool_schema() for t in tools.values()]
    s.reward_extra = {**s.reward_extra, "tool_reward": tool_reward, "num_turns": turns,
                      "num_tool_calls": calls_made, "num_tool_errors": failures,
                      "tokenization_ok": sanity_check(tokenizer, s, messages, ended,
                                                      cfg.tokenization_sanity_check_mode, schemas)}
    return s


def tool_call_json(name: str, arguments: dict) -> str:
    """A hermes tool call as a model would write it (tests and examples)."""
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"
