"""The RL loop on a tiny random model, on CPU: rl_step, weight sync, resume, PPO with a critic, bad input."""
import asyncio
import json

import pytest
import torch
from safetensors.torch import load_file

from hybridrl import HybridRLError
from hybridrl.config import load_config

REWARD = '''
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    # varied, deterministic rewards so GRPO groups have non-zero advantages
    return {"score": (len(solution_str) % 5) / 4.0, "length": len(solution_str)}
'''


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    d = tmp_path_factory.mktemp("task")
    rows = [{"prompt": [{"role": "user", "content": f"What is {a} plus {b}?"}], "data_source": "toy",
             "ability": "math", "reward_model": {"style": "rule", "ground_truth": str(a + b)},
             "extra_info": {"index": a * 10 + b}} for a in range(4) for b in range(4)]
    (d / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (d / "val.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:4]))
    (d / "reward.py").write_text(REWARD)
    return d


def overrides(task, model_dir, run_dir, *extra):
    return [f"model.path={model_dir}", f"data.train_files=[{task}/train.jsonl]",
            f"data.val_files=[{task}/val.jsonl]", f"reward.custom_path={task}/reward.py",
            "data.train_batch_size=4", "actor.ppo_mini_batch_size=2", "actor.ppo_micro_batch_size_per_gpu=4",
            "rollout.n=4", "rollout.response_length=12", "data.max_prompt_length=64", "actor.lr=1e-3",
            "trainer.device=cpu", "trainer.val_before_train=false", "trainer.logger=[jsonl]",
            f"trainer.default_local_dir={run_dir}", "rollout.kv_block_size=16", *extra]


def build_ctx(cfg):
    from hybridrl.rewards import load_reward_fn
    from hybridrl.rollout.base import engine_class
    from hybridrl.step import RLContext
    from hybridrl.train import load_inputs, make_kl_ctrl
    from hybridrl.trainer.actor import Policy
    model_path, tok, prompts, _ = load_inputs(cfg)
    n = cfg.rollout.response_length
    actor = Policy(model_path, cfg.model, cfg.actor, torch.device("cpu"), n)
    ref = Policy(model_path, cfg.model, cfg.actor, torch.device("cpu"), n, trainable=False)
    engine = engine_class("native").from_config(cfg, model_path=model_path)
    return RLContext(cfg, engine, actor, tok, load_reward_fn(cfg.reward), ref=ref, kl_ctrl=make_kl_ctrl(cfg)), prompts


def test_three_steps_change_every_parameter_and_sync(task, tiny_qwen2_dir, tmp_path):
    from hybridrl.rollout.agent import rollout
    from hybridrl.rollout.base import SamplingParams
    from hybridrl.step import rl_step, sync_weights
    from hybridrl.trainer.batch import collate
    cfg = load_config(overrides(task, tiny_qwen2_dir, tmp_path, "actor.use_kl_loss=true", "actor.tis_threshold=2.0",
                                      "rollout.use_rollout_log_probs=false"))

    async def run():
        ctx, prompts = build_ctx(cfg)
        before = {k: v.clone() for k, v in ctx.actor.named_weights()}
        await sync_weights(ctx)
        metrics = [await rl_step(ctx, prompts[4 * i:4 * i + 4], step=i + 1) for i in range(3)]
        # the engine now serves the trained weights: its log-probs equal the trainer's
        samples = await rollout(ctx.engine, prompts[:4], SamplingParams(max_new_tokens=8, temperature=1.0, seed=3),
                                ctx.tokenizer)
        batch = collate(samples, ctx.tokenizer.pad_token_id)
        train_logp, _ = ctx.actor.log_probs(batch, temperature=1.0)
        await ctx.engine.close()
        return ctx, before, metrics, samples, batch, train_logp

    ctx, before, metrics, samples, batch, train_logp = asyncio.run(run())
    unchanged = [k for k, p in ctx.actor.named_weights() if torch.equal(before[k], p)]
    assert unchanged == []
    for m in metrics:
        bad = {k: v for k, v in m.items() if not torch.isfinite(torch.tensor(float(v)))}
        assert bad == {}
    assert ctx.version == 4 and all(s.weight_version == 4 for s in samples)
    mask = batch.response_mask.bool()
    assert torch.allclose(train_logp[mask], batch.rollout_logp[mask], atol=1e-4)
    assert {"timing/gen", "timing/update", "timing/sync", "actor/pg_loss", "rollout/rollout_probs_diff_mean",
            "actor/kl_loss", "reward/toy/mean"} <= set(metrics[-1])


def params_of(path):
    return load_file(str(path / "actor_hf" / "model.safetensors"))


def test_resume_matches_uninterrupted_run(task, tiny_qwen2_dir, tmp_path):
    from hybridrl.train import train
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(load_config(overrides(task, tiny_qwen2_dir, straight, "trainer.total_training_steps=6")))
    train(load_config(overrides(task, tiny_qwen2_dir, split, "trainer.total_training_steps=4",
                                "trainer.save_freq=2")))
    out = train(load_config(overrides(task, tiny_qwen2_dir, split, "trainer.total_training_steps=6")))
    a, b = params_of(straight), params_of(split)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (split / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert (split / "reward_curve.png").stat().st_size > 1000 and out["checkpoint"].endswith("step_000006")


def test_ppo_with_critic_end_to_end(task, tiny_llama_dir, tmp_path):
    from hybridrl.train import train
    out = train(load_config(overrides(task, tiny_llama_dir, tmp_path, "algorithm.adv_estimator=gae",
                                      "trainer.total_training_steps=2", "algorithm.lam=0.95")))
    rows = [json.loads(line) for line in open(out["metrics"])]
    assert "critic/vf_loss" in rows[-1] and torch.isfinite(torch.tensor(rows[-1]["critic/vf_loss"]))
    assert "val/reward/mean" in rows[-1]


def test_resume_path_missing_and_unwritable_dir(task, tiny_qwen2_dir, tmp_path):
    from hybridrl.train import train
    cfg = load_config(overrides(task, tiny_qwen2_dir, tmp_path / "r", "trainer.resume_mode=resume_path",
                                f"trainer.resume_from_path={tmp_path}/nope"))
    with pytest.raises(HybridRLError, match="resume_from_path"):
        train(cfg)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(HybridRLError, match="default_local_dir"):
        train(load_config(overrides(task, tiny_qwen2_dir, blocker / "run")))


def test_nan_loss_skips_then_stops(task, tiny_qwen2_dir, tmp_path):
    from hybridrl.trainer.actor import Policy
    from hybridrl.trainer.batch import collate
    from hybridrl.types import Sample
    cfg = load_config(overrides(task, tiny_qwen2_dir, tmp_path, "actor.max_nan_steps=2"))
    policy = Policy(tiny_qwen2_dir, cfg.model, cfg.actor, torch.device("cpu"), 12)
    s = Sample(prompt_ids=[1, 2, 3])
    s.append([4, 5], [-1.0, -1.0])
    batch = collate([s, s], pad_id=0)
    old = torch.zeros(2, 2)
    before = [p.clone() for _, p in policy.named_weights()]
    policy.update(batch, old, torch.full((2, 2), float("nan")), None, 1.0)   # skipped, logged
    assert all(torch.equal(a, b) for a, (_, b) in zip(before, policy.named_weights()))
    with pytest.raises(HybridRLError, match="non-finite"):
        policy.update(batch, old, torch.full((2, 2), float("nan")), None, 1.0)


def test_truncated_and_equal_reward_steps_warn(capsys):
    from hybridrl.train import warn_step
    warn_step({"response_length/clip_ratio": 1.0, "reward/std": 0.0, "reward/mean": 0.0}, step=3)
    err = capsys.readouterr().out + capsys.readouterr().err
    assert "every response hit rollout.response_length" in err and "all rewards equal" in err
    warn_step({"response_length/clip_ratio": 0.5, "reward/std": 0.3}, step=4)
    assert capsys.readouterr().out == ""


def test_all_equal_rewards_give_zero_advantage_and_no_update(task, tiny_qwen2_dir, tmp_path):
    """A GRPO step whose groups all score the same moves nothing (and does not crash)."""
    from hybridrl.step import rl_step, sync_weights
    (tmp_path / "flat.py").write_text("def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n"
                                      "    return 0.5\n")
    cfg = load_config(overrides(task, tiny_qwen2_dir, tmp_path, f"reward.custom_path={tmp_path}/flat.py"))

    async def run():
        ctx, prompts = build_ctx(cfg)
        ctx.ref = None
        await sync_weights(ctx)
        before = {k: v.clone() for k, v in ctx.actor.named_weights()}
        m = await rl_step(ctx, prompts[:4], step=1)
        await ctx.engine.close()
        return ctx, before, m

    ctx, before, m = asyncio.run(run())
    assert m["reward/std"] == 0.0 and m["adv/mean"] == 0.0
    assert all(torch.equal(before[k], p) for k, p in ctx.actor.named_weights())


@pytest.mark.parametrize("estimator", ["rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "remax"])
def test_every_outcome_estimator_runs_a_step(task, tiny_qwen2_dir, tmp_path, estimator):
    from hybridrl.step import rl_step, sync_weights
    cfg = load_config(overrides(task, tiny_qwen2_dir, tmp_path, f"algorithm.adv_estimator={estimator}"))

    async def run():
        ctx, prompts = build_ctx(cfg)
        ctx.ref = None
        await sync_weights(ctx)
        m = await rl_step(ctx, prompts[:4], step=1)
        await ctx.engine.close()
        return m

    m = asyncio.run(run())
    assert torch.isfinite(torch.tensor(m["actor/pg_loss"])) and m["perf/weight_version"] == 2


def test_tracker_rewrites_steps_after_the_resumed_checkpoint(tmp_path):
    from hybridrl.tracking import Tracker, read_jsonl
    t = Tracker(["jsonl"], tmp_path, {})
    for s in (1, 2, 3):
        t.log({"reward/mean": s / 10}, s)
    Tracker(["jsonl"], tmp_path, {}, resume_step=2).log({"reward/mean": 0.9}, 3)
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    with pytest.raises(HybridRLError, match="holds the metrics of an earlier run"):
        Tracker(["jsonl"], tmp_path, {})  # a fresh run never wipes another run's log
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_checkpoints_pruned_by_step_and_fresh_run_refuses_old_folder(task, tiny_qwen2_dir, tmp_path):
    from hybridrl import checkpoint as ckpt
    from hybridrl.train import train
    run = tmp_path / "run"
    train(load_config(overrides(task, tiny_qwen2_dir, run, "trainer.total_training_steps=3", "trainer.save_freq=1")))
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_000002", "step_000003"]
    with pytest.raises(HybridRLError, match="holds checkpoints of an earlier run"):
        train(load_config(overrides(task, tiny_qwen2_dir, run, "trainer.resume_mode=disable")))


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_micro_batching_does_not_change_the_gradient(task, tiny_qwen2_dir, tmp_path, mode):
    """Gradient accumulation over micro-batches (by row count or by token budget) equals one big micro-batch."""
    from hybridrl.trainer.actor import Policy, micro_batches
    from hybridrl.trainer.batch import collate
    from hybridrl.types import Sample
    cfg = load_config(overrides(task, tiny_qwen2_dir, tmp_path, f"actor.loss_agg_mode={mode}", "actor.grad_clip=1e9"))
    policy = Policy(tiny_qwen2_dir, cfg.model, cfg.actor, torch.device("cpu"), 12)
    for g in policy.optim.opt.param_groups:
        g["lr"] = 0.0                              # parameters stay put; only gradients are compared
    policy.optim.sched.base_lrs = [0.0] * len(policy.optim.sched.base_lrs)
    samples = []
    for n in (1, 7, 3, 12):                        # very different response lengths
        s = Sample(prompt_ids=[5, 6, 7][: 1 + n % 3])
        s.append(list(range(10, 10 + n)), [-1.0] * n)
        samples.append(s)
    batch = collate(samples, pad_id=0)
    adv = torch.linspace(-1, 1, 4)[:, None].expand_as(batch.response_mask).contiguous()
    old = policy.log_probs(batch, 1.0)[0]
    norms = {}
    for name, micro, budget in (("one", 4, 10_000), ("rows", 1, 10_000), ("tokens", 4, 16)):
        policy.cfg.ppo_micro_batch_size_per_gpu, policy.cfg.ppo_max_token_len_per_gpu = micro, budget
        norms[name] = policy.update(batch, old, adv, None, 1.0)["grad_norm"]   # one group: one mini-batch
    assert norms["rows"] == pytest.approx(norms["one"], rel=1e-4)
    assert norms["tokens"] == pytest.approx(norms["one"], rel=1e-4)
    sizes = [s.stop - s.start for s, _ in micro_batches(batch, 4, 16)]
    assert sum(sizes) == 4 and len(sizes) > 1


def grouped_batch(lengths_per_group):
    from hybridrl.trainer.batch import collate
    from hybridrl.types import Sample
    samples = []
    for g, lengths in enumerate(lengths_per_group):
        for n in lengths:
            s = Sample(prompt_ids=[5, 6, 7], group=g)
            s.append(list(range(10, 10 + n)), [-1.0] * n)
            samples.append(s)
    return collate(samples, pad_id=0)


def test_mini_batches_hold_whole_prompt_groups():
    """actor.ppo_mini_batch_size counts prompts: a mini-batch holds all n samples of each of its prompts."""
    from hybridrl.trainer.actor import mini_batches
    batch = grouped_batch([[1, 2, 3], [4, 5, 6], [7, 8, 9], [2, 2, 2], [3, 3, 3]])   # 5 prompts x n=3
    minis = list(mini_batches(batch, 2))
    assert [rows.tolist() for rows, _ in minis] == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11], [12, 13, 14]]
    assert [mb.group_ids.tolist() for _, mb in minis] == [[0, 0, 0, 1, 1, 1], [2, 2, 2, 3, 3, 3], [4, 4, 4]]


def test_critic_shares_the_ppo_loop_token_budget_and_nan_guard(task, tiny_qwen2_dir, tmp_path):
    """The critic's update is the policy's loop: micro-batching by rows or token budget leaves the gradient
    unchanged, its mini-batch follows the actor's, and non-finite losses skip, then stop."""
    from hybridrl.trainer.actor import Critic
    cfg = load_config(overrides(task, tiny_qwen2_dir, tmp_path, "critic.grad_clip=1e9", "actor.max_nan_steps=2"))
    critic = Critic(tiny_qwen2_dir, cfg.model, cfg.critic, torch.device("cpu"), 12, "token-mean",
                    cfg.actor.ppo_mini_batch_size, cfg.actor.max_nan_steps)
    assert critic.mini_prompts == cfg.actor.ppo_mini_batch_size == 2
    for g in critic.optim.opt.param_groups:
        g["lr"] = 0.0
    critic.optim.sched.base_lrs = [0.0] * len(critic.optim.sched.base_lrs)
    batch = grouped_batch([[1, 7], [3, 12]])
    old = critic.values(batch)
    returns = torch.linspace(-1, 1, 4)[:, None].expand_as(batch.response_mask).contiguous() * batch.response_mask
    norms = {}
    for name, rows, budget in (("one", 4, 10_000), ("rows", 1, 10_000), ("tokens", 4, 16)):
        critic.cfg.ppo_micro_batch_size_per_gpu, critic.cfg.ppo_max_token_len_per_gpu = rows, budget
        m = critic.update(batch, old, returns)
        norms[name] = m["critic/vf_grad_norm"]
        assert {"critic/vf_loss", "critic/vf_clipfrac", "critic/lr"} <= set(m)
    assert norms["one"] > 0
    assert norms["rows"] == pytest.approx(norms["one"], rel=1e-4)
    assert norms["tokens"] == pytest.approx(norms["one"], rel=1e-4)
    nan = torch.full_like(returns, float("nan"))
    before = [p.to_local().clone() for p in critic.root.parameters()]
    critic.cfg.ppo_micro_batch_size_per_gpu = 4
    critic.update(batch, old, nan)                 # one mini-batch (two prompts): skipped, logged
    with pytest.raises(HybridRLError, match="critic: .*non-finite"):
        critic.update(batch, old, nan)
    assert all(torch.equal(a, b.to_local()) for a, b in zip(before, critic.root.parameters()))


def test_staleness_counts_samples_from_older_weights():
    from hybridrl.step import staleness_metrics
    from hybridrl.types import Sample
    samples = [Sample(prompt_ids=[1], weight_version=v) for v in (5, 5, 4, 2)]
    assert staleness_metrics(samples, 5) == {"rollout/stale_fraction": 0.5, "rollout/staleness_max": 3.0}
    assert staleness_metrics(samples[:2], 5) == {"rollout/stale_fraction": 0.0, "rollout/staleness_max": 0.0}


def test_non_finite_weights_never_reach_the_engine(task, tiny_qwen2_dir, tmp_path):
    from hybridrl.step import RLContext, sync_weights
    from hybridrl.trainer.actor import Policy
    cfg = load_config(overrides(task, tiny_qwen2_dir, tmp_path))

    class Recorder:
        pushed = []

        async def update_weights(self, buckets, version):
            self.pushed.append(version)

    actor = Policy(tiny_qwen2_dir, cfg.model, cfg.actor, torch.device("cpu"), 12)
    ctx = RLContext(cfg, Recorder(), actor, None, None)
    asyncio.run(sync_weights(ctx))
    assert Recorder.pushed == [1] and ctx.version == 1
    with torch.no_grad():
        next(actor.root.parameters()).to_local()[0, 0] = float("inf")   # one shard entry
    with pytest.raises(HybridRLError, match="no longer finite"):
        asyncio.run(sync_weights(ctx))
    assert Recorder.pushed == [1] and ctx.version == 1
