"""The training losses of the three stages (outside the models' forward).

Each takes the model's output dict and the batch and returns ``(total, parts)``: the loss to
back-propagate and a dict of detached scalars to log.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_label: int = 255) -> torch.Tensor:
    return F.cross_entropy(logits.float(), target, ignore_index=ignore_label)


def base_loss(outputs: Mapping, batch: Mapping, weights: Sequence[float] = ()) -> tuple[torch.Tensor, dict]:
    """Stage ``base``: cross-entropy of the PSPNet logits on the base labels (SPEC 4.1)."""
    loss = cross_entropy(outputs["logits"], batch["label"])
    return loss, {"loss": loss.detach()}


def bam_loss(outputs: Mapping, batch: Mapping, weights: Sequence[float] = (1.0, 1.0)) -> tuple[torch.Tensor, dict]:
    """Stage ``bam`` (SPEC 4.2): CE(final_out) + CE(meta_out); ``final_out`` is BAM's merged,
    probability-like map and goes into cross-entropy as is, as in the original. CE(base_out)
    on the base labels is logged only: the base learner is frozen."""
    target = batch["query_mask"]
    main = cross_entropy(outputs["logits"], target)
    meta = cross_entropy(outputs["meta_logits"], target)
    with torch.no_grad():
        base = cross_entropy(outputs["base_logits"], batch["query_base_label"])
    total = weights[0] * main + weights[1] * meta
    return total, {"loss": total.detach(), "main": main.detach(), "meta": meta.detach(), "base": base}


def sam_rsp_loss(outputs: Mapping, batch: Mapping, weights: Sequence[float] = (1.0, 1.0)) -> tuple[torch.Tensor, dict]:
    """Stage ``sam_rsp`` (SPEC 1, Training): ``weights[0] * mean_i CE(side head i) + weights[1] * CE(final)``."""
    target = batch["query_mask"]
    main = cross_entropy(outputs["logits"], target)
    aux_logits = outputs.get("aux_logits") or []
    aux = torch.stack([cross_entropy(a, target) for a in aux_logits]).mean() if aux_logits else torch.zeros_like(main)
    total = weights[0] * aux + weights[1] * main
    return total, {"loss": total.detach(), "main": main.detach(), "aux": aux.detach()}


def weighted_dice_loss(logits: torch.Tensor, target: torch.Tensor, ignore_label: int = 255) -> torch.Tensor:
    """SCCAN's Dice loss (SPEC_SCCAN 1.7), computed in float32.

    logits: B x 2 x H x W raw logits (bg, fg), each channel squashed by its OWN sigmoid (not a
    softmax); target: B x H x W with 0 (bg), 1 (fg) and ``ignore_label``. Per sample b and channel
    c with ``p = sigmoid(logits[b, c])`` and ``t = [target[b] == c]``:
    ``1 - 2 sum(t p) / clamp(sum(p^2) + sum(t^2), min=1e-8)``; summed over the 2 channels and the
    batch, divided by B. An ignored pixel is in neither channel's target, but (as in the
    original) its predictions still count in ``sum(p^2)``. Returns a scalar.
    """
    batch = logits.shape[0]
    prob = torch.sigmoid(logits.float()).flatten(2)                                   # B x 2 x HW
    target = target.reshape(batch, 1, -1)
    classes = torch.arange(prob.shape[1], device=prob.device).view(1, -1, 1)
    onehot = ((target == classes) & (target != ignore_label)).to(prob.dtype)          # B x 2 x HW
    inter = (onehot * prob).sum(2)
    union = ((prob * prob).sum(2) + (onehot * onehot).sum(2)).clamp(min=1e-8)
    return (1 - 2 * inter / union).sum() / batch


def sccan_loss(outputs: Mapping, batch: Mapping, weights: Sequence[float] = ()) -> tuple[torch.Tensor, dict]:
    """Stage ``sccan`` (SPEC_SCCAN 1.7): the weighted Dice loss of ``meta_out`` against the query
    mask, and nothing else (the original's two auxiliary losses are constant zeros; no
    cross-entropy). ``weights`` is unused."""
    loss = weighted_dice_loss(outputs["logits"], batch["query_mask"])
    return loss, {"loss": loss.detach()}


LOSSES = {"base": base_loss, "bam": bam_loss, "sam_rsp": sam_rsp_loss}
