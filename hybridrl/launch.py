"""Start the ranks of a multi-process run: one node with torch's own launcher (torch.distributed.elastic, what
torchrun uses), several nodes through Ray (`hybridrl/ray_launch.py`, the one module that imports ray).

    hybridrl train trainer.n_gpus_per_node=4 ...             # 4 ranks on this machine (NCCL; gloo on CPU)
    torchrun --nproc-per-node 4 -m hybridrl.cli train ...     # the same, started by hand
    hybridrl train trainer.nnodes=2 trainer.n_gpus_per_node=8 # 16 ranks placed by Ray (see docs/multi_node.md)

Every rank runs the same `train_async` (each with its own rollout engine on its own device); rank 0 holds the
run lock, writes logs, plots and the export, and returns the result. A rank that fails stops the others; its
error message (a HybridRLError's one line) becomes the launcher's error.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import tempfile
import uuid
from pathlib import Path

from hybridrl import HybridRLError

RANK_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def world_size(cfg) -> int:
    return cfg.trainer.n_gpus_per_node * cfg.trainer.nnodes


def under_launcher() -> bool:
    """True in a process started by torchrun, elastic or Ray with the rank variables set."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def check_world(cfg) -> None:
    """Inside a launched rank: the launcher's world must be the one the config asks for."""
    want, have = world_size(cfg), int(os.environ["WORLD_SIZE"])
    if want != have and want != 1:
        raise HybridRLError(f"this process is one of WORLD_SIZE={have} ranks but the config asks for "
                            f"trainer.nnodes x trainer.n_gpus_per_node = {want}: make them agree")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def launch_local(cfg) -> dict:
    """trainer.n_gpus_per_node ranks on this machine, through torch.distributed.elastic; rank 0's result."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch
    from hybridrl.config import to_dict
    n = cfg.trainer.n_gpus_per_node
    if cfg.trainer.device != "cpu":
        import torch
        if torch.cuda.is_available() and torch.cuda.device_count() < n:
            raise HybridRLError(f"trainer.n_gpus_per_node={n} but {torch.cuda.device_count()} GPUs are visible: "
                                "lower it, or trainer.device=cpu for a CPU run")
    errors = Path(tempfile.mkdtemp(prefix="hybridrl-ranks-"))
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=n, run_id=uuid.uuid4().hex[:8],
                          rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{free_port()}", max_restarts=0,
                          monitor_interval=0.5, start_method="spawn")
    from torch.distributed.elastic.multiprocessing.api import SignalException
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}   # elastic replaces them
    try:
        results = elastic_launch(config, rank_main)(to_dict(cfg), str(errors))
    except ChildFailedError:
        raise HybridRLError(first_error(errors) or "a rank failed (no message was left; see the output above)") \
            from None
    except SignalException as e:       # Ctrl-C / kill: the ranks were stopped; say so the usual way
        raise KeyboardInterrupt(str(e)) from None
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        shutil.rmtree(errors, ignore_errors=True)
    return results[0]


def rank_main(cfg_dict: dict, errors_dir: str | None = None) -> dict:
    """What every rank runs (torch elastic or a Ray worker): the whole training loop; rank 0's dict is the result."""
    import torch
    from hybridrl.config import from_dict
    from hybridrl.train import train_async
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))    # ranks share the node's cores
    try:
        cfg = from_dict(cfg_dict)
        return asyncio.run(train_async(cfg))
    except BaseException as e:
        if errors_dir:
            msg = str(e) if isinstance(e, HybridRLError) else f"{type(e).__name__}: {e}"
            Path(errors_dir, f"rank{os.environ.get('RANK', '0')}.err").write_text(msg)
        raise


def first_error(errors_dir: Path) -> str | None:
    """The lowest rank's message (a rank that fails first makes the others fail on a collective)."""
    found = sorted(errors_dir.glob("rank*.err"), key=lambda p: int(p.stem[4:]))
    real = [p for p in found if "timed out" not in p.read_text() and "Connection" not in p.read_text()]
    for p in real or found:
        return f"rank {p.stem[4:]}: {p.read_text().strip()}"
    return None
