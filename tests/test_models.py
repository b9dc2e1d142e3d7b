"""Tokenizers (tiny, Qwen2.5), tiny random models, SmolLM2 conversion, and the bad-model-folder errors."""
import os
import time

import pytest
import torch

from hybridrl import HybridRLError
from hybridrl.models import check_model_dir, load_tokenizer, prepare_smollm2, qwen25_shape_config, qwen25_tokenizer
from hybridrl.testing import save_tiny_model, tiny_model_config, tiny_tokenizer

CHAT = [{"role": "user", "content": "What is 12 plus 7?"}]


def test_tiny_tokenizer_ids_and_template(tiny_tok):
    assert len(tiny_tok) == 512
    assert (tiny_tok.pad_token_id, tiny_tok.convert_tokens_to_ids("<|im_start|>"), tiny_tok.eos_token_id) == (0, 1, 2)
    text = tiny_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nWhat is 12 plus 7?<|im_end|>\n<|im_start|>assistant\n"
    ids = tiny_tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == 1 and ids.count(2) == 1 and max(ids) < 512
    assert tiny_tok.decode(ids) == text
    assert tiny_tok.decode(tiny_tok("Gåsë 3.5 €!")["input_ids"]) == "Gåsë 3.5 €!"  # byte-level: any text


def test_tiny_tokenizer_is_deterministic_and_fresh():
    a, b = tiny_tokenizer(), tiny_tokenizer()
    assert a is not b
    text = "Let's think step by step: 17 * 3 = 51. #### 51"
    assert a(text)["input_ids"] == b(text)["input_ids"]
    a.padding_side = "left"
    assert b.padding_side == "right"  # each call is a separate object


@pytest.fixture(scope="module")
def qwen_cache(tmp_path_factory):
    """Build the Qwen2.5 tokenizer once (~4 s) into a fresh cache folder."""
    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("HYBRIDRL_CACHE")
    os.environ["HYBRIDRL_CACHE"] = str(cache)
    try:
        tok = qwen25_tokenizer()
    finally:  # only while building: later tests must see the real cache
        os.environ.pop("HYBRIDRL_CACHE") if old is None else os.environ.__setitem__("HYBRIDRL_CACHE", old)
    return cache, tok


def test_qwen25_tokenizer(qwen_cache, monkeypatch):
    cache, tok = qwen_cache
    assert (cache / "tokenizers" / "qwen2.5" / "tokenizer.json").exists()
    assert tok("Hello world")["input_ids"] == [9707, 1879]
    assert len(tok) == 151643 + 22
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "<|file_sep|>"]) \
        == [151643, 151644, 151645, 151657, 151664]
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nWhat is 12 plus 7?<|im_end|>\n<|im_start|>assistant\n")
    monkeypatch.setenv("HYBRIDRL_CACHE", str(cache))
    again = qwen25_tokenizer()  # from the cache
    assert again("Hello world")["input_ids"] == [9707, 1879] and again is not tok


def test_qwen25_template_system_and_tools(qwen_cache):
    tok = qwen_cache[1]
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "calc", "arguments": {"x": "2+2"}}}]},
            {"role": "tool", "content": "4"}]
    text = tok.apply_chat_template(msgs, tokenize=False, tools=[{"name": "calc"}])
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools")
    assert '<tool_call>\n{"name": "calc", "arguments": {"x": "2+2"}}\n</tool_call><|im_end|>' in text
    assert text.endswith("<|im_start|>user\n<tool_response>\n4\n</tool_response><|im_end|>\n")


