"""NativeEngine: the pure-PyTorch rollout engine (CPU and GPU) behind the RolloutEngine protocol.

    engine = NativeEngine("path/to/hf_model")            # or NativeEngine.from_config(cfg)
    outs = await engine.generate(prompt_ids, SamplingParams(max_new_tokens=64, n=4, temperature=1.0))
    await engine.sleep(["kv_cache", "weights"])           # colocated: free the GPU for the trainer
    await engine.update_weights(buckets, version=1)      # wakes, loads (all or nothing), serves version 1

One background task per event loop runs the scheduler one step at a time in a single worker
thread (`run_in_executor`), so the loop stays free for HTTP handlers (/health, /abort_request)
while the model works. Everything that touches the model or the KV pool (steps, weight updates,
sleep / wake) runs in that one thread, one after another; requests and aborts are handed to the
scheduler between steps. Requests are checked whole in `generate`, so a bad one fails alone; if a
step still raises, only the requests of that step fail. Pieces: scheduler.py (continuous batching),
runner.py (model + KV pool + CUDA graphs), sampler.py, kv_cache.py, loader.py, model.py, attention.py.
"""
from __future__ import annotations

import asyncio
import itertools
import math
import numbers
import operator
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Sequence as Seq

import torch

from hybridrl import HybridRLError
from hybridrl.devices import resolve_device, resolve_dtype
from hybridrl.rollout.base import TAGS, GenerateOutput, SamplingParams
from hybridrl.rollout.native.kv_cache import BlockManager, BlockTable, bytes_per_token, check_pool, pool_tokens
from hybridrl.rollout.native.loader import check_weights, copy_weights
from hybridrl.rollout.native.runner import ModelRunner
from hybridrl.rollout.native.sampler import batch_flags, params_block, sample
from hybridrl.rollout.native.scheduler import Request, Scheduler, Sequence

INCONSISTENT = ("weights are inconsistent after a failed push (some buckets were loaded, a later one was refused); "
                "push again: generate() works again once an update_weights() succeeds")


def prompt_ids(ids, vocab: int | None = None, field: str = "input_ids") -> list[int]:
    """A prompt as a non-empty list of Python ints in [0, vocab); else HybridRLError naming the entry."""
    if isinstance(ids, (str, bytes, dict)) or not hasattr(ids, "__iter__"):
        raise HybridRLError(f"{field} must be a list of token ids, got {type(ids).__name__}")
    out = []
    for i, t in enumerate(ids):
        try:
            if isinstance(t, bool):
                raise TypeError
            out.append(operator.index(t))
        except TypeError:
            raise HybridRLError(f"{field}[{i}] = {t!r} is not an integer token id") from None
    if not out:
        raise HybridRLError(f"empty prompt: {field} must hold at least one token")
    if vocab is not None and (min(out) < 0 or max(out) >= vocab):
        raise HybridRLError(f"{field}: prompt token ids must be in [0, {vocab}); got {min(out)}..{max(out)}")
    return out


def check_sampling(sp: SamplingParams) -> None:
    """Every knob's type and range (NaN / inf, floats where ints belong), beyond SamplingParams.validate."""
    if not isinstance(sp, SamplingParams):
        raise HybridRLError(f"sampling must be a SamplingParams, got {type(sp).__name__}")
    for name in ("max_new_tokens", "n", "top_k") + (("seed",) if sp.seed is not None else ()):
        v = getattr(sp, name)
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise HybridRLError(f"{name} must be an integer, got {v!r}")
    for name in ("temperature", "top_p", "min_p"):
        v = getattr(sp, name)
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise HybridRLError(f"{name} must be a finite number, got {v!r}")
    sp.validate()
    if sp.top_k < -1:
        raise HybridRLError(f"top_k must be >= 1, or -1 (or 0) for off; got {sp.top_k}")
    if not 0 <= sp.min_p <= 1:
        raise HybridRLError(f"min_p must be in [0, 1], got {sp.min_p}")
    if not isinstance(sp.ignore_eos, bool):
        raise HybridRLError(f"ignore_eos must be true or false, got {sp.ignore_eos!r}")
    if not isinstance(sp.stop_token_ids, (list, tuple)) or any(
            isinstance(t, bool) or not isinstance(t, numbers.Integral) for t in sp.stop_token_ids):
        raise HybridRLError(f"stop_token_ids must be a list of integer token ids, got {sp.stop_token_ids!r}")
    if not isinstance(sp.stop, (list, tuple)) or not all(isinstance(t, str) and t for t in sp.stop):
        raise HybridRLError(f"stop must be a list of non-empty strings, got {sp.stop!r}")


