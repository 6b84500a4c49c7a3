"""Stage ``cat_sam``: CAT-SAM few-shot adaptation of a frozen SAM (SPEC_CAT_SAM 6, 9, 13).

* model: :func:`model.build_cat_sam_from_config` (``model.cat_sam``, SAM size from ``model.sam``);
  the frozen SAM comes from ``model.sam.checkpoint`` (a ``sam_vit_*.pth``), loaded by
  util.checkpoint.load_pretrained_parts; our checkpoints then hold only the trainable tensors and
  reference the SAM file by path and sha256. ``zero_shot`` has nothing to train: training it is
  refused, test.py takes the SAM file as ``weights``;
* data (util/cat_sam_data.py): the generic folder format; training list ``train_<shot>shot.txt``
  (``train.txt`` with data.shot=0); flips + area crop, ONE prompt type per sample (point / box /
  noisy mask) for all its objects; lists of differently sized samples;
* loss: per-object BCE + Dice (model/cat_sam_loss.py), outside the forward;
* one optimizer: AdamW over the trainable tensors, cosine annealing to ``min_lr`` stepped once
  per pass over the data (the original's CosineAnnealingLR(T_max=epochs) stepped per epoch); an
  engine "epoch" is ``val_every`` passes (the original evaluates every 20 epochs in 1-shot);
* validation / test (SPEC 9): one tight GT box per object, the union of the per-object masks,
  dataset-level foreground IoU (sum of intersections / sum of unions over the set), plus the mean
  per-image IoU and the same two numbers with one interior point per object.

The original's defects fixed here (SPEC 13): images are always normalised (also at 1024 x 1024:
model/cat_sam.py); gradients are all-reduced under DDP (the engine's DistributedDataParallel, no
``no_sync``); samples are a pure function of (seed, epoch, index), no per-epoch worker re-seeding;
the checkpoint is selected on ``val.txt`` (``train.cat_sam.select=val``), not on the test set --
``select=test`` is the original's preset, labelled as such in results.json.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, List, Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from util.config import ConfigError
from util.distributed import ProcessInfo, ShardSampler
from util.stages import SCHEDULES, OptimizerSpec, Progress, Stage, StageData

SELECT = ("val", "test")


def cosine_per_data_epoch(base_lr: float, progress: Progress, min_lr: float = 0.0,
                          data_epochs_per_epoch: int = 1) -> float:
    """Cosine annealing stepped once per pass over the data when an engine epoch holds
    ``data_epochs_per_epoch`` passes: pass p of P uses ``min + (base - min)(1 + cos(pi p / P)) / 2``."""
    k = int(data_epochs_per_epoch)
    iters = max(1, progress.max_steps // progress.epochs)
    j = (progress.step - 1) - progress.epoch * iters
    data_epoch = progress.epoch * k + min(k - 1, (j * k) // iters)
    return min_lr + (base_lr - min_lr) * (1 + math.cos(math.pi * data_epoch / (progress.epochs * k))) / 2


SCHEDULES.setdefault("cosine_per_data_epoch", cosine_per_data_epoch)


# -- model ----------------------------------------------------------------------------------------

def build(cfg: Mapping) -> torch.nn.Module:
    from model import build_model
    return build_model(cfg, "cat_sam")


def mask_prompt_size(cfg: Mapping) -> int:
    """Side of SAM's dense mask input (4 x the token grid: 256 at 1024 / 16)."""
    sam = cfg["model"]["sam"]
    return 4 * int(sam["img_size"]) // int(sam["patch_size"])


def configure(cfg: Mapping) -> Mapping:
    t = cfg["train"]["cat_sam"]
    if t["select"] not in SELECT:
        raise ConfigError(f"train.cat_sam.select must be val or test, got {t['select']!r}")
    if int(t["val_every"]) < 1 or int(t["epochs"]) % int(t["val_every"]):
        raise ConfigError(f"train.cat_sam.epochs={t['epochs']} must be a positive multiple of "
                          f"train.cat_sam.val_every={t['val_every']}")
    if cfg["model"]["cat_sam"]["resize"] == "longest_side" and "mask" in t["prompt_types"]:
        raise ConfigError("the noisy-mask prompt is made in the original's squash frame: with "
                          "model.cat_sam.resize=longest_side drop 'mask' from train.cat_sam.prompt_types")
    return cfg


# -- data -----------------------------------------------------------------------------------------

