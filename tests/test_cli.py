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


def test_handlers_get_the_config(monkeypatch):
    """train / generate / serve / prepare-* call their module's function with the right arguments."""
    import importlib
    import types
    calls = {}
    fake = {"hybridrl.train": {"train": lambda cfg: calls.update(train=cfg)},
            "hybridrl.generate": {"generate": lambda cfg: calls.update(generate=cfg)},
            "hybridrl.rollout.native.server": {"serve": lambda cfg, host, port: calls.update(serve=(cfg, host, port))},
            "hybridrl.data": {"prepare_gsm8k": lambda out: calls.update(gsm8k=out),
                              "prepare_reasoning_gym": lambda *a, **k: calls.update(rg=(a, k))},
            "hybridrl.models": {"prepare_smollm2": lambda out: calls.update(smollm2=out)}}
    for name, attrs in fake.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, module)
        parent, _, child = name.rpartition(".")
        monkeypatch.setattr(importlib.import_module(parent), child, module, raising=False)
    assert cli.main(["train", "actor_rollout_ref.rollout.n=2"]) == 0 and calls["train"].rollout.n == 2
    from hybridrl import main_generation, main_ppo
    assert main_ppo.main(["actor_rollout_ref.actor.optim.lr=4e-6"]) == 0 and calls["train"].actor.lr == 4e-6
    assert main_generation.main(["data.n_samples=3", "rollout.temperature=0"]) == 0
    assert calls["generate"].data.n_samples == 3 and calls["generate"].rollout.temperature == 0
    assert cli.main(["serve", "--port", "31000", "rollout.n=1"]) == 0 and calls["serve"][1:] == ("127.0.0.1", 31000)
    assert cli.main(["prepare-data", "gsm8k", "--out", "d"]) == 0 and calls["gsm8k"] == "d"
    assert cli.main(["prepare-data", "reasoning-gym", "--task", "countdown", "--size", "5", "--out", "r",
                     "--seed", "3", "--val-size", "2"]) == 0
    assert calls["rg"] == (("countdown", 5, "r"), {"seed": 3, "val_size": 2})
    assert cli.main(["prepare-model", "smollm2", "--out", "m"]) == 0 and calls["smollm2"] == "m"

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
