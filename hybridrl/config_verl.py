"""verl's and Hydra's config spellings, mapped onto hybridrl's (see `config.py`): the key tables,
`key=value` parsing (Hydra's `+key=value` / `++key=value` too) and flattening of nested YAML.

A verl command line runs here with only the module name changed:

    python -m hybridrl.main_ppo actor_rollout_ref.model.path=... actor_rollout_ref.rollout.name=sglang ...

Three tables, read in this order by `map_key`:
  VERL_KEYS       exact verl key -> our key (renames);
  VERL_PREFIXES   verl section -> our section, for fields whose names are the same on both sides;
  ACCEPTED        verl keys we accept without implementing them: silent when the value is what we do
                  anyway, otherwise a warning "accepted but not implemented yet: <key>=<value>".
Anything else that is not one of our own keys is an error naming the closest valid key.
"""
from __future__ import annotations

import difflib
import os
import re
from typing import Any

from hybridrl import HybridRLError

# verl key -> our key
VERL_KEYS: dict[str, str] = {
    "data.tokenizer": "model.tokenizer_path",
    "actor_rollout_ref.model.tokenizer_path": "model.tokenizer_path",
    "actor_rollout_ref.actor.optim.lr": "actor.lr",
    "actor_rollout_ref.actor.optim.lr_warmup_steps": "actor.warmup_steps",
    "actor_rollout_ref.actor.optim.weight_decay": "actor.weight_decay",
    "actor_rollout_ref.actor.optim.betas": "actor.betas",
    "actor_rollout_ref.actor.optim.clip_grad": "actor.grad_clip",
    "actor_rollout_ref.actor.fsdp_config.param_offload": "actor.param_offload",
    "actor_rollout_ref.actor.fsdp_config.optimizer_offload": "actor.optimizer_offload",
    "actor_rollout_ref.actor.policy_loss.loss_mode": "actor.policy_loss",
    "actor_rollout_ref.ref.fsdp_config.param_offload": "ref.param_offload",
    "actor_rollout_ref.rollout.checkpoint_engine.update_weights_bucket_megabytes":
        "rollout.update_weights_bucket_megabytes",
    "critic.optim.lr": "critic.lr",
    "critic.optim.lr_warmup_steps": "critic.warmup_steps",
    "critic.optim.clip_grad": "critic.grad_clip",
    "critic.model.path": "critic.model_path",
    "critic.model.fsdp_config.param_offload": "critic.param_offload",
    "critic.model.fsdp_config.optimizer_offload": "critic.optimizer_offload",
    "algorithm.kl_ctrl.kl_coef": "algorithm.kl_coef",
    "algorithm.kl_ctrl.type": "algorithm.kl_ctrl_type",
    "algorithm.kl_ctrl.target_kl": "algorithm.target_kl",
    "algorithm.kl_ctrl.horizon": "algorithm.kl_horizon",
    "custom_reward_function.path": "reward.custom_path",
    "custom_reward_function.name": "reward.custom_name",
    "reward.custom_reward_function.path": "reward.custom_path",
    "reward.custom_reward_function.name": "reward.custom_name",
    # one field per setting: verl's second spelling of a length is an alias
    "data.max_response_length": "rollout.response_length",
    "actor_rollout_ref.rollout.prompt_length": "data.max_prompt_length",
    "rollout.prompt_length": "data.max_prompt_length",
}

# verl section -> our section: exact because the field names below them are the same.
VERL_PREFIXES: list[tuple[str, str]] = [
    ("actor_rollout_ref.rollout.", "rollout."),
    ("actor_rollout_ref.actor.", "actor."),
    ("actor_rollout_ref.ref.", "ref."),
    ("actor_rollout_ref.model.", "model."),
]

# verl's defaults where they differ from ours and change the algorithm: `python -m hybridrl.main_ppo` starts
# from these (then the YAML file, then the overrides), so a verl command that leaves them out means what it did there.
VERL_DEFAULTS = ("algorithm.adv_estimator=gae", "rollout.n=1", "rollout.free_cache_engine=true",
                 "rollout.use_rollout_log_probs=false", "actor.lr=1e-6", "trainer.test_freq=-1")

