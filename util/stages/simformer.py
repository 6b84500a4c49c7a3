"""Stage ``simformer``: SimFormer (weak-shot semantic segmentation, NeurIPS 2022) on MaskFormer
(SPEC_SIMFORMER 2, 6-8, 10, 15).

* model: :func:`model.build_simformer_from_config` (``model.simformer``); its loss is computed by
  the model's criterion inside the forward (targets given), so DDP sees one graph;
* data (util/weakshot_data.py): the weak-shot view of the dataset's label maps, fold k's novel
  classes as image-level labels only (``train.simformer.supervision``: ``weak_shot`` |
  ``base_only`` | ``full``); pair batches (anchor, partner) when the model has a SimNet (SPEC 6):
  an odd number of images per process is refused;
* iteration-based: ``train.simformer.max_iter`` iterations, an engine "epoch" = one evaluation
  period (``eval_period``), validated once at its end;
* one optimizer: AdamW with the original's groups (backbone x ``backbone_multiplier``, no weight
  decay on norms and the query embedding), poly per iteration (``train.power``), no warm-up;
  full-model gradient clipping at ``clip_grad_norm`` (done by the engine);
* validation and test: semantic segmentation over all K classes at the original resolution
  (SPEC 8): mIoU over all classes, base, novel, and their harmonic mean (not in the original:
  labelled "ours"), per-class IoU; results.json via util/engine.py ``test``.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from util.config import ConfigError
from util.distributed import ProcessInfo, ShardSampler
from util.stages import OptimizerSpec, Stage, StageData, trainable_parameters

IGNORE = 255


# -- model ----------------------------------------------------------------------------------------

def _register_checkpoint_parts() -> None:
    """The stage loads no pretrained part through util.checkpoint (its ImageNet initialisation, a
    torchvision file, is read by :func:`build` during training); everything is trainable, so a
    checkpoint references no frozen file."""
    from util import checkpoint
    checkpoint.PRETRAINED_PARTS.setdefault("simformer", ())


def build(cfg: Mapping) -> torch.nn.Module:
    """The model of ``model.simformer``; with ``model.simformer.backbone_checkpoint`` (torchvision's
    ImageNet ResNet-50 state dict) the backbone starts from it, unless ``weights`` is set (test.py /
    predict.py: the checkpoint provides every weight)."""
    from model import build_model
    from util.checkpoint import CheckpointError
    from util.config import resolve_path
    model = build_model(cfg, "simformer")
    path = cfg["model"]["simformer"]["backbone_checkpoint"]
    if cfg["weights"]:
        return model
    if not path:
        if not cfg["model"]["allow_random_init"]:
            raise CheckpointError("config key model.simformer.backbone_checkpoint is empty; it must name torchvision's "
                                  "ImageNet resnet50 state dict (or set model.allow_random_init=true for random weights)")
        return model
    file = resolve_path(path, cfg)
    if not file.is_file():
        raise CheckpointError(f"config key model.simformer.backbone_checkpoint = {path!r}: file {file} does not exist")
    state = torch.load(file, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    try:
        model.backbone.load_imagenet(state)
    except RuntimeError as err:
        raise CheckpointError(f"config key model.simformer.backbone_checkpoint = {path!r}: {file} is not a torchvision "
                              f"ResNet of model.simformer.backbone_blocks:\n{err}") from None
    return model


# -- data -----------------------------------------------------------------------------------------

def simformer_data(cfg: Mapping, log: Callable[[str], None]) -> StageData:
    from util.weakshot_data import build_weakshot_data
    train_set, val_set, split = build_weakshot_data(cfg, log)
    log(f"weak-shot {split.dataset} split {split.split}: {split.num_classes} classes, base {list(split.base)}, "
        f"novel {list(split.novel)}; supervision {cfg['train']['simformer']['supervision']}, "
        f"{'pairs (SimNet)' if train_set.pairs else 'single images'}")
    return StageData(train_set, val_set, split)


def make_targets(batch: Mapping) -> List[Dict[str, torch.Tensor]]:
    """The criterion's per-image targets (SPEC 4) from a collated training batch: base classes
    present in the pixel map (ascending), then the image-level labels, with all-zero masks."""
    targets = []
    for label, pad, tags in zip(batch["label"], batch["pad"], batch["image_labels"]):
        present = [int(c) for c in torch.unique(label).tolist() if int(c) != IGNORE]
        novel = [int(c) for c in torch.nonzero(tags).flatten().tolist() if int(c) not in present]
        masks = [label == c for c in present] + [torch.zeros_like(label, dtype=torch.bool) for _ in novel]
        masks = torch.stack(masks) if masks else torch.zeros((0,) + tuple(label.shape), dtype=torch.bool,
                                                              device=label.device)
        targets.append({"labels": torch.as_tensor(present + novel, dtype=torch.int64, device=label.device),
                        "masks": masks, "segm_gt_raw_aug": label, "pad_region": pad.float()})
    return targets


def simformer_inputs(batch: Mapping):
    return (batch["image"],), {"targets": make_targets(batch)}


def simformer_loss(outputs, batch, stage_cfg):
    parts = {k: v.detach() for k, v in outputs["losses"].items()}
    parts["loss"] = outputs["loss"].detach()
    return outputs["loss"], parts


# -- optimizer and length -------------------------------------------------------------------------

def simformer_optimizers(model: torch.nn.Module, cfg: Mapping) -> List[OptimizerSpec]:
    """AdamW over the original's groups (model.simformer.optimizer_param_groups), poly per iteration."""
    from model.simformer import optimizer_param_groups
    stage_cfg = cfg["train"]["simformer"]
    trainable_parameters(model, "simformer")
    groups = optimizer_param_groups(model, base_lr=float(stage_cfg["lr"]), weight_decay=float(stage_cfg["weight_decay"]),
                                    backbone_multiplier=float(stage_cfg["backbone_multiplier"]),
                                    weight_decay_norm=float(stage_cfg["weight_decay_norm"]),
                                    weight_decay_embed=float(stage_cfg["weight_decay_embed"]))
    for i, group in enumerate(groups):
        group["base_lr"] = group["lr"]
        group["name"] = f"lr{group['lr']:g}_wd{group['weight_decay']:g}"
    adamw = torch.optim.AdamW(groups, lr=float(stage_cfg["lr"]))
    return [OptimizerSpec("adamw", adamw, "poly", {"power": float(cfg["train"]["power"])})]


