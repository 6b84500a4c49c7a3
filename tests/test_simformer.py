"""SimFormer unit tests (SPEC_SIMFORMER 3-6, 8, 10, 14 "without the original code").

Every loss formula is checked on tiny tensors against values computed independently here (plain
numpy loops, not the functions under test); the matcher on hand-made cost matrices and on a
hand-computed cost; then a tiny SimFormer (torchvision ResNet-50 with one bottleneck per stage,
frozen BN) runs a full forward/backward on CPU with every default switch and with the original's.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from model.maskformer import FrozenBNResNet, MaskFormerHead, detectron2_backbone_key  # noqa: E402
from model.simformer import (SimFormer, SimNet, build_simformer, gather_points, novel_score_map,  # noqa: E402
                             optimizer_param_groups, pair_grid, preprocess_images, semantic_inference)
from model.simformer_criterion import (HungarianMatcher, SimFormerCriterion, batch_dice_cost,  # noqa: E402
                                       batch_sigmoid_focal_cost, build_pair_index, complementary_loss, dice_loss,
                                       distillation_loss, draw_partner, sample_points, sigmoid_focal_loss,
                                       similarity_loss)


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def np_focal(x, t, alpha=0.25, gamma=2.0):
    """Focal loss of one pixel, written out."""
    p = sig(x)
    ce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
    p_t = p * t + (1 - p) * (1 - t)
    a_t = alpha * t + (1 - alpha) * (1 - t)
    return a_t * (1 - p_t) ** gamma * ce


def np_dice(xs, ts):
    s = [sig(x) for x in xs]
    return 1 - (2 * sum(a * b for a, b in zip(s, ts)) + 1) / (sum(s) + sum(ts) + 1)


# ------------------------------------------------------------------------------------------ formulas

def test_focal_and_dice_on_2x2_masks():
    logits = [[0.5, -1.0, 2.0, 0.0], [-3.0, 1.5, 0.25, -0.5]]          # two 2x2 masks, flattened
    targets = [[1, 0, 1, 0], [0, 0, 1, 1]]
    num_masks = 1.5
    exp_focal = sum(np.mean([np_focal(x, t) for x, t in zip(xs, ts)]) for xs, ts in zip(logits, targets)) / num_masks
    exp_dice = sum(np_dice(xs, ts) for xs, ts in zip(logits, targets)) / num_masks
    x, t = torch.tensor(logits, dtype=torch.float64), torch.tensor(targets, dtype=torch.float64)
    assert sigmoid_focal_loss(x, t, num_masks).item() == pytest.approx(exp_focal, rel=1e-12)
    assert dice_loss(x, t, num_masks).item() == pytest.approx(exp_dice, rel=1e-12)


def test_batch_costs_match_loops():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64)       # 2 layers, 3 queries, 5 pixels
    t = (torch.rand(2, 5, generator=gen) > 0.5).double()                # 2 targets
    focal, dice = batch_sigmoid_focal_cost(x, t), batch_dice_cost(x, t)
    for layer in range(2):
        for q in range(3):
            for m in range(2):
                xs, ts = x[layer, q].tolist(), t[m].tolist()
                f = 0.0
                for xi, ti in zip(xs, ts):
                    p = sig(xi)
                    f += 0.25 * (1 - p) ** 2 * -math.log(p) * ti + 0.75 * p ** 2 * -math.log(1 - p) * (1 - ti)
                assert focal[layer, q, m].item() == pytest.approx(f / 5, rel=1e-10)
                assert dice[layer, q, m].item() == pytest.approx(np_dice(xs, ts), rel=1e-10)


def test_complementary_loss_and_its_floor():
    tau = -2.9444
    rows = torch.tensor([[1.0, -4.0, -5.0, 0.5], [-1.0, 2.0, -3.5, 0.7]], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    loss = complementary_loss(rows, torch.tensor(tau, dtype=torch.float64), target)
    m = [1.0, 2.0, tau, 0.7]                                            # pixel-wise max with the floor
    expected = 20 * np.mean([np_focal(a, b) for a, b in zip(m, target.tolist())]) + np_dice(m, target.tolist())
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert tau == pytest.approx(math.log(0.05 / 0.95), abs=1e-4)
    loss.backward()
    grad = rows.grad
    assert grad[0, 2] == 0 and grad[1, 2] == 0                          # every novel logit below the floor
    assert grad[1, 0] == 0 and grad[0, 0] != 0                          # only the arg-max row learns
    assert grad[0, 1] == 0 and grad[1, 1] != 0


@pytest.mark.parametrize("func", ["cce", "ce"])
def test_distillation_loss_values(func):
    ts = [0.2, 0.5, 0.8]
    ss = [0.1, 0.6, 0.95]
    expected = []
    for t in ts:
        for s in ss:
            if func == "cce":
                expected.append(-max(t - 0.5, 0) * math.log(1 + s) - max(0.5 - t, 0) * math.log(2 - s))
            else:
                tc, sc = min(max(t, 0.01), 0.99), min(max(s, 0.01), 0.99)
                expected.append(-tc * math.log(sc) - (1 - tc) * math.log(1 - sc))
    teacher = torch.tensor([[t] * 3 for t in ts], dtype=torch.float64)
    student = torch.tensor([ss] * 3, dtype=torch.float64)
    assert distillation_loss(teacher, student, func).item() == pytest.approx(np.mean(expected), rel=1e-12)
    if func == "cce":   # t = 1/2 contributes nothing; the loss is never positive
        assert distillation_loss(torch.full((3,), 0.5), torch.tensor([0.1, 0.5, 0.9]), "cce").item() == 0
        assert distillation_loss(teacher, student, "cce").item() <= 0


def test_similarity_loss_matches_loops():
    sim = torch.tensor([[0.9, 0.2], [0.3, 0.6]], dtype=torch.float64)
    same = torch.tensor([[True, False], [True, False]])
    valid = torch.tensor([[True, True], [False, True]])
    w_neg, w_pos = 0.3, 0.7
    num, den = 0.0, 0
    for i in range(2):
        for j in range(2):
            if valid[i, j]:
                y, s = float(same[i, j]), sim[i, j].item()
                num += (w_pos if y else w_neg) * -(y * math.log(s) + (1 - y) * math.log(1 - s))
                den += 1
    assert similarity_loss(sim, same, valid, w_neg=w_neg, w_pos=w_pos).item() == pytest.approx(num / den, rel=1e-12)
    none = torch.zeros_like(valid)
    assert similarity_loss(sim, same, none, w_neg=w_neg, w_pos=w_pos).item() == 0


# ------------------------------------------------------------------------------------------ matcher

def test_matcher_on_a_hand_made_cost():
    cost = torch.tensor([[[1.0, 5.0], [2.0, 0.5], [0.1, 3.0]]])           # 1 layer, 3 queries x 2 columns
    order = torch.tensor([1, 0])                                          # column 0 is target 1, column 1 target 0
    for column_order, expected_tgt in (("original", [1, 0]), ("fixed", [0, 1])):
        matcher = HungarianMatcher(column_order=column_order)
        indices = matcher(torch.zeros(1, 1, 3, 4), torch.zeros(1, 1, 3, 2, 2), [None], costs=[(cost, order)])
        src, tgt = indices[0][0]
        assert src.tolist() == [1, 2]                                     # q2 -> column 0 (0.1), q1 -> column 1 (0.5)
        assert tgt.tolist() == expected_tgt


def _matcher_case():
    """2 queries, 3 targets on an 8 x 8 input (mask resolution 2 x 2): a big base mask, a
    3-pixel base stripe invisible on the 1/4 grid (rows/cols 0, 4) and a novel label."""
    logits = torch.tensor([[[[2.0, 0.0, -1.0, 0.5, 0.0], [0.0, 1.0, 2.0, 0.0, 0.3]]]])   # L=1,B=1,N=2,K+1=5
    masks = torch.tensor([[[[[1.0, -1.0], [0.5, 2.0]], [[-2.0, 0.0], [1.0, -0.5]]]]])   # L,B,N,2,2
    big = torch.zeros(8, 8, dtype=torch.bool)
    big[:, :4] = True                                                      # on the grid: (0,0), (4,0)
    stripe = torch.zeros(8, 8, dtype=torch.bool)
    stripe[1, 5:8] = True                                                  # no pixel at (4i, 4j)
    novel = torch.zeros(8, 8, dtype=torch.bool)
    target = {"labels": torch.tensor([0, 1, 3]), "masks": torch.stack([big, stripe, novel])}
    return logits, masks, target


def test_matcher_cost_formula_and_column_order():
    logits, masks, target = _matcher_case()
    cost, order = HungarianMatcher().cost_matrices(logits, masks, [target])[0]
    # the stripe vanishes at 1/4 resolution: columns = [big | stripe, novel] (here the target order)
    assert order.tolist() == [0, 1, 2]
    probs = logits[0, 0].softmax(-1)
    small_big = [1.0, 0.0, 1.0, 0.0]                                       # nearest 8x8 -> 2x2 of `big`
    for q in range(2):
        xs = masks[0, 0, q].flatten().tolist()
        f = np.mean([0.25 * (1 - sig(x)) ** 2 * -math.log(sig(x)) * t
                     + 0.75 * sig(x) ** 2 * -math.log(1 - sig(x)) * (1 - t) for x, t in zip(xs, small_big)])
        assert cost[0, q, 0].item() == pytest.approx(-probs[q, 0].item() + 20 * f + np_dice(xs, small_big), rel=1e-5)
        assert cost[0, q, 1].item() == pytest.approx(-probs[q, 1].item(), rel=1e-6)   # class cost only
        assert cost[0, q, 2].item() == pytest.approx(-probs[q, 3].item(), rel=1e-6)


def test_vanishing_mask_reorders_columns_and_the_fix_maps_them_back():
    logits, masks, target = _matcher_case()
    # put the vanishing stripe first so that the [mask | no-mask] order permutes the columns
    target = {"labels": target["labels"][[1, 0, 2]], "masks": target["masks"][[1, 0, 2]]}
    cost, order = HungarianMatcher().cost_matrices(logits, masks, [target])[0]
    assert order.tolist() == [1, 0, 2]
    logits3 = torch.cat([logits, logits[:, :, :1] - 5], 2)                  # 3 queries so every target is matched
    masks3 = torch.cat([masks, masks[:, :, :1]], 2)
    fixed = HungarianMatcher(column_order="fixed")(logits3, masks3, [target])[0][0]
    original = HungarianMatcher(column_order="original")(logits3, masks3, [target])[0][0]
    assert torch.equal(fixed[0], original[0])
    assert torch.equal(fixed[1], order[original[1]])
    labels = target["labels"]
    assert not torch.equal(labels[fixed[1]], labels[original[1]])          # the original swaps two labels


def test_novel_mask_cost_nan_switch():
    logits = torch.zeros(1, 1, 2, 3)
    masks = torch.full((1, 1, 2, 2, 2), -200.0)                             # sigmoid underflows to 0
    target = {"labels": torch.tensor([1]), "masks": torch.zeros(1, 8, 8, dtype=torch.bool)}
    original, _ = HungarianMatcher(novel_mask_cost="original").cost_matrices(logits, masks, [target])[0]
    fixed, _ = HungarianMatcher().cost_matrices(logits, masks, [target])[0]
    assert torch.isnan(original).all()                                      # 0 * inf
    assert torch.isfinite(fixed).all()
    assert fixed[0, :, 0].tolist() == pytest.approx([-1 / 3, -1 / 3])


# ------------------------------------------------------------------------------------------ helpers

def test_sample_points_inside_and_overflowing_regions():
    region = torch.zeros(2, 1, 4, 5)
    region[0, 0, 1:3, 1:4] = 1                                             # 6 pixels
    region[1, 0, 0, :2] = 1                                                # 2 pixels
    gen = torch.Generator().manual_seed(3)
    pts = sample_points(region, 4, generator=gen)
    rc = pts["rc"]
    assert rc.shape == (2, 4, 2)
    inside0 = region[0, 0][rc[0, :, 0], rc[0, :, 1]]
    assert inside0.eq(1).all() and len({tuple(p) for p in rc[0].tolist()}) == 4
    inside1 = region[1, 0][rc[1, :, 0], rc[1, :, 1]]
    assert inside1.tolist()[:2] == [1, 1] and inside1.tolist()[2:] == [0, 0]   # the region first, then outside
    assert torch.allclose(pts["xy"][..., 0], rc[..., 1].float() / 4 * 2 - 1)
    assert torch.allclose(pts["xy"][..., 1], rc[..., 0].float() / 3 * 2 - 1)
    again = sample_points(region, 4, noise=pts["noise"])                   # injected draw: same points
    assert torch.equal(again["rc"], rc)
    noise = pts["noise"].flatten(1)
    score = region.flatten(1) + 0.1 * noise
    assert torch.equal(pts["scores"][..., 0], score.topk(4, 1)[0])


def test_gather_pair_grid_and_novel_scores():
    maps = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
    rc = torch.tensor([[[0, 1], [1, 0]], [[1, 1], [0, 0]]])
    got = gather_points(maps, rc)
    for b in range(2):
        for k in range(2):
            assert got[b, :, k].tolist() == maps[b, :, rc[b, k, 0], rc[b, k, 1]].tolist()
    grid = pair_grid(got, got.flip(0))
    assert grid.shape == (2, 6, 2, 2)
    assert grid[0, :3, 1, 0].tolist() == got[0, :, 1].tolist()
    assert grid[0, 3:, 1, 0].tolist() == got[1, :, 0].tolist()
    gen = torch.Generator().manual_seed(1)
    logits, masks = torch.randn(1, 3, 5, generator=gen), torch.randn(1, 3, 2, 2, generator=gen)
    novel = torch.tensor([1, 3])
    scores = novel_score_map(logits, masks, novel)
    for n, c in enumerate(novel.tolist()):
        for i in range(2):
            for j in range(2):
                expected = sum(F.softmax(logits[0, q], 0)[c].item() * sig(masks[0, q, i, j].item()) for q in range(3))
                assert scores[0, n, i, j].item() == pytest.approx(expected, rel=1e-5)


def test_semantic_inference_without_resizing():
    gen = torch.Generator().manual_seed(2)
    logits, masks = torch.randn(4, 3, generator=gen), torch.randn(4, 2, 3, generator=gen)   # N=4, K=2
    scores = semantic_inference(logits, masks, padded_size=(2, 3), image_size=(2, 2), output_size=(2, 2))
    assert scores.shape == (2, 2, 2)
    for c in range(2):
        for i in range(2):
            for j in range(2):
                expected = sum(F.softmax(logits[q], 0)[c].item() * sig(masks[q, i, j].item()) for q in range(4))
                assert scores[c, i, j].item() == pytest.approx(expected, rel=1e-5)


def test_preprocess_pads_to_32_after_normalising():
    images = [torch.full((3, 40, 50), 255.0), torch.zeros(3, 33, 70)]
    batch, sizes = preprocess_images(images)
    assert batch.shape == (2, 3, 64, 96) and sizes == [(40, 50), (33, 70)]
    assert batch[0, 0, 0, 0].item() == pytest.approx((255 - 123.675) / 58.395, rel=1e-6)
    assert batch[1, 2, 0, 0].item() == pytest.approx(-103.53 / 57.375, rel=1e-6)
    assert batch[0, :, 40:].abs().sum() == 0 and batch[1, :, :, 70:].abs().sum() == 0


def test_simnet_shape_range_and_inplace_defect():
    net = SimNet(in_dim=8, hidden_dim=4, num_layers=3)
    assert sorted(k for k in net.state_dict() if "block0" in k and "bn" not in k) == [
        "fc_branch.layers.block0.layer1.bias", "fc_branch.layers.block0.layer1.weight",
        "fc_branch.layers.block0.layer2.bias", "fc_branch.layers.block0.layer2.weight",
        "fc_branch.layers.block0.sqz.bias", "fc_branch.layers.block0.sqz.weight"]
    x = torch.randn(2, 8, 5, 6)
    out = net(x)
    assert out.shape == (2, 1, 5, 6) and (out > 0).all() and (out < 1).all()
    out.sum().backward()
    inplace = SimNet(in_dim=8, hidden_dim=4, num_layers=3, residual_add="inplace")
    inplace.load_state_dict(net.state_dict())
    assert torch.allclose(inplace(x), net(x))
    with pytest.raises(RuntimeError, match="inplace operation"):
        inplace(x).sum().backward()


def test_simnet_forward_pairs_equals_the_pair_grid():
    torch.manual_seed(0)
    net = SimNet(in_dim=8, hidden_dim=4, num_layers=3).double()
    a = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    grid_out = net(pair_grid(a, b))
    grads_grid = torch.autograd.grad(grid_out.sum(), [a, b] + list(net.parameters()))
    pairs_out = net.forward_pairs(a, b)
    grads_pairs = torch.autograd.grad(pairs_out.sum(), [a, b] + list(net.parameters()))
    assert torch.allclose(pairs_out, grid_out, atol=1e-12)
    for g1, g2 in zip(grads_grid, grads_pairs):
        assert torch.allclose(g1, g2, atol=1e-10)
    assert int(net.fc_branch.layers.block0.bn1.num_batches_tracked) == 2      # both passes in train mode


def test_detectron2_backbone_keys():
    assert detectron2_backbone_key("stem.conv1.weight") == "conv1.weight"
    assert detectron2_backbone_key("stem.conv1.norm.running_var") == "bn1.running_var"
    assert detectron2_backbone_key("res2.0.conv3.norm.bias") == "layer1.0.bn3.bias"
    assert detectron2_backbone_key("res5.2.conv2.weight") == "layer4.2.conv2.weight"
    assert detectron2_backbone_key("res3.0.shortcut.weight") == "layer2.0.downsample.0.weight"
    assert detectron2_backbone_key("res3.0.shortcut.norm.weight") == "layer2.0.downsample.1.weight"


def test_frozen_bn_resnet_loads_torchvision_and_gives_res2_to_res5():
    import torchvision
    net = FrozenBNResNet()
    reference = torchvision.models.resnet50(weights=None).state_dict()
    net.load_imagenet(reference)                                        # strict, fc dropped
    assert not any("bn" in name or "downsample.1" in name for name, _ in net.named_parameters())
    tiny = FrozenBNResNet(blocks=(1, 1, 1, 1))
    feats = tiny(torch.randn(1, 3, 64, 96))
    assert {k: tuple(v.shape[1:]) for k, v in feats.items()} == {
        "res2": (256, 16, 24), "res3": (512, 8, 12), "res4": (1024, 4, 6), "res5": (2048, 2, 3)}


# ------------------------------------------------------------------------------------------ balance window

def test_balance_window_and_its_state():
    crit = SimFormerCriterion(num_classes=3, novel_ids=[1], matcher=HungarianMatcher())
    assert crit.balance_window() == ([1], [1])
    counts = [(10 + i, i) for i in range(30)]
    for neg, pos in counts:
        crit._push_balance(neg, pos)
    neg, pos = crit.balance_window()
    assert neg == [c[0] for c in counts[-25:]] and pos == [c[1] for c in counts[-25:]]
    total_neg, total_pos = sum(neg), sum(pos)
    total = total_pos + total_neg
    assert crit.balance_weights() == pytest.approx((total_pos / total, total_neg / total))
    state = crit.state_dict()                                           # checkpointed (the fix) ...
    fresh = SimFormerCriterion(num_classes=3, novel_ids=[1], matcher=HungarianMatcher())
    fresh.load_state_dict(state)
    assert fresh.balance_window() == (neg, pos)
    without = {k: v for k, v in state.items() if not k.startswith("balance")}
    fresh.load_state_dict(without, strict=True)                         # ... optional when absent
    original = SimFormerCriterion(num_classes=3, novel_ids=[1], matcher=HungarianMatcher(), balance_state="original")
    assert not any(k.startswith("balance") for k in original.state_dict())


# ------------------------------------------------------------------------------------------ pair sampling

def test_pair_index_rules_and_partner_draw():
    base = [{0, 6}, {0, 7}, {6}, {9}, {0}]
    novel = [{1, 2}, {1}, {2, 3}, {1, 2}, set()]
    index = build_pair_index(base, novel, num_classes=10, rng=np.random.default_rng(0))
    # image 0 (novel 1, 2): shares exactly 1 with image 1 (class 1) and image 2 (class 2); 2 with image 3
    assert index["deconf"][0] == {1: [1], 2: [2]}
    assert index["novel_comm"][0] == [3, 4]                 # A has >= 2 novel classes and C is not a deconf partner
    assert index["base_comm"][0] == [1, 2, 4]
    assert index["deconf"][1] == {1: [0, 3]} and index["novel_comm"][1] == []
    rng = np.random.default_rng(1)
    assert {draw_partner(index, 0, rng) for _ in range(50)} == {1, 2}
    assert {draw_partner(index, 1, rng) for _ in range(50)} <= set(index["base_comm"][1])   # one novel class: base_comm
    assert index["deconf"][3] == {1: [1], 2: [2]}           # image 0 shares both novel classes: novel_comm
    assert index["novel_comm"][3] == [0, 4]
    assert draw_partner(index, 3, rng) in (1, 2)
    lonely = build_pair_index([{5}], [set()], num_classes=10, rng=np.random.default_rng(0))
    assert draw_partner(lonely, 0, rng) == 0                 # nobody: the anchor itself
    many = build_pair_index([{0}] * 30, [{1}] * 30, num_classes=4, rng=np.random.default_rng(0), deconf_cap=5,
                            base_comm_cap=4)
    assert len(many["deconf"][0][1]) == 5 and len(set(many["deconf"][0][1])) == 5
    assert len(many["base_comm"][0]) == 4 and 0 not in many["base_comm"][0]


# ------------------------------------------------------------------------------------------ tiny model

NOVEL = [1, 2]
K = 6


def _targets(size: int = 64):
    """4 images = 2 pairs with base classes 0, 3, 4, 5, novel classes 1, 2, unlabeled (255) and padding."""
    layouts = [[0, 3, 1, 2], [0, 4, 1, 5], [3, 0, 5, 2], [3, 4, 2, 0]]
    targets = []
    for classes in layouts:
        lab = torch.zeros(size, size, dtype=torch.int64)
        quarter = size // 4
        for i, c in enumerate(classes):
            lab[i * quarter:(i + 1) * quarter] = c
        lab[:, 5:9] = 255                                              # unlabeled band
        pad = torch.zeros(size, size, dtype=torch.int64)
        pad[:, size - 12:] = 1
        lab[pad.bool()] = 255
        present = sorted({int(c) for c in lab.unique()} - {255})
        base = [c for c in present if c not in NOVEL]
        novel = [c for c in present if c in NOVEL]
        masks = torch.stack([lab == c for c in base] + [torch.zeros(size, size, dtype=torch.bool)] * len(novel))
        targets.append({"labels": torch.tensor(base + novel), "masks": masks, "segm_gt_raw_aug": lab,
                        "pad_region": pad})
    return targets


def _tiny(**criterion_kwargs) -> SimFormer:
    torch.manual_seed(0)
    kwargs = dict(base_points=20, novel_points=16)
    kwargs.update(criterion_kwargs)
    matcher = kwargs.pop("matcher", {})
    return build_simformer(num_classes=K, novel_ids=NOVEL, backbone_blocks=(1, 1, 1, 1), conv_dim=32, mask_dim=32,
                           hidden_dim=32, num_queries=8, nheads=4, dim_feedforward=64, dec_layers=3, dropout=0.0,
                           simnet_hidden=16, matcher_kwargs=matcher, criterion_kwargs=kwargs)


def _images(batch: int = 4, size: int = 64):
    gen = torch.Generator().manual_seed(5)
    raw = [torch.rand(3, size, size, generator=gen) * 255 for _ in range(batch)]
    return preprocess_images(raw)[0]


def test_tiny_forward_backward_default_switches():
    model = _tiny().train()
    images, targets = _images(), _targets()
    details = {}
    out = model.sem_seg_head(model.backbone(images))
    losses = model.criterion(out, targets, generator=torch.Generator().manual_seed(0), details=details)
    expected_keys = ["loss_mask_m", "loss_mask_d", "loss_comp", "loss_cls_a", "loss_cro_sim", "loss_cro_dit"] + [
        f"loss_{t}_{i}" for i in range(2) for t in ("mask_m", "mask_d", "comp", "cls_a")]
    assert list(losses) == expected_keys
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_cro_dit"].item() != 0                           # both pairs share a novel class
    total = model.criterion.total_loss(losses)
    total.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for name in ("backbone.conv1.weight", "backbone.layer4.0.conv3.weight",
                 "sem_seg_head.pixel_decoder.adapter_1.weight",
                 "sem_seg_head.predictor.query_embed.weight", "sem_seg_head.predictor.class_embed.weight",
                 "criterion.cro_pixel_sim_net.out_head.weight",
                 "criterion.cro_pixel_sim_net.fc_branch.layers.block0.layer1.weight"):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    assert not any(n.startswith("backbone") and ("bn" in n or "downsample.1" in n) for n in grads)   # frozen BN
    # teacher_bn="eval": the teacher pass neither uses nor updates batch statistics
    bn = model.criterion.cro_pixel_sim_net.fc_branch.layers.block0.bn1
    assert int(bn.num_batches_tracked) == 1
    # distill_padding="exclude": no distillation point on padding
    pad = details["regions"]["pad"]
    rc = details["distill_points"]["rc"]
    assert all(pad[b, 0, r, c] == 0 for b in range(4) for r, c in rc[b].tolist())
    # student_pairs="paper": ReLU(cos(S_b[i], S_partner(b)[j]))
    scores = novel_score_map(out["pred_logits"], out["pred_masks"], torch.tensor(NOVEL)).detach()
    b, i, j = 1, 3, 5
    partner = 0
    si = scores[b, :, rc[b, i, 0], rc[b, i, 1]]
    sj = scores[partner, :, rc[partner, j, 0], rc[partner, j, 1]]
    cos = float(np.dot(si.numpy(), sj.numpy()) / (np.linalg.norm(si.numpy()) * np.linalg.norm(sj.numpy())))
    assert details["student"][b, i, j].item() == pytest.approx(max(cos, 0.0), rel=1e-4, abs=1e-6)


def test_tiny_losses_equal_a_naive_per_layer_loop():
    """The batched mask / comp / cls terms equal the formulas applied layer by layer, image by image."""
    model = _tiny()
    targets = _targets()
    with torch.no_grad():
        out = model.sem_seg_head(model.backbone(_images()))
        details = {}
        losses = model.criterion(out, targets, generator=torch.Generator().manual_seed(0), details=details)
    crit = model.criterion
    num_masks = sum(int(t["masks"].flatten(1).any(1).sum()) for t in targets)
    assert details["num_masks"] == num_masks
    for layer, suffix in ((2, ""), (0, "_0"), (1, "_1")):
        logits, masks = out["all_logits"][layer], out["all_masks"][layer]
        src_m, tgt_m, comp, n_novel = [], [], 0.0, 0
        classes = torch.full((4, 8), K)
        for b, (src, tgt) in enumerate(details["indices"][layer]):
            has = targets[b]["masks"].flatten(1).any(1)
            classes[b, src] = targets[b]["labels"][tgt]
            for q, t in zip(src.tolist(), tgt.tolist()):
                if has[t]:
                    src_m.append(masks[b, q])
                    tgt_m.append(targets[b]["masks"][t])
            novel_q = [q for q, t in zip(src.tolist(), tgt.tolist()) if not has[t]]
            if novel_q:
                n_novel += 1
                up = F.interpolate(masks[b, novel_q][:, None], size=(64, 64), mode="bilinear", align_corners=False)
                target = (~targets[b]["masks"][has].any(0) & (targets[b]["pad_region"] == 0)).float().flatten()
                comp += complementary_loss(up[:, 0].flatten(1), torch.tensor(-2.9444), target).item()
        up = F.interpolate(torch.stack(src_m)[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
        t = torch.stack(tgt_m).float().flatten(1)
        assert losses[f"loss_mask_m{suffix}"].item() == pytest.approx(
            sigmoid_focal_loss(up.flatten(1), t, num_masks).item(), rel=1e-5)
        assert losses[f"loss_mask_d{suffix}"].item() == pytest.approx(
            dice_loss(up.flatten(1), t, num_masks).item(), rel=1e-5)
        assert losses[f"loss_comp{suffix}"].item() == pytest.approx(comp / (n_novel + 1e-5), rel=1e-5)
        weights = torch.ones(K + 1)
        weights[-1] = 0.1
        cls = F.cross_entropy(logits.transpose(1, 2), classes, weights)
        assert losses[f"loss_cls_a{suffix}"].item() == pytest.approx(cls.item(), rel=1e-5)
    assert crit.weight_of("loss_mask_m_1") == 20.0 and crit.weight_of("loss_comp") == 0.15


def test_tiny_original_switches_and_pair_layout():
    model = _tiny(student_pairs="code", distill_padding="include", teacher_bn="train", pair_layout="original",
                  balance_state="original", matcher={"column_order": "original", "novel_mask_cost": "original"})
    targets = _targets()
    with torch.no_grad():
        feats = model.backbone(_images(2))
        losses = model.criterion(model.sem_seg_head(feats), targets[:2], generator=torch.Generator().manual_seed(0))
    assert all(torch.isfinite(v) for v in losses.values())
    bn = model.criterion.cro_pixel_sim_net.fc_branch.layers.block0.bn1
    assert int(bn.num_batches_tracked) == 2                             # the teacher pass updated the statistics
    with pytest.raises(ValueError, match="exactly 2 images"):
        with torch.no_grad():
            model.criterion(model.sem_seg_head(model.backbone(_images())), targets)


def test_injected_draws_reproduce_a_step():
    """Draws recorded from a generator-driven step, injected into a fresh model, give the same step."""
    targets = _targets()
    model = _tiny()
    first = {}
    with torch.no_grad():
        out = model.sem_seg_head(model.backbone(_images()))
        a = model.criterion(out, targets, generator=torch.Generator().manual_seed(7), details=first)
    draws = {"common_base_class": first["common_base_class"],
             "noise": [first["points"][0]["noise"], first["points"][1]["noise"], first["distill_points"]["noise"]]}
    fresh = _tiny()
    second = {}
    with torch.no_grad():
        b = fresh.criterion(fresh.sem_seg_head(fresh.backbone(_images())), targets, draws=draws, details=second)
    for key in a:
        assert a[key].item() == pytest.approx(b[key].item(), rel=1e-6, abs=1e-9), key
    assert torch.equal(first["distill_points"]["rc"], second["distill_points"]["rc"])
    with pytest.raises(ValueError, match="not common"):
        fresh.criterion(fresh.sem_seg_head(fresh.backbone(_images())), targets,
                        draws={"common_base_class": [2, 2], "noise": draws["noise"]})


def test_tiny_inference_from_images():
    model = _tiny().eval()
    raw = [torch.rand(3, 50, 70) * 255, torch.rand(3, 64, 40) * 255]
    images, sizes = preprocess_images(raw)
    scores = model.inference(images, sizes, [(100, 140), (64, 40)])
    assert [tuple(s.shape) for s in scores] == [(K, 100, 140), (K, 64, 40)]
    assert all(torch.isfinite(s).all() and (s >= 0).all() for s in scores)


def test_head_state_dict_names():
    head = MaskFormerHead(in_channels=(8, 16, 32, 64), num_classes=3, conv_dim=32, mask_dim=32, hidden_dim=32,
                          num_queries=4, nheads=2, dim_feedforward=16, dec_layers=2)
    keys = set(head.state_dict())
    for key in ("pixel_decoder.adapter_1.weight", "pixel_decoder.adapter_1.norm.weight",
                "pixel_decoder.layer_4.norm.bias",
                "pixel_decoder.mask_features.bias", "predictor.query_embed.weight", "predictor.input_proj.weight",
                "predictor.class_embed.weight", "predictor.mask_embed.layers.2.bias",
                "predictor.transformer.decoder.layers.1.multihead_attn.in_proj_weight",
                "predictor.transformer.decoder.layers.0.norm3.weight", "predictor.transformer.decoder.norm.weight"):
        assert key in keys, key
    assert "pixel_decoder.adapter_1.bias" not in keys and "pixel_decoder.adapter_4.weight" not in keys


def test_optimizer_param_groups():
    model = _tiny()
    groups = optimizer_param_groups(model, base_lr=1e-4, weight_decay=1e-4)
    by_param = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert len(by_param) == len([p for p in named.values() if p.requires_grad])
    assert by_param[id(named["backbone.conv1.weight"])] == pytest.approx((1e-5, 1e-4))
    assert by_param[id(named["sem_seg_head.predictor.query_embed.weight"])] == (1e-4, 0.0)
    assert by_param[id(named["sem_seg_head.pixel_decoder.adapter_1.norm.weight"])] == (1e-4, 0.0)
    assert by_param[id(named["sem_seg_head.predictor.transformer.decoder.layers.0.norm1.bias"])] == (1e-4, 0.0)
    assert by_param[id(named["criterion.cro_pixel_sim_net.fc_branch.layers.block0.bn1.weight"])] == (1e-4, 0.0)
    assert by_param[id(named["sem_seg_head.predictor.class_embed.weight"])] == (1e-4, 1e-4)
    assert by_param[id(named["criterion.cro_pixel_sim_net.out_head.weight"])] == (1e-4, 1e-4)


def test_full_size_parameter_counts():
    """SPEC_SIMFORMER 3 (measured on the original): pixel decoder 7.540 M, predictor 10.265 M at
    K = 171, SimNet 0.595 M, ResNet-50 ~23.5 M (no fc)."""
    head = MaskFormerHead(in_channels=(256, 512, 1024, 2048), num_classes=171)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert round(count(head.pixel_decoder) / 1e6, 3) == 7.540
    assert round(count(head.predictor) / 1e6, 3) == 10.265
    assert round(count(SimNet()) / 1e6, 3) == 0.595
    assert round(count(FrozenBNResNet()) / 1e6, 1) == 23.5
