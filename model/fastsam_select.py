"""Selecting FastSAM instance proposals with prompts, in plain torch (no ultralytics import).

FastSAM (SPEC_FASTSAM) proposes N instance masks per image (:class:`model.fastsam.FastSAMProposer`);
a prompt only SELECTS among them. The rules here are our own implementation of the rules
described in SPEC_FASTSAM 1.2 / 4.5 / 5.2 (nothing is copied from ultralytics or FastSAM, so
this file carries no AGPL obligation), and they work on any N x H x W boolean masks:

* :func:`select_by_points` -- ultralytics 8.4's point rule (SPEC 1.2, 4.5): keep every mask that
  contains >= 1 positive point and no negative point; with only negative points, every mask
  that contains none of them. Masks are returned unmerged and the result does not depend on
  the order of the points (unlike the original FastSAM's order-dependent pixel painting).
* :func:`select_by_box` -- the box rule of both implementations: per box the argmax over masks
  of the mask-vs-box IoU ``|m & B| / (|B| + |m| - |m & B|)`` (pixels; NOT the IoU with the
  mask's bounding box); several boxes give the union of their argmaxes, deduplicated.
* :func:`select_by_mask` -- SPEC 5.2 (a): refine a few-shot model's output with the proposals
  under its foreground probability map (purity filter, nested masks skipped, guarded by a
  fallback to the model's own mask).
* :func:`select_by_similarity` -- SPEC 5.2 (c): the training-free baseline, proposals scored by
  the mean of a cosine-similarity map inside them.
* :func:`prompts_from_prob` -- SPEC 5.2 (a), interactive modes: point / box prompts derived
  from a probability map (PerSAM's argmax / argmin points, FSS-SAM's box and centroids).

Coordinates: points are (x, y) pixels, boxes (x1, y1, x2, y2) pixels with x2 / y2 exclusive
(the mask slice ``[y1:y2, x1:x2]``). Float coordinates are truncated toward zero and clipped to
the image, as ultralytics does.

Speed: every per-mask sum (areas, sums of a map under each mask, mask-box overlaps) is computed
on the masks' horizontal RUNS (:func:`mask_runs`: one row (mask, row, start, end) per maximal
run of True pixels of a row), so it costs O(number of runs), not O(N x H x W): one dense pass
over 300 x 1024 x 1024 booleans alone takes 0.1-0.3 s on a 2-core CPU. Computing the runs is one
dense pass (done once per image and cached by :class:`model.fastsam.FastSAMProposer`, whose
``proposals()`` returns them as ``runs``); every function takes them as ``runs=`` and computes
them itself when they are not given. The only per-mask Python loop is the nested-mask skip of
:func:`select_by_mask`, which is sequential by definition; it visits the candidates only, on
their bounding boxes. Measured by ``python -m util.fastsam_bench`` (300 proposals of a
random-weight FastSAM-s at 1024 x 1024, 35680 runs, 2 threads): points 0.1 ms, box 0.6 ms,
mask prompt 3-7 ms, similarity baseline 7-15 ms with ``runs`` given; :func:`mask_runs` itself
0.1-0.2 s (so 0.1-0.2 s per call when ``runs`` is NOT given).

All functions accept torch tensors or numpy arrays and return torch tensors on the masks'
device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Union

import numpy as np
import torch

ArrayLike = Union[torch.Tensor, np.ndarray, Sequence]

# A mean (or covered fraction) equal to its threshold up to float rounding counts as reaching it.
_TOLERANCE = 1e-9


class SelectionError(ValueError):
    """A selection input has the wrong shape, type or value (the message names it)."""


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------

def as_masks(masks: ArrayLike) -> torch.Tensor:
    """Proposals as an N x H x W bool tensor (N may be 0). Accepts bool or 0/1 integer masks."""
    masks = torch.as_tensor(masks)
    if masks.ndim != 3:
        raise SelectionError(f"masks: expected N x H x W, got shape {tuple(masks.shape)}")
    if masks.dtype != torch.bool:
        if masks.dtype.is_floating_point or masks.dtype.is_complex:
            raise SelectionError(f"masks: expected bool (or 0/1 integer) masks, got {masks.dtype}")
        masks = masks != 0
    return masks


def _as_map(values: ArrayLike, shape: tuple, what: str, device: torch.device) -> torch.Tensor:
    """An H x W float map of the masks' size, on ``device`` (float32 kept, anything else -> float32)."""
    values = torch.as_tensor(values)
    if values.ndim != 2 or tuple(values.shape) != tuple(shape):
        raise SelectionError(f"{what}: expected an H x W map of the masks' size {tuple(shape)}, "
                             f"got shape {tuple(values.shape)}")
    if values.dtype.is_complex:
        raise SelectionError(f"{what}: expected real values, got {values.dtype}")
    return values.to(device=device, dtype=torch.float64 if values.dtype == torch.float64 else torch.float32)


