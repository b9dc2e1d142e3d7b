"""Typed configuration: dataclasses with defaults, a help string on every field, validated on construction.

    cfg = load_config(["rollout.n=8", "actor_rollout_ref.actor.optim.lr=1e-6"], config_file="examples/gsm8k_grpo.yaml")
    print(to_yaml(cfg))                       # or: hybridrl config show rollout.n=8

Keys come in our layout (`rollout.n`) or verl's (`actor_rollout_ref.rollout.n`, mapped by `config_verl.py`),
from a YAML file in either layout and from dotted command-line overrides (Hydra's `+key=value` too). Values are
type-checked by omegaconf's structured configs, `${trainer.project_name}`-style interpolations are resolved, and
the dataclasses' `__post_init__` check ranges, enums and cross-field rules. A bad key or value raises
`HybridRLError` naming it; a verl key we accept but do not implement gives a `ConfigWarning`.

One field per setting. Lengths: `data.max_prompt_length` (drops longer prompts) and `rollout.response_length`
(max new tokens); verl's other spellings (`rollout.prompt_length`, `data.max_response_length`) are aliases of
them in `config_verl.py`, and two spellings of one field set to different values in one place is an error.
Every number must be finite; mini-batches count prompts everywhere (each brings `rollout.n` samples).
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, ClassVar, get_type_hints

from hybridrl import HybridRLError
from hybridrl import config_verl
from hybridrl.config_io import to_dict, to_yaml  # noqa: F401  (part of this module's API)

# the choices the math in hybridrl.algorithms implements (it imports these: one list of each)
ADV_ESTIMATORS = ("gae", "grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "remax")
AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_KINDS = ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3")
POLICY_LOSSES = ("vanilla", "gspo")

DTYPES = ("auto", "float32", "bfloat16", "float16")
LOGGERS = ("console", "jsonl", "tensorboard", "wandb")
VERL_ONLY_LOGGERS = ("mlflow", "swanlab", "vemlp_wandb", "clearml", "file")
# Fields no code acts on yet: a value other than the default warns "accepted but not implemented yet".
# Whoever implements one removes it here.
NOT_IMPLEMENTED = ("model.use_remove_padding", "trainer.default_hdfs_dir")


class ConfigWarning(UserWarning):
    """A config value that is accepted but has no effect (yet)."""


def warn(msg: str) -> None:
    warnings.warn(msg, ConfigWarning, stacklevel=3)


def f(default: Any, help: str):
    """A dataclass field with a default and a help string (mutable defaults are copied)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


_RULES = {
    "gt0": (lambda v: v > 0, "must be > 0"),
    "ge0": (lambda v: v >= 0, "must be >= 0"),
    "ge1": (lambda v: v >= 1, "must be >= 1"),
    "opt": (lambda v: v == -1 or v >= 1, "must be -1 (off) or >= 1"),
    "unit": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "prob": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
}


def _bad(key: str, value: Any, want: str) -> HybridRLError:
    return HybridRLError(f"config {key}={value!r} is invalid: {want}")


