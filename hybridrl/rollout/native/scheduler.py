"""Continuous batching: which sequences run in the next step, and what happens after it.

Each step is either a prefill (new or preempted sequences, packed up to max_num_batched_tokens)
or a decode (one token for every running sequence). Requests join the waiting queue at any time
and leave the running set the step they finish, so the batch changes between decode steps.
A request with n > 1 is one sequence until its prefill; then `fork` makes n sequences that share
the prompt's full KV blocks (the partial last block is copied). When the pool runs out during
decode, the newest running sequence is preempted: its blocks are freed and it is prefilled again
later from all its tokens (recompute), which yields the same continuation.
"""
from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

from hybridrl.rollout.base import SamplingParams
from hybridrl.rollout.native.kv_cache import BlockManager, BlockTable


@dataclass(eq=False)
class Request:
    id: str
    params: SamplingParams
    prompt_len: int
    max_len: int                       # tokens per sequence at most: prompt + new, capped by the context
    stop_ids: frozenset
    seed: int
    seqs: list = field(default_factory=list)
    aborted: bool = False

    def __post_init__(self):
        p = self.params
        self.knobs = (p.temperature, p.top_k, p.top_p, p.min_p)   # the sampler's row, less the uniform

    @property
    def done(self) -> bool:
        settled = len(self.seqs) == self.params.n or self.aborted
        return settled and all(s.finish_reason for s in self.seqs)


class Sequence:
    __slots__ = ("req", "index", "token_ids", "logprobs", "blocks", "row", "n_fork", "rng", "finish_reason")

    def __init__(self, req: Request, index: int, token_ids: list[int], n_fork: int = 1):
        self.req, self.index = req, index
        self.token_ids = token_ids
        self.logprobs: list[float] = []
        self.blocks: list[int] = []
        self.row = -1                        # row in the block table while decoding
        self.n_fork = n_fork                 # > 1 until the request's prefill forks it
        self.rng = random.Random(f"{req.seed}:{index}")
        self.finish_reason = ""

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.req.prompt_len:]


class Scheduler:
    def __init__(self, bm: BlockManager, table: BlockTable, max_num_seqs: int, max_num_batched_tokens: int,
                 tokenizer=None):
        self.bm, self.table = bm, table
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.tokenizer = tokenizer
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[str, list[Sequence]]:
        """("prefill", sequences to prefill) when any can be admitted, else ("decode", running)."""
        batch = self._admit()
        if batch:
            return "prefill", batch
        return "decode", self._grow_running()

    def _admit(self) -> list[Sequence]:
        batch, seats, longest = [], len(self.running), 0
        while self.waiting:
            seq = self.waiting[0]
            n, length = seq.n_fork, seq.num_tokens
            need = self.bm.blocks_for(length) + (n - 1 if length % self.bm.block_size else 0)
            padded = (len(batch) + 1) * max(longest, length)
            # keep a block per sequence in reserve for decoding, unless the engine would sit idle
            reserve = seats + n if (self.running or batch) else 0
            if seats + n > self.max_num_seqs or need + reserve > self.bm.num_free:
                break
            if batch and padded > self.max_num_batched_tokens:
                break
            self.waiting.popleft()
            seq.blocks = [self.bm.allocate() for _ in range(self.bm.blocks_for(length))]
            batch.append(seq)
            seats, longest = seats + n, max(longest, length)
        return batch

    def _grow_running(self) -> list[Sequence]:
        """Give each running sequence a block for the token it writes next; preempt when none is free."""
        bs = self.bm.block_size
        short = [s for s in self.running if (len(s.token_ids) - 1) // bs >= len(s.blocks)]
        if len(short) <= self.bm.num_free:      # the common case: no preemption needed
            for seq in short:
                seq.blocks.append(self.bm.allocate())
                self.table.set(seq.row, len(seq.blocks) - 1, seq.blocks[-1])
            return list(self.running)
        scheduled = []
        while self.running:
            seq = self.running.popleft()
            if (seq.num_tokens - 1) // self.bm.block_size < len(seq.blocks):
                scheduled.append(seq)
                continue
            while self.bm.num_free == 0 and self.running:
                self.preempt(self.running.pop())
            if self.bm.num_free == 0:
                self.preempt(seq)
                break
            seq.blocks.append(self.bm.allocate())
            self.table.set(seq.row, len(seq.blocks) - 1, seq.blocks[-1])
            scheduled.append(seq)
        self.running = deque(scheduled)
        return scheduled

    def preempt(self, seq: Sequence) -> None:
        self._release(seq)
        self.waiting.appendleft(seq)

    def fork(self, seqs: list[Sequence]) -> tuple[list[Sequence], list[int], list[tuple[int, int]]]:
        """After a prefill: n sequences per request, sharing full blocks.

        Returns (all sequences, how many per prefilled row, (src, dst) block copies to make)."""
        out, counts, copies = [], [], []
        bs = self.bm.block_size
        for parent in seqs:
            full = parent.num_tokens // bs
            kids = [parent]
            for i in range(1, parent.n_fork):
                kid = Sequence(parent.req, i, list(parent.token_ids))
                kid.blocks = parent.blocks[:full]
                self.bm.share(kid.blocks)
                if len(parent.blocks) > full:
                    kid.blocks = kid.blocks + [self.bm.allocate()]
                    copies.append((parent.blocks[full], kid.blocks[-1]))
                parent.req.seqs.append(kid)
                kids.append(kid)
            parent.n_fork = 1
            for kid in kids:
                kid.row = self.table.take(kid.blocks)
                self.running.append(kid)
            out.extend(kids)
            counts.append(len(kids))
        return out, counts, copies

    def postprocess(self, seqs: list[Sequence], tokens: list[int], logprobs: list[float]) -> list[Sequence]:
        """Append each sampled token; finish sequences that hit a stop or a limit. Returns the finished."""
        finished = []
        for seq, tok, lp in zip(seqs, tokens, logprobs):
            seq.token_ids.append(tok)
            seq.logprobs.append(lp)
            reason = self._finish_reason(seq, tok)
            if reason:
                self._release(seq)
                seq.finish_reason = reason
                finished.append(seq)
        if finished:
            self.running = deque(s for s in self.running if not s.finish_reason)
        return finished

    def _finish_reason(self, seq: Sequence, tok: int) -> str:
        req = seq.req
        if tok in req.stop_ids:
            return "stop"
        if req.params.stop and self._hits_stop_string(seq):
            return "stop"
        if len(seq.token_ids) >= req.max_len:
            return "length"
        return ""

    def _hits_stop_string(self, seq: Sequence) -> bool:
        stops = seq.req.params.stop
        window = max(len(s) for s in stops) + 8     # tokens: enough to hold any stop string
        tail = self.tokenizer.decode(seq.output_ids[-window:], skip_special_tokens=False)
        return any(s in tail for s in stops)

    def abort(self, req: Request) -> list[Sequence]:
        """Finish every unfinished sequence of `req` with "abort", keeping the tokens so far."""
        req.aborted = True
        hit = [s for s in req.seqs if not s.finish_reason]
        for seq in hit:
            self._release(seq)
            seq.finish_reason = "abort"
        self.waiting = deque(s for s in self.waiting if s.req is not req)
        self.running = deque(s for s in self.running if s.req is not req)
        return hit

    def _release(self, seq: Sequence) -> None:
        self.bm.release(seq.blocks)
        seq.blocks = []
        if seq.row >= 0:
            self.table.give_back(seq.row)
            seq.row = -1
