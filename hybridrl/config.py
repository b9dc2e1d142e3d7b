"""Typed configuration: dataclasses with defaults and a help string on every field.

Field names and sections are a contract other modules code against; the verl key mapping,
YAML loading, dotted overrides and validation live here too.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def f(default: Any, help: str):
    """A dataclass field with a default and a help string (mutable defaults are copied)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class DataConfig:
    train_files: list = f([], "parquet/jsonl files of training prompts (verl layout); empty = the embedded default task")
    val_files: list = f([], "parquet/jsonl files of validation prompts; empty = a held-out part of the default task")
    prompt_key: str = f("prompt", "column holding the chat messages")
    train_batch_size: int = f(8, "prompts per RL step (each gets rollout.n samples)")
    val_batch_size: int = f(64, "prompts per validation generate call")
    max_prompt_length: int = f(256, "prompts longer than this (after the chat template) are dropped, with a count")
    max_response_length: int = f(128, "max new tokens per response")
    shuffle: bool = f(True, "shuffle training prompts each epoch")
    seed: int = f(0, "seed for shuffling")
    max_samples: int = f(-1, "use at most this many training prompts (-1 = all)")
    # hybridrl generate (verl main_generation keys)
    path: str = f("", "generate: input parquet/jsonl; empty = embedded default (a small GSM8K sample)")
    output_path: str = f("outputs/generations.parquet", "generate: where the parquet with `responses` goes")
    n_samples: int = f(1, "generate: responses per prompt")
    batch_size: int = f(64, "generate: prompts submitted at once")


@dataclass
class ModelConfig:
    path: str = f("", "Hugging Face model folder; empty = SmolLM2-135M-Instruct from the offline package")
    tokenizer_path: str = f("", "tokenizer folder; empty = model.path")
    dtype: str = f("auto", "auto | float32 | bfloat16 | float16 (auto = bf16 on GPU, fp32 on CPU)")
    enable_gradient_checkpointing: bool = f(False, "recompute activations in backward to save memory")
    use_remove_padding: bool = f(True, "pack sequences without padding in training forward passes")
    trust_remote_code: bool = f(False, "allow custom model code from the model folder")


@dataclass
class ValKwargs:
    temperature: float = f(0.0, "validation sampling temperature (0 = greedy)")
    top_k: int = f(-1, "validation top-k (-1 = off)")
    top_p: float = f(1.0, "validation top-p")
    n: int = f(1, "validation samples per prompt")
    do_sample: bool = f(False, "sample in validation (False = greedy)")


@dataclass
class RolloutConfig:
    name: str = f("native", "rollout backend: native | sglang")
    mode: str = f("colocated", "colocated (share the trainer's GPUs, sleep/wake) | standalone (own GPUs)")
    temperature: float = f(1.0, "sampling temperature (0 = greedy)")
    top_k: int = f(-1, "top-k (-1 = off)")
    top_p: float = f(1.0, "top-p in (0, 1]")
    min_p: float = f(0.0, "min-p in [0, 1)")
    n: int = f(4, "samples per prompt (the GRPO group size)")
    prompt_length: int = f(256, "max prompt tokens (mirrors data.max_prompt_length)")
    response_length: int = f(128, "max new tokens (mirrors data.max_response_length)")
    stop: list = f([], "stop strings")
    seed: int = f(0, "sampling seed")
    dtype: str = f("auto", "engine dtype: auto | float32 | bfloat16 | float16")
    gpu_memory_utilization: float = f(0.5, "fraction of device memory for weights + KV cache (sglang mem_fraction_static)")
    tensor_model_parallel_size: int = f(1, "tensor parallel size of the engine")
    free_cache_engine: bool = f(True, "sleep the engine (free KV cache and weights) while training")
    enforce_eager: bool = f(False, "no CUDA graphs (sglang --disable-cuda-graph)")
    max_num_seqs: int = f(256, "max requests running at once (sglang max_running_requests)")
    max_num_batched_tokens: int = f(8192, "native engine: max tokens in one prefill step")
    kv_block_size: int = f(16, "native engine: tokens per KV cache block")
    log_prob_micro_batch_size_per_gpu: int = f(8, "sequences per micro-batch when recomputing log-probs")
    calculate_log_probs: bool = f(True, "return per-token log-probs of sampled tokens")
    use_rollout_log_probs: bool = f(False, "use the engine's log-probs as old log-probs instead of recomputing them")
    server_url: str = f("", "sglang: attach to this running server instead of launching one")
    attention_backend: str = f("", "sglang --attention-backend (empty = SGLang's default)")
    load_format: str = f("auto", "sglang --load-format; `dummy` when the trainer pushes weights at start")
    weight_sync: str = f("tensor", "how weights reach the engine: tensor (in-process / CUDA IPC) | disk | nccl")
    update_weights_bucket_megabytes: int = f(512, "bucket size for streaming weights to the engine")
    engine_kwargs: dict = f({}, "extra backend arguments, e.g. {sglang: {chunked_prefill_size: 4096}}, passed unchanged")
    log_level: str = f("warning", "sglang server log level")
    server_start_timeout: float = f(600.0, "seconds to wait for an engine server to become healthy")
    request_timeout: float = f(600.0, "seconds one generate request may take")
    val_kwargs: ValKwargs = field(default_factory=ValKwargs, metadata={"help": "sampling used in validation"})