def simformer_length(cfg: Mapping, num_samples: int, batch_per_process: int, world_size: int):
    """(max_iter // eval_period, eval_period): an engine epoch is one evaluation period."""
    stage_cfg = cfg["train"]["simformer"]
    max_iter, period = int(stage_cfg["max_iter"]), int(stage_cfg["eval_period"])
    if period < 1 or max_iter < period or max_iter % period:
        raise ConfigError(f"train.simformer.max_iter={max_iter} must be a positive multiple of "
                          f"train.simformer.eval_period={period}")
    if cfg["model"]["simformer"]["simnet"] and batch_per_process % 2:
        raise ConfigError(f"train.simformer.batch_size={stage_cfg['batch_size']} gives {batch_per_process} images per "
                          "process: pair mode (model.simformer.simnet=true) needs an even number per process")
    return max_iter // period, period


def simformer_configure(cfg: Mapping) -> Mapping:
    """``train.simformer.clip_grad_norm`` is what the engine clips with; nothing else to change."""
    if cfg["train"]["simformer"]["supervision"] not in ("weak_shot", "base_only", "full"):
        raise ConfigError("train.simformer.supervision must be one of weak_shot, base_only, full, got "
                          f"{cfg['train']['simformer']['supervision']!r}")
    return cfg


# -- evaluation -----------------------------------------------------------------------------------

