"""Multi-turn rollout with tools (issue 13): a scripted fake engine, the tiny ChatML tokenizer and Qwen2.5's.

    pytest tests/test_multiturn.py -q
"""
import asyncio
import time

import pytest
import torch

from hybridrl.rollout.base import GenerateOutput, SamplingParams
from hybridrl.rollout.multiturn import (MultiTurnConfig, multi_turn_rollout, tokenization_mismatch_rate,
                                        tool_call_json, tool_turn_ids)
from hybridrl.rollout.tools import (BaseTool, CalculatorTool, calculate, load_tools, parse_tool_calls,
                                    truncate)
from hybridrl.testing import tiny_tokenizer
from hybridrl.types import Sample

CALL = tool_call_json("calculator", {"expression": "2+3"}) + "<|im_end|>"
ANSWER = "The answer is 5<|im_end|>"
QUESTION = [{"role": "user", "content": "What is 2 plus 3?"}]


class ScriptedEngine:
    """generate() answers turn t of every sample (read from the request id's `-t{t}`) with script[t]'s tokens;
    log-prob of output token j is -(j + 1) / 100. Records every call."""

    def __init__(self, tokenizer, script: list[str]):
        self.tok, self.script, self.calls = tokenizer, script, []

    async def generate(self, input_ids, sampling, request_id=None):
        self.calls.append((list(input_ids), sampling, request_id))
        turn = int(request_id.rsplit("-t", 1)[1])
        ids = self.tok.encode(self.script[min(turn, len(self.script) - 1)], add_special_tokens=False)
        reason = "length" if len(ids) > sampling.max_new_tokens else "stop"
        ids = ids[:sampling.max_new_tokens]
        return [GenerateOutput(ids, [-(j + 1) / 100 for j in range(len(ids))], reason, len(input_ids), len(ids), 3)]


def prompt(tok, messages=QUESTION) -> Sample:
    ids = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return Sample(prompt_ids=tok.encode(ids, add_special_tokens=False), raw_prompt=messages)


def run(engine, tok, prompts, cfg=None, tools=None, max_new=400, n=1, seed=7):
    sp = SamplingParams(max_new_tokens=max_new, n=n, seed=seed)
    tools = {"calculator": CalculatorTool()} if tools is None else tools
    return asyncio.run(multi_turn_rollout(engine, prompts, sp, tok, tools, cfg or MultiTurnConfig(enable=True)))


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_tool_tokens_are_masked_and_tokens_are_what_the_engine_saw(tok):
    eng = ScriptedEngine(tok, [CALL, ANSWER])
    [s] = run(eng, tok, [prompt(tok)])
    assert s.finish_reason == "stop" and s.reward_extra["num_turns"] == 2 and s.reward_extra["num_tool_calls"] == 1
    call, answer = (tok.encode(t, add_special_tokens=False) for t in (CALL, ANSWER))
    tool = tool_turn_ids(tok, [{"role": "tool", "content": "5"}], ended_turn=True)
    assert tok.decode(tool) == "\n<|im_start|>tool\n5<|im_end|>\n<|im_start|>assistant\n"
    assert s.response_ids == call + tool + answer
    assert s.loss_mask == [1] * len(call) + [0] * len(tool) + [1] * len(answer)
    lp = lambda n: [-(j + 1) / 100 for j in range(n)]  # noqa: E731
    assert s.rollout_logprobs == lp(len(call)) + [0.0] * len(tool) + lp(len(answer))
    last_input, _, _ = eng.calls[-1]
    assert s.prompt_ids + s.response_ids == last_input + answer          # the tokens the engine saw
    assert eng.calls[1][0] == s.prompt_ids + call + tool
    assert s.reward_extra["tokenization_ok"] is True and tokenization_mismatch_rate([s]) == 0.0
    assert s.extra_info["messages"][-2] == {"role": "tool", "content": "5"}
    assert eng.calls[0][1].max_new_tokens == 400 and eng.calls[1][1].max_new_tokens == 400 - len(call + tool)


