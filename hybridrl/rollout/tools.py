"""Tools for multi-turn rollouts: verl's `BaseTool` interface, its YAML loader, a safe calculator,
output truncation, and tool-call parsers (hermes, llama3_json, function_tag).

    tools = load_tools("examples/tools.yaml")          # {name: BaseTool}, verl's tool_config_path format
    calls, errors = parse_tool_calls(text, "hermes")  # malformed calls become error strings, never exceptions
    text, reward, metrics = await tools["calculator"].execute(iid, {"expression": "2+3"})

The YAML (verl's):

    tools:
      - class_name: hybridrl.rollout.tools.CalculatorTool
        config: {type: native}
        tool_schema: {type: function, function: {name: calculator, description: ..., parameters: {...}}}
"""
from __future__ import annotations

import ast
import importlib
import json
import math
import operator
import re
import uuid
from dataclasses import dataclass, field

from hybridrl import HybridRLError


# ---------------------------------------------------------------- the tool interface

class BaseTool:
    """verl's tool interface. One instance serves many trajectories; `create` opens a per-trajectory state.

    tool_schema: an OpenAI function schema {"type": "function", "function": {"name", "description", "parameters"}}.
    """

    def __init__(self, config: dict, tool_schema: dict):
        self.config = dict(config or {})
        self.tool_schema = tool_schema
        self.name = tool_schema["function"]["name"]

    def get_openai_tool_schema(self) -> dict:
        return self.tool_schema

    async def create(self, instance_id: str | None = None, **kwargs) -> str:
        """Open a trajectory's state (kwargs: extra_info.tools_kwargs[name].create_kwargs); returns its id."""
        return instance_id or str(uuid.uuid4())

    async def execute(self, instance_id: str, parameters: dict, **kwargs) -> tuple[str, float, dict]:
        """Run one call -> (text for the model, step reward, metrics). Raising is fine: the loop reports it."""
        raise NotImplementedError

    async def calc_reward(self, instance_id: str, **kwargs) -> float:
        return 0.0

    async def release(self, instance_id: str, **kwargs) -> None:
        """Close the trajectory's state."""


def _import_dotted(path: str):
    module, _, name = path.rpartition(".")
    if not module:
        raise HybridRLError(f"tool class_name {path!r} is not a dotted path like 'pkg.module.Class'")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise HybridRLError(f"cannot import tool class {path!r}: {e}") from e


def load_tools(path) -> dict[str, BaseTool]:
    """Tools from a YAML in verl's format (`tools: [{class_name, config, tool_schema}]`) -> {name: tool}."""
    import yaml

    with open(path) as fh:
        doc = yaml.safe_load(fh) or {}
    entries = doc.get("tools")
    if not isinstance(entries, list):
        raise HybridRLError(f"{path}: expected a top-level `tools:` list (verl's tool_config_path format)")
    tools: dict[str, BaseTool] = {}
    for k, entry in enumerate(entries):
        if not isinstance(entry, dict) or "class_name" not in entry or "tool_schema" not in entry:
            raise HybridRLError(f"{path}: tools[{k}] needs class_name and tool_schema")
        schema = entry["tool_schema"]
        if not isinstance(schema.get("function"), dict) or "name" not in schema["function"]:
            raise HybridRLError(f"{path}: tools[{k}].tool_schema needs function.name (an OpenAI function schema)")
        tool = _import_dotted(entry["class_name"])(entry.get("config") or {}, schema)
        if tool.name in tools:
            raise HybridRLError(f"{path}: two tools are named {tool.name!r}")
        tools[tool.name] = tool
    return tools


# ---------------------------------------------------------------- calculator

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.Pow: operator.pow, ast.Mod: operator.mod, ast.FloorDiv: operator.floordiv}
_UNOPS = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def calculate(expression: str, max_chars: int = 200, max_abs: float = 1e100) -> int | float:
    """Evaluate + - * / ** % // and unary +/- over numbers and parentheses; anything else raises ValueError.

    No eval: the expression is parsed with `ast` and only those nodes are walked. Sizes are bounded
    (expression length, every intermediate |value| <= max_abs, exponents checked before computing)."""
    if not isinstance(expression, str) or not expression.strip():
        raise ValueError("expression must be a non-empty string")
    if len(expression) > max_chars:
        raise ValueError(f"expression longer than {max_chars} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"not an arithmetic expression: {e.msg}") from None

    def check(v):
        if isinstance(v, float) and not math.isfinite(v) or abs(v) > max_abs:
            raise ValueError("result too large")
        return v

    def walk(node):
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return check(node.value)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNOPS:
            return _UNOPS[type(node.op)](walk(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            a, b = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Pow) and abs(a) > 1 and abs(b) * math.log10(abs(a)) > math.log10(max_abs):
                raise ValueError("power too large")
            try:
                return check(_BINOPS[type(node.op)](a, b))
            except ZeroDivisionError:
                raise ValueError("division by zero") from None
            except (OverflowError, TypeError) as e:   # TypeError: a complex result of a negative ** fraction
                raise ValueError(f"cannot compute: {e}") from None
        raise ValueError(f"not allowed in an expression: {type(node).__name__}")

    return walk(tree.body)


def format_number(v: int | float) -> str:
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    return f"{v:.12g}" if isinstance(v, float) else str(v)


CALCULATOR_SCHEMA = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression (+ - * / ** % // and parentheses).",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string", "description": "e.g. (2+3)*4"}},
                   "required": ["expression"]}}}