def _check(obj, choices: dict | None = None, **rules: tuple) -> None:
    """Range rules (`gt0=("lr",)` ...) and enums (`choices={"name": (...)}`) on one section's fields."""
    _check_finite(obj, obj._section + ".")       # first: `nan` fails every range rule with a misleading message
    for rule, names in rules.items():
        ok, want = _RULES[rule]
        for name in names:
            v = getattr(obj, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not ok(v):
                raise _bad(f"{obj._section}.{name}", v, want)
    for name, allowed in (choices or {}).items():
        v = getattr(obj, name)
        if v not in allowed:
            raise _bad(f"{obj._section}.{name}", v, "must be one of " + " | ".join(allowed))


def _as_list(v) -> list:
    """verl accepts one path or a list of paths: `data.train_files=a.parquet` or `=[a.parquet,b.parquet]`."""
    if v is None or v == "":
        return []
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _expand(path: str) -> str:
    return os.path.expanduser(path) if isinstance(path, str) else path


@dataclass
class DataConfig:
    train_files: list = f([], "parquet/jsonl files of training prompts (verl layout); empty = the embedded default task")
    val_files: list = f([], "parquet/jsonl files of validation prompts; empty = a held-out part of the default task")
    prompt_key: str = f("prompt", "column holding the chat messages")
    train_batch_size: int = f(8, "prompts per RL step (each gets rollout.n samples)")
    val_batch_size: int = f(64, "prompts per validation generate call")
    max_prompt_length: int = f(256, "prompts longer than this (after the chat template) are dropped, with a count "
                                    "(verl's rollout.prompt_length is the same setting)")
    shuffle: bool = f(True, "shuffle training prompts each epoch")
    seed: int = f(0, "seed for shuffling")
    max_samples: int = f(-1, "use at most this many training prompts (-1 = all)")
    # hybridrl generate (verl main_generation keys)
    path: str = f("", "generate: input parquet/jsonl; empty = embedded default (a small GSM8K sample)")
    output_path: str = f("outputs/generations.parquet", "generate: where the parquet with `responses` goes")
    n_samples: int = f(1, "generate: responses per prompt")
    batch_size: int = f(64, "generate: prompts submitted at once")
    _section: ClassVar[str] = "data"

    def __post_init__(self):
        self.train_files = [_expand(p) for p in _as_list(self.train_files)]
        self.val_files = [_expand(p) for p in _as_list(self.val_files)]
        self.path, self.output_path = _expand(self.path), _expand(self.output_path)
        _check(self, ge1=("train_batch_size", "val_batch_size", "max_prompt_length", "n_samples", "batch_size"),
               opt=("max_samples",))


@dataclass
class ModelConfig:
    path: str = f("", "Hugging Face model folder; empty = SmolLM2-135M-Instruct from the offline package")
    tokenizer_path: str = f("", "tokenizer folder; empty = model.path")
    dtype: str = f("auto", "auto | float32 | bfloat16 | float16 (auto = bf16 on GPU, fp32 on CPU)")
    enable_gradient_checkpointing: bool = f(False, "recompute activations in backward to save memory")
    use_remove_padding: bool = f(True, "pack sequences without padding in training forward passes")
    trust_remote_code: bool = f(False, "allow custom model code from the model folder")
    _section: ClassVar[str] = "model"

    def __post_init__(self):
        self.path, self.tokenizer_path = _expand(self.path), _expand(self.tokenizer_path)
        _check(self, choices={"dtype": DTYPES})


@dataclass
class MultiTurn:
    enable: bool = f(False, "multi-turn rollout with tools (hybridrl/rollout/multiturn.py)")
    tool_config_path: str = f("", "YAML listing the tools in verl's format (tools: [{class_name, config, tool_schema}])")
    max_assistant_turns: int = f(-1, "model turns per sample (-1 = no cap: rollout.response_length ends it)")
    max_user_turns: int = f(-1, "tool / user turns per sample (-1 = no cap)")
    max_parallel_calls: int = f(1, "tool calls run per model turn; more get an error message")
    max_tool_response_length: int = f(256, "characters of a tool's output kept")
    tool_response_truncate_side: str = f("middle", "left | right | middle")
    tool_timeout_s: float = f(30.0, "seconds one tool call may take")
    format: str = f("hermes", "tool-call format: hermes | llama3_json | function_tag")
    tokenization_sanity_check_mode: str = f("strict", "strict | ignore_strippable | disable: re-template the whole "
                                            "conversation and count mismatches (rollout/tokenization_mismatch)")
    _section: ClassVar[str] = "rollout.multi_turn"

    def __post_init__(self):
        self.tool_config_path = _expand(self.tool_config_path)
        _check(self, ge1=("max_parallel_calls", "max_tool_response_length"), gt0=("tool_timeout_s",),
               opt=("max_assistant_turns", "max_user_turns"),
               choices={"tool_response_truncate_side": ("left", "right", "middle"),
                        "format": ("hermes", "llama3_json", "function_tag"),
                        "tokenization_sanity_check_mode": ("strict", "ignore_strippable", "disable")})
        if self.enable and not self.tool_config_path:
            warn("rollout.multi_turn.enable=true without rollout.multi_turn.tool_config_path: no tools, so each "
                 "sample is one model turn")


@dataclass
class ValKwargs:
    temperature: float = f(0.0, "validation sampling temperature (0 = greedy)")
    top_k: int = f(-1, "validation top-k (-1 = off)")
    top_p: float = f(1.0, "validation top-p")
    n: int = f(1, "validation samples per prompt")
    do_sample: bool = f(False, "sample in validation (False = greedy)")
    _section: ClassVar[str] = "rollout.val_kwargs"

    def __post_init__(self):
        self.top_k = -1 if self.top_k == 0 else self.top_k
        _check(self, ge0=("temperature",), unit=("top_p",), ge1=("n",), opt=("top_k",))


@dataclass
class RolloutConfig:
    name: str = f("native", "rollout backend: native | sglang")
    temperature: float = f(1.0, "sampling temperature (0 = greedy)")
    top_k: int = f(-1, "top-k (-1 = off)")
    top_p: float = f(1.0, "top-p in (0, 1]")
    min_p: float = f(0.0, "min-p in [0, 1)")
    n: int = f(4, "samples per prompt (the GRPO group size)")
    response_length: int = f(32, "max new tokens per response (verl's data.max_response_length is the same setting)")
    stop: list = f([], "stop strings")
    ignore_eos: bool = f(False, "keep generating past EOS up to response_length (benchmarks with fixed lengths)")
    seed: int = f(0, "sampling seed")
    dtype: str = f("auto", "engine dtype: auto | float32 | bfloat16 | float16")
    gpu_memory_utilization: float = f(0.5, "fraction of device memory for weights + KV cache (sglang mem_fraction_static)")
    tensor_model_parallel_size: int = f(1, "tensor parallel size of the engine")
    free_cache_engine: bool = f(False, "colocated mode: sleep the engine (free KV cache and weights) while the trainer works; "
                                       "turn on when the engine shares the trainer's GPUs")
    enforce_eager: bool = f(False, "no CUDA graphs (sglang --disable-cuda-graph)")
    max_num_seqs: int = f(256, "max requests running at once (sglang max_running_requests)")
    max_num_batched_tokens: int = f(8192, "native engine: max tokens in one prefill step")
    kv_block_size: int = f(16, "native engine: tokens per KV cache block")
    log_prob_micro_batch_size_per_gpu: int = f(8, "sequences per micro-batch when recomputing log-probs")
    use_rollout_log_probs: bool = f(True, "use the engine's log-probs as old log-probs (on-policy: the engine holds the trainer's exact weights) instead of recomputing them; false recomputes and logs the rollout/train mismatch")
    server_url: str = f("", "sglang: attach to this running server instead of launching one")
    attention_backend: str = f("", "sglang --attention-backend (empty = SGLang's default)")
    load_format: str = f("auto", "sglang --load-format; `dummy` when the trainer pushes weights at start")
    weight_sync: str = f("tensor", "how weights reach the engine: tensor (in-process / CUDA IPC) | disk | nccl "
                                   "(disaggregated: an sglang server on other GPUs, weights broadcast from the trainer)")
    update_weights_bucket_megabytes: int = f(512, "bucket size for streaming weights to the engine")
    engine_kwargs: dict = f({}, "extra backend arguments, e.g. {sglang: {chunked_prefill_size: 4096}}, passed unchanged")
    log_level: str = f("warning", "sglang server log level")
    server_start_timeout: float = f(600.0, "seconds to wait for an engine server to become healthy")
    request_timeout: float = f(600.0, "seconds one generate request may take, at least; a longer request gets "
                               "more (0.1 s per max new token when that is larger)")
    server_restarts: int = f(2, "sglang: times a launched server that dies is started again within a run (the "
                             "weights are pushed again and only the lost requests re-sent); 0 = fail at once")
    val_kwargs: ValKwargs = field(default_factory=ValKwargs, metadata={"help": "sampling used in validation"})
    multi_turn: MultiTurn = field(default_factory=MultiTurn, metadata={"help": "multi-turn rollout with tools (verl's keys)"})
    _section: ClassVar[str] = "rollout"

    def __post_init__(self):
        if self.name == "vllm":
            raise _bad("rollout.name", self.name, "hybridrl runs rollouts on native | sglang; use rollout.name=sglang")
        self.top_k = -1 if self.top_k == 0 else self.top_k
        self.stop = _as_list(self.stop)
        _check(self, ge0=("temperature", "server_restarts"), unit=("top_p", "gpu_memory_utilization"), opt=("top_k",),
               ge1=("n", "response_length", "tensor_model_parallel_size", "max_num_seqs",
                    "max_num_batched_tokens", "kv_block_size", "log_prob_micro_batch_size_per_gpu",
                    "update_weights_bucket_megabytes"),
               gt0=("server_start_timeout", "request_timeout"),
               choices={"name": ("native", "sglang"), "dtype": DTYPES,
                        "weight_sync": ("tensor", "disk", "nccl")})
        if not 0 <= self.min_p < 1:
            raise _bad("rollout.min_p", self.min_p, "must be in [0, 1)")
        if self.weight_sync != "tensor" and self.name == "native":
            raise _bad("rollout.weight_sync", self.weight_sync, "the native engine loads the trainer's tensors in "
                       "process: use rollout.weight_sync=tensor (disk and nccl are for rollout.name=sglang)")
        if self.weight_sync == "nccl" and self.free_cache_engine:
            raise _bad("rollout.weight_sync", self.weight_sync, "nccl is the disaggregated mode (the server has GPUs "
                       "of its own, nothing to free): set rollout.free_cache_engine=false, or use weight_sync=tensor "
                       "for a colocated engine")
        if self.name == "native" and self.tensor_model_parallel_size > 1:
            warn(f"accepted but not implemented yet: rollout.tensor_model_parallel_size="
                 f"{self.tensor_model_parallel_size} with rollout.name=native (the native engine runs on one GPU)")


@dataclass
class ActorConfig:
    lr: float = f(2e-5, "actor learning rate (AdamW)")
    warmup_steps: int = f(0, "linear learning-rate warm-up steps")
    weight_decay: float = f(0.0, "AdamW weight decay")
    betas: list = f([0.9, 0.999], "AdamW betas")
    grad_clip: float = f(1.0, "max gradient norm")
    ppo_mini_batch_size: int = f(4, "prompts per optimizer step (each brings its rollout.n samples)")
    ppo_micro_batch_size_per_gpu: int = f(4, "sequences per forward/backward micro-batch")
    ppo_max_token_len_per_gpu: int = f(16384, "token budget per training micro-batch: a micro-batch closes at ppo_micro_batch_size_per_gpu rows or at this many padded tokens (rows x longest row), whichever comes first")
    ppo_epochs: int = f(1, "passes over each batch")
    clip_ratio: float = f(0.2, "PPO clip ratio (used for low and high unless they are set)")
    clip_ratio_low: float = f(-1.0, "PPO lower clip (-1 = clip_ratio)")
    clip_ratio_high: float = f(-1.0, "PPO upper clip (-1 = clip_ratio)")
    clip_ratio_c: float = f(3.0, "dual-clip constant for negative advantages (> 1)")
    policy_loss: str = f("vanilla", "vanilla (PPO clip) | gspo (sequence-level ratio)")
    loss_agg_mode: str = f("token-mean", " | ".join(AGG_MODES))
    entropy_coeff: float = f(0.0, "entropy bonus coefficient")
    use_kl_loss: bool = f(False, "add KL to the reference as a loss term (GRPO style)")
    kl_loss_coef: float = f(0.001, "KL loss coefficient")
    kl_loss_type: str = f("low_var_kl", "k1/kl | k2/mse | k3/low_var_kl | abs")
    tis_threshold: float = f(0.0, "truncated importance sampling cap against rollout log-probs (0 = off; when on, old log-probs are recomputed even with rollout.use_rollout_log_probs)")
    param_offload: bool = f(False, "GPU only: move the actor's parameter shards to CPU after each update, back before "
                               "the next forward (the engine gets the memory during rollout)")
    optimizer_offload: bool = f(False, "GPU only: move the AdamW state to CPU after each update, back before the next")
    max_nan_steps: int = f(3, "stop after this many updates in a row with a non-finite loss")
    _section: ClassVar[str] = "actor"

    def __post_init__(self):
        _check(self, gt0=("lr", "grad_clip", "clip_ratio"), ge0=("warmup_steps", "weight_decay", "entropy_coeff",
               "kl_loss_coef", "tis_threshold"), ge1=("ppo_mini_batch_size", "ppo_micro_batch_size_per_gpu",
               "ppo_max_token_len_per_gpu", "ppo_epochs", "max_nan_steps"),
               choices={"policy_loss": POLICY_LOSSES, "kl_loss_type": KL_KINDS, "loss_agg_mode": AGG_MODES})
        if self.lr >= 1:
            raise _bad("actor.lr", self.lr, "must be < 1 (AdamW on an LLM diverges at once; typical: 1e-6 .. 1e-4)")
        for name in ("clip_ratio_low", "clip_ratio_high"):
            v = getattr(self, name)
            if v != -1 and not 0 < v < (1 if name == "clip_ratio_low" else float("inf")):
                raise _bad(f"actor.{name}", v, "must be -1 (= clip_ratio) or > 0 (and < 1 for the low side)")
        if self.clip_ratio_c <= 1:
            raise _bad("actor.clip_ratio_c", self.clip_ratio_c, "must be > 1")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise _bad("actor.betas", list(self.betas), "must be two numbers in [0, 1), e.g. [0.9, 0.999]")


@dataclass
class RefConfig:
    log_prob_micro_batch_size_per_gpu: int = f(8, "sequences per micro-batch for reference log-probs")
    param_offload: bool = f(False, "GPU only: keep the reference's shards on CPU, gathered layer by layer to the GPU "
                               "when it runs (FSDP2 CPUOffloadPolicy)")
    _section: ClassVar[str] = "ref"

    def __post_init__(self):
        _check(self, ge1=("log_prob_micro_batch_size_per_gpu",))


@dataclass
class CriticConfig:
    model_path: str = f("", "critic backbone; empty = model.path")
    lr: float = f(1e-5, "critic learning rate")
    warmup_steps: int = f(0, "critic learning-rate warm-up steps")
    ppo_mini_batch_size: int = f(-1, "prompts per critic optimizer step (-1 = actor.ppo_mini_batch_size)")
    ppo_micro_batch_size_per_gpu: int = f(4, "sequences per critic micro-batch")
    ppo_max_token_len_per_gpu: int = f(16384, "token budget per critic micro-batch (rows x longest row)")
    ppo_epochs: int = f(1, "critic passes over each batch")
    cliprange_value: float = f(0.5, "value clipping range")
    grad_clip: float = f(1.0, "critic max gradient norm")
    param_offload: bool = f(False, "GPU only: critic parameter shards to CPU between its phases")
    optimizer_offload: bool = f(False, "GPU only: critic AdamW state to CPU between its phases")
    _section: ClassVar[str] = "critic"

    def __post_init__(self):
        self.model_path = _expand(self.model_path)
        _check(self, gt0=("lr", "cliprange_value", "grad_clip"), ge0=("warmup_steps",),
               ge1=("ppo_micro_batch_size_per_gpu", "ppo_max_token_len_per_gpu", "ppo_epochs"), opt=("ppo_mini_batch_size",))
        if self.lr >= 1:
            raise _bad("critic.lr", self.lr, "must be < 1 (typical: 1e-6 .. 1e-4)")


@dataclass
class AlgorithmConfig:
    adv_estimator: str = f("grpo", " | ".join(ADV_ESTIMATORS))
    gamma: float = f(1.0, "discount")
    lam: float = f(1.0, "GAE lambda")
    norm_adv_by_std_in_grpo: bool = f(True, "divide GRPO advantages by the group std")
    use_kl_in_reward: bool = f(False, "subtract a KL penalty from the token rewards")
    kl_penalty: str = f("kl", "KL estimator for the reward penalty: kl | abs | mse | low_var_kl")
    kl_ctrl_type: str = f("fixed", "fixed | adaptive KL controller")
    kl_coef: float = f(0.001, "initial KL coefficient")
    target_kl: float = f(0.1, "adaptive controller target KL")
    kl_horizon: int = f(10000, "adaptive controller horizon")
    _section: ClassVar[str] = "algorithm"

    def __post_init__(self):
        _check(self, prob=("gamma", "lam"), ge0=("kl_coef",), gt0=("target_kl", "kl_horizon"),
               choices={"adv_estimator": ADV_ESTIMATORS, "kl_penalty": KL_KINDS,
                        "kl_ctrl_type": ("fixed", "adaptive")})


@dataclass
class RewardConfig:
    custom_path: str = f("", "python file with compute_score(data_source, solution_str, ground_truth, extra_info=None)")
    custom_name: str = f("compute_score", "function name in custom_path")
    format_score: float = f(0.0, "score for a well-formed but wrong answer")
    gsm8k_method: str = f("strict", "GSM8K extraction: strict (#### number) | flexible (last number)")
    timeout_s: float = f(60.0, "seconds one reward call may take before training stops with an error naming it")
    _section: ClassVar[str] = "reward"

    def __post_init__(self):
        self.custom_path = _expand(self.custom_path)
        _check(self, gt0=("timeout_s",), choices={"gsm8k_method": ("strict", "flexible")})


@dataclass
class TrainerConfig:
    total_epochs: int = f(1, "epochs over the training prompts")
    total_training_steps: int = f(-1, "stop after this many steps (-1 = epochs decide)")
    n_gpus_per_node: int = f(1, "ranks per node, one GPU each (with trainer.device=cpu: processes); > 1 starts them with torch's launcher")
    nnodes: int = f(1, "nodes; > 1 places the ranks with Ray (pip install hybridrl[ray]; docs/multi_node.md)")
    device: str = f("auto", "auto | cpu | cuda")
    save_freq: int = f(-1, "checkpoint every N steps (-1 = only at the end)")
    test_freq: int = f(4, "validate every N steps (-1 = only before and after training)")
    val_before_train: bool = f(True, "validate before the first step")
    logger: list = f(["console", "jsonl"], "console | jsonl | tensorboard | wandb (metrics.jsonl is written in every case)")
    project_name: str = f("hybridrl", "project name (run folder and W&B)")
    experiment_name: str = f("default", "experiment name (run folder and W&B)")
    default_local_dir: str = f("runs/${trainer.project_name}/${trainer.experiment_name}", "run folder: logs, checkpoints, plots")
    default_hdfs_dir: str = f("", "remote checkpoint copy (accepted for verl compatibility; not implemented)")
    resume_mode: str = f("auto", "auto (latest checkpoint in the run folder) | disable | resume_path")
    resume_from_path: str = f("", "checkpoint folder to resume from when resume_mode=resume_path")
    critic_warmup: int = f(0, "train only the critic for this many steps")
    seed: int = f(0, "global seed")
    max_actor_ckpt_to_keep: int = f(2, "checkpoints kept (older ones deleted)")
    _section: ClassVar[str] = "trainer"

    def __post_init__(self):
        self.logger = self._loggers(_as_list(self.logger))
        for name in ("project_name", "experiment_name"):   # resolved here too for Config() built in Python
            self.default_local_dir = self.default_local_dir.replace("${trainer.%s}" % name, str(getattr(self, name)))
        self.default_local_dir, self.resume_from_path = _expand(self.default_local_dir), _expand(self.resume_from_path)
        _check(self, ge1=("total_epochs", "n_gpus_per_node", "nnodes", "max_actor_ckpt_to_keep"), ge0=("critic_warmup",),
               opt=("total_training_steps", "save_freq", "test_freq"),
               choices={"device": ("auto", "cpu", "cuda"), "resume_mode": ("auto", "disable", "resume_path")})
        if self.resume_mode == "resume_path" and not self.resume_from_path:
            raise _bad("trainer.resume_from_path", "", "set it to a checkpoint folder when trainer.resume_mode=resume_path")

    @staticmethod
    def _loggers(names: list) -> list:
        for name in names:
            if name in VERL_ONLY_LOGGERS:
                warn(f"accepted but not implemented yet: trainer.logger entry {name!r} (dropped)")
            elif name not in LOGGERS:
                raise _bad("trainer.logger", names, "entries must be among " + " | ".join(LOGGERS))
        return [n for n in names if n in LOGGERS]


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "prompts"})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "policy model"})
    rollout: RolloutConfig = field(default_factory=RolloutConfig, metadata={"help": "rollout engine and sampling"})
    actor: ActorConfig = field(default_factory=ActorConfig, metadata={"help": "policy optimisation"})
    ref: RefConfig = field(default_factory=RefConfig, metadata={"help": "reference policy"})
    critic: CriticConfig = field(default_factory=CriticConfig, metadata={"help": "value model (gae only)"})
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig, metadata={"help": "advantages and KL"})
    reward: RewardConfig = field(default_factory=RewardConfig, metadata={"help": "rewards"})
    trainer: TrainerConfig = field(default_factory=TrainerConfig, metadata={"help": "loop, logging, checkpoints"})

    def __post_init__(self):
        _check_finite(self)
        for key in NOT_IMPLEMENTED:
            section, name = key.split(".")
            value = getattr(getattr(self, section), name)
            if value != getattr(type(getattr(self, section))(), name):
                warn(f"accepted but not implemented yet: {key}={value!r} (hybridrl ignores it for now)")
        if self.data.train_batch_size % self.actor.ppo_mini_batch_size:
            raise HybridRLError(
                f"data.train_batch_size={self.data.train_batch_size} must be a multiple of "
                f"actor.ppo_mini_batch_size={self.actor.ppo_mini_batch_size} (both count prompts; each prompt "
                f"brings rollout.n={self.rollout.n} samples): change one of them")
        world = self.trainer.n_gpus_per_node * self.trainer.nnodes
        for key, value in (("data.train_batch_size", self.data.train_batch_size),
                           ("actor.ppo_mini_batch_size", self.actor.ppo_mini_batch_size)):
            if value % world:
                raise HybridRLError(f"{key}={value} must be a multiple of the number of ranks, trainer.nnodes x "
                                    f"trainer.n_gpus_per_node = {world} (each rank trains on whole prompts, as "
                                    "many as every other rank): change one of them")
        if self.algorithm.adv_estimator in ("grpo", "rloo") and self.rollout.n < 2:
            warn(f"algorithm.adv_estimator={self.algorithm.adv_estimator} with rollout.n=1: every advantage "
                 "is 0 (a group of one); set rollout.n >= 2")


