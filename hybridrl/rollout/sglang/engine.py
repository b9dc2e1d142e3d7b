"""SGLangEngine: the RolloutEngine protocol over a real SGLang server's HTTP API (launched or attached).

    engine = SGLangEngine.from_config(cfg, model_path)      # launches `sglang.launch_server`, or attaches
    outs = await engine.generate(prompt_ids, SamplingParams(max_new_tokens=64, n=4))
    await engine.sleep(["kv_cache", "weights"])             # colocated: free the GPU for the trainer
    await engine.update_weights(buckets, version)           # the whole sync; serves `version` after
    await engine.close()

`update_weights` is a multi-stage wake around one push: resume the released weights, push every
bucket through the transport chosen at build (rollout.weight_sync: tensor | disk | nccl, see
transport.py), flush the prefix cache once, check that the server reports `version`, then resume
the released KV cache (last, so the push never competes with the KV pool for memory).

Token-in/token-out: /generate gets `input_ids`, returns `output_ids` and
`meta_info.output_token_logprobs` ([logprob, token_id, text], ...). No batch barrier: every
call is its own request; cancelling a call sends /abort_request for its id. The same client
drives `hybridrl serve` (our native engine behind SGLang's HTTP subset), which CPU tests use.
"""
from __future__ import annotations

import asyncio
import functools
import sys
import uuid
from dataclasses import replace
from typing import Iterable, Sequence

from hybridrl import HybridRLError
from hybridrl.rollout.base import TAGS, EngineRestarted, GenerateOutput, SamplingParams
from hybridrl.rollout.sglang import compat
from hybridrl.rollout.sglang import launch as launcher
from hybridrl.rollout.sglang import transport as transports
from hybridrl.rollout.sglang.client import HTTPClient, RequestTimeout, ServerError

FINISH = {"stop": "stop", "length": "length", "abort": "abort"}


def sampling_body(s: SamplingParams) -> dict:
    """Our SamplingParams → SGLang's `sampling_params` dict."""
    body = {"max_new_tokens": s.max_new_tokens, "temperature": s.temperature, "top_p": s.top_p,
            "top_k": s.top_k, "min_p": s.min_p, "n": s.n, "ignore_eos": s.ignore_eos}
    if s.stop_token_ids:
        body["stop_token_ids"] = list(s.stop_token_ids)
    if s.stop:
        body["stop"] = list(s.stop)
    if s.seed is not None:
        body["sampling_seed"] = s.seed
    return body


def parse_output(item: dict, default_version: int) -> GenerateOutput:
    """One /generate reply item → GenerateOutput (log-probs from meta_info.output_token_logprobs)."""
    if not isinstance(item, dict):
        raise TypeError(f"expected a JSON object per sample, got {type(item).__name__}")
    meta = item.get("meta_info", {})
    reason = meta.get("finish_reason") or {}
    kind = reason.get("type") if isinstance(reason, dict) else str(reason)
    ids = [int(t) for t in item.get("output_ids", [])]
    lps = [float(x[0]) if x[0] is not None else 0.0 for x in meta.get("output_token_logprobs") or []]
    if len(lps) != len(ids):
        raise ValueError(f"{len(ids)} output_ids but {len(lps)} output_token_logprobs")
    return GenerateOutput(output_ids=ids, logprobs=lps, finish_reason=FINISH.get(kind, "abort"),
                          prompt_tokens=int(meta.get("prompt_tokens", 0)),
                          completion_tokens=int(meta.get("completion_tokens", len(ids))),
                          weight_version=version_int(meta.get("weight_version"), default_version))


