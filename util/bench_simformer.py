"""SimFormer training-step speed and memory:  python -m util.bench_simformer [options]

    python -m util.bench_simformer                          # full size, 2 pairs at 512, and 1 pair at 128
    python -m util.bench_simformer --rows issue --steps 2 --json simformer_bench.json

One step = the full-size MaskFormer head (pixel decoder, 6-layer transformer decoder, 100
queries, deep supervision) + the SimFormer criterion (matching on every layer, ClsLoss, MaskLoss,
CompLoss, SimNet SimLoss and DistLoss) forward and backward, on backbone features given as
inputs (the frozen-BN ResNet-50 is run once, without gradients, outside the timing: the issue
times "head + criterion"), then an AdamW step. Model: ``config/weakshot/cocostuff10k_split2.yaml``
(171 classes, split 2: 43 novel), RANDOM weights (nothing is read); targets: synthetic
label maps where each pair shares base classes and holds a novel image-level label, so every
loss term is on. Each row runs in a FRESH subprocess (its peak RSS is its own); the time is the
median of ``--steps`` after ``--warmup``.

Rows:

* ``issue``: 2 pairs (4 images) at 512 x 512 (the SimFormer issue's benchmark setting);
* ``spec``: 1 pair at 128 x 128, the setting at which SPEC_SIMFORMER 12.3 quotes the ORIGINAL
  head + criterion at 9.9 s fwd+bwd on a 2-core CPU (another run, not this one: the original is
  not on this machine, so no same-run ratio can be given).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "config" / "weakshot" / "cocostuff10k_split2.yaml"
ROWS = {"issue": {"pairs": 2, "size": 512}, "spec": {"pairs": 1, "size": 128}}
SPEC_ORIGINAL_SECONDS = {"spec": 9.9}     # SPEC_SIMFORMER 12.3: original head + criterion, 1 pair at 128, fwd+bwd


def _batch(cfg, pairs: int, size: int, generator: torch.Generator):
    """Synthetic collated batch: per pair two label maps sharing two base classes (rectangles), the
    first novel class as an image-level label of both, no padding."""
    from util.folds import make_fold
    fold = make_fold(cfg["data"])
    num_classes = fold.num_classes + 1
    novel = sorted(fold.novel)
    base = [c for c in range(num_classes) if c not in set(novel)]
    labels, tags = [], []
    for p in range(pairs):
        shared = [base[(2 * p) % len(base)], base[(2 * p + 1) % len(base)]]
        for image in range(2):
            label = torch.full((size, size), shared[0], dtype=torch.int64)
            h0, w0 = (int(v) for v in torch.randint(0, size // 2, (2,), generator=generator))
            label[h0:h0 + size // 3, w0:w0 + size // 3] = shared[1]
            label[size - size // 4:, :size // 4] = 255           # novel pixels are ignored in weak-shot
            tag = torch.zeros(num_classes)
            tag[novel[0]] = 1
            labels.append(label)
            tags.append(tag)
    batch = {"label": labels, "pad": [torch.zeros(size, size) for _ in labels], "image_labels": tags}
    images = torch.rand(2 * pairs, 3, size, size, generator=generator) * 255
    return images, batch


def worker(row: str, steps: int, warmup: int, threads: int) -> Dict[str, object]:
    from model import build_model
    from model.simformer import optimizer_param_groups, preprocess_images
    from util.config import load_config
    from util.stages.simformer import make_targets
    torch.set_num_threads(threads)
    cfg = load_config(CONFIG, ["model.allow_random_init=true", "model.simformer.backbone_checkpoint=", "device=cpu"])
    torch.manual_seed(0)
    model = build_model(cfg, "simformer").train()
    build_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    generator = torch.Generator().manual_seed(0)
    images, batch = _batch(cfg, ROWS[row]["pairs"], ROWS[row]["size"], generator)
    with torch.no_grad():
        features = model.extract_features(preprocess_images(list(images))[0])
    targets = make_targets(batch)
    head_params = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("backbone.")]
    groups = optimizer_param_groups(model, base_lr=1e-4, weight_decay=1e-4, backbone_multiplier=0.1,
                                    weight_decay_norm=0.0, weight_decay_embed=0.0)
    groups = [dict(g, params=[p for p in g["params"] if any(p is q for q in head_params)]) for g in groups]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=1e-4)
    times, losses = [], []
    for i in range(warmup + steps):
        start = time.perf_counter()
        out = model(targets=targets, features={k: v.clone().requires_grad_(True) for k, v in features.items()},
                    generator=torch.Generator().manual_seed(i))
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        elapsed = time.perf_counter() - start
        if i >= warmup:
            times.append(elapsed)
            losses.append(float(out["loss"]))
    return {"row": row, **ROWS[row], "step_s": {"median": statistics.median(times), "min": min(times)},
            "losses": losses, "terms": len(out["losses"]), "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "build_max_rss_mb": build_rss, "threads": threads,
            "original_s_spec": SPEC_ORIGINAL_SECONDS.get(row)}


def table(report: Dict[str, object]) -> str:
    lines = [f"SimFormer full-size head + criterion training step ({CONFIG.name}), median of {report['steps']} "
             f"step(s) after {report['warmup']} warm-up; {report['threads']} threads, load "
             f"{report['load_average'][0]:.2f} -> {report['load_average'][1]:.2f}",
             f"{'row':<34}{'step s':>8}{'min s':>8}{'peak RSS MB':>13}{'loss terms':>12}"
             f"{'original (SPEC 12.3, another run)':>36}"]
    for name, r in report["rows"].items():
        label = f"{name}: {r['pairs']} pair(s) at {r['size']}"
        original = f"{r['original_s_spec']:.1f} s" if r["original_s_spec"] else "-"
        lines.append(f"{label:<34}{r['step_s']['median']:8.2f}{r['step_s']['min']:8.2f}{r['max_rss_mb']:13.0f}"
                     f"{r['terms']:12d}{original:>36}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m util.bench_simformer", description=__doc__.split("\n")[0])
    parser.add_argument("--rows", nargs="+", choices=sorted(ROWS), default=["issue", "spec"])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", choices=sorted(ROWS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.warmup, args.threads)))
        return 0
    load = [os.getloadavg()[0]]
    rows: Dict[str, object] = {}
    for row in args.rows:
        print(f"running {row} ...", file=sys.stderr, flush=True)
        done = subprocess.run([sys.executable, "-m", "util.bench_simformer", "--worker", row, "--steps",
                               str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)],
                              cwd=ROOT, capture_output=True, text=True)
        if done.returncode:
            print(done.stderr, file=sys.stderr)
            return done.returncode
        rows[row] = json.loads(done.stdout.strip().splitlines()[-1])
    load.append(os.getloadavg()[0])
    report = {"rows": rows, "steps": args.steps, "warmup": args.warmup, "threads": args.threads, "load_average": load}
    print(table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