def _check_finite(obj, prefix: str = "") -> None:
    """Refuse NaN and +-inf anywhere in the config (actor.lr=inf trained to non-finite weights and exit 0)."""
    for fld in fields(obj):
        v = getattr(obj, fld.name)
        key = f"{prefix}{fld.name}"
        if is_dataclass(v):
            _check_finite(v, key + ".")
        values = v if isinstance(v, (list, tuple)) else [v]
        for x in values:
            if isinstance(x, float) and not math.isfinite(x):
                raise _bad(key, v, "must be a finite number")


# ---------------------------------------------------------------- loading


def load_config(overrides: list[str] | tuple = (), config_file: str | None = None) -> Config:
    """Defaults <- YAML file (our or verl's layout) <- `key=value` overrides, validated."""
    return resolve_config(overrides, config_file)[0]


def resolve_config(overrides=(), config_file: str | None = None,
                   base: list[str] | tuple = ()) -> tuple[Config, list[tuple[str, str]]]:
    """`load_config`, also returning (verl_key, our_key) for every verl spelling that was mapped.

    `base`: overrides applied before the file (e.g. `config_verl.VERL_DEFAULTS`)."""
    items = [(0, *config_verl.parse_override(arg)) for arg in base]
    items += [(1, k, v) for k, v in config_verl.flatten(config_verl.read_yaml(config_file))] if config_file else []
    items += [(2, *config_verl.parse_override(arg)) for arg in overrides]
    conf, mapped = _omegaconf().structured(Config), []
    # structured() ran TrainerConfig.__post_init__, which resolved the run folder: restore the interpolation
    conf.trainer.default_local_dir = next(f.default for f in fields(TrainerConfig) if f.name == "default_local_dir")
    seen: dict[str, tuple[int, str, Any]] = {}     # our key -> (layer, spelling, value), to catch two spellings
    for layer, key, value in items:
        ours, how = config_verl.map_key(key)
        if how == "accepted":
            msg = None if value is None else config_verl.accepted_warning(key, value)
            if msg:
                warn(msg)
            continue
        typ = _lookup(ours)
        if typ is None:
            raise HybridRLError(config_verl.unknown_key_message(key, all_keys()))
        if how == "verl":
            mapped.append((key, ours))
        value = config_verl.map_interpolations(value)
        if value == "${%s}" % ours:        # verl's `response_length: ${data.max_response_length}`: one field now
            continue
        _check_one_spelling(seen, layer, key, ours, value)
        _assign(conf, key, ours, value, typ)
    return from_dict(_resolve(conf)), mapped


