"""Test support: a tiny tokenizer and tiny random models of real architectures, built in-process.

- `tiny_tokenizer()`: a 512-token byte-level ChatML BPE (eos = <|im_end|> = 2, pad = <|endoftext|> = 0).
- `save_tiny_model(dir, arch="qwen2")`: random Qwen2 / Llama / Qwen3 (hidden 32, 2 layers) + that tokenizer,
  so CPU tests and smoke benchmarks need no download.
"""
from __future__ import annotations

import functools
import os

from hybridrl import HybridRLError
from hybridrl.models import CHATML_TEMPLATE, QWEN2_PATTERN, SPECIAL_TOKENS, make_portable


# ---------------------------------------------------------------- tiny tokenizer

def _tiny_corpus() -> list[str]:
    """A fixed corpus: digits, letters, arithmetic words, punctuation and chat markers."""
    words = ["what", "is", "plus", "minus", "times", "divided", "by", "the", "answer", "equals",
             "Let's", "think", "step", "final", "number", "sum", "total", "of", "and", "a", "How",
             "many", "apples", "does", "she", "have", "left", "user", "assistant", "system", "Calculate",
             "Give", "only", "So", "We", "get", "first", "then", "result", "#### ", "<answer>", "</answer>",
             "There", "are", "was", "were", "each", "every", "more", "less", "than", "half", "twice", "per",
             "day", "week", "hour", "minutes", "dollars", "cost", "buy", "sell", "sold", "bought", "pay",
             "paid", "price", "money", "eggs", "students", "class", "school", "friends", "books", "cookies",
             "John", "Mary", "Tom", "Anna", "you", "your", "it", "can", "will", "if", "how", "much", "for",
             "with", "from", "into", "after", "before", "need", "needs", "makes", "make", "works", "time"]
    lines = [" ".join(words), "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
             "0 1 2 3 4 5 6 7 8 9 10 100 1000 + - * / = ( ) . , ? ! : ; ' \" $ % # < > [ ] { } \n \t"]
    ops = [("plus", "+", lambda a, b: a + b), ("minus", "-", lambda a, b: a - b), ("times", "*", lambda a, b: a * b)]
    for a in range(0, 40, 3):
        for b in range(1, 30, 4):
            for word, sym, fn in ops:
                lines.append(f"What is {a} {word} {b}? {a} {sym} {b} = {fn(a, b)}. The answer is #### {fn(a, b)}")
    return lines


@functools.lru_cache(maxsize=1)
def _tiny_tokenizer_json() -> str:
    """Train the byte-level BPE once per process (deterministic; ~50 ms) and keep its JSON."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    # Qwen2's pipeline exactly: transformers 5 loads any qwen2 / qwen3 folder with Qwen2Tokenizer, which
    # rebuilds this normalizer and pre-tokenizer; matching it keeps token ids the same on every load path.
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_tiny_corpus(), trainer=trainer)
    return tok.to_str()


def tiny_tokenizer():
    """A fresh 512-token ChatML tokenizer (eos = <|im_end|> = 2, pad = <|endoftext|> = 0) for tests."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json()),
                                  eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = CHATML_TEMPLATE
    return tok


# ---------------------------------------------------------------- tiny random models

def tiny_model_config(arch: str = "qwen2", vocab_size: int = 512, hidden_size: int = 32, num_layers: int = 2,
                      num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 64, tie: bool = True,
                      max_position_embeddings: int = 512):
    """A small config of a real architecture (qwen2 | llama | qwen3) whose ids match tiny_tokenizer()."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    classes = {"qwen2": Qwen2Config, "llama": LlamaConfig, "qwen3": Qwen3Config}
    if arch not in classes:
        raise HybridRLError(f"unknown tiny model arch {arch!r}; use one of {sorted(classes)}")
    return classes[arch](
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, intermediate_size=intermediate_size,
        tie_word_embeddings=tie, max_position_embeddings=max_position_embeddings,
        head_dim=hidden_size // num_heads, rms_norm_eps=1e-6, rope_theta=10000.0,
        bos_token_id=None, eos_token_id=2, pad_token_id=0,
    )


def save_tiny_model(out_dir, arch: str = "qwen2", seed: int = 0, dtype=None, **config_kwargs) -> str:
    """Random-init a tiny model with a fixed seed; save safetensors + config + tiny tokenizer to out_dir.

    dtype: a torch dtype (None = float32); config_kwargs go to tiny_model_config (hidden_size=16, ...).
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    config = tiny_model_config(arch, **config_kwargs)
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state alone
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config).to(dtype or torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=2, pad_token_id=0)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(str(out_dir))
    tiny_tokenizer().save_pretrained(str(out_dir))
    make_portable(out_dir, model_max_length=config.max_position_embeddings)
    return str(out_dir)
