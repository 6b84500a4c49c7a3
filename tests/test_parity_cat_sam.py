"""Parity with the ORIGINAL CAT-SAM-A (SPEC_CAT_SAM 12): our CATSAM, loaded from an official-format
checkpoint with ``load_cat_sam_checkpoint``, reproduces the reference outputs in ``shared/parity``.

The fixture holds a weight recipe (``official_weights.rebuild_state_dict``) plus the alias list
of the original's state dict, the inputs (one 240x320 image, two objects) and the original's
outputs: training-mode logits, losses and gradients (box prompts), logits and losses for point
and mask prompts, and inference (encoder features, box / point / no-prompt logits and masks).
Tolerances (SPEC_CAT_SAM 12): logits and features 1e-4, losses 1e-5, gradients 1e-3 x the
tensor's max |expected|, masks equal wherever |expected logit| >= 1e-4.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PARITY_DIR = ROOT.parent / "shared" / "parity"
FIXTURE = PARITY_DIR / "cat_sam_a_tiny.pt"

if not FIXTURE.is_file():
    pytest.skip(f"parity fixture not found: {FIXTURE} (the shared/ directory beside the repository)",
                allow_module_level=True)

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from model.cat_sam import CATSAM, CATSAMPredictor  # noqa: E402
from model.cat_sam_loss import cat_sam_loss  # noqa: E402
from util.cat_sam_checkpoint import load_cat_sam_checkpoint  # noqa: E402

LOGITS_TOL = 1e-4
LOSS_TOL = 1e-5
GRAD_REL_TOL = 1e-3
MASK_MARGIN = 1e-4
TRAIN_PROMPTS = ("train_box", "train_point", "train_mask")


def _official_weights():
    spec = importlib.util.spec_from_file_location("official_weights", PARITY_DIR / "official_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert tuple(a.shape) == tuple(b.shape), (tuple(a.shape), tuple(b.shape))
    return (a.float() - b.float()).abs().max().item()


def assert_masks_equal(masks: torch.Tensor, expected_masks: torch.Tensor, expected_logits: torch.Tensor) -> None:
    """Masks (any shape) equal the expected ones wherever the expected logit is decided (|l| >= 1e-4).

    For a union of N prompt masks (expected_logits N x 1 x H x W, masks 1 x 1 x H x W) a pixel is
    decided when some prompt is surely positive or every prompt is surely negative."""
    sure = expected_logits.abs() >= MASK_MARGIN
    if expected_logits.shape[0] != masks.shape[0]:
        positive = ((expected_logits > 0) & sure).any(0, keepdim=True)
        sure = positive | sure.all(0, keepdim=True)
    bad = (masks.bool() != expected_masks.bool()) & sure
    assert int(bad.sum()) == 0, f"{int(bad.sum())} decided mask pixels differ"


@pytest.fixture(scope="module")
def fixture():
    return torch.load(FIXTURE, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def official_state(fixture):
    """The original's full state dict: the distinct tensors plus every alias (SPEC_CAT_SAM 12)."""
    state = _official_weights().rebuild_state_dict(fixture)
    for alias, canonical in fixture["original"]["checkpoint_format"]["aliases"].items():
        state[alias] = state[canonical]
    return state


@pytest.fixture(scope="module")
def checkpoint(official_state, tmp_path_factory):
    """An official-format file: ``torch.save({'model': state_dict})`` (the README's format)."""
    path = tmp_path_factory.mktemp("cat_sam_parity") / "whu_cat-a_vit-tiny_1shot.pth"
    torch.save({"model": official_state}, path)
    return path


def build(fixture) -> CATSAM:
    original = fixture["original"]
    settings = original["settings"]
    tiny = settings["sam_tiny"]
    assert original["variant"] == "cat-a" and settings["multimask_output"] is False
    return CATSAM(variant="a", sam_type="tiny", embed_dim=tiny["embed_dim"], depth=tiny["depth"],
                  num_heads=tiny["num_heads"], global_attn_indexes=tuple(tiny["global_attn_indexes"]),
                  img_size=settings["sam_img_size"], patch_size=settings["patch_size"],
                  window_size=settings["window_size"], out_chans=settings["prompt_embed_dim"])


@pytest.fixture(scope="module")
def model(fixture, checkpoint):
    model = build(fixture)
    report = load_cat_sam_checkpoint(model, checkpoint)
    assert report.format == "cat_sam"
    return model


# --------------------------------------------------------------------------------------------
# State dict
# --------------------------------------------------------------------------------------------

def test_state_dict_is_the_originals(fixture, official_state):
    """Same keys in the same order (270, aliases included); plain strict load_state_dict works."""
    fresh = build(fixture)
    assert list(fresh.state_dict()) == list(fixture["original"]["checkpoint_format"]["state_dict_keys"])
    fresh.load_state_dict(official_state, strict=True)
    assert [k for k, _ in fresh.named_trainable_parameters()] == list(fixture["original"]["trainable_params"])


def test_loader_fills_every_tensor(model, official_state):
    state = model.state_dict()
    assert set(state) == set(official_state)
    for key, value in official_state.items():
        assert torch.equal(state[key], value), key


