"""Evaluation: the few-shot test protocol (SPEC 5) and the base learner's validation.

Every evaluation runs under ``torch.no_grad()`` with the model in eval mode, shards its
episodes over processes (``ShardSampler``) and all-reduces integer counts, so a result does not
depend on the number of processes or on ``eval.batch_size``.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from util.config import ConfigError
from util.dataset import build_episodes, build_source, collate
from util.distributed import ProcessInfo, ShardSampler
from util.metrics import FewShotMeter, SegmentationMeter, crop_targets, predict_at_original_resolution


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DistributedDataParallel (evaluation never goes through DDP: ranks may
    have different numbers of batches)."""
    return model.module if hasattr(model, "module") else model


def episode_inputs(batch: Mapping, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (batch["query_img"].to(device, non_blocking=True), batch["support_imgs"].to(device, non_blocking=True),
            batch["support_masks"].to(device, non_blocking=True))


def make_loader(dataset, proc: ProcessInfo, batch_size: int, num_workers: int, *, limit: int | None = None,
                skip: int = 0) -> DataLoader:
    sampler = ShardSampler(len(dataset), proc.rank, proc.world_size, limit=limit, skip=skip)
    # A private generator: creating the loader must not consume the global RNG (dropout masks
    # of a resumed run would differ otherwise).
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, collate_fn=collate,
                      pin_memory=proc.device.type == "cuda", drop_last=False, generator=torch.Generator(),
                      persistent_workers=False)


class EpisodeRunner:
    """Runs a few-shot model on a batch of episodes: ``outputs = runner(model, batch)``.

    The plain runner calls ``model(query_img, support_imgs, support_masks)``; the feature cache
    (util.feature_cache.CachedEpisodeRunner) plugs in here to reuse the frozen encoders' outputs.
    ``stats["encoder_calls"]`` counts the query images that went through the (frozen) query
    encoder: here one per episode; ``stats["cache_hits"]`` the ones a cache served instead.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.stats = {"encoder_calls": 0, "cache_hits": 0}

    def begin(self, dataset) -> None:
        """Called by :func:`evaluate_episodes` before the episodes of ``dataset`` run."""

    def __call__(self, model: torch.nn.Module, batch: Mapping) -> dict:
        query_img, support_imgs, support_masks = episode_inputs(batch, self.device)
        self.stats["encoder_calls"] += int(query_img.shape[0])
        return model(query_img, support_imgs, support_masks)


@torch.no_grad()
def evaluate_episodes(model: torch.nn.Module, dataset, *, class_ids: Sequence[int], proc: ProcessInfo,
                      batch_size: int = 1, num_workers: int = 0, runner: EpisodeRunner | None = None,
                      progress: bool = True, desc: str = "eval",
                      on_batch: Callable[[Mapping, dict, list], None] | None = None) -> dict:
    """Score every episode of ``dataset`` at original resolution.

    Returns the summaries (util.metrics.FewShotMeter) of the final output (``final``), of the
    RSP when the model has one (``prompt``), and of the all-foreground predictor on the same
    episodes (``baseline``), summed over processes.
    """
    net = unwrap(model)
    was_training = net.training
    net.eval()
    runner = runner or EpisodeRunner(proc.device)
    meters = {name: FewShotMeter(class_ids, device=proc.device) for name in ("final", "prompt", "baseline")}
    has_prompt = False
    loader = make_loader(dataset, proc, batch_size, num_workers)
    runner.begin(dataset)
    for batch in tqdm(loader, desc=desc, disable=not (progress and proc.is_main), leave=False, dynamic_ncols=True):
        outputs = runner(net, batch)
        sizes = batch["query_ori_size"]
        targets = [t.to(proc.device) for t in crop_targets(batch["query_label_ori"], sizes)]
        preds = predict_at_original_resolution(outputs["logits"], sizes)
        meters["final"].update(preds, targets, batch["class_id"])
        if "prompt_logits" in outputs:
            has_prompt = True
            meters["prompt"].update(predict_at_original_resolution(outputs["prompt_logits"], sizes), targets,
                                    batch["class_id"])
        meters["baseline"].update([torch.ones_like(t) for t in targets], targets, batch["class_id"])
        if on_batch is not None:
            on_batch(batch, outputs, preds)
    for meter in meters.values():
        meter.all_reduce()
    net.train(was_training)
    summary = {name: meter.summary() for name, meter in meters.items()}
    if not has_prompt:
        summary.pop("prompt")
    return summary


@torch.no_grad()
def evaluate_segmentation(model: torch.nn.Module, dataset, *, num_classes: int, proc: ProcessInfo,
                          batch_size: int = 1, num_workers: int = 0, progress: bool = True) -> dict:
    """The base learner's validation: semantic mIoU over the base classes at original resolution."""
    net = unwrap(model)
    was_training = net.training
    net.eval()
    meter = SegmentationMeter(num_classes, device=proc.device)
    for batch in tqdm(make_loader(dataset, proc, batch_size, num_workers), desc="val", leave=False,
                      disable=not (progress and proc.is_main), dynamic_ncols=True):
        logits = net(batch["image"].to(proc.device))["logits"]
        preds = predict_at_original_resolution(logits, batch["ori_size"])
        targets = [t.to(proc.device) for t in crop_targets(batch["label_ori"], batch["ori_size"])]
        meter.update(preds, targets)
    meter.all_reduce()
    net.train(was_training)
    return meter.summary()


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


