"""Config: verl keys map onto ours, values are type-checked, ranges / enums / cross-field rules hold,
YAML in either layout loads, and every shipped example loads."""
import glob
import os
import warnings

import pytest

from hybridrl import HybridRLError
from hybridrl.config import (Config, ConfigWarning, all_keys, from_dict, load_config, resolve_config, to_dict,
                             to_yaml)

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")

# every verl key listed in issue 3: (override, our key, expected value)
VERL_CASES = [
    ("data.train_files=[a.parquet,b.parquet]", "data.train_files", ["a.parquet", "b.parquet"]),
    ("data.val_files=/tmp/test.parquet", "data.val_files", ["/tmp/test.parquet"]),
    ("data.train_batch_size=32", "data.train_batch_size", 32),
    ("data.max_prompt_length=512", "data.max_prompt_length", 512),
    ("data.max_response_length=300", "rollout.response_length", 300),
    ("actor_rollout_ref.model.path=/models/qwen", "model.path", "/models/qwen"),
    ("actor_rollout_ref.actor.optim.lr=3e-6", "actor.lr", 3e-6),
    ("actor_rollout_ref.actor.ppo_mini_batch_size=4", "actor.ppo_mini_batch_size", 4),
    ("actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2", "actor.ppo_micro_batch_size_per_gpu", 2),
    ("actor_rollout_ref.actor.fsdp_config.param_offload=True", "actor.param_offload", True),
    ("actor_rollout_ref.actor.fsdp_config.optimizer_offload=True", "actor.optimizer_offload", True),
    ("actor_rollout_ref.model.enable_gradient_checkpointing=True", "model.enable_gradient_checkpointing", True),
    ("actor_rollout_ref.model.use_remove_padding=False", "model.use_remove_padding", False),
    ("actor_rollout_ref.rollout.name=sglang", "rollout.name", "sglang"),
    ("actor_rollout_ref.rollout.tensor_model_parallel_size=2", "rollout.tensor_model_parallel_size", 2),
    ("actor_rollout_ref.rollout.gpu_memory_utilization=0.6", "rollout.gpu_memory_utilization", 0.6),
    ("actor_rollout_ref.rollout.temperature=0.7", "rollout.temperature", 0.7),
    ("actor_rollout_ref.rollout.top_k=20", "rollout.top_k", 20),
    ("actor_rollout_ref.rollout.top_p=0.95", "rollout.top_p", 0.95),
    ("actor_rollout_ref.rollout.n=5", "rollout.n", 5),
    ("actor_rollout_ref.rollout.prompt_length=512", "data.max_prompt_length", 512),
    ("actor_rollout_ref.rollout.response_length=300", "rollout.response_length", 300),
    ("actor_rollout_ref.rollout.free_cache_engine=False", "rollout.free_cache_engine", False),
    ("actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=6", "rollout.log_prob_micro_batch_size_per_gpu", 6),
    ("actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=7", "ref.log_prob_micro_batch_size_per_gpu", 7),
    ("actor_rollout_ref.ref.fsdp_config.param_offload=True", "ref.param_offload", True),
    ("critic.optim.lr=2e-5", "critic.lr", 2e-5),
    ("critic.model.path=/models/critic", "critic.model_path", "/models/critic"),
    ("critic.ppo_micro_batch_size_per_gpu=3", "critic.ppo_micro_batch_size_per_gpu", 3),
    ("algorithm.adv_estimator=rloo", "algorithm.adv_estimator", "rloo"),
    ("algorithm.kl_ctrl.kl_coef=0.02", "algorithm.kl_coef", 0.02),
    ("trainer.n_gpus_per_node=4", "trainer.n_gpus_per_node", 4),
    ("trainer.nnodes=1", "trainer.nnodes", 1),
    ("trainer.total_epochs=3", "trainer.total_epochs", 3),
    ("trainer.save_freq=20", "trainer.save_freq", 20),
    ("trainer.test_freq=5", "trainer.test_freq", 5),
    ("trainer.logger=['console','wandb']", "trainer.logger", ["console", "wandb"]),
    ("trainer.val_before_train=False", "trainer.val_before_train", False),
    ("trainer.default_hdfs_dir=null", "trainer.default_hdfs_dir", ""),
    ("trainer.critic_warmup=2", "trainer.critic_warmup", 2),
    ("trainer.project_name=proj", "trainer.project_name", "proj"),
    ("trainer.experiment_name=exp", "trainer.experiment_name", "exp"),
    ("custom_reward_function.path=/tmp/my_reward.py", "reward.custom_path", "/tmp/my_reward.py"),
    ("custom_reward_function.name=my_score", "reward.custom_name", "my_score"),
]


