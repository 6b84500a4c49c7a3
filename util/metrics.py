"""Exact intersection/union counting for few-shot and semantic segmentation (SPEC 5).

Counts are int64 tensors on the predictions' device, so meters of several processes are
summed exactly with one all-reduce (:meth:`all_reduce`).

Few-shot protocol (the original's): per episode, the foreground intersection and union of the
binary prediction (pixels labelled 255 ignored) are added to the bucket of the episode's
class; ``mIoU`` = mean over the fold's classes of sum(I) / (sum(U) + 1e-10) -- a class never
seen counts as 0, as in the original, and is reported in ``classes_unseen``; ``FB-IoU`` = mean
over {background, foreground} of IoU accumulated over all episodes.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

EPS = 1e-10


def intersection_union(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                       ignore_label: int = 255) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class pixel counts (int64, length ``num_classes``) of intersection and union of two
    label maps of the same shape; pixels where ``target == ignore_label`` are left out."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    valid = target != ignore_label
    pred, target = pred[valid].long(), target[valid].long()
    if target.numel() and (target.min() < 0 or target.max() >= num_classes):
        raise ValueError(f"target holds values outside 0..{num_classes - 1} (and {ignore_label})")
    intersection = torch.bincount(pred[pred == target], minlength=num_classes)[:num_classes]
    area_pred = torch.bincount(pred.clamp(0, num_classes - 1), minlength=num_classes)[:num_classes]
    area_target = torch.bincount(target, minlength=num_classes)[:num_classes]
    return intersection, area_pred + area_target - intersection


class FewShotMeter:
    """Class-wise foreground IoU and FB-IoU over episodes.

    Args:
        class_ids: the fold's evaluation classes (e.g. the 5 novel PASCAL classes).
        ignore_label: target value left out of the counts.
    """

    def __init__(self, class_ids: Sequence[int], ignore_label: int = 255, device: torch.device | str = "cpu"):
        self.class_ids = list(class_ids)
        self.ignore_label = ignore_label
        self._index = {c: i for i, c in enumerate(self.class_ids)}
        self.class_counts = torch.zeros(len(self.class_ids), 2, dtype=torch.long, device=device)  # I, U of fg
        self.fb_counts = torch.zeros(2, 2, dtype=torch.long, device=device)   # [bg, fg] x [I, U]
        self.class_episodes = torch.zeros(len(self.class_ids), dtype=torch.long, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor, class_ids: Sequence[int] | torch.Tensor) -> None:
        """Add a batch: ``pred`` BxHxW (0/1), ``target`` BxHxW (0/1/255), ``class_ids`` B.
        A list of differently sized HxW maps is accepted as well."""
        if isinstance(class_ids, torch.Tensor):
            class_ids = class_ids.tolist()
        if len(pred) != len(class_ids) or len(target) != len(class_ids):
            raise ValueError(f"update: {len(pred)} predictions, {len(target)} targets, {len(class_ids)} class ids")
        for p, t, c in zip(pred, target, class_ids):
            if c not in self._index:
                raise ValueError(f"class {c} is not one of the meter's classes {self.class_ids}")
            inter, union = intersection_union(p, t, 2, self.ignore_label)
            i = self._index[c]
            device = self.class_counts.device
            self.class_counts[i] += torch.stack([inter[1], union[1]]).to(device)
            self.fb_counts += torch.stack([inter, union], 1).to(device)
            self.class_episodes[i] += 1

    def all_reduce(self) -> None:
        """Sum the counts of every process (exact: integer counts)."""
        if dist.is_available() and dist.is_initialized():
            for tensor in (self.class_counts, self.fb_counts, self.class_episodes):
                dist.all_reduce(tensor)

    def summary(self) -> dict:
        counts = self.class_counts.double().cpu()
        class_iou = counts[:, 0] / (counts[:, 1] + EPS)
        fb = self.fb_counts.double().cpu()
        fb_iou = fb[:, 0] / (fb[:, 1] + EPS)
        seen = self.class_episodes.cpu()
        return {
            "miou": float(class_iou.mean()),
            "fbiou": float(fb_iou.mean()),
            "class_iou": {c: float(class_iou[i]) for i, c in enumerate(self.class_ids)},
            "episodes": int(seen.sum()),
            "classes_unseen": [c for i, c in enumerate(self.class_ids) if seen[i] == 0],
        }


class SegmentationMeter:
    """Semantic segmentation over ``num_classes`` labels; ``miou`` averages the classes
    ``1..num_classes-1`` (background excluded: the base learner's validation, SPEC 4.1)."""

    def __init__(self, num_classes: int, ignore_label: int = 255, device: torch.device | str = "cpu"):
        self.num_classes, self.ignore_label = num_classes, ignore_label
        self.counts = torch.zeros(num_classes, 2, dtype=torch.long, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        for p, t in zip(pred, target):
            inter, union = intersection_union(p, t, self.num_classes, self.ignore_label)
            self.counts += torch.stack([inter, union], 1).to(self.counts.device)

    def all_reduce(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.counts)

    def summary(self) -> dict:
        counts = self.counts.double().cpu()
        iou = counts[:, 0] / (counts[:, 1] + EPS)
        return {"miou": float(iou[1:].mean()), "class_iou": {c: float(iou[c]) for c in range(self.num_classes)}}


def upsample_to_original_square(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """N x C x h' x w' logits -> N x C x S x S, S = max(h, w) of the original size (h, w): bilinear,
    align_corners, as the original's "ori_resize" scoring (SPEC 3.4). The image sits in the
    top-left h x w corner of the square."""
    side = max(size)
    return F.interpolate(logits.float(), size=(side, side), mode="bilinear", align_corners=True)


def predict_at_original_resolution(logits: torch.Tensor, ori_sizes: torch.Tensor) -> list[torch.Tensor]:
    """Original-resolution scoring ("ori_resize", SPEC 3.4): each sample's Bx2xhxw logits are
    upsampled to a square of side max(h, w) of ITS original size and arg-maxed. The original
    assumes batch size 1; this is the same per sample."""
    return [upsample_to_original_square(sample_logits[None], (h, w)).argmax(1)[0]
            for sample_logits, (h, w) in zip(logits, ori_sizes.tolist())]


def crop_targets(labels: torch.Tensor, ori_sizes: torch.Tensor) -> list[torch.Tensor]:
    """The square original-resolution labels of a collated batch, without the batch padding."""
    return [label[:max(h, w), :max(h, w)] for label, (h, w) in zip(labels, ori_sizes.tolist())]


def foreground_probability_at_original_resolution(logits: torch.Tensor, ori_sizes: torch.Tensor) -> list[torch.Tensor]:
    """The foreground probability each sample's B x 2 x h' x w' logits give at ITS original size
    h x w: upsampled exactly as :func:`predict_at_original_resolution` does (bilinear,
    align_corners, to the square of side max(h, w)), soft-maxed over the 2 channels and
    cropped to the image's top-left h x w (float32 maps)."""
    return [upsample_to_original_square(sample_logits[None], (h, w)).softmax(1)[0, 1, :h, :w]
            for sample_logits, (h, w) in zip(logits, ori_sizes.tolist())]
