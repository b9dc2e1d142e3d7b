"""The `hybridrl` command: config show with verl keys, error exits without tracebacks, handler dispatch."""
import os
import subprocess
import sys

import pytest

from hybridrl import HybridRLError, cli
from test_config import VERL_CASES

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_config_show_prints_every_mapped_verl_key(capsys):
    assert cli.main(["config", "show", *[case[0] for case in VERL_CASES]]) == 0
    out = capsys.readouterr().out
    assert "rollout:\n" in out and "  n: 5\n" in out            # the resolved YAML
    assert "mapped: actor_rollout_ref.actor.optim.lr -> actor.lr = 3e-06" in out
    assert "mapped: critic.model.path -> critic.model_path = '/models/critic'" in out
    assert "mapped: algorithm.kl_ctrl.kl_coef -> algorithm.kl_coef = 0.02" in out
    assert "mapped: custom_reward_function.name -> reward.custom_name = 'my_score'" in out
    assert "mapped: actor_rollout_ref.rollout.response_length -> rollout.response_length = 300" in out
    for override, ours, want in VERL_CASES:
        key = override.split("=")[0]
        if key != ours:
            assert f"mapped: {key} -> {ours} = {want!r}" in out


def test_config_show_overrides_after_options(capsys, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("rollout:\n  n: 3\n")
    assert cli.main(["config", "show", "rollout.temperature=0.5", "--config", str(path), "actor.lr=2e-6"]) == 0
    out = capsys.readouterr().out
    assert "  n: 3\n" in out and "temperature: 0.5" in out and "lr: 2.0e-06" in out
    assert cli.main(["config", "show", "--config-path", str(tmp_path), "--config-name", "c"]) == 0   # Hydra's form
    assert "  n: 3\n" in capsys.readouterr().out


def test_bad_key_exits_2_with_one_line(capsys):
    assert cli.main(["config", "show", "rollout.temprature=0.3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown config key 'rollout.temprature'") and "rollout.temperature" in err
    assert cli.main(["config", "show", "data.train_batch_size=lots"]) == 2
    assert "expected int" in capsys.readouterr().err


def test_warnings_print_as_one_line(capsys):
    assert cli.main(["config", "show", "trainer.default_hdfs_dir=hdfs://x"]) == 0
    assert "warning: accepted but not implemented yet: trainer.default_hdfs_dir" in capsys.readouterr().err


def test_argparse_errors():
    with pytest.raises(SystemExit) as e:
        cli.main(["frobnicate"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        cli.main(["config", "show", "--bogus"])


@pytest.fixture
def calls(monkeypatch):
    """Fake handler modules: record what the CLI passes to train / generate / serve / prepare-*."""
    import importlib
    import types
    calls = {}
    fake = {"hybridrl.train": {"train": lambda cfg: calls.update(train=cfg)},
            "hybridrl.generate": {"generate": lambda cfg: calls.update(generate=cfg)},
            "hybridrl.rollout.native.server": {"serve": lambda cfg, host, port: calls.update(serve=(cfg, host, port))},
            "hybridrl.data": {"prepare_gsm8k": lambda out, multi_turn=False: calls.update(gsm8k=out, multi_turn=multi_turn) or f"{out}/test.parquet",
                              "prepare_reasoning_gym": lambda *a, **k: calls.update(rg=(a, k)) or {"train": "t.parquet"}},
            "hybridrl.models": {"prepare_smollm2": lambda out: calls.update(smollm2=out) or out}}
    for name, attrs in fake.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, module)
        parent, _, child = name.rpartition(".")
        monkeypatch.setattr(importlib.import_module(parent), child, module, raising=False)
    return calls


# verl's quick-start PPO command (docs/start/quickstart.rst), arguments unchanged
VERL_QUICKSTART = """data.train_files=~/data/gsm8k/train.parquet data.val_files=~/data/gsm8k/test.parquet
data.train_batch_size=256 data.max_prompt_length=512 data.max_response_length=256
actor_rollout_ref.model.path=Qwen/Qwen2.5-0.5B-Instruct actor_rollout_ref.actor.optim.lr=1e-6
actor_rollout_ref.actor.ppo_mini_batch_size=64 actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4
actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8 actor_rollout_ref.rollout.tensor_model_parallel_size=1
actor_rollout_ref.rollout.gpu_memory_utilization=0.4 actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=4
critic.optim.lr=1e-5 critic.model.path=Qwen/Qwen2.5-0.5B-Instruct critic.ppo_micro_batch_size_per_gpu=4
algorithm.kl_ctrl.kl_coef=0.001 trainer.logger=console trainer.val_before_train=False trainer.n_gpus_per_node=1
trainer.nnodes=1 trainer.save_freq=10 trainer.test_freq=10 trainer.total_epochs=15""".split()


def test_verl_quickstart_runs_through_main_ppo(calls):
    from hybridrl import main_ppo
    assert main_ppo.main(VERL_QUICKSTART) == 0
    cfg = calls["train"]
    assert cfg.algorithm.adv_estimator == "gae" and cfg.rollout.n == 1      # verl's defaults, not ours
    assert cfg.critic.model_path == "Qwen/Qwen2.5-0.5B-Instruct" and cfg.critic.lr == 1e-5
    assert cfg.rollout.response_length == 256 and cfg.trainer.logger == ["console"]
    assert main_ppo.main(["algorithm.adv_estimator=grpo", "actor_rollout_ref.rollout.n=8"]) == 0
    assert (calls["train"].algorithm.adv_estimator, calls["train"].rollout.n) == ("grpo", 8)


def test_handlers_get_the_config(calls, capsys):
    """train / generate / serve / prepare-* call their module's function with the right arguments."""
    assert cli.main(["train", "actor_rollout_ref.rollout.n=2"]) == 0 and calls["train"].rollout.n == 2
    from hybridrl import main_generation, main_ppo
    assert calls["train"].algorithm.adv_estimator == "grpo"                 # `hybridrl train`: our defaults
    assert main_ppo.main(["actor_rollout_ref.actor.optim.lr=4e-6"]) == 0 and calls["train"].actor.lr == 4e-6
    assert main_generation.main(["data.n_samples=3", "rollout.temperature=0"]) == 0
    assert calls["generate"].data.n_samples == 3 and calls["generate"].rollout.temperature == 0
    assert cli.main(["serve", "--port", "31000", "rollout.n=1"]) == 0 and calls["serve"][1:] == ("127.0.0.1", 31000)
    assert cli.main(["prepare-data", "gsm8k", "--out", "d"]) == 0 and calls["gsm8k"] == "d"
    assert calls["multi_turn"] is False
    assert cli.main(["prepare-data", "gsm8k", "--multi-turn", "--out", "d"]) == 0 and calls["multi_turn"] is True
    assert cli.main(["prepare-data", "reasoning-gym", "--task", "countdown", "--size", "5", "--out", "r",
                     "--seed", "3", "--val-size", "2"]) == 0
    assert calls["rg"] == (("countdown", 5, "r"), {"seed": 3, "val_size": 2})
    assert cli.main(["prepare-model", "smollm2", "--out", "m"]) == 0 and calls["smollm2"] == "m"
    assert "wrote d/test.parquet\nwrote t.parquet\nwrote m\n" in capsys.readouterr().out

    def boom(cfg):
        raise HybridRLError("model path /nope has no config.json")
    sys.modules["hybridrl.train"].train = boom
    assert cli.main(["train"]) == 2


def test_subprocess_bad_key_no_traceback_and_no_torch():
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    bad = subprocess.run([sys.executable, "-m", "hybridrl.cli", "config", "show", "bad.key=1"],
                         capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert bad.returncode == 2, bad.stderr
    assert "Traceback" not in bad.stderr and "error: unknown config key 'bad.key'" in bad.stderr
    code = "import sys; from hybridrl.cli import main; main(['config', 'show']); print('torch' in sys.modules)"
    ok = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip().endswith("False")          # `config show` never imports torch
