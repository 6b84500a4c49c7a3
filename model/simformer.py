"""SimFormer (weak-shot semantic segmentation, NeurIPS 2022) on MaskFormer: the model side.

* :class:`SimNet`: the pixel-pixel similarity network (SPEC_SIMFORMER 5.4): a 2-way classifier
  over the concatenated embeddings of two pixels, output P(same class).
* helpers the losses use on model outputs: :func:`pair_grid` (all pairs of two point sets as a
  2C-channel "image"), :func:`gather_points` (read maps at sampled points),
  :func:`novel_score_map` (SPEC 5.5's S = sum_q softmax(class_q)[novel] sigmoid(mask_q));
* :func:`semantic_inference` (SPEC 8) and :func:`preprocess_images` (normalise + pad to /32);
* :class:`SimFormer`: backbone + ``sem_seg_head`` (:class:`~model.maskformer.MaskFormerHead`) +
  ``criterion`` (:class:`~model.simformer_criterion.SimFormerCriterion`, which owns the SimNet);
  :func:`build_simformer` builds one from explicit sizes; :func:`optimizer_param_groups` gives
  the original's AdamW groups (SPEC 7).

State-dict names are the original's: ``backbone.*`` (torchvision names, see
:mod:`model.maskformer`), ``sem_seg_head.{pixel_decoder, predictor}.*``,
``criterion.{empty_weight, ingore_th, cro_pixel_sim_net.fc_branch.layers.block{i}.{layer1, layer2,
bn1, bn2[, sqz]}, cro_pixel_sim_net.out_head}``. A model built with ``backbone=None`` (features
given) loads the parity fixture's weights strictly.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .maskformer import PIXEL_MEAN, PIXEL_STD, SIZE_DIVISIBILITY, MaskFormerHead

if TYPE_CHECKING:  # the criterion imports this module (SimNet); no import cycle at run time
    from .simformer_criterion import SimFormerCriterion

RESIDUAL_ADDS = ("out_of_place", "inplace")


# --------------------------------------------------------------------------------------------
# SimNet
# --------------------------------------------------------------------------------------------

class SimBlock(nn.Module):
    """One residual block of the SimNet, on 1x1 convs (SPEC_SIMFORMER 5.4).

    main = ReLU(bn2(layer2(ReLU(bn1(layer1(x)))))); residual = ReLU(sqz(x)) when the width
    changes (``sqz``: Conv1x1 in -> out with bias), else x; out = main + residual.
    ``batch_norm=False`` drops bn1/bn2. x: B x in x P x Q -> B x out x P x Q.

    ``residual_add`` (SPEC 10 defect 1): ``"out_of_place"`` (default, the fix) adds into a new
    tensor; ``"inplace"`` is the original's ``x += residual``: the same forward, but backward
    raises on current torch (it modifies a ReLU output autograd saved).
    """

    def __init__(self, *, in_dim: int, out_dim: int, batch_norm: bool = True,
                 residual_add: str = "out_of_place") -> None:
        super().__init__()
        if residual_add not in RESIDUAL_ADDS:
            raise ValueError(f"residual_add must be one of {RESIDUAL_ADDS}, got {residual_add!r}")
        self.residual_add = residual_add
        self.layer1 = nn.Conv2d(in_dim, out_dim, kernel_size=1)
        self.layer2 = nn.Conv2d(out_dim, out_dim, kernel_size=1)
        self.bn1 = nn.BatchNorm2d(out_dim) if batch_norm else nn.Identity()
        self.bn2 = nn.BatchNorm2d(out_dim) if batch_norm else nn.Identity()
        self.sqz = nn.Conv2d(in_dim, out_dim, kernel_size=1) if in_dim != out_dim else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in-place ReLUs on conv / BN outputs (their backward needs the input, not the output)
        residual = x if self.sqz is None else F.relu(self.sqz(x), inplace=True)
        return self._finish(self.layer1(x), residual)

    def forward_pairs(self, feats_a: torch.Tensor, feats_b: torch.Tensor) -> torch.Tensor:
        """The block on every pair (i, j) of two point sets without building the 2C-channel grid.

        feats_a: B x C x P, feats_b: B x C x Q (C = in_dim / 2) -> B x out x P x Q, equal to
        ``forward(pair_grid(feats_a, feats_b))``: a 1x1 conv of [a_i, b_j] is W_a a_i + W_b b_j + bias,
        so the convs reading the concatenation (``layer1``, ``sqz``) run on the P + Q points and
        are broadcast. Needs ``sqz`` (in_dim != out_dim).
        """
        if self.sqz is None:
            raise ValueError("forward_pairs needs a block with sqz (in_dim != out_dim)")
        residual = F.relu(_pairwise_conv(self.sqz, feats_a, feats_b), inplace=True)
        return self._finish(_pairwise_conv(self.layer1, feats_a, feats_b), residual)

    def _finish(self, main: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(main), inplace=True)
        out = F.relu(self.bn2(self.layer2(out)), inplace=True)
        if self.residual_add == "inplace":
            out += residual
            return out
        return out + residual


def _pairwise_conv(conv: nn.Conv2d, feats_a: torch.Tensor, feats_b: torch.Tensor) -> torch.Tensor:
    """A 1x1 ``conv`` over [a_i, b_j] for all pairs: B x C x P, B x C x Q -> B x out x P x Q."""
    c = feats_a.shape[1]
    weight = conv.weight[:, :, 0, 0]
    proj_a = torch.einsum("oc,bcp->bop", weight[:, :c], feats_a)
    proj_b = torch.einsum("oc,bcq->boq", weight[:, c:], feats_b)
    if conv.bias is not None:
        proj_a = proj_a + conv.bias[None, :, None]
    return proj_a.unsqueeze(3) + proj_b.unsqueeze(2)


class _FCBranch(nn.Module):
    """Holds the blocks as ``layers.block{i}`` (the original's key layout)."""

    def __init__(self, blocks: "OrderedDict[str, nn.Module]") -> None:
        super().__init__()
        self.layers = nn.Sequential(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class SimNet(nn.Module):
    """The original's ``CroPixelResSimConvNet`` (SPEC_SIMFORMER 5.4): P(two pixels share a class).

    forward(pairs B x in_dim x P x Q, the concatenation [E(pixel i), E(pixel j)] of pair (i, j))
    -> B x 1 x P x Q in (0, 1): ``num_layers`` :class:`SimBlock` s (in_dim -> hidden, then
    hidden -> hidden), ``out_head`` Conv1x1 hidden -> 2, softmax over the 2 channels, channel 1.

    Sizes: full = ``in_dim=512`` (2 x the 256-d pixel embedding), ``hidden_dim=256``,
    ``num_layers=3`` (``CROSS_IMG_SIM.LayerNum``), ``batch_norm=True`` (``CROSS_IMG_SIM.BN``).
    BatchNorm follows the module's train/eval mode (the original trains it with batch statistics).
    """

    def __init__(self, *, in_dim: int = 512, hidden_dim: int = 256, num_layers: int = 3, batch_norm: bool = True,
                 residual_add: str = "out_of_place") -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        blocks = OrderedDict(
            (f"block{i}", SimBlock(in_dim=in_dim if i == 0 else hidden_dim, out_dim=hidden_dim,
                                   batch_norm=batch_norm, residual_add=residual_add))
            for i in range(num_layers))
        self.fc_branch = _FCBranch(blocks)
        self.out_head = nn.Conv2d(hidden_dim, 2, kernel_size=1)

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        return self.out_head(self.fc_branch(pairs)).softmax(dim=1)[:, 1:2]

    def forward_pairs(self, feats_a: torch.Tensor, feats_b: torch.Tensor) -> torch.Tensor:
        """P(same class) of every pair (i, j): feats_a B x C x P, feats_b B x C x Q -> B x 1 x P x Q.

        Equal to ``forward(pair_grid(feats_a, feats_b))`` up to float rounding, with the first
        block's convs on the P + Q points instead of the P x Q pairs (about half the SimNet's
        FLOPs at 100 x 100 pairs, and no 2C x P x Q grid). Falls back to the grid when the first
        block has no ``sqz``.
        """
        blocks = list(self.fc_branch.layers)
        if blocks[0].sqz is None:
            return self.forward(pair_grid(feats_a, feats_b))
        x = blocks[0].forward_pairs(feats_a, feats_b)
        for block in blocks[1:]:
            x = block(x)
        return self.out_head(x).softmax(dim=1)[:, 1:2]


# --------------------------------------------------------------------------------------------
# Helpers on model outputs used by the losses
# --------------------------------------------------------------------------------------------

def gather_points(maps: torch.Tensor, points_rc: torch.Tensor) -> torch.Tensor:
    """Values of ``maps`` at integer points.

    maps: B x C x h x w; points_rc: B x k x 2 (row, col), int64 -> B x C x k.
    (The original reads them with ``grid_sample(align_corners=True)`` at the same pixel
    centres; this is the same value without the bilinear round-off.)
    """
    b, c, h, w = maps.shape
    flat = (points_rc[..., 0] * w + points_rc[..., 1]).unsqueeze(1).expand(b, c, -1)
    return maps.flatten(2).gather(2, flat)


def pair_grid(feats_a: torch.Tensor, feats_b: torch.Tensor) -> torch.Tensor:
    """Every pair (i, j) of two point sets as a 2C-channel image.

    feats_a: B x C x P, feats_b: B x C x Q -> B x 2C x P x Q, channels [a_i, b_j] at (i, j).
    """
    p, q = feats_a.shape[-1], feats_b.shape[-1]
    return torch.cat([feats_a.unsqueeze(3).expand(-1, -1, p, q), feats_b.unsqueeze(2).expand(-1, -1, p, q)], 1)


def novel_score_map(pred_logits: torch.Tensor, pred_masks: torch.Tensor, novel_ids: torch.Tensor) -> torch.Tensor:
    """SPEC_SIMFORMER 5.5 ``DISTILL_TO NovelScore``: S = sum_q softmax(class_q)[novel] * sigmoid(mask_q).

    pred_logits: B x N x (K+1), pred_masks: B x N x ... (e.g. h x w, or the mask logits at k
    points), novel_ids: n (int64) -> B x n x ... .
    """
    probs = pred_logits.softmax(-1)[..., novel_ids]
    return torch.einsum("bqn,bq...->bn...", probs, pred_masks.sigmoid())


def semantic_inference(pred_logits: torch.Tensor, pred_masks: torch.Tensor, *,
                       padded_size: Tuple[int, int], image_size: Tuple[int, int],
                       output_size: Tuple[int, int]) -> torch.Tensor:
    """SPEC_SIMFORMER 8 for one image: K class-score maps at the original size.

    pred_logits: N x (K+1), pred_masks: N x h x w (final layer) -> K x H_out x W_out scores.
    Steps: masks bilinear (align_corners False) to ``padded_size``; scores =
    einsum(softmax(cls)[:, :K], sigmoid(masks)); crop ``[:h_i, :w_i]`` (``image_size``, the
    resized image before padding); bilinear (align_corners False) to ``output_size`` (the
    original image). The prediction is ``scores.argmax(0)``.
    """
    masks = F.interpolate(pred_masks[None], size=tuple(padded_size), mode="bilinear", align_corners=False)[0]
    scores = torch.einsum("qc,qhw->chw", pred_logits.softmax(-1)[:, :-1], masks.sigmoid())
    scores = scores[:, :image_size[0], :image_size[1]]
    return F.interpolate(scores[None], size=tuple(output_size), mode="bilinear", align_corners=False)[0]


def preprocess_images(images: Sequence[torch.Tensor], *, size_divisibility: int = SIZE_DIVISIBILITY,
                      mean: Sequence[float] = PIXEL_MEAN, std: Sequence[float] = PIXEL_STD
                      ) -> Tuple[torch.Tensor, List[Tuple[int, int]]]:
    """Normalise 0..255 RGB images (each 3 x h_i x w_i) and pad them bottom/right with 0 (after
    normalisation) to a common size divisible by ``size_divisibility`` (detectron2's
    ``ImageList.from_tensors``). -> (B x 3 x H x W, [(h_i, w_i)])."""
    sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    div = max(int(size_divisibility), 1)
    height = -(-max(h for h, _ in sizes) // div) * div
    width = -(-max(w for _, w in sizes) // div) * div
    ref = images[0]
    m = torch.tensor(mean, dtype=torch.float32, device=ref.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=ref.device).view(3, 1, 1)
    batch = torch.zeros((len(images), 3, height, width), dtype=torch.float32, device=ref.device)
    for i, im in enumerate(images):
        batch[i, :, :im.shape[-2], :im.shape[-1]] = (im.float() - m) / s
    return batch, sizes


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------

class SimFormer(nn.Module):
    """MaskFormer + the SimFormer criterion (SPEC_SIMFORMER 1, 3).

    ``backbone``: a module mapping a normalised B x 3 x H x W batch to ``{"res2".."res5"}``
    (:class:`~model.maskformer.FrozenBNResNet`), or None when the caller gives the features.
    ``sem_seg_head``: :class:`~model.maskformer.MaskFormerHead`. ``criterion``:
    :class:`~model.simformer_criterion.SimFormerCriterion` (holds the SimNet, so its weights
    live in this model's state dict), or None for an inference-only model.

    * ``forward(images, targets=None, *, features=None, draws=None, generator=None)``:
      images B x 3 x H x W, normalised and padded (:func:`preprocess_images`), or ``features``.
      Returns the head's dict (``pred_logits`` B x N x (K+1), ``pred_masks`` B x N x H/4 x W/4,
      ``aux_outputs``, ``all_logits``, ``all_masks``, ``pixel_features``); with ``targets``
      (training) also ``losses`` (the raw terms, keys as the original's) and ``loss`` (their
      weighted sum). ``draws`` / ``generator`` are passed to the criterion (injected random draws).
    * ``inference(images, image_sizes, output_sizes)``: list of K x H_out x W_out score maps
      (SPEC 8), one image at a time (the original's eval path handles batch 1).
    """

    def __init__(self, *, backbone: Optional[nn.Module], sem_seg_head: MaskFormerHead,
                 criterion: Optional["SimFormerCriterion"] = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.sem_seg_head = sem_seg_head
        self.criterion = criterion

    @property
    def num_classes(self) -> int:
        return self.sem_seg_head.num_classes

    def extract_features(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        if self.backbone is None:
            raise ValueError("this SimFormer has no backbone: pass features=")
        return self.backbone(images)

    def forward(self, images: Optional[torch.Tensor] = None, targets: Optional[List[Dict[str, torch.Tensor]]] = None,
                *, features: Optional[Dict[str, torch.Tensor]] = None, draws: Optional[Dict] = None,
                generator: Optional[torch.Generator] = None) -> Dict[str, object]:
        if features is None:
            if images is None:
                raise ValueError("give images or features")
            features = self.extract_features(images)
        out = self.sem_seg_head(features)
        if targets is not None:
            if self.criterion is None:
                raise ValueError("targets given but this SimFormer has no criterion")
            losses = self.criterion(out, targets, draws=draws, generator=generator)
            out["losses"] = losses
            out["loss"] = self.criterion.total_loss(losses)
        return out

    @torch.no_grad()
    def inference(self, images: Optional[torch.Tensor], image_sizes: Sequence[Tuple[int, int]],
                  output_sizes: Sequence[Tuple[int, int]], *, features: Optional[Dict[str, torch.Tensor]] = None,
                  padded_size: Optional[Tuple[int, int]] = None) -> List[torch.Tensor]:
        """images: B x 3 x H x W normalised and padded (:func:`preprocess_images`), or ``features``
        (then ``padded_size`` = H x W, default 4 x the mask size); image_sizes: (h_i, w_i) before
        padding; output_sizes: (H_i, W_i) to predict at -> [K x H_i x W_i] class scores
        (``.argmax(0)`` = the label map). One image per forward, as the original's eval path."""
        results = []
        for i in range(len(image_sizes)):
            feats = None if features is None else {k: v[i:i + 1] for k, v in features.items()}
            img = None if images is None else images[i:i + 1]
            out = self.forward(img, features=feats)
            if img is not None:
                padded = (int(img.shape[-2]), int(img.shape[-1]))
            else:
                padded = tuple(padded_size) if padded_size is not None else \
                    tuple(4 * int(s) for s in out["pred_masks"].shape[-2:])
            results.append(semantic_inference(out["pred_logits"][0], out["pred_masks"][0], padded_size=padded,
                                              image_size=tuple(image_sizes[i]), output_size=tuple(output_sizes[i])))
        return results


def build_simformer(*, num_classes: int, novel_ids: Sequence[int],
                    backbone_blocks: Optional[Sequence[int]] = (3, 4, 6, 3), backbone_width: int = 64,
                    backbone_norm: str = "frozen_bn",
                    in_channels: Sequence[int] = (256, 512, 1024, 2048), conv_dim: int = 256, mask_dim: int = 256,
                    hidden_dim: int = 256, num_queries: int = 100, nheads: int = 8, dim_feedforward: int = 2048,
                    dec_layers: int = 6, dropout: float = 0.1, simnet: bool = True, simnet_hidden: int = 256,
                    simnet_layers: int = 3, simnet_bn: bool = True, residual_add: str = "out_of_place",
                    matcher_kwargs: Optional[Dict[str, object]] = None,
                    criterion_kwargs: Optional[Dict[str, object]] = None) -> SimFormer:
    """SimFormer from explicit sizes (defaults: MaskFormer R50 and the SimNet as SPEC_SIMFORMER 3, 5.4).

    ``backbone_blocks=None`` builds no backbone (the caller passes res2..res5 features, whose
    channels are ``in_channels``); otherwise a :class:`~model.maskformer.FrozenBNResNet` with those
    blocks (its channels are ResNet-50's; ``backbone_width`` / ``backbone_norm``: the toy's narrower,
    trainable-BN variant). ``simnet=False`` gives the ``sK_seg`` model (no pair
    terms). ``matcher_kwargs`` / ``criterion_kwargs`` go to
    :class:`~model.simformer_criterion.HungarianMatcher` / ``SimFormerCriterion`` (loss weights,
    points, the defect switches).
    """
    from .maskformer import FrozenBNResNet
    from .simformer_criterion import HungarianMatcher, SimFormerCriterion

    backbone = None
    if backbone_blocks is not None:
        backbone = FrozenBNResNet(blocks=backbone_blocks, width=backbone_width, norm=backbone_norm)
        in_channels = tuple(backbone.out_channels[name] for name in ("res2", "res3", "res4", "res5"))
    head = MaskFormerHead(in_channels=in_channels, num_classes=num_classes, conv_dim=conv_dim, mask_dim=mask_dim,
                          hidden_dim=hidden_dim, num_queries=num_queries, nheads=nheads,
                          dim_feedforward=dim_feedforward, dec_layers=dec_layers, dropout=dropout)
    net = SimNet(in_dim=2 * mask_dim, hidden_dim=simnet_hidden, num_layers=simnet_layers, batch_norm=simnet_bn,
                 residual_add=residual_add) if simnet else None
    criterion = SimFormerCriterion(num_classes=num_classes, novel_ids=novel_ids,
                                   matcher=HungarianMatcher(**(matcher_kwargs or {})), simnet=net,
                                   **(criterion_kwargs or {}))
    return SimFormer(backbone=backbone, sem_seg_head=head, criterion=criterion)


NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm, nn.InstanceNorm1d,
              nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm, nn.LocalResponseNorm)


def optimizer_param_groups(model: nn.Module, *, base_lr: float = 1e-4, weight_decay: float = 1e-4,
                           backbone_multiplier: float = 0.1, weight_decay_norm: float = 0.0,
                           weight_decay_embed: float = 0.0) -> List[Dict[str, object]]:
    """AdamW parameter groups as the original builds them (SPEC_SIMFORMER 7, detectron2's defaults).

    Every trainable parameter: lr ``base_lr`` (x ``backbone_multiplier`` inside a module whose
    name contains ``backbone``), weight decay ``weight_decay``, except parameters of norm layers
    (``weight_decay_norm``; the SimNet's BatchNorm included) and of ``nn.Embedding`` (the query
    embedding: ``weight_decay_embed``). Groups with equal (lr, weight decay) are merged.
    The rest of the schedule is the engine's: poly (1 - it / max_it)^0.9 without warm-up and
    ``clip_grad_norm_(model.parameters(), 0.01)`` before each step.
    """
    groups: Dict[Tuple[float, float], List[nn.Parameter]] = {}
    seen = set()
    for module_name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            lr = base_lr * (backbone_multiplier if "backbone" in module_name else 1.0)
            decay = weight_decay
            if isinstance(module, NORM_TYPES):
                decay = weight_decay_norm
            if isinstance(module, nn.Embedding):
                decay = weight_decay_embed
            groups.setdefault((lr, decay), []).append(param)
    return [{"params": params, "lr": lr, "weight_decay": decay} for (lr, decay), params in groups.items()]
