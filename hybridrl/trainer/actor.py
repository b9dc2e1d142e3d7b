"""Single-process actor, reference and critic on Hugging Face `transformers` causal LMs.

The trainer interface the RL step uses (an FSDP2 version implements the same methods):
    policy.log_probs(batch, temperature)          -> (logp [B, L], entropy [B, L])
    policy.update(batch, old_logp, adv, ref_logp) -> metrics      (PPO epochs over mini-batches)
    policy.named_weights()                        -> iterator of (hf_name, tensor)
    policy.state_dict() / load_state_dict()       (model + optimizer + scheduler, for checkpoints)
    critic.values(batch) -> [B, L]; critic.update(batch, old_values, returns) -> metrics

Log-probs and entropy come from the vocabulary-sized logits in chunks, so [tokens, V] never
exists in fp32 for the whole micro-batch at once.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Iterator

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from hybridrl import HybridRLError, algorithms as A
from hybridrl.config import ActorConfig, CriticConfig, ModelConfig
from hybridrl.trainer.batch import TrainBatch

LOGIT_CHUNK = 512  # tokens per lm_head chunk


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise HybridRLError("trainer.device=cuda but no CUDA device is visible: use trainer.device=cpu")
    return torch.device(name)


def autocast(device: torch.device, dtype: str):
    """bf16 autocast on GPU (fp32 master weights); plain fp32 on CPU unless asked."""
    want = {"auto": torch.bfloat16 if device.type == "cuda" else None, "float32": None,
            "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    return torch.autocast(device.type, dtype=want) if want is not None else nullcontext()


def load_causal_lm(path: str, model_cfg: ModelConfig, device: torch.device) -> nn.Module:
    from transformers import AutoModelForCausalLM
    from hybridrl.models import check_model_dir
    check_model_dir(path)
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32,
                                                 trust_remote_code=model_cfg.trust_remote_code)
    if model_cfg.enable_gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.config.use_cache = False
    return model.to(device)


def micro_batches(batch: TrainBatch, size: int, max_tokens: int | None = None) -> Iterator[tuple[slice, TrainBatch]]:
    """Consecutive rows, at most `size` of them and at most `max_tokens` padded tokens (rows x longest row)."""
    lengths = batch.attention_mask.sum(1).tolist()
    start = 0
    while start < batch.size:
        stop, longest = start + 1, lengths[start]
        while stop < min(start + size, batch.size):
            longest_next = max(longest, lengths[stop])
            if max_tokens is not None and longest_next * (stop + 1 - start) > max_tokens:
                break
            stop, longest = stop + 1, longest_next
        yield slice(start, stop), batch.select(torch.arange(start, stop)).trimmed()
        start = stop


def response_hidden(backbone: nn.Module, mb: TrainBatch) -> torch.Tensor:
    """Hidden states at the positions that predict each response token. # [b, l, H]"""
    out = backbone(input_ids=mb.input_ids, attention_mask=mb.attention_mask, position_ids=mb.position_ids)
    P, L = mb.prompt_len, mb.response_mask.shape[1]
    return out.last_hidden_state[:, P - 1:P + L - 1]


