"""`hybridrl generate` end to end on a tiny model: parquet out with `responses` (and `scores`) per prompt;
the output path checked first, partial results kept when a run stops."""
import json

import pyarrow.parquet as pq
import pytest

from hybridrl import HybridRLError
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
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gen.parquet"]   # no partial or temp file left


def prompts_file(tmp_path, n=3):
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {i}.", "data_source": "x"}) + "\n" for i in range(n)))
    return data


def test_generate_bad_model_path(tmp_path):
    with pytest.raises(HybridRLError, match=rf"model folder {tmp_path / 'nope'} does not exist"):
        generate(tiny_cfg(tmp_path / "nope", prompts_file(tmp_path), tmp_path / "o.parquet"))


@pytest.mark.parametrize("out, message", [
    ("outdir", r"data.output_path '.*outdir' is a directory, expected a file path"),
    ("a_file/o.parquet", r"cannot write data.output_path .*a_file/o.parquet: cannot create or write in folder"),
    ("o.csv", r"data.output_path .*o.csv has suffix '.csv'; generate writes .parquet, .jsonl, .json"),
])
def test_generate_checks_the_output_path_before_anything_runs(tmp_path, out, message):
    (tmp_path / "outdir").mkdir()
    (tmp_path / "a_file").write_text("")
    # the model folder does not exist either: the output path is checked first, before any model loads
    with pytest.raises(HybridRLError, match=message):
        generate(tiny_cfg(tmp_path / "no_model", prompts_file(tmp_path), tmp_path / out))


def test_interrupted_generate_keeps_finished_prompts(tiny_qwen2_dir, tmp_path, monkeypatch):
    import hybridrl.generate as G

    def interrupted(*args):
        raise KeyboardInterrupt   # Ctrl-C after generation, while scoring

    monkeypatch.setattr(G, "score_rows", interrupted)
    out = tmp_path / "gen.parquet"
    with pytest.raises(KeyboardInterrupt):
        generate(tiny_cfg(tiny_qwen2_dir, prompts_file(tmp_path, 3), out))
    assert not out.exists()
    partial = tmp_path / "gen.parquet.partial.jsonl"
    rows = [json.loads(line) for line in partial.read_text().splitlines()]
    assert sorted(r["prompt"] for r in rows) == ["Say 0.", "Say 1.", "Say 2."]
    assert all(len(r["responses"]) == 2 for r in rows)
    monkeypatch.undo()
    generate(tiny_cfg(tiny_qwen2_dir, prompts_file(tmp_path, 3), out))   # a rerun moves the old partial aside
    assert len(pq.read_table(out)) == 3 and not partial.exists()
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("gen.parquet.partial.jsonl.")]
    assert len(aside) == 1 and [json.loads(line) for line in aside[0].read_text().splitlines()] == rows