class WeakShotMeter:
    """Confusion counts over K classes (SPEC 8): intersection, prediction and target areas."""

    def __init__(self, num_classes: int, device="cpu"):
        self.num_classes = int(num_classes)
        self.counts = torch.zeros(3, self.num_classes, dtype=torch.long, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        valid = target != IGNORE
        p, t = pred[valid].long(), target[valid].long()
        if t.numel() and (t.min() < 0 or t.max() >= self.num_classes):
            raise ValueError(f"target holds values outside 0..{self.num_classes - 1} (and {IGNORE})")
        k = self.num_classes
        self.counts[0] += torch.bincount(p[p == t], minlength=k)[:k].to(self.counts.device)
        self.counts[1] += torch.bincount(p, minlength=k)[:k].to(self.counts.device)
        self.counts[2] += torch.bincount(t, minlength=k)[:k].to(self.counts.device)

    def all_reduce(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.counts)

    def summary(self, base: Sequence[int], novel: Sequence[int], names: Sequence[str]) -> dict:
        """IoU per class with pixels in target or prediction; mIoU over those classes (SPEC 8),
        base / novel mIoU over the base / novel classes with target pixels, harmonic mean."""
        inter, pred, gt = (self.counts[i].double().cpu() for i in range(3))
        union = pred + gt - inter
        iou = inter / union.clamp(min=1)

        def mean(ids):
            ids = [c for c in ids if gt[c] > 0]
            return float(sum(iou[c] for c in ids) / len(ids)) if ids else 0.0

        seen = [c for c in range(self.num_classes) if union[c] > 0]
        b, n = mean(base), mean(novel)
        return {"miou_all": float(sum(iou[c] for c in seen) / len(seen)) if seen else 0.0,
                "miou_base": b, "miou_novel": n, "harmonic": 2 * b * n / (b + n) if b + n > 0 else 0.0,
                "class_iou": {names[c]: float(iou[c]) for c in seen},
                "pixel_accuracy": float(inter.sum() / gt.sum().clamp(min=1))}


@torch.no_grad()
def evaluate_weakshot(model, dataset, split, *, proc: ProcessInfo, num_workers: int = 0, progress: bool = True,
                      desc: str = "val") -> dict:
    """Semantic segmentation of every image of ``dataset`` over all K classes (SPEC 8)."""
    from model.simformer import preprocess_images
    from util.weakshot_data import collate_list
    net = model.module if hasattr(model, "module") else model
    was_training = net.training
    net.eval()
    meter = WeakShotMeter(split.num_classes, device=proc.device)
    loader = DataLoader(dataset, batch_size=1, sampler=ShardSampler(len(dataset), proc.rank, proc.world_size),
                        num_workers=num_workers, collate_fn=collate_list)
    for batch in tqdm(loader, desc=desc, leave=False, disable=not (progress and proc.is_main), dynamic_ncols=True):
        images = [im.to(proc.device) for im in batch["image"]]
        labels = [lb.to(proc.device) for lb in batch["label"]]
        padded, sizes = preprocess_images(images)
        scores = net.inference(padded, sizes, [tuple(lb.shape) for lb in labels])
        for score, label in zip(scores, labels):
            meter.update(score.argmax(0), label)
    meter.all_reduce()
    net.train(was_training)
    result = meter.summary(split.base, split.novel, split.class_names)
    result.update(num_images=len(dataset))
    return result


def simformer_validate(model, val_set, cfg: Mapping, proc: ProcessInfo, fold, runner=None) -> dict:
    summary = evaluate_weakshot(model, val_set, fold, proc=proc, num_workers=cfg["data"]["num_workers"])
    # the engine's log line and summary read "miou"
    return {"miou": summary["miou_all"], **{k: summary[k] for k in ("miou_all", "miou_base", "miou_novel", "harmonic")}}


VARIANTS = {("weak_shot", True): "SimFormer", ("weak_shot", False): "SimFormer w/o SimNet",
            ("base_only", False): "base-only", ("base_only", True): "base-only (+SimNet)",
            ("full", False): "fully supervised", ("full", True): "fully supervised (+SimNet)"}


def variant_name(cfg: Mapping) -> str:
    return VARIANTS[(cfg["train"]["simformer"]["supervision"], bool(cfg["model"]["simformer"]["simnet"]))]


def simformer_test(model, cfg: Mapping, *, proc: ProcessInfo, out_dir: Path, log: Callable[[str], None],
                   runner=None, progress: bool = True) -> dict:
    """Every val image, all K classes; the results dict util/engine.py test() prints and writes."""
    from util.weakshot_data import build_weakshot_test_set
    dataset, split = build_weakshot_test_set(cfg, log=log)
    summary = evaluate_weakshot(model, dataset, split, proc=proc, num_workers=cfg["data"]["num_workers"],
                                progress=progress, desc="test")
    return {"protocol": "weakshot", "dataset": split.dataset, "split": split.split, "variant": variant_name(cfg),
            "supervision": cfg["train"]["simformer"]["supervision"], "simnet": bool(cfg["model"]["simformer"]["simnet"]),
            "num_classes": split.num_classes, "base_classes": list(split.base), "novel_classes": list(split.novel),
            "harmonic_note": "harmonic mean of base and novel mIoU: ours, not in the original", **summary}


def format_weakshot_results(results: Mapping) -> str:
    from util.weakshot_report import table
    return table([results])


SIMFORMER_STAGE = Stage(
    name="simformer", description="SimFormer (MaskFormer + SimNet), weak-shot semantic segmentation, whole model",
    build_model=build, build_data=simformer_data, inputs=simformer_inputs, loss=simformer_loss,
    optimizers=simformer_optimizers, validate=simformer_validate, selection_metric="miou_all",
    length=simformer_length, sub_epoch_validation=False, test=simformer_test,
    format_results=format_weakshot_results, configure=simformer_configure,
    # queries unmatched in a step, the SimNet without pairs sharing a class... may get no gradient
    find_unused_parameters=True)

_register_checkpoint_parts()
