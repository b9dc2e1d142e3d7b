"""Compact Llama / Qwen2 / Qwen3 decoder for the native engine (nano-vllm / gpt-fast shape).

The three families differ only in a qkv bias (Qwen2), a per-head RMSNorm on q and k (Qwen3) and
the RoPE scaling of the config, so one model class covers them. Parameter names match Hugging Face
checkpoints except that q/k/v and gate/up are packed into `qkv_proj` and `gate_up_proj`
(loader.py maps the names). Tokens are flat: every tensor is [T, ...] with T = tokens in the step;
`attention.py` turns them into per-sequence attention over the paged KV pool described by `AttnMeta`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hybridrl import HybridRLError
from hybridrl.rollout.native.attention import AttnMeta, decode_attention, prefill_attention

# architecture -> (qkv bias forced on, q/k norm)
ARCHITECTURES = {"LlamaForCausalLM": (False, False), "Qwen2ForCausalLM": (True, False),
                 "Qwen3ForCausalLM": (False, True)}
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class ModelArgs:
    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelArgs":
        """From a Hugging Face config.json dict (transformers 4 `rope_scaling` or 5 `rope_parameters`)."""
        arch = (cfg.get("architectures") or ["?"])[0]
        if arch not in ARCHITECTURES:
            raise HybridRLError(f"the native engine does not support architecture {arch!r}; supported: "
                                f"{sorted(ARCHITECTURES)} (use rollout.name=sglang for others)")
        bias, qk_norm = ARCHITECTURES[arch]
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        eos = cfg.get("eos_token_id")
        heads = cfg["num_attention_heads"]
        return cls(arch=arch, vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                   intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"],
                   num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads") or heads,
                   head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
                   rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=rope or None,
                   max_position_embeddings=cfg.get("max_position_embeddings", 4096),
                   tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                   qkv_bias=bias or bool(cfg.get("attention_bias", False)), qk_norm=qk_norm,
                   eos_token_ids=tuple([] if eos is None else [eos] if isinstance(eos, int) else eos))


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies [D/2] after the config's scaling (none | linear | llama3), float32 as in HF."""
    d = args.head_dim
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    sc = args.rope_scaling or {}
    kind = sc.get("rope_type", sc.get("type", "default"))
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / sc["factor"]
    if kind == "llama3":
        factor, lo, hi = sc["factor"], sc.get("low_freq_factor", 1.0), sc.get("high_freq_factor", 4.0)
        old = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        return torch.where(medium, smoothed, scaled)
    raise HybridRLError(f"rope scaling {kind!r} is not supported by the native engine; supported: {list(ROPE_TYPES)}")


def rope_cache(args: ModelArgs, max_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos [max_len, D] and signed sin [max_len, D] (= cat(-sin, sin)), float32, from the same
    angles HF computes (positions x inv_freq in fp32), laid out for `apply_rope`."""
    inv = rope_inv_freq(args)
    freqs = torch.arange(max_len, dtype=torch.float32)[:, None] * inv[None, :]
    cos, sin = freqs.cos(), freqs.sin()
    return torch.cat((cos, cos), -1).to(device), torch.cat((-sin, sin), -1).to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    # x: [T, H, D]; cos, sin_signed: [T, 1, D] in x's dtype. HF's x*cos + rotate_half(x)*sin in 3 kernels:
    # rotate_half(x) * sin == cat(x2, x1) * cat(-sin, sin)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.addcmul(x * cos, torch.cat((x2, x1), dim=-1), sin_signed)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one fused kernel; in float32 the same math as HF's (x * rsqrt(mean(x^2) + eps)) * w
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.h, self.hkv, self.d = a.num_heads, a.num_kv_heads, a.head_dim
        self.qkv_proj = nn.Linear(a.hidden_size, (self.h + 2 * self.hkv) * self.d, bias=a.qkv_bias)
        self.o_proj = nn.Linear(self.h * self.d, a.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.d, a.rms_norm_eps) if a.qk_norm else None
        self.k_norm = RMSNorm(self.d, a.rms_norm_eps) if a.qk_norm else None
        self.scale = self.d ** -0.5

    def forward(self, x, cos, sin, k_cache, v_cache, meta: AttnMeta):
        # x: [T, hidden]; k_cache, v_cache: [num_blocks, block_size, Hkv, D]
        t = x.shape[0]
        qk, v = self.qkv_proj(x).split([(self.h + self.hkv) * self.d, self.hkv * self.d], dim=-1)
        qk, v = qk.view(t, self.h + self.hkv, self.d), v.view(t, self.hkv, self.d)
        if self.q_norm is not None:
            qk = torch.cat((self.q_norm(qk[:, :self.h]), self.k_norm(qk[:, self.h:])), dim=1)
        q, k = apply_rope(qk, cos, sin).split([self.h, self.hkv], dim=1)     # q and k rotated together
        k_cache.view(-1, self.hkv, self.d).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(-1, self.hkv, self.d).index_copy_(0, meta.slot_mapping, v)
        if meta.is_prefill:
            o = prefill_attention(q, k, v, meta, self.scale)
        else:
            o = decode_attention(q, k_cache, v_cache, meta, self.scale)
        return self.o_proj(o.reshape(t, self.h * self.d))


class MLP(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.gate_up_proj = nn.Linear(a.hidden_size, 2 * a.intermediate_size, bias=False)
        self.down_proj = nn.Linear(a.intermediate_size, a.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.self_attn = Attention(a)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.mlp = MLP(a)

    def forward(self, x, cos, sin, k_cache, v_cache, meta):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, k_cache, v_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(a) for _ in range(a.num_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps)


class CausalLM(nn.Module):
    """`forward(input_ids [T], positions [T], kv [L, 2, N, bs, Hkv, D], meta) -> hidden [T, hidden]`."""

    def __init__(self, a: ModelArgs):
        super().__init__()
        self.args = a
        self.model = Backbone(a)
        self.lm_head = nn.Linear(a.hidden_size, a.vocab_size, bias=False)
        if a.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rope_cos: torch.Tensor | None = None      # [max_len, D], set by the runner
        self.rope_sin: torch.Tensor | None = None

    def forward(self, input_ids, positions, kv, meta: AttnMeta):
        x = self.model.embed_tokens(input_ids)
        cos = self.rope_cos[positions].to(x.dtype)[:, None, :]     # [T, 1, D]
        sin = self.rope_sin[positions].to(x.dtype)[:, None, :]
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, kv[i, 0], kv[i, 1], meta)
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [B, hidden] -> [B, V] in the model dtype (the sampler reads it as float32)
        return self.lm_head(hidden)
