"""Checkpoints: one run per folder (a lock), save atomically (temp folder, then rename), find the latest
intact one, resume, export to HF.

Layout:  <run_dir>/.lock   <run_dir>/checkpoints/step_000004/{sharded/, trainer.pt, state.json}
`sharded/` is a torch.distributed.checkpoint (DCP) folder: every rank writes its shards of the actor's and
critic's weights and optimizer state, and it loads at any rank count (DCP reshards). `trainer.pt` holds
the plain rest (schedulers, KL controller, RNG states): only tensors, numbers, strings and containers,
so it loads with `torch.load(weights_only=True)`, which runs no code from the file. `state.json` holds
the step, the data-loader position and trainer.pt's size, readable without torch. `hybridrl merge`
turns `sharded/` into one Hugging Face folder. Every rank calls save / load_sharded; rank 0 alone
writes the rest and renames the folder into place, so a checkpoint is whole or absent.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import sys
import time
import zipfile
from pathlib import Path

import torch

from hybridrl import HybridRLError

PREFIX = "step_"


def ckpt_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def check_writable(path: str | Path) -> None:
    """Fail at start, not after an hour of training, when checkpoints cannot be written."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise HybridRLError(f"cannot write to {p} ({e.strerror}): choose a writable folder with "
                            "trainer.default_local_dir=DIR") from None


@contextlib.contextmanager
def run_lock(run_dir: str | Path):
    """Hold `<run_dir>/.lock` (an exclusive flock) for the whole run; a second run on the folder fails at once.

    The OS drops the lock when its process dies, so a lock file left by a crashed run never blocks;
    the PID written in it is only for the message.
    """
    import fcntl

    path = Path(run_dir) / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+")            # not "w": truncating before holding the lock would erase the holder's PID
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        pid, started = _lock_holder(fh.read())
        fh.close()
        raise HybridRLError(f"{path.parent} is in use by another hybridrl run (PID {pid}, started {started}): two runs "
                            "in one folder overwrite each other's checkpoints and metrics; fix: use another "
                            f"trainer.experiment_name or trainer.default_local_dir, or stop PID {pid}") from None
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        fh.flush()
        yield path
    finally:
        fh.truncate(0)
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def _lock_holder(text: str) -> tuple[str, str]:
    """(pid, start time) from a lock file's text; the holder may not have written it yet."""
    try:
        info = json.loads(text)
        return str(info["pid"]), str(info["started"])
    except (ValueError, KeyError, TypeError):
        return "unknown", "just now"


def rng_state() -> dict:
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save(run_dir: str | Path, step: int, trainer_state: dict, state: dict, keep: int = 2,
         sharded: dict | None = None, dp=None, write_files=None) -> Path:
    """Write step_NNNNNN atomically (temp folder, fsync, rename), then prune to the newest `keep`.

    sharded: this rank's DCP state (tensors may be DTensor shards), written by every rank into sharded/.
    write_files(folder): rank 0 adds files (the model's config and tokenizer, for `hybridrl merge`).
    Collective when dp.world > 1: every rank calls it with its own shards; rank 0 writes the rest."""
    from hybridrl.parallel import DP
    dp = dp or DP()
    root = ckpt_root(run_dir)
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f".tmp_{PREFIX}{step:06d}"
    previous = [p for p in list_checkpoints(run_dir) if step_of(p) < step]
    if dp.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    error = None
    try:
        if dp.is_main:
            tmp.mkdir(parents=True)
        dp.barrier()
        if sharded is not None:
            _dcp_save(sharded, tmp / "sharded")
        if dp.is_main:
            if write_files is not None:
                write_files(tmp)
            _write_rest(tmp, final, root, step, trainer_state, state)
    except OSError as e:
        error = e
    if dp.sum(error is not None) > 0:
        if dp.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "there is no earlier checkpoint"
        if error is not None and error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise HybridRLError(f"disk full while writing checkpoint {final}; {kept}; fix: free space on that disk "
                                "or lower trainer.max_actor_ckpt_to_keep") from None
        why = f" ({error.strerror})" if error is not None else " (another rank failed to write its shards)"
        raise HybridRLError(f"cannot write checkpoint {final}{why}; {kept}") from None
    if dp.is_main:
        older = [p for p in list_checkpoints(run_dir) if step_of(p) < step]
        for old in older[:len(older) - (keep - 1)] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dp.barrier()
    return final


