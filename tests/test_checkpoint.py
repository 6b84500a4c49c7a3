"""Checkpoint loading: every official key layout (made from our modules' keys plus the
documented renames), our own format, strict errors and the config helper."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from model import build_model  # noqa: E402
from model.backbone import VGG16_CUTS  # noqa: E402
from util.checkpoint import (CheckpointError, load_pretrained_parts, load_weights, sha256_file,  # noqa: E402
                             trainable_state_dict)
from util.config import load_config  # noqa: E402

TINY = ["model.backbone_width=8", "model.backbone_blocks=[1,1,1,1]", "model.rspg.reduce_dim=32",
        "model.base_learner.hidden_dim=32", "model.sam.embed_dim=32", "model.sam.depth=2", "model.sam.num_heads=2",
        "model.sam.global_attn_indexes=[1]", "model.sam.img_size=128", "model.sam.patch_size=16",
        "model.sam.out_chans=32", "model.decoder.num_heads=4"]


def tiny_config(backbone="resnet50", shot=1, extra=()):
    return load_config(None, TINY + [f"model.backbone={backbone}", f"data.shot={shot}", *extra])


def tiny(stage, backbone="resnet50", shot=1, seed=0):
    torch.manual_seed(seed)
    model = build_model(tiny_config(backbone, shot), stage)
    with torch.no_grad():  # distinctive values everywhere, buffers included
        for value in model.state_dict().values():
            if value.is_floating_point():
                value.copy_(torch.randn_like(value))
    return model


def sub_state(model, prefix):
    return {k[len(prefix):]: v for k, v in model.state_dict().items() if k.startswith(prefix)}


def assert_same(actual: dict, expected: dict):
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


def assert_differs(a: dict, b: dict):
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())


# --------------------------------------------------------------------------------------------
# Official layouts
# --------------------------------------------------------------------------------------------

def pspnet_file(tmp_path, backbone):
    """A PSPNet best.pth: layer0..4, the same tensors again as encoder.{k}, ppm, cls."""
    source = tiny("base", backbone, seed=1)
    state = dict(source.state_dict())
    for key, value in source.state_dict().items():
        if key.startswith("layer"):
            state["encoder." + key[len("layer"):]] = value
    path = tmp_path / "best.pth"
    torch.save({"state_dict": state, "epoch": 3}, path)
    return source, path


@pytest.mark.parametrize("backbone", ["vgg16_bn", "resnet50"])
def test_pspnet_file_into_pspnet_bam_and_sam_rsp(tmp_path, backbone):
    source, path = pspnet_file(tmp_path, backbone)
    pspnet = tiny("base", backbone)
    report = load_weights(pspnet, path)
    assert report.format == "pspnet" and any(k.startswith("encoder.") for k in report.ignored)
    assert_same(pspnet.state_dict(), source.state_dict())

    for model, prefix in ((tiny("bam", backbone), ""), (tiny("sam_rsp", backbone), "rspg.")):
        before = model.state_dict()
        untouched = {k: v.clone() for k, v in before.items()
                     if k.startswith(prefix) and not k[len(prefix):].startswith(("layer", "learner_base"))}
        load_weights(model, path)
        bam = sub_state(model, prefix)
        assert_same({k: v for k, v in bam.items() if k.startswith("layer")},
                    {k: v for k, v in source.state_dict().items() if k.startswith("layer")})
        assert_same({k: v for k, v in bam.items() if k.startswith("learner_base.0.")},
                    {"learner_base.0." + k[4:]: v for k, v in source.state_dict().items() if k.startswith("ppm.")})
        assert_same({k: v for k, v in bam.items() if k.startswith("learner_base.1.")},
                    {"learner_base.1." + k[4:]: v for k, v in source.state_dict().items() if k.startswith("cls.")})
        after = model.state_dict()
        assert all(torch.equal(after[k], v) for k, v in untouched.items())


def test_imagenet_deep_stem_resnet_into_pspnet(tmp_path):
    source = tiny("base", "resnet50", seed=1)
    stem = {"layer0.0.": "conv1.", "layer0.1.": "bn1.", "layer0.3.": "conv2.", "layer0.4.": "bn2.",
            "layer0.6.": "conv3.", "layer0.7.": "bn3."}
    state = {}
    for key, value in source.state_dict().items():
        if not key.startswith("layer") or key.endswith("num_batches_tracked"):  # old files lack the counters
            continue
        for ours, theirs in stem.items():
            if key.startswith(ours):
                key = theirs + key[len(ours):]
        state[key] = value
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 256), torch.randn(1000)
    path = tmp_path / "resnet50_v2.pth"
    torch.save(state, path)
    for model, prefix in ((tiny("base"), ""), (tiny("bam"), ""), (tiny("sam_rsp"), "rspg.")):
        report = load_weights(model, path)
        assert report.format == "imagenet_resnet" and "fc.weight" in report.ignored
        expected = {k: v for k, v in source.state_dict().items()
                    if k.startswith("layer") and not k.endswith("num_batches_tracked")}
        got = {k: v for k, v in sub_state(model, prefix).items() if k in expected}
        assert_same(got, expected)
    vgg = tiny("base", "vgg16_bn")
    with pytest.raises(CheckpointError, match="VGG16-bn backbone"):
        load_weights(vgg, path)


def test_imagenet_vgg_features_into_the_backbone(tmp_path):
    source = tiny("base", "vgg16_bn", seed=1)
    state = {}
    for key, value in source.state_dict().items():
        if key.startswith("layer"):
            layer, local, rest = key[len("layer"):].split(".", 2)
            state[f"features.{VGG16_CUTS[int(layer)][0] + int(local)}.{rest}"] = value
    assert "features.40.weight" in state and "features.44.weight" not in state
    state["classifier.0.weight"] = torch.randn(10, 5)
    path = tmp_path / "vgg16_bn.pth"
    torch.save(state, path)
    model = tiny("sam_rsp", "vgg16_bn")
    report = load_weights(model, path)
    assert report.format == "imagenet_vgg" and report.ignored == ["classifier.0.weight"]
    assert_same({k: v for k, v in sub_state(model, "rspg.").items() if k.startswith("layer")},
                {k: v for k, v in source.state_dict().items() if k.startswith("layer")})


def test_sam_file_into_the_encoder(tmp_path):
    source = tiny("sam_rsp", seed=1)
    state = {"image_encoder." + k: v for k, v in source.image_encoder.state_dict().items()}
    state["prompt_encoder.point_embeddings.0.weight"] = torch.randn(1, 32)
    state["mask_decoder.iou_token.weight"] = torch.randn(1, 32)
    path = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save(state, path)
    model = tiny("sam_rsp")
    report = load_weights(model, path)
    assert report.format == "sam"
    assert sorted(report.ignored) == ["mask_decoder.iou_token.weight", "prompt_encoder.point_embeddings.0.weight"]
    assert "ignored" in str(report) and "prompt encoder" in str(report)
    assert_same(model.image_encoder.state_dict(), source.image_encoder.state_dict())
    encoder_only = tmp_path / "encoder_only.pth"
    torch.save({k: v for k, v in state.items() if k.startswith("image_encoder.")}, encoder_only)
    load_weights(tiny("sam_rsp", seed=3).image_encoder, encoder_only)


@pytest.mark.parametrize("shot", [1, 5])
def test_bam_file_with_module_prefix(tmp_path, shot):
    source = tiny("bam", "vgg16_bn", shot=shot, seed=1)
    assert any(k.startswith("kshot_rw.") for k in source.state_dict()) == (shot > 1)
    path = tmp_path / "bam.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in source.state_dict().items()}, "epoch": 1}, path)
    bam = tiny("bam", "vgg16_bn", shot=shot)
    report = load_weights(bam, path)
    assert report.format == "bam_original" and "'module.' prefix removed" in report.notes
    assert_same(bam.state_dict(), source.state_dict())
    sam_rsp = tiny("sam_rsp", "vgg16_bn", shot=shot)
    load_weights(sam_rsp, path)
    assert_same(sub_state(sam_rsp, "rspg."), source.state_dict())


@pytest.mark.parametrize("prefix", ["", "module."])
def test_original_sam_rsp_file(tmp_path, prefix):
    source = tiny("sam_rsp", seed=1)
    renames = {"rspg.": "Bam.", "image_encoder.": "feature_extractor.", "decoder.": ""}
    state = {}
    for key, value in source.state_dict().items():
        for ours, theirs in renames.items():
            if key.startswith(ours):
                state[prefix + theirs + key[len(ours):]] = value
                break
    assert "init_merge.0.weight" in {k[len(prefix):] for k in state}
    path = tmp_path / "sam_rsp.pth"
    torch.save({"state_dict": state, "epoch": 7, "optimizer": {}}, path)
    model = tiny("sam_rsp")
    assert load_weights(model, path).format == "sam_rsp_original"
    assert_same(model.state_dict(), source.state_dict())
    with pytest.raises(CheckpointError, match="loads into SAMRSP"):
        load_weights(tiny("bam"), path)


# --------------------------------------------------------------------------------------------
# Our format
# --------------------------------------------------------------------------------------------

def our_checkpoint(tmp_path):
    """A trained SAM-RSP saved our way: trainable head + references to the frozen files."""
    source = tiny("sam_rsp", seed=1)
    bam_path, sam_path = tmp_path / "bam.pth", tmp_path / "sam.pth"
    torch.save({"state_dict": sub_state(source, "rspg.")}, bam_path)
    torch.save({"image_encoder." + k: v for k, v in source.image_encoder.state_dict().items()}, sam_path)
    ckpt = {"format": "sam-rsp/1", "model": trainable_state_dict(source), "epoch": 4, "optimizer": {"state": {}},
            "frozen": [{"prefix": "rspg.", "path": str(bam_path), "sha256": sha256_file(bam_path)},
                       {"prefix": "image_encoder.", "path": str(sam_path), "sha256": sha256_file(sam_path)}]}
    path = tmp_path / "ours.pth"
    torch.save(ckpt, path)
    return source, path, ckpt


def test_our_checkpoint_round_trip(tmp_path):
    source, path, ckpt = our_checkpoint(tmp_path)
    assert set(ckpt["model"]) == {k for k in source.state_dict() if k.startswith("decoder.")}
    model = tiny("sam_rsp", seed=5)
    report = load_weights(model, path)
    assert report.format == "sam-rsp/1" and len(report.parts) == 2
    assert_same(model.state_dict(), source.state_dict())


def test_our_checkpoint_checks_the_frozen_files(tmp_path):
    source, path, ckpt = our_checkpoint(tmp_path)
    bad = dict(ckpt, frozen=[dict(ckpt["frozen"][0], sha256="0" * 64), ckpt["frozen"][1]])
    torch.save(bad, tmp_path / "bad_sha.pth")
    with pytest.raises(CheckpointError, match="sha256") as err:
        load_weights(tiny("sam_rsp"), tmp_path / "bad_sha.pth")
    assert str(tmp_path / "bam.pth") in str(err.value)
    (tmp_path / "sam.pth").unlink()
    with pytest.raises(CheckpointError, match="does not exist") as err:
        load_weights(tiny("sam_rsp"), path)
    assert str(tmp_path / "sam.pth") in str(err.value)
    partial = dict(ckpt, frozen=ckpt["frozen"][:1])
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match=r"missing .*\n\s+image_encoder\.\*"):
        load_weights(tiny("sam_rsp"), tmp_path / "partial.pth")


def test_trainable_state_dict_of_each_stage():
    assert set(trainable_state_dict(tiny("base"))) == set(tiny("base").state_dict())
    bam_keys = set(trainable_state_dict(tiny("bam", shot=5)))
    assert bam_keys and not any(k.startswith(("layer", "learner_base")) for k in bam_keys)
    assert "kshot_rw.0.weight" in bam_keys and "gram_merge.weight" in bam_keys
    assert all(k.startswith("decoder.") for k in trainable_state_dict(tiny("sam_rsp")))


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------

def test_strict_errors_list_the_keys(tmp_path):
    source = tiny("bam", seed=1)
    state = dict(source.state_dict())
    for key in [k for k in state if k.startswith("layer3.")]:
        del state[key]
    del state["layer4.0.conv1.weight"]
    state["extra_head.weight"] = torch.zeros(3)
    state["init_merge.0.weight"] = torch.zeros(5, 5, 1, 1)
    path = tmp_path / "broken.pth"
    torch.save({"state_dict": state}, path)
    with pytest.raises(CheckpointError) as err:
        load_weights(tiny("bam"), path)
    message = str(err.value)
    n_layer3 = sum(k.startswith("layer3.") and not k.endswith("num_batches_tracked") for k in source.state_dict())
    assert str(path) in message
    assert f"layer3.* ({n_layer3})" in message and "layer4.0.conv1.weight" in message
    assert "unexpected" in message and "extra_head.weight" in message
    assert "init_merge.0.weight: file [5, 5, 1, 1] vs model [32, 65, 1, 1]" in message
    assert len(message.splitlines()) < 40


def test_torchvision_resnet_is_refused(tmp_path):
    state = {"conv1.weight": torch.zeros(64, 3, 7, 7), "bn1.weight": torch.zeros(64),
             "layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1), "fc.weight": torch.zeros(1000, 2048)}
    path = tmp_path / "resnet50-0676ba61.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="resnet50_v2.pth") as err:
        load_weights(tiny("base"), path)
    assert "7x7" in str(err.value)


def test_unrecognised_and_missing_files(tmp_path):
    path = tmp_path / "weird.pth"
    torch.save({"foo.weight": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="accepted formats") as err:
        load_weights(tiny("base"), path)
    assert "sam_vit" in str(err.value) and str(path) in str(err.value)
    with pytest.raises(CheckpointError, match="not found") as err:
        load_weights(tiny("base"), tmp_path / "nowhere.pth")
    assert str(tmp_path / "nowhere.pth") in str(err.value)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_weights(tiny("base"), junk)


# --------------------------------------------------------------------------------------------
# load_pretrained_parts
# --------------------------------------------------------------------------------------------

def test_pretrained_parts_errors_name_the_key_and_the_file(tmp_path, capsys):
    cfg = tiny_config(extra=["model.sam.checkpoint=''", "model.sam.type=vit_b"])
    with pytest.raises(CheckpointError) as err:
        load_pretrained_parts(build_model(cfg), cfg, "sam_rsp")
    message = str(err.value)
    assert "model.rspg.checkpoint" in message and "does not exist" in message and "BAM" in message

    cfg = tiny_config(extra=["model.sam.checkpoint=''", "model.sam.type=vit_b",
                             f"model.rspg.checkpoint={tmp_path}/bam.pth"])
    torch.save({"state_dict": tiny("bam", seed=1).state_dict()}, tmp_path / "bam.pth")
    with pytest.raises(CheckpointError) as err:
        load_pretrained_parts(build_model(cfg), cfg, "sam_rsp")
    message = str(err.value)
    assert "model.sam.checkpoint" in message and "sam_vit_b_01ec64.pth" in message
    assert "github.com/facebookresearch/segment-anything" in message

    cfg = tiny_config(extra=["model.backbone_checkpoint=''"])
    with pytest.raises(CheckpointError, match="model.backbone_checkpoint") as err:
        load_pretrained_parts(build_model(cfg, "base"), cfg, "base")
    assert "resnet50_v2.pth" in str(err.value)


def test_pretrained_parts_load_and_reference(tmp_path, capsys):
    source = tiny("sam_rsp", seed=1)
    torch.save({"state_dict": sub_state(source, "rspg.")}, tmp_path / "bam_split{split}.pth".format(split=0))
    torch.save({"image_encoder." + k: v for k, v in source.image_encoder.state_dict().items()}, tmp_path / "sam.pth")
    cfg = tiny_config(extra=[f"model.rspg.checkpoint={tmp_path}/bam_split{{split}}.pth",
                             f"model.sam.checkpoint={tmp_path}/sam.pth"])
    model = build_model(cfg)
    parts = load_pretrained_parts(model, cfg)
    assert [p.prefix for p in parts] == ["rspg.", "image_encoder."]
    assert parts[0].sha256 == sha256_file(tmp_path / "bam_split0.pth")
    assert_same(sub_state(model, "rspg."), sub_state(source, "rspg."))
    assert_same(sub_state(model, "image_encoder."), sub_state(source, "image_encoder."))

    # An empty path with allow_random_init: a warning, nothing loaded.
    cfg = tiny_config(extra=["model.allow_random_init=true", "model.rspg.checkpoint=''",
                             f"model.sam.checkpoint={tmp_path}/sam.pth"])
    parts = load_pretrained_parts(build_model(cfg), cfg)
    assert [p.prefix for p in parts] == ["image_encoder."]
    assert "WARNING" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Training checkpoints (used by util.engine)
# --------------------------------------------------------------------------------------------

def test_training_payload_round_trip(tmp_path):
    from util.checkpoint import (capture_rng_state, checkpoint_payload, read_checkpoint, restore_rng_state,
                                 restore_training_weights, save_checkpoint)
    source = tiny("bam", seed=1)
    psp = tiny("base", seed=2)
    torch.save({"state_dict": psp.state_dict()}, tmp_path / "best_psp.pth")
    cfg = tiny_config(extra=[f"model.base_learner.checkpoint={tmp_path}/best_psp.pth"])
    refs = load_pretrained_parts(source, cfg, "bam")
    optimizer = torch.optim.SGD([p for p in source.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    payload = checkpoint_payload(source, stage="bam", frozen_refs=refs, optimizer=optimizer,
                                 train_state={"epoch": 2}, rng=capture_rng_state(), config=cfg)
    path = save_checkpoint(payload, tmp_path / "run" / "last.pth")
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["last.pth"]   # no temporary left behind
    back = read_checkpoint(path)                        # weights_only=True inside
    assert back["frozen"] == [{"prefix": "", "path": str(tmp_path / "best_psp.pth"),
                               "sha256": sha256_file(tmp_path / "best_psp.pth")}]
    assert back["config"]["model"]["backbone"] == "resnet50" and back["train_state"] == {"epoch": 2}

    resumed = tiny("bam", seed=3)
    load_pretrained_parts(resumed, cfg, "bam")
    restore_training_weights(resumed, back, expected_stage="bam", frozen_refs=refs)
    assert_same(resumed.state_dict(), source.state_dict())
    with pytest.raises(CheckpointError, match="stage 'bam'"):
        restore_training_weights(resumed, back, expected_stage="sam_rsp")
    fresh = tiny("bam", seed=4)                         # load_weights follows the frozen reference itself
    load_weights(fresh, path, require_complete=True)
    assert_same(fresh.state_dict(), source.state_dict())
    in_sam_rsp = tiny("sam_rsp", seed=5)                # a stage-2 checkpoint goes to SAMRSP.rspg
    report = load_weights(in_sam_rsp, path)
    assert report.target == "SAMRSP.rspg" and all(k.startswith("rspg.") for k in report.loaded)
    assert_same(sub_state(in_sam_rsp, "rspg."), source.state_dict())

    import random
    import numpy as np
    restore_rng_state(back["rng"])                      # the state as saved (and read back weights_only)
    expected = (torch.rand(3), np.random.rand(2), random.random())
    restore_rng_state(back["rng"])
    again = (torch.rand(3), np.random.rand(2), random.random())
    assert torch.equal(expected[0], again[0]) and (expected[1] == again[1]).all() and expected[2] == again[2]
    with pytest.raises(CheckpointError, match="not a checkpoint of this project"):
        read_checkpoint(tmp_path / "best_psp.pth")


def test_stage_base_payload_references_no_frozen_file(tmp_path):
    from util.checkpoint import PretrainedPart, checkpoint_payload
    model = tiny("base")
    payload = checkpoint_payload(model, stage="base", frozen_refs=[PretrainedPart("", "initmodel/x.pth", "ab")])
    assert payload["frozen"] == [] and set(payload["model"]) == set(model.state_dict())


def test_randomly_initialised_frozen_parts_travel_with_the_checkpoint(tmp_path):
    """The toy trains SAM-RSP on a random frozen SAM encoder: no file provides it, so the
    checkpoint must hold it (while a frozen part loaded from a file is only referenced)."""
    from util.checkpoint import checkpoint_payload, save_checkpoint
    source = tiny("sam_rsp", seed=1)
    torch.save({"state_dict": source.rspg.state_dict()}, tmp_path / "bam.pth")   # an original BAM file
    cfg = tiny_config(extra=["model.allow_random_init=true", "model.sam.checkpoint=''",
                             f"model.rspg.checkpoint={tmp_path}/bam.pth"])
    refs = load_pretrained_parts(source, cfg)
    payload = checkpoint_payload(source, stage="sam_rsp", frozen_refs=refs)
    assert [e["prefix"] for e in payload["frozen"]] == ["rspg."]
    assert not any(k.startswith("rspg.") for k in payload["model"])
    assert any(k.startswith("image_encoder.") for k in payload["model"])
    save_checkpoint(payload, tmp_path / "ckpt.pth")
    fresh = tiny("sam_rsp", seed=9)
    load_weights(fresh, tmp_path / "ckpt.pth", require_complete=True)
    assert_same(fresh.state_dict(), source.state_dict())


def test_require_complete_refuses_partial_files(tmp_path):
    source = tiny("sam_rsp", seed=1)
    torch.save({"image_encoder." + k: v for k, v in source.image_encoder.state_dict().items()}, tmp_path / "sam.pth")
    model = tiny("sam_rsp")
    assert load_weights(model, tmp_path / "sam.pth").summary() == "sam -> SAMRSP.image_encoder: 37 tensors"
    with pytest.raises(CheckpointError, match="fills only part") as err:
        load_weights(model, tmp_path / "sam.pth", require_complete=True)
    assert "rspg.* (" in str(err.value) and "decoder.* (" in str(err.value)
