"""Data-parallel training on CPU over gloo, started by `hybridrl train trainer.n_gpus_per_node=2`: the same
seed on 1 and 2 ranks gives the same rewards and close losses, a 2-rank sharded checkpoint resumes on 1 rank,
and `hybridrl merge` turns a sharded checkpoint into a Hugging Face folder with the export's logits.

One 2-rank run (~40 s on 2 cores) checks all of it; the balancing and the loss divisor have unit tests here too.
"""
import json

import pytest
import torch

from hybridrl import HybridRLError
from hybridrl.config import load_config

REWARD = '''
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    return (len(solution_str) % 5) / 4.0
'''


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    d = tmp_path_factory.mktemp("dtask")
    rows = [{"prompt": [{"role": "user", "content": f"What is {a} plus {b}?"}], "data_source": "toy",
             "reward_model": {"ground_truth": str(a + b)}} for a in range(4) for b in range(4)]
    (d / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (d / "reward.py").write_text(REWARD)
    return d


def overrides(task, model_dir, run_dir, *extra):
    return [f"model.path={model_dir}", f"data.train_files=[{task}/train.jsonl]", f"reward.custom_path={task}/reward.py",
            "data.train_batch_size=4", "actor.ppo_mini_batch_size=2", "actor.ppo_micro_batch_size_per_gpu=2",
            "rollout.n=3", "rollout.response_length=10", "data.max_prompt_length=64", "actor.lr=1e-3",
            "trainer.device=cpu", "trainer.val_before_train=false", "trainer.logger=[jsonl]", "trainer.test_freq=-1",
            f"trainer.default_local_dir={run_dir}", "rollout.kv_block_size=16", *extra]


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_ranks_match_one_and_checkpoints_move_between_rank_counts(task, tiny_qwen2_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from hybridrl.cli import main
    from hybridrl.train import train
    two, one, resumed = tmp_path / "two", tmp_path / "one", tmp_path / "resumed"
    out2 = train(load_config(overrides(task, tiny_qwen2_dir, two, "trainer.n_gpus_per_node=2",
                                       "trainer.total_training_steps=3", "trainer.save_freq=2")))
    out1 = train(load_config(overrides(task, tiny_qwen2_dir, one, "trainer.total_training_steps=3")))
    r2, r1 = rows(two), rows(one)
    assert [r["step"] for r in r2] == [1, 2, 3]
    for a, b in zip(r1, r2):     # the same samples (per-request seeds), so the same rewards; updates close
        assert a["reward/mean"] == b["reward/mean"] and a["response_length/mean"] == b["response_length/mean"]
        # the gradient is the global mini-batch's on any rank count (pg_loss, a mean of micro-batch means, is not)
        assert a["actor/grad_norm"] == pytest.approx(b["actor/grad_norm"], rel=1e-3)
    w1, w2 = load_file(out1["export"] + "/model.safetensors"), load_file(out2["export"] + "/model.safetensors")
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=2e-5, rtol=0, msg=k)
    state = json.loads((two / "checkpoints" / "step_000002" / "state.json").read_text())
    assert state["world_size"] == 2 and state["sharded"] is True

    # the 2-rank step-2 checkpoint resumes on 1 rank; its step 3 matches the 2-rank run's step 3
    resumed.mkdir()
    out = train(load_config(overrides(task, tiny_qwen2_dir, resumed, "trainer.total_training_steps=3",
                                      "trainer.resume_mode=resume_path",
                                      f"trainer.resume_from_path={two}/checkpoints/step_000002")))
    r3 = rows(resumed)
    assert [r["step"] for r in r3] == [3]
    assert r3[0]["reward/mean"] == r2[2]["reward/mean"]
    w3 = load_file(out["export"] + "/model.safetensors")
    for k in w1:
        torch.testing.assert_close(w3[k], w2[k], atol=2e-5, rtol=0, msg=k)

    # hybridrl merge: the sharded step-3 checkpoint of the 2-rank run as one HF folder, the export's logits
    merged = tmp_path / "merged"
    assert main(["merge", "--checkpoint", f"{two}/checkpoints/step_000003", "--out", str(merged)]) == 0
    ids = torch.tensor([[1, 5, 9, 200, 7]])
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(str(merged)).eval()(input_ids=ids).logits
        b = AutoModelForCausalLM.from_pretrained(out2["export"]).eval()(input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert (merged / "tokenizer.json").exists() or (merged / "tokenizer_config.json").exists()


def test_ranks_must_divide_the_batch(task, tiny_qwen2_dir, tmp_path):
    with pytest.raises(HybridRLError, match="multiple of the number of ranks.*= 3"):
        load_config(overrides(task, tiny_qwen2_dir, tmp_path, "trainer.n_gpus_per_node=3"))


def test_balance_keeps_groups_whole_and_evens_tokens():
    from hybridrl.parallel import balanced_groups
    from hybridrl.types import Sample
    samples = []
    for g, n in enumerate([9, 1, 1, 7, 2, 8]):          # response tokens per sample of each group
        for _ in range(2):
            s = Sample(prompt_ids=[1], group=g)
            s.append([5] * n)
            samples.append(s)
    parts = balanced_groups(samples, 2)
    assert [len(p) for p in parts] == [3, 3]
    assert sorted(s.group for p in parts for g in p for s in g) == sorted(s.group for s in samples)
    loads = [sum(len(s.response_ids) + 1 for g in p for s in g) for p in parts]
    assert sorted(loads) == [30, 38]     # groups of 20, 18, 16, 6, 4, 4 tokens, 3 per rank: the best split is 30 / 38
    assert all(len({s.group for s in g}) == 1 and len(g) == 2 for p in parts for g in p)
    with pytest.raises(HybridRLError, match="6 prompt groups cannot be split evenly over 4 ranks"):
        balanced_groups(samples, 4)


def test_two_ranks_share_one_tensor_parallel_replica(task, tiny_qwen2_dir, tmp_path, monkeypatch):
    """rollout.tensor_model_parallel_size=2 over 2 ranks: one server (started by rank 0, the replica's leader),
    both ranks send it their requests, only the leader pushes weights and sleeps it, after a barrier. The server
    here is `hybridrl serve`'s (SGLang's HTTP API on CPU) in place of `python -m sglang.launch_server`."""
    import sys
    from hybridrl.train import train
    monkeypatch.setenv("HYBRIDRL_SGLANG_CMD", f"{sys.executable} -m hybridrl.rollout.native.server")
    run = tmp_path / "tp"
    train(load_config(overrides(task, tiny_qwen2_dir, run, "trainer.n_gpus_per_node=2", "rollout.name=sglang",
                                "actor_rollout_ref.rollout.tensor_model_parallel_size=2",
                                "rollout.free_cache_engine=true", "trainer.total_training_steps=2")))
    r = rows(run)
    assert [x["step"] for x in r] == [1, 2]
    assert all(x["rollout/stale_fraction"] == 0.0 for x in r)       # every sample from the pushed version
    assert [x["perf/weight_version"] for x in r] == [2, 3]
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("replica")) == ["replica0"]
    log = (run / "replica0" / "sglang_server.log").read_text()
    assert "/generate" in log or log != ""


def test_replica_placement():
    from hybridrl.rollout.sglang.replicas import place
    import os
    env = dict(os.environ)
    try:
        os.environ.update(LOCAL_WORLD_SIZE="4")
        got = []
        for rank in range(8):                       # 2 nodes x 4 GPUs, TP 2: replicas 0..3
            os.environ["LOCAL_RANK"] = str(rank % 4)
            got.append(place(rank, 8, 2, False, rank % 4))
        assert [g.index for g in got] == [0, 0, 1, 1, 2, 2, 3, 3]
        assert [g.leader for g in got] == [True, False] * 4
        assert [g.leader_rank for g in got] == [0, 0, 2, 2, 4, 4, 6, 6]
        assert [g.base_gpu_id for g in got if g.leader] == [0, 2, 0, 2]
        with pytest.raises(HybridRLError, match="must divide the ranks per node"):
            place(0, 8, 8, False, 0)                # TP across nodes
        assert place(3, 8, 2, True, None).leader is False and place(0, 8, 2, True, None).leader
    finally:
        os.environ.clear()
        os.environ.update(env)
