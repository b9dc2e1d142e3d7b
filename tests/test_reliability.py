"""Nothing lost, nothing hangs, nothing runs that shouldn't: run lock, safe and atomic checkpoints, torn logs."""
import errno
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from hybridrl import HybridRLError
from hybridrl import checkpoint as ckpt
from hybridrl.tracking import Tracker, plot_run, read_jsonl


# ---------------------------------------------------------------- one run per run folder

def test_run_lock_refuses_a_second_holder_in_the_same_process(tmp_path):
    with ckpt.run_lock(tmp_path) as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        # flock belongs to the open file description: a second open in this process conflicts too
        with pytest.raises(HybridRLError, match=rf"{tmp_path} is in use by another hybridrl run \(PID {os.getpid()}, "
                                                rf"started .*trainer.experiment_name or trainer.default_local_dir, "
                                                rf"or stop PID {os.getpid()}"):
            with ckpt.run_lock(tmp_path):
                pass
        assert json.loads(lock.read_text())["pid"] == os.getpid()   # the refused run did not erase the holder
    with ckpt.run_lock(tmp_path):   # released on exit
        pass


HOLD = """
import sys, time
from hybridrl.checkpoint import run_lock
with run_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_run_lock_between_processes_and_after_the_holder_dies(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(HybridRLError, match=rf"in use by another hybridrl run \(PID {proc.pid},.*"
                                                rf"stop PID {proc.pid}"):
            with ckpt.run_lock(tmp_path):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)   # a crash: no clean-up runs
        proc.wait()
    assert str(proc.pid) in (tmp_path / ".lock").read_text()   # the stale lock file is still there ...
    with ckpt.run_lock(tmp_path):                                # ... and does not block
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()


# ---------------------------------------------------------------- checkpoints load without running code

def trainer_state():
    """What train.save_checkpoint saves: model / optimizer / scheduler state dicts, ints, floats, None."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched.step()
    actor = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "nan_streak": 0}
    return {"actor": actor, "kl_coef": 0.001, "critic": None}


def test_checkpoint_round_trip_under_weights_only(tmp_path):
    import random

    state = trainer_state()
    path = ckpt.save(tmp_path, 3, state, {"loader": {"epoch": 1, "pos": 8}, "weight_version": 3})
    expected_py, expected_torch = random.random(), torch.rand(2)
    random.random(), torch.rand(2)   # move the RNGs on; load must bring them back
    loaded, info = ckpt.load(path)
    assert (random.random(), torch.equal(torch.rand(2), expected_torch)) == (expected_py, True)
    assert info["step"] == 3 and info["loader"] == {"epoch": 1, "pos": 8}
    assert torch.equal(loaded["actor"]["model"]["weight"], state["actor"]["model"]["weight"])
    assert loaded["actor"]["scheduler"] == state["actor"]["scheduler"] and loaded["kl_coef"] == 0.001
    assert torch.equal(loaded["actor"]["optimizer"]["state"][0]["exp_avg"],
                       state["actor"]["optimizer"]["state"][0]["exp_avg"])


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def test_checkpoint_with_a_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    path = ckpt.save(tmp_path, 1, trainer_state(), {"loader": {}})
    marker = tmp_path / "pwned"
    torch.save({"actor": {}, "rng": ckpt.rng_state(), "payload": Evil(marker)}, path / "trainer.pt")
    info = json.loads((path / "state.json").read_text())
    info["trainer_pt_bytes"] = (path / "trainer.pt").stat().st_size   # a consistent, well-formed file
    (path / "state.json").write_text(json.dumps(info))
    with pytest.raises(HybridRLError, match=r"refusing to load .*trainer.pt: it holds objects other than tensors.*"
                                            r"could run code from the file"):
        ckpt.load(path)
    assert not marker.exists()


# ---------------------------------------------------------------- a damaged newest checkpoint

def three_checkpoints(run):
    for step in (1, 2, 3):
        ckpt.save(run, step, trainer_state(), {"loader": {"epoch": 0, "pos": step}}, keep=3)
    return ckpt.list_checkpoints(run)


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    one, two, three = three_checkpoints(tmp_path)
    truncate(three / "trainer.pt")
    assert ckpt.find_resume_path(tmp_path, "auto", "") == two
    assert f"skipping damaged checkpoint {three} (trainer.pt is" in capsys.readouterr().err
    with pytest.raises(HybridRLError, match=rf"checkpoint {three} is damaged \(trainer.pt is \d+ bytes, "
                                            r"\d+ were written"):
        ckpt.load(three)
    (two / "state.json").write_text('{"step": 2, "loa')   # torn state.json: skipped too
    assert ckpt.find_resume_path(tmp_path, "auto", "") == one
    assert f"skipping damaged checkpoint {two} (state.json unreadable" in capsys.readouterr().err
    assert ckpt.load(one)[1]["step"] == 1
    assert ckpt.find_resume_path(tmp_path / "checkpoints", "resume_path", str(tmp_path)) == one   # a run folder
    with pytest.raises(HybridRLError, match=rf"checkpoint {three} is damaged.*earlier checkpoint"):
        ckpt.find_resume_path(tmp_path, "resume_path", str(three))   # named explicitly: no silent substitute
    truncate(one / "trainer.pt")
    with pytest.raises(HybridRLError, match=r"every checkpoint in .*checkpoints is damaged \(see the warnings above\)"):
        ckpt.find_resume_path(tmp_path, "auto", "")


