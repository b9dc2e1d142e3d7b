"""trainer.nnodes=2 through the Ray launcher (hybridrl/ray_launch.py) on a private one-machine Ray cluster, CPU.

Skips without `ray` (pip install 'hybridrl[ray]'). HYBRIDRL_RAY_LOCAL=1 makes the launcher start (and stop) its
own cluster in this process instead of joining one made by `ray start`."""
import json
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402

ray = pytest.importorskip("ray")

from hybridrl import HybridRLError  # noqa: E402
from hybridrl.config import load_config  # noqa: E402

REWARD = '''
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    return {"score": (len(solution_str) % 5) / 4.0}
'''


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    d = tmp_path_factory.mktemp("task")
    rows = [{"prompt": [{"role": "user", "content": f"What is {a} plus {b}?"}], "data_source": "toy",
             "ability": "math", "reward_model": {"style": "rule", "ground_truth": str(a + b)},
             "extra_info": {"index": a * 10 + b}} for a in range(4) for b in range(4)]
    (d / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (d / "reward.py").write_text(REWARD)
    return d


def overrides(task, model_dir, run_dir, *extra):
    return [f"model.path={model_dir}", f"data.train_files=[{task}/train.jsonl]", "data.val_files=[]",
            f"reward.custom_path={task}/reward.py", "data.train_batch_size=4", "actor.ppo_mini_batch_size=2",
            "actor.ppo_micro_batch_size_per_gpu=4", "rollout.n=2", "rollout.response_length=8",
            "data.max_prompt_length=64", "trainer.val_before_train=false", "trainer.logger=[jsonl]",
            f"trainer.default_local_dir={run_dir}", "rollout.kv_block_size=16", "trainer.total_training_steps=2",
            "trainer.nnodes=2", "trainer.n_gpus_per_node=1", *extra]


@pytest.fixture
def local_ray(monkeypatch):
    if ray.is_initialized():
        pytest.skip("Ray is already initialised in this process")
    monkeypatch.setenv("HYBRIDRL_RAY_LOCAL", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    auth = os.environ.get("RAY_AUTH_MODE")   # ray.init sets it in this process's environment: put it back after
    yield
    if auth is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = auth
    assert not ray.is_initialized()          # the launcher stopped the cluster it started


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_two_nodes_on_ray_run_grpo_steps(task, tiny_qwen2_dir, tmp_path, local_ray):
    from hybridrl.train import train
    run = tmp_path / "run"
    out = train(load_config(overrides(task, tiny_qwen2_dir, run, "trainer.device=cpu")))
    steps = [json.loads(line)["step"] for line in open(out["metrics"])]
    assert steps == [1, 2]
    assert out["checkpoint"] == str(run / "checkpoints" / "step_000002")
    assert json.loads((run / "checkpoints" / "step_000002" / "state.json").read_text())["world_size"] == 2
    assert "export" in out and (run / "actor_hf").is_dir()   # only rank 0 exports: the result is rank 0's


FAIL_ON_RANK_1 = '''
import os
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    if os.environ.get("RANK") == "1":
        raise RuntimeError("boom on rank 1")
    return {"score": 0.5}
'''


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_failing_rank_stops_the_others_with_its_message(task, tiny_qwen2_dir, tmp_path, local_ray):
    """Rank 1's reward raises at step 1 while rank 0 waits for it on a collective: the launcher kills rank 0 at
    once and raises rank 1's one line (not a collective's timeout much later)."""
    import time
    from hybridrl.train import train
    (tmp_path / "reward.py").write_text(FAIL_ON_RANK_1)
    cfg = load_config(overrides(task, tiny_qwen2_dir, tmp_path / "run", "trainer.device=cpu",
                                f"reward.custom_path={tmp_path}/reward.py"))
    start = time.monotonic()
    with pytest.raises(HybridRLError, match=r"^rank 1: .*boom on rank 1"):
        train(cfg)
    assert time.monotonic() - start < 90


def test_gpu_run_without_gpus_is_a_clear_error(task, tiny_qwen2_dir, tmp_path, local_ray):
    from hybridrl.train import train
    cfg = load_config(overrides(task, tiny_qwen2_dir, tmp_path / "run", "trainer.device=cuda"))
    with pytest.raises(HybridRLError, match=r"needs 2 Ray nodes with 1 GPUs.*trainer\.device=cpu"):
        train(cfg)


def test_no_cluster_names_ray_start(task, tiny_qwen2_dir, tmp_path, monkeypatch):
    from hybridrl.ray_launch import launch_on_ray
    monkeypatch.delenv("HYBRIDRL_RAY_LOCAL", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)

    def no_cluster(**kw):
        raise ConnectionError("Could not find any running Ray instance.")
    monkeypatch.setattr(ray, "init", no_cluster)
    cfg = load_config(overrides(task, tiny_qwen2_dir, tmp_path / "run", "trainer.device=cpu"))
    with pytest.raises(HybridRLError, match=r"ray start --head .*ray start --address="):
        launch_on_ray(cfg)


def test_without_ray_is_a_clear_error(task, tiny_qwen2_dir, tmp_path, monkeypatch):
    from hybridrl.ray_launch import launch_on_ray
    monkeypatch.setitem(sys.modules, "ray", None)                # `import ray` now raises ImportError
    cfg = load_config(overrides(task, tiny_qwen2_dir, tmp_path / "run", "trainer.device=cpu"))
    with pytest.raises(HybridRLError, match=r"trainer\.nnodes=2 needs Ray: pip install 'hybridrl\[ray\]'"):
        launch_on_ray(cfg)