ANY = None  # every value behaves as in verl: accepted silently
# verl key -> values that need no warning (we already behave that way), or ANY
ACCEPTED: dict[str, tuple | None] = {
    "actor_rollout_ref.hybrid_engine": (True,),
    "actor_rollout_ref.actor.strategy": ("fsdp", "fsdp2"),
    "actor_rollout_ref.ref.strategy": ("fsdp", "fsdp2"),
    "critic.strategy": ("fsdp", "fsdp2"),
    "actor_rollout_ref.actor.use_dynamic_bsz": (False,),
    "actor_rollout_ref.actor.ulysses_sequence_parallel_size": (1,),
    "actor_rollout_ref.actor.use_torch_compile": (False,),
    "actor_rollout_ref.ref.use_torch_compile": (False,),
    "actor_rollout_ref.actor.fsdp_config.fsdp_size": (-1, 1),
    "actor_rollout_ref.actor.fsdp_config.use_torch_compile": (False,),
    "actor_rollout_ref.actor.ppo_micro_batch_size": (None,),
    "actor_rollout_ref.actor.optim.lr_warmup_steps_ratio": (0, 0.0),
    "actor_rollout_ref.actor.optim.warmup_style": ("constant",),
    "actor_rollout_ref.actor.optim.total_training_steps": (None, -1),
    "actor_rollout_ref.actor.checkpoint.save_contents": ANY,
    "actor_rollout_ref.actor.checkpoint.load_contents": ANY,
    "actor_rollout_ref.model.use_shm": (False,),
    "actor_rollout_ref.model.lora_rank": (0,),
    "actor_rollout_ref.model.external_lib": (None,),
    "actor_rollout_ref.model.use_fused_kernels": (False,),
    "actor_rollout_ref.rollout.mode": ("sync",),
    "actor_rollout_ref.rollout.calculate_log_probs": (True,),   # log-probs of sampled tokens always come back
    "actor_rollout_ref.rollout.multi_turn.interaction_config_path": (None, ""),   # interactions: not yet
    "actor_rollout_ref.rollout.multi_turn.use_inference_chat_template": (False,),
    "actor_rollout_ref.rollout.multi_turn.num_repeat_rollouts": (None,),
    "actor_rollout_ref.rollout.do_sample": (True,),
    "actor_rollout_ref.rollout.enable_chunked_prefill": (True,),
    "actor_rollout_ref.rollout.enable_prefix_caching": (True,),
    "actor_rollout_ref.rollout.disable_log_stats": ANY,
    "actor_rollout_ref.rollout.max_model_len": (None,),
    "actor_rollout_ref.rollout.log_prob_micro_batch_size": (None,),
    "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz": (False,),
    "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu": ANY,
    "actor_rollout_ref.rollout.logprobs_mode": (),
    "actor_rollout_ref.rollout.agent.num_workers": ANY,
    "actor_rollout_ref.ref.log_prob_micro_batch_size": (None,),
    "actor_rollout_ref.ref.log_prob_use_dynamic_bsz": (False,),
    "actor_rollout_ref.ref.log_prob_max_token_len_per_gpu": ANY,
    "critic.ppo_micro_batch_size": (None,),
    "critic.use_dynamic_bsz": (False,),
    "critic.model.enable_gradient_checkpointing": (),
    "critic.model.use_remove_padding": (True,),
    "critic.optim.lr_warmup_steps_ratio": (0, 0.0),
    "reward_model.enable": (False,),
    "reward_model.reward_manager": ("naive",),
    "reward.num_workers": ANY,
    "algorithm.use_pf_ppo": (False,),
    "data.return_raw_chat": ANY,                     # prompts always reach the engine as chat messages
    "data.return_raw_input_ids": (False,),
    "data.filter_overlong_prompts": (True,),         # we always drop overlong prompts, with a count
    "data.filter_overlong_prompts_workers": ANY,
    "data.dataloader_num_workers": ANY,
    "data.truncation": (),                           # we drop overlong prompts instead of truncating
    "data.reward_fn_key": ("data_source",),
    "data.image_key": ANY,
    "data.apply_chat_template_kwargs": (),
    "trainer.balance_batch": ANY,                    # ranks always get whole prompt groups balanced by tokens
    "trainer.log_val_generations": (0,),
    "trainer.val_only": (False,),
    "trainer.del_local_ckpt_after_load": (False,),
    "trainer.max_critic_ckpt_to_keep": (None,),
    "trainer.ray_wait_register_center_timeout": ANY,
    "defaults": (),                                  # a Hydra defaults list in a YAML file
}

