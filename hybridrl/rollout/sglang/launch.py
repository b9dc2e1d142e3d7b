"""Start an SGLang server as a child process group, wait until it is healthy, stop it cleanly.

    proc, url = launch(cfg, model_path, run_dir)        # `python -m sglang.launch_server ...` on a free port
    ...
    proc.stop()                                         # SIGTERM the group, SIGKILL after a bound

`launch_cmd` replaces `python -m sglang.launch_server` (tests pass `python -m
hybridrl.rollout.native.server`, which takes the same flags), so the launcher itself runs on CPU.
The server's output goes to `<run_dir>/sglang_server.log`; errors quote its last lines.
`--enable-memory-saver` is on when rollout.free_cache_engine is (sleeping needs it); a real SGLang
always starts with its TP memory-imbalance check off (logged; see `launch_env`).
"""
from __future__ import annotations

import atexit
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from hybridrl import HybridRLError
from hybridrl.rollout.sglang import compat

SGLANG_CMD = [sys.executable, "-m", "sglang.launch_server"]
LOG_NAME = "sglang_server.log"


def server_flags(cfg, model_path: str, host: str, port: int, base_gpu_id: int | None = None) -> list[str]:
    """Our RolloutConfig → `sglang.launch_server` flags; engine_kwargs["sglang"] is passed through."""
    r = cfg.rollout
    flags = ["--model-path", model_path, "--host", host, "--port", str(port),
             "--tp-size", str(r.tensor_model_parallel_size),
             "--mem-fraction-static", str(r.gpu_memory_utilization),
             "--max-running-requests", str(r.max_num_seqs),
             "--load-format", r.load_format, "--log-level", r.log_level,
             "--random-seed", str(r.seed), "--skip-tokenizer-init", "--skip-server-warmup"]
    if base_gpu_id:                                 # a replica on this node's GPUs base_gpu_id .. + tp - 1
        flags += ["--base-gpu-id", str(base_gpu_id)]
    if r.dtype != "auto":
        flags += ["--dtype", r.dtype]
    if r.enforce_eager:
        flags.append("--disable-cuda-graph")
    if r.attention_backend:
        flags += ["--attention-backend", r.attention_backend]
    if r.free_cache_engine:
        flags.append("--enable-memory-saver")      # what release/resume_memory_occupation (sleep) needs
    if cfg.model.trust_remote_code:
        flags.append("--trust-remote-code")
    return flags + passthrough_flags(r.engine_kwargs.get("sglang", {}) or {})


def passthrough_flags(kwargs: dict) -> list[str]:
    """{chunked_prefill_size: 4096, enable_x: true, off: false, ids: [1, 2]} → ['--chunked-prefill-size', '4096', '--enable-x', '--ids', '1', '2']."""
    out = []
    for key, value in kwargs.items():
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, (list, tuple)):
            out += [flag] + [str(v) for v in value]
        elif isinstance(value, dict):
            out += [flag, json.dumps(value)]
        else:
            out += [flag, str(value)]
    return out


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def find_free_port(start: int = 30000, host: str = "127.0.0.1", tries: int = 200) -> int:
    """The first free port at or after `start` (a port in use → the next one); stride 7 leaves room for SGLang's own ports."""
    for port in range(start, start + 7 * tries, 7):
        if port_is_free(port, host):
            return port
    raise HybridRLError(f"no free TCP port in {start}..{start + 7 * tries} on {host}: free one or set rollout.server_url")


def check_sglang_installed() -> None:
    if importlib.util.find_spec("sglang") is None:
        raise HybridRLError("rollout.name=sglang but the `sglang` package is not installed: "
                            "run `pip install hybridrl[sglang]` (SGLang >=0.4.8,<0.6), "
                            "or set rollout.server_url to attach to a running server")