def cat_sam_data(cfg: Mapping, log: Callable[[str], None]) -> StageData:
    from util.cat_sam_data import build_eval_set, build_train_set, train_list_name
    t = cfg["train"]["cat_sam"]
    train_set = build_train_set(cfg, mask_size=mask_prompt_size(cfg), repeats=int(t["val_every"]))
    if t["select"] == "test":
        val_set, what = build_eval_set(cfg, "test.txt"), "test.txt (the original's preset: selection on the test set)"
    else:
        val_set = build_eval_set(cfg, "val.txt", required=False)
        what = "val.txt"
        if val_set is None:
            if cfg["train"]["select"] == "best":
                raise ConfigError(f"train.cat_sam.select=val but {cfg['data']['root']}/val.txt does not exist: give a "
                                  f"validation list (python -m util.prepare kvasir|whu|sbu --root ROOT --val N writes one), "
                                  f"or train.select=last (no selection: the last weights), or "
                                  f"train.cat_sam.select=test (the original's selection on the test set)")
            from util.cat_sam_data import CATSAMEvalSet, ObjectRules
            val_set = CATSAMEvalSet([], threshold=0.0, rules=ObjectRules.from_config(cfg))
            what = "nothing (train.select=last)"
    log(f"CAT-SAM data {cfg['data']['root']}: {len(train_set.entries)} training samples "
        f"({train_list_name(int(cfg['data']['shot']))}) x {train_set.repeats} passes per engine epoch; validation on "
        f"{what} ({len(val_set)} images); prompts {list(t['prompt_types'])}, crop {bool(t['crop'])}")
    return StageData(train_set, val_set)


def cat_sam_inputs(batch: Mapping):
    return (), {"images": batch["image"], "boxes": batch["boxes"], "points": batch["points"],
                "point_labels": batch["point_labels"], "noisy_masks": batch["noisy_masks"]}


def cat_sam_stage_loss(outputs, batch, stage_cfg):
    from model.cat_sam_loss import cat_sam_loss
    return cat_sam_loss(outputs, batch["masks"])


# -- optimizer and length -------------------------------------------------------------------------