def _check_one_spelling(seen: dict, layer: int, key: str, ours: str, value) -> None:
    """Two spellings of one field (data.max_response_length, rollout.response_length) with two values in one
    layer (the file, or the command line) is an error; a later layer overriding an earlier one is fine."""
    prev = seen.get(ours)
    if prev is not None and prev[0] == layer and prev[1] != key and prev[2] != value:
        raise HybridRLError(f"{prev[1]}={prev[2]!r} and {key}={value!r} are one setting ({ours}) with two values: "
                            "set only one of them")
    seen[ours] = (layer, key, value)


def from_dict(tree: dict, cls=Config):
    """Build the dataclasses from a nested dict (running every section's validation)."""
    hints, kwargs = get_type_hints(cls), {}
    for name, value in tree.items():
        if name not in hints or name.startswith("_"):
            raise HybridRLError(f"unknown config key '{name}' in section {cls.__name__}")
        sub = hints[name]
        kwargs[name] = from_dict(value, sub) if is_dataclass(sub) and isinstance(value, dict) else value
    return cls(**kwargs)


def all_keys(cls=Config, prefix: str = "") -> list[str]:
    """Every dotted key of our layout."""
    out = []
    for fld in fields(cls):
        sub = get_type_hints(cls)[fld.name]
        out += all_keys(sub, f"{prefix}{fld.name}.") if is_dataclass(sub) else [prefix + fld.name]
    return out


