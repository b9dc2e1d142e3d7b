"""Graceful stop of `hybridrl train` on SIGINT / SIGTERM: the step in progress finishes, a checkpoint is saved, the
process exits with 130 / 143 (no traceback) and names the checkpoint; a resumed run loses and repeats no step; a
second signal stops at once and leaves nothing resume trips on; the previous handlers come back; two ranks under
the launcher stop together on a SIGTERM sent to the launcher.

Each test starts `python -m hybridrl.cli train` subprocesses on a tiny task and keeps under ~60 s on 2 cores.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

REWARD = '''
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    return {"score": (len(solution_str) % 5) / 4.0, "length": len(solution_str)}
'''


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    d = tmp_path_factory.mktemp("sigtask")
    rows = [{"prompt": [{"role": "user", "content": f"What is {a} plus {b}?"}], "data_source": "toy",
             "reward_model": {"style": "rule", "ground_truth": str(a + b)}} for a in range(4) for b in range(4)]
    (d / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (d / "reward.py").write_text(REWARD)
    return d


def overrides(task, model_dir, run_dir, *extra):
    return [f"model.path={model_dir}", f"data.train_files=[{task}/train.jsonl]", f"reward.custom_path={task}/reward.py",
            "data.train_batch_size=4", "actor.ppo_mini_batch_size=2", "actor.ppo_micro_batch_size_per_gpu=4",
            "rollout.n=4", "rollout.response_length=12", "data.max_prompt_length=64", "actor.lr=1e-3",
            "trainer.device=cpu", "trainer.val_before_train=false", "trainer.logger=[jsonl]", "trainer.test_freq=-1",
            f"trainer.default_local_dir={run_dir}", "rollout.kv_block_size=16", "trainer.total_training_steps=6",
            "trainer.save_freq=-1", *extra]


class Train:
    """`python -m hybridrl.cli train ...` in the background, its output in files."""

    def __init__(self, args, logs: Path):
        logs.mkdir(parents=True, exist_ok=True)
        self.out, self.err = logs / "stdout", logs / "stderr"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
        with self.out.open("w") as o, self.err.open("w") as e:
            self.proc = subprocess.Popen([sys.executable, "-m", "hybridrl.cli", "train", *args], stdout=o, stderr=e,
                                         env=env, cwd=str(logs))

    def wait_rows(self, run_dir: Path, n: int, timeout: float = 40) -> list[dict]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            found = rows(run_dir)
            if len(found) >= n:
                return found
            if self.proc.poll() is not None:
                pytest.fail(f"training exited ({self.proc.returncode}) before {n} metrics rows:\n{self.text()}")
            time.sleep(0.02)
        self.proc.kill()
        pytest.fail(f"no {n} metrics rows within {timeout} s:\n{self.text()}")

    def wait(self, timeout: float = 40) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"training did not exit within {timeout} s:\n{self.text()}")

    def text(self) -> str:
        return self.out.read_text() + "\n--- stderr ---\n" + self.err.read_text()


def rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def assert_stopped_with_checkpoint(t: Train, rc: int, code: int, run_dir: Path) -> int:
    from hybridrl import checkpoint as ckpt
    assert rc == code, t.text()
    assert "Traceback" not in t.err.read_text(), t.text()
    last = rows(run_dir)[-1]["step"]
    assert last < 6, "the run ended before the signal; the test needs slower steps"
    folder = run_dir / "checkpoints" / f"step_{last:06d}"
    assert ckpt.list_checkpoints(run_dir)[-1] == folder
    assert ckpt.damage(folder) is None
    text = t.text()
    assert "stopping after step" in text and "press Ctrl-C again" in text
    assert f"checkpoint: {folder}" in text and "trainer.resume_mode=auto" in text
    assert not (run_dir / "actor_hf").exists()         # a stopped run is not exported
    return last


@pytest.mark.slow
def test_sigint_then_sigterm_save_and_resume_loses_no_step(task, tiny_qwen2_dir, tmp_path):
    run = tmp_path / "run"
    args = overrides(task, tiny_qwen2_dir, run)
    t0 = time.monotonic()
    first = Train(args, tmp_path / "a")
    first.wait_rows(run, 1)
    first.proc.send_signal(signal.SIGINT)
    a = assert_stopped_with_checkpoint(first, first.wait(), 130, run)

    second = Train(args + ["trainer.resume_mode=auto"], tmp_path / "b")   # resumes, then SIGTERM
    found = second.wait_rows(run, a + 1)
    assert [r["step"] for r in found][:a + 1] == list(range(1, a + 2))
    second.proc.send_signal(signal.SIGTERM)
    b = assert_stopped_with_checkpoint(second, second.wait(), 143, run)
    assert b > a

    third = Train(args + ["trainer.resume_mode=auto"], tmp_path / "c")
    assert third.wait() == 0, third.text()
    assert [r["step"] for r in rows(run)] == [1, 2, 3, 4, 5, 6]
    assert (run / "actor_hf").is_dir() and (run / "checkpoints" / "step_000006").is_dir()
    print(f"stopped at {a} and {b}; {time.monotonic() - t0:.1f} s")


@pytest.mark.slow
def test_second_sigint_stops_at_once_and_resume_still_works(task, tiny_qwen2_dir, tmp_path):
    from hybridrl import checkpoint as ckpt
    run = tmp_path / "run"
    t = Train(overrides(task, tiny_qwen2_dir, run), tmp_path / "a")
    t.wait_rows(run, 1)
    t.proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    t.proc.send_signal(signal.SIGINT)
    started = time.monotonic()
    assert t.wait() == 130, t.text()
    assert time.monotonic() - started < 15
    assert "Traceback" not in t.err.read_text() and "interrupted" in t.err.read_text(), t.text()
    # whatever was half-written is a .tmp_ folder that list_checkpoints and resume ignore
    for p in ckpt.list_checkpoints(run):
        assert not p.name.startswith(".tmp_") and ckpt.damage(p) is None
    found = ckpt.find_resume_path(run, "auto", "")
    assert found is None or found in ckpt.list_checkpoints(run)
    assert not list(run.glob("*.ready"))


def test_handlers_come_back_and_only_the_main_thread_installs():
    from hybridrl.train import GracefulStop
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    stop = GracefulStop()
    stop.install(verbose=False)
    assert signal.getsignal(signal.SIGTERM) == stop._handle
    os.kill(os.getpid(), signal.SIGTERM)             # the first one only asks
    time.sleep(0.05)
    assert stop.signum == signal.SIGTERM
    with pytest.raises(KeyboardInterrupt):           # the second one stops at once
        stop._handle(signal.SIGINT, None)
    stop.restore()
    assert {s: signal.getsignal(s) for s in before} == before

    other = GracefulStop()
    worker = threading.Thread(target=other.install)
    worker.start()
    worker.join()
    assert other._saved == {} and {s: signal.getsignal(s) for s in before} == before


@pytest.mark.slow
def test_sigterm_to_the_launcher_stops_two_ranks_at_the_same_step(task, tiny_qwen2_dir, tmp_path):
    run = tmp_path / "run"
    t = Train(overrides(task, tiny_qwen2_dir, run, "trainer.n_gpus_per_node=2"), tmp_path / "a")
    t.wait_rows(run, 1, timeout=50)
    t.proc.send_signal(signal.SIGTERM)               # the launcher's PID only, as `kill PID` does
    assert_stopped_with_checkpoint(t, t.wait(), 143, run)
    state = json.loads((sorted((run / "checkpoints").glob("step_*"))[-1] / "state.json").read_text())
    assert state["world_size"] == 2
