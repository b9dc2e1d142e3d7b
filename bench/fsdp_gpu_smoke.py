import tempfile, torch, torch.distributed as dist
from transformers import AutoModelForCausalLM
from hybridrl.testing import save_tiny_model
from hybridrl.trainer import fsdp
print(torch.__version__, torch.cuda.is_available())
d = tempfile.mkdtemp(); path = save_tiny_model(d + "/m"); dev = torch.device("cuda")
print(fsdp.init_process_group_if_needed(dev), dist.get_backend())
ids = torch.randint(3, 512, (4, 8), device=dev)
for offload in (False, True):
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(dev)
    m = fsdp.shard_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), dev, offload=offload)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    loss = m(input_ids=ids, labels=ids).loss; loss.backward(); opt.step()
    print("offload", offload, "tied", fsdp.tied_embeddings(m), "loss", loss.item(), "ref fp32 loss", ref(input_ids=ids, labels=ids).loss.item())
    full = dict(fsdp.full_named_tensors(m))
    print(len(full), {str(t.device) for t in full.values()}, {t.dtype for t in full.values()})
    fsdp.save_sharded(d + f"/ck{offload}", m, opt); fsdp.load_sharded(d + f"/ck{offload}", m, opt)
    again = dict(fsdp.full_named_tensors(m)); print("reload equal", all(torch.equal(full[k], again[k]) for k in full))
    fsdp.merge_to_hf(d + f"/ck{offload}", d + f"/hf{offload}", path)
    merged = AutoModelForCausalLM.from_pretrained(d + f"/hf{offload}", dtype=torch.float32)
    print("merged equal", all(torch.equal(merged.state_dict()[k], full[k].cpu()) for k in full))
dist.destroy_process_group()
