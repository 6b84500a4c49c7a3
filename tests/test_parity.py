"""Parity with the ORIGINAL SAM-RSP: our model, loaded from an original-format checkpoint with
``load_weights``, reproduces the reference outputs stored in ``shared/parity`` (SPEC 7).

The fixture holds a weight recipe (rebuilt by ``official_weights.rebuild_checkpoint``), the
inputs (B=2, 1-shot, 473x473) and the original's outputs for the two decoder variants: 'head'
(HEAD dfe871c, crash fixed = our ``side_head=input``) and 'e10510b' (``side_head=output``).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PARITY_DIR = ROOT.parent / "shared" / "parity"
FIXTURE = PARITY_DIR / "sam_rsp_vgg_1shot.pt"

if not PARITY_DIR.is_dir():
    pytest.skip(f"parity fixtures not found: {PARITY_DIR} (the shared/ directory beside the repository)",
                allow_module_level=True)

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from model import SAMRSP, build_model  # noqa: E402
from util.checkpoint import load_weights  # noqa: E402
from util.config import load_config  # noqa: E402

VARIANTS = {"head": "input", "e10510b": "output"}
PROMPT_TOL = 1e-4
LOGITS_TOL = 1e-3


def _official_weights():
    spec = importlib.util.spec_from_file_location("official_weights", PARITY_DIR / "official_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fixture():
    return torch.load(FIXTURE, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def checkpoints(fixture, tmp_path_factory):
    """The original-format checkpoint, plain and with DistributedDataParallel's ``module.`` prefix."""
    official = _official_weights()
    folder = tmp_path_factory.mktemp("parity")
    return {prefix: official.rebuild_checkpoint(fixture, str(folder / f"official{prefix or '_'}pth"), prefix=prefix)
            for prefix in ("", "module.")}


def _config(fixture, side_head: str, attention: str):
    settings = fixture["original"]
    tiny = settings["sam_tiny"]
    assert settings["backbone"] == "vgg" and settings["shot"] == 1 and settings["dataset"] == "pascal"
    return load_config(None, [
        "model.backbone=vgg16_bn", f"data.dataset={settings['dataset']}", f"data.split={settings['split']}",
        f"data.shot={settings['shot']}", f"model.decoder.depth={settings['depth']}",
        f"model.sam.img_size={settings['sam_img_size']}", "model.sam.patch_size=16", "model.sam.window_size=14",
        f"model.sam.embed_dim={tiny['embed_dim']}", f"model.sam.depth={tiny['depth']}",
        f"model.sam.num_heads={tiny['num_heads']}", f"model.sam.global_attn_indexes={tiny['global_attn_indexes']}",
        f"model.decoder.side_head={side_head}", f"model.sam.attention={attention}", "train.stage=sam_rsp",
    ])


def _build_and_load(fixture, path, side_head, attention) -> SAMRSP:
    model = build_model(_config(fixture, side_head, attention))
    report = load_weights(model, path)
    assert report.format == "sam_rsp_original"
    return model.eval()


# Every (variant, attention) pair runs once; the 'module.' prefix is exercised on half of them
# (the prefixed and plain files load identical tensors: test_module_prefix_loads_the_same).
CASES = [("head", "sdpa", ""), ("head", "reference", "module."),
         ("e10510b", "sdpa", "module."), ("e10510b", "reference", "")]


@pytest.mark.parametrize("variant,attention,prefix", CASES)
def test_matches_original(fixture, checkpoints, variant, attention, prefix):
    model = _build_and_load(fixture, checkpoints[prefix], VARIANTS[variant], attention)
    inputs = fixture["inputs"]
    with torch.no_grad():
        out = model(inputs["query_img"], inputs["support_imgs"], inputs["support_masks"])
    expected = fixture["expected"][variant]
    assert out["prompt_logits"].shape == expected["prompt_logits"].shape
    assert out["logits"].shape == expected["logits"].shape
    prompt_diff = (out["prompt_logits"] - expected["prompt_logits"]).abs().max().item()
    logits_diff = (out["logits"] - expected["logits"]).abs().max().item()
    print(f"parity {variant} attention={attention} prefix={prefix!r}: "
          f"prompt max|diff| {prompt_diff:.3g}, logits max|diff| {logits_diff:.3g}")
    assert prompt_diff <= PROMPT_TOL
    assert logits_diff <= LOGITS_TOL


def test_module_prefix_loads_the_same(fixture, checkpoints):
    plain = _build_and_load(fixture, checkpoints[""], "input", "sdpa").state_dict()
    prefixed = _build_and_load(fixture, checkpoints["module."], "input", "sdpa").state_dict()
    assert plain.keys() == prefixed.keys()
    for key in plain:
        assert torch.equal(plain[key], prefixed[key]), key