# --------------------------------------------------------------------------------------------
# Training mode: logits, losses, gradients
# --------------------------------------------------------------------------------------------

def _train_prompts(inputs, which):
    if which == "train_box":
        return {"boxes": [inputs["box_coords"]]}
    if which == "train_point":
        return {"points": [inputs["train_point_coords"]], "point_labels": [inputs["train_point_labels"]]}
    return {"noisy_masks": [inputs["noisy_masks"]]}


@pytest.mark.parametrize("which", TRAIN_PROMPTS)
def test_training_forward_loss_and_gradients(model, fixture, which):
    inputs, expected = fixture["inputs"], fixture["expected"][which]
    model.train()
    model.zero_grad(set_to_none=True)
    logits = model(images=[inputs["image"]], **_train_prompts(inputs, which))
    assert len(logits) == 1
    assert max_diff(logits[0], expected["masks_logits"]) <= LOGITS_TOL
    total, parts = cat_sam_loss(logits, [inputs["object_masks"]])
    assert set(parts) == {"loss", "loss_bce", "loss_dice"}
    assert abs(parts["loss"].item() - expected["loss_total"].item()) <= LOSS_TOL
    assert abs(parts["loss_bce"].item() - expected["loss_bce"].item()) <= LOSS_TOL
    assert abs(parts["loss_dice"].item() - expected["loss_dice"].item()) <= LOSS_TOL
    if "grads" not in expected:
        return
    total.backward()
    grads = dict(model.named_trainable_parameters())
    assert set(grads) == set(expected["grads"]) and len(grads) == 41
    for key, param in grads.items():
        want = expected["grads"][key]
        assert param.grad is not None, key
        assert max_diff(param.grad, want) <= GRAD_REL_TOL * want.abs().max().item(), key
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert param.grad is None, name
    model.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def predictor(model, fixture):
    model.eval()
    predictor = CATSAMPredictor(model)
    predictor.set_image(fixture["inputs"]["image"])
    return predictor


def test_inference_encoder_features(model, predictor, fixture):
    infer = fixture["expected"]["infer"]
    feats = predictor.features
    assert max_diff(feats.image_embeddings, infer["image_embeddings"]) <= LOGITS_TOL
    assert len(feats.interm_embeddings) == len(infer["interm_embeddings"])
    for ours, want in zip(feats.interm_embeddings, infer["interm_embeddings"]):
        assert max_diff(ours, want) <= LOGITS_TOL
    with torch.no_grad():
        traced = model.embed([fixture["inputs"]["image"]], trace=True)
    for name in ("handcrafted_feature", "embedding_feature", "hq_feature"):
        assert max_diff(traced.trace[name], infer[name]) <= LOGITS_TOL, name
    assert len(traced.trace["block_inputs"]) == len(infer["block_inputs"])
    for i, (ours, want) in enumerate(zip(traced.trace["block_inputs"], infer["block_inputs"])):
        assert max_diff(ours, want) <= LOGITS_TOL, f"block {i}"
    assert max_diff(traced.image_embeddings, feats.image_embeddings) == 0.0


def test_inference_box_prompts(predictor, fixture):
    boxes, infer = fixture["inputs"]["box_coords"], fixture["expected"]["infer"]
    masks, logits = predictor.predict(boxes=boxes)
    assert max_diff(logits, infer["box_logits"]) <= LOGITS_TOL
    assert_masks_equal(masks, infer["box_masks_per_prompt"], infer["box_logits"])
    assert_masks_equal(masks.any(0, keepdim=True), infer["box_masks"], infer["box_logits"])
    single_masks, single_logits = predictor.predict(boxes=boxes[0])           # a (4,) box: one prompt
    assert single_masks.shape == (1, 1, 240, 320)
    assert max_diff(single_logits, infer["box_logits"][:1]) <= LOGITS_TOL
    assert_masks_equal(single_masks, infer["single_box_masks"], infer["box_logits"][:1])


def test_inference_point_prompt(predictor, fixture):
    infer = fixture["expected"]["infer"]
    masks, logits = predictor.predict(points=fixture["inputs"]["infer_point_coords"])   # (1, 2): one prompt
    assert max_diff(logits, infer["point_logits"]) <= LOGITS_TOL
    assert_masks_equal(masks, infer["point_masks"], infer["point_logits"])


def test_inference_without_prompt(predictor, fixture):
    infer = fixture["expected"]["infer"]
    masks, logits = predictor.predict()
    assert max_diff(logits, infer["noprompt_logits"]) <= LOGITS_TOL
    assert_masks_equal(masks, infer["noprompt_masks"], infer["noprompt_logits"])


def test_forward_with_precomputed_features_equals_images(model, predictor, fixture):
    """The training-style forward from images and the forward from cached features agree."""
    boxes = fixture["inputs"]["box_coords"]
    with torch.no_grad():
        from_images = model(images=[fixture["inputs"]["image"]], boxes=[boxes])[0]
        from_features = model(features=predictor.features, boxes=[boxes])[0]
    assert max_diff(from_images, from_features) == 0.0