#: eval.protocol -> what it is. ``samrsp`` reads eval.seeds / eval.episodes; the others fix them.
PROTOCOLS = {
    "samrsp": "eval.seeds x eval.episodes (default SAM-RSP's 5 seeds x 1000), mean +- sample std over seeds",
    "sccan": "SCCAN's published protocol: one seed 321 x 1000 episodes (PASCAL) / 4000 (COCO); the original "
             "also selected its checkpoints on these episodes, so the figure is not an independent test",
}
_SCCAN_EPISODES = {"pascal": 1000, "coco": 4000}


def protocol_settings(cfg: Mapping) -> tuple[str, list[int], int]:
    """``(name, seeds, episodes per seed)`` of ``eval.protocol``."""
    ev = cfg["eval"]
    name = ev["protocol"]
    if name not in PROTOCOLS:
        raise ConfigError(f"eval.protocol must be one of {', '.join(PROTOCOLS)}, got {name!r}")
    if name == "sccan":
        # other datasets (toy, custom) keep eval.episodes: the original defines PASCAL and COCO only
        return name, [321], _SCCAN_EPISODES.get(cfg["data"]["dataset"], int(ev["episodes"]))
    return name, list(ev["seeds"]), int(ev["episodes"])


def run_test_protocol(model: torch.nn.Module, cfg: Mapping, *, proc: ProcessInfo, runner: EpisodeRunner | None = None,
                      progress: bool = True, log: Callable[[str], None] = print,
                      on_batch_factory: Callable[[int], Callable | None] | None = None) -> dict:
    """The test protocol of ``eval.protocol`` (:data:`PROTOCOLS`): seeds x episodes; mean +- std
    over seeds and every seed's figures (never the best seed)."""
    ev = cfg["eval"]
    protocol, seeds, num_episodes = protocol_settings(cfg)
    source = build_source(cfg, progress=progress and proc.is_main, log=log if proc.is_main else (lambda _: None))
    fold = source.fold
    per_seed, class_ious, prompt_class_ious = [], [], []
    skipped = 0
    for seed_index, seed in enumerate(seeds):
        episodes = build_episodes(cfg, "val", source=source, seed=seed, num_episodes=num_episodes)
        skipped = episodes.skipped_queries
        on_batch = on_batch_factory(seed_index) if on_batch_factory else None
        summary = evaluate_episodes(model, episodes, class_ids=fold.novel, proc=proc, batch_size=ev["batch_size"],
                                    num_workers=cfg["data"]["num_workers"], runner=runner, progress=progress,
                                    desc=f"seed {seed}", on_batch=on_batch)
        row = {"seed": seed, "miou": summary["final"]["miou"], "fbiou": summary["final"]["fbiou"],
               "baseline_miou": summary["baseline"]["miou"], "baseline_fbiou": summary["baseline"]["fbiou"],
               "classes_unseen": summary["final"]["classes_unseen"]}
        class_ious.append(summary["final"]["class_iou"])
        if "prompt" in summary:
            row.update(prompt_miou=summary["prompt"]["miou"], prompt_fbiou=summary["prompt"]["fbiou"])
            prompt_class_ious.append(summary["prompt"]["class_iou"])
        per_seed.append(row)
        if proc.is_main:
            log("seed {seed}: mIoU {m:.2f}  FB-IoU {f:.2f}{p}".format(
                seed=seed, m=100 * row["miou"], f=100 * row["fbiou"],
                p=f"  | RSP mIoU {100 * row['prompt_miou']:.2f}  FB-IoU {100 * row['prompt_fbiou']:.2f}"
                if "prompt_miou" in row else ""))
            if row["classes_unseen"]:
                log(f"  note: no episode of classes {row['classes_unseen']} (counted as IoU 0, as the original)")
    results = {"dataset": cfg["data"]["dataset"], "split": cfg["data"]["split"], "shot": cfg["data"]["shot"],
               "backbone": cfg["model"]["backbone"], "protocol": protocol, "protocol_description": PROTOCOLS[protocol],
               "model": type(unwrap(model)).__name__, "rspg": _generator_name(model),
               "seeds": seeds, "episodes": num_episodes,
               "query_order": ev["query_order"], "skipped_queries": skipped, "per_seed": per_seed}
    keys = ["miou", "fbiou", "baseline_miou", "baseline_fbiou"]
    if prompt_class_ious:
        keys += ["prompt_miou", "prompt_fbiou"]
    for key in keys:
        results[f"{key}_mean"], results[f"{key}_std"] = _mean_std([row[key] for row in per_seed])
    results["class_iou"] = {fold.name(c): sum(d[c] for d in class_ious) / len(class_ious) for c in fold.novel}
    if prompt_class_ious:
        results["prompt_class_iou"] = {fold.name(c): sum(d[c] for d in prompt_class_ious) / len(prompt_class_ious)
                                       for c in fold.novel}
    return results


