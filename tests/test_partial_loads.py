"""A weight file given where another is expected is refused, never half-loaded: every frozen part
a stage needs must be filled completely by its file (util.checkpoint.REQUIRED_KEYS), and
``weights=`` of test.py / the predictor must fill the whole model. Each error names the file, what
it holds, what was expected and the groups of keys left out (or in excess)."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import ROOT
from model import build_model
from util.checkpoint import (CheckpointError, checkpoint_payload, load_pretrained_parts, load_weights,
                             save_checkpoint)
from util.config import load_config

TINY = ["model.backbone_width=8", "model.backbone_blocks=[1,1,1,1]", "model.rspg.reduce_dim=32",
        "model.base_learner.hidden_dim=32", "model.sam.embed_dim=32", "model.sam.depth=2", "model.sam.num_heads=2",
        "model.sam.global_attn_indexes=[1]", "model.sam.img_size=128", "model.sam.patch_size=16",
        "model.sam.out_chans=32", "model.decoder.num_heads=4", "device=cpu"]
# stage sam_rsp with a random SAM encoder: only the prompt generator's file is under test
NO_SAM = ["model.allow_random_init=true", "model.sam.checkpoint=''"]


def tiny_config(backbone="resnet50", shot=1, extra=()):
    return load_config(None, TINY + [f"model.backbone={backbone}", f"data.shot={shot}", *extra])


def tiny(stage, backbone="resnet50", shot=1, seed=0, extra=()):
    torch.manual_seed(seed)
    return build_model(tiny_config(backbone, shot, extra), stage)


def original_pspnet(path, backbone="resnet50"):
    """A PSPNet best.pth as the PSPNet/BAM authors' code writes it (layer0..4 also as encoder.*)."""
    state = dict(tiny("base", backbone, seed=1).state_dict())
    state.update({"encoder." + k[len("layer"):]: v for k, v in list(state.items()) if k.startswith("layer")})
    torch.save({"state_dict": state, "epoch": 3}, path)
    return path


def original_bam(path, backbone="resnet50", shot=1, extra=()):
    torch.save({"state_dict": tiny("bam", backbone, shot, seed=1, extra=extra).state_dict()}, path)
    return path


def our_base(path):
    """The best.pth of a stage-base run of this project."""
    return save_checkpoint(checkpoint_payload(tiny("base", seed=1), stage="base"), path)


def our_bam(tmp_path, shot=1):
    """The best.pth of a stage-bam run of this project (its frozen PSPNet referenced by path)."""
    psp = original_pspnet(tmp_path / f"psp_for_bam{shot}.pth")
    cfg = tiny_config(shot=shot, extra=[f"model.base_learner.checkpoint={psp}"])
    bam = build_model(cfg, "bam")
    refs = load_pretrained_parts(bam, cfg, "bam")
    return save_checkpoint(checkpoint_payload(bam, stage="bam", frozen_refs=refs, config=cfg),
                           tmp_path / f"bam{shot}_ours.pth")


def rspg_error(path, backbone="resnet50", shot=1, extra=()) -> str:
    """The error of stage sam_rsp given ``path`` as model.rspg.checkpoint."""
    cfg = tiny_config(backbone, shot, [*NO_SAM, f"model.rspg.checkpoint={path}", *extra])
    with pytest.raises(CheckpointError) as err:
        load_pretrained_parts(build_model(cfg, "sam_rsp"), cfg, "sam_rsp")
    message = str(err.value)
    assert str(path) in message and "model.rspg.checkpoint" in message and "BAM prompt generator" in message
    return message


def weights_error(path, stage="sam_rsp", backbone="resnet50", shot=1) -> str:
    """The error of load_weights(..., require_complete=True) -- what test.py and the predictor do."""
    with pytest.raises(CheckpointError) as err:
        load_weights(tiny(stage, backbone, shot), path, require_complete=True)
    message = str(err.value)
    assert str(path) in message and ("expected here" in message or "is needed here" in message)
    return message


META_LEARNER = ["rspg.down_query.0.weight", "rspg.down_supp.0.weight", "rspg.init_merge.0.weight",
                "rspg.ASPP_meta.* (", "rspg.res2_meta.* (", "rspg.cls_meta.* (", "rspg.gram_merge.weight",
                "rspg.cls_merge.weight"]


# --------------------------------------------------------------------------------------------
# A PSPNet (or ImageNet) file where the BAM prompt generator is expected (stage sam_rsp)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["original", "ours"])
def test_pspnet_file_as_the_prompt_generator_is_refused(tmp_path, kind):
    path = original_pspnet(tmp_path / "best.pth") if kind == "original" else our_base(tmp_path / "best.pth")
    message = rspg_error(path)
    assert "holds a PSPNet base learner (stage base" in message
    assert "stage sam_rsp expects the BAM prompt generator" in message and "train.stage=bam" in message
    assert "RANDOM" in message and "left unloaded" in message
    for group in META_LEARNER:
        assert group in message, (group, message)
    assert "rspg.layer" not in message and "rspg.learner_base" not in message   # those it did fill
    assert f"model.base_learner.checkpoint={path}" in message                  # what to do instead