class CalculatorTool(BaseTool):
    """A stateless calculator; config: max_chars (200)."""

    def __init__(self, config: dict | None = None, tool_schema: dict | None = None):
        super().__init__(config or {}, tool_schema or CALCULATOR_SCHEMA)

    async def execute(self, instance_id, parameters, **kwargs):
        value = calculate(parameters.get("expression", ""), max_chars=int(self.config.get("max_chars", 200)))
        return format_number(value), 0.0, {}


# ---------------------------------------------------------------- truncation

def truncate(text: str, n: int, side: str = "middle") -> str:
    """Keep at most about n characters of a tool's output: side = left (keep the start), right (keep the end)
    or middle (keep both ends); a marker says what was cut."""
    if len(text) <= n:
        return text
    if side == "left":
        return text[:n] + "...(truncated)"
    if side == "right":
        return "(truncated)..." + text[-n:]
    if side == "middle":
        return text[:n // 2] + "...(truncated)..." + text[len(text) - (n - n // 2):]
    raise HybridRLError(f"tool_response_truncate_side must be left, right or middle, got {side!r}")


# ---------------------------------------------------------------- tool-call parsers

@dataclass
class ToolCall:
    name: str
    arguments: dict = field(default_factory=dict)


def _call_from_json(blob: str, args_key: str) -> ToolCall:
    """{"name": str, args_key: dict | json string} -> ToolCall; raises ValueError saying what is wrong."""
    try:
        obj = json.loads(blob)
    except json.JSONDecodeError as e:
        raise ValueError(f"the tool call is not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        raise ValueError('the tool call needs a JSON object with a string "name"')
    args = obj.get(args_key, {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            pass
    if not isinstance(args, dict):
        raise ValueError(f'"{args_key}" must be a JSON object')
    return ToolCall(obj["name"], args)


def _parse_hermes(text: str):
    calls, errors = [], []
    for m in re.finditer(r"<tool_call>(.*?)(</tool_call>|$)", text, re.DOTALL):
        if not m.group(2):
            errors.append("a <tool_call> was not closed by </tool_call>")
            continue
        try:
            calls.append(_call_from_json(m.group(1).strip(), "arguments"))
        except ValueError as e:
            errors.append(str(e))
    return calls, errors


def _parse_function_tag(text: str):
    """Llama 3.1's custom format: <function=name>{"arg": ...}</function>."""
    calls, errors = [], []
    for m in re.finditer(r"<function=([^>]*)>(.*?)(</function>|$)", text, re.DOTALL):
        if not m.group(3):
            errors.append("a <function=...> was not closed by </function>")
            continue
        name = m.group(1).strip()
        try:
            args = json.loads(m.group(2).strip() or "{}")
        except json.JSONDecodeError as e:
            errors.append(f"the arguments of {name!r} are not valid JSON ({e.msg})")
            continue
        if not name or not isinstance(args, dict):
            errors.append("a call needs <function=NAME> and a JSON object of arguments")
            continue
        calls.append(ToolCall(name, args))
    return calls, errors


def _parse_llama3_json(text: str):
    """Llama 3's JSON tool calls: the message is {"name": ..., "parameters": {...}} (optionally after
    <|python_tag|>), several separated by ';'. A message that does not start with '{' holds no call."""
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if not body.startswith("{"):
        return [], []
    calls, errors = [], []
    decoder, pos = json.JSONDecoder(), 0
    while pos < len(body):
        try:
            _, end = decoder.raw_decode(body, pos)
        except json.JSONDecodeError as e:
            errors.append(f"the tool call is not valid JSON ({e.msg})")
            break
        try:
            calls.append(_call_from_json(body[pos:end], "parameters"))
        except ValueError as e:
            errors.append(str(e))
        pos = end
        while pos < len(body) and body[pos] in " \n\t;":
            pos += 1
    return calls, errors


PARSERS = {"hermes": _parse_hermes, "function_tag": _parse_function_tag, "llama3_json": _parse_llama3_json}


def parse_tool_calls(text: str, fmt: str = "hermes") -> tuple[list[ToolCall], list[str]]:
    """The tool calls in a model turn, and an error string per malformed one (to show to the model)."""
    if fmt not in PARSERS:
        raise HybridRLError(f"unknown multi_turn.format={fmt!r}: choose one of {sorted(PARSERS)}")
    return PARSERS[fmt](text)