def _generator_name(model: torch.nn.Module) -> str | None:
    """The class name of a SAM-RSP's prompt generator (BAM / SCCAN), None for other models."""
    rspg = getattr(unwrap(model), "rspg", None)
    return type(rspg).__name__ if rspg is not None else None


def format_results(results: Mapping) -> str:
    """The results as text tables: summary (mean +- std over seeds), per seed, per class."""
    pct = lambda v: f"{100 * v:6.2f}"
    lines = [f"{results['dataset']} fold {results['split']}, {results['shot']}-shot, {results['backbone']}: "
             f"{len(results['seeds'])} seed{'s' if len(results['seeds']) != 1 else ''} x {results['episodes']} episodes "
             f"({results['query_order']} queries, protocol {results.get('protocol', 'samrsp')}), mean +- std over seeds",
             f"{'':24s}{'mIoU':>16s}{'FB-IoU':>16s}"]
    rows = [("all-foreground baseline", "baseline_")]
    if "prompt_miou_mean" in results:
        rows.append((f"RSP ({results.get('rspg') or 'BAM'} prompt)", "prompt_"))
    rows.append((results.get("model") or "final" if "prompt_miou_mean" not in results else "SAM-RSP (final)", ""))
    for label, prefix in rows:
        lines.append(f"{label:24s}{pct(results[prefix + 'miou_mean'])} +- {pct(results[prefix + 'miou_std']).strip():>5s}"
                     f"{pct(results[prefix + 'fbiou_mean'])} +- {pct(results[prefix + 'fbiou_std']).strip():>5s}")
    lines.append("")
    header = f"{'seed':>6s}{'mIoU':>9s}{'FB-IoU':>9s}" + (f"{'RSP mIoU':>10s}{'RSP FB':>9s}" if "prompt_miou_mean" in results else "")
    lines.append(header)
    for row in results["per_seed"]:
        line = f"{row['seed']:>6d}{pct(row['miou']):>9s}{pct(row['fbiou']):>9s}"
        if "prompt_miou" in row:
            line += f"{pct(row['prompt_miou']):>10s}{pct(row['prompt_fbiou']):>9s}"
        lines.append(line)
    lines.append("")
    lines.append(f"{'class':24s}{'IoU':>8s}" + (f"{'RSP IoU':>10s}" if "prompt_class_iou" in results else ""))
    for name, iou in results["class_iou"].items():
        line = f"{name:24s}{pct(iou):>8s}"
        if "prompt_class_iou" in results:
            line += f"{pct(results['prompt_class_iou'][name]):>10s}"
        lines.append(line)
    return "\n".join(lines)
