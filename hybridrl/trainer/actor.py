"""Actor, reference and critic on Hugging Face `transformers` causal LMs, sharded with FSDP2 at any world size.

The trainer interface the RL step uses:
    policy.log_probs(batch, temperature)           -> (logp [B, L], entropy [B, L])
    policy.update(batch, old_logp, adv, ref_logp)  -> metrics      (PPO epochs over mini-batches of prompts)
    policy.named_weights()                         -> iterator of (hf_name, tensor)
    critic.values(batch) -> [B, L];  critic.update(batch, old_values, returns) -> metrics
    .state_dict() / .load_state_dict()             (model + optimizer + scheduler, for checkpoints)

Policy and Critic share one PPO loop (`ppo_update`): mini-batches of whole prompt groups, micro-batches
closed by rows or by a token budget, gradient accumulation weighted so the sum over micro-batches and
ranks equals the global mini-batch loss, clipping, and a skip-then-stop guard for non-finite losses.
Log-probs and entropy come from `algorithms.logp_entropy` (chunked over tokens), the same function the
tests pin.

Every model is FSDP2-sharded (`trainer/fsdp.py`: `fully_shard` per decoder layer, then a root that holds
embeddings, final norm and head), one process being a world of 1: there is no second trainer. The root
is a small module whose forward is the whole per-micro-batch computation (backbone, then log-probs or
values), so FSDP's hooks gather and free the root's parameters around it. Compute runs in
`model.dtype` (bf16 on GPU) over fp32 master weights, gradients reduce in fp32. Offload:
`actor.param_offload` / `optimizer_offload` move the actor's shards / optimizer state to CPU after each
update (the engine gets the GPU) and back before the next forward; the reference with
`ref.param_offload` lives on CPU and is gathered layer by layer (FSDP's CPUOffloadPolicy).
"""
from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
import torch.nn as nn

from hybridrl import HybridRLError, algorithms as A
from hybridrl.config import ActorConfig, CriticConfig, ModelConfig
from hybridrl.devices import resolve_dtype
from hybridrl.parallel import DP
from hybridrl.trainer import fsdp
from hybridrl.trainer.batch import TrainBatch


def load_causal_lm(path: str, model_cfg: ModelConfig, trainable: bool = True) -> nn.Module:
    """An HF causal LM in fp32 on CPU (the master weights), ready to be sharded."""
    from transformers import AutoModelForCausalLM
    from hybridrl.models import check_model_dir
    check_model_dir(path, model_cfg.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32,
                                                 trust_remote_code=model_cfg.trust_remote_code)
    if model_cfg.enable_gradient_checkpointing and trainable:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


class LogProbHead(nn.Module):
    """FSDP root of the policy: backbone, then log-prob (and entropy) of each response token."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask, position_ids, labels, prompt_len: int, temperature: float,
                with_entropy: bool):
        hidden = response_hidden(self.lm.model, input_ids, attention_mask, position_ids, prompt_len, labels.shape[1])
        return A.logp_entropy(hidden, self.lm.lm_head, labels, temperature, with_entropy)


class ValueHead(nn.Module):
    """FSDP root of the critic: the causal LM's backbone, then a scalar per response position."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        self.head = nn.Linear(lm.config.hidden_size, 1)
        nn.init.zeros_(self.head.weight), nn.init.zeros_(self.head.bias)

    def forward(self, input_ids, attention_mask, position_ids, prompt_len: int, response_len: int):
        hidden = response_hidden(self.lm.model, input_ids, attention_mask, position_ids, prompt_len, response_len)
        return self.head(hidden).float().squeeze(-1)  # [b, l]; the head computes in the root's param dtype


def sharded(lm: nn.Module, root: nn.Module, model_cfg: ModelConfig, device: torch.device,
            offload: bool = False) -> nn.Module:
    fsdp.init_process_group_if_needed(device)
    param_dtype = resolve_dtype(model_cfg.dtype, device)
    return fsdp.shard_model(lm, device, param_dtype=None if param_dtype == torch.float32 else param_dtype,
                            offload=offload, root=root)


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


def response_hidden(backbone: nn.Module, input_ids, attention_mask, position_ids, P: int, L: int) -> torch.Tensor:
    """Hidden states at the positions that predict each response token. # [b, l, H]"""
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    return out.last_hidden_state[:, P - 1:P + L - 1]


def offload_optimizer(opt: torch.optim.Optimizer, device: torch.device) -> None:
    """Move the optimizer state (AdamW moments) to `device`; FSDP2's model.to() moves the parameters."""
    for state in opt.state.values():
        for k, v in state.items():
            if isinstance(v, torch.Tensor) and k != "step":
                state[k] = v.to(device, non_blocking=True)