def test_tool_tokens_get_no_gradient(tok):
    from hybridrl.algorithms import agg_loss, policy_loss
    from hybridrl.trainer.batch import collate
    [s] = run(ScriptedEngine(tok, [CALL, ANSWER]), tok, [prompt(tok)])
    short = Sample(prompt_ids=s.prompt_ids[:5])
    short.append([5, 6, 7], [-0.5] * 3)
    b = collate([s, short], pad_id=0)
    tool_pos = torch.tensor([m == 0 for m in s.loss_mask])
    assert (b.response_mask[0, :len(s.loss_mask)] == torch.tensor(s.loss_mask, dtype=torch.float32)).all()
    assert (b.response_mask[0][tool_pos] == 0).all() and (b.response_mask[0, :len(s.loss_mask)][~tool_pos] == 1).all()
    adv = torch.ones_like(b.rollout_logp)
    logp = (b.rollout_logp + 0.05).requires_grad_()
    base, _ = policy_loss(logp, b.rollout_logp, adv, b.response_mask)
    perturbed = logp.detach().clone()
    perturbed[0, :len(s.loss_mask)][tool_pos] += 3.0                   # change only the tool positions
    perturbed[0, len(s.loss_mask):] -= 2.0                              # and the padding
    again, _ = policy_loss(perturbed, b.rollout_logp, adv, b.response_mask)
    assert torch.equal(base.detach(), again)
    base.backward()
    grad = logp.grad[0, :len(s.loss_mask)]
    assert (grad[tool_pos] == 0).all() and (grad[~tool_pos] != 0).all()
    ent = torch.rand_like(b.rollout_logp)
    ent2 = ent.clone()
    ent2[0, :len(s.loss_mask)][tool_pos] = 100.0
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        assert torch.equal(agg_loss(ent, b.response_mask, mode), agg_loss(ent2, b.response_mask, mode))


def test_stops_turn_cap_length_context_overflow(tok):
    p = prompt(tok)
    [s] = run(ScriptedEngine(tok, [CALL]), tok, [p], MultiTurnConfig(enable=True, max_assistant_turns=3))
    assert s.finish_reason == "turn_cap" and s.reward_extra["num_turns"] == 3 and s.reward_extra["num_tool_calls"] == 2
    [s] = run(ScriptedEngine(tok, [CALL]), tok, [p], MultiTurnConfig(enable=True, max_user_turns=1))
    assert s.finish_reason == "turn_cap" and s.reward_extra["num_turns"] == 2
    [s] = run(ScriptedEngine(tok, [CALL]), tok, [p], max_new=150)      # the budget covers all turns
    assert s.finish_reason == "length" and len(s.response_ids) <= 150
    [s] = run(ScriptedEngine(tok, [ANSWER]), tok, [p], max_new=3)
    assert s.finish_reason == "length" and len(s.response_ids) == 3
    cap = len(p.prompt_ids) + 100
    eng = ScriptedEngine(tok, [CALL])
    [s] = run(eng, tok, [p], MultiTurnConfig(enable=True, max_model_len=cap))
    assert s.finish_reason == "context_overflow" and len(s.prompt_ids) + len(s.response_ids) <= cap
    assert all(len(i) + c.max_new_tokens <= cap for i, c, _ in eng.calls)
    # the last turn was cut: re-templating closes it with <|im_end|>\n, which the check accounts for
    assert s.reward_extra["tokenization_ok"] is True


def test_n_samples_have_own_seeds_and_unique_request_ids(tok):
    eng = ScriptedEngine(tok, [CALL, ANSWER])
    ps = [prompt(tok), prompt(tok, [{"role": "user", "content": "What is 3 times 4?"}])]
    out = run(eng, tok, ps, n=3)
    assert [s.group for s in out] == [0, 0, 0, 1, 1, 1] and all(s.finish_reason == "stop" for s in out)
    rids = [r for _, _, r in eng.calls]
    assert len(rids) == 12 and len(set(rids)) == 12
    seeds = [c.seed for _, c, _ in eng.calls]
    assert len(set(seeds)) == 12 and all(c.n == 1 for _, c, _ in eng.calls)


def test_malformed_and_unknown_calls_become_messages(tok):
    bad = "<tool_call>{not json</tool_call><|im_end|>"
    unknown = tool_call_json("weather", {"city": "Paris"}) + "<|im_end|>"
    [s] = run(ScriptedEngine(tok, [bad, unknown, ANSWER]), tok, [prompt(tok)])
    tools = [m["content"] for m in s.extra_info["messages"] if m["role"] == "tool"]
    assert s.finish_reason == "stop" and len(tools) == 2
    assert tools[0].startswith("Error: malformed tool call: the tool call is not valid JSON")
    assert tools[1].startswith("Error: unknown tool 'weather'; available: calculator")
    assert s.reward_extra["num_tool_errors"] == 2
    [s] = run(ScriptedEngine(tok, [bad]), tok, [prompt(tok)], MultiTurnConfig(enable=True, max_tool_errors=2))
    assert s.finish_reason == "tool_error" and s.reward_extra["num_tool_errors"] == 2