@pytest.mark.parametrize("arch", ["qwen2", "llama", "qwen3"])
def test_tiny_model_saves_a_normal_hf_folder(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    rng_before = torch.get_rng_state()
    path = save_tiny_model(tmp_path / arch, arch=arch, seed=3)
    assert torch.equal(rng_before, torch.get_rng_state())  # the caller's RNG is untouched
    check_model_dir(path)
    loaded, fresh = load_tokenizer(path), tiny_tokenizer()  # transformers picks Qwen2Tokenizer for qwen2 folders
    text = "<|im_start|>user\nWhat is 1234 plus 7?  Gåsë\n\n<|im_end|>\n"
    assert loaded(text)["input_ids"] == fresh(text)["input_ids"] and loaded.eos_token_id == 2
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == arch and model.config.hidden_size == 32
    logits = model(torch.tensor([[1, 5, 9, 2]])).logits  # [B=1, T=4, V=512]
    assert logits.shape == (1, 4, 512) and torch.isfinite(logits).all()
    assert logits.abs().max() < 5  # tiny init keeps logits small


def test_tiny_model_seed_fixes_weights(tmp_path):
    from safetensors.torch import load_file

    def weights(name, seed):
        return load_file(os.path.join(save_tiny_model(tmp_path / name, seed=seed), "model.safetensors"))

    a, b, c = weights("a", 0), weights("b", 0), weights("c", 1)
    key = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(a[key], b[key]) and not torch.equal(a[key], c[key])


def test_tiny_model_config_rejects_unknown_arch():
    assert tiny_model_config("llama", hidden_size=16, num_heads=2, num_kv_heads=1).head_dim == 8
    with pytest.raises(HybridRLError, match="unknown tiny model arch 'gpt9'"):
        tiny_model_config("gpt9")


def test_qwen25_shape_config_matches_real_param_count():
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = qwen25_shape_config("0.5B")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(Qwen2Config(**cfg))
    assert sum(p.numel() for p in model.parameters()) == 494_032_768  # Qwen2.5-0.5B's published size
    assert qwen25_shape_config("7B")["hidden_size"] == 3584
    with pytest.raises(HybridRLError, match="unknown Qwen2.5 size"):
        qwen25_shape_config("3B")


# ---------------------------------------------------------------- bad model folders

def test_check_model_dir_missing_folder(tmp_path):
    with pytest.raises(HybridRLError, match="does not exist.*hybridrl prepare-model"):
        check_model_dir(tmp_path / "nope")


def test_check_model_dir_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(HybridRLError, match="no config.json.*hybridrl prepare-model"):
        check_model_dir(tmp_path)


def test_check_model_dir_without_weights(tiny_qwen2_dir, tmp_path):
    (tmp_path / "config.json").write_text(open(os.path.join(tiny_qwen2_dir, "config.json")).read())
    with pytest.raises(HybridRLError, match=r"no weights \(\*.safetensors or \*.bin\)"):
        check_model_dir(tmp_path)


def copy_model(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def edit_config(folder, **changes):
    import json

    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_load_tokenizer_from_a_missing_folder_is_not_a_bad_repo_id(tmp_path):
    with pytest.raises(HybridRLError, match=rf"model folder {tmp_path / 'nope'} does not exist") as e:
        load_tokenizer(tmp_path / "nope")
    assert "Repo id" not in str(e.value)


def test_broken_config_json_is_named_not_blamed_on_the_tokenizer(tiny_qwen2_dir, tmp_path):
    folder = copy_model(tiny_qwen2_dir, tmp_path / "m")
    (folder / "config.json").write_text('{"model_type": "qwen2",')
    for check in (load_tokenizer, check_model_dir):
        with pytest.raises(HybridRLError, match=rf"{folder / 'config.json'} is not valid JSON \(.*line 1, column 24\); "
                                                r"fix: repair config.json") as e:
            check(folder)
        assert "tokenizer" not in str(e.value)


def test_unknown_architecture_is_named(tiny_qwen2_dir, tmp_path):
    folder = copy_model(tiny_qwen2_dir, tmp_path / "m")
    edit_config(folder, model_type="gpt9", architectures=["Gpt9ForCausalLM"])
    with pytest.raises(HybridRLError, match=r"config.json has architecture 'gpt9' \(architectures: Gpt9ForCausalLM\), "
                                            r"which transformers .* does not know"):
        check_model_dir(folder)
    edit_config(folder, auto_map={"AutoModelForCausalLM": "modeling_gpt9.Gpt9ForCausalLM"})
    with pytest.raises(HybridRLError, match=r"architecture 'gpt9' comes with its own code"
                                            r".*model.trust_remote_code=True"):
        check_model_dir(folder)
    check_model_dir(folder, trust_remote_code=True)   # the folder's own code: transformers loads it


def test_corrupt_safetensors_is_named(tiny_qwen2_dir, tmp_path):
    folder = copy_model(tiny_qwen2_dir, tmp_path / "m")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) - 100])   # a copy cut short
    with pytest.raises(HybridRLError, match=r"weights file model.safetensors is corrupt \(\d+ bytes where its header "
                                            r"describes \d+: truncated\)"):
        check_model_dir(folder)
    weights.write_bytes(b"\xff" * 64)              # not a safetensors file at all
    with pytest.raises(HybridRLError, match=r"model.safetensors is corrupt \(header of \d+ bytes but the file has 64"):
        check_model_dir(folder)
    weights.write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(HybridRLError, match=r"model.safetensors is corrupt \(its header is not valid JSON\)"):
        check_model_dir(folder)


def test_missing_weight_shard_is_named(tiny_qwen2_dir, tmp_path):
    import json

    folder = copy_model(tiny_qwen2_dir, tmp_path / "m")
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(HybridRLError, match=r"lacks 1 of 2 weight shards named in model.safetensors.index.json "
                                            r"\(e.g. model-00002-of-00002.safetensors\)"):
        check_model_dir(folder)


def test_load_tokenizer_without_chat_template(tmp_path):
    tok = tiny_tokenizer()
    tok.chat_template = None
    tok.save_pretrained(str(tmp_path))
    with pytest.raises(HybridRLError, match=f"tokenizer in {tmp_path} has no chat template.*fix"):
        load_tokenizer(tmp_path)


def test_load_tokenizer_without_tokenizer_files(tmp_path):
    with pytest.raises(HybridRLError, match="cannot load a tokenizer"):
        load_tokenizer(tmp_path)


def test_prepare_smollm2_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(HybridRLError, match="holds no model"):
        prepare_smollm2(str(tmp_path))


def test_conversion_lock_times_out_with_a_clear_message(tmp_path):
    import fcntl

    from hybridrl.models import _file_lock

    lock = tmp_path / ".m.lock"
    with _file_lock(lock, timeout=1.0):
        pass  # free: taken at once
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another process converting
        with pytest.raises(HybridRLError, match="waited 1 s for lock"):
            with _file_lock(lock, timeout=1.0):
                pass


# ---------------------------------------------------------------- the real default model

@pytest.mark.slow
def test_smollm2_converts_once_and_answers_paris():
    """~25 s the first time (GGUF → bf16 safetensors in the cache), then instant."""
    import json

    from transformers import AutoModelForCausalLM

    path = prepare_smollm2()
    check_model_dir(path)
    start = time.perf_counter()
    assert prepare_smollm2() == path and time.perf_counter() - start < 1.0  # idempotent, no reconversion
    config = json.load(open(os.path.join(path, "config.json")))
    assert config["model_type"] == "llama" and config["vocab_size"] == 49152
    assert not [n for n in os.listdir(os.path.dirname(path)) if ".tmp-" in n]  # no half-written folders
    tok = load_tokenizer(path)
    assert tok.eos_token == "<|im_end|>"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])