def cat_sam_optimizers(model: torch.nn.Module, cfg: Mapping) -> List[OptimizerSpec]:
    """AdamW(lr, weight_decay) over ``[p for p in parameters() if p.requires_grad]`` (SPEC 4/6)."""
    net = model.module if hasattr(model, "module") else model
    params = [p for p in net.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(f"{net.name} has no trainable parameter: zero-shot SAM is test-only "
                          f"(python test.py CONFIG model.cat_sam.variant=zero_shot weights=<the sam_vit_*.pth file>)")
    t = cfg["train"]["cat_sam"]
    adamw = torch.optim.AdamW([{"params": params, "base_lr": float(t["lr"]), "name": "trainable"}],
                              lr=float(t["lr"]), weight_decay=float(t["weight_decay"]))
    return [OptimizerSpec("adamw", adamw, "cosine_per_data_epoch",
                          {"min_lr": float(t["min_lr"]), "data_epochs_per_epoch": int(t["val_every"])})]


def cat_sam_length(cfg: Mapping, num_samples: int, batch_per_process: int, world_size: int):
    """(epochs // val_every engine epochs, iterations per engine epoch); ``num_samples`` counts the
    ``val_every`` passes of an engine epoch."""
    from util.stages import epoch_length
    t = cfg["train"]["cat_sam"]
    _, iters = epoch_length(cfg, num_samples, batch_per_process, world_size)
    return int(t["epochs"]) // int(t["val_every"]), iters


# -- evaluation (SPEC 9) --------------------------------------------------------------------------

#: accumulated counts, in this order (float64, all-reduced)
_COUNTS = ("inter", "union", "image_iou_sum", "point_inter", "point_union", "point_image_iou_sum", "images",
           "empty_images", "empty_fp_pixels")


def _iou(inter: float, union: float) -> float:
    """IoU; an image with neither foreground nor prediction counts 1."""
    return inter / union if union > 0 else 1.0


@torch.no_grad()
def evaluate_cat_sam(model, dataset, *, proc: ProcessInfo, batch_size: int = 2, num_workers: int = 0,
                     points: bool = True, progress: bool = True, desc: str = "val") -> dict:
    """The test protocol on ``dataset`` (a CATSAMEvalSet): per image the encoder once, then one
    tight box per object (no object: the empty prompt), the union of the masks (logit > 0) against
    the binary ground truth; and, with ``points``, one interior point per object instead."""
    net = model.module if hasattr(model, "module") else model
    was_training = net.training
    net.eval()
    counts = torch.zeros(len(_COUNTS), dtype=torch.float64)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), proc.rank, proc.world_size),
                        num_workers=num_workers, collate_fn=dataset.collate_fn)
    for batch in tqdm(loader, desc=desc, leave=False, disable=not (progress and proc.is_main), dynamic_ncols=True):
        features = net.embed(batch["image"])
        box_logits = net(features=features, boxes=batch["boxes"])
        point_logits = net(features=features, points=batch["points"]) if points else [None] * len(box_logits)
        for fg, box_out, point_out, boxes in zip(batch["foreground"], box_logits, point_logits, batch["boxes"]):
            fg = fg.to(box_out.device)
            c = {}
            pred = (box_out > net.mask_threshold).any(0)[0]
            c["inter"], c["union"] = float((pred & fg).sum()), float((pred | fg).sum())
            c["image_iou_sum"] = _iou(c["inter"], c["union"])
            if point_out is not None:
                pred_p = (point_out > net.mask_threshold).any(0)[0]
                c["point_inter"], c["point_union"] = float((pred_p & fg).sum()), float((pred_p | fg).sum())
                c["point_image_iou_sum"] = _iou(c["point_inter"], c["point_union"])
            c["images"] = 1.0
            if len(boxes) == 0:
                c["empty_images"] = 1.0
                c["empty_fp_pixels"] = float((pred & ~fg).sum())
            counts += torch.tensor([c.get(k, 0.0) for k in _COUNTS], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        counts = counts.to(proc.device)
        dist.all_reduce(counts)
    net.train(was_training)
    n = dict(zip(_COUNTS, counts.cpu().tolist()))
    images = max(n["images"], 1.0)
    result = {"fg_iou": n["inter"] / n["union"] if n["union"] > 0 else float("nan"),
              "image_iou": n["image_iou_sum"] / images if n["images"] else float("nan"),
              "num_images": int(n["images"]), "num_empty": int(n["empty_images"]),
              "empty_fp_pixels": int(n["empty_fp_pixels"]), "intersection": int(n["inter"]), "union": int(n["union"])}
    if points:
        result.update(point_fg_iou=n["point_inter"] / n["point_union"] if n["point_union"] > 0 else float("nan"),
                      point_image_iou=n["point_image_iou_sum"] / images if n["images"] else float("nan"))
    return result


def cat_sam_validate(model, val_set, cfg: Mapping, proc: ProcessInfo, fold=None, runner=None) -> dict:
    if len(val_set) == 0:      # train.select=last without val.txt: nothing to validate on
        return {"fg_iou": float("nan"), "image_iou": float("nan")}
    r = evaluate_cat_sam(model, val_set, proc=proc, batch_size=int(cfg["train"]["cat_sam"]["eval_batch_size"]),
                         num_workers=cfg["data"]["num_workers"], points=False)
    return {"fg_iou": r["fg_iou"], "image_iou": r["image_iou"]}


def cat_sam_test(model, cfg: Mapping, *, proc: ProcessInfo, out_dir: Path, log: Callable[[str], None],
                 runner=None, progress: bool = True) -> dict:
    """test.txt with boxes and with points; the results dict util/engine.py test() prints and writes."""
    from util.cat_sam_data import build_eval_set
    dataset = build_eval_set(cfg, "test.txt")
    log(f"test: {len(dataset)} images of {cfg['data']['root']}/test.txt")
    summary = evaluate_cat_sam(model, dataset, proc=proc, batch_size=int(cfg["train"]["cat_sam"]["eval_batch_size"]),
                               num_workers=cfg["data"]["num_workers"], progress=progress, desc="test")
    net = model.module if hasattr(model, "module") else model
    return {"protocol": "cat_sam", "dataset": cfg["data"]["dataset"], "root": str(cfg["data"]["root"]),
            "variant": cfg["model"]["cat_sam"]["variant"], "model": net.name, "shot": int(cfg["data"]["shot"]),
            "seed": int(cfg["seed"]), "select": cfg["train"]["cat_sam"]["select"],
            "select_note": ("checkpoint selected on the TEST set (the original's preset: optimistic)"
                            if cfg["train"]["cat_sam"]["select"] == "test" else "checkpoint selected on val.txt "
                            "(or the last weights with train.select=last)"),
            "metric_note": "fg_iou: dataset-level foreground IoU (sum of intersections / sum of unions), one tight GT "
                           "box per object, union of the masks; image_iou: mean per-image IoU (1 when both empty); "
                           "point_*: one interior point per object (farthest from the background)",
            **summary}


def format_cat_sam_results(results: Mapping) -> str:
    rows = [("foreground IoU (boxes)", results["fg_iou"]), ("mean per-image IoU (boxes)", results["image_iou"]),
            ("foreground IoU (points)", results.get("point_fg_iou", float("nan"))),
            ("mean per-image IoU (points)", results.get("point_image_iou", float("nan")))]
    lines = [f"{results['model']} on {results['root']}/test.txt: {results['num_images']} images "
             f"({results['num_empty']} without object; their false-positive pixels: {results['empty_fp_pixels']})"]
    lines += [f"  {name:<30s} {100 * value:6.2f}" for name, value in rows]
    return "\n".join(lines)


CAT_SAM_STAGE = Stage(
    name="cat_sam", description="CAT-SAM: frozen SAM + CAT token, decoder branch and encoder tuning (T / A)",
    build_model=build, build_data=cat_sam_data, inputs=cat_sam_inputs, loss=cat_sam_stage_loss,
    optimizers=cat_sam_optimizers, validate=cat_sam_validate, selection_metric="fg_iou", length=cat_sam_length,
    sub_epoch_validation=False, test=cat_sam_test, format_results=format_cat_sam_results, configure=configure,
    metric_label="fg IoU")