class SleepyTool(BaseTool):
    released: list = []

    async def execute(self, instance_id, parameters, **kw):
        await asyncio.sleep(float(parameters.get("s", 10)))
        return "woke", 1.0, {}

    async def release(self, instance_id, **kw):
        self.released.append(instance_id)


class FailingTool(BaseTool):
    async def execute(self, instance_id, parameters, **kw):
        raise RuntimeError("disk on fire")


def _schema(name):
    return {"type": "function", "function": {"name": name, "description": "", "parameters": {}}}


def test_timeout_raise_parallel_calls_and_tool_reward(tok):
    tools = {"sleep": SleepyTool({}, _schema("sleep")), "fail": FailingTool({}, _schema("fail"))}
    slow = tool_call_json("sleep", {"s": 30}) + "<|im_end|>"
    t0 = time.monotonic()
    cfg = MultiTurnConfig(enable=True, tool_timeout_s=0.2)
    [s] = run(ScriptedEngine(tok, [slow, ANSWER]), tok, [prompt(tok)], cfg, tools=tools)
    assert time.monotonic() - t0 < 5
    assert s.extra_info["messages"][-2]["content"] == "Error: tool 'sleep' timed out after 0.2 s"
    assert s.finish_reason == "stop" and SleepyTool.released
    # two calls in one turn run concurrently (0.3 s each, ~0.3 s in all); a third is refused; rewards add up
    three = tool_call_json("sleep", {"s": 0.3}) * 2 + tool_call_json("fail", {}) + "<|im_end|>"
    t0 = time.monotonic()
    cfg = MultiTurnConfig(enable=True, max_parallel_calls=2)
    [s] = run(ScriptedEngine(tok, [three, ANSWER]), tok, [prompt(tok)], cfg, tools=tools)
    assert time.monotonic() - t0 < 0.55
    msgs = [m["content"] for m in s.extra_info["messages"] if m["role"] == "tool"]
    assert msgs[:2] == ["woke", "woke"] and "at most 2 tool calls" in msgs[2]
    assert s.reward_extra["tool_reward"] == 2.0 and s.reward == 0.0
    assert len(SleepyTool.released) == 2                 # one instance per trajectory, released at its end
    one = tool_call_json("fail", {}) + "<|im_end|>"
    [s] = run(ScriptedEngine(tok, [one, ANSWER]), tok, [prompt(tok)], tools=tools)
    assert s.extra_info["messages"][-2]["content"] == "Error: RuntimeError: disk on fire"


def test_calculator():
    assert calculate("2+3*4") == 14 and calculate("(2+3)*4") == 20 and calculate("-2**2") == -4
    assert calculate("7//2") == 3 and calculate("7 % 4") == 3
    assert calculate("1/4") == 0.25 and calculate("2**10") == 1024
    assert asyncio.run(CalculatorTool().execute("x", {"expression": "10/4*2"}))[0] == "5"
    for bad in ["__import__('os')", "x + 1", "(1).real", "abs(-1)", "9**9**9", "10**101", "1/0", "[1]", "'a'*3",
                "True+1", "1 if 1 else 2", "lambda: 1", "2" * 201, ""]:
        with pytest.raises(ValueError):
            calculate(bad)


