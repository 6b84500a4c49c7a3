"""PSPNet: the stage-1 base learner (SPEC 2.2), and its head reused as BAM's ``learner_base``.

State-dict names as the original: ``layer0..4.*`` (backbone), ``ppm.features.{0..3}.{1,2}.*``,
``cls.{0,1,4}.*``.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn

from .backbone import adopt_backbone_layers, build_backbone, run_layers
from .common import output_size, resize


class PPM(nn.Module):
    """Pyramid pooling: per bin AdaptiveAvgPool -> Conv1x1 (no bias) -> BN -> ReLU, resized back
    (bilinear, align_corners) and concatenated after the input.

    x: B x in_dim x H x W -> B x (in_dim + len(bins) * reduction_dim) x H x W.
    """

    def __init__(self, *, in_dim: int, reduction_dim: int, bins: Sequence[int] = (1, 2, 3, 6)) -> None:
        super().__init__()
        self.features = nn.ModuleList([
            nn.Sequential(nn.AdaptiveAvgPool2d(int(b)),
                          nn.Conv2d(in_dim, reduction_dim, kernel_size=1, bias=False),
                          nn.BatchNorm2d(reduction_dim), nn.ReLU(inplace=True))
            for b in bins])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        return torch.cat([x] + [resize(f(x), size) for f in self.features], 1)


def make_cls_head(*, in_dim: int, hidden_dim: int, num_classes: int, dropout: float) -> nn.Sequential:
    """Conv3x3 (no bias) -> BN -> ReLU -> Dropout2d -> Conv1x1: B x in_dim x H x W -> B x num_classes x H x W."""
    return nn.Sequential(
        nn.Conv2d(in_dim, hidden_dim, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(hidden_dim), nn.ReLU(inplace=True), nn.Dropout2d(p=dropout),
        nn.Conv2d(hidden_dim, num_classes, kernel_size=1))


class PSPNet(nn.Module):
    """Backbone + PPM + classifier over ``num_classes`` base-learner channels (background + base classes).

    forward(img Bx3xHxW) -> ``{"logits": B x num_classes x H' x W'}``, upsampled (bilinear,
    align_corners) to ``H' = int((H - 1) / 8 * 8 + 1)`` like the original.
    """

    def __init__(self, *, backbone: str = "resnet50", backbone_width: int = 64,
                 backbone_blocks: Optional[Sequence[int]] = None, num_classes: int = 16,
                 ppm_bins: Sequence[int] = (1, 2, 3, 6), hidden_dim: int = 512, dropout: float = 0.1) -> None:
        super().__init__()
        self.backbone_name = backbone
        self.feature_channels: Dict[str, int] = adopt_backbone_layers(
            self, build_backbone(backbone, width=backbone_width, blocks=backbone_blocks))
        fea_dim = self.feature_channels["layer4"]
        reduction_dim = fea_dim // len(ppm_bins)
        self.ppm = PPM(in_dim=fea_dim, reduction_dim=reduction_dim, bins=ppm_bins)
        self.cls = make_cls_head(in_dim=fea_dim + len(ppm_bins) * reduction_dim, hidden_dim=hidden_dim, num_classes=num_classes,
                                 dropout=dropout)

    def forward(self, img: torch.Tensor) -> Dict[str, torch.Tensor]:
        size = output_size(img.shape[-2], img.shape[-1])
        logits = self.cls(self.ppm(run_layers(self, img)[-1]))
        return {"logits": resize(logits, size)}
