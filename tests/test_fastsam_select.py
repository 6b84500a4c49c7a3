"""model.fastsam_select: the FastSAM selection rules on hand-made masks (SPEC_FASTSAM 4.5 / 5.4).

Pure torch, no ultralytics: the parity of the point / box rules with ultralytics' own
``FastSAMPredictor.prompt`` is checked in tests/test_fastsam.py when the extra is installed.
"""
from __future__ import annotations

import itertools
import sys

import numpy as np
import pytest
import torch

from model.fastsam_select import (SelectionError, as_masks, mask_areas, mask_box_iou, mask_extents, mask_runs,
                                  masked_sums, prompts_from_prob, score_by_similarity, select_by_box,
                                  select_by_mask, select_by_points, select_by_similarity, union_of)

A, B, C, D = 0, 1, 2, 3


def spec_masks() -> torch.Tensor:
    """SPEC_FASTSAM 4.5: 100 x 100; A = [10:90, 10:90]; B = [20:50, 20:50] and C = [40:70, 40:70]
    inside A, overlapping in 100 px; D = the strip [0:10, 0:100] (slices are [rows, columns])."""
    masks = torch.zeros(4, 100, 100, dtype=torch.bool)
    masks[A, 10:90, 10:90] = True
    masks[B, 20:50, 20:50] = True
    masks[C, 40:70, 40:70] = True
    masks[D, 0:10, :] = True
    return masks


def ids(indices: torch.Tensor) -> list:
    return sorted(indices.tolist())


