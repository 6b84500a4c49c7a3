"""SCCAN (Xu et al., ICCV 2023, "Self-Calibrated Cross Attention Network for Few-Shot
Segmentation"), as described in SPEC_SCCAN; usable on its own and as SAM-RSP's rough
segmentation prompt generator (SPEC_SCCAN 11).

One network trained in one stage: a frozen ImageNet ResNet-50/101 (deep stem, FrozenBatchNorm2d,
torchvision dilation), features ``cat[layer2, layer3]`` reduced to 256 channels at a 64 x 64 grid,
a softmax-attention prior, the SCCA transformer (:mod:`model.scca_transformer`) and BAM's
decoder layers (ASPP, res1, res2, cls). No base learner, no Gram ensemble.

State-dict names are the original's, so its checkpoints load strictly without renaming:
``backbone.body.{conv1,bn1,conv2,bn2,conv3,bn3,layer1..4}.*``, ``down_query.0``, ``down_supp.0``,
``init_merge_query.0``, ``init_merge_supp.0``, ``transformer.layers.0.blocks.{i}.*``,
``transformer.norm0``, ``ASPP_meta.*``, ``res1_meta.0``, ``res2_meta.{0,2}``, ``cls_meta.{0,3}``.
Parameters (width 64, reduce_dim 256, depth 8): R50 34,951,618 total, R101 53,891,522, of which
11,373,314 trainable (everything but the backbone).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from .aspp import ASPP
from .backbone import RESNET_BLOCKS, Bottleneck
from .bam import COSINE_EPS, weighted_gap
from .common import freeze, min_max_per_image, one_image_at_a_time, output_size, resize, residual_convs, two_class_head
from .scca_transformer import SCCATransformer

FEATURE_NAMES = ("layer2", "layer3", "layer4")


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters, all buffers (SPEC_SCCAN 2.1).

    Buffers ``weight, bias, running_mean, running_var`` (no ``num_batches_tracked``: one in a
    loaded state dict is dropped). ``y = x * s + (b - rm * s)`` with ``s = w / sqrt(rv + eps)``.
    x: B x C x H x W -> same.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = float(eps)
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def _freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` inside ``module`` by a :class:`FrozenBatchNorm2d` (in place)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, FrozenBatchNorm2d(child.num_features))
        else:
            _freeze_batchnorm(child)
    return module


class FrozenResNet(nn.Module):
    """torchvision-style deep-stem ResNet with FrozenBatchNorm2d and torchvision dilation (SPEC_SCCAN 2.1).

    Stem ``conv1`` 3x3/2 3->w, ``bn1``, ReLU, ``conv2`` 3x3 w->w, ``bn2``, ReLU, ``conv3`` 3x3 w->2w,
    ``bn3``, ReLU, maxpool 3/2/1; ``layer1..4`` of bottlenecks (v1.5, stride on the 3x3; planes
    w, 2w, 4w, 8w). ``replace_stride_with_dilation = [False, True, True]`` with torchvision's
    semantics: layer3 block 0 conv2 dilation 1, blocks 1.. dilation 2; layer4 block 0 dilation 2,
    blocks 1.. dilation 4 (NOT BAM's schedule, model/backbone.py); output stride 8.

    forward(x B x 3 x H x W) -> dict ``layer2`` (8w ch), ``layer3`` (16w), ``layer4`` (32w), each
    B x C x h x w (60 x 60 at 473).
    """

    def __init__(self, *, blocks: Sequence[int] = (3, 4, 6, 3), width: int = 64) -> None:
        super().__init__()
        if len(blocks) != 4 or any(int(b) < 1 for b in blocks):
            raise ValueError(f"ResNet blocks must be 4 positive counts, got {list(blocks)}")
        w = int(width)
        self.conv1 = nn.Conv2d(3, w, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = FrozenBatchNorm2d(w)
        self.conv2 = nn.Conv2d(w, w, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = FrozenBatchNorm2d(w)
        self.conv3 = nn.Conv2d(w, 2 * w, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn3 = FrozenBatchNorm2d(2 * w)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self._inplanes, self._dilation = 2 * w, 1
        self.layer1 = self._make_layer(w, blocks[0], stride=1, dilate=False)
        self.layer2 = self._make_layer(2 * w, blocks[1], stride=2, dilate=False)
        self.layer3 = self._make_layer(4 * w, blocks[2], stride=2, dilate=True)
        self.layer4 = self._make_layer(8 * w, blocks[3], stride=2, dilate=True)
        del self._inplanes, self._dilation
        e = Bottleneck.expansion
        self.out_channels: Dict[str, int] = {"layer2": 2 * w * e, "layer3": 4 * w * e, "layer4": 8 * w * e}
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, planes: int, count: int, stride: int, dilate: bool) -> nn.Sequential:
        previous_dilation = self._dilation
        if dilate:  # torchvision: the stride becomes dilation from this layer's SECOND block on
            self._dilation *= stride
            stride = 1
        out = planes * Bottleneck.expansion
        downsample = None
        if stride != 1 or self._inplanes != out:
            downsample = nn.Sequential(nn.Conv2d(self._inplanes, out, kernel_size=1, stride=stride, bias=False),
                                       nn.BatchNorm2d(out))
        layers = [Bottleneck(inplanes=self._inplanes, planes=planes, stride=stride, dilation=previous_dilation,
                             downsample=downsample)]
        self._inplanes = out
        layers += [Bottleneck(inplanes=out, planes=planes, dilation=self._dilation) for _ in range(1, int(count))]
        return _freeze_batchnorm(nn.Sequential(*layers))

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.maxpool(self.relu(self.bn3(self.conv3(x))))
        x2 = self.layer2(self.layer1(x))
        x3 = self.layer3(x2)
        return {"layer2": x2, "layer3": x3, "layer4": self.layer4(x3)}


class SCCANBackbone(nn.Module):
    """Holder giving the original's key prefix ``backbone.body.*``."""

    def __init__(self, *, blocks: Sequence[int], width: int) -> None:
        super().__init__()
        self.body = FrozenResNet(blocks=blocks, width=width)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.body(x)


def softmax_prior(query_4: torch.Tensor, support_4: torch.Tensor, support_mask: torch.Tensor,
                  size: Sequence[int]) -> torch.Tensor:
    """SCCAN's prior ("corr_query_mask", SPEC_SCCAN 1.3) for ONE shot, computed in float32.

    query_4: B x C x h x w (query layer4, NOT resized), support_4: B x C x g x g (support layer4
    resized to the grid, NOT masked), support_mask: B x 1 x g x g -> B x 1 x ``size``.

    ``cos[j, i]`` between support pixel j and query pixel i (eps 1e-7 on the norm product),
    soft-maxed over the support pixels (temperature 1), ``p[i] = sum_j softmax[i, j] m[j]``,
    min-max normalised over the query pixels (eps 1e-7), resized (bilinear AC) to ``size``.
    """
    b, c, h, w = query_4.shape
    with torch.autocast(device_type=query_4.device.type, enabled=False):  # 2048-d norm products overflow fp16
        query = query_4.float().reshape(b, c, h * w)                                  # B x C x HWq
        support = support_4.float().reshape(b, c, -1).transpose(1, 2)                 # B x HWs x C
        cosine = torch.bmm(support, query) / (
            torch.bmm(torch.norm(support, 2, 2, True), torch.norm(query, 2, 1, True)) + COSINE_EPS)
        weights = cosine.transpose(1, 2).softmax(-1)                                   # B x HWq x HWs
        prior = torch.bmm(weights, support_mask.float().reshape(b, -1, 1))             # B x HWq x 1
        prior = min_max_per_image(prior, COSINE_EPS).reshape(b, 1, h, w)
        return resize(prior, size)


class SCCAN(nn.Module):
    """Self-calibrated cross-attention network (SPEC_SCCAN 1).

    forward(query_img B x 3 x H x W, support_imgs B x K x 3 x H x W, support_masks B x K x H x W
    (0/1/255; 255 counts as background), *, query_feats=None, support_feats=None) -> dict:

    * ``logits``: B x 2 x H' x W' raw logits (bg, fg), ``meta_out`` upsampled bilinear AC to
      ``H' = int((H - 1) / 8 * 8 + 1)`` (= H); the same in train and eval mode (no loss inside);
    * ``logits_64``: B x 2 x g x g, ``cls_meta``'s output (g = ``grid_size``, 64);
    * ``prior``: B x 1 x g x g, the mean over shots of the softmax prior;
    * ``transformer_out``: B x C x g x g, the SCCA transformer's output (after norm0, before the ReLU);
    * ``align_index``: list (one per block) of LongTensors B x nW (nW = (g/ws)^2 for even blocks,
      (g/ws + 1)^2 for odd ones): the support window aligned to each query window;
    * ``supp_proto``: B x C, the mean over shots of the masked-average support prototypes;
    * ``supp_mask_64``: B x 1 x g x g, the mean over shots of the support masks at the grid.

    The backbone is frozen (``requires_grad=False``, FrozenBatchNorm2d, run under no_grad). Dropout
    (``down_query``/``down_supp`` 0.5, ``cls_meta`` 0.1) follows the module's train/eval mode.
    K-shot: plain means over the shots; the model has the same weights for every K.
    """

    def __init__(self, *, backbone: str = "resnet50", backbone_width: int = 64,
                 backbone_blocks: Optional[Sequence[int]] = None, reduce_dim: int = 256, depth: int = 8,
                 num_heads: int = 8, window_size: int = 8, mlp_ratio: float = 1.0, grid_size: int = 64,
                 down_dropout: float = 0.5) -> None:
        super().__init__()
        if backbone not in RESNET_BLOCKS:
            raise ValueError(f"SCCAN needs a ResNet backbone ({', '.join(RESNET_BLOCKS)}), got {backbone!r}")
        if grid_size % window_size:
            raise ValueError(f"grid_size {grid_size} must be a multiple of window_size {window_size}")
        self.backbone_name = backbone
        self.grid_size = int(grid_size)
        self.backbone = freeze(SCCANBackbone(blocks=tuple(backbone_blocks) if backbone_blocks
                                             else RESNET_BLOCKS[backbone], width=backbone_width))
        ch = self.backbone.body.out_channels
        mid_dim = ch["layer2"] + ch["layer3"]
        self.down_query = nn.Sequential(
            nn.Conv2d(mid_dim, reduce_dim, kernel_size=1, bias=False), nn.ReLU(inplace=True),
            nn.Dropout2d(p=down_dropout))
        self.down_supp = nn.Sequential(
            nn.Conv2d(mid_dim, reduce_dim, kernel_size=1, bias=False), nn.ReLU(inplace=True),
            nn.Dropout2d(p=down_dropout))
        # 1.4: Conv1x1 (2C + 1 -> C), no activation
        self.init_merge_query = nn.Sequential(nn.Conv2d(reduce_dim * 2 + 1, reduce_dim, kernel_size=1, bias=False))
        self.init_merge_supp = nn.Sequential(nn.Conv2d(reduce_dim * 2 + 1, reduce_dim, kernel_size=1, bias=False))
        self.transformer = SCCATransformer(dim=reduce_dim, depth=depth, num_heads=num_heads,
                                           window_size=window_size, mlp_ratio=mlp_ratio)
        self.ASPP_meta = ASPP(channels=reduce_dim)
        self.res1_meta = nn.Sequential(
            nn.Conv2d(reduce_dim * 5, reduce_dim, kernel_size=1, bias=False), nn.ReLU(inplace=True))
        self.res2_meta = residual_convs(reduce_dim)
        self.cls_meta = two_class_head(reduce_dim)

    # -- frozen backbone ------------------------------------------------------------------------

    @torch.no_grad()
    def extract_query_features(self, query_img: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The frozen backbone on the query: B x 3 x H x W -> dict ``layer2``, ``layer3``,
        ``layer4`` (B x C x h x w). In eval mode one image at a time
        (:func:`~model.common.one_image_at_a_time`), so an image's features do not depend on its
        batch-mates and cached features are exact."""
        if not self.training:
            return one_image_at_a_time(self.backbone, query_img)
        return self.backbone(query_img)

    @torch.no_grad()
    def extract_support_features(self, support_imgs: torch.Tensor,
                                 support_masks: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The frozen backbone on the B*K supports (unmasked, SPEC_SCCAN 1.1) and the masks at the grid.

        support_imgs: B x K x 3 x H x W, support_masks: B x K x H x W (1 = foreground; 0 and 255
        background) -> dict of B x K x ... tensors: ``layer2``, ``layer3``, ``layer4`` and
        ``mask`` (B x K x 1 x g x g: ``(mask == 1)`` resized bilinear AC from H x W straight to
        the grid, SPEC_SCCAN 1.2.4). Eval mode: one image at a time.
        """
        batch, shots = support_imgs.shape[:2]
        images = support_imgs.flatten(0, 1)
        feats = self.backbone(images) if self.training else one_image_at_a_time(self.backbone, images)
        full_mask = (support_masks.flatten(0, 1) == 1).to(images.dtype).unsqueeze(1)
        feats["mask"] = resize(full_mask, (self.grid_size, self.grid_size))
        return {k: v.unflatten(0, (batch, shots)) for k, v in feats.items()}

    # -- forward --------------------------------------------------------------------------------

    def forward(self, query_img: torch.Tensor, support_imgs: Optional[torch.Tensor],
                support_masks: Optional[torch.Tensor], *, query_feats: Optional[Dict[str, torch.Tensor]] = None,
                support_feats: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, object]:
        """See the class docstring. ``query_feats`` / ``support_feats``: precomputed
        :meth:`extract_query_features` / :meth:`extract_support_features` (then the support
        images and masks may be None; ``query_img`` still gives the output size)."""
        if support_feats is None:
            support_feats = self.extract_support_features(support_imgs, support_masks)
        if query_feats is None:
            query_feats = self.extract_query_features(query_img)
        batch, shots = support_feats["layer3"].shape[:2]
        grid = (self.grid_size, self.grid_size)

        # 1.2: reduced features at the grid; masks, prototypes, K-shot means (batched over B*K)
        query = resize(self.down_query(torch.cat([query_feats["layer2"], query_feats["layer3"]], 1)), grid)
        supp = resize(self.down_supp(torch.cat([support_feats["layer2"].flatten(0, 1),
                                                support_feats["layer3"].flatten(0, 1)], 1)), grid)  # BK x C x g x g
        masks = support_feats["mask"].flatten(0, 1)                                     # BK x 1 x g x g
        protos = weighted_gap(supp, masks)                                              # BK x C x 1 x 1
        supp_mask = masks.unflatten(0, (batch, shots)).mean(1)                          # B x 1 x g x g
        supp_feat = (supp * masks).unflatten(0, (batch, shots)).mean(1)                 # B x C x g x g
        supp_pro = protos.unflatten(0, (batch, shots)).mean(1)                          # B x C x 1 x 1

        # 1.3: the prior, per shot (a B x HWq x HWs map each: shots in sequence bound the memory)
        support_4 = resize(support_feats["layer4"].flatten(0, 1), grid).unflatten(0, (batch, shots))
        prior = torch.stack([softmax_prior(query_feats["layer4"], support_4[:, k], support_feats["mask"][:, k], grid)
                             for k in range(shots)], 1).mean(1)                         # B x 1 x g x g

        # 1.4: merge (no activation), 1.5: SCCA transformer
        query = self.init_merge_query(torch.cat([query, supp_pro.expand_as(query), prior], 1))
        supp = self.init_merge_supp(torch.cat([supp_feat, supp_pro.expand_as(supp_feat), supp_mask], 1))
        transformer_out, align_index = self.transformer(query, supp, supp_mask)

        # 1.6: decoder at the grid (the original's resize of the output to the grid is an identity)
        meta = self.res1_meta(self.ASPP_meta(torch.relu(transformer_out)))
        meta = self.res2_meta(meta) + meta
        logits_64 = self.cls_meta(meta)
        logits = resize(logits_64, output_size(query_img.shape[-2], query_img.shape[-1]))
        return {"logits": logits, "logits_64": logits_64, "prior": prior, "transformer_out": transformer_out,
                "align_index": align_index, "supp_proto": supp_pro.flatten(1), "supp_mask_64": supp_mask}

    def prompt(self, query_img: torch.Tensor, support_imgs: Optional[torch.Tensor],
               support_masks: Optional[torch.Tensor], *, query_feats: Optional[Dict[str, torch.Tensor]] = None,
               support_feats: Optional[Dict[str, torch.Tensor]] = None,
               class_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """SCCAN as SAM-RSP's rough segmentation prompt (SPEC_SCCAN 11): ``softmax(meta_out, dim=1)``,
        B x 2 x H' x W' in (0, 1), channels summing to 1. ``class_ids`` is ignored (no base learner)."""
        out = self.forward(query_img, support_imgs, support_masks, query_feats=query_feats,
                           support_feats=support_feats)
        return out["logits"].softmax(1)


def count_parameters(model: nn.Module) -> Dict[str, int]:
    """``{"total": ..., "trainable": ...}`` parameter counts."""
    params: List[nn.Parameter] = list(model.parameters())
    return {"total": sum(p.numel() for p in params), "trainable": sum(p.numel() for p in params if p.requires_grad)}
