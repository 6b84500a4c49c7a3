"""SimFormer's matching and losses (SPEC_SIMFORMER 4, 5) and its pair sampling (SPEC 6).

* loss formulas: :func:`sigmoid_focal_loss`, :func:`dice_loss` (5.2), their all-pairs cost
  versions :func:`batch_sigmoid_focal_cost`, :func:`batch_dice_cost` (4), :func:`complementary_loss`
  (5.3), :func:`similarity_loss` (5.4), :func:`distillation_loss` (5.5);
* :class:`HungarianMatcher` (4): the cost of every decoder layer in one vectorised pass, the
  assignment by ``scipy.optimize.linear_sum_assignment``;
* :func:`sample_points` (the original's top-k region sampler, 5.4) and :class:`SimFormerCriterion`
  (every term, deep supervision, the class-balance window);
* :func:`build_pair_index` / :func:`draw_partner`: the "Deconf0.01" partner sampler (6).

Targets, one dict per image (SPEC 4), at the padded input size H x W:
``labels`` int64 (n,) (base classes present, then novel classes present), ``masks`` bool
(n, H, W) (a base class's GT mask; all zeros for a novel class: image-level label only),
``segm_gt_raw_aug`` int64 (H, W) (label map, 255 = unlabeled and padding), ``pad_region``
(H, W) (1 on padding). Images 2i and 2i+1 of a batch form a pair (partners).

Random draws (the common base class of a pair and the U[0, 1) noise of the three sampler calls)
come from ``generator`` (a ``torch.Generator``; None = torch's global RNG) or are injected with
``draws={"common_base_class": [c or None per pair], "noise": [pos, neg, distill]}`` (each
B x 1 x h x w; ``distill`` may be None when no pair shares a novel class).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from scipy.optimize import linear_sum_assignment

from .simformer import SimNet, gather_points, novel_score_map

IGNORE_VALUE = 255
COLUMN_ORDERS = ("fixed", "original")
NOVEL_MASK_COSTS = ("nan_safe", "original")
STUDENT_PAIRS = ("paper", "code")
DISTILL_PADDING = ("exclude", "include")
TEACHER_BN = ("eval", "train")
PAIR_LAYOUTS = ("batched", "original")
BALANCE_STATES = ("checkpointed", "original")
DIST_FUNCS = ("cce", "ce")


# --------------------------------------------------------------------------------------------
# Loss formulas
# --------------------------------------------------------------------------------------------

def focal_per_mask(inputs: torch.Tensor, targets: torch.Tensor, *, alpha: float = 0.25,
                   gamma: float = 2.0) -> torch.Tensor:
    """Mean over pixels of ``alpha_t (1 - p_t)^gamma BCE(x, t)`` for each mask (SPEC_SIMFORMER 5.2).

    inputs (logits), targets (0/1): M x P -> M. p = sigmoid(x), p_t = p t + (1 - p)(1 - t),
    alpha_t = alpha t + (1 - alpha)(1 - t); alpha < 0 disables the alpha weighting.
    """
    prob = inputs.sigmoid()
    ce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.mean(1)


def dice_per_mask(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``1 - (2 sum s t + 1) / (sum s + sum t + 1)`` per mask, s = sigmoid(inputs) (SPEC 5.2).
    inputs, targets: M x P -> M."""
    s = inputs.sigmoid()
    numerator = 2 * (s * targets).sum(-1)
    denominator = s.sum(-1) + targets.sum(-1)
    return 1 - (numerator + 1) / (denominator + 1)


def sigmoid_focal_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks: float, *,
                       alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """SPEC_SIMFORMER 5.2 focal term: :func:`focal_per_mask` summed over masks / ``num_masks``.
    inputs, targets: M x P -> scalar."""
    return focal_per_mask(inputs, targets, alpha=alpha, gamma=gamma).sum() / num_masks


def dice_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """SPEC_SIMFORMER 5.2 dice term: :func:`dice_per_mask` summed over masks / ``num_masks``.
    inputs, targets: M x P -> scalar."""
    return dice_per_mask(inputs, targets).sum() / num_masks


def batch_sigmoid_focal_cost(inputs: torch.Tensor, targets: torch.Tensor, *, alpha: float = 0.25,
                             gamma: float = 2.0) -> torch.Tensor:
    """SPEC_SIMFORMER 4 focal cost of every (prediction, target) pair.

    inputs: ... x N x P logits, targets: M x P (0/1) -> ... x N x M:
    [sum_p alpha (1 - s)^gamma BCE(x, 1) t + (1 - alpha) s^gamma BCE(x, 0) (1 - t)] / P,
    with BCE(x, 1) = softplus(-x), BCE(x, 0) = softplus(x).
    """
    p = inputs.shape[-1]
    prob = inputs.sigmoid()
    focal_pos = ((1 - prob) ** gamma) * F.softplus(-inputs)
    focal_neg = (prob ** gamma) * F.softplus(inputs)
    if alpha >= 0:
        focal_pos = focal_pos * alpha
        focal_neg = focal_neg * (1 - alpha)
    loss = torch.einsum("...nc,mc->...nm", focal_pos, targets) + \
        torch.einsum("...nc,mc->...nm", focal_neg, 1 - targets)
    return loss / p