class ServerProcess:
    """A server child in its own process group, its log file, and a bounded stop."""

    def __init__(self, cmd: list[str], log_path: str, env: dict | None = None):
        self.cmd, self.log_path = cmd, log_path
        os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
        self._log = open(log_path, "ab")
        self._log.write(("$ " + " ".join(cmd) + "\n").encode())
        self._log.flush()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env={**os.environ, **(env or {})}, start_new_session=True)
        atexit.register(self.stop)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def exited_within(self, timeout: float) -> bool:
        """True if the child has exited or does so within `timeout` seconds (it may be going down right now)."""
        try:
            self.proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def log_tail(self, n: int = 30) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(max(0, os.path.getsize(self.log_path) - 64 * 1024))
                lines = fh.read().decode(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def wait_healthy(self, url: str, timeout: float, poll: float = 0.5) -> None:
        """Poll GET /health until 200; the child exiting or the timeout raises with the log's last lines."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive:
                raise HybridRLError(f"the rollout server exited with code {self.proc.returncode} while starting "
                                    f"(log: {self.log_path}); its last lines:\n{self.log_tail()}")
            if http_status(url + "/health", timeout=2.0) == 200:
                return
            time.sleep(poll)
        self.stop()
        raise HybridRLError(f"the rollout server at {url} was not healthy within {timeout:.0f} s "
                            f"(rollout.server_start_timeout; log: {self.log_path}); its last lines:\n{self.log_tail()}")

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM the whole group, SIGKILL it after `grace` seconds. Safe to call twice."""
        if self.proc.poll() is None:
            _signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                _signal_group(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        _signal_group(self.proc.pid, signal.SIGKILL)     # grandchildren that outlived the leader
        if not self._log.closed:
            self._log.close()
        atexit.unregister(self.stop)


def _signal_group(pgid: int, sig) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def http_status(url: str, timeout: float) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code
    except (OSError, ValueError):
        return None


def http_get_json(url: str, timeout: float = 10.0):
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read() or b"null")


def get_info(base_url: str, paths: tuple[str, ...], timeout: float = 10.0) -> dict:
    """GET the first of `paths` that exists (404 → next): the /server_info vs /get_server_info shim."""
    errors = []
    for path in paths:
        try:
            return http_get_json(base_url + path, timeout)
        except urllib.error.HTTPError as e:
            errors.append(f"{path}: HTTP {e.code}")
            if e.code != 404:
                break
        except OSError as e:
            raise HybridRLError(f"cannot reach the rollout server at {base_url}: {e}; "
                                f"check rollout.server_url or that the server is running") from None
    raise HybridRLError(f"the server at {base_url} answers none of {paths} ({'; '.join(errors)}): is it SGLang?")


def launch(cfg, model_path: str, run_dir: str, launch_cmd: list[str] | None = None,
           host: str = "127.0.0.1", attempts: int = 2, base_gpu_id: int | None = None,
           first_port: int = 30000) -> tuple[ServerProcess, str]:
    """Start the server on a free port and wait for /health; a port taken meanwhile → retry on another."""
    if launch_cmd is None:
        check_sglang_installed()
    cmd0 = list(launch_cmd or SGLANG_CMD)
    env = launch_env(real_sglang=launch_cmd is None)
    port = first_port
    for attempt in range(attempts):
        port = find_free_port(port, host)
        url = f"http://{host}:{port}"
        proc = ServerProcess(cmd0 + server_flags(cfg, model_path, host, port, base_gpu_id),
                             os.path.join(run_dir, LOG_NAME), env)
        try:
            proc.wait_healthy(url, cfg.rollout.server_start_timeout)
            return proc, url
        except HybridRLError:
            proc.stop()
            if attempt + 1 < attempts and "address already in use" in proc.log_tail().lower():
                port += 7
                continue
            raise
    raise AssertionError("unreachable")


def launch_env(real_sglang: bool) -> dict:
    """Environment for the child. A real SGLang always gets its TP memory-imbalance check off (its
    name depends on the version): other processes on its GPUs, the trainer among them, make free
    memory differ across TP ranks, and the check would refuse to start."""
    env = {"NCCL_CUMEM_ENABLE": "0", "TORCH_NCCL_AVOID_RECORD_STREAMS": "1"}
    version = compat.installed_sglang_version() if real_sglang else None
    if version is not None:
        off = compat.tp_memory_check_env(version, check=False)
        env.update(off)
        print(f"sglang: launching with {' '.join(f'{k}={v}' for k, v in off.items())} "
              f"(TP memory-imbalance check off)", file=sys.stderr, flush=True)
    return env
