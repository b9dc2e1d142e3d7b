"""The model runner: owns the model and the KV pool, turns scheduled sequences into tensors,
runs `prefill` / `decode` and returns logits. On CUDA, decode replays CUDA graphs captured per
(batch bucket, block bucket), so a decode step is one graph launch plus sampling.
"""
from __future__ import annotations

import numpy as np
import torch

from hybridrl.rollout.native.attention import AttnMeta, triton_ok
from hybridrl.rollout.native.kv_cache import allocate_pool
from hybridrl.rollout.native.loader import build_model


def next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


class ModelRunner:
    def __init__(self, model_path: str, device: torch.device, dtype: torch.dtype, *, block_size: int,
                 max_model_len: int | None, use_cuda_graphs: bool = True):
        from hybridrl.rollout.native.model import rope_cache

        self.device, self.dtype, self.block_size = device, dtype, block_size
        self.model = build_model(model_path, device, dtype)
        self.args = self.model.args
        self.max_model_len = min(max_model_len or self.args.max_position_embeddings,
                                 self.args.max_position_embeddings)
        self.model.rope_cos, self.model.rope_sin = rope_cache(self.args, self.max_model_len, device)
        self.use_triton = triton_ok(device, self.args.head_dim, block_size)
        self.use_graphs = use_cuda_graphs and device.type == "cuda"
        self.kv: torch.Tensor | None = None
        self.num_blocks = 0
        self.graphs: dict[tuple[int, int], tuple] = {}

    # ------------------------------------------------------------------ memory
    def allocate_kv(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.kv = allocate_pool(self.args, num_blocks, self.block_size, self.dtype, self.device)

    def free_kv(self) -> None:
        self.kv = None
        self.graphs.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def discard_weights(self) -> None:
        """Free the weights' memory without a copy (SGLang's release without a CPU backup): the next push
        refills them, into new storage (so captured graphs, which hold old addresses, are dropped)."""
        self.graphs.clear()
        self._shapes = [(p, tuple(p.shape)) for p in self.model.parameters()]
        for p, _ in self._shapes:
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def allocate_weights(self) -> None:
        """Storage for discarded weights, uninitialised: only a complete push makes it usable."""
        for p, shape in self._shapes:
            p.data = torch.empty(shape, dtype=p.dtype, device=p.device)
        self._shapes = []

    def move_weights(self, device: torch.device) -> None:
        """Offload (device=cpu) or restore the weights; captured graphs hold old addresses, so drop them."""
        self.graphs.clear()
        for p in self.model.parameters():
            p.data = p.data.to(device)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @torch.no_grad()
    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        if pairs:
            src, dst = (torch.tensor(x, device=self.device) for x in zip(*pairs))
            self.kv[:, :, dst] = self.kv[:, :, src]

    # ------------------------------------------------------------------ prefill
    @torch.inference_mode()
    def prefill(self, seqs) -> torch.Tensor:
        """Run the whole token list of each sequence; KV goes to its blocks. -> logits [len(seqs), V]."""
        bs = self.block_size
        lens = [s.num_tokens for s in seqs]
        s_max = max(lens)
        cols = []
        for row, seq in enumerate(seqs):
            pos = np.arange(seq.num_tokens)
            slots = np.asarray(seq.blocks, dtype=np.int64)[pos // bs] * bs + pos % bs
            cols.append(np.stack([np.asarray(seq.token_ids), pos, slots, row * s_max + pos]))
        ids, pos, slots, pad_index = torch.from_numpy(np.concatenate(cols, axis=1)).to(self.device)
        meta = AttnMeta(True, slot_mapping=slots, pad_index=pad_index, prefill_batch=len(seqs),
                        prefill_len=s_max)
        hidden = self.model(ids, pos, self.kv, meta)
        last = torch.tensor(np.cumsum(lens) - 1, device=self.device)
        return self.model.logits(hidden[last])

    # ------------------------------------------------------------------ decode
    def decode_inputs(self, seqs) -> tuple[np.ndarray, list[int], int]:
        """[4, B] int64 (ids, positions, slots, context lens), block-table rows, blocks needed."""
        bs = self.block_size
        ids, lens, slots = [], [], []
        for seq in seqs:
            last = len(seq.token_ids) - 1
            ids.append(seq.token_ids[last])
            lens.append(last + 1)
            slots.append(seq.blocks[last // bs] * bs + last % bs)
        cols = np.array([ids, lens, slots, lens], dtype=np.int64)
        cols[1] -= 1
        return cols, [s.row for s in seqs], max(len(s.blocks) for s in seqs)

    @torch.inference_mode()
    def decode(self, seqs, table) -> torch.Tensor:
        """One token for each sequence. `table` is the BlockTable. -> logits [len(seqs), V]."""
        cols, rows, nblk = self.decode_inputs(seqs)
        b = len(seqs)
        if self.use_graphs:
            key = (next_pow2(b), min(max(4, next_pow2(nblk)), table.table.shape[1]))
            if key not in self.graphs:
                self.graphs[key] = self._capture(*key)
            graph, static, logits = self.graphs[key]
            static["cols"][:, :b].copy_(torch.from_numpy(cols), non_blocking=True)
            static["cols"][:, b:].copy_(static["pad"][:, b:])
            static["table"].copy_(table.rows(rows, key[1], pad_to=key[0]), non_blocking=True)
            graph.replay()
            return logits[:b]
        ids, pos, slots, lens = torch.from_numpy(cols).to(self.device)
        block_table = table.rows(rows, nblk).to(self.device)
        return self._decode_forward(ids, pos, slots, lens, block_table)

    def _decode_forward(self, ids, pos, slots, lens, block_table) -> torch.Tensor:
        meta = AttnMeta(False, slot_mapping=slots, block_table=block_table, context_lens=lens.int(),
                        use_triton=self.use_triton)
        return self.model.logits(self.model(ids, pos, self.kv, meta))

    def _capture(self, b: int, nblk: int) -> tuple:
        """A CUDA graph of the decode forward for batch b and nblk blocks per sequence (padded)."""
        cols = torch.zeros(4, b, dtype=torch.int64, device=self.device)   # ids, positions, slots, lens
        cols[3] = 1                                                            # padded rows: 1 token, block 0
        table = torch.zeros(b, nblk, dtype=torch.int32, device=self.device)
        run = lambda: self._decode_forward(cols[0], cols[1], cols[2], cols[3], table)  # noqa: E731
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):  # warm up (cuBLAS handles, Triton compile) outside the capture
                run()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.inference_mode():
            logits = run()
        return graph, {"cols": cols, "table": table, "pad": cols.clone()}, logits