class Offload:
    """param_offload / optimizer_offload between phases: shards and AdamW state to CPU after an update (the
    engine gets the GPU), back before the next forward. A no-op on CPU or with both off."""

    def __init__(self, root: nn.Module, opt: torch.optim.Optimizer | None, device: torch.device, params: bool,
                 optim: bool):
        self.root, self.opt, self.device = root, opt, device
        self.params, self.optim = params and device.type == "cuda", optim and device.type == "cuda" and opt is not None
        self.on_device = True

    def onload(self) -> None:
        if self.on_device:
            return
        if self.params:
            self.root.to(self.device)
        if self.optim:
            offload_optimizer(self.opt, self.device)
        self.on_device = True

    def offload(self) -> None:
        if not self.on_device or not (self.params or self.optim):
            return
        if self.params:
            self.root.to("cpu")
        if self.optim:
            offload_optimizer(self.opt, torch.device("cpu"))
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        self.on_device = False


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
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)   # DTensor: over all ranks
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


LossFn = Callable[[TrainBatch, torch.Tensor, slice], tuple[torch.Tensor, dict]]


def ppo_update(batch: TrainBatch, loss_fn: LossFn, optim: Optimizer, *, epochs: int, mini_prompts: int,
               micro_rows: int, micro_tokens: int, agg_mode: str, dp: DP = DP()) -> dict:
    """PPO epochs over mini-batches of whole prompts; one optimizer step per mini-batch -> mean metrics.

    loss_fn(mb, rows, cols) -> (aggregated loss of micro-batch mb, metrics): `rows` are mb's row indices
    in the full batch, `cols` its response columns (micro-batches are trimmed of padding).
    mini_prompts counts this rank's prompts; every rank holds as many and steps together. Each
    micro-batch's loss is weighted by its share of the loss divisor summed over ranks (times the world
    size, since FSDP averages gradients over ranks), so the step equals one over the global mini-batch.
    """
    stats: dict[str, list[float]] = {}
    for _ in range(epochs):
        for mini_rows, mini in mini_batches(batch, mini_prompts):
            finite = True
            divisor = dp.sum(A.agg_divisor(mini.response_mask, agg_mode)) / dp.world
            for rows, mb in micro_batches(mini, micro_rows, micro_tokens):
                loss, m = loss_fn(mb, mini_rows[rows], slice(0, mb.response_mask.shape[1]))
                finite &= bool(torch.isfinite(loss))
                (loss * (A.agg_divisor(mb.response_mask, agg_mode) / max(divisor, 1e-12))).backward()
                for k, v in {**m, "loss": float(loss.detach())}.items():
                    stats.setdefault(k, []).append(float(v))
            stats.setdefault("lr", []).append(optim.sched.get_last_lr()[0])
            stats.setdefault("grad_norm", []).append(optim.step(dp.sum(not finite) == 0))   # all ranks agree
    return {k: sum(v) / len(v) for k, v in stats.items() if v}


class Checkpointed:
    """What Policy and Critic save: `root` (the FSDP module) and `optim` (an Optimizer, or None when frozen)."""
    root: nn.Module
    optim: Optimizer | None

    def sharded_state(self) -> dict:
        """Model + optimizer shards for torch.distributed.checkpoint (each rank its own part)."""
        return fsdp.sharded_state(self.root, self.optim.opt if self.optim else None)

    def load_sharded_state(self, state: dict) -> None:
        fsdp.set_sharded_state(self.root, self.optim.opt if self.optim else None, state)

    def state_dict(self) -> dict:
        """The plain part of a checkpoint (scheduler, NaN streak); weights are in sharded_state()."""
        return {"scheduler": self.optim.sched.state_dict(), "nan_streak": self.optim.nan_streak}

    def load_state_dict(self, sd: dict) -> None:
        self.optim.sched.load_state_dict(sd["scheduler"])
        self.optim.nan_streak = sd.get("nan_streak", 0)