def test_truncated_checkpoint_without_a_recorded_size_is_still_caught(tmp_path, capsys):
    _, two, three = three_checkpoints(tmp_path)
    info = json.loads((three / "state.json").read_text())
    del info["trainer_pt_bytes"]   # as written before sizes were recorded
    (three / "state.json").write_text(json.dumps(info))
    truncate(three / "trainer.pt", 0.9)
    assert ckpt.find_resume_path(tmp_path, "auto", "") == two
    assert "trainer.pt is truncated or not a torch checkpoint" in capsys.readouterr().err


# ---------------------------------------------------------------- atomic writes, disk full

def test_disk_full_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    first = ckpt.save(tmp_path, 1, trainer_state(), {"loader": {}})

    def full_disk(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    with pytest.raises(HybridRLError, match=rf"disk full while writing checkpoint .*step_000002; the previous "
                                            rf"checkpoint {first} is intact"):
        ckpt.save(tmp_path, 2, trainer_state(), {"loader": {}})
    monkeypatch.undo()
    assert ckpt.list_checkpoints(tmp_path) == [first]
    assert sorted(p.name for p in ckpt.ckpt_root(tmp_path).iterdir()) == ["step_000001"]   # no temp folder left
    assert ckpt.find_resume_path(tmp_path, "auto", "") == first and ckpt.load(first)[1]["step"] == 1


def test_crash_mid_save_leaves_no_checkpoint_folder(tmp_path, monkeypatch):
    def crash(obj, f):
        f.write(b"PK partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(tmp_path, 1, trainer_state(), {"loader": {}})
    assert ckpt.list_checkpoints(tmp_path) == [] and ckpt.find_resume_path(tmp_path, "auto", "") is None


def test_export_is_atomic_and_disk_full_keeps_the_old_export(tmp_path, monkeypatch):
    import safetensors.torch
    from transformers import PretrainedConfig
    config = PretrainedConfig()
    tensors = {"w": torch.ones(2)}
    out = ckpt.export_hf(tensors, config, None, tmp_path / "actor_hf")
    assert safetensors.torch.load_file(out / "model.safetensors")["w"].tolist() == [1.0, 1.0]
    assert (out / "config.json").is_file()
    (out / "model.safetensors").write_bytes(b"old")

    def full_disk(tensors, path, metadata=None):
        open(path, "wb").write(b"ne")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(HybridRLError, match=rf"disk full while writing the export {out}; the checkpoints are intact "
                                            rf"and so is the previous export"):
        ckpt.export_hf(tensors, config, None, out)
    assert (out / "model.safetensors").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["actor_hf"]
    monkeypatch.undo()
    ckpt.export_hf({"w": torch.zeros(2)}, config, None, out)   # a second export replaces the first
    assert safetensors.torch.load_file(out / "model.safetensors")["w"].tolist() == [0.0, 0.0]
    assert sorted(os.listdir(tmp_path)) == ["actor_hf"]


# ---------------------------------------------------------------- metrics.jsonl

def log_steps(run, steps, **kw):
    t = Tracker(["jsonl"], run, {}, **kw)
    for s in steps:
        t.log({"reward/mean": s / 10, "response_length/mean": 5.0 + s}, s)
    t.close()


def test_torn_last_metrics_line_is_skipped_and_repaired_on_resume(tmp_path, capsys):
    log_steps(tmp_path, [1, 2, 3])
    jsonl = tmp_path / "metrics.jsonl"
    with jsonl.open("a") as f:
        f.write('{"step": 4, "reward/me')   # a crash mid-write
    assert [r["step"] for r in read_jsonl(jsonl)] == [1, 2, 3]
    assert f"{jsonl} line 4 is torn" in capsys.readouterr().err
    assert plot_run(jsonl, tmp_path / "curve.png").stat().st_size > 1000
    log_steps(tmp_path, [4], resume_step=3)
    capsys.readouterr()
    assert jsonl.read_text().count("\n") == 4 and [r["step"] for r in read_jsonl(jsonl)] == [1, 2, 3, 4]
    assert capsys.readouterr().err == ""   # repaired: nothing to skip any more


def test_fresh_run_refuses_to_wipe_another_runs_metrics(tmp_path):
    log_steps(tmp_path, [1, 2])
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(HybridRLError, match=r"metrics.jsonl holds the metrics of an earlier run \(2 rows, last step 2\)"
                                            r".*trainer.experiment_name or trainer.default_local_dir"):
        Tracker(["jsonl"], tmp_path, {})
    assert (tmp_path / "metrics.jsonl").read_text() == before
    log_steps(tmp_path, [2], resume_step=1)   # a resume truncates to its step, as before
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]
    (tmp_path / "metrics.jsonl").write_text("")
    log_steps(tmp_path, [1])                   # an empty log holds nothing to lose
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1]

