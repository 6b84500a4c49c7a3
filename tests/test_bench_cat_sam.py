"""python -m util.bench_cat_sam runs (tiny model, two rows in fresh subprocesses) and prints both rows."""
from __future__ import annotations

import json

from util import bench_cat_sam

TINY = ["--sam-type", "tiny", "--img-size", "128", "--window-size", "4", "--image-size", "96", "--objects", "2",
        "--steps", "1", "--warmup", "0"]


def test_bench_prints_off_and_on_rows(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench_cat_sam.main(TINY + ["--rows", "off", "on", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "ours, checkpoint_encoder off" in text and "ours, checkpoint_encoder on" in text
    assert "CAT-SAM-A (tiny)" in text and "load" in text
    report = json.loads(out.read_text())
    assert set(report["rows"]) == {"off", "on"}
    for name, row in report["rows"].items():
        assert row["step_s"]["median"] > 0 and row["max_rss_mb"] > 100
        assert row["settings"]["checkpoint_encoder"] == (name == "on")
        assert len(row["losses"]) == 1


def test_report_ratios_against_the_original_style_row():
    row = lambda t, m: {"step_s": {"median": t}, "max_rss_mb": m, "build_max_rss_mb": 500, "threads": 2,  # noqa: E731
                        "model": "CAT-SAM-A (vit_b)"}
    report = {"rows": {"original": row(10.0, 8000), "off": row(9.0, 8000), "on": row(12.0, 3000)},
              "load_average": [1.0, 2.0], "image_size": 1024, "objects": 2, "steps": 2, "warmup": 1}
    text = bench_cat_sam.format_report(report)
    lines = text.splitlines()
    assert "emulated" in lines[2] and "1.00" in lines[2]
    assert "0.90" in lines[3] and "time <= 1.0x: met" in lines[3]
    assert "1.20" in lines[4] and "0.38" in lines[4] and "memory <= 0.5x, time <= 1.35x: met" in lines[4]


def test_util_bench_dispatches_to_the_method_benchmarks(capsys, monkeypatch):
    from util import bench
    calls = []
    monkeypatch.setattr(bench_cat_sam, "main", lambda argv: calls.append(list(argv)) or 0)
    assert bench.main(["cat_sam", "--steps", "1"]) == 0 and calls == [["--steps", "1"]]
    assert set(bench.METHOD_BENCHMARKS) == {"sccan", "cat_sam", "fastsam", "simformer"}
    import importlib
    for module in bench.METHOD_BENCHMARKS.values():
        assert callable(importlib.import_module(module).main)
