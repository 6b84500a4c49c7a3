"""BAM (Lang et al., CVPR 2022), the rough-segmentation-prompt generator of SAM-RSP (SPEC 2.3-2.4).

State-dict names are the original's, so BAM checkpoints load strictly: ``layer0..4`` (backbone),
``learner_base.{0 = ppm, 1 = cls}``, ``down_query``, ``down_supp``, ``init_merge``,
``ASPP_meta``, ``res1_meta``, ``res2_meta``, ``cls_meta``, ``gram_merge``, ``cls_merge`` and, for
``shot > 1`` only, ``kshot_rw``.

The backbone and the base learner are always frozen (``requires_grad=False``, run under
``torch.no_grad()``, BatchNorm in eval whatever ``train()`` says); ``learner_base`` still follows
the module's train/eval mode for its Dropout2d, like the original.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .aspp import ASPP
from .backbone import LAYER_NAMES, adopt_backbone_layers, build_backbone, run_layers
from .common import (batchnorm_eval, freeze, min_max_per_image, one_image_at_a_time, output_size, resize,
                     residual_convs, two_class_head)
from .pspnet import PPM, make_cls_head

COSINE_EPS = 1e-7


def weighted_gap(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked average pooling: sum(f * m) / (sum(m) + 0.0005), the sums written as avg_pool * h * w.

    features: BxCxhxw, mask: Bx1xhxw -> BxCx1x1.
    """
    features = features * mask
    h, w = features.shape[-2:]
    area = F.avg_pool2d(mask, (h, w)) * h * w + 0.0005
    return F.avg_pool2d(features, (h, w)) * h * w / area


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """Channel Gram matrix of cosine similarities (computed in float32).

    features: BxCxhxw -> BxCxC, ``f f^T / (|f| |f|^T + 1e-7)`` with ``|f|`` the L2 norm of each
    channel over the pixels (BxCx1).
    """
    b, c = features.shape[:2]
    with torch.autocast(device_type=features.device.type, enabled=False):  # norm products overflow fp16
        f = features.float().reshape(b, c, -1)
        norm = f.norm(2, 2, True)
        return torch.bmm(f, f.transpose(1, 2)) / (torch.bmm(norm, norm.transpose(1, 2)) + 1e-7)


def gram_distance(query_gram: torch.Tensor, support_gram: torch.Tensor) -> torch.Tensor:
    """``||G_q - G_s||_F / ||ones(C, C)||_F``: BxCxC, BxCxC -> Bx1x1x1."""
    diff = (query_gram - support_gram).norm(dim=(1, 2))
    scale = torch.ones_like(query_gram).norm(dim=(1, 2))
    return (diff / scale).reshape(-1, 1, 1, 1)


def prior_mask(query_feat: torch.Tensor, masked_support_feat: torch.Tensor, size) -> torch.Tensor:
    """Training-free prior: per query pixel, the max cosine similarity to any support pixel,
    min-max normalised per image (eps 1e-7), resized (bilinear, align_corners) to ``size``;
    computed in float32.

    query_feat: BxCxhqxwq, masked_support_feat: BxCxhsxws -> Bx1x``size``.
    """
    b, c, hq, wq = query_feat.shape
    with torch.autocast(device_type=query_feat.device.type, enabled=False):  # norm products overflow fp16
        query = query_feat.float().reshape(b, c, -1)                            # B x C x HWq
        query_norm = torch.norm(query, 2, 1, True)                              # B x 1 x HWq
        support = masked_support_feat.float().reshape(b, c, -1).permute(0, 2, 1)  # B x HWs x C
        support_norm = torch.norm(support, 2, 2, True)                          # B x HWs x 1
        similarity = torch.bmm(support, query) / (torch.bmm(support_norm, query_norm) + COSINE_EPS)
        similarity = similarity.max(1)[0]                                       # B x HWq
        similarity = min_max_per_image(similarity, COSINE_EPS)
        return resize(similarity.reshape(b, 1, hq, wq), size)


