"""One table of weak-shot results (results.json of ``test.py`` with ``train.stage=simformer``):
base / novel / all mIoU and their harmonic mean per variant.

    python -m util.weakshot_report exp/toy/weakshot/test_*/results.json

The harmonic mean 2 B N / (B + N) is ours: the original reports all / base / novel mIoU only.
Runs of different datasets, splits or class sets are refused (the rows would not compare).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Mapping, Sequence

#: the order of the rows: lower bound, the method without and with its SimNet, upper bound
ORDER = ("base-only", "SimFormer w/o SimNet", "SimFormer", "fully supervised")


def table(results: Sequence[Mapping]) -> str:
    if not results:
        raise ValueError("no results to tabulate")
    first = results[0]
    for r in results[1:]:
        for key in ("dataset", "split", "num_classes", "novel_classes", "num_images"):
            if r.get(key) != first.get(key):
                raise ValueError(f"results differ in {key}: {first.get(key)!r} vs {r.get(key)!r}")
    rows = sorted(results, key=lambda r: ORDER.index(r["variant"]) if r["variant"] in ORDER else len(ORDER))
    novel = ", ".join(str(c) for c in first["novel_classes"])
    lines = [f"weak-shot {first['dataset']} split {first['split']}: {first['num_classes']} classes, novel {novel}; "
             f"{first['num_images']} images, mIoU (%)",
             f"{'':<28}{'base':>8}{'novel':>8}{'all':>8}{'harmonic (ours)':>17}"]
    for r in rows:
        lines.append(f"{r['variant']:<28}{100 * r['miou_base']:8.2f}{100 * r['miou_novel']:8.2f}"
                     f"{100 * r['miou_all']:8.2f}{100 * r['harmonic']:17.2f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="results.json files of simformer test runs")
    args = parser.parse_args(argv)
    text = table([json.loads(path.read_text()) for path in args.results])
    print(text)
    return text


if __name__ == "__main__":
    main()
