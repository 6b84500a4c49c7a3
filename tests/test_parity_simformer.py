"""Parity with the ORIGINAL SimFormer (bcmi/SimFormer-Weak-Shot-Semantic-Segmentation 9e32a80):
our MaskFormer head, matcher and criterion, loaded with the original's weights, reproduce the
outputs recorded from the original modules in ``shared/parity/simformer_tiny.pt``
(SPEC_SIMFORMER 12.1, 14).

The fixture holds a weight recipe (rebuilt by ``official_weights.rebuild_state_dict``), the
backbone features of one pair (2 x 128 x 128) with its targets, the original's random draws
(injected here), and the original's outputs: head outputs, the matcher's indices and costs for
every decoder layer, all 14 loss terms, the SimNet's outputs, the class-balance window, the
SimNet BatchNorm buffers, selected gradients and the semantic-inference maps. Tolerances are the
fixture's own (``tolerances.per_tensor_atol``, integer tensors exact).

The model is built with the original's behaviour for every defect switch (SPEC_SIMFORMER 10):
``column_order="original"`` (the fixture exercises the vanishing-mask label swap),
``novel_mask_cost="original"``, ``student_pairs="code"``, ``distill_padding="include"``,
``teacher_bn="train"``, ``pair_layout="original"``, ``balance_state="original"``; the SimNet's
residual add is the patched original's (out of place; the unpatched one is checked to fail in
backward as the original does).

One numerical subtlety, checked rather than hidden (``test_simnet_gradients``): one SimNet
pre-activation of this fixture lies ~1e-7 from a ReLU kink. Our pixel embeddings differ from the
original's by ~3e-6 (tolerance 5e-5; the size depends on which oneDNN kernels the CPU gets:
bit-identical with ``ONEDNN_MAX_CPU_ISA=AVX2`` and 2 threads), enough to flip that one ReLU
and move the gradients of ``block0.layer1.weight`` / ``block0.bn1.bias`` by ~1 % of their scale.
So the SimNet gradients are checked (a) exactly, i.e. within the fixture's tolerance, with the
original's embeddings as the SimNet's input (the gradients of the SimNet depend on the
embeddings only through that detached input), and (b) end to end within the tolerance, except
for a parameter upstream of a pre-activation closer than 1e-6 to a kink, which must then be
within 2 % of its scale.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PARITY_DIR = ROOT.parent / "shared" / "parity"
FIXTURE = PARITY_DIR / "simformer_tiny.pt"

if not FIXTURE.is_file():
    pytest.skip(f"parity fixture not found: {FIXTURE} (the shared/ directory beside the repository)",
                allow_module_level=True)

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from model.maskformer import MaskFormerHead  # noqa: E402
from model.simformer import SimFormer, SimNet  # noqa: E402
from model.simformer_criterion import HungarianMatcher, SimFormerCriterion  # noqa: E402

ORIGINAL_SWITCHES = dict(student_pairs="code", distill_padding="include", teacher_bn="train",
                         pair_layout="original", balance_state="original")
ORIGINAL_MATCHER = dict(column_order="original", novel_mask_cost="original")
LAYER_NAMES = {"final": -1, "aux_0": 0, "aux_1": 1}
KINK = 1e-6          # a pre-activation closer than this to 0 may flip with last-bit input changes


def _official_weights():
    spec = importlib.util.spec_from_file_location("official_weights", PARITY_DIR / "official_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fixture():
    return torch.load(FIXTURE, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def weights(fixture):
    return _official_weights().rebuild_state_dict(fixture)


def _tol(fixture, key: str) -> float:
    return float(fixture["tolerances"]["per_tensor_atol"][key])


def build(fixture, *, matcher=None, residual_add="out_of_place", **switches) -> SimFormer:
    """The tiny SimFormer the fixture was recorded with (sizes from its resolved config)."""
    cfg = fixture["original"]["config"]
    head_cfg, mf = cfg["MODEL"]["SEM_SEG_HEAD"], cfg["MODEL"]["MASK_FORMER"]
    cis, loss = cfg["CROSS_IMG_SIM"], cfg["LOSS"]
    channels = fixture["original"]["backbone_channels_strides"]
    meta = fixture["original"]["dataset_meta"]
    head = MaskFormerHead(
        in_channels=[channels[k][0] for k in ("res2", "res3", "res4", "res5")], num_classes=head_cfg["NUM_CLASSES"],
        conv_dim=head_cfg["CONVS_DIM"], mask_dim=head_cfg["MASK_DIM"], hidden_dim=mf["HIDDEN_DIM"],
        num_queries=mf["NUM_OBJECT_QUERIES"], nheads=mf["NHEADS"], dim_feedforward=mf["DIM_FEEDFORWARD"],
        dec_layers=mf["DEC_LAYERS"], dropout=mf["DROPOUT"])
    asm = cfg["ASM"]
    matcher_kwargs = dict(cost_class_mask=asm["HasMaskCls"], cost_mask=asm["HasMaskMask"],
                          cost_class_nomask=asm["NoMaskCls"], cost_mask_nomask=asm["NoMaskMask"],
                          focal_weight=loss["AssignMaskMASK"], dice_weight=loss["AssignMaskDICE"])
    matcher_kwargs.update(ORIGINAL_MATCHER if matcher is None else matcher)
    simnet = SimNet(in_dim=2 * head_cfg["MASK_DIM"], hidden_dim=head_cfg["MASK_DIM"], num_layers=cis["LayerNum"],
                    batch_norm=cis["BN"], residual_add=residual_add)
    kwargs = dict(ORIGINAL_SWITCHES)
    kwargs.update(switches)
    criterion = SimFormerCriterion(
        num_classes=head_cfg["NUM_CLASSES"], novel_ids=meta["c_novel_dids"], matcher=HungarianMatcher(**matcher_kwargs),
        simnet=simnet, no_object_weight=mf["NO_OBJECT_WEIGHT"], cls_weight=loss["AssignCls"],
        mask_focal_weight=mf["MASK_WEIGHT"], mask_dice_weight=mf["DICE_WEIGHT"], comp_weight=loss["CompSupNovel"],
        comp_floor_logit=loss["IgnoreInit"], sim_weight=cis["BASE_LOSS"], dist_weight=cis["DISTILL_LOSS"],
        dist_func=cis["DISTILL_FUNC"], base_points=cis["BASE_POINT_NUM"], novel_points=cis["NOVEL_POINT_NUM"],
        **kwargs)
    return SimFormer(backbone=None, sem_seg_head=head, criterion=criterion)


def _draws(fixture) -> dict:
    d = fixture["draws"]
    assert list(d["calls"]) == ["pos", "neg", "distill"]
    return {"common_base_class": [int(d["common_base_class"])], "noise": list(d["noise"])}


def _train_step(fixture, weights, *, simnet_input=None, **build_kwargs):
    """One training forward/backward as the fixture's (1 thread, injected draws and window).

    -> dict(model, losses, details, total, grads (name -> grad), input_grads, min_preact)."""
    model = build(fixture, **build_kwargs)
    model.load_state_dict(weights, strict=True)
    model.train()
    criterion = model.criterion
    window = fixture["inputs"]["balance_before"]
    criterion.set_balance_window(window["neg"], window["pos"])
    preacts = []

    def record(module, args, output):
        if torch.is_grad_enabled():                      # the SimLoss pass (the teacher runs without grad)
            preacts.append(output.detach().abs().min().item())

    hooks = [m.register_forward_hook(record) for name, m in criterion.cro_pixel_sim_net.named_modules()
             if name.endswith(("bn1", "bn2", "sqz"))]
    threads = torch.get_num_threads()
    torch.set_num_threads(int(fixture["original"]["threads_expected"]))
    try:
        features = {k: v.clone().requires_grad_(True) for k, v in fixture["inputs"]["features"].items()}
        outputs = model.sem_seg_head(features)
        if simnet_input is not None:
            outputs = dict(outputs, pixel_features=simnet_input)
        details = {}
        losses = criterion(outputs, fixture["inputs"]["targets"], draws=_draws(fixture), details=details)
        total = criterion.total_loss(losses)
        total.backward()
    finally:
        torch.set_num_threads(threads)
        for h in hooks:
            h.remove()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return dict(model=model, outputs=outputs, losses=losses, details=details, total=total, grads=grads,
                input_grads={k: v.grad for k, v in features.items()}, min_preact=min(preacts))


@pytest.fixture(scope="module")
def step(fixture, weights):
    return _train_step(fixture, weights)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.detach().double() - b.double()).abs().max().item()


def test_weights_load_strictly(fixture, weights):
    assert sorted(weights) == sorted(fixture["original"]["state_dict_keys"])
    for kwargs in ({}, {"matcher": {}, "student_pairs": "paper", "distill_padding": "exclude", "teacher_bn": "eval",
                        "pair_layout": "batched", "balance_state": "checkpointed"}):
        model = build(fixture, **kwargs)
        model.load_state_dict(weights, strict=True)          # the fixed model's extra window buffers are optional
        assert model.criterion.balance_window() == ([1], [1])
    assert sorted(build(fixture).state_dict()) == sorted(weights)


def test_head_outputs(fixture, step):
    out, expected = step["outputs"], fixture["expected"]
    checks = {"pred_logits": out["pred_logits"], "pred_masks": out["pred_masks"],
              "aux_pred_logits": out["all_logits"][:-1], "aux_pred_masks": out["all_masks"][:-1],
              "pixel_features": out["pixel_features"]}
    for key, value in checks.items():
        diff = _max_diff(value, expected[key])
        print(f"{key}: max|diff| {diff:.3g} (tol {_tol(fixture, key):.3g})")
        assert diff <= _tol(fixture, key), key


def test_matcher_indices_exact_and_costs(fixture, step):
    details, expected = step["details"], fixture["expected"]
    for name, layer in LAYER_NAMES.items():
        for b in range(2):
            src, tgt = details["indices"][layer][b]
            exp_src, exp_tgt = expected["matcher_indices"][name][b]
            assert torch.equal(src, exp_src), (name, b)
            assert torch.equal(tgt, exp_tgt), (name, b)
            cost = details["costs"][b][0][layer]
            diff = _max_diff(cost, expected["matcher_costs"][name][b])
            assert diff <= _tol(fixture, f"matcher_costs.{name}.{b}"), (name, b, diff)
    # the fixture exercises the vanishing-mask case (SPEC 4): image 0's thin class swaps labels
    assert fixture["diagnostics"]["labels_swapped_by_matcher"][0]


def test_fixed_matcher_maps_columns_back_to_targets(fixture, weights, step):
    """column_order='fixed' (the default): the same assignment, each column mapped to its target."""
    model = build(fixture, matcher={"column_order": "fixed", "novel_mask_cost": "nan_safe"})
    model.load_state_dict(weights, strict=True)
    out = step["outputs"]
    indices = model.criterion.matcher(out["all_logits"].detach(), out["all_masks"].detach(),
                                      fixture["inputs"]["targets"])
    mapping = fixture["diagnostics"]["matcher_column_to_target"]
    for name, layer in LAYER_NAMES.items():
        for b in range(2):
            exp_src, exp_tgt = fixture["expected"]["matcher_indices"][name][b]
            src, tgt = indices[layer][b]
            assert torch.equal(src, exp_src)
            assert torch.equal(tgt, mapping[b][exp_tgt])
    labels = fixture["inputs"]["targets"][0]["labels"]
    src, tgt = indices[-1][0]
    _, buggy = fixture["expected"]["matcher_indices"]["final"][0]
    assert not torch.equal(labels[tgt], labels[buggy])        # the original's swap is gone


def test_losses(fixture, step):
    losses, expected = step["losses"], fixture["expected"]
    assert list(losses) == list(expected["losses"])
    weighted = step["model"].criterion.weighted(losses)
    for key in expected["losses"]:
        diff = abs(losses[key].item() - expected["losses"][key].item())
        wdiff = abs(weighted[key].item() - expected["losses_weighted"][key].item())
        print(f"{key}: {losses[key].item():.6f} vs {expected['losses'][key].item():.6f}, |diff| {diff:.2g}")
        assert diff <= _tol(fixture, f"losses.{key}"), key
        assert wdiff <= _tol(fixture, f"losses_weighted.{key}"), key
        assert step["model"].criterion.weight_of(key) == fixture["original"]["loss_weights"][key]
    diff = abs(step["total"].item() - expected["total_loss"].item())
    print(f"total: |diff| {diff:.2g}")
    assert diff <= _tol(fixture, "total_loss")
    assert step["details"]["num_masks"] == fixture["diagnostics"]["num_masks"]


def test_pair_term_intermediates(fixture, step):
    details, expected, draws = step["details"], fixture["expected"], fixture["draws"]
    for key in ("base", "pad", "novel", "ignore"):
        diff = _max_diff(details["regions"][key], expected["regions_quarter"][key])
        assert diff <= _tol(fixture, f"regions_quarter.{key}"), key
    regions = details["sampling_regions"] + [details["distill_region"]]
    points = details["points"] + [details["distill_points"]]
    for i in range(3):
        assert _max_diff(regions[i], expected["sampling_regions"][i]) <= _tol(fixture, f"sampling_regions.{i}")
        assert torch.equal(points[i]["rc"], draws["points_rc"][i])
        assert torch.equal(points[i]["xy"], draws["points"][i])
        assert torch.equal(points[i]["scores"], draws["point_scores"][i])
    assert details["common_base_class"] == [draws["common_base_class"]]
    sim = _max_diff(details["sim_pred"], expected["simnet_outputs"]["sim_pred"])
    teacher = _max_diff(details["teacher"][:, None], expected["simnet_outputs"]["teacher"])
    print(f"sim_pred max|diff| {sim:.3g}, teacher max|diff| {teacher:.3g}")
    assert sim <= _tol(fixture, "simnet_outputs.sim_pred")
    assert teacher <= _tol(fixture, "simnet_outputs.teacher")
    assert list(details["balance_weights"]) == pytest.approx(list(expected["balance_weights_used"]), abs=1e-12)
    window = step["model"].criterion.balance_window()
    assert window == (list(expected["balance_after"]["neg"]), list(expected["balance_after"]["pos"]))
    buffers = dict(step["model"].criterion.named_buffers())
    for key, value in expected["criterion_buffers_after"].items():
        if value.dtype == torch.int64:
            assert torch.equal(buffers[key], value), key
        else:
            assert _max_diff(buffers[key], value) <= _tol(fixture, f"criterion_buffers_after.{key}"), key


def test_gradients(fixture, step):
    """Every recorded gradient but the SimNet's (see test_simnet_gradients) and d total / d features."""
    for key, value in fixture["expected"]["grads"].items():
        if key.startswith("criterion.cro_pixel_sim_net"):
            continue
        diff = _max_diff(step["grads"][key], value)
        assert diff <= _tol(fixture, f"grads.{key}"), (key, diff)
    for key, value in fixture["expected"]["grads_inputs"].items():
        diff = _max_diff(step["input_grads"][key], value)
        print(f"d total / d {key}: max|diff| {diff:.3g}")
        assert diff <= _tol(fixture, f"grads_inputs.{key}"), key


