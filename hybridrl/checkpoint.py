"""Checkpoints: save atomically (temp folder, then rename), find the latest, resume, export to HF.

Layout:  <run_dir>/checkpoints/step_000004/{trainer.pt, state.json}
`trainer.pt` holds actor (model, optimizer, scheduler), critic, KL controller, RNG states;
`state.json` holds the step and the data-loader position, readable without torch.
"""
from __future__ import annotations

import json
import os
import random
import shutil
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


def rng_state() -> dict:
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save(run_dir: str | Path, step: int, trainer_state: dict, state: dict, keep: int = 2) -> Path:
    root = ckpt_root(run_dir)
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f".tmp_{PREFIX}{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save({**trainer_state, "rng": rng_state()}, tmp / "trainer.pt")
    (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    older = [p for p in list_checkpoints(run_dir) if step_of(p) < step]
    for old in older[:len(older) - (keep - 1)] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def step_of(path: Path) -> int:
    return int(path.name[len(PREFIX):])


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    root = ckpt_root(run_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / "state.json").exists()), key=step_of)


def find_resume_path(run_dir: str | Path, mode: str, path: str) -> Path | None:
    if mode == "disable":
        return None
    if mode == "resume_path":
        p = Path(path)
        if not (p / "state.json").exists():
            found = list_checkpoints(p) if p.is_dir() else []
            if not found:
                raise HybridRLError(f"trainer.resume_from_path={path!r} is not a checkpoint (no state.json): "
                                    f"point it at a folder like {ckpt_root(run_dir)}/step_000004")
            p = found[-1]
        return p
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load(path: str | Path) -> tuple[dict, dict]:
    """Returns (trainer_state, state); RNG states are restored here."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    trainer_state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
    set_rng_state(trainer_state.pop("rng"))
    return trainer_state, state


def export_hf(model, tokenizer, out_dir: str | Path) -> Path:
    """The actor as a plain Hugging Face folder (safetensors + config + tokenizer), written atomically."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out
