"""Start the ranks of a multi-process run: one node with torch's own launcher (torch.distributed.elastic, what
torchrun uses), several nodes through Ray (`hybridrl/ray_launch.py`, the one module that imports ray).

    hybridrl train trainer.n_gpus_per_node=4 ...             # 4 ranks on this machine (NCCL; gloo on CPU)
    torchrun --nproc-per-node 4 -m hybridrl.cli train ...     # the same, started by hand
    hybridrl train trainer.nnodes=2 trainer.n_gpus_per_node=8 # 16 ranks placed by Ray (see docs/multi_node.md)

Every rank runs the same `train_async` (each with its own rollout engine on its own device); rank 0 holds the
run lock, writes logs, plots and the export, and returns the result. A rank that fails stops the others; its
error message (a HybridRLError's one line) becomes the launcher's error.

Ctrl-C / SIGTERM on one node (`launch_local`): this launcher process takes SIGINT and SIGTERM itself (torch
elastic is told to leave them alone) and forwards the first one to every rank as SIGUSR1 (SIGINT) or SIGUSR2
(SIGTERM); the ranks finish the step, agree on it, save a checkpoint together and return, and the launcher raises
`hybridrl.train.Stopped` (exit code 130 / 143). A second signal stops at once: KeyboardInterrupt here, and elastic
sends SIGTERM to the ranks, which die at once (their SIGTERM keeps its default action, as when a rank fails).
A signal before every rank has reached its training loop stops at once too. Send SIGTERM to the launcher's PID
(what `kill PID`, Docker and Kubernetes do), not to the whole process group or cgroup (systemd: KillMode=mixed):
a rank that gets SIGTERM itself dies at once and the others fail with it. Under torchrun or Ray the launcher's own
signal handling applies (no graceful stop).
"""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import tempfile
import threading
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
    # graceful stop: we handle SIGINT/SIGTERM here (main thread, and a torch whose elastic can be told not to)
    forward = (ForwardStop(errors, n) if threading.current_thread() is threading.main_thread()
               and "signals_to_handle" in getattr(LaunchConfig, "__dataclass_fields__", {}) else None)
    extra = {"signals_to_handle": "SIGHUP,SIGQUIT"} if forward is not None else {}
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=n, run_id=uuid.uuid4().hex[:8],
                          rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{free_port()}", max_restarts=0,
                          monitor_interval=0.5, start_method="spawn", **extra)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
    saved = {sig: signal.getsignal(sig) for sig in handled}   # elastic replaces them
    try:
        if forward is not None:
            signal.signal(signal.SIGINT, forward)
            signal.signal(signal.SIGTERM, forward)
        results = elastic_launch(config, rank_main)(to_dict(cfg), str(errors), forward is not None)
    except ChildFailedError:
        raise HybridRLError(first_error(errors) or "a rank failed (no message was left; see the output above)") \
            from None
    except SignalException as e:       # SIGHUP / SIGQUIT (or any signal on an older torch): the ranks were stopped
        raise KeyboardInterrupt(str(e)) from None
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        shutil.rmtree(errors, ignore_errors=True)
    out = results[0]
    if isinstance(out, dict) and STOPPED in out:     # the ranks stopped on a forwarded signal, after a checkpoint
        from hybridrl.train import Stopped
        raise Stopped(out[STOPPED], out.get("step"), out.get("checkpoint"))
    return out


STOPPED = "__stopped_on_signal__"                    # rank_main's result when the ranks stopped on a signal
FORWARD = {signal.SIGINT: signal.SIGUSR1, signal.SIGTERM: signal.SIGUSR2}


class ForwardStop:
    """The launcher's SIGINT/SIGTERM handler: the first signal, once every rank is in its training loop (each
    wrote errors_dir/rank<N>.ready with its PID), goes to the ranks as SIGUSR1 / SIGUSR2 (a graceful stop, see
    hybridrl.train.GracefulStop); a second one, or one before the ranks are ready, raises KeyboardInterrupt (then
    torch elastic sends SIGTERM to the ranks)."""

    def __init__(self, errors_dir: Path, n: int):
        self.errors_dir, self.n, self.signum = Path(errors_dir), n, None

    def ready_pids(self) -> list[int]:
        pids = []
        for p in self.errors_dir.glob("rank*.ready"):
            try:
                pids.append(int(p.read_text()))
            except (OSError, ValueError):
                pass
        return pids

    def __call__(self, signum, frame) -> None:
        pids = self.ready_pids() if self.signum is None else []
        if len(pids) < self.n:
            raise KeyboardInterrupt(f"{signal.Signals(signum).name}: stopping every rank at once")
        self.signum = signum
        for pid in pids:
            try:
                os.kill(pid, FORWARD[signum])
            except ProcessLookupError:
                pass


def rank_main(cfg_dict: dict, errors_dir: str | None = None, forwarded_stop: bool = False) -> dict:
    """What every rank runs (torch elastic or a Ray worker): the whole training loop; rank 0's dict is the result.

    forwarded_stop (launch_local): the launcher forwards SIGINT/SIGTERM as SIGUSR1/SIGUSR2 (see ForwardStop);
    a graceful stop returns {STOPPED: signal, "step", "checkpoint"} instead of raising."""
    import torch
    from hybridrl.config import from_dict
    from hybridrl.train import GracefulStop, Stopped, train_async
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))    # ranks share the node's cores
    rank = os.environ.get("RANK", "0")
    stop = (GracefulStop.for_launched_rank(Path(errors_dir, f"rank{rank}.ready"))
            if forwarded_stop and errors_dir else GracefulStop(enabled=False))
    try:
        cfg = from_dict(cfg_dict)
        return asyncio.run(train_async(cfg, stop=stop))
    except Stopped as e:
        if not forwarded_stop:
            raise
        return {STOPPED: e.signum, "step": e.step, "checkpoint": e.checkpoint}
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