def test_simnet_gradients(fixture, weights, step):
    expected = fixture["expected"]
    keys = [k for k in expected["grads"] if k.startswith("criterion.cro_pixel_sim_net")]
    # (a) exact: the SimNet fed the original's pixel embeddings
    exact = _train_step(fixture, weights, simnet_input=expected["pixel_features"])
    for key in keys:
        diff = _max_diff(exact["grads"][key], expected["grads"][key])
        print(f"{key} (original embeddings): max|diff| {diff:.3g} (tol {_tol(fixture, 'grads.' + key):.3g})")
        assert diff <= _tol(fixture, f"grads.{key}"), key
    # (b) end to end, with our embeddings
    for key in keys:
        diff = _max_diff(step["grads"][key], expected["grads"][key])
        scale = expected["grads"][key].abs().max().item()
        print(f"{key} (our embeddings): max|diff| {diff:.3g}, closest pre-activation {step['min_preact']:.2g}")
        if diff > _tol(fixture, f"grads.{key}"):
            assert step["min_preact"] < KINK, key      # only a ReLU flip may explain it ...
            assert diff <= 0.02 * scale, key          # ... and it stays small


def test_unpatched_simnet_fails_in_backward(fixture, weights):
    """The original's in-place residual add (SPEC 10 defect 1): same forward, backward raises."""
    model = build(fixture, residual_add="inplace")
    model.load_state_dict(weights, strict=True)
    model.train()
    features = fixture["inputs"]["features"]
    window = fixture["inputs"]["balance_before"]
    model.criterion.set_balance_window(window["neg"], window["pos"])
    outputs = model.sem_seg_head(features)
    losses = model.criterion(outputs, fixture["inputs"]["targets"], draws=_draws(fixture))
    assert abs(losses["loss_cro_sim"].item() - fixture["expected"]["losses"]["loss_cro_sim"].item()) <= \
        _tol(fixture, "losses.loss_cro_sim")
    with pytest.raises(RuntimeError, match="inplace operation"):
        model.criterion.total_loss(losses).backward()