def random_masks(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Rectangles, discs and noise: runs of every kind (touching both borders, empty masks)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    masks = torch.zeros(n, h, w, dtype=torch.bool)
    for i in range(n):
        kind = i % 4
        if kind == 0:
            y1, x1 = torch.randint(0, h, (1,), generator=g).item(), torch.randint(0, w, (1,), generator=g).item()
            masks[i, y1:y1 + torch.randint(1, h, (1,), generator=g).item(),
                  x1:x1 + torch.randint(1, w, (1,), generator=g).item()] = True
        elif kind == 1:
            cy, cx = torch.randint(0, h, (1,), generator=g).item(), torch.randint(0, w, (1,), generator=g).item()
            r = torch.randint(1, max(h, w), (1,), generator=g).item()
            masks[i] = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        elif kind == 2:
            masks[i] = torch.rand(h, w, generator=g) > 0.5
        # kind 3: empty
    return masks


# ---------------------------------------------------------------------------------------------
# Points: the ultralytics 8.4 rule, SPEC 4.5's table
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("points, labels, expected", [
    ([[30, 30]], [1], [A, B]),
    ([[60, 60]], [1], [A, C]),
    ([[30, 30], [60, 60]], [1, 0], [B]),
    ([[60, 60], [30, 30]], [0, 1], [B]),                 # same points, swapped: the original gave A - C
    ([[30, 30], [50, 5]], [1, 1], [A, B, D]),
    ([[60, 60]], [0], [B, D]),                           # only negatives: every mask without the point
])
def test_points_spec_table(points, labels, expected):
    assert ids(select_by_points(spec_masks(), points, labels)) == expected


def test_points_defaults_truncation_and_clipping():
    masks = spec_masks()
    assert ids(select_by_points(masks, [[30, 30]])) == [A, B]                 # labels default to 1
    assert ids(select_by_points(masks, [30.9, 30.2])) == [A, B]               # one point, truncated
    assert ids(select_by_points(masks, [[19.99, 30]])) == [A]                 # x 19 is outside B
    assert ids(select_by_points(masks, [[250, -7]])) == [D]                   # clipped to (99, 0)
    assert ids(select_by_points(masks, np.array([[95, 95]]))) == []           # no mask there
    assert ids(select_by_points(masks[:0], [[1, 1]])) == []                   # no proposal


def test_points_order_independent():
    masks = random_masks(24, 40, 50, seed=3)
    g = torch.Generator().manual_seed(7)
    for trial in range(20):
        count = 1 + trial % 5
        points = torch.stack([torch.randint(0, 50, (count,), generator=g),
                              torch.randint(0, 40, (count,), generator=g)], 1)
        labels = torch.randint(0, 2, (count,), generator=g)
        reference = ids(select_by_points(masks, points, labels))
        # the rule, written out pixel by pixel
        hits = [[bool(masks[i, y, x]) for x, y in points.tolist()] for i in range(len(masks))]
        pos = [j for j in range(count) if labels[j] == 1]
        neg = [j for j in range(count) if labels[j] == 0]
        expected = [i for i in range(len(masks))
                    if (any(hits[i][j] for j in pos) if pos else True) and not any(hits[i][j] for j in neg)]
        assert reference == expected
        for perm in itertools.islice(itertools.permutations(range(count)), 24):
            perm = list(perm)
            assert ids(select_by_points(masks, points[perm], labels[perm])) == reference


def test_points_bad_inputs():
    masks = spec_masks()
    with pytest.raises(SelectionError, match="points"):
        select_by_points(masks, torch.zeros(0, 2))
    with pytest.raises(SelectionError, match="points"):
        select_by_points(masks, [[1, 2, 3]])
    with pytest.raises(SelectionError, match="labels"):
        select_by_points(masks, [[1, 2]], [1, 0])
    with pytest.raises(SelectionError, match="labels"):
        select_by_points(masks, [[1, 2]], [2])
    with pytest.raises(SelectionError, match="NaN"):
        select_by_points(masks, [[float("nan"), 2]])
    with pytest.raises(SelectionError, match="masks"):
        select_by_points(masks[0], [[1, 2]])


# ---------------------------------------------------------------------------------------------
# Boxes: mask-vs-box IoU argmax
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("box, expected", [
    ([15, 15, 55, 55], [B]), ([0, 0, 100, 100], [A]), ([35, 35, 75, 75], [C]), ([0, 0, 100, 12], [D]),
])
def test_box_spec_table(box, expected):
    assert ids(select_by_box(spec_masks(), [box])) == expected


def test_box_several_boxes_union_dedup_and_iou_values():
    masks = spec_masks()
    assert ids(select_by_box(masks, [[15, 15, 55, 55], [0, 0, 100, 12], [16, 16, 54, 54]])) == [B, D]
    iou = mask_box_iou(masks, [[15, 15, 55, 55]])
    # B: 900 / 1600; A: 1600 / 6400; C: 225 / (1600 + 900 - 225); D: 0
    assert torch.allclose(iou, torch.tensor([[1600 / 6400, 900 / 1600, 225 / 2275, 0.0]], dtype=torch.float64))
    # float boxes are truncated, out-of-image boxes clipped (ultralytics' rounding)
    assert torch.equal(mask_box_iou(masks, [[15.7, 15.2, 55.9, 55.1]]), iou)
    assert ids(select_by_box(masks, [[-50, -50, 500, 12]])) == [D]
    # no overlap anywhere: the argmax of all-zero IoUs is the first mask, as in ultralytics
    only_b = masks[[B, C]]
    assert ids(select_by_box(only_b, [[80, 80, 100, 100]])) == [0]
    assert ids(select_by_box(masks[:0], [[0, 0, 10, 10]])) == []


def test_box_bad_inputs():
    with pytest.raises(SelectionError, match="holds no pixel"):
        select_by_box(spec_masks(), [[10, 10, 10, 50]])
    with pytest.raises(SelectionError, match="holds no pixel"):
        select_by_box(spec_masks(), [[200, 200, 300, 300]])
    with pytest.raises(SelectionError, match="boxes"):
        select_by_box(spec_masks(), [[1, 2, 3]])


def test_box_iou_matches_dense_definition():
    masks = random_masks(16, 33, 47, seed=1)
    boxes = torch.tensor([[0, 0, 47, 33], [5, 3, 20, 30], [40, 0, 47, 5], [10, 10, 11, 11]])
    iou = mask_box_iou(masks, boxes)
    for b, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        inside = masks[:, y1:y2, x1:x2].sum((1, 2)).double()
        expected = inside / ((x2 - x1) * (y2 - y1) + masks.sum((1, 2)) - inside)
        assert torch.allclose(iou[b], expected)


# ---------------------------------------------------------------------------------------------
# Runs: exact per-mask sums
# ---------------------------------------------------------------------------------------------

def test_runs_reconstruct_masks_and_sums():
    masks = random_masks(20, 31, 40, seed=0)
    runs = mask_runs(masks)
    painted = torch.zeros_like(masks)
    for i, r, s, e in runs.tolist():
        assert e > s and not painted[i, r, s:e].any()
        painted[i, r, s:e] = True
    assert torch.equal(painted, masks)
    assert torch.equal(runs, runs[torch.argsort((runs[:, 0] * 31 + runs[:, 1]) * 41 + runs[:, 2])])   # sorted
    assert torch.equal(mask_areas(runs, 20), masks.sum((1, 2)))
    values = torch.rand(31, 40, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(masked_sums(runs, 20, values), (masks.double() * values.double()).sum((1, 2)))
    extents = mask_extents(runs, 20)
    for i in range(20):
        if masks[i].any():
            rows, cols = torch.nonzero(masks[i].any(1)).flatten(), torch.nonzero(masks[i].any(0)).flatten()
            assert extents[i].tolist() == [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]
        else:
            assert extents[i].tolist() == [0, 0, 0, 0]
    # the word-wise row scan and the plain one agree (width not a multiple of 8, non-contiguous)
    assert torch.equal(mask_runs(masks[:, :, :37]), mask_runs(masks[:, :, :37].contiguous()))
    assert torch.equal(mask_runs(masks.transpose(1, 2)), mask_runs(masks.transpose(1, 2).contiguous()))
    assert mask_runs(masks[:0]).shape == (0, 4)


def test_inputs_accept_numpy_and_integer_masks():
    masks = spec_masks()
    assert torch.equal(as_masks(masks.numpy().astype(np.uint8)), masks)
    assert ids(select_by_points(masks.numpy(), [[30, 30]])) == [A, B]
    with pytest.raises(SelectionError, match="bool"):
        as_masks(masks.float())
    assert torch.equal(union_of(masks, [B, C]), masks[B] | masks[C])
    assert torch.equal(union_of(masks, [B, C], runs=mask_runs(masks)), masks[B] | masks[C])
    assert not union_of(masks, []).any()


# ---------------------------------------------------------------------------------------------
# Mask prompt: refinement with a fallback (SPEC 5.2 (a), 5.4.2)
# ---------------------------------------------------------------------------------------------

def prob_on(*regions) -> torch.Tensor:
    prob = torch.zeros(100, 100)
    for region in regions:
        prob[region] = 1.0
    return prob


def test_mask_prompt_selects_the_covered_instance():
    masks = spec_masks()
    result = select_by_mask(masks, prob_on((slice(20, 50), slice(20, 50))))
    assert result.fallback == "" and ids(result.indices) == [B] and result.iou == 1.0
    assert torch.equal(result.mask, masks[B])
    assert torch.allclose(result.purity, torch.tensor([900 / 6400, 1.0, 100 / 900, 0.0], dtype=torch.float64))


def test_mask_prompt_skips_nested_masks():
    masks = spec_masks()
    result = select_by_mask(masks, prob_on((slice(10, 90), slice(10, 90))))
    assert ids(result.indices) == [A] and torch.equal(result.mask, masks[A])    # B, C inside A: skipped
    result = select_by_mask(masks, prob_on((slice(10, 90), slice(10, 90)), (slice(0, 10), slice(None))))
    assert ids(result.indices) == [A, D]
    # B and C overlap by 100 of their 900 px: both taken
    result = select_by_mask(masks, prob_on((slice(20, 50), slice(20, 50)), (slice(40, 70), slice(40, 70))))
    assert ids(result.indices) == [B, C] and torch.equal(result.mask, masks[B] | masks[C])


def test_mask_prompt_nested_threshold_boundary():
    masks = torch.zeros(2, 10, 60, dtype=torch.bool)
    masks[0, :, 0:50] = True           # 500 px, visited first
    masks[1, :, 41:51] = True          # 100 px, 90 of them inside mask 0
    prob = torch.ones(10, 60)
    assert ids(select_by_mask(masks, prob, nested=0.9, guard_iou=0.0).indices) == [0]      # 90 % >= 0.9: skipped
    assert ids(select_by_mask(masks, prob, nested=0.95, guard_iou=0.0).indices) == [0, 1]
    # equal areas: the lower index is visited first
    twins = torch.stack([masks[1], masks[1]])
    assert ids(select_by_mask(twins, prob, guard_iou=0.0).indices) == [0]


def test_mask_prompt_fallbacks_return_the_model_mask_exactly():
    masks = spec_masks()
    # no instance under the probability: the model's mask (prob > 0.5) unchanged
    prob = prob_on((slice(92, 100), slice(92, 100)))
    result = select_by_mask(masks, prob)
    assert result.fallback == "none kept" and ids(result.indices) == []
    assert torch.equal(result.mask, prob > 0.5)
    # zero proposals: exactly the given model mask, even when it is not prob > 0.5
    model_mask = torch.rand(100, 100, generator=torch.Generator().manual_seed(0)) > 0.7
    result = select_by_mask(masks[:0], prob, model_mask=model_mask)
    assert result.fallback == "no proposals" and torch.equal(result.mask, model_mask)
    assert result.mask is not model_mask                              # a copy
    result = select_by_mask(masks[:0], prob, model_mask=model_mask.numpy())
    assert torch.equal(result.mask, model_mask)
    # a selection that disagrees with the model's mask: the guard
    result = select_by_mask(masks, prob_on((slice(20, 50), slice(20, 50))), model_mask=masks[D], guard_iou=0.5)
    assert result.fallback == "disagrees" and result.iou == 0.0 and torch.equal(result.mask, masks[D])
    assert ids(result.selected) == [B] and ids(result.indices) == []


def test_mask_prompt_purity_and_guard_boundaries():
    masks = spec_masks()
    prob = torch.zeros(100, 100)
    prob[20:50, 20:35] = 1.0           # B's left half
    prob[20:50, 35:50] = 0.5           # B's right half: B's mean is exactly 0.75
    result = select_by_mask(masks, prob, purity=0.75, guard_iou=0.0)
    assert ids(result.indices) == [B] and result.purity[B] == 0.75
    assert select_by_mask(masks, prob, purity=0.76).fallback == "none kept"
    # the union is B (900 px), the model's mask prob > 0.5 its left half (450 px): IoU exactly 0.5
    at = select_by_mask(masks, prob, purity=0.75, guard_iou=0.5)
    assert at.fallback == "" and at.iou == 0.5 and torch.equal(at.mask, masks[B])
    above = select_by_mask(masks, prob, purity=0.75, guard_iou=0.51)
    assert above.fallback == "disagrees" and torch.equal(above.mask, prob > 0.5)
    # float64 maps whose mean equals the threshold only up to rounding still reach it
    prob64 = torch.zeros(100, 100, dtype=torch.float64)
    prob64[20:50, 20:50] = 0.6
    assert ids(select_by_mask(masks, prob64, purity=0.6, guard_iou=0.0).indices) == [B]


def test_mask_prompt_random_selection_is_a_subset_or_the_fallback():
    masks = random_masks(30, 48, 64, seed=5)
    g = torch.Generator().manual_seed(1)
    for _ in range(10):
        prob = torch.rand(48, 64, generator=g) * torch.rand(1, generator=g)
        result = select_by_mask(masks, prob, purity=0.3, guard_iou=0.2)
        if result.fallback:
            assert torch.equal(result.mask, prob > 0.5) and result.indices.numel() == 0
        else:
            assert set(result.indices.tolist()) <= set(range(30))
            assert torch.equal(result.mask, union_of(masks, result.indices))
        assert torch.equal(select_by_mask(masks, prob, purity=0.3, guard_iou=0.2,
                                          runs=mask_runs(masks)).mask, result.mask)


def test_mask_prompt_bad_inputs():
    masks = spec_masks()
    with pytest.raises(SelectionError, match="prob"):
        select_by_mask(masks, torch.zeros(50, 50))
    with pytest.raises(SelectionError, match="prob: holds NaN"):
        select_by_mask(masks, torch.full((100, 100), float("nan")))
    with pytest.raises(SelectionError, match="purity"):
        select_by_mask(masks, torch.zeros(100, 100), purity=1.5)
    with pytest.raises(SelectionError, match="model_mask"):
        select_by_mask(masks, torch.zeros(100, 100), model_mask=torch.zeros(10, 10, dtype=torch.bool))
    with pytest.raises(SelectionError, match="runs"):
        select_by_mask(masks, torch.zeros(100, 100), runs=torch.zeros(3, 3))


# ---------------------------------------------------------------------------------------------
# The training-free baseline (SPEC 5.2 (c))
# ---------------------------------------------------------------------------------------------

def test_similarity_scores_and_rules():
    masks = spec_masks()
    similarity = prob_on((slice(20, 50), slice(20, 50)))              # 1 on B
    scores = score_by_similarity(masks, similarity)
    assert torch.allclose(scores, torch.tensor([900 / 6400, 1.0, 100 / 900, 0.0], dtype=torch.float64))
    best = select_by_similarity(masks, similarity)                    # delta = 0: the argmax
    assert ids(best.indices) == [B] and torch.equal(best.mask, masks[B])
    assert ids(select_by_similarity(masks, similarity, delta=0.9).indices) == [A, B, C]   # >= 0.1
    assert ids(select_by_similarity(masks, similarity, delta=None, tau=0.12).indices) == [A, B]
    none = select_by_similarity(masks, similarity, delta=None, tau=1.5)
    assert ids(none.indices) == [] and not none.mask.any()
    # cosine similarities may be negative
    assert ids(select_by_similarity(masks, similarity - 1.0, delta=None, tau=-0.1).indices) == [B]


def test_similarity_empty_cases_and_errors():
    masks = spec_masks()
    similarity = torch.zeros(100, 100)
    empty = select_by_similarity(masks[:0], similarity)
    assert empty.indices.numel() == 0 and not empty.mask.any() and empty.mask.shape == (100, 100)
    with_empty = torch.cat([masks, torch.zeros(1, 100, 100, dtype=torch.bool)])
    scores = score_by_similarity(with_empty, similarity)
    assert scores[-1] == float("-inf")
    assert 4 not in select_by_similarity(with_empty, similarity, delta=10.0).indices.tolist()
    assert ids(select_by_similarity(torch.zeros(2, 100, 100, dtype=torch.bool), similarity).indices) == []
    with pytest.raises(SelectionError, match="exactly one rule"):
        select_by_similarity(masks, similarity, delta=0.1, tau=0.5)
    with pytest.raises(SelectionError, match="exactly one rule"):
        select_by_similarity(masks, similarity, delta=None)
    with pytest.raises(SelectionError, match="similarity"):
        select_by_similarity(masks, torch.zeros(3, 3))


# ---------------------------------------------------------------------------------------------
# Prompts from a probability map
# ---------------------------------------------------------------------------------------------

def test_prompts_from_prob_two_blobs():
    prob = torch.full((80, 100), 0.2)
    prob[10:20, 10:30] = 0.9
    prob[50:60, 60:80] = 0.8
    prob[12, 15] = 1.0
    prob[3, 7] = 0.0
    prompts = prompts_from_prob(prob)
    assert prompts["positive"].tolist() == [15, 12] and prompts["negative"].tolist() == [7, 3]
    assert prompts["box"].tolist() == [10, 10, 80, 60]
    assert torch.allclose(prompts["centroids"], torch.tensor([[19.5, 14.5], [69.5, 54.5]], dtype=torch.float64))
    # usable as prompts
    masks = torch.zeros(2, 80, 100, dtype=torch.bool)
    masks[0, 10:20, 10:30] = True
    masks[1, 50:60, 60:80] = True
    assert ids(select_by_points(masks, prompts["centroids"])) == [0, 1]
    assert ids(select_by_points(masks, torch.stack([prompts["positive"], prompts["negative"]]), [1, 0])) == [0]
    nothing = prompts_from_prob(torch.zeros(8, 8))
    assert nothing["box"] is None and nothing["centroids"].shape == (0, 2)


def test_no_ultralytics_import():
    """This module is plain torch: importing and using it never loads ultralytics."""
    import subprocess
    code = ("import sys; import model.fastsam_select as s, torch; "
            "s.select_by_mask(torch.ones(1, 4, 4, dtype=torch.bool), torch.ones(4, 4)); "
            "assert 'ultralytics' not in sys.modules, 'ultralytics imported'")
    from tests.conftest import ROOT
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_inputs_are_not_modified():
    masks = spec_masks()
    points = torch.tensor([[250, -7], [30, 30]])
    boxes = torch.tensor([[-50, -50, 500, 12]])
    select_by_points(masks, points, torch.tensor([1, 1]))
    select_by_box(masks, boxes)
    assert points.tolist() == [[250, -7], [30, 30]] and boxes.tolist() == [[-50, -50, 500, 12]]
