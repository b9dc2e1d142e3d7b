"""`hybridrl bench`: the CPU smoke run writes the table, JSON and chart; the native row's breakdown adds up;
rows that cannot run here (trl, sglang not installed) still appear with their reason."""
import importlib.util
import json

from hybridrl import bench, cli


def read_table(md: str) -> tuple[list[str], dict[str, dict[str, str]]]:
    """The markdown table of `hybridrl bench`: its header and {row's first cell: {column: cell}}."""
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    split = lambda line: [c.strip() for c in line.strip().strip("|").split("|")]   # noqa: E731
    header = split(lines[0])
    return header, {cells[0]: dict(zip(header, cells)) for cells in map(split, lines[1:])}


def test_bench_smoke_table_json_png(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HYBRIDRL_SGLANG_CMD", raising=False)
    out = tmp_path / "b"
    assert cli.main(["bench", "--smoke", "--out", str(out)]) == 0
    for suffix in (".json", ".md", ".png"):
        assert (tmp_path / f"b{suffix}").stat().st_size > 0
    md = (tmp_path / "b.md").read_text()
    assert "| what | step s | gen | old log-probs | update |" in capsys.readouterr().out   # printed too
    header, rows = read_table(md)
    assert header == list(bench.COLUMNS)
    assert [name.split(" (")[0] for name in rows] == list(bench.ROWS)              # every row, in order

    native = rows["hybridrl-native (tiny)"]
    assert float(native["step s"]) > 0 and float(native["tokens/s"].replace(",", "")) > 0
    report = json.loads((tmp_path / "b.json").read_text())
    r = next(r for r in report["rows"] if r["row"] == "hybridrl-native")
    assert r["status"] == "ok" and len(r["per_step"]) == 2 and r["steps_timed"] == 1
    assert r["unaccounted_s"] >= -0.01
    parts = sum(r[f"{p}_s"] for p in bench.PARTS)
    assert abs(parts + r["unaccounted_s"] - r["step_s"]) < 1e-6      # one timed step: the parts add up exactly
    assert float(native["unaccounted"]) >= -0.01

    assert float(rows["hf-generate (tiny)"]["gen"]) > 0
    ceil = next(r for r in report["rows"] if r["row"] == "ceilings")
    assert ceil["status"] == "ok" and ceil["matmul_tflops"] > 0 and ceil["copy_gb_s"] > 0 and ceil["train_flop"] > 0

    missing = {"trl": "trl not installed", "hybridrl-sglang": "sglang not installed",
               "sglang-generate": "sglang not installed"}
    for name, reason in missing.items():
        cell = rows[f"{name} (tiny)"]["step s"]
        if importlib.util.find_spec("trl" if name == "trl" else "sglang") is None:
            assert cell == f"skipped: {reason}"
        else:                                   # installed: TRL runs on CPU, SGLang is skipped as GPU-only
            assert cell.startswith("skipped: --smoke") or float(cell) > 0
    for key in ("device", "date", "torch", "transformers", "command", "git"):
        assert key in report
    assert report["device"].startswith("cpu") and "--smoke" in report["command"]


def test_failed_and_skipped_cells_are_one_line():
    rows = [{"row": "trl", "size": "0.5B", "status": "failed", "reason": "RuntimeError: a | b\nTraceback ..."},
            {"row": "hybridrl-native", "size": "0.5B", "status": "ok", "step_s": 4.0, "gen_s": 1.0, "update_s": 2.0,
             "unaccounted_s": 0.1, "tokens_per_s": 16384.0, "peak_gb": 30.0},
            {"row": "trl", "size": "1.5B", "status": "ok", "step_s": 12.0, "tokens_per_s": 5461.0, "peak_gb": 53.0},
            {"row": "hybridrl-native", "size": "1.5B", "status": "ok", "step_s": 8.0}]
    cells = bench.table_rows(rows)
    assert cells[0][1] == "failed: RuntimeError: a / b Traceback ..." and len(cells[0]) == len(bench.COLUMNS)
    assert cells[1][1] == "4.00" and cells[1][-1] == ""                  # no TRL figure for 0.5B: no ratio
    assert cells[2][-1] == "1.00x" and cells[3][-1] == "1.50x"           # ratio within a size


def test_unknown_row_is_a_one_line_error(capsys):
    assert cli.main(["bench", "--rows", "hybridrl-native", "vllm"]) == 2
    assert "unknown bench row(s) ['vllm']" in capsys.readouterr().err