def imagenet_resnet(path):
    """A deep-stem ImageNet ResNet file (resnet50_v2.pth layout)."""
    state = {k: v for k, v in tiny("base", seed=1).state_dict().items() if k.startswith("layer")}
    stem = {"layer0.0.": "conv1.", "layer0.1.": "bn1.", "layer0.3.": "conv2.", "layer0.4.": "bn2.",
            "layer0.6.": "conv3.", "layer0.7.": "bn3."}
    renamed = {}
    for key, value in state.items():
        for ours, theirs in stem.items():
            if key.startswith(ours):
                key = theirs + key[len(ours):]
        renamed[key] = value
    torch.save(renamed, path)
    return path


def test_imagenet_file_as_the_prompt_generator_is_refused(tmp_path):
    path = imagenet_resnet(tmp_path / "resnet50_v2.pth")
    message = rspg_error(path)
    assert "only ImageNet weights" in message and "rspg.learner_base.* (" in message
    assert "rspg.down_query.0.weight" in message

    # ... and where stage bam expects the PSPNet base learner: learner_base stays random
    cfg = tiny_config(extra=[f"model.base_learner.checkpoint={path}"])
    with pytest.raises(CheckpointError) as err:
        load_pretrained_parts(build_model(cfg, "bam"), cfg, "bam")
    message = str(err.value)
    assert str(path) in message and "model.base_learner.checkpoint" in message
    assert "only ImageNet weights" in message and "expects the PSPNet base learner" in message
    assert "learner_base.* (" in message and "train.stage=base" in message
    assert "layer1" not in message.split("left unloaded")[1]     # the backbone it did fill


def test_imagenet_file_as_the_sccan_prompt_generator_is_refused(tmp_path):
    """model.rspg.type=sccan: the file must fill the whole SCCAN, not only its frozen backbone."""
    path = imagenet_resnet(tmp_path / "resnet50_v2.pth")
    cfg = tiny_config(extra=[*NO_SAM, "model.rspg.type=sccan", f"model.rspg.checkpoint={path}"])
    with pytest.raises(CheckpointError) as err:
        load_pretrained_parts(build_model(cfg, "sam_rsp"), cfg, "sam_rsp")
    message = str(err.value)
    assert str(path) in message and "model.rspg.checkpoint" in message and "SCCAN prompt generator" in message
    assert "only ImageNet weights" in message and "rspg.transformer.* (" in message
    assert "rspg.down_query.0.weight" in message and "train.stage=sccan" in message
    # ... while stage sccan itself needs only that backbone from it
    cfg = tiny_config(extra=[f"model.backbone_checkpoint={path}"])
    assert [p.prefix for p in load_pretrained_parts(build_model(cfg, "sccan"), cfg, "sccan")] == [""]


def test_stage_bam_needs_only_the_backbone_and_base_learner_from_the_pspnet(tmp_path):
    """The legitimate partial load: the meta learner is what stage bam trains."""
    path = original_pspnet(tmp_path / "best.pth")
    cfg = tiny_config(extra=[f"model.base_learner.checkpoint={path}"])
    model = build_model(cfg, "bam")
    parts = load_pretrained_parts(model, cfg, "bam")
    assert [p.prefix for p in parts] == [""]
    assert {k.split(".")[0] for k in parts[0].keys} == {"layer0", "layer1", "layer2", "layer3", "layer4",
                                                        "learner_base"}


@pytest.mark.parametrize("kind", ["original", "ours"])
def test_a_whole_bam_is_accepted_as_the_prompt_generator(tmp_path, kind):
    path = original_bam(tmp_path / "bam.pth") if kind == "original" else our_bam(tmp_path)
    cfg = tiny_config(extra=[*NO_SAM, f"model.rspg.checkpoint={path}"])
    parts = load_pretrained_parts(build_model(cfg, "sam_rsp"), cfg, "sam_rsp")
    assert [p.prefix for p in parts] == ["rspg."]