def _omegaconf():
    from omegaconf import OmegaConf
    return OmegaConf


def _lookup(key: str):
    """The type of our dotted `key`, `dict` anywhere inside a dict field, None if there is no such key."""
    cls = Config
    for i, part in enumerate(key.split(".")):
        typ = get_type_hints(cls).get(part) if is_dataclass(cls) and not part.startswith("_") else None
        if typ is None or typ is dict or i == key.count("."):
            return typ
        cls = typ
    return None


def _assign(conf, given_key: str, key: str, value: Any, typ) -> None:
    """Set one key on the omegaconf tree, which checks the value's type."""
    from omegaconf.errors import OmegaConfBaseException
    if value is None and typ is not dict:   # verl's `key=null`: the default
        value = Config()
        for part in key.split("."):
            value = getattr(value, part)
    if typ is list:
        value = _as_list(value)
    try:
        _omegaconf().update(conf, key, value, merge=True)
    except OmegaConfBaseException:
        name = getattr(typ, "__name__", str(typ))
        shown = f"{given_key} (= {key})" if given_key != key else key
        raise HybridRLError(f"config {shown}={value!r} has the wrong type: expected {name}, "
                            f"got {type(value).__name__}") from None


def _resolve(conf) -> dict:
    from omegaconf.errors import OmegaConfBaseException
    try:
        return _omegaconf().to_container(conf, resolve=True)
    except OmegaConfBaseException as e:
        raise HybridRLError(f"config interpolation failed: {str(e).splitlines()[0]}") from None