def test_truncate_and_parsers():
    text = "a" * 10 + "b" * 10
    assert truncate(text, 30) == text
    assert truncate(text, 4, "left") == "aaaa...(truncated)"
    assert truncate(text, 4, "right") == "(truncated)...bbbb"
    assert truncate(text, 4, "middle") == "aa...(truncated)...bb"
    calls, errs = parse_tool_calls('hi <tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>'
                                   '<tool_call>{"name": "b", "arguments": "{\\"y\\": 2}"}</tool_call>')
    assert [(c.name, c.arguments) for c in calls] == [("a", {"x": 1}), ("b", {"y": 2})] and errs == []
    assert parse_tool_calls("no calls here") == ([], [])
    calls, errs = parse_tool_calls('<tool_call>{"arguments": {}}</tool_call><tool_call>{"name": "a"')
    assert calls == [] and len(errs) == 2 and "not closed" in errs[1]
    calls, errs = parse_tool_calls('<function=calc>{"expression": "1+1"}</function>', "function_tag")
    assert [(c.name, c.arguments) for c in calls] == [("calc", {"expression": "1+1"})] and errs == []
    assert len(parse_tool_calls('<function=calc>{oops}</function>', "function_tag")[1]) == 1
    calls, errs = parse_tool_calls('{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}',
                                   "llama3_json")
    assert [c.name for c in calls] == ["a", "b"] and errs == []
    assert parse_tool_calls('{"name": "a", "parameters": [1]}', "llama3_json")[1] != []


def test_load_tools_from_verl_yaml(tmp_path):
    path = tmp_path / "tools.yaml"
    path.write_text("""tools:
  - class_name: hybridrl.rollout.tools.CalculatorTool
    config:
      type: native
      max_chars: 10
    tool_schema:
      type: function
      function:
        name: calc
        description: arithmetic
        parameters: {type: object, properties: {expression: {type: string}}, required: [expression]}
""")
    tools = load_tools(path)
    assert list(tools) == ["calc"] and isinstance(tools["calc"], CalculatorTool)
    assert tools["calc"].get_openai_tool_schema()["function"]["description"] == "arithmetic"
    assert asyncio.run(tools["calc"].execute("i", {"expression": "6*7"}))[0] == "42"
    with pytest.raises(ValueError):
        asyncio.run(tools["calc"].execute("i", {"expression": "1+1+1+1+1+1"}))   # config max_chars applies
    from hybridrl import HybridRLError
    path.write_text("tools:\n  - class_name: nowhere.Tool\n    tool_schema: {function: {name: x}}\n")
    with pytest.raises(HybridRLError, match="cannot import"):
        load_tools(path)


def _three_turns(tok):
    """Incremental (the loop's tokens) vs full templating of a 3-assistant-turn conversation."""
    script = [tool_call_json("calculator", {"expression": "2+3"}) + "<|im_end|>",
              "So " + tool_call_json("calculator", {"expression": "5*4"}) + "<|im_end|>", "The answer is 20<|im_end|>"]
    messages = [{"role": "system", "content": "You can use a calculator."}] + QUESTION
    [s] = run(ScriptedEngine(tok, script), tok, [prompt(tok, messages)])
    assert s.finish_reason == "stop" and s.reward_extra["num_turns"] == 3
    full = tok.apply_chat_template(s.extra_info["messages"], tokenize=False)
    assert [m["role"] for m in s.extra_info["messages"]] == ["system", "user", "assistant", "tool", "assistant", "tool",
                                                               "assistant"]
    assert tok.encode(full, add_special_tokens=False) == s.prompt_ids + s.response_ids + tok.encode("\n")
    assert s.reward_extra["tokenization_ok"] is True
    return s


def test_incremental_templating_equals_full_tiny(tok):
    _three_turns(tok)


def test_incremental_templating_equals_full_qwen25():
    from hybridrl.models import qwen25_tokenizer
    tok = qwen25_tokenizer()
    s = _three_turns(tok)
    text = tok.decode(s.response_ids)
    assert "<|im_start|>user\n<tool_response>\n5\n</tool_response><|im_end|>" in text   # the tool role is supported
    assert "<tool_call>" in tok.convert_ids_to_tokens(s.response_ids)                  # an added token, kept as one


def test_incremental_templating_equals_full_smollm2():
    from pathlib import Path
    from hybridrl.models import cache_dir
    folder = Path(cache_dir()) / "models" / "SmolLM2-135M-Instruct"
    if not (folder / "tokenizer.json").exists():
        pytest.skip("SmolLM2 is not converted yet (hybridrl prepare-model smollm2, ~25 s)")
    from transformers import AutoTokenizer
    _three_turns(AutoTokenizer.from_pretrained(str(folder)))


