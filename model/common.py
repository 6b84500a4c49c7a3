"""Small tensor helpers shared by the model files."""
from __future__ import annotations

from typing import Callable, Dict, Tuple, TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F


def resize(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Bilinear resize with ``align_corners=True`` (every resize in BAM and SAM-RSP is this one).

    x: BxCxHxW -> BxCx``size``.
    """
    return F.interpolate(x, size=tuple(int(s) for s in size), mode="bilinear", align_corners=True)


def output_size(height: int, width: int) -> Tuple[int, int]:
    """The originals' output size ``int((H - 1) / 8 * 8 + 1)`` (float arithmetic kept; = H in practice)."""
    return int((height - 1) / 8 * 8 + 1), int((width - 1) / 8 * 8 + 1)


def min_max_per_image(x: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """``(x - min) / (max - min + eps)`` with min/max taken per image over every other dim.

    x: Bx... -> same shape.
    """
    flat = x.reshape(x.shape[0], -1)
    low = flat.min(1, keepdim=True)[0]
    high = flat.max(1, keepdim=True)[0]
    return ((flat - low) / (high - low + eps)).view_as(x)


def diff_map(two_channel: torch.Tensor) -> torch.Tensor:
    """Foreground-minus-background map, min-max normalised per image.

    two_channel: Bx2xHxW -> Bx1xHxW, ``d = x[:, 1] - x[:, 0]`` then per-image min-max (eps 1e-7).
    """
    d = two_channel[:, 1:2] - two_channel[:, 0:1]
    return min_max_per_image(d)


def freeze(module: nn.Module) -> nn.Module:
    """Set ``requires_grad=False`` on every parameter of ``module``."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def residual_convs(channels: int) -> nn.Sequential:
    """[Conv3x3 (no bias), ReLU] x 2 at ``channels``: BAM's ``res2_meta`` and SAM-RSP's ``res2``
    (state-dict keys ``0.weight``, ``2.weight``); the caller adds the residual."""
    return nn.Sequential(
        nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False), nn.ReLU(inplace=True),
        nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False), nn.ReLU(inplace=True))


def two_class_head(channels: int, hidden: int | None = None) -> nn.Sequential:
    """Conv3x3 (no bias) -> ReLU -> Dropout2d(0.1) -> Conv1x1 to 2 classes (with bias): BAM's
    ``cls_meta``, SAM-RSP's ``cls`` (hidden = channels) and side heads ``inner_cls`` (keys
    ``0.weight``, ``3.weight``, ``3.bias``)."""
    hidden = channels if hidden is None else hidden
    return nn.Sequential(
        nn.Conv2d(channels, hidden, kernel_size=3, padding=1, bias=False), nn.ReLU(inplace=True),
        nn.Dropout2d(p=0.1), nn.Conv2d(hidden, 2, kernel_size=1))


def batchnorm_eval(module: nn.Module) -> None:
    """Put every BatchNorm layer inside ``module`` in eval mode (running statistics used, not updated)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


Batched = TypeVar("Batched", torch.Tensor, Dict[str, torch.Tensor])


def one_image_at_a_time(fn: Callable[[torch.Tensor], Batched], images: torch.Tensor) -> Batched:
    """``fn`` applied to each image separately, the outputs concatenated along the batch.

    images: B x ... -> ``fn``'s output for the batch (a tensor or a dict of tensors, batch first).
    Why: CPU and GPU kernels choose their blocking by problem size, so an image's output can
    differ in the last bits (~1e-6) with the batch it comes in. Computed image by image it does
    not, which makes cached and uncached evaluation bit-identical (util/feature_cache.py). The
    frozen encoders have enough work per image (4096 tokens for ViT at 1024, 60 x 60 ResNet
    grids at 473) that batching them gains little.
    """
    if images.shape[0] == 1:
        return fn(images)
    outputs = [fn(images[i:i + 1]) for i in range(images.shape[0])]
    if isinstance(outputs[0], dict):
        return {k: torch.cat([o[k] for o in outputs]) for k in outputs[0]}
    return torch.cat(outputs)
