"""FastSAM-s vs the SAM ViT-B image encoder, and the selection rules:  python -m util.fastsam_bench [options]

    python -m util.fastsam_bench                          # 1024 x 1024, 1 warm-up + 3 timed rounds
    python -m util.fastsam_bench --repeats 2 --ours       # also the codebase's SDPA ViT-B encoder
    python -m util.fastsam_bench --json fastsam_bench.json

Needs the optional extra (pip install -r requirements-fastsam.txt). Everything has RANDOM
weights and nothing is read or downloaded: FastSAM-s is ultralytics' packaged YOLOv8s-seg
(nc=1, reg_max=26, :func:`model.fastsam.save_random_fastsam`), ViT-B is segment-anything's
``sam_model_registry['vit_b']()`` without a checkpoint (speed does not depend on the weights).
One synthetic image, one process; the models run in interleaved rounds (each round: FastSAM-s
with 0 proposals, FastSAM-s with 300 proposals, ViT-B), so a change of machine load hits all of
them alike. Measured:

* ``FastSAMProposer.proposals`` at imgsz 1024, conf 0.4, iou 0.9, retina masks, cache off:
  stock random weights give 0 proposals (network + NMS); a class bias of 5 gives 300
  proposals (max_det), adding the retina-mask post-processing of 300 image-size masks and
  :func:`model.fastsam_select.mask_runs`;
* the SAM ViT-B image encoder on a 1 x 3 x 1024 x 1024 input (no_grad), segment-anything's
  own; ``--ours``: also ``model.sam_encoder.build_sam_encoder('vit_b', attention='sdpa')``;
* the selection rules (:mod:`model.fastsam_select`) on the 300 proposals, runs given:
  points, box, mask prompt (:func:`select_by_mask`), similarity baseline; median of
  ``--select-repeats`` calls.

Wall times depend on the machine's load: the report prints the load average before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch


def synthetic_image(size: int, seed: int = 0) -> np.ndarray:
    """An RGB uint8 size x size image: a few flat shapes on a gradient, plus noise."""
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    image = np.stack([120 + 80 * xx, 100 + 60 * yy, 140 - 50 * xx * yy], -1)
    s = size // 8
    image[2 * s:5 * s, 1 * s:4 * s] = (220, 50, 40)
    image[4 * s:7 * s, 4 * s:7 * s] = (40, 190, 70)
    disc = (yy * size - 2 * s) ** 2 + (xx * size - 6 * s) ** 2 < (1.5 * s) ** 2
    image[disc] = (30, 60, 210)
    return np.clip(image + rng.randint(-12, 13, image.shape), 0, 255).astype(np.uint8)


def blob_map(size: int, value: float = 0.9) -> torch.Tensor:
    """A size x size map: ``value`` inside a centred ellipse, 0.05 outside."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    inside = ((yy - size * 0.45) / (size * 0.25)) ** 2 + ((xx - size * 0.5) / (size * 0.3)) ** 2 < 1
    return torch.where(inside, torch.tensor(value), torch.tensor(0.05))


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _summary(times: List[float]) -> Dict[str, object]:
    return {"median": statistics.median(times), "min": min(times), "all": times}