class Policy(Checkpointed):
    """The actor (trainable) or the reference (frozen, `trainable=False`), FSDP2-sharded over the ranks.

    norm_len: the configured max response length (rollout.response_length), the divisor of
    seq-mean-token-sum-norm, fixed here because micro-batches are trimmed to their own length.
    offload: for the reference, keep its shards on CPU (ref.param_offload); the actor reads
    actor.param_offload / optimizer_offload from its config.
    """

    def __init__(self, path: str, model_cfg: ModelConfig, cfg: ActorConfig, device: torch.device,
                 norm_len: int, trainable: bool = True, offload: bool = False):
        self.cfg, self.model_cfg, self.device, self.norm_len = cfg, model_cfg, device, norm_len
        self.model = load_causal_lm(path, model_cfg, trainable)            # the HF model; its params become DTensors
        self.root = sharded(self.model, LogProbHead(self.model), model_cfg, device, offload=offload and not trainable)
        self.dp = DP.current()
        self.root.train(trainable)
        self.root.requires_grad_(trainable)
        self.optim = Optimizer(self.root.parameters(), cfg.lr, cfg.weight_decay, cfg.betas, cfg.warmup_steps,
                               cfg.grad_clip, cfg.max_nan_steps, "actor") if trainable else None
        self.offloader = Offload(self.root, self.optim.opt if self.optim else None, device,
                                 trainable and cfg.param_offload, trainable and cfg.optimizer_offload)
        self.offloader.offload()

    def _forward(self, mb: TrainBatch, temperature: float, with_entropy: bool):
        labels = mb.input_ids[:, mb.prompt_len:mb.prompt_len + mb.response_mask.shape[1]]
        return self.root(mb.input_ids, mb.attention_mask, mb.position_ids, labels, mb.prompt_len, temperature,
                         with_entropy)

    @torch.no_grad()
    def log_probs(self, batch: TrainBatch, temperature: float, micro_batch_size: int = 8,
                  with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probs (and entropy) of the response tokens. # [B, L] each"""
        self.offloader.onload()
        batch = to_device(batch, self.device)
        logp = torch.zeros(batch.response_mask.shape, device=self.device)
        ent = torch.zeros_like(logp)
        was_training = self.root.training
        self.root.eval()                       # no dropout noise in old / reference log-probs
        try:
            for rows, mb in micro_batches(batch, micro_batch_size):
                lp, en = self._forward(mb, temperature, with_entropy)
                logp[rows, :lp.shape[1]], ent[rows, :en.shape[1]] = lp, en
        finally:
            self.root.train(was_training)
        return logp.cpu(), ent.cpu()

    def update(self, batch: TrainBatch, old_logp: torch.Tensor, adv: torch.Tensor,
               ref_logp: torch.Tensor | None, temperature: float) -> dict:
        """PPO epochs over mini-batches of actor.ppo_mini_batch_size prompts (all ranks together); mean metrics."""
        c = self.cfg
        self.offloader.onload()
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

        try:
            return ppo_update(batch, loss_fn, self.optim, epochs=c.ppo_epochs,
                              mini_prompts=max(1, c.ppo_mini_batch_size // self.dp.world),
                              micro_rows=c.ppo_micro_batch_size_per_gpu, micro_tokens=c.ppo_max_token_len_per_gpu,
                              agg_mode=c.loss_agg_mode, dp=self.dp)
        finally:
            self.offloader.offload()

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(hf_name, full tensor) pairs as the engine loads them, gathered ONE tensor at a time (collective:
        every rank iterates); a tied lm_head is not sent twice."""
        return fsdp.full_named_tensors(self.model)

    def parameters_finite(self) -> bool:
        """False when any parameter shard on any rank holds NaN / inf (never pushed or exported then)."""
        local = [torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all() for p in self.root.parameters()]
        bad = not bool(torch.stack(local).all()) if local else False
        return self.dp.sum(bad) == 0



class Critic(Checkpointed):
    """Value model: the policy's backbone family with a scalar head on every response position."""

    def __init__(self, path: str, model_cfg: ModelConfig, cfg: CriticConfig, device: torch.device,
                 norm_len: int, agg_mode: str, mini_prompts: int, max_nan_steps: int = 3):
        self.cfg, self.model_cfg, self.device, self.norm_len = cfg, model_cfg, device, norm_len
        self.agg_mode = agg_mode
        self.mini_prompts = cfg.ppo_mini_batch_size if cfg.ppo_mini_batch_size > 0 else mini_prompts
        lm = load_causal_lm(path, model_cfg)
        self.root = sharded(lm, ValueHead(lm), model_cfg, device)
        self.dp = DP.current()
        self.optim = Optimizer(self.root.parameters(), cfg.lr, 0.0, (0.9, 0.999), cfg.warmup_steps, cfg.grad_clip,
                               max_nan_steps, "critic")
        self.offloader = Offload(self.root, self.optim.opt, device, cfg.param_offload, cfg.optimizer_offload)
        self.offloader.offload()

    def _values(self, mb: TrainBatch) -> torch.Tensor:
        return self.root(mb.input_ids, mb.attention_mask, mb.position_ids, mb.prompt_len, mb.response_mask.shape[1])

    @torch.no_grad()
    def values(self, batch: TrainBatch) -> torch.Tensor:
        self.offloader.onload()
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

        self.offloader.onload()
        try:
            m = ppo_update(batch, loss_fn, self.optim, epochs=self.cfg.ppo_epochs,
                           mini_prompts=max(1, self.mini_prompts // self.dp.world),
                           micro_rows=self.cfg.ppo_micro_batch_size_per_gpu,
                           micro_tokens=self.cfg.ppo_max_token_len_per_gpu, agg_mode=self.agg_mode, dp=self.dp)
        finally:
            self.offloader.offload()
        names = {"loss": "vf_loss", "grad_norm": "vf_grad_norm"}
        return {f"critic/{names.get(k, k)}": v for k, v in m.items()}



def to_device(batch: TrainBatch, device: torch.device) -> TrainBatch:
    if batch.input_ids.device == device:
        return batch
    return batch.apply(lambda t: t.to(device))
