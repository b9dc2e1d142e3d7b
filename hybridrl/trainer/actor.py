"""Actor, reference and critic on Hugging Face `transformers` causal LMs, in one process.

The trainer interface the RL step uses:
    policy.log_probs(batch, temperature)           -> (logp [B, L], entropy [B, L])
    policy.update(batch, old_logp, adv, ref_logp)  -> metrics      (PPO epochs over mini-batches of prompts)
    policy.named_weights()                         -> iterator of (hf_name, tensor)
    critic.values(batch) -> [B, L];  critic.update(batch, old_values, returns) -> metrics
    .state_dict() / .load_state_dict()             (model + optimizer + scheduler, for checkpoints)

Policy and Critic share one PPO loop (`ppo_update`): mini-batches of whole prompt groups, micro-batches
closed by rows or by a token budget, gradient accumulation weighted so the sum equals the mini-batch
loss, clipping, and a skip-then-stop guard for non-finite losses. Log-probs and entropy come from
`algorithms.logp_entropy` (chunked over tokens), the same function the tests pin.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
import torch.nn as nn

from hybridrl import HybridRLError, algorithms as A
from hybridrl.config import ActorConfig, CriticConfig, ModelConfig
from hybridrl.devices import autocast
from hybridrl.trainer.batch import TrainBatch


def load_causal_lm(path: str, model_cfg: ModelConfig, device: torch.device, backbone_only: bool = False) -> nn.Module:
    from transformers import AutoModel, AutoModelForCausalLM
    from hybridrl.models import check_model_dir
    check_model_dir(path, model_cfg.trust_remote_code)
    cls = AutoModel if backbone_only else AutoModelForCausalLM
    model = cls.from_pretrained(path, torch_dtype=torch.float32, trust_remote_code=model_cfg.trust_remote_code)
    if model_cfg.enable_gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.config.use_cache = False
    return model.to(device)


def mini_batches(batch: TrainBatch, prompts: int) -> Iterator[tuple[torch.Tensor, TrainBatch]]:
    """(row indices, mini-batch) of `prompts` whole prompt groups each (the n samples of a prompt stay together)."""
    groups = torch.unique_consecutive(batch.group_ids)
    for start in range(0, len(groups), prompts):
        rows = torch.isin(batch.group_ids, groups[start:start + prompts]).nonzero().flatten()
        rows = rows.to(batch.input_ids.device)
        yield rows, batch.select(rows)


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


def make_optimizer(params, lr: float, weight_decay: float, betas, warmup_steps: int):
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup_steps)))
    return opt, sched


class Optimizer:
    """AdamW + warm-up over some parameters, clipping, and the non-finite guard (skip, then stop)."""

    def __init__(self, params, lr, weight_decay, betas, warmup_steps, grad_clip, max_nan_steps, name):
        self.params = list(params)
        self.opt, self.sched = make_optimizer(self.params, lr, weight_decay, betas, warmup_steps)
        self.grad_clip, self.max_nan_steps, self.name = grad_clip, max_nan_steps, name
        self.nan_streak = 0

    def step(self, finite_loss: bool) -> float:
        """Clip, then step unless the loss or the gradient is non-finite; returns the gradient norm."""
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip))
        if finite_loss and math.isfinite(grad_norm):
            self.nan_streak = 0
            self.opt.step()
            self.sched.step()
        else:
            self.nan_streak += 1
            print(f"warning: {self.name}: non-finite loss or gradient, update skipped ({self.nan_streak} in a row)")
            if self.nan_streak >= self.max_nan_steps:
                raise HybridRLError(f"{self.name}: {self.nan_streak} updates in a row had a non-finite loss or "
                                    "gradient: lower the learning rate, check the rewards, or raise actor.max_nan_steps")
        self.opt.zero_grad(set_to_none=True)
        return grad_norm

    def state_dict(self) -> dict:
        return {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(), "nan_streak": self.nan_streak}

    def load_state_dict(self, sd: dict) -> None:
        self.opt.load_state_dict(sd["optimizer"])
        self.sched.load_state_dict(sd["scheduler"])
        self.nan_streak = sd.get("nan_streak", 0)


LossFn = Callable[[TrainBatch, torch.Tensor, slice], tuple[torch.Tensor, dict]]


def ppo_update(batch: TrainBatch, loss_fn: LossFn, optim: Optimizer, *, epochs: int, mini_prompts: int,
               micro_rows: int, micro_tokens: int, agg_mode: str) -> dict:
    """PPO epochs over mini-batches of whole prompts; one optimizer step per mini-batch -> mean metrics.

    loss_fn(mb, rows, cols) -> (aggregated loss of micro-batch mb, metrics): `rows` are mb's row indices
    in the full batch, `cols` its response columns (micro-batches are trimmed of padding).
    """
    stats: dict[str, list[float]] = {}
    for _ in range(epochs):
        for mini_rows, mini in mini_batches(batch, mini_prompts):
            finite = True
            for rows, mb in micro_batches(mini, micro_rows, micro_tokens):
                loss, m = loss_fn(mb, mini_rows[rows], slice(0, mb.response_mask.shape[1]))
                finite &= bool(torch.isfinite(loss))
                (loss * A.micro_weight(mb.response_mask, mini.response_mask, agg_mode)).backward()
                for k, v in {**m, "loss": float(loss.detach())}.items():
                    stats.setdefault(k, []).append(float(v))
            stats.setdefault("lr", []).append(optim.sched.get_last_lr()[0])
            stats.setdefault("grad_norm", []).append(optim.step(finite))
    return {k: sum(v) / len(v) for k, v in stats.items() if v}


class Policy:
    """The actor (trainable) or the reference (frozen, `trainable=False`).

    norm_len: the configured max response length (rollout.response_length), the divisor of
    seq-mean-token-sum-norm, fixed here because micro-batches are trimmed to their own length.
    """

    def __init__(self, path: str, model_cfg: ModelConfig, cfg: ActorConfig, device: torch.device,
                 norm_len: int, trainable: bool = True):
        self.cfg, self.model_cfg, self.device, self.norm_len = cfg, model_cfg, device, norm_len
        self.model = load_causal_lm(path, model_cfg, device)
        self.model.train(trainable)
        self.model.requires_grad_(trainable)
        self.optim = Optimizer(self.model.parameters(), cfg.lr, cfg.weight_decay, cfg.betas, cfg.warmup_steps,
                               cfg.grad_clip, cfg.max_nan_steps, "actor") if trainable else None

    def _forward(self, mb: TrainBatch, temperature: float, with_entropy: bool):
        labels = mb.input_ids[:, mb.prompt_len:mb.prompt_len + mb.response_mask.shape[1]]
        # the lm_head runs under autocast too: in fp32 its [tokens, V] GEMMs took half the update's GPU time
        # (docs/benchmarks/profile_update.md); log_softmax itself is computed in fp32
        with autocast(self.device, self.model_cfg.dtype):
            hidden = response_hidden(self.model.model, mb)
            return A.logp_entropy(hidden, self.model.lm_head, labels, temperature, with_entropy)

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

    def update(self, batch: TrainBatch, old_logp: torch.Tensor, adv: torch.Tensor,
               ref_logp: torch.Tensor | None, temperature: float) -> dict:
        """PPO epochs over mini-batches of actor.ppo_mini_batch_size prompts; returns mean metrics."""
        c = self.cfg
        low = c.clip_ratio if c.clip_ratio_low < 0 else c.clip_ratio_low
        high = c.clip_ratio if c.clip_ratio_high < 0 else c.clip_ratio_high
        batch = to_device(batch, self.device)
        old_logp, adv = old_logp.to(self.device), adv.to(self.device)
        ref_logp = ref_logp.to(self.device) if ref_logp is not None else None
        tis = (A.tis_weights(old_logp, batch.rollout_logp, batch.response_mask, c.tis_threshold)
               if c.tis_threshold > 0 else None)

        def loss_fn(mb: TrainBatch, rows, cols):
            logp, ent = self._forward(mb, temperature, with_entropy=True)
            mask = mb.response_mask
            pg_loss, m = A.policy_loss(logp, old_logp[rows, cols], adv[rows, cols], mask, clip_low=low,
                                       clip_high=high, clip_c=c.clip_ratio_c, agg_mode=c.loss_agg_mode,
                                       kind=c.policy_loss, tis_weights=None if tis is None else tis[rows, cols],
                                       norm_len=self.norm_len)
            entropy = A.agg_loss(ent, mask, c.loss_agg_mode, self.norm_len)
            loss = pg_loss - c.entropy_coeff * entropy
            if ref_logp is not None and c.use_kl_loss:
                kl = A.agg_loss(A.kl_penalty(logp, ref_logp[rows, cols], c.kl_loss_type), mask,
                                c.loss_agg_mode, self.norm_len)
                loss = loss + c.kl_loss_coef * kl
                m["kl_loss"] = float(kl.detach())
            return loss, {**m, "pg_loss": float(pg_loss.detach()), "entropy": float(entropy.detach())}

        return ppo_update(batch, loss_fn, self.optim, epochs=c.ppo_epochs, mini_prompts=c.ppo_mini_batch_size,
                          micro_rows=c.ppo_micro_batch_size_per_gpu, micro_tokens=c.ppo_max_token_len_per_gpu,
                          agg_mode=c.loss_agg_mode)

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(hf_name, tensor) pairs as the engine loads them; a tied lm_head is not sent twice."""
        tied = getattr(self.model.config, "tie_word_embeddings", False)
        for name, t in self.model.state_dict().items():
            if tied and name == "lm_head.weight":
                continue
            yield name, t.detach()

    def parameters_finite(self) -> bool:
        """False when any parameter holds NaN / inf (such weights are never pushed or exported)."""
        return bool(torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all())   # one sync

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), **self.optim.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.model.load_state_dict(sd["model"])
        self.optim.load_state_dict(sd)