def try_tokenizer(model_path: str):
    """The model folder's tokenizer, or None (stop strings then need one passed in)."""
    try:
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(model_path)
    except Exception:  # noqa: BLE001 - a folder without tokenizer files is fine for token-in/token-out
        return None


class NativeEngine:
    def __init__(self, model_path: str, *, device: str = "auto", dtype: str = "auto",
                 gpu_memory_utilization: float = 0.5, max_num_seqs: int = 256, max_num_batched_tokens: int = 8192,
                 kv_block_size: int = 16, kv_cache_tokens: int | None = None, seed: int = 0, tokenizer=None,
                 max_model_len: int | None = None, enforce_eager: bool = False, weights_backup: bool = True):
        self.device = resolve_device(device)
        # sleep(["weights"]): True copies them to host memory (wake restores them); False frees them (SGLang's
        # release without --enable-weights-cpu-backup), and only a push that holds every weight wakes them
        self.weights_backup, self._discarded = weights_backup, False
        self.runner = ModelRunner(model_path, self.device, resolve_dtype(dtype, self.device),
                                  block_size=kv_block_size, max_model_len=max_model_len,
                                  use_cuda_graphs=not enforce_eager)
        args = self.runner.args
        self.max_model_len = self.runner.max_model_len
        self.max_num_seqs = max_num_seqs
        self.bytes_per_token = bytes_per_token(args, self.runner.dtype)
        tokens = pool_tokens(args, self.runner.dtype, self.device, kv_cache_tokens=kv_cache_tokens,
                             gpu_memory_utilization=gpu_memory_utilization, max_num_seqs=max_num_seqs,
                             max_model_len=self.max_model_len)
        self.runner.allocate_kv(tokens // kv_block_size + 1)          # + the scratch block 0
        self.block_manager = BlockManager(self.runner.num_blocks, kv_block_size)
        self.block_table = BlockTable(max_num_seqs, -(-self.max_model_len // kv_block_size))
        self.tokenizer = tokenizer if tokenizer is not None else try_tokenizer(model_path)
        self.scheduler = Scheduler(self.block_manager, self.block_table, max_num_seqs, max_num_batched_tokens,
                                   self.tokenizer)
        self.eos_token_ids = frozenset(args.eos_token_ids)
        self.weight_version = 0
        self.stats: Counter = Counter()     # prefill_calls, prefill_tokens, decode_steps, generated_tokens
        self._seeds = random.Random(seed)
        self._ids = itertools.count()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="native-engine")
        self._requests: dict[str, Request] = {}
        self._futures: dict[str, asyncio.Future] = {}
        self._inbox: list[Sequence] = []
        self._aborts: list[str | None] = []
        self._asleep: set[str] = set()
        self._inconsistent = False          # a streamed push failed part-way: refuse to generate
        self._stepping: list[Sequence] = []  # the sequences of the step running now (to fail if it raises)
        self._loop = self._task = self._wakeup = None

    @classmethod
    def from_config(cls, cfg, model_path: str | None = None) -> "NativeEngine":
        """Build from a hybridrl Config: model.path (or the embedded default) and the rollout section."""
        r = cfg.rollout
        if not model_path:
            from hybridrl.models import default_model_path
            model_path = cfg.model.path or default_model_path()
        device = resolve_device(cfg.trainer.device)
        per_seq = cfg.data.max_prompt_length + r.response_length
        kv_tokens = None if device.type == "cuda" else r.max_num_seqs * per_seq
        tokenizer = try_tokenizer(cfg.model.tokenizer_path) if cfg.model.tokenizer_path else None
        return cls(model_path, device=str(device), dtype=r.dtype if r.dtype != "auto" else cfg.model.dtype,
                   gpu_memory_utilization=r.gpu_memory_utilization, max_num_seqs=r.max_num_seqs,
                   max_num_batched_tokens=r.max_num_batched_tokens, kv_block_size=r.kv_block_size,
                   kv_cache_tokens=kv_tokens, seed=r.seed, tokenizer=tokenizer, enforce_eager=r.enforce_eager,
                   weights_backup=False)     # training pushes every weight after each sleep: no host copy

    # ------------------------------------------------------------------ requests
    async def generate(self, input_ids: list[int], sampling: SamplingParams,
                       request_id: str | None = None) -> list[GenerateOutput]:
        """`sampling.n` completions of one prompt; bad input raises HybridRLError for this request only."""
        req, ids = self._new_request(input_ids, sampling, request_id)
        fut = asyncio.get_running_loop().create_future()
        self._requests[req.id], self._futures[req.id] = req, fut
        parent = Sequence(req, 0, ids, n_fork=sampling.n)
        req.seqs.append(parent)
        self._inbox.append(parent)
        self._kick()
        try:
            return await fut
        except asyncio.CancelledError:
            self._aborts.append(req.id)
            self._kick()
            raise

    def _new_request(self, input_ids, sp: SamplingParams, request_id: str | None) -> tuple[Request, list[int]]:
        """Check everything about a request here, so nothing a step cannot run reaches a step."""
        if self._asleep:
            raise HybridRLError(f"the engine is asleep ({sorted(self._asleep)}): update_weights() or wake() "
                                "restores it")
        if self._inconsistent:
            raise HybridRLError(INCONSISTENT)
        check_sampling(sp)
        if request_id is not None and not isinstance(request_id, str):
            raise HybridRLError(f"request_id must be a string, got {type(request_id).__name__}")
        rid = request_id or f"req-{next(self._ids)}"
        if rid in self._requests:
            raise HybridRLError(f"request_id {rid!r} is already in flight; use a unique id")
        ids = prompt_ids(input_ids, self.runner.args.vocab_size)
        if len(ids) >= self.max_model_len:
            raise HybridRLError(f"prompt of {len(ids)} tokens does not fit the model's context of "
                                f"{self.max_model_len} tokens (room for at least one new token is needed); "
                                "fix: shorten the prompt or lower data.max_prompt_length")
        if sp.n > self.max_num_seqs:
            raise HybridRLError(f"n={sp.n} exceeds max_num_seqs={self.max_num_seqs}; raise rollout.max_num_seqs")
        if sp.stop and self.tokenizer is None:
            raise HybridRLError("stop strings need a tokenizer: pass tokenizer= to NativeEngine")
        max_len = min(len(ids) + sp.max_new_tokens, self.max_model_len)
        bs = self.block_manager.block_size
        check_pool(self.block_manager, len(ids), max(max_len, len(ids) + bs * (sp.n - 1)), self.bytes_per_token)
        stop = set(sp.stop_token_ids) | (set() if sp.ignore_eos else self.eos_token_ids)
        seed = sp.seed if sp.seed is not None else self._seeds.getrandbits(63)
        return Request(rid, sp, len(ids), max_len, frozenset(stop), seed), ids

    async def abort(self, request_id: str | None = None) -> None:
        """Abort one request (or all): it finishes with "abort" and keeps its tokens so far."""
        self._aborts.append(request_id)
        self._kick()

    # ------------------------------------------------------------------ the step loop
    def _kick(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._task is None or self._task.done():
            self._loop, self._wakeup = loop, asyncio.Event()
            self._task = loop.create_task(self._run())
            self._task.add_done_callback(self._on_loop_exit)
        self._wakeup.set()

    def _on_loop_exit(self, task: asyncio.Task) -> None:
        """If the step loop dies, fail every waiting request instead of leaving it to wait forever."""
        if not task.cancelled() and task.exception() is not None:
            self._fail_all(HybridRLError(f"the native engine's step loop failed: {task.exception()!r}"))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._take_inbox()
            if not self.scheduler.has_work():
                self._wakeup.clear()
                if not (self._inbox or self._aborts):
                    await self._wakeup.wait()
                continue
            try:
                finished = await loop.run_in_executor(self._executor, self._step)
            except Exception as e:  # noqa: BLE001 - fail the step's requests, keep serving the others
                self._fail_step(e)
                continue
            self._settle({s.req for s in finished})

    def _take_inbox(self) -> None:
        for seq in self._inbox:
            self.scheduler.add(seq)
        self._inbox.clear()
        aborts, self._aborts = self._aborts, []
        for rid in aborts:
            reqs = list(self._requests.values()) if rid is None else [self._requests.get(rid)]
            for req in filter(None, reqs):
                self.scheduler.abort(req)
            self._settle({r for r in reqs if r is not None})

    def _step(self) -> list[Sequence]:
        """One scheduler step (worker thread): prefill or decode, sample, append. -> finished sequences."""
        self._stepping = []
        kind, seqs = self.scheduler.schedule()
        self._stepping = list(seqs)
        if kind == "prefill":
            logits = self.runner.prefill(seqs)
            self.stats["prefill_calls"] += 1
            self.stats["prefill_tokens"] += sum(s.num_tokens for s in seqs)
            seqs, counts, copies = self.scheduler.fork(seqs)
            self._stepping = list(seqs)
            self.runner.copy_blocks(copies)
            if len(seqs) > len(counts):
                logits = logits.repeat_interleave(torch.tensor(counts, device=logits.device), dim=0)
        elif seqs:
            logits = self.runner.decode(seqs, self.block_table)
            self.stats["decode_steps"] += 1
        else:
            raise RuntimeError("scheduler found nothing to run although requests wait (KV pool accounting)")
        rows = [s.req.knobs + (s.rng.random(),) for s in seqs]
        flags = batch_flags({s.req.knobs for s in seqs})
        tokens, logprobs = sample(logits, params_block(rows).to(logits.device), **flags)
        tokens, logprobs = torch.stack([tokens.double(), logprobs.double()]).tolist()
        self.stats["generated_tokens"] += len(seqs)
        return self.scheduler.postprocess(seqs, [int(t) for t in tokens], logprobs)

    def _settle(self, reqs) -> None:
        for req in reqs:
            if req.done and req.id in self._futures:
                self._requests.pop(req.id)
                fut = self._futures.pop(req.id)
                if not fut.done():
                    fut.set_result(self._outputs(req))

    def _outputs(self, req: Request) -> list[GenerateOutput]:
        outs = [GenerateOutput(s.output_ids, s.logprobs, s.finish_reason, req.prompt_len, len(s.output_ids),
                               self.weight_version) for s in req.seqs]
        while len(outs) < req.params.n:  # aborted before its prefill forked it
            outs.append(GenerateOutput([], [], "abort", req.prompt_len, 0, self.weight_version))
        return outs

    def _fail_step(self, err: Exception) -> None:
        """A step raised: fail the requests it ran (their KV blocks go back), keep serving the rest.

        A failure before the scheduler picked anything cannot be pinned on a request: fail all."""
        reqs = {s.req for s in self._stepping}
        self._stepping = []
        what = f"{type(err).__name__}: {err}"
        if reqs:
            self._fail(reqs, HybridRLError(f"the engine step running this request failed ({what}); "
                                           "other requests keep running"))
        else:
            self._fail_all(HybridRLError(f"the native engine's scheduler failed ({what})"))

    def _fail_all(self, err: Exception) -> None:
        self._fail(list(self._requests.values()), err)

    def _fail(self, reqs, err: Exception) -> None:
        for req in reqs:
            self.scheduler.abort(req)
            self._requests.pop(req.id, None)
            fut = self._futures.pop(req.id, None)
            if fut is not None and not fut.done():
                fut.set_exception(err)

    async def _in_worker(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # ------------------------------------------------------------------ weights and memory
    async def update_weights(self, buckets: Iterable[Seq[tuple[str, torch.Tensor]]], version: int) -> None:
        """Wake what is asleep, load the (hf_name, tensor) buckets, flush; then serve `version`.

        Runs between steps in the worker thread: the weights wake first (if asleep), then the buckets
        are copied in place, then the KV cache wakes, so a push never needs room for the KV pool too.
        There is no prefix cache, so nothing else to flush.
        All or nothing:
        - each bucket is checked whole (names, shapes, float dtype, finite values in the engine's
          dtype range) before any of it is copied, so a refused bucket changes nothing;
        - a list or tuple of buckets is checked whole before the first copy: a refused push of
          any length leaves the weights and the version as they were;
        - any other iterable is streamed (one bucket in memory at a time). If bucket k is refused
          after 0..k-1 were copied, the version stays the old one, requests in flight are aborted,
          and generate() refuses ("weights are inconsistent ...") until a push succeeds.
        A push holding no tensors is refused.
        """
        if isinstance(version, bool) or not isinstance(version, numbers.Integral):
            raise HybridRLError(f"weight version must be an integer, got {version!r}")
        try:
            await self._in_worker(self._push, buckets)
        except BaseException:
            if self._inconsistent:
                await self.abort()
            raise
        self.weight_version = int(version)

    def _push(self, buckets) -> None:
        """Worker thread: check and copy the buckets as update_weights describes, then wake the KV cache."""
        model = self.runner.model
        refill = self._discarded                     # the push must bring every weight back
        if refill:
            self._wake_weights()                     # storage first: the checks compare shapes
        whole = isinstance(buckets, (list, tuple))
        plans = [check_weights(model, b) for b in buckets] if whole else (check_weights(model, b) for b in buckets)
        copied, touched = 0, set()
        for plan in plans:
            if plan:
                self._wake_weights()
                self._inconsistent = True            # until the last bucket is in
                touched |= copy_weights(model, plan)
                copied += len(plan)
        if not copied:
            raise HybridRLError("empty weight push: no tensors the model loads (an empty stream, or only ignored "
                                "names); nothing changed. Send (hf_name, tensor) pairs such as "
                                "('model.norm.weight', t)")
        missing = sorted(set(dict(model.named_parameters())) - touched) if refill else []
        if missing:
            raise HybridRLError(f"the engine's weights were freed by sleep and this push lacks {len(missing)} of "
                                f"them (e.g. {missing[0]}): push every weight after a sleep (nothing is served "
                                "until then)")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._inconsistent = False
        self._wake_kv()

    async def sleep(self, tags: Seq[str] = TAGS) -> None:
        """"kv_cache" frees the KV pool; "weights" moves the weights to host memory (GPU only), or with
        weights_backup=False frees them (any device; the next push must hold every weight)."""
        tags = self._check_tags(tags)
        if "kv_cache" in tags and "kv_cache" not in self._asleep:
            busy = await self._drain(timeout=10.0)
            if busy:
                raise HybridRLError(f"cannot free the KV cache with {busy} requests in flight; abort() them first")
            await self._in_worker(self.runner.free_kv)
        if "weights" in tags and "weights" not in self._asleep:
            if not self.weights_backup:
                await self._in_worker(self.runner.discard_weights)
                self._discarded = True
            elif self.device.type == "cuda":
                await self._in_worker(self.runner.move_weights, torch.device("cpu"))
        self._asleep |= set(tags)

    async def _drain(self, timeout: float) -> int:
        """Wait up to `timeout` s for in-flight requests to settle (aborted ones do at the next step).

        -> how many are still in flight."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self._requests and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        return len(self._requests)

    async def wake(self, tags: Seq[str] = TAGS) -> None:
        """Undo sleep(tags) without a push: the weights come back from host memory, the KV pool is re-made."""
        tags = self._check_tags(tags)
        if "weights" in tags:
            await self._in_worker(self._wake_weights)
        if "kv_cache" in tags:
            await self._in_worker(self._wake_kv)

    def _wake_weights(self) -> None:
        if "weights" in self._asleep:
            if self._discarded:                  # fresh storage; generate() refuses until a full push fills it
                self.runner.allocate_weights()
                self._discarded, self._inconsistent = False, True
            elif self.device.type == "cuda":
                self.runner.move_weights(self.device)
            self._asleep.discard("weights")

    def _wake_kv(self) -> None:
        if "kv_cache" in self._asleep:
            self.runner.allocate_kv(self.runner.num_blocks)
            self._asleep.discard("kv_cache")

    @staticmethod
    def _check_tags(tags) -> list[str]:
        bad = [t for t in tags if t not in TAGS]
        if bad:
            raise HybridRLError(f"unknown sleep/wake tags {bad}; use {list(TAGS)}")
        return list(tags)

    async def close(self) -> None:
        if self._requests:
            await self.abort()
            await asyncio.wait(list(self._futures.values()), timeout=60)
        if self._task is not None and self._loop is asyncio.get_running_loop():
            self._task.cancel()
        self._executor.shutdown(wait=True)
        self.runner.free_kv()