def test_train_py_reports_a_pspnet_prompt_generator_without_traceback(tmp_path, capsys):
    import train
    path = original_pspnet(tmp_path / "best.pth")
    code = train.main([str(ROOT / "config" / "base.yaml"), *TINY, *NO_SAM, "train.stage=sam_rsp",
                       f"model.rspg.checkpoint={path}", f"output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and "error: config key model.rspg.checkpoint" in err and "Traceback" not in err
    assert str(path) in err and "PSPNet base learner (stage base)" in err and "rspg.down_query.0.weight" in err


# --------------------------------------------------------------------------------------------
# A BAM file where SAM-RSP weights are expected (weights= of test.py and of the predictor)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["original", "ours"])
def test_bam_file_as_sam_rsp_weights_is_refused(tmp_path, kind):
    path = original_bam(tmp_path / "bam.pth") if kind == "original" else our_bam(tmp_path)
    message = weights_error(path)
    holds = "an original BAM checkpoint" if kind == "original" else "stage bam; a checkpoint of this project"
    assert f"holds a BAM prompt generator (" in message and holds in message
    assert "a whole SAM-RSP model (stage sam_rsp" in message and "fills only part of the SAMRSP" in message
    assert "decoder.* (" in message and "image_encoder.* (" in message and "rspg" not in message.split(":\n")[-1]
    assert "train.stage=bam" in message


def test_test_entry_refuses_bam_weights(tmp_path):
    from util.engine import test
    path = original_bam(tmp_path / "bam.pth")
    cfg = tiny_config(extra=[f"weights={path}", f"output_dir={tmp_path / 'test'}"])
    with pytest.raises(CheckpointError) as err:
        test(cfg)
    message = str(err.value)
    assert str(path) in message and "a whole SAM-RSP model" in message
    assert "decoder.* (" in message and "image_encoder.* (" in message


def test_predictor_refuses_bam_weights(tmp_path):
    from util.predictor import Predictor
    path = our_bam(tmp_path)
    with pytest.raises(CheckpointError) as err:
        Predictor.from_cfg(tiny_config(), weights=str(path))
    message = str(err.value)
    assert str(path) in message and "holds a BAM prompt generator (stage bam" in message
    assert "a whole SAM-RSP model" in message and "decoder.* (" in message and "image_encoder.* (" in message


def test_pspnet_file_as_bam_weights_is_refused(tmp_path):
    """test.py with train.stage=bam: a PSPNet fills BAM's backbone and learner_base only."""
    path = original_pspnet(tmp_path / "best.pth")
    message = weights_error(path, stage="bam")
    assert "holds a PSPNet base learner (stage base)" in message and "a whole BAM (stage bam" in message
    assert "down_query.0.weight" in message and "ASPP_meta.* (" in message


# --------------------------------------------------------------------------------------------
# Another backbone
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backbone", ["vgg16_bn", "wider"])
def test_prompt_generator_of_another_backbone_is_refused(tmp_path, backbone):
    path = original_bam(tmp_path / "bam_resnet50.pth")
    if backbone == "wider":
        message = rspg_error(path, extra=["model.backbone_width=16"])
        assert "shape mismatch" in message and "layer0.0.weight: file [8, 3, 3, 3] vs model [16, 3, 3, 3]" in message
    else:
        message = rspg_error(path, backbone="vgg16_bn")
        assert "missing (in the model, not in the file)" in message and "layer1.* (" in message
        assert "unexpected (in the file, not in the model)" in message and "layer0.7.* (" in message
    assert "backbone layers (layer0..layer4) differ" in message


def test_sam_rsp_weights_of_another_backbone_are_refused(tmp_path):
    source = tiny("sam_rsp", "vgg16_bn", seed=1)
    renames = {"rspg.": "Bam.", "image_encoder.": "feature_extractor.", "decoder.": ""}
    state = {}
    for key, value in source.state_dict().items():
        ours = next(p for p in renames if key.startswith(p))
        state[renames[ours] + key[len(ours):]] = value
    path = tmp_path / "sam_rsp_vgg.pth"
    torch.save({"state_dict": state}, path)
    message = weights_error(path, backbone="resnet50")
    assert "backbone layers (layer0..layer4) differ" in message and "a whole SAM-RSP model" in message
    assert "rspg.layer1.* (" in message and "unexpected" in message


# --------------------------------------------------------------------------------------------
# Another shot count (a K-shot BAM has the kshot_rw weighting, a 1-shot one has none)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("file_shot, model_shot", [(5, 1), (1, 5)])
def test_prompt_generator_of_another_shot_count_is_refused(tmp_path, file_shot, model_shot):
    for path in (original_bam(tmp_path / f"bam{file_shot}.pth", shot=file_shot), our_bam(tmp_path, file_shot)):
        message = rspg_error(path, shot=model_shot)
        if file_shot > model_shot:
            assert "unexpected (in the file, not in the model) 4 keys:\n    kshot_rw.* (4)" in message
            assert "trained for data.shot > 1" in message
        else:
            assert "missing (in the model, not in the file) 4 keys:\n    kshot_rw.* (4)" in message
            assert "trained 1-shot" in message


@pytest.mark.parametrize("file_shot, model_shot", [(5, 1), (1, 5)])
def test_weights_of_another_shot_count_are_refused(tmp_path, file_shot, model_shot):
    path = our_bam(tmp_path, file_shot)
    message = weights_error(path, stage="bam", shot=model_shot)
    side = "unexpected (in the file, not in the model)" if file_shot > model_shot else \
        "missing (in the model, not in the file)"
    assert f"{side} 4 keys:\n    kshot_rw.* (4)" in message
    assert "expected here: a whole BAM (stage bam" in message
