"""python -m util.bench_simformer runs the full-size head + criterion step and reports it."""
from __future__ import annotations

import json

from util import bench_simformer


def test_bench_runs_the_full_size_step_with_every_loss_term(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench_simformer.main(["--rows", "spec", "--steps", "1", "--warmup", "0", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "spec: 1 pair(s) at 128" in text and "9.9 s" in text
    row = json.loads(out.read_text())["rows"]["spec"]
    # 1 pair at 128: 6 decoder layers x (cls, focal, dice, comp) + SimLoss + DistLoss on each = 26 terms as the original
    assert row["terms"] == 26 and row["step_s"]["median"] > 0 and row["max_rss_mb"] > row["build_max_rss_mb"] > 100
    assert all(loss == loss for loss in row["losses"])    # finite, not NaN