# whole verl subtrees accepted with a warning (Ray start-up, Hydra's own settings, ...)
ACCEPTED_PREFIXES = ("ray_init.", "ray_kwargs.", "hydra.",
                     "actor_rollout_ref.rollout.agent.", "actor_rollout_ref.actor.profiler.",
                     "global_profiler.", "reward_model.")


def map_key(key: str) -> tuple[str | None, str]:
    """Our spelling of `key` and how it was found: "verl" (renamed), "ours", or "accepted" (None)."""
    if key in VERL_KEYS:
        return VERL_KEYS[key], "verl"
    if key in ACCEPTED or key.startswith(ACCEPTED_PREFIXES):
        return None, "accepted"
    for verl, ours in VERL_PREFIXES:
        if key.startswith(verl):
            return ours + key[len(verl):], "verl"
    return key, "ours"


def accepted_warning(key: str, value) -> str | None:
    """The warning for an accepted-but-unimplemented verl key, or None when `value` needs none."""
    ok = ACCEPTED.get(key, ())
    if ok is ANY or any(v == value and isinstance(v, bool) == isinstance(value, bool) for v in ok):
        return None
    return f"accepted but not implemented yet: {key}={value!r} (hybridrl ignores it)"


_INTERP = re.compile(r"\$\{([A-Za-z_][\w.]*)\}")


def map_interpolations(value):
    """Rewrite `${verl.key}` references inside a string value to our spelling."""
    if not isinstance(value, str) or "${" not in value:
        return value
    return _INTERP.sub(lambda m: "${" + (map_key(m.group(1))[0] or m.group(1)) + "}", value)


def all_verl_keys() -> list[str]:
    """Every verl key we know by name (for 'did you mean' suggestions)."""
    return list(VERL_KEYS) + list(ACCEPTED)


def read_yaml(path: str) -> dict:
    from omegaconf import OmegaConf
    if not os.path.isfile(path):
        raise HybridRLError(f"config file not found: {path} (pass an existing YAML file to --config)")
    try:
        conf = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError and friends: report the file, not the parser's stack
        raise HybridRLError(f"config file {path} is not valid YAML: {e}") from None
    tree = OmegaConf.to_container(conf, resolve=False)
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise HybridRLError(f"config file {path} must hold a mapping of keys, got {type(tree).__name__}")
    return tree


def flatten(tree: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """{"a": {"b": 1}} -> [("a.b", 1)]; empty dicts and lists are values."""
    out = []
    for k, v in tree.items():
        key = f"{prefix}{k}"
        out += flatten(v, key + ".") if isinstance(v, dict) and v else [(key, v)]
    return out


def parse_override(arg: str) -> tuple[str, Any]:
    """`key=value`, `+key=value` or `++key=value`; the value is parsed as YAML (lists, numbers, null)."""
    from omegaconf import OmegaConf
    key, eq, raw = arg.partition("=")
    key = key.strip().lstrip("+")
    if not eq or not key:
        raise HybridRLError(f"override {arg!r} is not key=value (e.g. rollout.n=8)")
    if key.startswith("~"):
        raise HybridRLError(f"override {arg!r}: deleting keys with ~ is not supported; set the key instead")
    try:
        return key, OmegaConf.to_container(OmegaConf.from_dotlist(["v=" + raw]))["v"]
    except Exception as e:  # a malformed list such as `[a,`
        raise HybridRLError(f"override {arg!r}: cannot parse the value ({e})") from None


def unknown_key_message(key: str, our_keys: list[str]) -> str:
    """'unknown config key' with the closest valid key, in verl's spelling when the user wrote verl's."""
    candidates = our_keys + all_verl_keys()
    candidates += [v + k[len(o):] for v, o in VERL_PREFIXES for k in our_keys if k.startswith(o)]
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    if not close:   # match on the last part: `rollout.temprature` -> `rollout.temperature`
        last = {c.rsplit(".", 1)[-1]: c for c in candidates}
        close = [last[m] for m in difflib.get_close_matches(key.rsplit(".", 1)[-1], list(last), n=1)]
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown config key '{key}'{hint} (`hybridrl config show` prints every key)"