def test_sanity_check_flags_retokenization_drift(tok):
    """A model turn whose tokens are not the canonical tokenization of its text is flagged (strict), and
    passes ignore_strippable."""
    class Odd(ScriptedEngine):
        async def generate(self, input_ids, sampling, request_id=None):
            [out] = await super().generate(input_ids, sampling, request_id)
            pieces = self.tok.convert_ids_to_tokens(out.output_ids)
            k = next(i for i, p in enumerate(pieces) if len(p) > 1 and not p.startswith("<|"))
            split = self.tok.convert_tokens_to_ids(list(pieces[k]))     # one merged token as its characters
            out.output_ids = out.output_ids[:k] + split + out.output_ids[k + 1:]
            out.logprobs = out.logprobs[:k] + [0.0] * len(split) + out.logprobs[k + 1:]
            return [out]
    [s] = run(Odd(tok, [ANSWER]), tok, [prompt(tok)])
    assert s.reward_extra["tokenization_ok"] is False and tokenization_mismatch_rate([s]) == 1.0
    lenient = MultiTurnConfig(tokenization_sanity_check_mode="ignore_strippable")
    [s] = run(Odd(tok, [ANSWER]), tok, [prompt(tok)], lenient)
    assert s.reward_extra["tokenization_ok"] is True


def test_train_with_multi_turn_tools_end_to_end(tmp_path, tiny_qwen2_dir, monkeypatch):
    """`rollout.multi_turn.enable` with a calculator YAML (verl's keys): the engine (scripted: a tool call, then an
    answer) gets the tool's result back, the step trains on the model's tokens only, metrics count the calls."""
    import json
    from hybridrl.config import load_config
    from hybridrl.models import load_tokenizer
    from hybridrl.rollout.native.engine import NativeEngine
    from hybridrl.train import train
    tok = load_tokenizer(tiny_qwen2_dir)
    rows = [{"prompt": [{"role": "user", "content": f"What is {i} plus 3?"}], "data_source": "toy",
             "reward_model": {"ground_truth": str(i + 3)}} for i in range(8)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "r.py").write_text("def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n"
                                   "    return float(ground_truth in solution_str)\n")
    (tmp_path / "tools.yaml").write_text(
        "tools:\n  - class_name: hybridrl.rollout.tools.CalculatorTool\n    config: {type: native}\n"
        "    tool_schema:\n      type: function\n      function:\n        name: calculator\n"
        "        description: arithmetic\n        parameters: {type: object, properties: {expression: {type: string}}}\n")
    seen = []

    async def scripted(self, input_ids, sampling, request_id=None):
        turn = int(request_id.rsplit("-t", 1)[1])
        seen.append((request_id, tok.decode(input_ids)))
        text = ('<tool_call>{"name": "calculator", "arguments": {"expression": "4+3"}}</tool_call><|im_end|>'
                if turn == 0 else "it is 7<|im_end|>")
        ids = tok.encode(text, add_special_tokens=False)
        from hybridrl.rollout.base import GenerateOutput
        return [GenerateOutput(ids, [-0.5] * len(ids), "stop", len(input_ids), len(ids), self.weight_version)]

    monkeypatch.setattr(NativeEngine, "generate", scripted)
    run = tmp_path / "run"
    out = train(load_config([
        f"model.path={tiny_qwen2_dir}", f"data.train_files=[{tmp_path}/train.jsonl]", f"reward.custom_path={tmp_path}/r.py",
        "data.train_batch_size=4", "actor.ppo_mini_batch_size=2", "rollout.n=2", "rollout.response_length=256",
        "trainer.device=cpu", "trainer.val_before_train=false", "trainer.logger=[jsonl]",
        "trainer.total_training_steps=2", f"trainer.default_local_dir={run}", "rollout.kv_block_size=16",
        "actor_rollout_ref.rollout.multi_turn.enable=true",
        f"actor_rollout_ref.rollout.multi_turn.tool_config_path={tmp_path}/tools.yaml",
        "actor_rollout_ref.rollout.multi_turn.max_assistant_turns=3"]))
    m = [json.loads(line) for line in open(out["metrics"])][-1]
    assert m["multi_turn/num_tool_calls"] == 1.0 and m["multi_turn/num_turns"] == 2.0
    assert m["multi_turn/num_tool_errors"] == 0.0 and m["multi_turn/finish_stop"] == 1.0
    second_turns = [text for rid, text in seen if rid.endswith("-t1")]
    assert second_turns and all("7" in t.split("</tool_call>")[-1] for t in second_turns)   # the tool's answer
    assert "actor/pg_loss" in m and m["reward/mean"] > 0
