"""Config system: inheritance, overrides, strict keys and types, saving."""
from pathlib import Path

import pytest
import yaml

from util.config import ConfigError, load_config, resolve_path, save_config, PROJECT_ROOT


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_come_from_base_yaml():
    cfg = load_config()
    assert cfg.data.shot == 1 and cfg.train.stage == "sam_rsp"
    assert cfg.eval.seeds == [556, 716, 418, 485, 575]
    assert cfg["model"]["decoder"]["depth"] == 3


def test_base_inheritance_chain_relative_to_each_file(tmp_path):
    write(tmp_path / "common" / "a.yaml", "data: {shot: 5, split: 1}\ntrain: {bam: {lr: 0.5}}\n")
    write(tmp_path / "common" / "b.yaml", "_base_: a.yaml\ndata: {split: 2}\n")
    child = write(tmp_path / "exp" / "c.yaml", "_base_: ../common/b.yaml\ntrain: {bam: {epochs: 3}}\n")
    cfg = load_config(child)
    assert cfg.data.shot == 5            # from a
    assert cfg.data.split == 2           # b overrides a
    assert cfg.train.bam.lr == 0.5 and cfg.train.bam.epochs == 3
    assert cfg.train.bam.batch_size == 8  # untouched default


def test_multiple_bases_later_wins(tmp_path):
    write(tmp_path / "x.yaml", "data: {shot: 2}\n")
    write(tmp_path / "y.yaml", "data: {shot: 3}\n")
    cfg = load_config(write(tmp_path / "z.yaml", "_base_: [x.yaml, y.yaml]\n"))
    assert cfg.data.shot == 3


def test_overrides_are_dotted_and_parsed_as_yaml(tmp_path):
    cfg = load_config(None, ["data.shot=5", "model.backbone=vgg16_bn", "train.bam.lr=1e-3",
                             "eval.seeds=[1, 2]", "model.sam.depth=2", "train.amp=true", "output_dir="])
    assert cfg.data.shot == 5 and cfg.model.backbone == "vgg16_bn"
    assert cfg.train.bam.lr == pytest.approx(1e-3) and isinstance(cfg.train.bam.lr, float)
    assert cfg.eval.seeds == [1, 2] and cfg.model.sam.depth == 2 and cfg.train.amp is True
    assert cfg.output_dir == ""


def test_int_is_accepted_for_float_keys():
    cfg = load_config(None, ["train.sam_rsp.lr=1"])
    assert cfg.train.sam_rsp.lr == 1.0 and isinstance(cfg.train.sam_rsp.lr, float)


def test_unknown_key_names_key_and_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'train.sam_rsp.lrr'.*train.sam_rsp.lr"):
        load_config(None, ["train.sam_rsp.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"'train.shot'.*data.shot"):
        load_config(None, ["train.shot=5"])
    bad = write(tmp_path / "bad.yaml", "model: {sam: {embed_dimm: 3}}\n")
    with pytest.raises(ConfigError, match=r"model.sam.embed_dimm.*bad.yaml.*model.sam.embed_dim"):
        load_config(bad)


def test_type_change_is_an_error():
    with pytest.raises(ConfigError, match=r"data.shot.*expects int.*got str"):
        load_config(None, ["data.shot=five"])
    with pytest.raises(ConfigError, match=r"train.amp.*expects bool"):
        load_config(None, ["train.amp=1"])
    with pytest.raises(ConfigError, match=r"'data' .*section"):
        load_config(None, ["data=3"])
    with pytest.raises(ConfigError, match=r"key=value"):
        load_config(None, ["data.shot"])


def test_null_defaults_accept_values():
    cfg = load_config(None, ["model.sam.global_attn_indexes=[1]", "model.sam.embed_dim=64"])
    assert cfg.model.sam.global_attn_indexes == [1] and cfg.model.sam.embed_dim == 64


def test_missing_and_circular_bases(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(write(tmp_path / "a.yaml", "_base_: nope.yaml\n"))
    write(tmp_path / "p.yaml", "_base_: q.yaml\n")
    write(tmp_path / "q.yaml", "_base_: p.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "p.yaml")


def test_effective_config_round_trips(tmp_path):
    cfg = load_config(None, ["data.shot=5", "eval.seeds=[7]"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    tree = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert tree["data"]["shot"] == 5
    again = load_config(tmp_path / "run" / "config.yaml")
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("path", sorted(str(p.relative_to(PROJECT_ROOT)) for p in (PROJECT_ROOT / "config").rglob("*.yaml")))
def test_every_shipped_config_loads(path):
    from util.folds import make_fold
    from util.stages import STAGES
    cfg = load_config(PROJECT_ROOT / path)
    assert cfg.train.stage in STAGES
    assert cfg.data.dataset in ("pascal", "coco", "toy", "custom", "cocostuff10k", "ade20k")
    if cfg.data.dataset != "custom":      # the class split of the config's fold is defined (custom: from the folders)
        assert make_fold(cfg.data).num_classes > 0


def test_user_facing_configs_have_original_values():
    cfg = load_config(PROJECT_ROOT / "config/coco/coco_split3_resnet101.yaml")
    assert cfg.data.split == 3 and cfg.model.backbone == "resnet101" and cfg.data.train_size == 641
    assert cfg.train.sam_rsp.lr == 0.01 and cfg.train.sam_rsp.epochs == 50 and cfg.train.bam.lr == 0.05
    assert str(resolve_path(cfg.model.rspg.checkpoint, cfg)).endswith(
        "initmodel/BAM/coco/split3/resnet101/1shot/best.pth")
    cfg5 = load_config(PROJECT_ROOT / "config/pascal/pascal_split1_vgg.yaml", ["data.shot=5"])
    assert str(resolve_path(cfg5.model.rspg.checkpoint, cfg5)).endswith("initmodel/BAM/pascal/split1/vgg/5shot/best.pth")
    assert cfg5.train.base.lr_backbone == 2.5e-4 and cfg5.train.base.crop_size == 417
