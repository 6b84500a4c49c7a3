"""CAT-SAM's training loss (SPEC_CAT_SAM 6), outside the model's forward.

Per image: BCE-with-logits (mean over the N objects x H x W, at the image's original/cropped
resolution, i.e. on the model's output) + Dice on sigmoid(logits) per object mask,
``1 - (2 * sum(p * t) + 1) / (sum(p) + sum(t) + 1)``, averaged over the objects; both terms
averaged over the images of the batch; total = bce + dice (1:1). Targets are per-object binary
masks (not their union); an image without objects has one all-zero target (its empty prompt).
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F


def _as_target(logits: torch.Tensor, target: torch.Tensor, index: int) -> torch.Tensor:
    target = torch.as_tensor(target, device=logits.device)
    if target.dim() == logits.dim() - 1:
        target = target.unsqueeze(1)
    if tuple(target.shape) != tuple(logits.shape):
        raise ValueError(f"target {index} has shape {tuple(target.shape)}, the logits {tuple(logits.shape)} "
                         f"(N x 1 x H x W, or N x H x W targets)")
    return target.to(logits.dtype)


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over objects of ``1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1)``, p = sigmoid(logits).

    logits, target: N x 1 x H x W (target 0/1) -> scalar.
    """
    p = logits.sigmoid().flatten(1)
    t = target.flatten(1)
    return (1 - (2 * (p * t).sum(-1) + 1) / (p.sum(-1) + t.sum(-1) + 1)).mean()


def cat_sam_loss(logits: Sequence[torch.Tensor],
                 targets: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """logits: [N_b x 1 x H_b x W_b] per image (the model's output); targets: the same shapes
    (or N_b x H_b x W_b), 0/1 per object. Returns ``(total, parts)``: the loss to back-propagate
    and detached scalars ``loss`` (= total), ``loss_bce``, ``loss_dice``."""
    if len(logits) != len(targets) or not logits:
        raise ValueError(f"{len(logits)} logits for {len(targets)} targets (one entry per image, at least one)")
    bce, dice = [], []
    for i, (out, target) in enumerate(zip(logits, targets)):
        target = _as_target(out, target, i)
        bce.append(F.binary_cross_entropy_with_logits(out, target))
        dice.append(dice_loss(out, target))
    loss_bce = torch.stack(bce).mean()
    loss_dice = torch.stack(dice).mean()
    total = loss_bce + loss_dice
    return total, {"loss": total.detach(), "loss_bce": loss_bce.detach(), "loss_dice": loss_dice.detach()}