def batch_dice_cost(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """SPEC_SIMFORMER 4 dice cost: ``1 - (2 sum s t + 1) / (sum s + sum t + 1)`` for every pair.
    inputs: ... x N x P logits, targets: M x P -> ... x N x M."""
    s = inputs.sigmoid()
    numerator = 2 * torch.einsum("...nc,mc->...nm", s, targets)
    denominator = s.sum(-1)[..., :, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def complementary_loss(novel_logits: torch.Tensor, floor_logit: torch.Tensor, target: torch.Tensor, *,
                       focal_weight: float = 20.0, dice_weight: float = 1.0, alpha: float = 0.25,
                       gamma: float = 2.0) -> torch.Tensor:
    """SPEC_SIMFORMER 5.3 for one image: ``L_b = 20 focal(m, T) + 1 dice(m, T)`` (num_masks 1).

    novel_logits: n x P (the upsampled mask logits of the queries matched to the image's novel
    targets), floor_logit: scalar tau (-2.9444 = logit 0.05), target: P (T = not base, not
    padding). m = pixel-wise max over the n rows and one constant row tau; the gradient reaches
    only the arg-max row (none where every novel logit is below tau).
    """
    rows = torch.cat([novel_logits, floor_logit.reshape(1, 1).expand(1, novel_logits.shape[1])], 0)
    m = rows.max(0)[0][None]
    t = target[None].to(m.dtype)
    return focal_weight * sigmoid_focal_loss(m, t, 1, alpha=alpha, gamma=gamma) + dice_weight * dice_loss(m, t, 1)


def similarity_loss(sim: torch.Tensor, same: torch.Tensor, valid: torch.Tensor, *, w_neg: float,
                    w_pos: float) -> torch.Tensor:
    """SPEC_SIMFORMER 5.4 SimLoss: ``sum valid w_y BCE(s, y) / max(sum valid, 1e-5)``.

    sim: P(same) of each pair; same, valid: bool of the same shape (any) -> scalar. w_y = w_pos
    where y, else w_neg.
    """
    y = same.to(sim.dtype)
    v = valid.to(sim.dtype)
    weight = y * w_pos + (1 - y) * w_neg
    bce = F.binary_cross_entropy(sim, y, reduction="none")
    return (v * weight * bce).sum() / torch.clamp(v.sum(), min=1e-5)


def distillation_loss(teacher: torch.Tensor, student: torch.Tensor, func: str = "cce") -> torch.Tensor:
    """SPEC_SIMFORMER 5.5 DistLoss elementwise (mean over all elements).

    ``cce``: -ReLU(t - 1/2) log(1 + s) - ReLU(1/2 - t) log(2 - s) (negative-valued by construction);
    ``ce``: t, s clamped to [0.01, 0.99], -t log s - (1 - t) log(1 - s).
    """
    if func == "cce":
        loss = -F.relu(teacher - 0.5) * torch.log(1 + student) - F.relu(0.5 - teacher) * torch.log(2 - student)
    elif func == "ce":
        t = teacher.clamp(0.01, 0.99)
        s = student.clamp(0.01, 0.99)
        loss = -t * torch.log(s) - (1 - t) * torch.log(1 - s)
    else:
        raise ValueError(f"dist_func must be one of {DIST_FUNCS}, got {func!r}")
    return loss.mean()


# --------------------------------------------------------------------------------------------
# Matcher
# --------------------------------------------------------------------------------------------

def _downsample_masks(masks: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """n x H x W -> n x h x w (float), nearest (the original's GT mask resize)."""
    if masks.shape[0] == 0:
        return masks.new_zeros((0,) + tuple(size), dtype=torch.float32)
    return F.interpolate(masks[:, None].float(), size=size, mode="nearest")[:, 0]


class HungarianMatcher:
    """SPEC_SIMFORMER 4: per image and decoder layer, queries <-> targets by minimal cost.

    Cost of query q and target c (p = softmax of the class logits):

    * target with a mask at 1/4 resolution (nearest-downsampled GT mask not all zero):
      ``cost_class_mask * (-p[q, c]) + cost_mask * (focal_weight * focal + dice_weight * dice)``
      (:func:`batch_sigmoid_focal_cost`, :func:`batch_dice_cost` at h x w);
    * other targets (novel: image-level label only): ``cost_class_nomask * (-p[q, c])``
      + ``cost_mask_nomask * (-log max_pixels sigmoid(mask_q))``.

    Columns are ordered [mask targets | the rest] (as the original) and assigned with
    ``scipy.optimize.linear_sum_assignment`` on CPU. Costs of all layers are computed at once.

    Switches (SPEC 10):

    * ``column_order`` (defect 3): ``"fixed"`` (default) maps the assigned column back to its
      target index; ``"original"`` returns the column index, which the losses then use as a
      target index: when a base mask vanishes at 1/4 resolution its column moves into the
      no-mask block and labels/masks are swapped between targets.
    * ``novel_mask_cost`` (defect 5): ``"nan_safe"`` (default) skips the no-mask mask term when
      its weight is 0 (and clamps the log otherwise); ``"original"`` always computes
      ``weight * -log(max sigmoid)``, which is 0 * inf = NaN when a mask saturates.
    """

    def __init__(self, *, cost_class_mask: float = 1.0, cost_mask: float = 1.0, cost_class_nomask: float = 1.0,
                 cost_mask_nomask: float = 0.0, focal_weight: float = 20.0, dice_weight: float = 1.0,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0, column_order: str = "fixed",
                 novel_mask_cost: str = "nan_safe") -> None:
        if column_order not in COLUMN_ORDERS:
            raise ValueError(f"column_order must be one of {COLUMN_ORDERS}, got {column_order!r}")
        if novel_mask_cost not in NOVEL_MASK_COSTS:
            raise ValueError(f"novel_mask_cost must be one of {NOVEL_MASK_COSTS}, got {novel_mask_cost!r}")
        self.cost_class_mask = float(cost_class_mask)
        self.cost_mask = float(cost_mask)
        self.cost_class_nomask = float(cost_class_nomask)
        self.cost_mask_nomask = float(cost_mask_nomask)
        self.focal_weight = float(focal_weight)
        self.dice_weight = float(dice_weight)
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)
        self.column_order = column_order
        self.novel_mask_cost = novel_mask_cost

    @torch.no_grad()
    def cost_matrices(self, all_logits: torch.Tensor, all_masks: torch.Tensor,
                      targets: Sequence[Dict[str, torch.Tensor]]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """all_logits: L x B x N x (K+1), all_masks: L x B x N x h x w ->
        per image (cost L x N x n in [mask | no-mask] column order, order: n column -> target index)."""
        size = tuple(all_masks.shape[-2:])
        result = []
        for b, target in enumerate(targets):
            labels = target["labels"].to(all_logits.device)
            logits = all_logits[:, b].float()                                    # L x N x K+1
            masks = all_masks[:, b].float().flatten(2)                            # L x N x P
            small = _downsample_masks(target["masks"].to(all_masks.device), size).flatten(1)
            has = small.mean(-1) != 0
            cost_class = -logits.softmax(-1)[..., labels]                         # L x N x n
            cost = self.cost_class_nomask * cost_class
            if self.novel_mask_cost == "original" or self.cost_mask_nomask != 0:
                peak = masks.sigmoid().max(-1)[0]                                 # L x N
                if self.novel_mask_cost == "nan_safe":
                    peak = peak.clamp(min=1e-8)
                cost = cost + self.cost_mask_nomask * (-torch.log(peak))[..., None]
            if bool(has.any()):
                t = small[has]
                with_mask = self.cost_class_mask * cost_class[..., has] + self.cost_mask * (
                    self.focal_weight * batch_sigmoid_focal_cost(masks, t, alpha=self.focal_alpha,
                                                                 gamma=self.focal_gamma)
                    + self.dice_weight * batch_dice_cost(masks, t))
                cost = cost.clone()
                cost[..., has] = with_mask
            order = torch.cat([torch.nonzero(has).flatten(), torch.nonzero(~has).flatten()])
            result.append((cost[..., order], order))
        return result

    @torch.no_grad()
    def __call__(self, all_logits: torch.Tensor, all_masks: torch.Tensor,
                 targets: Sequence[Dict[str, torch.Tensor]],
                 costs: Optional[List[Tuple[torch.Tensor, torch.Tensor]]] = None
                 ) -> List[List[Tuple[torch.Tensor, torch.Tensor]]]:
        """-> indices[layer][image] = (query indices, target indices), int64, sorted by query.

        With ``column_order="original"`` the second tensor holds cost-column indices (the
        original's behaviour, see the class docstring)."""
        costs = self.cost_matrices(all_logits, all_masks, targets) if costs is None else costs
        num_layers = all_logits.shape[0]
        indices: List[List[Tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(num_layers)]
        for cost, order in costs:
            cost_np = cost.cpu().numpy()
            order_cpu = order.cpu()
            for layer in range(num_layers):
                rows, cols = linear_sum_assignment(cost_np[layer])
                src = torch.as_tensor(rows, dtype=torch.int64)
                tgt = torch.as_tensor(cols, dtype=torch.int64)
                if self.column_order == "fixed":
                    tgt = order_cpu[tgt]
                indices[layer].append((src, tgt))
        return indices


# --------------------------------------------------------------------------------------------
# Point sampling and the class-balance window
# --------------------------------------------------------------------------------------------

def sample_points(region: torch.Tensor, k: int, *, noise: Optional[torch.Tensor] = None,
                  generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
    """The original's region sampler (SPEC_SIMFORMER 5.4): top-k of ``region + 0.1 u``, u ~ U[0, 1).

    region: B x 1 x h x w (0/1 float) -> dict ``rc`` B x k x 2 int64 (row, col), ``xy`` B x k x 2
    (``grid_sample`` coordinates, align_corners=True), ``scores`` B x k x 1 (the top-k values),
    ``noise`` (the draw used). Inside a region of >= k pixels the points are uniform without
    replacement; a smaller region gives all its pixels, then the highest-noise pixels outside it.
    ``noise`` (B x 1 x h x w) injects the draw; else it comes from ``generator``.
    """
    b, _, h, w = region.shape
    if k > h * w:
        raise ValueError(f"cannot sample {k} points from a {h}x{w} map")
    if noise is None:
        noise = torch.rand(region.shape, generator=generator, dtype=torch.float32,
                           device="cpu" if generator is None else generator.device).to(region.device)
    score = region.float() + noise.to(region.device, torch.float32) * 0.1
    values, index = score.flatten(1).topk(k, dim=1)
    rows = torch.div(index, w, rounding_mode="floor")
    cols = index % w
    xy = torch.stack([cols.float() / max(w - 1, 1), rows.float() / max(h - 1, 1)], -1) * 2 - 1
    return {"rc": torch.stack([rows, cols], -1), "xy": xy, "scores": values[..., None], "noise": noise}


class SimFormerCriterion(nn.Module):
    """Every SimFormer loss term (SPEC_SIMFORMER 5) with deep supervision.

    forward(outputs, targets, *, draws=None, generator=None, details=None) -> raw losses, keys
    and order as the original's: ``loss_mask_m`` (focal), ``loss_mask_d`` (dice), ``loss_comp``,
    ``loss_cls_a``, ``loss_cro_sim``, ``loss_cro_dit`` (final layer; the last two only with a
    SimNet), then ``loss_{mask_m, mask_d, comp, cls_a}_{i}`` for decoder layers i = 0 .. L-2.
    ``total_loss(losses)`` = sum of ``weight_dict[k] * losses[k]`` (SPEC 5.7).

    ``outputs``: :class:`~model.maskformer.MaskFormerHead`'s dict (``pred_logits``,
    ``pred_masks``, ``aux_outputs`` or ``all_logits``/``all_masks``, ``pixel_features``).
    ``details``: a dict to fill with the intermediate values (matcher indices and costs, regions,
    points, SimNet outputs, balance weights, num_masks) for tests and debugging.

    Terms: ClsLoss (5.1, weighted CE, "no object" weight ``no_object_weight``), MaskLoss (5.2,
    matched base targets, predictions bilinearly upsampled to the targets' size; normaliser =
    base targets in the batch, all-reduced, >= 1), CompLoss (5.3, floor ``comp_floor_logit``),
    SimLoss (5.4) and DistLoss (5.5) on the final layer with ``simnet`` (None: the ``sK_seg``
    configs, no pair terms). ``novel_ids``: the split's novel classes. A target is a base target
    when its full-resolution mask is not all zero (the loss side of SPEC 5.2); CompLoss's target
    T = (1 - union of the image's base masks) (1 - padding) (no base target: 1 - padding).
    ``comp_floor_learnable`` makes tau a parameter (``IgnoreLearnable``; off in every config).
    ``recompute_mask_losses`` (default on) recomputes the full-resolution mask and comp terms in
    backward (activation checkpointing) instead of storing their intermediates: same values and
    gradients, about 0.85 GB less peak memory for ~5 % more time at 4 x 512^2 (measured).

    Sizes (SPEC 5, 7): points ``base_points=100`` per image (``int(base_pos_frac * n)`` = 80 in one
    common base class, the rest outside it), ``novel_points=100``; ``comp_weight`` 0.15 (COCO) /
    0.2 (ADE); ``dist_weight`` 0.1 (COCO) / 0.5 (ADE), 0 for the shipped COCO split-1 config;
    ``dist_func`` ``"cce"`` | ``"ce"`` (split 1 and 3 ship ``ce``: SPEC 10 defect 8, a config
    choice). With ``dist_weight == 0`` the teacher pass is skipped and ``loss_cro_dit`` is 0.

    Switches for the original's defects (SPEC 10; defaults = the fix, the original's behaviour
    by name; the matcher's are :class:`HungarianMatcher`'s, the SimNet's in-place residual add
    is :class:`~model.simformer.SimNet`'s ``residual_add``):

    * ``student_pairs`` (defect 2, SPEC 5.6): ``"paper"`` (default) the student compares the
      teacher's cross-image pair, ReLU(cos(S_b[i], S_b'[j])); ``"code"``: points i and j of the
      same image b, ReLU(cos(S_b[i], S_b[j])) (the original's code).
    * ``distill_padding`` (defect 4): ``"exclude"`` (default) samples distillation points in
      (novel or unlabeled) and not padding; ``"include"``: novel or 255, padding included.
    * ``teacher_bn`` (defect 6): ``"eval"`` (default) runs the teacher pass with the SimNet's
      BatchNorm on its running statistics, without updating them; ``"train"``: batch
      statistics and running-stat updates from the distillation pairs (original).
    * ``pair_layout`` (defect 7): ``"batched"`` (default) any even batch, images 2i <-> 2i+1,
      the pair terms averaged over pairs as DDP averages the original's GPUs (one common base
      class drawn per pair, one window entry per pair, one SimNet pass over all pairs: its
      batch statistics span the batch); one pair = the original; ``"original"``: exactly 2
      images (asserted).
    * ``balance_state`` (defect 10): ``"checkpointed"`` (default) keeps the class-balance window
      in the state dict (buffers ``balance_counts``, ``balance_length``; absent keys, e.g. in
      the original's checkpoints, leave a fresh window); ``"original"``: not saved (reset on resume).

    Defects 8 (per-split ``dist_weight`` / ``dist_func`` as shipped) and 9 (crop-level image
    labels) are config / data matters: the constructor takes any weight and function, and the
    targets' labels are whatever the data pipeline derives.
    """

    def __init__(self, *, num_classes: int, novel_ids: Sequence[int], matcher: HungarianMatcher,
                 simnet: Optional[SimNet] = None, no_object_weight: float = 0.1, cls_weight: float = 1.0,
                 mask_focal_weight: float = 20.0, mask_dice_weight: float = 1.0, comp_weight: float = 0.15,
                 comp_focal_weight: float = 20.0, comp_dice_weight: float = 1.0, comp_floor_logit: float = -2.9444,
                 comp_floor_learnable: bool = False, sim_weight: float = 1.0, dist_weight: float = 0.1,
                 dist_func: str = "cce", base_points: int = 100, base_pos_frac: float = 0.8,
                 novel_points: int = 100, base_detach: bool = True, focal_alpha: float = 0.25,
                 focal_gamma: float = 2.0, deep_supervision: bool = True, balance_window: int = 25,
                 balance_stride: int = 5, student_pairs: str = "paper", distill_padding: str = "exclude",
                 teacher_bn: str = "eval", pair_layout: str = "batched",
                 balance_state: str = "checkpointed", recompute_mask_losses: bool = True) -> None:
        super().__init__()
        for name, value, choices in (("student_pairs", student_pairs, STUDENT_PAIRS),
                                     ("distill_padding", distill_padding, DISTILL_PADDING),
                                     ("teacher_bn", teacher_bn, TEACHER_BN), ("pair_layout", pair_layout, PAIR_LAYOUTS),
                                     ("balance_state", balance_state, BALANCE_STATES),
                                     ("dist_func", dist_func, DIST_FUNCS)):
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        self.num_classes = int(num_classes)
        self.matcher = matcher
        self.cro_pixel_sim_net = simnet
        self.cls_weight = float(cls_weight)
        self.mask_focal_weight = float(mask_focal_weight)
        self.mask_dice_weight = float(mask_dice_weight)
        self.comp_weight = float(comp_weight)
        self.comp_focal_weight = float(comp_focal_weight)
        self.comp_dice_weight = float(comp_dice_weight)
        self.sim_weight = float(sim_weight)
        self.dist_weight = float(dist_weight)
        self.dist_func = dist_func
        self.base_points = int(base_points)
        self.base_pos_frac = float(base_pos_frac)
        self.novel_points = int(novel_points)
        self.base_detach = bool(base_detach)
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)
        self.deep_supervision = bool(deep_supervision)
        self.balance_stride = int(balance_stride)
        self.student_pairs = student_pairs
        self.distill_padding = distill_padding
        self.teacher_bn = teacher_bn
        self.pair_layout = pair_layout
        self.balance_state = balance_state
        self.recompute_mask_losses = bool(recompute_mask_losses)
        empty_weight = torch.ones(self.num_classes + 1)
        empty_weight[-1] = float(no_object_weight)
        self.register_buffer("empty_weight", empty_weight)
        floor = torch.tensor(float(comp_floor_logit))
        if comp_floor_learnable:
            self.ingore_th = nn.Parameter(floor)          # (sic) the original's name
        else:
            self.register_buffer("ingore_th", floor)
        self.register_buffer("novel_ids", torch.as_tensor(sorted(int(c) for c in novel_ids), dtype=torch.int64),
                             persistent=False)
        # Class-balance window (SPEC 5.4): row 0 negatives, row 1 positives, oldest first.
        persistent = balance_state == "checkpointed"
        self.register_buffer("balance_counts", torch.zeros(2, int(balance_window), dtype=torch.int64),
                             persistent=persistent)
        self.register_buffer("balance_length", torch.zeros((), dtype=torch.int64), persistent=persistent)
        self.reset_balance()

    # ---------------------------------------------------------------- weights and state
    @property
    def weight_dict(self) -> Dict[str, float]:
        """Loss key -> weight (SPEC 5.7); aux-layer keys ``_i`` carry the same weights."""
        base = {"loss_mask_m": self.mask_focal_weight, "loss_mask_d": self.mask_dice_weight,
                "loss_comp": self.comp_weight, "loss_cls_a": self.cls_weight,
                "loss_cro_sim": self.sim_weight, "loss_cro_dit": self.dist_weight}
        return base

    def weight_of(self, key: str) -> float:
        name = key
        if key.rsplit("_", 1)[-1].isdigit():
            name = key.rsplit("_", 1)[0]
        return self.weight_dict[name]

    def weighted(self, losses: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {k: v * self.weight_of(k) for k, v in losses.items()}

    def total_loss(self, losses: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum of the weighted terms, in dict order (SPEC 5.7)."""
        total = None
        for value in self.weighted(losses).values():
            total = value if total is None else total + value
        return total

    def reset_balance(self) -> None:
        """A fresh window: one negative and one positive count (the original's start)."""
        self.balance_counts.zero_()
        self.balance_counts[:, 0] = 1
        self.balance_length.fill_(1)

    def set_balance_window(self, neg: Sequence[int], pos: Sequence[int]) -> None:
        """Set the window (oldest first), e.g. to inject the original's deque."""
        if len(neg) != len(pos) or not 0 < len(neg) <= self.balance_counts.shape[1]:
            raise ValueError("neg and pos must have the same length, 1 .. window size")
        self.balance_counts.zero_()
        self.balance_counts[0, :len(neg)] = torch.as_tensor(list(neg), dtype=torch.int64)
        self.balance_counts[1, :len(pos)] = torch.as_tensor(list(pos), dtype=torch.int64)
        self.balance_length.fill_(len(neg))

    def balance_window(self) -> Tuple[List[int], List[int]]:
        n = int(self.balance_length)
        return self.balance_counts[0, :n].tolist(), self.balance_counts[1, :n].tolist()

    def _push_balance(self, neg: int, pos: int) -> None:
        n, size = int(self.balance_length), self.balance_counts.shape[1]
        if n == size:
            self.balance_counts[:, :-1] = self.balance_counts[:, 1:].clone()
            n -= 1
        self.balance_counts[0, n] = int(neg)
        self.balance_counts[1, n] = int(pos)
        self.balance_length.fill_(n + 1)

    def balance_weights(self) -> Tuple[float, float]:
        """(w_neg, w_pos) = (P / (P + N), N / (P + N)) over the window (SPEC 5.4)."""
        neg, pos = self.balance_window()
        total_neg, total_pos = sum(neg), sum(pos)
        return total_pos / (total_pos + total_neg), total_neg / (total_pos + total_neg)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        # Checkpoints without the window (the original's) load strictly and keep a fresh window.
        optional = {prefix + "balance_counts", prefix + "balance_length"}
        missing_keys[:] = [k for k in missing_keys if k not in optional]

    # ---------------------------------------------------------------- helpers
    @staticmethod
    def _layers(outputs: Dict[str, object]) -> Tuple[torch.Tensor, torch.Tensor]:
        if "all_logits" in outputs:
            return outputs["all_logits"], outputs["all_masks"]
        aux = list(outputs.get("aux_outputs", []))
        logits = torch.stack([a["pred_logits"] for a in aux] + [outputs["pred_logits"]])
        masks = torch.stack([a["pred_masks"] for a in aux] + [outputs["pred_masks"]])
        return logits, masks

    @staticmethod
    def _has_mask(targets: Sequence[Dict[str, torch.Tensor]]) -> List[torch.Tensor]:
        """Per image, per target: the full-resolution mask is not all zero (base target)."""
        return [t["masks"].flatten(1).any(1) for t in targets]

    def _num_masks(self, has_mask: List[torch.Tensor], device: torch.device) -> float:
        num = torch.as_tensor([float(sum(int(h.sum()) for h in has_mask))], device=device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(num)
            num = num / dist.get_world_size()
        return max(float(num.item()), 1.0)

    # ---------------------------------------------------------------- per-layer terms
    def _checkpointed(self, fn, *args):
        """``fn(*args)``, recomputed in backward instead of keeping its full-resolution
        intermediates (``recompute_mask_losses``) when a gradient is needed."""
        if self.recompute_mask_losses and torch.is_grad_enabled() and any(
                torch.is_tensor(a) and a.requires_grad for a in args):
            return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def _set_losses(self, all_logits: torch.Tensor, all_masks: torch.Tensor, indices, targets, has_mask,
                    num_masks: float) -> List[Dict[str, torch.Tensor]]:
        """Mask (5.2), complementary (5.3) and classification (5.1) terms of every decoder layer.

        all_logits: L x B x N x (K+1), all_masks: L x B x N x h x w; indices[layer][image] =
        (query idx, target idx). The matched queries of all layers are gathered with one index
        and their full-resolution losses computed in one batch. -> per layer ``{focal, dice,
        comp, cls}``.
        """
        num_layers, batch, num_queries = all_masks.shape[:3]
        device = all_masks.device
        full_size = tuple(targets[0]["masks"].shape[-2:])
        base_rows, base_layer, base_targets = [], [], []
        novel_rows, novel_group, novel_slot = [], [], []
        novel_images = [b for b in range(batch) if bool((~has_mask[b]).any())]
        image_slot = {b: i for i, b in enumerate(novel_images)}
        max_novel = 0
        for layer in range(num_layers):
            for b, (src, tgt) in enumerate(indices[layer]):
                flat = (layer * batch + b) * num_queries + src
                is_base = has_mask[b][tgt]
                base_rows.append(flat[is_base])
                base_layer.append(torch.full((int(is_base.sum()),), layer, dtype=torch.int64))
                base_targets.append(targets[b]["masks"][tgt[is_base].to(targets[b]["masks"].device)])
                if b in image_slot:
                    nov = flat[~is_base]
                    novel_rows.append(nov)
                    novel_group.append(torch.full((len(nov),), layer * len(novel_images) + image_slot[b],
                                                  dtype=torch.int64))
                    novel_slot.append(torch.arange(len(nov)))
                    max_novel = max(max_novel, len(nov))
        base_rows = torch.cat(base_rows)
        novel_rows = torch.cat(novel_rows) if novel_rows else torch.zeros(0, dtype=torch.int64)
        picked = all_masks.flatten(0, 2)[torch.cat([base_rows, novel_rows]).to(device)]      # R x h x w
        zero = all_masks.sum() * 0.0
        # 5.2: matched base targets, bilinearly upsampled to the targets' size
        focal = [zero] * num_layers
        dice = [zero] * num_layers
        if len(base_rows):
            layer_of = torch.cat(base_layer).to(device)
            gt = torch.cat(base_targets).to(device)
            per_focal, per_dice = self._checkpointed(self._mask_terms, picked[:len(base_rows)], gt)
            focal = list(torch.zeros(num_layers, dtype=per_focal.dtype, device=device)
                         .index_add(0, layer_of, per_focal) / num_masks)
            dice = list(torch.zeros(num_layers, dtype=per_dice.dtype, device=device)
                        .index_add(0, layer_of, per_dice) / num_masks)
        # 5.3: one max map per (layer, image with novel targets)
        comp = [zero] * num_layers
        if novel_images:
            union = []
            for b in novel_images:
                gt = targets[b]["masks"].to(device)
                base = gt[has_mask[b].to(device)]
                base_union = base.any(0) if base.shape[0] else torch.zeros(full_size, dtype=torch.bool, device=device)
                pad = targets[b]["pad_region"].to(device) != 0
                union.append(~base_union & ~pad)                       # T = (1 - base) (1 - pad)
            group = torch.cat(novel_group).to(device)
            slot = torch.cat(novel_slot).to(device)
            per_group = self._checkpointed(
                self._comp_terms, picked[len(base_rows):], group, slot, self.ingore_th, torch.stack(union),
                num_layers * len(novel_images), max_novel)
            comp = list(per_group.view(num_layers, len(novel_images)).sum(1) / (len(novel_images) + 1e-5))
        # 5.1: every query; matched ones get their target's label, the rest "no object" (K)
        results = []
        for layer in range(num_layers):
            logits = all_logits[layer]
            target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=device)
            for b, (src, tgt) in enumerate(indices[layer]):
                target_classes[b, src.to(device)] = targets[b]["labels"].to(device)[tgt.to(device)]
            cls = F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight.to(logits.dtype))
            results.append({"focal": focal[layer], "dice": dice[layer], "comp": comp[layer], "cls": cls})
        return results

    def _mask_terms(self, logits: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """logits: M x h x w, target: M x H x W (bool) -> per-mask focal and dice (M, M)."""
        up = F.interpolate(logits[:, None], size=tuple(target.shape[-2:]), mode="bilinear",
                           align_corners=False)[:, 0].flatten(1)
        t = target.flatten(1).to(up.dtype)
        return focal_per_mask(up, t, alpha=self.focal_alpha, gamma=self.focal_gamma), dice_per_mask(up, t)

    def _comp_terms(self, logits: torch.Tensor, group: torch.Tensor, slot: torch.Tensor, floor: torch.Tensor,
                    target: torch.Tensor, num_groups: int, num_slots: int) -> torch.Tensor:
        """SPEC 5.3 for every (layer, image) group at once: :func:`complementary_loss` per group.

        logits: R x h x w (the queries matched to novel targets), group / slot: R (which group and
        row each belongs to), target: I x H x W (bool, one per image with novel targets; group g
        uses image g mod I) -> G losses. Row ``num_slots`` of every group is the floor tau;
        unused rows hold tau too (they never change the max).
        """
        size = tuple(target.shape[-2:])
        up = F.interpolate(logits[:, None], size=size, mode="bilinear", align_corners=False)[:, 0].flatten(1)
        rows = floor.to(up.dtype).reshape(1, 1, 1).expand(num_groups, num_slots + 1, up.shape[1])
        rows = rows.index_put((group, slot), up)
        m = rows.max(1)[0]                                                         # G x P
        t = target.flatten(1).to(up.dtype)
        t = t.repeat(num_groups // t.shape[0], 1)
        return self.comp_focal_weight * focal_per_mask(m, t, alpha=self.focal_alpha, gamma=self.focal_gamma) + \
            self.comp_dice_weight * dice_per_mask(m, t)

    # ---------------------------------------------------------------- pair terms
    def regions(self, targets: Sequence[Dict[str, torch.Tensor]], size: Tuple[int, int],
                device: torch.device) -> Dict[str, torch.Tensor]:
        """Label map and base / pad / novel / ignore regions at the mask resolution (nearest).

        -> ``labels`` B x 1 x h x w (int64) and B x 1 x h x w float maps ``base``, ``pad``,
        ``novel``, ``ignore`` (ignore = label 255, padding included; base = the rest)."""
        raw = torch.stack([t["segm_gt_raw_aug"] for t in targets]).to(device)[:, None].float()
        pad = torch.stack([t["pad_region"] for t in targets]).to(device)[:, None].float()
        labels = F.interpolate(raw, size=size, mode="nearest")
        pad = F.interpolate(pad, size=size, mode="nearest")
        ignore = (labels == IGNORE_VALUE).float()
        novel = torch.isin(labels, self.novel_ids.to(device).float()).float()
        base = 1 - ignore - novel
        return {"labels": labels.long(), "base": base, "pad": pad, "novel": novel, "ignore": ignore}

    def _pair_losses(self, outputs: Dict[str, object], targets, has_mask, draws: Optional[Dict],
                     generator: Optional[torch.Generator], details: Optional[Dict]) -> Dict[str, torch.Tensor]:
        """SimLoss (5.4) and DistLoss (5.5) on the final layer and the pixel embeddings."""
        simnet = self.cro_pixel_sim_net
        feats = outputs["pixel_features"]
        batch, _, h, w = feats.shape
        if self.pair_layout == "original" and batch != 2:
            raise ValueError(f"pair_layout='original' needs exactly 2 images (one pair), got {batch}")
        if batch % 2:
            raise ValueError(f"pair terms need an even batch (images 2i, 2i+1 are partners), got {batch}")
        num_pairs = batch // 2
        device = feats.device
        partner = torch.arange(batch, device=device) ^ 1
        reg = self.regions(targets, (h, w), device)
        labels, base = reg["labels"], reg["base"]
        noise = list((draws or {}).get("noise", [None, None, None]))
        chosen = list((draws or {}).get("common_base_class", [None] * num_pairs))
        if len(chosen) != num_pairs:
            raise ValueError(f"draws['common_base_class'] needs one entry per pair ({num_pairs})")
        # positive region: one base class common to both images of the pair, else the base region
        pos_region = base.clone()
        for p in range(num_pairs):
            sets = [set(targets[i]["labels"][has_mask[i].to(targets[i]["labels"].device)].tolist())
                    for i in (2 * p, 2 * p + 1)]
            common = sorted(sets[0] & sets[1])
            if not common:
                continue
            c = chosen[p]
            if c is None:
                c = common[int(torch.randint(len(common), (1,), generator=generator,
                                             device="cpu" if generator is None else generator.device))]
                chosen[p] = c
            elif int(c) not in common:
                raise ValueError(f"injected common base class {c} is not common to pair {p} ({common})")
            pos_region[2 * p:2 * p + 2] = (labels[2 * p:2 * p + 2] == int(c)).float()
        neg_region = (1 - reg["pad"]) * (1 - pos_region)
        k_pos = int(self.base_pos_frac * self.base_points)
        k_neg = int(round(1 - self.base_pos_frac, 6) * self.base_points)
        pos = sample_points(pos_region, k_pos, noise=noise[0], generator=generator)
        neg = sample_points(neg_region, k_neg, noise=noise[1], generator=generator)
        rc = torch.cat([pos["rc"], neg["rc"]], 1)                                 # B x P x 2
        emb = feats.detach() if self.base_detach else feats
        point_feats = gather_points(emb, rc)                                      # B x C x P
        point_labels = gather_points(labels.float(), rc)[:, 0]                     # B x P
        point_base = gather_points(base, rc)[:, 0] > 0.5
        sim = simnet.forward_pairs(point_feats, point_feats[partner])             # B x 1 x P x P
        same = point_labels[:, :, None] == point_labels[partner][:, None, :]
        valid = point_base[:, :, None] | point_base[partner][:, None, :]
        s = self.balance_stride
        for p in range(num_pairs):
            sub = same[2 * p:2 * p + 2, ::s, ::s]
            positives = int(sub.sum())
            self._push_balance(sub.numel() - positives, positives)
        w_neg, w_pos = self.balance_weights()
        loss_sim = sum(similarity_loss(sim[2 * p:2 * p + 2, 0], same[2 * p:2 * p + 2], valid[2 * p:2 * p + 2],
                                       w_neg=w_neg, w_pos=w_pos) for p in range(num_pairs)) / num_pairs
        result = {"loss_cro_sim": loss_sim}
        if details is not None:
            details.update(regions=reg, sampling_regions=[pos_region, neg_region], points=[pos, neg],
                           common_base_class=chosen, sim_pred=sim.detach(), balance_weights=(w_neg, w_pos),
                           pair_same=same, pair_valid=valid)
        # 5.5: distillation, only for pairs sharing a novel class (image-level labels)
        shares = []
        for p in range(num_pairs):
            sets = [set(targets[i]["labels"][~has_mask[i].to(targets[i]["labels"].device)].tolist())
                    for i in (2 * p, 2 * p + 1)]
            shares.append(bool(sets[0] & sets[1]))
        if self.dist_weight == 0 or not any(shares):
            result["loss_cro_dit"] = feats.sum() * 0.0
            return result
        dist_region = reg["novel"] + reg["ignore"]
        if self.distill_padding == "exclude":
            dist_region = dist_region * (1 - reg["pad"])
        pts = sample_points(dist_region, self.novel_points, noise=noise[2], generator=generator)
        with torch.no_grad():
            teacher_feats = gather_points(feats.detach(), pts["rc"])
            pair = (teacher_feats, teacher_feats[partner])
            if self.teacher_bn == "eval" and simnet.training:
                simnet.eval()
                try:
                    teacher = simnet.forward_pairs(*pair)[:, 0]
                finally:
                    simnet.train()
            else:
                teacher = simnet.forward_pairs(*pair)[:, 0]                       # B x Q x Q
        # S at the points = the score map of the masks read at the points (pointwise, cheaper)
        point_scores = novel_score_map(outputs["pred_logits"], gather_points(outputs["pred_masks"], pts["rc"]),
                                       self.novel_ids.to(device))                 # B x n x Q
        unit = point_scores / point_scores.norm(dim=1, keepdim=True).clamp(min=1e-8)
        other = unit[partner] if self.student_pairs == "paper" else unit
        student = F.relu(torch.einsum("bni,bnj->bij", unit, other))              # B x Q x Q
        loss_dist = feats.sum() * 0.0
        for p in range(num_pairs):
            if shares[p]:
                loss_dist = loss_dist + distillation_loss(teacher[2 * p:2 * p + 2], student[2 * p:2 * p + 2],
                                                          self.dist_func)
        result["loss_cro_dit"] = loss_dist / num_pairs
        if details is not None:
            details.update(distill_region=dist_region, distill_points=pts, teacher=teacher, student=student.detach())
        return result

    # ---------------------------------------------------------------- forward
    def forward(self, outputs: Dict[str, object], targets: Sequence[Dict[str, torch.Tensor]], *,
                draws: Optional[Dict] = None, generator: Optional[torch.Generator] = None,
                details: Optional[Dict] = None) -> Dict[str, torch.Tensor]:
        all_logits, all_masks = self._layers(outputs)
        num_layers = all_logits.shape[0] if self.deep_supervision else 1
        if not self.deep_supervision:
            all_logits, all_masks = all_logits[-1:], all_masks[-1:]
        costs = self.matcher.cost_matrices(all_logits.detach(), all_masks.detach(), targets)
        indices = self.matcher(all_logits, all_masks, targets, costs=costs)
        has_mask = [h.cpu() for h in self._has_mask(targets)]
        num_masks = self._num_masks(has_mask, all_masks.device)
        if details is not None:
            details.update(indices=indices, costs=costs, num_masks=num_masks)
        terms = self._set_losses(all_logits, all_masks, indices, targets, has_mask, num_masks)

        def layer_dict(layer: int, suffix: str) -> Dict[str, torch.Tensor]:
            t = terms[layer]
            return {f"loss_mask_m{suffix}": t["focal"], f"loss_mask_d{suffix}": t["dice"],
                    f"loss_comp{suffix}": t["comp"], f"loss_cls_a{suffix}": t["cls"]}

        losses = layer_dict(num_layers - 1, "")
        if self.cro_pixel_sim_net is not None:
            losses.update(self._pair_losses({"pred_logits": all_logits[-1], "pred_masks": all_masks[-1],
                                             "pixel_features": outputs["pixel_features"]},
                                            targets, has_mask, draws, generator, details))
        for layer in range(num_layers - 1):
            losses.update(layer_dict(layer, f"_{layer}"))
        return losses


# --------------------------------------------------------------------------------------------
# Pair sampling (SPEC 6, PAIR_TYPE "Deconf0.01")
# --------------------------------------------------------------------------------------------

def _capped(candidates: np.ndarray, cap: int, rng: np.random.Generator) -> List[int]:
    """Append ``candidates`` in order to a list capped at ``cap``: on overflow one random element
    among the first ``cap`` (every element but the new one) is dropped. Order-free equivalent:
    each overflowing candidate replaces a uniformly chosen slot."""
    if len(candidates) <= cap:
        return [int(c) for c in candidates]
    slots = candidates[:cap].copy()
    extra = candidates[cap:]
    where = rng.integers(0, cap, size=len(extra))
    last = np.full(cap, -1)
    last[where] = np.arange(len(extra))          # numpy keeps the last assignment per slot
    filled = last >= 0
    slots[filled] = extra[last[filled]]
    return [int(c) for c in slots]


def build_pair_index(base_sets: Sequence[Set[int]], novel_sets: Sequence[Set[int]], *, num_classes: int,
                     rng: np.random.Generator, deconf_cap: int = 500, novel_comm_cap: int = 50,
                     base_comm_cap: int = 50, chunk: int = 512) -> Dict[str, list]:
    """Partner candidates of every image (SPEC_SIMFORMER 6, the original's ``compute_pairs.py``).

    ``base_sets`` / ``novel_sets``: the base / novel classes of each image (full GT maps). For
    anchor A and every other image C (in index order):

    * A and C share exactly one novel class n: C joins ``deconf[A][n]`` (cap ``deconf_cap``);
    * elif A has >= 2 novel classes: C joins ``novel_comm[A]`` (cap ``novel_comm_cap``; as the
      spec states the rule: no shared class is required);
    * independently, they share >= 1 base class: C joins ``base_comm[A]`` (cap ``base_comm_cap``).

    Overflow drops a random earlier element (:func:`_capped`). Class-presence matrices make the
    O(n^2) scan one matrix product per ``chunk`` anchors. -> ``{"deconf": [dict n -> list],
    "novel_comm": [list], "base_comm": [list]}`` (deconf keys: classes with >= 1 candidate).
    """
    count = len(base_sets)
    novel = np.zeros((count, num_classes), np.float32)
    base = np.zeros((count, num_classes), np.float32)
    for i, (bs, ns) in enumerate(zip(base_sets, novel_sets)):
        base[i, list(bs)] = 1
        novel[i, list(ns)] = 1
    novel_counts = novel.sum(1)
    deconf: List[Dict[int, List[int]]] = []
    novel_comm: List[List[int]] = []
    base_comm: List[List[int]] = []
    for start in range(0, count, chunk):
        stop = min(start + chunk, count)
        shared_novel = novel[start:stop] @ novel.T
        shared_base = base[start:stop] @ base.T
        for a in range(start, stop):
            row_n, row_b = shared_novel[a - start], shared_base[a - start]
            row_n[a] = row_b[a] = 0
            others = np.ones(count, bool)
            others[a] = False
            one = np.nonzero(others & (row_n == 1))[0]
            lists: Dict[int, List[int]] = {}
            if len(one):
                which = np.argmax(novel[one] * novel[a], axis=1)       # the one shared novel class
                for n in np.unique(which):
                    lists[int(n)] = _capped(one[which == n], deconf_cap, rng)
            deconf.append(lists)
            if novel_counts[a] >= 2:
                novel_comm.append(_capped(np.nonzero(others & (row_n != 1))[0], novel_comm_cap, rng))
            else:
                novel_comm.append([])
            base_comm.append(_capped(np.nonzero(others & (row_b >= 1))[0], base_comm_cap, rng))
    return {"deconf": deconf, "novel_comm": novel_comm, "base_comm": base_comm}


def draw_partner(index: Dict[str, list], anchor: int, rng: np.random.Generator, *, min_prob: float = 0.01,
                 empty_as: int = 500) -> int:
    """The partner of ``anchor`` (SPEC_SIMFORMER 6, load time).

    If the anchor has >= 2 novel classes with candidates: pick n uniformly among them (with
    probability ``min_prob`` instead the n with the fewest candidates, an empty list counting as
    ``empty_as``) and draw uniformly from ``deconf[anchor][n]``. Otherwise (the original's
    quirk: also for an anchor with exactly one novel class) fall back to ``novel_comm``, then
    ``base_comm``, then the anchor itself.
    """
    lists = index["deconf"][anchor]
    if len(lists) >= 2:
        keys = sorted(lists)
        if rng.random() < min_prob:
            n = min(keys, key=lambda k: len(lists[k]) or empty_as)
        else:
            n = keys[int(rng.integers(len(keys)))]
        if lists[n]:
            return int(lists[n][int(rng.integers(len(lists[n])))])
    for name in ("novel_comm", "base_comm"):
        pool = index[name][anchor]
        if pool:
            return int(pool[int(rng.integers(len(pool)))])
    return int(anchor)


def class_sets_from_label_map(label_map: np.ndarray, novel_ids: Set[int],
                              ignore_value: int = IGNORE_VALUE) -> Tuple[Set[int], Set[int]]:
    """(base classes, novel classes) present in a label map (255 ignored)."""
    present = {int(c) for c in np.unique(label_map) if int(c) != ignore_value}
    return present - set(novel_ids), present & set(novel_ids)


__all__ = [
    "HungarianMatcher", "SimFormerCriterion", "batch_dice_cost", "batch_sigmoid_focal_cost", "build_pair_index",
    "class_sets_from_label_map", "complementary_loss", "dice_loss", "distillation_loss", "draw_partner",
    "sample_points", "sigmoid_focal_loss", "similarity_loss",
]