def test_semantic_inference(fixture, weights):
    model = build(fixture)
    model.load_state_dict(weights, strict=True)
    model.eval()
    ev = fixture["inputs"]["eval"]
    threads = torch.get_num_threads()
    torch.set_num_threads(int(fixture["original"]["threads_expected"]))
    try:
        scores = model.inference(None, [tuple(s) for s in ev["image_sizes"]], [tuple(s) for s in ev["output_sizes"]],
                                 features=fixture["inputs"]["features"], padded_size=tuple(ev["padded"]))
    finally:
        torch.set_num_threads(threads)
    for i, score in enumerate(scores):
        expected = fixture["expected"]["sem_seg"][i]
        top2 = score.topk(2, dim=0)[0]
        exp_top2 = fixture["expected"]["sem_seg_top2"][i]
        labels = score.argmax(0)
        fragile = (exp_top2[0] - exp_top2[1]) < 1e-5
        mismatched = (labels != expected) & ~fragile
        print(f"image {i}: {tuple(labels.shape)}, {int((labels != expected).sum())} labels differ, "
              f"top-2 max|diff| {_max_diff(top2, exp_top2):.3g}")
        assert labels.shape == expected.shape
        assert int(mismatched.sum()) == 0
        assert _max_diff(top2, exp_top2) <= _tol(fixture, f"sem_seg_top2.{i}")
