"""SCCAN speed and memory:  python -m util.bench_sccan [CONFIG] [key=value ...] [options]

    python -m util.bench_sccan                                    # R50, 473, 1-shot, eval batch 2
    python -m util.bench_sccan config/pascal/pascal_split0_resnet101.yaml data.shot=5 --episodes 3
    python -m util.bench_sccan config/toy/toy.yaml --json sccan_toy.json

Random weights (no file is read), synthetic inputs at the config's size (``train.sccan`` sizes
applied), every measurement in a fresh subprocess so each peak memory (max RSS) is its own:

* eval: one SCCAN forward of a batch of ``--eval-batch`` episodes (the SCCAN issue quotes the
  original at about 11 s per B=2 forward at 473, R50, 1-shot, 2 threads on this machine kind),
  median of ``--episodes`` after ``--warmup``; also the forward with the query's frozen features
  taken from the cache (what the test protocol's 2nd..5th seeds cost per query);
* train step: forward, weighted Dice, backward, SGD + AdamW steps (the stage table's
  optimizers), batch ``--train-batch``.

The original SCCAN repository is not on this machine, so there is no original column: its
figures from SPEC_SCCAN 8-9 (measured on another run of this machine kind: 11-32 s per B=2
forward depending on load, about 2 GB peak) are quoted in the README beside ours, labelled as
such. Figures depend on the machine's load: the report prints the load average.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

from util.bench import RESULT_PREFIX, max_rss_mb, synthetic_episode, timed

DEFAULT_CONFIG = "config/pascal/pascal_split0_resnet50.yaml"
RANDOM = ["model.allow_random_init=true", "model.backbone_checkpoint=", "weights=", "resume=", "train.stage=sccan"]


def _config(args):
    from util.config import load_config
    from util.stages import get_stage
    return get_stage("sccan").configure(load_config(args.config, list(args.overrides) + RANDOM))


def worker(kind: str, args) -> dict:
    import torch
    from model import build_model
    from util.losses import sccan_loss
    from util.stages import Progress, get_stage
    cfg = _config(args)
    torch.manual_seed(0)
    model = build_model(cfg, "sccan")
    gen = torch.Generator().manual_seed(0)
    shot = cfg["data"]["shot"]
    result = {}
    if kind == "eval":
        model.eval()
        query, supports, masks, _ = synthetic_episode(batch=args.eval_batch, shot=shot, size=cfg["data"]["val_size"],
                                                      generator=gen)
        with torch.no_grad():
            result["forward_s"] = timed(lambda: model(query, supports, masks), repeat=args.episodes,
                                        warmup=args.warmup, sync=lambda: None)
            feats = model.extract_query_features(query)
            result["cached_query_forward_s"] = timed(lambda: model(query, supports, masks, query_feats=feats),
                                                     repeat=args.episodes, warmup=args.warmup, sync=lambda: None)
    else:
        model.train()
        query, supports, masks, target = synthetic_episode(batch=args.train_batch, shot=shot,
                                                           size=cfg["data"]["train_size"], generator=gen)
        optimizers = get_stage("sccan").optimizers(model, cfg)
        progress = Progress(step=1, max_steps=10, epoch=0, epochs=1)

        def step():
            for o in optimizers:
                o.set_lr(progress)
                o.optimizer.zero_grad(set_to_none=True)
            loss, _ = sccan_loss(model(query, supports, masks), {"query_mask": target})
            loss.backward()
            for o in optimizers:
                o.optimizer.step()

        result["step_s"] = timed(step, repeat=args.steps, warmup=args.warmup, sync=lambda: None)
    result["max_rss_mb"] = max_rss_mb()
    result["threads"] = torch.get_num_threads()
    return result


def run(kind: str, args) -> dict:
    cmd = [sys.executable, "-m", "util.bench_sccan", args.config, *args.overrides, "--worker", kind,
           "--episodes", str(args.episodes), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--eval-batch", str(args.eval_batch), "--train-batch", str(args.train_batch)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    raise RuntimeError(f"bench worker {kind} failed:\n{proc.stderr[-3000:]}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default=DEFAULT_CONFIG)
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--episodes", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--eval-batch", type=int, default=2)
    parser.add_argument("--train-batch", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", choices=("eval", "train"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(RESULT_PREFIX + json.dumps(worker(args.worker, args)))
        return 0
    load_before = os.getloadavg()
    report = {"config": args.config, "overrides": args.overrides, "eval": run("eval", args), "train": run("train", args)}
    report["load_average"] = [load_before[0], os.getloadavg()[0]]
    e, t = report["eval"], report["train"]
    print(f"SCCAN {args.config} {' '.join(args.overrides)} ({e['threads']} threads, load {load_before[0]:.1f} -> "
          f"{report['load_average'][1]:.1f})")
    print(f"  eval forward, batch {args.eval_batch}: median {e['forward_s']['median']:.2f} s "
          f"(min {e['forward_s']['min']:.2f}); with cached query features {e['cached_query_forward_s']['median']:.2f} s; "
          f"peak RSS {e['max_rss_mb']:.0f} MB")
    print(f"  train step, batch {args.train_batch}: median {t['step_s']['median']:.2f} s; peak RSS {t['max_rss_mb']:.0f} MB")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
