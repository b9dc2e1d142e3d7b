"""FSDP2 building blocks (hybridrl/trainer/fsdp.py) on CPU over gloo: one 2-process test, cheap world-of-1 tests.

    pytest -q tests/test_fsdp.py
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist

from hybridrl import HybridRLError
from hybridrl.testing import save_tiny_model
from hybridrl.trainer import fsdp

CPU = torch.device("cpu")
ATOL = 1e-5
LR = 1e-3


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("fsdp") / "qwen2")


@pytest.fixture
def world_of_one():
    """A world of 1 for this test (the trainer's own world of 1 when an earlier test made one: it is kept)."""
    made = not dist.is_initialized()
    assert fsdp.init_process_group_if_needed(CPU) == (0, 1)
    yield
    if made:
        dist.destroy_process_group()


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _batch():
    return torch.randint(3, 512, (4, 8), generator=torch.Generator().manual_seed(0))  # input_ids: [B=4, T=8]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference_step(path):
    """The unsharded model after one AdamW step on the whole batch; its optimizer."""
    model = _load(path)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    ids = _batch()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    return model, opt


def _worker(rank, world, port, path, out):
    """One rank of the 2-process test: torchrun-style env, shard, one step, full tensors, DCP save."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    assert fsdp.init_process_group_if_needed(CPU) == (rank, world)
    model = fsdp.shard_model(_load(path), CPU)
    assert fsdp.tied_embeddings(model)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    ids = _batch().chunk(world)[rank]  # this rank's rows: [2, 8]; FSDP2 averages the two halves' grads
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    full = [(name, t.clone()) for name, t in fsdp.full_named_tensors(model)]  # collective: both ranks
    fsdp.save_sharded(os.path.join(out, "ckpt"), model, opt)
    dist.destroy_process_group()
    if rank == 0:
        torch.save(full, os.path.join(out, "full.pt"))


@pytest.mark.slow
def test_two_ranks_match_one_process_and_checkpoint_reshards_to_one(tiny_path, tmp_path):
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), tiny_path, str(tmp_path)), nprocs=2, join=True)
    full = torch.load(tmp_path / "full.pt")
    ref, ref_opt = _reference_step(tiny_path)
    initial = _load(tiny_path).state_dict()

    # 1. every state-dict name once (the tied lm_head.weight only as embed_tokens), full shape, the same values
    ref_state = ref.state_dict()
    names = [name for name, _ in full]
    assert sorted(names) == sorted(set(ref_state) - {"lm_head.weight"}) and len(names) == len(set(names))
    for name, tensor in full:
        assert tensor.shape == ref_state[name].shape, name
        torch.testing.assert_close(tensor, ref_state[name], atol=ATOL, rtol=0, msg=name)
        assert not torch.equal(tensor, initial[name]), f"{name} did not change"

    # 2. the 2-rank checkpoint loads on 1 rank bit-equal, optimizer state included; merge gives the same logits
    made = not dist.is_initialized()
    assert fsdp.init_process_group_if_needed(CPU) == (0, 1)
    try:
        model = fsdp.shard_model(_load(tiny_path), CPU)
        opt = torch.optim.AdamW(model.parameters(), lr=LR)
        fsdp.load_sharded(tmp_path / "ckpt", model, opt)
        loaded = dict(fsdp.full_named_tensors(model))
        for name, tensor in full:
            assert torch.equal(loaded[name], tensor), name
        ref_params = dict(ref.named_parameters())  # AdamW's first step hardly depends on the gradient's scale;
        # exp_avg = 0.1 * grad does (median |exp_avg| ~ 3e-5 here), so it pins the loss normalisation across ranks
        for name, param in model.named_parameters():
            exp_avg = opt.state[param]["exp_avg"].full_tensor()
            torch.testing.assert_close(exp_avg, ref_opt.state[ref_params[name]]["exp_avg"], atol=1e-7, rtol=0)
        ids = _batch()
        with torch.no_grad():
            logits = model(input_ids=ids).logits  # [4, 8, V]
    finally:
        if made:
            dist.destroy_process_group()
    out = fsdp.merge_to_hf(tmp_path / "ckpt", tmp_path / "hf", tiny_path)
    merged = _load(out)
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, logits, atol=ATOL, rtol=0)
        torch.testing.assert_close(merged(input_ids=ids).logits, ref(input_ids=ids).logits, atol=ATOL, rtol=0)


def test_world_of_one_trains_and_yields_the_state_dict(tiny_path, world_of_one):
    ref = _load(tiny_path)
    model = fsdp.shard_model(_load(tiny_path), CPU)
    assert fsdp.tied_embeddings(model)
    ids = _batch()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.testing.assert_close(loss, ref(input_ids=ids, labels=ids).loss, atol=ATOL, rtol=0)
    assert all(p.grad is not None for p in model.parameters())
    full = dict(fsdp.full_named_tensors(model))
    ref_state = ref.state_dict()
    assert set(full) == set(ref_state) - {"lm_head.weight"}
    for name, tensor in full.items():
        assert torch.equal(tensor, ref_state[name]), name
    assert set(dict(fsdp.full_named_tensors(model, skip={"model.norm.weight"}))) == set(full) - {"model.norm.weight"}


def test_process_group_is_reused(world_of_one):
    assert fsdp.init_process_group_if_needed(CPU) == (0, 1)


def test_shard_model_names_what_it_cannot_shard():
    with pytest.raises(HybridRLError, match="model.model.layers"):
        fsdp.shard_model(torch.nn.Linear(2, 2), CPU)


def test_bucketed_gather_holds_at_most_one_bucket_and_a_tensor(tmp_path, world_of_one):
    """The weight push pulls full tensors lazily: when the engine holds bucket k, the gathers have produced that
    bucket's tensors and at most one more (the one that closed it); every name once, full shape."""
    from transformers import AutoModelForCausalLM
    from hybridrl.sync import bucketize
    path = save_tiny_model(tmp_path / "m", hidden_size=256, num_layers=3, vocab_size=2048)
    model = fsdp.shard_model(_load(path), CPU)
    produced = []

    def counted():
        for name, t in fsdp.full_named_tensors(model):
            produced.append(name)
            yield name, t

    consumed, seen = 0, []
    for bucket in bucketize(counted(), bucket_mb=1):
        consumed += len(bucket)
        assert len(produced) - consumed <= 1
        seen += [(n, tuple(t.shape)) for n, t in bucket]
    ref = AutoModelForCausalLM.from_pretrained(path).state_dict()
    assert len(seen) == len({n for n, _ in seen}) and consumed > 3
    assert dict(seen) == {n: tuple(t.shape) for n, t in ref.items() if n != "lm_head.weight"}