def _dcp_save(sharded: dict, path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    try:
        dcp.save(sharded, checkpoint_id=str(path))
    except (OSError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - DCP wraps a rank's OSError in CheckpointException (a BaseException)
        if "No space left" in str(e) or "Errno" in str(e):
            raise OSError(errno.ENOSPC if "No space left" in str(e) else errno.EIO, str(e)[:300]) from None
        raise


def load_sharded(path: str | Path, template: dict) -> dict:
    """Fill `template` (this rank's sharded state, any rank count) from a checkpoint's sharded/ (collective)."""
    import torch.distributed.checkpoint as dcp
    dcp.load(template, checkpoint_id=str(Path(path) / "sharded"))
    return template


def merge(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """`hybridrl merge`: the actor of a sharded checkpoint (any rank count) as one Hugging Face folder."""
    from hybridrl.trainer.fsdp import merge_to_hf
    path = Path(checkpoint)
    problem = damage(path) if (path / "state.json").exists() else "no state.json: not a checkpoint folder"
    if problem:
        raise HybridRLError(f"cannot merge {path}: {problem}; fix: point --checkpoint at a folder like "
                            "runs/<project>/<experiment>/checkpoints/step_000004")
    if not (path / "hf" / "config.json").is_file():
        raise HybridRLError(f"{path} has no hf/config.json (written by hybridrl before the merge command existed); "
                            "fix: resume that run for one step so it saves a new checkpoint")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise HybridRLError(f"{out} exists and is not empty: choose another --out (nothing was overwritten)")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merge_to_hf(path / "sharded", tmp, path / "hf", prefix="actor.model.lm.")
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return out


def _write_rest(tmp: Path, final: Path, root: Path, step: int, trainer_state: dict, state: dict) -> None:
    with open(tmp / "trainer.pt", "wb") as f:   # a file object: a full disk raises OSError, not RuntimeError
        torch.save({**trainer_state, "rng": rng_state()}, f)
        _flush(f)
    size = (tmp / "trainer.pt").stat().st_size
    with open(tmp / "state.json", "w") as f:
        f.write(json.dumps({**state, "step": step, "trainer_pt_bytes": size}, indent=1))
        _flush(f)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)


def _flush(f) -> None:
    f.flush()
    os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a rename durable: a power cut right after it must not bring back the old name."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def step_of(path: Path) -> int:
    return int(path.name[len(PREFIX):])


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    root = ckpt_root(run_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / "state.json").exists()), key=step_of)


def find_resume_path(run_dir: str | Path, mode: str, path: str) -> Path | None:
    """The checkpoint to resume from: the newest intact one (a broken newer one is skipped with a warning)."""
    if mode == "disable":
        return None
    if mode == "resume_path":
        p = Path(path)
        if (p / "state.json").exists():    # one checkpoint, named by the user: it must be intact
            problem = damage(p)
            if problem:
                raise HybridRLError(f"checkpoint {p} is damaged ({problem}); fix: point trainer.resume_from_path "
                                    f"at an earlier checkpoint, e.g. one in {p.parent}")
            return p
        found = _newest_intact(list_checkpoints(p) if p.is_dir() else [])
        if found is None:
            raise HybridRLError(f"trainer.resume_from_path={path!r} is not a checkpoint (no intact state.json): "
                                f"point it at a folder like {ckpt_root(run_dir)}/step_000004")
        return found
    found = list_checkpoints(run_dir)
    intact = _newest_intact(found)
    if found and intact is None:
        raise HybridRLError(f"every checkpoint in {ckpt_root(run_dir)} is damaged (see the warnings above); fix: "
                            "start a new run (another trainer.experiment_name) or copy an intact checkpoint there")
    return intact


def _newest_intact(found: list[Path]) -> Path | None:
    for p in reversed(found):
        problem = damage(p)
        if problem is None:
            return p
        print(f"warning: skipping damaged checkpoint {p} ({problem}); trying the one before it", file=sys.stderr,
              flush=True)
    return None


def damage(path: Path) -> str | None:
    """What is wrong with a checkpoint folder, found cheaply (no unpickling), or None when it looks intact."""
    try:
        state = json.loads((path / "state.json").read_text())
        int(state["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"state.json unreadable: {type(e).__name__}: {str(e)[:100]}"
    if state.get("sharded") and not (path / "sharded" / ".metadata").is_file():
        return "sharded/.metadata missing (the shards were not all written)"
    pt = path / "trainer.pt"
    if not pt.is_file():
        return "trainer.pt missing"
    size, expected = pt.stat().st_size, state.get("trainer_pt_bytes")
    if expected is not None and size != expected:
        return f"trainer.pt is {size} bytes, {expected} were written"
    try:
        with zipfile.ZipFile(pt):   # torch.save's format is a zip; a truncated one has no central directory
            pass
    except (zipfile.BadZipFile, OSError) as e:
        return f"trainer.pt is truncated or not a torch checkpoint: {e}"
    return None


def load(path: str | Path) -> tuple[dict, dict]:
    """Returns (trainer_state, state); RNG states are restored here. Never runs code from the file."""
    import pickle

    path = Path(path)
    problem = damage(path)
    if problem:
        raise HybridRLError(f"checkpoint {path} is damaged ({problem}); fix: resume from an earlier checkpoint "
                            "(trainer.resume_from_path=...)")
    state = json.loads((path / "state.json").read_text())
    try:
        trainer_state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise HybridRLError(f"refusing to load {path / 'trainer.pt'}: it holds objects other than tensors and plain "
                            f"values ({str(e).splitlines()[-1][:160]}), which hybridrl never writes; unpickling them "
                            "could run code from the file. fix: resume only from checkpoints hybridrl wrote") from None
    except (RuntimeError, EOFError) as e:
        raise HybridRLError(f"checkpoint {path / 'trainer.pt'} is corrupt ({type(e).__name__}: {str(e)[:160]}); "
                            "fix: resume from an earlier checkpoint (trainer.resume_from_path=...)") from None
    set_rng_state(trainer_state.pop("rng"))
    return trainer_state, state


def export_hf(tensors: dict, config, tokenizer, out_dir: str | Path) -> Path:
    """The actor as a plain Hugging Face folder (safetensors + config + tokenizer), written atomically:
    the old export is renamed aside, the new one renamed in, then the old one removed.
    tensors: full HF-named weights (a tied lm_head left out, as save_pretrained does)."""
    from safetensors.torch import save_file
    out = Path(out_dir)
    tmp, old = out.with_name(out.name + ".tmp"), out.with_name(out.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        config.save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        what = "disk full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else f"error ({e.strerror})"
        raise HybridRLError(f"{what} while writing the export {out}; the checkpoints are intact"
                            + (f" and so is the previous export {out}" if out.exists() else "")) from None
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out
