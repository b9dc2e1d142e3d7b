"""`hybridrl generate` end to end on a tiny model: parquet out with `responses` (and `scores`) per prompt."""
import json

import pyarrow.parquet as pq
import pytest

from hybridrl.config import Config
from hybridrl.generate import generate


def tiny_cfg(model_dir, data_path, out_path, n=2) -> Config:
    cfg = Config()
    cfg.model.path = str(model_dir)
    cfg.trainer.device = "cpu"
    cfg.data.path, cfg.data.output_path, cfg.data.n_samples = str(data_path), str(out_path), n
    cfg.data.batch_size = 2
    cfg.rollout.response_length = 8
    cfg.rollout.max_num_seqs = 8
    return cfg


@pytest.mark.parametrize("n", [1, 2])
def test_generate_writes_responses_and_scores(tiny_qwen2_dir, tmp_path, n):
    rows = [{"prompt": [{"role": "user", "content": f"What is {i} plus {i}?"}], "data_source": "openai/gsm8k",
             "reward_model": {"style": "rule", "ground_truth": str(2 * i)}, "extra_info": {"index": i}}
            for i in range(4)]
    rows.append({"prompt": [{"role": "user", "content": "Give a number."}], "data_source": "my/unknown",
                 "reward_model": {"style": "rule", "ground_truth": "1"}, "extra_info": {"index": 4}})
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = generate(tiny_cfg(tiny_qwen2_dir, data, tmp_path / "out" / "gen.parquet", n=n))
    table = pq.read_table(out).to_pylist()
    assert len(table) == len(rows)
    for src, got in zip(rows, table):
        assert got["prompt"] == src["prompt"] and got["data_source"] == src["data_source"]
        assert len(got["responses"]) == n and all(isinstance(r, str) for r in got["responses"])
    assert all(len(r["scores"]) == n for r in table[:4]) and table[4]["scores"] is None
    assert all(s in (0.0, 1.0) for r in table[:4] for s in r["scores"])


def test_generate_bad_model_path(tmp_path):
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "hi"}) + "\n")
    from hybridrl import HybridRLError
    with pytest.raises(HybridRLError):
        generate(tiny_cfg(tmp_path / "nope", data, tmp_path / "o.parquet"))