def chunked_logp_entropy(hidden: torch.Tensor, lm_head: nn.Module, labels: torch.Tensor,
                         temperature: float, with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(label) and entropy from logits / temperature, chunked over tokens. # hidden [b, l, H]

    Under autograd each chunk is recomputed in backward (activation checkpointing), so the
    [tokens, V] logits exist for one chunk at a time, not for the whole micro-batch.
    """
    h, y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)

    def chunk(h_c, y_c):
        logp_all = torch.log_softmax(lm_head(h_c).float() / max(temperature, 1e-6), -1)
        ent = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else torch.zeros_like(y_c, dtype=torch.float)
        return logp_all.gather(-1, y_c[:, None]).squeeze(-1), ent

    outs = []
    for i in range(0, h.shape[0], LOGIT_CHUNK):
        args = (h[i:i + LOGIT_CHUNK], y[i:i + LOGIT_CHUNK])
        outs.append(checkpoint(chunk, *args, use_reentrant=False) if torch.is_grad_enabled() else chunk(*args))
    return (torch.cat([o[0] for o in outs]).view_as(labels), torch.cat([o[1] for o in outs]).view_as(labels))


def make_optimizer(params, lr: float, weight_decay: float, betas, warmup_steps: int):
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup_steps)))
    return opt, sched


class Policy:
    """The actor (trainable) or the reference (frozen, `trainable=False`)."""

    def __init__(self, path: str, model_cfg: ModelConfig, cfg: ActorConfig, device: torch.device,
                 trainable: bool = True, norm_len: int | None = None):
        self.cfg, self.model_cfg, self.device = cfg, model_cfg, device
        self.norm_len = norm_len  # max response length, for seq-mean-token-sum-norm
        self.model = load_causal_lm(path, model_cfg, device)
        self.model.train(trainable)
        self.model.requires_grad_(trainable)
        self.nan_streak = 0
        if trainable:
            self.opt, self.sched = make_optimizer(self.model.parameters(), cfg.lr, cfg.weight_decay,
                                                  cfg.betas, cfg.warmup_steps)

    # ---- forward -------------------------------------------------------------------------
    def _forward(self, mb: TrainBatch, temperature: float, with_entropy: bool):
        labels = mb.input_ids[:, mb.prompt_len:mb.prompt_len + mb.response_mask.shape[1]]
        # the lm_head runs under autocast too: in fp32 its [tokens, V] GEMMs took half the update's GPU time
        # (docs/benchmarks/profile_update.md); log_softmax itself is computed in fp32
        with autocast(self.device, self.model_cfg.dtype):
            hidden = response_hidden(self.model.model, mb)
            return chunked_logp_entropy(hidden, self.model.lm_head, labels, temperature, with_entropy)

    @torch.no_grad()
    def log_probs(self, batch: TrainBatch, temperature: float, micro_batch_size: int = 8,
                  with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probs (and entropy) of the response tokens. # [B, L] each"""
        batch = to_device(batch, self.device)
        logp = torch.zeros(batch.response_mask.shape, device=self.device)
        ent = torch.zeros_like(logp)
        was_training = self.model.training
        self.model.eval()                      # no dropout noise in old / reference log-probs
        try:
            for rows, mb in micro_batches(batch, micro_batch_size):
                lp, en = self._forward(mb, temperature, with_entropy)
                logp[rows, :lp.shape[1]], ent[rows, :en.shape[1]] = lp, en
        finally:
            self.model.train(was_training)
        return logp.cpu(), ent.cpu()

    # ---- update --------------------------------------------------------------------------
    def update(self, batch: TrainBatch, old_logp: torch.Tensor, adv: torch.Tensor,
               ref_logp: torch.Tensor | None, temperature: float, mini_batch_size: int) -> dict:
        """PPO epochs over mini-batches of `mini_batch_size` sequences; returns mean metrics."""
        c = self.cfg
        low = c.clip_ratio if c.clip_ratio_low < 0 else c.clip_ratio_low
        high = c.clip_ratio if c.clip_ratio_high < 0 else c.clip_ratio_high
        batch = to_device(batch, self.device)
        old_logp, adv = old_logp.to(self.device), adv.to(self.device)
        ref_logp = ref_logp.to(self.device) if ref_logp is not None else None
        tis = (A.tis_weights(old_logp, batch.rollout_logp, batch.response_mask, c.tis_threshold)
               if c.tis_threshold > 0 else None)
        stats: dict[str, list[float]] = {}
        for _ in range(c.ppo_epochs):
            for start in range(0, batch.size, mini_batch_size):
                mini = torch.arange(start, min(start + mini_batch_size, batch.size), device=self.device)
                self._mini_step(batch.select(mini), old_logp[mini], adv[mini],
                                None if ref_logp is None else ref_logp[mini],
                                None if tis is None else tis[mini], low, high, temperature, stats)
        return {k: sum(v) / len(v) for k, v in stats.items() if v}

    def _mini_step(self, mini, old_logp, adv, ref_logp, tis, low, high, temperature, stats):
        c = self.cfg
        self.opt.zero_grad(set_to_none=True)
        finite = True
        for rows, mb in micro_batches(mini, c.ppo_micro_batch_size_per_gpu, c.ppo_max_token_len_per_gpu):
            L = mb.response_mask.shape[1]
            logp, ent = self._forward(mb, temperature, with_entropy=True)
            sl = (rows, slice(0, L))
            pg_loss, m = A.policy_loss(logp, old_logp[sl], adv[sl], mb.response_mask, clip_low=low,
                                       clip_high=high, clip_c=c.clip_ratio_c, agg_mode=c.loss_agg_mode,
                                       kind=c.policy_loss, tis_weights=None if tis is None else tis[sl],
                                       norm_len=self.norm_len)
            entropy = A.agg_loss(ent, mb.response_mask, c.loss_agg_mode, self.norm_len)
            loss = pg_loss - c.entropy_coeff * entropy
            if ref_logp is not None and c.use_kl_loss:
                kl = A.agg_loss(A.kl_penalty(logp, ref_logp[sl], c.kl_loss_type), mb.response_mask,
                                c.loss_agg_mode, self.norm_len)
                loss = loss + c.kl_loss_coef * kl
                m["kl_loss"] = float(kl.detach())
            finite &= bool(torch.isfinite(loss))
            (loss * A.micro_weight(mb.response_mask, mini.response_mask, c.loss_agg_mode)).backward()
            m.update(pg_loss=float(pg_loss.detach()), entropy=float(entropy.detach()), loss=float(loss.detach()))
            for k, v in m.items():
                stats.setdefault(k, []).append(float(v))
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip))
        stats.setdefault("grad_norm", []).append(grad_norm)
        stats.setdefault("lr", []).append(self.sched.get_last_lr()[0])
        if not (finite and math.isfinite(grad_norm)):
            self._skip_non_finite()
            return
        self.nan_streak = 0
        self.opt.step()
        self.sched.step()

    def _skip_non_finite(self):
        self.opt.zero_grad(set_to_none=True)
        self.nan_streak += 1
        print(f"warning: non-finite loss or gradient, update skipped ({self.nan_streak} in a row)")
        if self.nan_streak >= self.cfg.max_nan_steps:
            raise HybridRLError(f"{self.nan_streak} updates in a row had a non-finite loss or gradient: "
                                "lower actor.lr, check the rewards, or raise actor.max_nan_steps")

    # ---- weights and state ---------------------------------------------------------------
    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(hf_name, tensor) pairs as the engine loads them; a tied lm_head is not sent twice."""
        tied = getattr(self.model.config, "tie_word_embeddings", False)
        for name, t in self.model.state_dict().items():
            if tied and name == "lm_head.weight":
                continue
            yield name, t.detach()

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "nan_streak": self.nan_streak}

    def load_state_dict(self, sd: dict) -> None:
        self.model.load_state_dict(sd["model"])
        self.opt.load_state_dict(sd["optimizer"])
        self.sched.load_state_dict(sd["scheduler"])
        self.nan_streak = sd.get("nan_streak", 0)


class Critic:
    """Value model: the policy's backbone family with a scalar head on every response position."""

    def __init__(self, path: str, model_cfg: ModelConfig, cfg: CriticConfig, device: torch.device):
        from transformers import AutoModel
        from hybridrl.models import check_model_dir
        check_model_dir(path)
        self.cfg, self.model_cfg, self.device = cfg, model_cfg, device
        self.backbone = AutoModel.from_pretrained(path, torch_dtype=torch.float32).to(device)
        self.head = nn.Linear(self.backbone.config.hidden_size, 1).to(device)
        nn.init.zeros_(self.head.weight), nn.init.zeros_(self.head.bias)
        params = list(self.backbone.parameters()) + list(self.head.parameters())
        self.opt, self.sched = make_optimizer(params, cfg.lr, 0.0, (0.9, 0.999), cfg.warmup_steps)

    def _values(self, mb: TrainBatch) -> torch.Tensor:
        with autocast(self.device, self.model_cfg.dtype):
            hidden = response_hidden(self.backbone, mb)
        return self.head(hidden.float()).squeeze(-1)  # [b, l]

    @torch.no_grad()
    def values(self, batch: TrainBatch) -> torch.Tensor:
        batch = to_device(batch, self.device)
        out = torch.zeros(batch.response_mask.shape, device=self.device)
        for rows, mb in micro_batches(batch, self.cfg.ppo_micro_batch_size_per_gpu):
            v = self._values(mb)
            out[rows, :v.shape[1]] = v
        return out.cpu() * batch.response_mask.cpu()

    def update(self, batch: TrainBatch, old_values: torch.Tensor, returns: torch.Tensor,
               mini_batch_size: int, agg_mode: str, norm_len: int | None = None) -> dict:
        batch = to_device(batch, self.device)
        old_values, returns = old_values.to(self.device), returns.to(self.device)
        stats: dict[str, list[float]] = {}
        for _ in range(self.cfg.ppo_epochs):
            for start in range(0, batch.size, mini_batch_size):
                idx = torch.arange(start, min(start + mini_batch_size, batch.size), device=self.device)
                mini = batch.select(idx)
                self.opt.zero_grad(set_to_none=True)
                for rows, mb in micro_batches(mini, self.cfg.ppo_micro_batch_size_per_gpu):
                    sl = (idx[rows], slice(0, mb.response_mask.shape[1]))
                    loss, m = A.value_loss(self._values(mb), old_values[sl], returns[sl], mb.response_mask,
                                           self.cfg.cliprange_value, agg_mode, norm_len)
                    (loss * A.micro_weight(mb.response_mask, mini.response_mask, agg_mode)).backward()
                    stats.setdefault("vf_loss", []).append(float(loss.detach()))
                    for k, v in m.items():
                        stats.setdefault(k, []).append(float(v))
                params = list(self.backbone.parameters()) + list(self.head.parameters())
                stats.setdefault("vf_grad_norm", []).append(
                    float(torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)))
                self.opt.step()
                self.sched.step()
        return {f"critic/{k}": sum(v) / len(v) for k, v in stats.items()}

    def state_dict(self) -> dict:
        return {"backbone": self.backbone.state_dict(), "head": self.head.state_dict(),
                "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.backbone.load_state_dict(sd["backbone"])
        self.head.load_state_dict(sd["head"])
        self.opt.load_state_dict(sd["optimizer"])
        self.sched.load_state_dict(sd["scheduler"])


def to_device(batch: TrainBatch, device: torch.device) -> TrainBatch:
    if batch.input_ids.device == device:
        return batch
    return batch.apply(lambda t: t.to(device))
