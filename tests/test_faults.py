"""Fault injection on CPU against `hybridrl serve` (SGLang's HTTP API over the native engine): a server killed
mid-rollout is restarted, gets the weights again, and only its lost prompts are sent again; malformed replies
are clear errors. The rest of the fault suite lives beside the code it checks (see docs/errors.md):
a server that accepts and never answers (tests/test_sglang_client.py::test_request_timeout_is_reported_and_the_request_aborted),
a hanging reward (tests/test_rewards.py::test_score_samples_with_a_hanging_reward_times_out), a truncated newest
checkpoint (tests/test_reliability.py::test_truncated_newest_checkpoint_falls_back_to_the_previous_one), two runs
on one folder (tests/test_reliability.py::test_run_lock_between_processes_and_after_the_holder_dies), SIGINT
mid-step (tests/test_signals.py).
"""
import asyncio
import os
import signal
import sys

import pytest
import torch
from aiohttp import web

from hybridrl import HybridRLError
from hybridrl.config import load_config

SERVE = [sys.executable, "-m", "hybridrl.rollout.native.server"]


def prompts(n):
    from hybridrl.types import Sample
    return [Sample(prompt_ids=[1, 5 + i, 9, 20 + i], index=i) for i in range(n)]


def test_server_killed_mid_rollout_is_restarted_and_loses_no_sample(tiny_qwen2_dir, tiny_tok, tmp_path):
    from hybridrl.rollout.base import SamplingParams
    from hybridrl.rollout.sglang.engine import SGLangEngine
    from hybridrl.step import RLContext, generate, sync_weights
    from hybridrl.trainer.actor import Policy
    cfg = load_config([f"model.path={tiny_qwen2_dir}", "rollout.name=sglang", "trainer.device=cpu",
                       "rollout.server_start_timeout=60", f"trainer.default_local_dir={tmp_path}"])
    actor = Policy(tiny_qwen2_dir, cfg.model, cfg.actor, torch.device("cpu"), 32)
    engine = SGLangEngine.from_config(cfg, tiny_qwen2_dir, launch_cmd=SERVE, run_dir=str(tmp_path))
    ctx = RLContext(cfg, engine, actor, tiny_tok, None)
    sp = SamplingParams(max_new_tokens=48, temperature=1.0, n=2, seed=5, ignore_eos=True)
    real_generate = engine.generate
    finished = []

    killed = asyncio.Event()

    async def generate_then_kill(ids, sampling, request_id=None):
        """Prompts 0-4 go first; when 3 have finished the server is killed; prompts 5-9 are sent after that,
        so they surely meet the dead server (and any of 0-4 still running dies with it)."""
        if int(request_id.split("-p")[1]) >= 5 and engine.restarts == 0:
            await killed.wait()
        out = await real_generate(ids, sampling, request_id)
        finished.append(request_id)
        if len(finished) == 3 and engine.restarts == 0:
            os.killpg(engine.process.proc.pid, signal.SIGKILL)
            killed.set()
        return out

    async def main():
        await sync_weights(ctx)                                     # version 1
        reference = await asyncio.wait_for(generate(ctx, prompts(10), sp, step=1, first=0), 120)
        engine.generate = generate_then_kill
        finished.clear()
        got = await asyncio.wait_for(generate(ctx, prompts(10), sp, step=1, first=0), 180)
        await engine.close()
        return reference, got

    reference, got = asyncio.run(main())
    assert engine.restarts == 1 and engine.process is None          # closed after one restart
    groups = [s.group for s in got]
    assert sorted(groups) == sorted(list(range(10)) * 2)          # every sample once: none lost, none twice
    assert all(s.weight_version == 1 for s in got)               # the restarted server got version 1 again
    assert all(len(s.response_ids) == 48 for s in got)
    # the re-sent prompts use the same seeds: the same tokens as without the kill
    assert [s.response_ids for s in got] == [s.response_ids for s in reference]


def test_malformed_replies_are_clear_errors():
    from hybridrl.rollout.base import SamplingParams
    from hybridrl.rollout.sglang.engine import SGLangEngine
    replies = iter([web.Response(text="<html>oops</html>", content_type="text/html"),
                    web.json_response({"output_ids": ["x"], "meta_info": {}}),
                    web.json_response({"output_ids": [1, 2], "meta_info": {"output_token_logprobs": [[-1.0, 1, None]]}}),
                    web.json_response([1, 2, 3])])

    async def reply(request):
        return next(replies)

    async def main():
        app = web.Application()
        app.add_routes([web.post("/generate", reply)])
        runner = web.AppRunner(app, shutdown_timeout=0.2)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        engine = SGLangEngine(url, {"version": "0.5.17", "weight_version": "default"}, retries=0)
        errors = []
        for _ in range(4):
            try:
                await engine.generate([1], SamplingParams(max_new_tokens=2))
            except HybridRLError as e:
                errors.append(str(e))
        await engine.close()
        await runner.cleanup()
        return errors

    errors = asyncio.run(main())
    assert len(errors) == 4 and all("reply hybridrl cannot read" in e and url_free(e) for e in errors)
    assert "<html>" in errors[0] and "2 output_ids but 1 output_token_logprobs" in errors[2]


def url_free(message: str) -> bool:
    return "Traceback" not in message


def test_a_rollout_that_cannot_finish_keeps_the_last_finished_step(tmp_path, tiny_qwen2_dir, monkeypatch):
    """The rollout of step 3 fails for good (its server cannot be brought back): the run stops with an error
    that says the checkpoint of step 2 was saved (save_freq=-1 had saved none), and resume redoes step 3."""
    import json
    from hybridrl.rollout.native.engine import NativeEngine
    from hybridrl.train import train
    rows = [{"prompt": [{"role": "user", "content": f"Say {i}."}], "data_source": "toy",
             "reward_model": {"ground_truth": str(i)}} for i in range(16)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "r.py").write_text("def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n"
                                   "    return (len(solution_str) % 3) / 2\n")
    run = tmp_path / "run"
    over = [f"model.path={tiny_qwen2_dir}", f"data.train_files=[{tmp_path}/train.jsonl]",
            f"reward.custom_path={tmp_path}/r.py", "data.train_batch_size=4", "actor.ppo_mini_batch_size=2",
            "rollout.n=2", "rollout.response_length=8", "trainer.device=cpu", "trainer.val_before_train=false",
            "trainer.logger=[jsonl]", "trainer.total_training_steps=4", f"trainer.default_local_dir={run}",
            "rollout.kv_block_size=16"]
    real = NativeEngine.generate

    async def dies_at_step_3(self, input_ids, sampling, request_id=None):
        if request_id and request_id.startswith("s3-"):
            raise HybridRLError("POST http://127.0.0.1:30000/generate failed after 4 attempts: connection refused")
        return await real(self, input_ids, sampling, request_id)

    monkeypatch.setattr(NativeEngine, "generate", dies_at_step_3)
    with pytest.raises(HybridRLError, match="rollout failed.*saved the checkpoint of step 2 at .*step_000002"):
        train(load_config(over))
    monkeypatch.undo()
    train(load_config(over))                                       # resume_mode=auto: step 3 again, then 4
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
