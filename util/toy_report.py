"""One table from several test runs:  python -m util.toy_report RESULTS.json [RESULTS.json ...]

Each results.json of test.py contributes its final row (labelled by the model: SAM-RSP(BAM),
SAM-RSP(SCCAN), SCCAN, BAM) and, for SAM-RSP, its prompt generator's row (the RSP is the
generator's own output on the same episodes: BAM's ``final_out``, SCCAN's ``softmax(meta_out)``,
whose argmax is the generator's prediction). The all-foreground baseline comes from the first
file. Every figure is mean +- sample std over the file's seeds, as test.py prints it; rows of
files tested on different episodes (seeds, episode counts, fold, shot) are refused.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Mapping, Sequence, Tuple

PROTOCOL_KEYS = ("dataset", "split", "shot", "seeds", "episodes", "query_order")


def rows_of(results: Mapping) -> List[Tuple[str, str]]:
    """(label, key prefix) of the rows one results.json holds."""
    model, rspg = results.get("model") or "final", results.get("rspg")
    if "prompt_miou_mean" in results:
        return [(rspg or "RSP", "prompt_"), (f"{model}({rspg})" if rspg else model, "")]
    return [(model, "")]


def table(files: Sequence[Mapping]) -> str:
    """The combined table (text)."""
    first = files[0]
    for other in files[1:]:
        diff = [k for k in PROTOCOL_KEYS if other.get(k) != first.get(k)]
        if diff:
            raise ValueError(f"results of different protocols cannot share a table (they differ in {diff})")
    pct = lambda v: f"{100 * v:6.2f}"
    seeds = len(first["seeds"])
    lines = [f"{first['dataset']} fold {first['split']}, {first['shot']}-shot: {seeds} seed{'s' if seeds != 1 else ''} x "
             f"{first['episodes']} episodes, mean +- std over seeds",
             f"{'':28s}{'mIoU':>16s}{'FB-IoU':>16s}"]
    rows, seen = [("all-foreground baseline", first, "baseline_")], set()
    for results in files:
        for label, prefix in rows_of(results):
            if label not in seen:
                seen.add(label)
                rows.append((label, results, prefix))
    for label, results, prefix in rows:
        lines.append(f"{label:28s}{pct(results[prefix + 'miou_mean'])} +- {pct(results[prefix + 'miou_std']).strip():>5s}"
                     f"{pct(results[prefix + 'fbiou_mean'])} +- {pct(results[prefix + 'fbiou_std']).strip():>5s}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="results.json files written by test.py")
    args = parser.parse_args(argv)
    files = []
    for path in args.results:
        if not path.is_file():
            print(f"error: {path}: no such results file (run test.py first)", file=sys.stderr)
            return 2
        files.append(json.loads(path.read_text()))
    try:
        print(table(files))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