def version_int(value, default: int) -> int:
    """SGLang keeps weight_version as a string ('default' before any update)."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


class SGLangEngine:
    """The RolloutEngine protocol over SGLang's HTTP API. Build it with `from_config`."""

    def __init__(self, url: str, info: dict, *, process: launcher.ServerProcess | None = None,
                 model_path: str = "", weight_sync: str = "tensor", tp_size: int = 1,
                 request_timeout: float = 600.0, update_timeout: float = 600.0, run_dir: str = "",
                 retries: int = 3, backoff: float = 0.5, leader: bool = True, dp=None):
        from hybridrl.parallel import DP
        self.url, self.process, self.model_path = url, process, model_path
        self.leader, self.dp = leader, dp or DP()     # a replica shared by ranks: only its leader controls it
        self.relaunch, self.restarts_left = None, 0   # set by from_config for a server we launched
        self.needs_weights, self.restarts = False, 0  # after a restart: no generation until a push
        self.api_version, self.native = compat.check_version(info)
        self.server_version = str(info.get("version"))
        self.tp_size, self.run_dir, self.update_timeout = tp_size, run_dir, update_timeout
        self.weight_version = version_int(info.get("weight_version"), 0)
        self.client = HTTPClient(url, timeout=request_timeout, retries=retries, backoff=backoff)
        self._released: set[str] = set()   # memory tags released by sleep() (this client is the only controller)
        self.transport = transports.make_transport(weight_sync, self)      # chosen once: how weights travel

    @classmethod
    def from_config(cls, cfg, model_path: str | None = None, *, launch_cmd: list[str] | None = None,
                    run_dir: str | None = None) -> "SGLangEngine":
        """Attach to rollout.server_url, or launch a server for model_path (default cfg.model.path).

        With several data-parallel ranks each rank calls this: the leader of each replica launches its server,
        every rank learns its replica's URL (a collective), see replicas.py."""
        import os
        from hybridrl.parallel import DP
        from hybridrl.rollout.sglang import replicas
        r = cfg.rollout
        transports.transport_class(r.weight_sync).check(cfg)      # refuse before a server starts
        model_path = model_path or cfg.model.path
        run_dir = run_dir if run_dir is not None else _run_dir(cfg)
        process, url = None, r.server_url.rstrip("/")
        dp = DP.current()
        rep = replicas.place(dp.rank, dp.world, r.tensor_model_parallel_size, bool(url), _gpu_index(cfg))
        if launch_cmd is None and os.environ.get("HYBRIDRL_SGLANG_CMD"):   # e.g. `python -m hybridrl.rollout.native.server`
            launch_cmd = os.environ["HYBRIDRL_SGLANG_CMD"].split()
        if not url and rep.leader:
            if not model_path:
                raise HybridRLError("rollout.name=sglang needs a model: set model.path (or rollout.server_url)")
            if dp.world > 1:
                run_dir = os.path.join(run_dir, f"replica{rep.index}")
                os.makedirs(run_dir, exist_ok=True)
            relaunch = functools.partial(launcher.launch, cfg, model_path, run_dir, launch_cmd,
                                         base_gpu_id=rep.base_gpu_id, first_port=30000 + 50 * rep.index)
            process, url = relaunch()
        if dp.world > 1 and not r.server_url:
            url = dp.gather([url])[rep.leader_rank]               # collective: every rank learns its server
        try:
            info = launcher.get_info(url, compat.SERVER_INFO_PATHS)
            info["weight_version"] = launcher.get_info(url, compat.MODEL_INFO_PATHS).get("weight_version")
            engine = cls(url, info, process=process, model_path=model_path, weight_sync=r.weight_sync,
                         tp_size=r.tensor_model_parallel_size, request_timeout=r.request_timeout,
                         update_timeout=max(r.request_timeout, 60.0), run_dir=run_dir, leader=rep.leader, dp=dp)
            if process is not None:
                engine.relaunch, engine.restarts_left = relaunch, r.server_restarts
            engine.transport.prepare()
            return engine
        except BaseException:
            if process is not None:
                process.stop()
            raise

    # ---- generation -------------------------------------------------------------------------
    async def generate(self, input_ids: list[int], sampling: SamplingParams,
                       request_id: str | None = None) -> list[GenerateOutput]:
        sampling.validate()
        if self.needs_weights:
            raise EngineRestarted(f"the rollout server at {self.url} was restarted and has no weights yet")
        rid = request_id or uuid.uuid4().hex
        if sampling.seed is not None and sampling.n > 1 and not self.native:
            # SGLang seeds by (seed, position): n parallel samples sharing one seed would be identical
            # under --enable-deterministic-inference. Send n requests with their own seeds instead;
            # the radix cache still shares the prompt's prefill.
            parts = await asyncio.gather(*(
                self.generate(input_ids, replace(sampling, n=1, seed=(sampling.seed * 7919 + i) % (2**31 - 1)),
                              f"{rid}-{i}") for i in range(sampling.n)))
            return [o for part in parts for o in part]
        body = {"input_ids": list(input_ids), "sampling_params": sampling_body(sampling),
                "return_logprob": True, "rid": rid}
        timeout = max(self.client.timeout, 0.1 * sampling.max_new_tokens)   # long requests get more (10 tok/s)
        try:
            reply = await self._call("POST", "/generate", body, request_id=rid, timeout=timeout)
        except asyncio.CancelledError:
            await self._abort_quietly(rid)
            raise
        except RequestTimeout:
            await self._abort_quietly(rid)
            raise
        items = reply if isinstance(reply, list) else [reply]
        try:
            return [parse_output(item, self.weight_version) for item in items]
        except (TypeError, ValueError, AttributeError, KeyError, IndexError) as e:
            raise HybridRLError(f"the rollout server at {self.url} sent a /generate reply hybridrl cannot read "
                                f"({type(e).__name__}: {e}): {str(reply)[:200]!r}; is it SGLang "
                                f"{'.'.join(map(str, self.api_version))}?") from None

    async def abort(self, request_id: str | None = None) -> None:
        body = {"rid": "", "abort_all": True} if request_id is None else {"rid": request_id, "abort_all": False}
        await self._call("POST", "/abort_request", body, timeout=30)

    async def _abort_quietly(self, rid: str) -> None:
        try:
            await asyncio.shield(asyncio.wait_for(self.abort(rid), 10))
        except (Exception, asyncio.CancelledError):
            pass        # best effort: the server may be gone, and we are already unwinding

    # ---- memory -----------------------------------------------------------------------------
    async def sleep(self, tags: Sequence[str] = TAGS) -> None:
        """Release the tags not yet released (SGLang's scheduler must not see a tag twice).
        Shared replica: every rank has finished generating (barrier) before its leader releases memory."""
        self.dp.barrier()
        if not self.leader:
            return
        todo = [t for t in self._check_tags(tags) if t not in self._released]
        if todo:
            await self._call("POST", "/release_memory_occupation", self._tags_body(todo), timeout=self.update_timeout)
            self._released.update(todo)

    async def wake(self, tags: Sequence[str] = TAGS) -> None:
        """Resume only released tags: resuming a live tag crashes SGLang 0.5.17's scheduler (KeyError)."""
        todo = [t for t in self._check_tags(tags) if t in self._released]
        if todo:
            await self._call("POST", "/resume_memory_occupation", self._tags_body(todo), timeout=self.update_timeout)
            self._released.difference_update(todo)

    @staticmethod
    def _check_tags(tags: Sequence[str]) -> list[str]:
        bad = [t for t in tags if t not in TAGS]
        if bad:
            raise HybridRLError(f"unknown memory tags {bad}: use {list(TAGS)}")
        return list(tags)

    def _tags_body(self, tags: list[str]) -> dict:
        return {"tags": tags} if compat.supports_memory_tags(self.api_version) else {}

    async def flush_cache(self, attempts: int = 20) -> None:
        """Drop the prefix cache; SGLang refuses (400) while requests run, so retry a bounded number of times.

        update_weights calls it once per sync, after the last bucket: asking for the flush inside the
        last push instead would make SGLang assert (and its scheduler die) if a request still ran."""
        for i in range(attempts):
            try:
                await self._call("POST", "/flush_cache", None, timeout=60)
                return
            except ServerError as e:
                if e.status != 400 or i + 1 == attempts:
                    raise HybridRLError(f"flush_cache failed on {self.url}: {e.reason}") from None
                await asyncio.sleep(0.25)

    # ---- weights ----------------------------------------------------------------------------
    @property
    def weight_sync(self) -> str:
        return self.transport.name

    @weight_sync.setter
    def weight_sync(self, name: str) -> None:
        """Swap the transport (tests, benchmarks); a training run keeps the one chosen when it was built."""
        self.transport = transports.make_transport(name, self)

    async def update_weights(self, buckets: Iterable[Sequence[tuple[str, object]]], version: int) -> None:
        """Wake released weights, push every bucket with `version`, flush once, check the version, wake the KV cache.
        Shared replica: the other ranks take part in the weight gathers, then wait until the leader is done.
        After a restart (EngineRestarted) this push is what makes the server usable again."""
        if not self.leader:
            for _ in buckets:                  # the gathers behind the buckets are collectives
                pass
            self.dp.barrier()
            self.weight_version = version
            return
        await self.wake(["weights"])
        await self.transport.push(buckets, version)
        await self.flush_cache()
        await self._check_version(version)
        self.weight_version = version
        await self.wake(["kv_cache"])
        self.needs_weights = False
        self.dp.barrier()

    async def post_weights(self, path: str, body: dict, label: str, retries: int = 1) -> None:
        """One weight push for a transport; a refusal names the bucket (`label`) and the server's reason."""
        try:
            # one retry by default: a push is idempotent (same tensors, same version), a dropped socket is not fatal
            reply = await self._call("POST", path, body, timeout=self.update_timeout, retries=retries)
        except ServerError as e:
            raise HybridRLError(f"the server refused weights [{label}] at {path}: {e.reason}") from None
        except HybridRLError as e:
            raise HybridRLError(f"weight push [{label}] to {path} failed: {e}") from None
        if isinstance(reply, dict) and reply.get("success") is False:
            raise HybridRLError(f"the server refused weights [{label}] at {path}: {reply.get('message')}")

    async def _check_version(self, version: int) -> None:
        info = await self.model_info()
        got = info.get("weight_version")
        if str(got) != str(version):
            raise HybridRLError(f"after the weight push the server reports weight_version={got!r}, expected "
                                f"{version}: the update did not take effect on {self.url}")

    # ---- info / lifecycle -------------------------------------------------------------------
    async def model_info(self) -> dict:
        for path in compat.MODEL_INFO_PATHS:
            try:
                return await self._call("GET", path, None, timeout=30)
            except ServerError as e:
                if e.status != 404:
                    raise
        raise HybridRLError(f"{self.url} answers neither of {compat.MODEL_INFO_PATHS}")

    async def close(self) -> None:
        await self.client.close()
        if self.process is not None:
            await asyncio.to_thread(self.process.stop)
            self.process = None

    async def _call(self, method: str, path: str, body, **kw):
        """One client call; when our launched server has died, say so with its log's last lines."""
        try:
            return await self.client.request(method, path, body, **kw)
        except (ServerError, RequestTimeout):
            raise                                   # the server answered, or is still working
        except HybridRLError as e:
            if self.process is not None and await asyncio.to_thread(self.process.exited_within, 3.0):
                died = (f"the rollout server exited with code {self.process.proc.returncode}; "
                        f"last lines of {self.process.log_path}:\n{self.process.log_tail()}")
                if await self._restart(died):
                    raise EngineRestarted(f"{e}\n{died}\nrestarted it at {self.url}") from None
                raise HybridRLError(f"{e}\n{died}") from None
            if self.needs_weights:                  # a request sent to the old server while we restarted
                raise EngineRestarted(str(e)) from None
            raise

    async def _restart(self, why: str) -> bool:
        """Start our server again (rollout.server_restarts times per run); True when this or a concurrent call did.
        The new server serves nothing until update_weights pushes the weights again."""
        if self.relaunch is None:
            return False
        if self.needs_weights:                      # another request saw the same death and restarted it
            return True
        if self.restarts_left <= 0:
            return False
        self.restarts_left -= 1
        self.needs_weights, self.restarts = True, self.restarts + 1
        print(f"warning: {why.splitlines()[0]}; starting it again ({self.restarts_left} restarts left)",
              file=sys.stderr, flush=True)
        old = self.process
        await asyncio.to_thread(old.stop)
        try:
            self.process, url = await asyncio.to_thread(self.relaunch)
        except HybridRLError as e:
            self.process = None
            raise HybridRLError(f"{why}\nstarting it again failed: {e}") from None
        await self.client.close()
        self.url = url
        self.client = HTTPClient(url, timeout=self.client.timeout, retries=self.client.retries,
                                 backoff=self.client.backoff)
        self._released.clear()                      # a fresh server holds all its memory
        self.transport = transports.make_transport(self.weight_sync, self)   # an NCCL group is joined anew
        self.transport.prepare()
        return True


def _gpu_index(cfg) -> int | None:
    """This process's CUDA device index (the rank's GPU), or None for a CPU trainer / no CUDA."""
    import torch
    if cfg.trainer.device == "cpu" or not torch.cuda.is_available():
        return None
    return torch.cuda.current_device()


def _run_dir(cfg) -> str:
    """The run folder for logs; a temp folder when the config still holds unresolved ${...}."""
    import tempfile
    d = cfg.trainer.default_local_dir
    return tempfile.mkdtemp(prefix="hybridrl-sglang-") if "${" in d else d