def get(cfg, key):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def load(*overrides, config_file=None):
    """load_config, failing the test on any warning (each test that expects one says so)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        return load_config(list(overrides), config_file)


def test_every_verl_key_lands_on_its_field():
    with pytest.warns(ConfigWarning) as record:
        cfg, mapped = resolve_config([case[0] for case in VERL_CASES])
    warned = {str(w.message).split(": ")[1].split("=")[0] for w in record}
    assert warned == {"model.use_remove_padding"}   # never silent (tensor parallel 2 is fine: rollout.name=sglang)
    for override, ours, want in VERL_CASES:
        assert get(cfg, ours) == want, override
    assert ("actor_rollout_ref.actor.optim.lr", "actor.lr") in mapped
    assert ("critic.model.path", "critic.model_path") in mapped
    assert cfg.trainer.default_local_dir == "runs/proj/exp"   # interpolation follows the new names


@pytest.mark.parametrize("override,ours,want", VERL_CASES[5:12])
def test_verl_key_alone(override, ours, want):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        assert get(load_config([override]), ours) == want


def test_defaults_are_the_embedded_default():
    cfg = load()
    assert cfg == Config()
    assert cfg.rollout.name == "native" and cfg.trainer.default_local_dir == "runs/hybridrl/default"
    assert "rollout.val_kwargs.temperature" in all_keys() and "critic.model_path" in all_keys()


def test_hydra_plus_forms_and_value_shapes():
    cfg = load("+rollout.n=6", "++actor.lr=5e-7", "trainer.logger=console",
               "+actor_rollout_ref.rollout.engine_kwargs.sglang.attention_backend=fa3",
               'trainer.logger=["console","tensorboard"]', "data.train_files=~/x.parquet")
    assert cfg.rollout.n == 6 and cfg.actor.lr == 5e-7
    assert cfg.rollout.engine_kwargs == {"sglang": {"attention_backend": "fa3"}}
    assert cfg.trainer.logger == ["console", "tensorboard"]
    assert cfg.data.train_files == [os.path.expanduser("~/x.parquet")]
    assert load("trainer.logger=console").trainer.logger == ["console"]


def test_unknown_key_names_the_closest():
    with pytest.raises(HybridRLError, match=r"unknown config key 'rollout.temprature'.*'rollout.temperature'"):
        load_config(["rollout.temprature=0.5"])
    with pytest.raises(HybridRLError, match=r"'actor_rollout_ref.actor.optim.lr'"):
        load_config(["actor_rollout_ref.actor.optim.lrr=1e-6"])


def test_wrong_type_names_key_value_and_type():
    with pytest.raises(HybridRLError, match=r"data.train_batch_size='many'.*expected int"):
        load_config(["data.train_batch_size=many"])
    with pytest.raises(HybridRLError, match=r"actor_rollout_ref.actor.optim.lr \(= actor.lr\)='fast'.*float"):
        load_config(["actor_rollout_ref.actor.optim.lr=fast"])
    with pytest.raises(HybridRLError, match="key=value"):
        load_config(["rollout.n"])


@pytest.mark.parametrize("override,match", [
    ("rollout.name=vllm", "native | sglang"),
    ("rollout.name=tgi", "native | sglang"),
    ("algorithm.adv_estimator=ppo", "gae | grpo"),
    ("actor.loss_agg_mode=mean", "token-mean"),
    ("actor.kl_loss_type=k9", "low_var_kl"),
    ("algorithm.kl_ctrl.type=pid", "fixed | adaptive"),
    ("actor.policy_loss=dpo", "vanilla | gspo"),
    ("trainer.logger=[console,neptune]", "console | jsonl"),
    ("rollout.weight_sync=rdma", "tensor | disk | nccl"),
    ("model.dtype=int8", "bfloat16"),
    ("trainer.device=hpu", "auto | cpu | cuda"),
    ("trainer.resume_mode=maybe", "resume_path"),
    ("actor.lr=0", "> 0"),
    ("actor.lr=inf", "finite"),
    ("actor.lr=nan", "finite"),
    ("actor.lr=3", "< 1"),
    ("critic.cliprange_value=-inf", "finite"),
    ("rollout.weight_sync=nccl", "native engine loads the trainer's tensors in process"),
    ("rollout.weight_sync=disk", "weight_sync=tensor"),
    ("rollout.top_p=0", r"\(0, 1\]"),
    ("rollout.top_p=1.5", r"\(0, 1\]"),
    ("rollout.temperature=-1", ">= 0"),
    ("rollout.n=0", ">= 1"),
    ("rollout.gpu_memory_utilization=1.2", r"\(0, 1\]"),
    ("actor.clip_ratio_low=1.5", "low side"),
    ("actor.clip_ratio_c=0.5", "> 1"),
    ("algorithm.gamma=1.5", r"\[0, 1\]"),
    ("trainer.resume_mode=resume_path", "resume_from_path"),
])
def test_bad_values(override, match):
    with pytest.raises(HybridRLError, match=match):
        load_config([override])


def test_cross_field_rules():
    with pytest.raises(HybridRLError, match="multiple of actor.ppo_mini_batch_size=4"):
        load_config(["data.train_batch_size=10"])
    assert load("data.train_batch_size=24").data.train_batch_size == 24
    with pytest.raises(HybridRLError, match="one setting .data.max_prompt_length. with two values"):
        load_config(["data.max_prompt_length=100", "rollout.prompt_length=200"])
    with pytest.raises(HybridRLError, match="multiple"):    # construction in Python validates too
        Config().__class__(data=Config().data.__class__(train_batch_size=7))


def test_one_field_per_setting_whatever_the_spelling(tmp_path):
    """verl spells the two lengths twice; each is one field here, and two different values are an error."""
    cfg = load("actor_rollout_ref.rollout.prompt_length=100", "data.max_response_length=50")
    assert (cfg.data.max_prompt_length, cfg.rollout.response_length) == (100, 50)
    assert not hasattr(cfg.rollout, "prompt_length") and not hasattr(cfg.data, "max_response_length")
    same = load("data.max_response_length=40", "actor_rollout_ref.rollout.response_length=40")
    assert same.rollout.response_length == 40                        # the same value twice is fine
    with pytest.raises(HybridRLError, match="rollout.response_length.*two values"):
        load_config(["data.max_response_length=40", "actor_rollout_ref.rollout.response_length=41"])
    # verl's YAML writes `response_length: ${data.max_response_length}`: that is the same field, not a loop
    path = tmp_path / "verl.yaml"
    path.write_text("data:\n  max_response_length: 77\nactor_rollout_ref:\n  rollout:\n"
                    "    response_length: ${data.max_response_length}\n")
    assert load(config_file=str(path)).rollout.response_length == 77
    # an override beats the file, whichever spelling either uses
    assert load("actor_rollout_ref.rollout.response_length=9", config_file=str(path)).rollout.response_length == 9


def test_accepted_but_not_implemented_warns():
    with pytest.warns(ConfigWarning, match="accepted but not implemented yet: trainer.default_hdfs_dir"):
        load_config(["trainer.default_hdfs_dir=hdfs://x/ckpt"])
    with pytest.warns(ConfigWarning, match="tensor_model_parallel_size=2 with rollout.name=native"):
        load_config(["actor_rollout_ref.rollout.tensor_model_parallel_size=2"])
    with pytest.warns(ConfigWarning, match="actor_rollout_ref.actor.use_dynamic_bsz"):
        load_config(["actor_rollout_ref.actor.use_dynamic_bsz=True"])
    with pytest.warns(ConfigWarning, match="'mlflow'"):
        assert load_config(["trainer.logger=[console,mlflow]"]).trainer.logger == ["console"]
    # values that are what hybridrl does anyway need no warning
    load("data.filter_overlong_prompts=True", "actor_rollout_ref.actor.strategy=fsdp2",
         "actor_rollout_ref.rollout.mode=sync", "reward_model.enable=False", "critic.ppo_micro_batch_size=null")


def test_yaml_in_verl_nested_layout(tmp_path):
    path = tmp_path / "verl.yaml"
    path.write_text(
        "data:\n  train_files: a.parquet\n  max_prompt_length: 64\n"
        "actor_rollout_ref:\n  model: {path: /m}\n  actor:\n    optim: {lr: 2.0e-6}\n    fsdp_config: {optimizer_offload: false}\n"
        "  rollout:\n    name: sglang\n    n: 3\n    engine_kwargs: {sglang: {attention_backend: fa3}}\n"
        "algorithm:\n  kl_ctrl: {kl_coef: 0.05, type: adaptive}\n"
        "custom_reward_function: {path: r.py, name: score}\n"
        "trainer:\n  project_name: p\n  experiment_name: e_${actor_rollout_ref.rollout.n}\n")
    cfg = load("actor_rollout_ref.rollout.n=2", config_file=str(path))   # overrides beat the file
    assert cfg.data.train_files == ["a.parquet"] and cfg.data.max_prompt_length == 64
    assert cfg.model.path == "/m" and cfg.actor.lr == 2e-6 and cfg.actor.optimizer_offload is False
    assert cfg.rollout.name == "sglang" and cfg.rollout.n == 2
    assert cfg.rollout.engine_kwargs == {"sglang": {"attention_backend": "fa3"}}
    assert (cfg.algorithm.kl_coef, cfg.algorithm.kl_ctrl_type) == (0.05, "adaptive")
    assert (cfg.reward.custom_path, cfg.reward.custom_name) == ("r.py", "score")
    assert cfg.trainer.default_local_dir == "runs/p/e_2"


def test_bad_yaml_files(tmp_path):
    with pytest.raises(HybridRLError, match="config file not found"):
        load_config([], str(tmp_path / "missing.yaml"))
    (tmp_path / "bad.yaml").write_text("data: [unclosed\n")
    with pytest.raises(HybridRLError, match="not valid YAML"):
        load_config([], str(tmp_path / "bad.yaml"))
    (tmp_path / "typo.yaml").write_text("rollout:\n  temprature: 0.5\n")
    with pytest.raises(HybridRLError, match="rollout.temperature"):
        load_config([], str(tmp_path / "typo.yaml"))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(EXAMPLES, "*.yaml"))), ids=os.path.basename)
def test_every_example_loads(path):
    cfg = load(config_file=path)
    assert isinstance(cfg, Config)
    assert load_config([], path) == from_dict(to_dict(cfg))   # round trip through a dict


def test_examples_say_what_they_are():
    assert load(config_file=os.path.join(EXAMPLES, "default.yaml")) == Config()
    assert load(config_file=os.path.join(EXAMPLES, "gsm8k_grpo.yaml")).rollout.name == "sglang"
    assert load(config_file=os.path.join(EXAMPLES, "ppo_critic.yaml")).algorithm.adv_estimator == "gae"


def test_to_yaml_round_trips(tmp_path):
    cfg = load("rollout.n=3", "trainer.project_name=q")
    (tmp_path / "c.yaml").write_text(to_yaml(cfg))
    assert load(config_file=str(tmp_path / "c.yaml")) == cfg
    (tmp_path / "d.yaml").write_text(to_yaml(cfg, comments=True))
    assert load(config_file=str(tmp_path / "d.yaml")) == cfg
    assert "# samples per prompt" in to_yaml(cfg, comments=True)


def test_accepted_verl_keys_do_not_hide_our_fields():
    """A verl key in the 'accepted, ignored' table must not shadow a field we have (e.g. after one is added)."""
    from hybridrl import config_verl
    ours = set(all_keys())
    for key in config_verl.ACCEPTED:
        for verl, mine in config_verl.VERL_PREFIXES:
            if key.startswith(verl) and key != "actor_rollout_ref.rollout.mode":   # verl's sync|async, not ours
                assert mine + key[len(verl):] not in ours, key


def test_default_yaml_lists_every_field():
    from hybridrl import config_verl
    listed = {key for key, _ in config_verl.flatten(config_verl.read_yaml(os.path.join(EXAMPLES, "default.yaml")))}
    missing = set(all_keys()) - listed
    assert not missing, f"examples/default.yaml lacks {sorted(missing)}: regenerate it with `hybridrl config show --comments`"


def test_nccl_is_the_disaggregated_mode_only():
    """weight_sync=nccl trains with an sglang server on GPUs of its own; with a sleeping (colocated) engine it is
    refused before anything starts, naming both settings and the fix."""
    ok = load("rollout.name=sglang", "rollout.weight_sync=nccl")
    assert ok.rollout.weight_sync == "nccl" and ok.rollout.free_cache_engine is False
    with pytest.raises(HybridRLError, match="rollout.free_cache_engine=false"):
        load_config(["rollout.name=sglang", "rollout.weight_sync=nccl", "rollout.free_cache_engine=true"])


def test_critic_mini_batch_follows_the_actor_unless_set():
    assert load().critic.ppo_mini_batch_size == -1
    assert load("critic.ppo_mini_batch_size=2", "critic.ppo_max_token_len_per_gpu=512").critic.ppo_max_token_len_per_gpu == 512


# the multi-GPU command lines of verl's SGLang documentation (Qwen2-7B on 4 GPUs with TP 2 and offload;
# Llama-3.1-8B on 2 nodes x 8 GPUs with TP 16 across them), module name changed, data paths shortened
SEED_4_GPU = """data.train_files=gsm8k/train.parquet data.val_files=gsm8k/test.parquet data.train_batch_size=4096
data.max_prompt_length=4096 data.max_response_length=4096 actor_rollout_ref.rollout.name=sglang
actor_rollout_ref.model.path=Qwen/Qwen2-7B-Instruct actor_rollout_ref.actor.optim.lr=1e-6
actor_rollout_ref.actor.ppo_mini_batch_size=64 actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4
actor_rollout_ref.model.enable_gradient_checkpointing=True actor_rollout_ref.actor.fsdp_config.param_offload=True
actor_rollout_ref.actor.fsdp_config.optimizer_offload=True actor_rollout_ref.rollout.tensor_model_parallel_size=2
actor_rollout_ref.rollout.gpu_memory_utilization=0.8 actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4
critic.optim.lr=1e-5 critic.model.path=Qwen/Qwen2-7B-Instruct critic.ppo_micro_batch_size_per_gpu=4
critic.model.fsdp_config.param_offload=True critic.model.fsdp_config.optimizer_offload=True
algorithm.kl_ctrl.kl_coef=0.001 trainer.logger=console trainer.val_before_train=False trainer.n_gpus_per_node=4
trainer.nnodes=1 trainer.save_freq=-1 trainer.test_freq=10 trainer.total_epochs=15""".split()
SEED_16_GPU = """data.train_files=gsm8k/train.parquet data.val_files=gsm8k/test.parquet data.train_batch_size=4096
data.max_prompt_length=4096 data.max_response_length=4096 actor_rollout_ref.rollout.name=sglang
actor_rollout_ref.model.path=meta-llama/Llama-3.1-8B-Instruct actor_rollout_ref.actor.optim.lr=1e-6
actor_rollout_ref.actor.ppo_mini_batch_size=64 actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4
actor_rollout_ref.model.enable_gradient_checkpointing=True actor_rollout_ref.actor.fsdp_config.param_offload=True
actor_rollout_ref.actor.fsdp_config.optimizer_offload=True actor_rollout_ref.rollout.tensor_model_parallel_size=16
actor_rollout_ref.rollout.gpu_memory_utilization=0.8 actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4
critic.optim.lr=1e-5 critic.model.path=meta-llama/Llama-3.1-8B-Instruct critic.ppo_micro_batch_size_per_gpu=4
critic.model.fsdp_config.param_offload=True critic.model.fsdp_config.optimizer_offload=True
algorithm.kl_ctrl.kl_coef=0.001 trainer.logger=console trainer.val_before_train=False trainer.n_gpus_per_node=8
trainer.nnodes=2 trainer.save_freq=-1 trainer.test_freq=10 trainer.total_epochs=15""".split()


@pytest.mark.parametrize("line", [SEED_4_GPU, SEED_16_GPU], ids=["4gpu", "16gpu"])
def test_seed_multi_gpu_lines_load_with_nothing_unimplemented(line, capsys):
    from hybridrl.cli import main
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert main(["config", "show", *line]) == 0
    for key in ("n_gpus_per_node", "nnodes", "tensor_model_parallel_size", "param_offload", "optimizer_offload"):
        assert not any(key in str(w.message) and "not implemented" in str(w.message) for w in record), key
    cfg = load_config(line)
    assert cfg.actor.param_offload and cfg.actor.optimizer_offload and cfg.critic.param_offload
    assert cfg.trainer.n_gpus_per_node * cfg.trainer.nnodes in (4, 16)
