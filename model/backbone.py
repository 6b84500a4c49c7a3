"""PSPNet-style backbones cut into ``layer0..layer4``: deep-stem dilated ResNet-50/101 and VGG16-bn.

The state-dict names are those of the original PSPNet/BAM models, so their checkpoints load
strictly (SPEC 2.1, 2.5):

* ResNet: ``layer0.{0,1,3,4,6,7}.*`` (conv1, bn1, relu, conv2, bn2, relu, conv3, bn3, relu,
  maxpool) and ``layer{1..4}.{i}.{conv1,bn1,conv2,bn2,conv3,bn3,downsample.0,downsample.1}.*``.
  layer3/layer4 are dilated (2/4) with stride 1: output stride 8.
* VGG16-bn: torchvision's ``features`` cut into ``[0:7] [7:14] [14:24] [24:34] [34:43]`` (the last
  max-pool dropped), each cut re-indexed from 0: keys ``layer{k}.{j}.*``. Max-pools use
  ``ceil_mode=True``.

Tiny variants for tests come from the same classes through ``width`` (64 = the standard nets)
and, for ResNet, ``blocks`` (bottlenecks per layer).

Feature sizes at a 473x473 input (width 64):

=========  ==================  ==================
output     ResNet-50/101       VGG16-bn
=========  ==================  ==================
layer2     512 x 60 x 60       256 x 60 x 60
layer3     1024 x 60 x 60      512 x 30 x 30
layer4     2048 x 60 x 60      512 x 30 x 30
=========  ==================  ==================
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

LAYER_NAMES: Tuple[str, ...] = ("layer0", "layer1", "layer2", "layer3", "layer4")


def run_layers(owner: nn.Module, x: torch.Tensor) -> List[torch.Tensor]:
    """``owner.layer0..layer4`` applied in turn: Bx3xHxW -> the five outputs."""
    feats = []
    for name in LAYER_NAMES:
        x = getattr(owner, name)(x)
        feats.append(x)
    return feats


class Bottleneck(nn.Module):
    """ResNet bottleneck (expansion 4) with an optional dilation on its 3x3 conv.

    x: B x inplanes x H x W -> B x 4*planes x H/stride x W/stride.
    """

    expansion = 4

    def __init__(self, *, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=dilation,
                               dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _conv_bn_relu_3x3(cin: int, cout: int, stride: int) -> List[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class ResNetBackbone(nn.Module):
    """Deep-stem ResNet with dilated layer3 (2) and layer4 (4), output stride 8.

    Stem: conv3x3/2 3->w, conv3x3 w->w, conv3x3 w->2w (each + BN + ReLU), maxpool 3/2/1.
    layer1..4: bottlenecks with planes w, 2w, 4w, 8w (output 4w, 8w, 16w, 32w channels);
    layer3/layer4 use stride 1 (conv2 and downsample.0) with dilation = padding = 2 / 4.

    forward(x Bx3xHxW) -> [layer0, ..., layer4] feature maps.
    """

    def __init__(self, *, blocks: Sequence[int] = (3, 4, 6, 3), width: int = 64) -> None:
        super().__init__()
        if len(blocks) != 4 or any(int(b) < 1 for b in blocks):
            raise ValueError(f"ResNet blocks must be 4 positive counts, got {list(blocks)}")
        w = int(width)
        self.layer0 = nn.Sequential(
            *_conv_bn_relu_3x3(3, w, 2), *_conv_bn_relu_3x3(w, w, 1), *_conv_bn_relu_3x3(w, 2 * w, 1),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        self._inplanes = 2 * w
        self.layer1 = self._make_layer(w, blocks[0], stride=1, dilation=1)
        self.layer2 = self._make_layer(2 * w, blocks[1], stride=2, dilation=1)
        self.layer3 = self._make_layer(4 * w, blocks[2], stride=1, dilation=2)
        self.layer4 = self._make_layer(8 * w, blocks[3], stride=1, dilation=4)
        del self._inplanes
        e = Bottleneck.expansion
        self.out_channels: Dict[str, int] = {
            "layer0": 2 * w, "layer1": w * e, "layer2": 2 * w * e, "layer3": 4 * w * e, "layer4": 8 * w * e}
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, planes: int, count: int, stride: int, dilation: int) -> nn.Sequential:
        out = planes * Bottleneck.expansion
        downsample = None
        if stride != 1 or self._inplanes != out:
            downsample = nn.Sequential(
                nn.Conv2d(self._inplanes, out, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out))
        layers = [Bottleneck(inplanes=self._inplanes, planes=planes, stride=stride,
                             dilation=dilation, downsample=downsample)]
        self._inplanes = out
        for _ in range(1, int(count)):
            layers.append(Bottleneck(inplanes=out, planes=planes, dilation=dilation))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return run_layers(self, x)


# torchvision's VGG16 configuration "D"; "M" = max-pool.
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
# Where torchvision's vgg16_bn().features is cut into layer0..layer4 (index 43, the last pool, is dropped).
VGG16_CUTS = ((0, 7), (7, 14), (14, 24), (24, 34), (34, 43))


class VGGBackbone(nn.Module):
    """VGG16-bn features cut into layer0..layer4 (conv bias on, ceil-mode max-pools).

    Channels at width w: layer0 w, layer1 2w, layer2 4w, layer3 8w, layer4 8w; spatial strides
    2, 4, 8, 16, 16 (ceil). forward(x Bx3xHxW) -> [layer0, ..., layer4].
    """

    def __init__(self, *, width: int = 64) -> None:
        super().__init__()
        features: List[nn.Module] = []
        cin = 3
        for v in VGG16_LAYOUT:
            if v == "M":
                features.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
            else:
                cout = max(1, int(v) * int(width) // 64)
                features += [nn.Conv2d(cin, cout, kernel_size=3, padding=1), nn.BatchNorm2d(cout),
                             nn.ReLU(inplace=True)]
                cin = cout
        for name, (start, stop) in zip(LAYER_NAMES, VGG16_CUTS):
            self.add_module(name, nn.Sequential(*features[start:stop]))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        c = lambda v: max(1, v * int(width) // 64)  # noqa: E731
        self.out_channels: Dict[str, int] = {
            "layer0": c(64), "layer1": c(128), "layer2": c(256), "layer3": c(512), "layer4": c(512)}

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return run_layers(self, x)


RESNET_BLOCKS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}
BACKBONE_NAMES = ("vgg16_bn", "resnet50", "resnet101")


def build_backbone(name: str, *, width: int = 64, blocks: Optional[Sequence[int]] = None) -> nn.Module:
    """``vgg16_bn`` | ``resnet50`` | ``resnet101``; ``blocks`` (ResNet only) overrides the
    bottleneck counts, ``None``/empty = the standard ones."""
    if name == "vgg16_bn":
        return VGGBackbone(width=width)
    if name in RESNET_BLOCKS:
        return ResNetBackbone(blocks=tuple(blocks) if blocks else RESNET_BLOCKS[name], width=width)
    raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONE_NAMES)}")


def adopt_backbone_layers(owner: nn.Module, backbone: nn.Module) -> Dict[str, int]:
    """Register ``backbone.layer0..layer4`` directly on ``owner`` (so its state-dict keys are
    ``layer{k}.*`` as in the originals) and return the backbone's channel counts."""
    for name in LAYER_NAMES:
        owner.add_module(name, getattr(backbone, name))
    return dict(backbone.out_channels)