def benchmark(*, size: int = 1024, repeats: int = 3, warmup: int = 1, select_repeats: int = 20, ours: bool = False,
              workdir: Optional[Path] = None, log: Callable[[str], None] = print) -> Dict[str, object]:
    """Run the measurements of the module docstring; returns the report (seconds)."""
    from segment_anything import sam_model_registry

    from model.fastsam import FastSAMProposer, save_random_fastsam
    from model.fastsam_select import (mask_runs, select_by_box, select_by_mask, select_by_points,
                                      select_by_similarity)
    from model.sam_encoder import build_sam_encoder

    report: Dict[str, object] = {"meta": {"size": size, "repeats": repeats, "warmup": warmup,
                                          "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                                          "load_before": os.getloadavg()[0]}}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        stock = save_random_fastsam(tmp / "FastSAM-s.pt", size="s", seed=0)
        biased = save_random_fastsam(tmp / "FastSAM-s-biased.pt", size="s", seed=0, class_bias=5.0)
        image = synthetic_image(size)
        proposers = {"fastsam_s_0": FastSAMProposer(stock, imgsz=1024, cache_mb=0),
                     "fastsam_s_300": FastSAMProposer(biased, imgsz=1024, cache_mb=0)}
        torch.manual_seed(0)
        encoders = {"vit_b_segment_anything": sam_model_registry["vit_b"]().image_encoder.eval()}
        if ours:
            encoders["vit_b_ours_sdpa"] = build_sam_encoder("vit_b", attention="sdpa").eval()
        x = torch.randn(1, 3, 1024, 1024)
        times: Dict[str, List[float]] = {name: [] for name in [*proposers, *encoders]}
        counts = {}
        for round_index in range(warmup + repeats):
            kind = "warm-up" if round_index < warmup else "timed"
            for name, proposer in proposers.items():
                seconds = _seconds(lambda: counts.__setitem__(name, proposer.proposals(image)))
                log(f"  round {round_index + 1} ({kind}) {name}: {seconds:.2f} s, "
                    f"{counts[name]['masks'].shape[0]} proposals")
                if round_index >= warmup:
                    times[name].append(seconds)
            for name, encoder in encoders.items():
                with torch.no_grad():
                    seconds = _seconds(lambda: encoder(x))
                log(f"  round {round_index + 1} ({kind}) {name}: {seconds:.2f} s")
                if round_index >= warmup:
                    times[name].append(seconds)
        report["forward"] = {name: _summary(values) for name, values in times.items()}
        report["proposals"] = {name: int(out["masks"].shape[0]) for name, out in counts.items()}

        out = counts["fastsam_s_300"]
        masks, runs = out["masks"], out["runs"]
        prob = blob_map(size)
        h, w = masks.shape[1:]
        selections = {
            "mask_runs (once per image, cached)": lambda: mask_runs(masks),
            "points (1 fg + 1 bg)": lambda: select_by_points(masks, [[w // 2, h // 2], [5, 5]], [1, 0]),
            "box": lambda: select_by_box(masks, [[w // 4, h // 4, 3 * w // 4, 3 * h // 4]], runs=runs),
            "mask prompt (select_by_mask)": lambda: select_by_mask(masks, prob, runs=runs),
            "similarity baseline (delta 0.05)": lambda: select_by_similarity(masks, prob, delta=0.05, runs=runs),
        }
        report["selection"] = {"num_masks": int(masks.shape[0]), "height": h, "width": w, "runs": int(runs.shape[0]),
                               "mean_mask_area": float(masks.sum((1, 2)).double().mean()) if len(masks) else 0.0}
        for name, fn in selections.items():
            fn()
            n = 3 if name.startswith("mask_runs") else select_repeats
            report["selection"][name] = _summary([_seconds(fn) for _ in range(n)])
    report["meta"]["load_after"] = os.getloadavg()[0]
    return report


def format_report(report: Dict[str, object]) -> str:
    meta, forward, selection = report["meta"], report["forward"], report["selection"]
    lines = [f"FastSAM-s vs SAM ViT-B at {meta['size']}x{meta['size']}, torch {meta['torch']}, "
             f"{meta['torch_threads']} threads, {meta['warmup']} warm-up + {meta['repeats']} timed rounds, "
             f"load average {meta['load_before']:.2f} -> {meta['load_after']:.2f}",
             f"{'':44s}{'median s':>10s}{'min s':>10s}"]
    names = {"fastsam_s_0": f"FastSAM-s proposals ({report['proposals']['fastsam_s_0']} found)",
             "fastsam_s_300": f"FastSAM-s proposals ({report['proposals']['fastsam_s_300']} found)",
             "vit_b_segment_anything": "SAM ViT-B image encoder (segment-anything)",
             "vit_b_ours_sdpa": "SAM ViT-B image encoder (ours, SDPA)"}
    for key, value in forward.items():
        lines.append(f"{names[key]:44s}{value['median']:10.2f}{value['min']:10.2f}")
    short = {"vit_b_segment_anything": "ViT-B", "vit_b_ours_sdpa": "ViT-B (ours)"}
    for key in forward:
        if key in short:
            for fast in ("fastsam_s_0", "fastsam_s_300"):
                label = f"ratio {short[key]} / FastSAM-s ({report['proposals'][fast]} found)"
                lines.append(f"{label:44s}{forward[key]['median'] / forward[fast]['median']:9.1f}x")
    lines.append(f"selection on {selection['num_masks']} proposals of {selection['width']}x{selection['height']} "
                 f"({selection['runs']} runs, mean area {selection['mean_mask_area']:.0f} px)")
    lines.append(f"{'':44s}{'median ms':>10s}{'min ms':>10s}")
    for key, value in selection.items():
        if isinstance(value, dict):
            lines.append(f"{key:44s}{value['median'] * 1e3:10.1f}{value['min'] * 1e3:10.1f}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m util.fastsam_bench", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--size", type=int, default=1024, help="image side (default 1024)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up rounds (default 1)")
    parser.add_argument("--select-repeats", type=int, default=20, help="calls per selection timing (default 20)")
    parser.add_argument("--ours", action="store_true", help="also time the codebase's SDPA ViT-B encoder")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        report = benchmark(size=args.size, repeats=args.repeats, warmup=args.warmup,
                           select_repeats=args.select_repeats, ours=args.ours)
    except ImportError as err:          # model.fastsam.FastSAMUnavailable names the extra
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