@dataclass
class ActorConfig:
    lr: float = f(1e-6, "actor learning rate (AdamW)")
    warmup_steps: int = f(0, "linear learning-rate warm-up steps")
    weight_decay: float = f(0.0, "AdamW weight decay")
    betas: list = f([0.9, 0.999], "AdamW betas")
    grad_clip: float = f(1.0, "max gradient norm")
    ppo_mini_batch_size: int = f(8, "prompts per optimizer step (x rollout.n samples)")
    ppo_micro_batch_size_per_gpu: int = f(4, "sequences per forward/backward micro-batch")
    ppo_max_token_len_per_gpu: int = f(16384, "token budget per micro-batch when packing")
    ppo_epochs: int = f(1, "passes over each batch")
    clip_ratio: float = f(0.2, "PPO clip ratio (used for low and high unless they are set)")
    clip_ratio_low: float = f(-1.0, "PPO lower clip (-1 = clip_ratio)")
    clip_ratio_high: float = f(-1.0, "PPO upper clip (-1 = clip_ratio)")
    clip_ratio_c: float = f(3.0, "dual-clip constant for negative advantages (> 1)")
    policy_loss: str = f("vanilla", "vanilla (PPO clip) | gspo (sequence-level ratio)")
    loss_agg_mode: str = f("token-mean", "token-mean | seq-mean-token-sum | seq-mean-token-mean | seq-mean-token-sum-norm")
    entropy_coeff: float = f(0.0, "entropy bonus coefficient")
    use_kl_loss: bool = f(False, "add KL to the reference as a loss term (GRPO style)")
    kl_loss_coef: float = f(0.001, "KL loss coefficient")
    kl_loss_type: str = f("low_var_kl", "k1/kl | k2/mse | k3/low_var_kl | abs")
    tis_threshold: float = f(0.0, "truncated importance sampling cap against rollout log-probs (0 = off)")
    param_offload: bool = f(False, "offload parameters to CPU between phases")
    optimizer_offload: bool = f(False, "offload optimizer state to CPU between phases")
    max_nan_steps: int = f(3, "stop after this many updates in a row with a non-finite loss")


@dataclass
class RefConfig:
    log_prob_micro_batch_size_per_gpu: int = f(8, "sequences per micro-batch for reference log-probs")
    param_offload: bool = f(False, "keep the reference on CPU between uses")


@dataclass
class CriticConfig:
    model_path: str = f("", "critic backbone; empty = model.path")
    lr: float = f(1e-5, "critic learning rate")
    warmup_steps: int = f(0, "critic learning-rate warm-up steps")
    ppo_micro_batch_size_per_gpu: int = f(4, "sequences per critic micro-batch")
    ppo_epochs: int = f(1, "critic passes over each batch")
    cliprange_value: float = f(0.5, "value clipping range")
    grad_clip: float = f(1.0, "critic max gradient norm")


@dataclass
class AlgorithmConfig:
    adv_estimator: str = f("grpo", "gae | grpo | rloo | reinforce_plus_plus | reinforce_plus_plus_baseline | remax")
    gamma: float = f(1.0, "discount")
    lam: float = f(1.0, "GAE lambda")
    norm_adv_by_std_in_grpo: bool = f(True, "divide GRPO advantages by the group std")
    use_kl_in_reward: bool = f(False, "subtract a KL penalty from the token rewards")
    kl_penalty: str = f("kl", "KL estimator for the reward penalty: kl | abs | mse | low_var_kl")
    kl_ctrl_type: str = f("fixed", "fixed | adaptive KL controller")
    kl_coef: float = f(0.001, "initial KL coefficient")
    target_kl: float = f(0.1, "adaptive controller target KL")
    kl_horizon: int = f(10000, "adaptive controller horizon")


@dataclass
class RewardConfig:
    custom_path: str = f("", "python file with compute_score(data_source, solution_str, ground_truth, extra_info=None)")
    custom_name: str = f("compute_score", "function name in custom_path")
    format_score: float = f(0.0, "score for a well-formed but wrong answer")
    gsm8k_method: str = f("strict", "GSM8K extraction: strict (#### number) | flexible (last number)")


@dataclass
class TrainerConfig:
    total_epochs: int = f(1, "epochs over the training prompts")
    total_training_steps: int = f(-1, "stop after this many steps (-1 = epochs decide)")
    n_gpus_per_node: int = f(1, "GPUs per node")
    nnodes: int = f(1, "nodes (> 1 needs Ray)")
    device: str = f("auto", "auto | cpu | cuda")
    save_freq: int = f(-1, "checkpoint every N steps (-1 = only at the end)")
    test_freq: int = f(-1, "validate every N steps (-1 = never)")
    val_before_train: bool = f(True, "validate before the first step")
    logger: list = f(["console", "jsonl"], "console | jsonl | tensorboard | wandb")
    project_name: str = f("hybridrl", "project name (run folder and W&B)")
    experiment_name: str = f("default", "experiment name (run folder and W&B)")
    default_local_dir: str = f("runs/${trainer.project_name}/${trainer.experiment_name}", "run folder: logs, checkpoints, plots")
    default_hdfs_dir: str = f("", "remote checkpoint copy (accepted for verl compatibility; not implemented)")
    resume_mode: str = f("auto", "auto (latest checkpoint in the run folder) | disable | resume_path")
    resume_from_path: str = f("", "checkpoint folder to resume from when resume_mode=resume_path")
    critic_warmup: int = f(0, "train only the critic for this many steps")
    seed: int = f(0, "global seed")
    max_actor_ckpt_to_keep: int = f(2, "checkpoints kept (older ones deleted)")


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