def _as_binary_map(mask: ArrayLike, shape: tuple, what: str, device: torch.device) -> torch.Tensor:
    mask = torch.as_tensor(mask)
    if mask.ndim != 2 or tuple(mask.shape) != tuple(shape):
        raise SelectionError(f"{what}: expected an H x W mask of the masks' size {tuple(shape)}, "
                             f"got shape {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        if mask.dtype.is_floating_point or mask.dtype.is_complex:
            raise SelectionError(f"{what}: expected a bool (or 0/1 integer) mask, got {mask.dtype}")
        mask = mask != 0
    return mask.to(device)


def _check_runs(runs: Optional[torch.Tensor], masks: torch.Tensor) -> torch.Tensor:
    if runs is None:
        return mask_runs(masks)
    runs = torch.as_tensor(runs)
    if runs.ndim != 2 or runs.shape[1] != 4 or runs.dtype != torch.int64:
        raise SelectionError(f"runs: expected the R x 4 int64 tensor of mask_runs(masks), got shape "
                             f"{tuple(runs.shape)} {runs.dtype}")
    return runs.to(masks.device)


def _check_fraction(value: float, name: str) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise SelectionError(f"{name} must be in [0, 1], got {value}")
    return value


# ---------------------------------------------------------------------------------------------
# Runs: per-mask sums without dense passes
# ---------------------------------------------------------------------------------------------

def _rows_with_pixels(masks: torch.Tensor) -> torch.Tensor:
    """N x H bool: which rows of which masks hold a True pixel (reads the rows as 64-bit words
    when they are contiguous and their length is a multiple of 8: 8x fewer elements)."""
    n, h, w = masks.shape
    if masks.is_contiguous() and w % 8 == 0 and masks.storage_offset() % 8 == 0:
        return masks.view(torch.uint8).view(n, h, w // 8, 8).view(torch.int64).view(n, h, w // 8).any(2)
    return masks.any(2)


def mask_runs(masks: ArrayLike) -> torch.Tensor:
    """The horizontal runs of N x H x W bool masks: R x 4 int64 rows ``(mask, row, start, end)``.

    One row per maximal run of True pixels in a row of a mask, ``end`` exclusive, sorted by
    (mask, row, start). Every mask is exactly the union of its runs. One dense pass over the
    masks finds the rows holding pixels; only those rows are compared pixel by pixel.
    """
    masks = as_masks(masks)
    n, h, w = masks.shape
    if n == 0 or h == 0 or w == 0:
        return torch.zeros(0, 4, dtype=torch.int64, device=masks.device)
    mask_index, row_index = torch.nonzero(_rows_with_pixels(masks), as_tuple=True)
    rows = masks[mask_index, row_index]                                     # A x W, the rows with pixels
    # run boundaries: a start at column 0 where a row begins True, a boundary at column c + 1
    # wherever pixels c and c + 1 differ, an end at column w where a row ends True.
    changed, column = torch.nonzero(rows[:, 1:] != rows[:, :-1], as_tuple=True)
    first = torch.nonzero(rows[:, 0]).flatten()
    last = torch.nonzero(rows[:, -1]).flatten()
    row_id = torch.cat([first, changed, last])
    column = torch.cat([torch.zeros_like(first), column + 1, torch.full_like(last, w)])
    # in each row the sorted boundaries alternate start, end, start, end, ...
    order = torch.argsort(row_id * (w + 1) + column)
    row_id, column = row_id[order[0::2]], column[order]
    return torch.stack([mask_index[row_id], row_index[row_id], column[0::2], column[1::2]], 1)


def mask_areas(runs: torch.Tensor, num_masks: int) -> torch.Tensor:
    """Pixels of each mask from its runs: N int64."""
    areas = torch.zeros(num_masks, dtype=torch.int64, device=runs.device)
    return areas.index_add_(0, runs[:, 0], runs[:, 3] - runs[:, 2])


def masked_sums(runs: torch.Tensor, num_masks: int, values: torch.Tensor, *, what: str = "values") -> torch.Tensor:
    """Sum of the H x W map ``values`` under each mask, from its runs: N float64.

    Row-wise inclusive prefix sums (float64) of ``values`` differenced at each run's ends.
    A NaN or infinite value anywhere in ``values`` is an error naming ``what``.
    """
    h, w = values.shape
    prefix = values.to(torch.float64).cumsum(1)                              # H x W
    if not torch.isfinite(prefix[:, -1]).all():       # a row total is finite iff the whole row is
        raise SelectionError(f"{what}: holds NaN or infinite values")
    flat = prefix.view(-1)
    base = runs[:, 1] * w - 1
    before = torch.where(runs[:, 2] > 0, flat[(base + runs[:, 2]).clamp(min=0)], 0.0)
    sums = torch.zeros(num_masks, dtype=torch.float64, device=values.device)
    return sums.index_add_(0, runs[:, 0], flat[base + runs[:, 3]] - before)


def mask_extents(runs: torch.Tensor, num_masks: int) -> torch.Tensor:
    """Tight bounding boxes of the masks from their runs: N x 4 int64 ``(x1, y1, x2, y2)``,
    x2 / y2 exclusive (``mask[y1:y2, x1:x2]`` holds every True pixel); (0, 0, 0, 0) for an
    empty mask."""
    device = runs.device
    big = torch.iinfo(torch.int64).max
    x1 = torch.full((num_masks,), big, dtype=torch.int64, device=device)
    y1 = torch.full((num_masks,), big, dtype=torch.int64, device=device)
    x2 = torch.zeros(num_masks, dtype=torch.int64, device=device)
    y2 = torch.zeros(num_masks, dtype=torch.int64, device=device)
    index = runs[:, 0]
    x1.scatter_reduce_(0, index, runs[:, 2], reduce="amin")
    y1.scatter_reduce_(0, index, runs[:, 1], reduce="amin")
    x2.scatter_reduce_(0, index, runs[:, 3], reduce="amax")
    y2.scatter_reduce_(0, index, runs[:, 1] + 1, reduce="amax")
    extents = torch.stack([x1, y1, x2, y2], 1)
    extents[x1 == big] = 0
    return extents


def union_of(masks: ArrayLike, indices: ArrayLike, *, runs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The union of ``masks[indices]``: H x W bool (all False for no index). With ``runs``
    (:func:`mask_runs`) each mask is only read inside its bounding box."""
    masks = as_masks(masks)
    indices = torch.as_tensor(indices, dtype=torch.int64).reshape(-1).tolist()
    union = torch.zeros(masks.shape[1:], dtype=torch.bool, device=masks.device)
    if runs is None:
        for i in indices:
            union |= masks[i]
        return union
    extents = mask_extents(_check_runs(runs, masks), masks.shape[0])
    for i in indices:
        x1, y1, x2, y2 = extents[i].tolist()
        union[y1:y2, x1:x2] |= masks[i, y1:y2, x1:x2]
    return union


# ---------------------------------------------------------------------------------------------
# Point and box prompts (the ultralytics 8.4 rules, SPEC 1.2 / 4.5)
# ---------------------------------------------------------------------------------------------

def _pixel_coordinates(points: ArrayLike, height: int, width: int) -> torch.Tensor:
    """P x 2 (x, y) -> int64, truncated toward zero and clipped to the image."""
    points = torch.as_tensor(points)
    if points.ndim == 1 and points.numel() == 2:
        points = points[None]
    if points.ndim != 2 or points.shape[1] != 2 or points.shape[0] == 0:
        raise SelectionError(f"points: expected P x 2 (x, y) pixel coordinates with P >= 1, "
                             f"got shape {tuple(points.shape)}")
    if points.dtype.is_floating_point and not torch.isfinite(points).all():
        raise SelectionError("points: hold NaN or infinite values")
    coords = points.to(torch.int64, copy=True)                 # never the caller's tensor
    coords[:, 0].clamp_(0, width - 1)
    coords[:, 1].clamp_(0, height - 1)
    return coords


def select_by_points(masks: ArrayLike, points: ArrayLike, labels: Optional[ArrayLike] = None) -> torch.Tensor:
    """Point prompt, ultralytics 8.4 rule (SPEC 1.2 / 4.5): indices of the kept masks.

    masks: N x H x W bool; points: P x 2 (x, y) pixels (truncated, clipped to the image);
    labels: P values, 1 = foreground, 0 = background (default all 1).
    Keeps every mask that contains at least one foreground point and no background point; when
    every label is 0, every mask that contains no background point. Returns the kept indices,
    K int64 ascending (unmerged; :func:`union_of` merges them). Independent of the points' order.
    """
    masks = as_masks(masks)
    n, h, w = masks.shape
    coords = _pixel_coordinates(points, h, w).to(masks.device)
    if labels is None:
        labels = torch.ones(coords.shape[0], dtype=torch.int64, device=masks.device)
    labels = torch.as_tensor(labels).to(masks.device).reshape(-1)
    if labels.numel() != coords.shape[0]:
        raise SelectionError(f"labels: {labels.numel()} label(s) for {coords.shape[0]} point(s)")
    if not ((labels == 0) | (labels == 1)).all():
        raise SelectionError(f"labels: expected 1 (foreground) or 0 (background), got {labels.tolist()}")
    positive = labels == 1
    hits = masks[:, coords[:, 1], coords[:, 0]]                     # N x P: mask i contains point j
    keep = hits[:, positive].any(1) if positive.any() else torch.ones(n, dtype=torch.bool, device=masks.device)
    keep &= ~hits[:, ~positive].any(1)
    return torch.nonzero(keep).flatten()


def _pixel_boxes(boxes: ArrayLike, height: int, width: int) -> torch.Tensor:
    """B x 4 (x1, y1, x2, y2) -> int64, truncated toward zero and clipped to the image; a box
    with no pixel left is an error."""
    boxes = torch.as_tensor(boxes)
    if boxes.ndim == 1 and boxes.numel() == 4:
        boxes = boxes[None]
    if boxes.ndim != 2 or boxes.shape[1] != 4 or boxes.shape[0] == 0:
        raise SelectionError(f"boxes: expected B x 4 (x1, y1, x2, y2) pixel boxes with B >= 1, "
                             f"got shape {tuple(boxes.shape)}")
    if boxes.dtype.is_floating_point and not torch.isfinite(boxes).all():
        raise SelectionError("boxes: hold NaN or infinite values")
    pixel = boxes.to(torch.int64, copy=True)
    pixel[:, 0::2] = pixel[:, 0::2].clamp(0, width)
    pixel[:, 1::2] = pixel[:, 1::2].clamp(0, height)
    empty = (pixel[:, 2] <= pixel[:, 0]) | (pixel[:, 3] <= pixel[:, 1])
    if empty.any():
        b = int(torch.nonzero(empty)[0])
        raise SelectionError(f"boxes: box {b} {boxes[b].tolist()} (x1, y1, x2, y2) holds no pixel of the "
                             f"{width}x{height} image (width x height)")
    return pixel


def mask_box_iou(masks: ArrayLike, boxes: ArrayLike, *, runs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mask-vs-box IoU ``|m & B| / (|B| + |m| - |m & B|)`` in pixels: B x N float64.

    masks: N x H x W bool; boxes: B x 4 (x1, y1, x2, y2), x2 / y2 exclusive, truncated and
    clipped to the image (ultralytics' rounding); runs: ``mask_runs(masks)`` if already known.
    """
    masks = as_masks(masks)
    n, h, w = masks.shape
    pixel = _pixel_boxes(boxes, h, w).to(masks.device)
    runs = _check_runs(runs, masks)
    areas = mask_areas(runs, n)
    x1, y1, x2, y2 = (pixel[:, k:k + 1] for k in range(4))                  # B x 1 each
    rows = runs[:, 1][None]
    overlap = (torch.minimum(runs[:, 3][None], x2) - torch.maximum(runs[:, 2][None], x1)).clamp_(min=0)
    overlap *= (rows >= y1) & (rows < y2)                                   # B x R pixels of each run in the box
    inside = torch.zeros(pixel.shape[0], n, dtype=torch.int64, device=masks.device)
    inside.index_add_(1, runs[:, 0], overlap)
    box_areas = (x2 - x1) * (y2 - y1)
    return inside.double() / (box_areas + areas[None] - inside).double()   # union >= box area > 0


def select_by_box(masks: ArrayLike, boxes: ArrayLike, *, runs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Box prompt (SPEC 1.2, both implementations): per box the mask of highest
    :func:`mask_box_iou` (lowest index on ties, even when every IoU is 0); the indices of the
    selected masks, K int64 ascending, deduplicated. No mask (N = 0): no index."""
    masks = as_masks(masks)
    if masks.shape[0] == 0:
        _pixel_boxes(boxes, *masks.shape[1:])      # still reject bad boxes
        return torch.zeros(0, dtype=torch.int64, device=masks.device)
    iou = mask_box_iou(masks, boxes, runs=runs)
    return torch.unique(iou.argmax(1))


# ---------------------------------------------------------------------------------------------
# Mask prompt: refining a few-shot model's output (SPEC 5.2 (a))
# ---------------------------------------------------------------------------------------------

@dataclass
class MaskSelection:
    """The result of :func:`select_by_mask`.

    mask: H x W bool, the output (the union of ``masks[indices]``, or the model's own mask on
    fallback); indices: K int64 ascending, the kept proposals (empty on fallback);
    fallback: why the model's mask was returned -- ``""`` (it was not), ``"no proposals"``,
    ``"none kept"`` (no proposal reached the purity threshold) or ``"disagrees"`` (the IoU of
    the union with the model's mask is below ``guard_iou``); iou: that IoU (NaN when no union
    was formed); purity: N float64, the mean probability under each proposal (NaN for an
    empty proposal); selected: the indices the rule kept before the guard (= indices unless it
    fell back on "disagrees").
    """

    mask: torch.Tensor
    indices: torch.Tensor
    fallback: str
    iou: float
    purity: torch.Tensor
    selected: torch.Tensor


def select_by_mask(masks: ArrayLike, prob: ArrayLike, *, runs: Optional[torch.Tensor] = None,
                   model_mask: Optional[ArrayLike] = None, purity: float = 0.6, nested: float = 0.9,
                   guard_iou: float = 0.5, threshold: float = 0.5) -> MaskSelection:
    """Mask prompt (SPEC 5.2 (a)): the proposals that a few-shot model's foreground probability
    map covers, guarded by a fallback to the model's own mask.

    masks: N x H x W bool proposals; prob: H x W foreground probability of the model at the
    same size (SAM-RSP's final probability, or BAM's RSP); runs: ``mask_runs(masks)`` if known;
    model_mask: H x W bool, the model's own mask (default ``prob > threshold``; the Predictor's
    ``mask`` equals ``prob > 0.5``).

    1. purity(m) = mean of ``prob`` over m; keep m if purity >= ``purity`` (a mean equal to the
       threshold up to 1e-9 of float rounding is kept);
    2. visit the kept masks largest first (lower index first on equal areas) and skip a mask
       whose pixels are already >= ``nested`` covered by the union of the masks taken before
       it (the nested part/whole masks NMS at iou 0.9 leaves; same 1e-9 tolerance);
    3. guard, like FSS-SAM's PRS check: if no mask is taken, or IoU(union, model_mask) <
       ``guard_iou``, return ``model_mask`` unchanged (a copy); else the union.
    """
    masks = as_masks(masks)
    n, h, w = masks.shape
    device = masks.device
    prob = _as_map(prob, (h, w), "prob", device)
    purity_threshold = _check_fraction(purity, "purity")
    nested = _check_fraction(nested, "nested")
    guard_iou = _check_fraction(guard_iou, "guard_iou")
    threshold = _check_fraction(threshold, "threshold")
    reference = (prob > threshold) if model_mask is None else _as_binary_map(model_mask, (h, w), "model_mask", device)
    empty = torch.zeros(0, dtype=torch.int64, device=device)

    def fallback(reason: str, purities: torch.Tensor, selected: torch.Tensor = empty,
                 iou: float = math.nan) -> MaskSelection:
        return MaskSelection(mask=reference.clone(), indices=empty, fallback=reason, iou=iou, purity=purities,
                             selected=selected)

    if n == 0:
        return fallback("no proposals", torch.zeros(0, dtype=torch.float64, device=device))
    runs = _check_runs(runs, masks)
    areas = mask_areas(runs, n)
    sums = masked_sums(runs, n, prob, what="prob")
    purities = sums / areas.double()                                          # NaN for an empty mask
    candidate = (areas > 0) & (sums >= (purity_threshold - _TOLERANCE) * areas.double())
    if not candidate.any():
        return fallback("none kept", purities)
    index = torch.nonzero(candidate).flatten()
    # largest first; torch.sort is stable, so equal areas keep the lower index first
    order = index[torch.sort(areas[index], descending=True, stable=True).indices]
    extents = mask_extents(runs, n)
    union = torch.zeros(h, w, dtype=torch.bool, device=device)
    taken = []
    for i, (x1, y1, x2, y2), area in zip(order.tolist(), extents[order].tolist(), areas[order].tolist()):
        crop = masks[i, y1:y2, x1:x2]
        window = union[y1:y2, x1:x2]
        if int(torch.count_nonzero(window & crop)) >= (nested - _TOLERANCE) * area:
            continue
        window |= crop
        taken.append(i)
    selected = torch.tensor(sorted(taken), dtype=torch.int64, device=device)
    intersection = int(torch.count_nonzero(union & reference))
    iou = intersection / max(int(torch.count_nonzero(union | reference)), 1)
    if iou < guard_iou:
        return fallback("disagrees", purities, selected, iou)
    return MaskSelection(mask=union, indices=selected, fallback="", iou=iou, purity=purities, selected=selected)


# ---------------------------------------------------------------------------------------------
# The training-free baseline (SPEC 5.2 (c)): proposals scored by a similarity map
# ---------------------------------------------------------------------------------------------

def score_by_similarity(masks: ArrayLike, similarity: ArrayLike, *,
                        runs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean of ``similarity`` (H x W, e.g. the cosine similarity of the query's features to the
    support prototype, upsampled to the image) inside each proposal: N float64 (-inf for an
    empty proposal)."""
    masks = as_masks(masks)
    n, h, w = masks.shape
    similarity = _as_map(similarity, (h, w), "similarity", masks.device)
    if n == 0:
        return torch.zeros(0, dtype=torch.float64, device=masks.device)
    runs = _check_runs(runs, masks)
    areas = mask_areas(runs, n)
    scores = masked_sums(runs, n, similarity, what="similarity") / areas.clamp(min=1).double()
    scores[areas == 0] = -math.inf
    return scores


@dataclass
class SimilaritySelection:
    """The result of :func:`select_by_similarity`: mask (H x W bool, the union of the kept
    proposals), indices (K int64 ascending), scores (N float64, :func:`score_by_similarity`)."""

    mask: torch.Tensor
    indices: torch.Tensor
    scores: torch.Tensor


def select_by_similarity(masks: ArrayLike, similarity: ArrayLike, *, delta: Optional[float] = 0.0,
                         tau: Optional[float] = None, runs: Optional[torch.Tensor] = None) -> SimilaritySelection:
    """The training-free baseline's selection (SPEC 5.2 (c), step 4), one of two rules:

    * relative (``delta``, default 0): keep the proposals whose score >= max score - delta;
      delta = 0 keeps the argmax (and exact ties);
    * absolute (``tau``, with ``delta=None``): keep the proposals whose score >= tau.

    Scores are :func:`score_by_similarity`; empty proposals are never kept. Returns the union of
    the kept proposals (all False when none: no proposal, or none above ``tau``).
    """
    if (delta is None) == (tau is None):
        raise SelectionError("select_by_similarity: give exactly one rule, delta= (relative to the best score) "
                             "or tau= (absolute) with delta=None")
    if delta is not None and not (math.isfinite(delta) and delta >= 0):
        raise SelectionError(f"delta must be a finite number >= 0, got {delta}")
    if tau is not None and not math.isfinite(tau):
        raise SelectionError(f"tau must be finite, got {tau}")
    masks = as_masks(masks)
    runs = None if masks.shape[0] == 0 else _check_runs(runs, masks)
    scores = score_by_similarity(masks, similarity, runs=runs)
    valid = torch.isfinite(scores)
    if not valid.any():
        keep = valid
    elif delta is not None:
        keep = valid & (scores >= scores[valid].max() - delta)
    else:
        keep = valid & (scores >= tau)
    indices = torch.nonzero(keep).flatten()
    return SimilaritySelection(mask=union_of(masks, indices, runs=runs), indices=indices, scores=scores)


# ---------------------------------------------------------------------------------------------
# Prompts derived from a probability map (SPEC 5.2 (a), interactive modes)
# ---------------------------------------------------------------------------------------------

def prompts_from_prob(prob: ArrayLike, *, threshold: float = 0.5) -> Dict[str, torch.Tensor]:
    """Point and box prompts from an H x W probability map:

    * ``positive``: (x, y) of the maximum (PerSAM's top-1 point), ``negative``: of the minimum
      (its last-1); the first in row-major order on ties; int64 2 each;
    * ``box``: (x1, y1, x2, y2) of {prob > threshold}, x2 / y2 exclusive (FSS-SAM's box), int64
      4, or None when no pixel is above the threshold;
    * ``centroids``: C x 2 float64 (x, y), the centroid of each 8-connected component of
      {prob > threshold} (FSS-SAM's centroid points), in OpenCV's label order (top to bottom).
    Feed them to :func:`select_by_points` (labels 1 for ``positive`` / ``centroids``, 0 for
    ``negative``) and :func:`select_by_box`.
    """
    import cv2  # a project dependency (opencv-python-headless)

    threshold = _check_fraction(threshold, "threshold")
    prob = torch.as_tensor(prob)
    if prob.ndim != 2 or prob.numel() == 0:
        raise SelectionError(f"prob: expected a non-empty H x W map, got shape {tuple(prob.shape)}")
    prob = _as_map(prob, tuple(prob.shape), "prob", torch.device("cpu"))
    if not torch.isfinite(prob).all():
        raise SelectionError("prob: holds NaN or infinite values")
    h, w = prob.shape
    top, bottom = int(prob.argmax()), int(prob.argmin())
    foreground = prob > threshold
    box = None
    if foreground.any():
        rows = torch.nonzero(foreground.any(1)).flatten()
        cols = torch.nonzero(foreground.any(0)).flatten()
        box = torch.tensor([int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1], dtype=torch.int64)
    count, _, _, centres = cv2.connectedComponentsWithStats(foreground.numpy().astype(np.uint8), connectivity=8)
    return {"positive": torch.tensor([top % w, top // w], dtype=torch.int64),
            "negative": torch.tensor([bottom % w, bottom // w], dtype=torch.int64),
            "box": box,
            "centroids": torch.as_tensor(np.asarray(centres[1:count], dtype=np.float64)).reshape(-1, 2)}
