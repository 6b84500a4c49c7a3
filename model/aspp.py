"""BAM's ASPP block (``ASPP_meta``): a global-pool branch, a 1x1 branch and three dilated 3x3 branches."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling, every conv with bias and ReLU.

    Branches (concatenated in this order): ``layer6_0`` = global average pool -> Conv1x1, broadcast
    back to HxW; ``layer6_1`` = Conv1x1; ``layer6_2/3/4`` = Conv3x3 at dilation 6/12/18.

    x: B x C x H x W -> B x 5C x H x W.
    """

    def __init__(self, *, channels: int = 256) -> None:
        super().__init__()
        self.layer6_0 = self._branch(channels, 1, 1)
        self.layer6_1 = self._branch(channels, 1, 1)
        self.layer6_2 = self._branch(channels, 3, 6)
        self.layer6_3 = self._branch(channels, 3, 12)
        self.layer6_4 = self._branch(channels, 3, 18)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _branch(channels: int, kernel: int, dilation: int) -> nn.Sequential:
        padding = 0 if kernel == 1 else dilation
        return nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size=kernel, padding=padding, dilation=dilation, bias=True),
            nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        pooled = self.layer6_0(F.avg_pool2d(x, kernel_size=(h, w))).expand(-1, -1, h, w)
        return torch.cat([pooled, self.layer6_1(x), self.layer6_2(x), self.layer6_3(x), self.layer6_4(x)], 1)
