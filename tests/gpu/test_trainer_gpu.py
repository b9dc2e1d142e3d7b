"""The FSDP2 trainer on one GPU (world of 1): bf16 compute over fp32 masters, and param + optimizer offload
between phases frees at least the parameters + AdamW state and brings them back unchanged.

    pytest -q tests/gpu/test_trainer_gpu.py        # marked gpu: skipped without CUDA
"""
import pytest
import torch

pytestmark = pytest.mark.gpu


def batch():
    from hybridrl.trainer.batch import collate
    from hybridrl.types import Sample
    samples = []
    for g in range(4):
        for n in (5, 9):
            s = Sample(prompt_ids=[3, 4, 5, 6], group=g)
            s.append(list(range(10, 10 + n)), [-1.0] * n)
            samples.append(s)
    return collate(samples, pad_id=0)


def test_offload_frees_params_and_optimizer_state_and_restores_them(tmp_path):
    from hybridrl.config import load_config
    from hybridrl.testing import save_tiny_model
    from hybridrl.trainer.actor import Policy
    path = save_tiny_model(tmp_path / "m", hidden_size=256, num_layers=4, vocab_size=4096)
    cuda = torch.device("cuda")
    cfg = load_config([f"model.path={path}", "actor.param_offload=true", "actor.optimizer_offload=true",
                       "actor.ppo_mini_batch_size=4", "data.train_batch_size=4"])
    policy = Policy(path, cfg.model, cfg.actor, cuda, 16)
    b = batch()
    adv = torch.randn(b.response_mask.shape)
    old = policy.log_probs(b, 1.0)[0]
    m = policy.update(b, old, adv, None, 1.0)
    assert torch.isfinite(torch.tensor(m["grad_norm"]))
    torch.cuda.synchronize()
    offloaded = torch.cuda.memory_allocated()
    params = sum(p.numel() * 4 for p in policy.root.parameters())       # fp32 masters
    state = params * 2                                                   # AdamW exp_avg + exp_avg_sq
    assert all(p.device.type == "cpu" for p in policy.root.parameters())
    assert all(v.device.type == "cpu" for s in policy.optim.opt.state.values() for k, v in s.items() if k != "step")
    before = {k: v.clone() for k, v in policy.named_weights()}           # gathered to the GPU one at a time
    policy.offloader.onload()
    torch.cuda.synchronize()
    onloaded = torch.cuda.memory_allocated()
    assert onloaded - offloaded >= params + state                        # what the offload gave the engine
    assert all(torch.equal(before[k], v) for k, v in policy.named_weights())
    policy.update(b, old, adv, None, 1.0)                                # a second update after the round trip
    assert policy.parameters_finite()


def test_bf16_compute_matches_fp32_log_probs(tmp_path):
    from hybridrl.config import load_config
    from hybridrl.testing import save_tiny_model
    from hybridrl.trainer.actor import Policy
    path = save_tiny_model(tmp_path / "m")
    cfg32 = load_config([f"model.path={path}", "model.dtype=float32"])
    cfg16 = load_config([f"model.path={path}"])
    b = batch()
    lp32 = Policy(path, cfg32.model, cfg32.actor, torch.device("cuda"), 16, trainable=False).log_probs(b, 1.0)[0]
    lp16 = Policy(path, cfg16.model, cfg16.actor, torch.device("cuda"), 16, trainable=False).log_probs(b, 1.0)[0]
    mask = b.response_mask.bool()
    assert (lp32[mask] - lp16[mask]).abs().max() < 0.05
