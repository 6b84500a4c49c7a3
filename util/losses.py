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


LOSSES = {"base": base_loss, "bam": bam_loss, "sam_rsp": sam_rsp_loss}