class Critic:
    """Value model: the policy's backbone family with a scalar head on every response position."""

    def __init__(self, path: str, model_cfg: ModelConfig, cfg: CriticConfig, device: torch.device,
                 norm_len: int, agg_mode: str, mini_prompts: int, max_nan_steps: int = 3):
        self.cfg, self.model_cfg, self.device, self.norm_len = cfg, model_cfg, device, norm_len
        self.agg_mode = agg_mode
        self.mini_prompts = cfg.ppo_mini_batch_size if cfg.ppo_mini_batch_size > 0 else mini_prompts
        self.backbone = load_causal_lm(path, model_cfg, device, backbone_only=True)
        self.head = nn.Linear(self.backbone.config.hidden_size, 1).to(device)
        nn.init.zeros_(self.head.weight), nn.init.zeros_(self.head.bias)
        params = list(self.backbone.parameters()) + list(self.head.parameters())
        self.optim = Optimizer(params, cfg.lr, 0.0, (0.9, 0.999), cfg.warmup_steps, cfg.grad_clip, max_nan_steps,
                               "critic")

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

    def update(self, batch: TrainBatch, old_values: torch.Tensor, returns: torch.Tensor) -> dict:
        """Clipped value loss over the same PPO loop as the actor -> critic/* metrics."""
        batch = to_device(batch, self.device)
        old_values, returns = old_values.to(self.device), returns.to(self.device)

        def loss_fn(mb: TrainBatch, rows, cols):
            return A.value_loss(self._values(mb), old_values[rows, cols], returns[rows, cols], mb.response_mask,
                                self.cfg.cliprange_value, self.agg_mode, self.norm_len)

        m = ppo_update(batch, loss_fn, self.optim, epochs=self.cfg.ppo_epochs, mini_prompts=self.mini_prompts,
                       micro_rows=self.cfg.ppo_micro_batch_size_per_gpu,
                       micro_tokens=self.cfg.ppo_max_token_len_per_gpu, agg_mode=self.agg_mode)
        names = {"loss": "vf_loss", "grad_norm": "vf_grad_norm"}
        return {f"critic/{names.get(k, k)}": v for k, v in m.items()}

    def state_dict(self) -> dict:
        return {"backbone": self.backbone.state_dict(), "head": self.head.state_dict(), **self.optim.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.backbone.load_state_dict(sd["backbone"])
        self.head.load_state_dict(sd["head"])
        self.optim.load_state_dict(sd)


def to_device(batch: TrainBatch, device: torch.device) -> TrainBatch:
    if batch.input_ids.device == device:
        return batch
    return batch.apply(lambda t: t.to(device))