class BAM(nn.Module):
    """Base-and-meta few-shot segmenter.

    forward(query_img Bx3xHxW, support_imgs BxKx3xHxW, support_masks BxKxHxW (0/1/255),
    class_ids LongTensor B | None) -> dict with, each upsampled (bilinear, align_corners) to
    ``H' = int((H - 1) / 8 * 8 + 1)``:

    * ``logits``: ``final_out`` Bx2xH'xW', the ensemble's probability-like map (not logits; the
      original feeds it to cross-entropy as is);
    * ``meta_logits``: ``meta_out`` Bx2xH'xW';
    * ``base_logits``: ``base_out`` B x num_base_channels x H' x W'.

    ``class_ids`` holds the base-learner channel (1..C-1) of each episode's class; in training
    mode that channel is left out of the base map (the original's 'Base' behaviour), so it is
    required then, and ignored in eval mode.
    """

    def __init__(self, *, backbone: str = "resnet50", backbone_width: int = 64,
                 backbone_blocks: Optional[Sequence[int]] = None, num_base_channels: int = 16,
                 shot: int = 1, reduce_dim: int = 256, kshot_trans_dim: int = 2,
                 low_feature: str = "layer2", ppm_bins: Sequence[int] = (1, 2, 3, 6),
                 base_hidden_dim: int = 512, base_dropout: float = 0.1) -> None:
        super().__init__()
        if low_feature not in LAYER_NAMES[1:]:
            raise ValueError(f"low_feature must be one of layer1..layer4, got {low_feature!r}")
        self.backbone_name = backbone
        self.is_vgg = backbone.startswith("vgg")
        self.shot = int(shot)
        self.low_feature = low_feature
        self.num_base_channels = int(num_base_channels)
        self.feature_channels: Dict[str, int] = adopt_backbone_layers(
            self, build_backbone(backbone, width=backbone_width, blocks=backbone_blocks))
        ch = self.feature_channels
        fea_dim = ch["layer4"]
        reduction_dim = fea_dim // len(ppm_bins)
        self.learner_base = nn.Sequential(
            PPM(in_dim=fea_dim, reduction_dim=reduction_dim, bins=ppm_bins),
            make_cls_head(in_dim=fea_dim + len(ppm_bins) * reduction_dim, hidden_dim=base_hidden_dim,
                          num_classes=num_base_channels, dropout=base_dropout))
        for name in LAYER_NAMES + ("learner_base",):
            freeze(getattr(self, name))

        mid_dim = ch["layer3"] + ch["layer2"]
        self.down_query = nn.Sequential(
            nn.Conv2d(mid_dim, reduce_dim, kernel_size=1, bias=False), nn.ReLU(inplace=True),
            nn.Dropout2d(p=0.5))
        self.down_supp = nn.Sequential(
            nn.Conv2d(mid_dim, reduce_dim, kernel_size=1, bias=False), nn.ReLU(inplace=True),
            nn.Dropout2d(p=0.5))
        self.init_merge = nn.Sequential(
            nn.Conv2d(reduce_dim * 2 + 1, reduce_dim, kernel_size=1, bias=False), nn.ReLU(inplace=True))
        self.ASPP_meta = ASPP(channels=reduce_dim)
        self.res1_meta = nn.Sequential(
            nn.Conv2d(reduce_dim * 5, reduce_dim, kernel_size=1, bias=False), nn.ReLU(inplace=True))
        self.res2_meta = residual_convs(reduce_dim)
        self.cls_meta = two_class_head(reduce_dim)

        self.gram_merge = nn.Conv2d(2, 1, kernel_size=1, bias=False)
        self.cls_merge = nn.Conv2d(2, 1, kernel_size=1, bias=False)
        with torch.no_grad():
            self.gram_merge.weight.copy_(torch.tensor([1.0, 0.0]).view(1, 2, 1, 1))
            self.cls_merge.weight.copy_(torch.tensor([1.0, 0.0]).view(1, 2, 1, 1))
        if self.shot > 1:
            if kshot_trans_dim == 0:
                self.kshot_rw = nn.Conv2d(self.shot, self.shot, kernel_size=1, bias=False)
                with torch.no_grad():
                    self.kshot_rw.weight.fill_(1.0 / self.shot)
            else:
                self.kshot_rw = nn.Sequential(
                    nn.Conv2d(self.shot, kshot_trans_dim, kernel_size=1), nn.ReLU(inplace=True),
                    nn.Conv2d(kshot_trans_dim, self.shot, kernel_size=1))

    def train(self, mode: bool = True) -> "BAM":
        """Set train/eval mode; the frozen backbone's and base learner's BatchNorm stay in eval."""
        super().train(mode)
        for name in LAYER_NAMES + ("learner_base",):
            batchnorm_eval(getattr(self, name))
        return self

    @torch.no_grad()
    def extract_query_features(self, query_img: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The frozen backbone's query features (reusable across episodes with the same query).

        query_img: Bx3xHxW -> dict ``layer2``, ``layer3``, ``layer4`` (and the Gram feature
        ``low_feature``). For VGG ``layer2`` is already resized (bilinear, align_corners) to
        layer3's size, as the original does right after the backbone. In eval mode the images
        go through the backbone one at a time (:func:`~model.common.one_image_at_a_time`: an
        image's features do not depend on its batch-mates, so cached features are exact).
        """
        if not self.training:
            return one_image_at_a_time(self._query_features, query_img)
        return self._query_features(query_img)

    def _query_features(self, query_img: torch.Tensor) -> Dict[str, torch.Tensor]:
        feats = dict(zip(LAYER_NAMES, run_layers(self, query_img)))
        if self.is_vgg:
            feats["layer2"] = resize(feats["layer2"], feats["layer3"].shape[-2:])
        keep = {"layer2", "layer3", "layer4", self.low_feature}
        return {k: v for k, v in feats.items() if k in keep}

    @torch.no_grad()
    def extract_support_features(self, support_imgs: torch.Tensor, support_masks: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The frozen backbone's work on the supports, all B*K images in ONE backbone call (the
        original loops over the shots; BatchNorm is in eval, so the numbers are the same).

        support_imgs: BxKx3xHxW, support_masks: BxKxHxW (1 = foreground; 255 counts as
        background) -> dict of B x K x ... tensors:
        ``layer2``/``layer3`` (layer2 resized to layer3's size for VGG), ``layer4`` (computed on
        layer3 * mask), ``mask`` (the mask at layer3's size, for the prototype), ``prior_mask``
        (the full-resolution mask resized to layer4's size, for the prior) and the Gram
        feature ``low``.
        """
        batch, shots = support_imgs.shape[:2]
        images = support_imgs.flatten(0, 1)
        full_mask = (support_masks.flatten(0, 1) == 1).to(images.dtype).unsqueeze(1)
        s1 = self.layer1(self.layer0(images))
        s2 = self.layer2(s1)
        s3 = self.layer3(s2)
        mask = resize(full_mask, s3.shape[-2:])
        s4 = self.layer4(s3 * mask)
        if self.is_vgg:
            s2 = resize(s2, s3.shape[-2:])
        low = {"layer1": s1, "layer2": s2, "layer3": s3, "layer4": s4}[self.low_feature]
        feats = {"layer2": s2, "layer3": s3, "layer4": s4, "mask": mask,
                 "prior_mask": resize(full_mask, s4.shape[-2:]), "low": low}
        return {k: v.unflatten(0, (batch, shots)) for k, v in feats.items()}

    def forward(self, query_img: torch.Tensor, support_imgs: Optional[torch.Tensor],
                support_masks: Optional[torch.Tensor], class_ids: Optional[torch.Tensor] = None,
                query_feats: Optional[Dict[str, torch.Tensor]] = None,
                support_feats: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
        """See the class docstring. ``query_feats`` / ``support_feats``: precomputed
        :meth:`extract_query_features` / :meth:`extract_support_features` (then the support
        images and masks may be None)."""
        if support_feats is None:
            support_feats = self.extract_support_features(support_imgs, support_masks)
        shots = support_feats["layer3"].shape[1]
        if shots != self.shot:
            raise ValueError(f"this BAM was built for {self.shot} shot(s); got {shots} support images")
        size = output_size(query_img.shape[-2], query_img.shape[-1])
        if query_feats is None:
            query_feats = self.extract_query_features(query_img)
        query_2, query_3, query_4 = query_feats["layer2"], query_feats["layer3"], query_feats["layer4"]
        query_feat = self.down_query(torch.cat([query_3, query_2], 1))
        query_gram = gram_matrix(query_feats[self.low_feature])

        prototypes, priors, estimates = [], [], []
        for k in range(shots):
            support_feat = self.down_supp(torch.cat([support_feats["layer3"][:, k], support_feats["layer2"][:, k]], 1))
            prototypes.append(weighted_gap(support_feat, support_feats["mask"][:, k]))
            estimates.append(gram_distance(query_gram, gram_matrix(support_feats["low"][:, k])))
            masked_s4 = support_feats["layer4"][:, k] * support_feats["prior_mask"][:, k]
            priors.append(prior_mask(query_4, masked_s4, query_3.shape[-2:]))

        # K-shot reweighting by the Gram estimate (1-shot: weight 1).
        est_total = torch.cat(estimates, 1)                                  # B x K x 1 x 1
        weights = self.shot_weights(est_total)
        est = (weights * est_total).sum(1, True)                             # B x 1 x 1 x 1
        prior = (weights * torch.cat(priors, 1)).sum(1, True)                # B x 1 x h3 x w3
        prototype = (weights.permute(0, 2, 1, 3) * torch.cat(prototypes, 2)).sum(2, True)  # B x C x 1 x 1

        merge = self.init_merge(torch.cat([query_feat, prototype.expand_as(query_feat), prior], 1))
        with torch.no_grad():
            base_out = self.learner_base(query_4)
        meta = self.res1_meta(self.ASPP_meta(merge))
        meta = self.res2_meta(meta) + meta
        meta_out = self.cls_meta(meta)

        # Ensemble.
        meta_soft = meta_out.softmax(1)
        base_soft = base_out.softmax(1)
        base_map = self.base_map(base_soft, class_ids)
        meta_bg, meta_fg = meta_soft[:, 0:1], meta_soft[:, 1:]
        est_map = est.expand_as(meta_fg)
        meta_bg = self.gram_merge(torch.cat([meta_bg, est_map], 1))
        meta_fg = self.gram_merge(torch.cat([meta_fg, est_map], 1))
        merge_bg = self.cls_merge(torch.cat([meta_bg, base_map], 1))
        final_out = torch.cat([merge_bg, meta_fg], 1)
        return {"logits": resize(final_out, size), "meta_logits": resize(meta_out, size),
                "base_logits": resize(base_out, size)}

    def prompt(self, query_img: torch.Tensor, support_imgs: Optional[torch.Tensor],
               support_masks: Optional[torch.Tensor], *, class_ids: Optional[torch.Tensor] = None,
               query_feats: Optional[Dict[str, torch.Tensor]] = None,
               support_feats: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
        """SAM-RSP's rough segmentation prompt: ``final_out``, B x 2 x H x W (SPEC 1 step 1)."""
        return self(query_img, support_imgs, support_masks, class_ids=class_ids, query_feats=query_feats,
                    support_feats=support_feats)["logits"]

    def shot_weights(self, est_total: torch.Tensor) -> torch.Tensor:
        """K-shot weights from the Gram estimates: B x K x 1 x 1 -> B x K x 1 x 1 (softmax over K).

        The estimates are sorted ascending, ``kshot_rw`` maps the sorted vector, the result is
        put back in the shots' order and soft-maxed. One shot: weight 1.
        """
        if est_total.shape[1] == 1:
            return torch.ones_like(est_total)
        sorted_est, order = est_total.sort(1)
        _, rank = order.sort(1)
        return self.kshot_rw(sorted_est).gather(1, rank).softmax(1)

    def base_map(self, base_soft: torch.Tensor, class_ids: Optional[torch.Tensor]) -> torch.Tensor:
        """Summed base-class probability. B x C x h x w -> B x 1 x h x w.

        Eval: channels 1..C-1. Training: also without each episode's own channel ``class_ids[b]``.
        """
        if not self.training:
            return base_soft[:, 1:].sum(1, True)
        if class_ids is None:
            raise ValueError(
                "BAM in training mode leaves each episode's class out of the base map and needs "
                "class_ids (its base-learner channel, 1..C-1); pass class_ids or call .eval()")
        batch, channels = base_soft.shape[:2]
        keep = torch.ones(batch, channels, dtype=base_soft.dtype, device=base_soft.device)
        keep[:, 0] = 0
        keep.scatter_(1, class_ids.to(base_soft.device).long().view(batch, 1), 0.0)
        return (base_soft * keep[:, :, None, None]).sum(1, True)
