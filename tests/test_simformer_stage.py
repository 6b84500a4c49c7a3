"""Stage ``simformer``: the weak-shot data rules on a tiny VOC tree, the refused inputs, the
metric by hand, the report, and a tiny train + test through util.engine on the toy."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from tests.conftest import data_overrides, small_voc_images, write_voc_tree
from util.config import ConfigError, load_config
from util.io import DataError
from util.stages import STAGES, get_stage

ROOT = Path(__file__).resolve().parent.parent

# a SimFormer small enough for seconds on a CPU (GroupNorm needs conv_dim % 32 == 0)
TINY_MODEL = ["model.simformer.backbone_blocks=[1, 1, 1, 1]", "model.simformer.conv_dim=32",
              "model.simformer.mask_dim=16", "model.simformer.hidden_dim=16", "model.simformer.num_queries=6",
              "model.simformer.nheads=2", "model.simformer.dim_feedforward=32", "model.simformer.dec_layers=2",
              "model.simformer.simnet_hidden=16", "model.simformer.base_points=10", "model.simformer.novel_points=8",
              "model.allow_random_init=true"]


def voc_cfg(root: Path, cache: Path, *extra: str):
    """Weak-shot PASCAL fold 0 (novel 1-5) on a test tree, with a deterministic transform."""
    return load_config(None, data_overrides(root, cache) + TINY_MODEL + [
        "train.stage=simformer", "train.simformer.crop_size=96", "train.simformer.scale_range=[1.0, 1.0]",
        "data.rotate_prob=0.0", "data.blur_prob=0.0", "data.flip_prob=0.0", "train.simformer.batch_size=2",
        "train.simformer.eval_period=4", "train.simformer.max_iter=8", "train.simformer.val_short_side=0",
        "train.simformer.val_max_side=0", *extra])


def _entry_index(train_set, name: str) -> int:
    return next(i for i, e in enumerate(train_set.entries) if Path(e.image).stem == name)


# -- the stage row --------------------------------------------------------------------------------

def test_row_is_in_the_table_with_an_iteration_length():
    spec = get_stage("simformer")
    assert STAGES["simformer"] is spec and spec.selection_metric == "miou_all"
    cfg = load_config(ROOT / "config" / "toy" / "weakshot.yaml")
    period = cfg.train.simformer.eval_period
    assert spec.length(cfg, 10, 4, 1) == (cfg.train.simformer.max_iter // period, period)
    cfg = load_config(ROOT / "config" / "toy" / "weakshot.yaml",
                      ["train.simformer.max_iter=1000", "train.simformer.eval_period=250"])
    assert spec.length(cfg, 10, 4, 1) == (4, 250)
    with pytest.raises(ConfigError, match="multiple of train.simformer.eval_period"):
        spec.length(load_config(ROOT / "config" / "toy" / "weakshot.yaml",
                                ["train.simformer.max_iter=700", "train.simformer.eval_period=500"]), 10, 4, 1)


def test_odd_images_per_process_in_pair_mode_are_refused():
    spec = get_stage("simformer")
    cfg = load_config(ROOT / "config" / "toy" / "weakshot.yaml", ["train.simformer.batch_size=6",
                                                                  "train.simformer.max_iter=500",
                                                                  "train.simformer.eval_period=500"])
    with pytest.raises(ConfigError, match="even number"):
        spec.length(cfg, 100, 3, 2)                  # 6 images over 2 processes: 3 each
    assert spec.length(cfg, 100, 6, 1) == (1, 500)
    single = load_config(ROOT / "config" / "toy" / "weakshot_no_simnet.yaml",
                         ["train.simformer.batch_size=3", "train.simformer.max_iter=500", "train.simformer.eval_period=500"])
    assert spec.length(single, 100, 3, 1) == (1, 500)    # no SimNet: single images, any batch


def test_optimizer_groups_schedule_and_clipping():
    spec = get_stage("simformer")
    cfg = load_config(ROOT / "config" / "toy" / "weakshot.yaml",
                      TINY_MODEL + ["train.simformer.backbone_multiplier=0.1", "train.simformer.lr=1e-3"])
    model = spec.build_model(cfg)
    (adamw,) = spec.optimizers(model, cfg)
    assert isinstance(adamw.optimizer, torch.optim.AdamW) and adamw.schedule == "poly"
    names = {id(p): n for n, p in model.named_parameters()}
    for group in adamw.optimizer.param_groups:
        for p in group["params"]:
            expected = 1e-4 if names[id(p)].startswith("backbone.") else 1e-3
            assert group["base_lr"] == pytest.approx(expected), names[id(p)]
    embed = next(g for g in adamw.optimizer.param_groups
                 if any(names[id(p)].endswith("query_embed.weight") for p in g["params"]))
    assert embed["weight_decay"] == 0.0
    assert cfg.train.simformer.clip_grad_norm == 0.01      # the engine clips with it
    from util.stages import Progress
    assert adamw.set_lr(Progress(step=5, max_steps=10, epoch=0, epochs=1))[0] == pytest.approx(
        adamw.optimizer.param_groups[0]["base_lr"] * 0.5 ** 0.9)


def test_variant_configs_load():
    for name, (supervision, simnet) in {"weakshot": ("weak_shot", True), "weakshot_no_simnet": ("weak_shot", False),
                                        "weakshot_base_only": ("base_only", False),
                                        "weakshot_full": ("full", False)}.items():
        cfg = load_config(ROOT / "config" / "toy" / f"{name}.yaml")
        assert (cfg.train.simformer.supervision, cfg.model.simformer.simnet) == (supervision, simnet)
    for name in ("pascal_split0", "pascal_split0_no_simnet", "pascal_split0_base_only", "pascal_split0_full"):
        cfg = load_config(ROOT / "config" / "weakshot" / f"{name}.yaml")
        assert cfg.train.stage == "simformer" and cfg.model.simformer.num_queries == 100   # full size
    # the toy's backbone: narrow, trainable BatchNorm; the default: ResNet-50 widths, frozen BN
    toy = get_stage("simformer").build_model(load_config(ROOT / "config" / "toy" / "weakshot.yaml"))
    assert toy.backbone.out_channels == {"res2": 64, "res3": 128, "res4": 256, "res5": 512}
    assert isinstance(toy.backbone.bn1, torch.nn.BatchNorm2d)
    out = toy.backbone(torch.zeros(1, 3, 64, 64))
    assert [tuple(v.shape[1:]) for v in out.values()] == [(64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2)]
    # the full-supervision model has no novel class in its criterion
    full = get_stage("simformer").build_model(load_config(ROOT / "config" / "toy" / "weakshot_full.yaml", TINY_MODEL))
    assert full.criterion.novel_ids.numel() == 0 and full.criterion.cro_pixel_sim_net is None


# -- weak-shot data rules ---------------------------------------------------------------------------

def test_weak_shot_view_hides_novel_pixels_and_gives_image_labels(voc_tree, tmp_path):
    from util.weakshot_data import build_weakshot_data
    cfg = voc_cfg(voc_tree, tmp_path / "cache")
    train_set, val_set, split = build_weakshot_data(cfg, log=lambda m: None)
    assert split.num_classes == 21 and split.novel == (1, 2, 3, 4, 5) and split.base[0] == 0
    assert len(train_set.entries) == len(small_voc_images())        # the whole list: no "BAM filter"
    mix = _entry_index(train_set, "mix_1_7")
    sample = train_set.load(mix, 0)
    label, tags = sample["label"], sample["image_labels"]
    assert label.shape == (96, 96)
    assert 1 not in label.unique().tolist() and 7 in label.unique().tolist()   # novel pixels -> 255
    assert torch.nonzero(tags).flatten().tolist() == [1]                      # the image-level label
    assert bool(sample["pad"].any()) and bool((label[sample["pad"].bool()] == 255).all())
    # base_only: the same pixels, no image-level label; full: the novel pixels too
    base_only, _, _ = build_weakshot_data(voc_cfg(voc_tree, tmp_path / "cache", "train.simformer.supervision=base_only"),
                                          log=lambda m: None, pairs=False)
    s = base_only.load(mix, 0)
    assert torch.equal(s["label"], label) and not s["image_labels"].any()
    full, _, _ = build_weakshot_data(voc_cfg(voc_tree, tmp_path / "cache", "train.simformer.supervision=full"),
                                     log=lambda m: None, pairs=False)
    s = full.load(mix, 0)
    assert {1, 7} <= set(s["label"].unique().tolist()) and not s["image_labels"].any()
    # the criterion's targets: base classes with masks, then the novel label with an empty mask
    from util.dataset import collate
    from util.stages.simformer import make_targets
    (target,) = make_targets(collate([sample]))
    present = [c for c in label.unique().tolist() if c != 255]
    assert target["labels"].tolist() == present + [1]
    assert target["masks"][-1].sum() == 0 and all(target["masks"][i].any() for i in range(len(present)))
    # evaluation: the original size, every class
    item = val_set[_entry_index(train_set, "mix_1_7")]
    assert item["label"].shape == (60, 80) and {1, 7} <= set(item["label"].unique().tolist())


def test_pairs_share_a_process_and_a_class(voc_tree, tmp_path):
    from util.weakshot_data import WeakShotTrainSet, build_weakshot_data
    cfg = voc_cfg(voc_tree, tmp_path / "cache", "train.simformer.batch_size=4")
    train_set, _, _ = build_weakshot_data(cfg, log=lambda m: None)
    assert train_set.pairs and len(train_set) == 4 * 4
    for i in range(0, len(train_set), 2):
        a, b = train_set.image_of(i), train_set.image_of(i + 1)
        sets = [train_set.base_sets[a] | train_set.novel_sets[a], train_set.base_sets[b] | train_set.novel_sets[b]]
        assert a == b or sets[0] & sets[1]             # a partner shares a class (or is the anchor itself)
    # two processes: process r's items r, r+2, r+4, ... pair up as (0th, 1st), (2nd, 3rd), ...
    two = WeakShotTrainSet(source=train_set.source, split=train_set.split, transform=train_set.transform, seed=cfg.seed,
                           num_items=16, pairs=True, world_size=2, log=lambda m: None)
    for rank in (0, 1):
        local = [two.image_of(i) for i in range(rank, 16, 2)]
        assert len(local) == 8
        for m in range(0, 8, 2):
            a, b = local[m], local[m + 1]
            sets = [two.base_sets[a] | two.novel_sets[a], two.base_sets[b] | two.novel_sets[b]]
            assert a == b or sets[0] & sets[1]


def test_label_values_outside_the_classes_are_refused(tmp_path):
    images = small_voc_images()
    root = write_voc_tree(tmp_path / "voc", images, sorted(images), sorted(images))
    mask = cv2.imread(str(root / "SegmentationClassAug" / "c06_0.png"), cv2.IMREAD_GRAYSCALE)
    mask[0:4, 0:4] = 30
    cv2.imwrite(str(root / "SegmentationClassAug" / "c06_0.png"), mask)
    from util.weakshot_data import build_weakshot_data
    with pytest.raises(DataError, match=r"c06_0\.png: label values \[30\] are not classes of pascal"):
        build_weakshot_data(voc_cfg(root, tmp_path / "cache"), log=lambda m: None)


def test_image_labels_outside_the_split_are_refused(voc_tree, tmp_path):
    from util.weakshot_data import build_weakshot_data
    ids = sorted(small_voc_images())
    good = {i: (["aeroplane"] if i.startswith(("c01", "mix_1")) else []) for i in ids}
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(good))
    train_set, _, split = build_weakshot_data(
        voc_cfg(voc_tree, tmp_path / "cache", f"train.simformer.image_labels_file={path}"), log=lambda m: None)
    assert train_set.load(_entry_index(train_set, "mix_1_7"), 0)["image_labels"].nonzero().flatten().tolist() == [1]
    for bad, named in ((["dog"], "dog"), ([7], "7"), ([25], "25"), (["unicorn"], "unicorn")):
        path.write_text(json.dumps(dict(good, mix_6_7=bad)))
        with pytest.raises(DataError, match=rf"image-level labels \[.?{named}.?\] name classes outside the novel"):
            build_weakshot_data(voc_cfg(voc_tree, tmp_path / "cache", f"train.simformer.image_labels_file={path}"),
                                log=lambda m: None)
    with pytest.raises(DataError, match="outside the novel classes of pascal split 0"):
        split.check_image_labels([0], "here")         # background is a base class


def test_crop_level_image_labels_follow_the_crop(voc_tree, tmp_path):
    from util.weakshot_data import build_weakshot_data
    # a 32 x 32 crop of the 60 x 80 image "mix_1_7": class 1 (top-left) is not always inside
    cfg = voc_cfg(voc_tree, tmp_path / "cache", "train.simformer.crop_size=32", "train.simformer.image_labels=crop")
    train_set, _, _ = build_weakshot_data(cfg, log=lambda m: None)
    mix = _entry_index(train_set, "mix_1_7")
    seen = set()
    for index in range(12):
        sample = train_set.load(mix, index)
        has_novel_label = bool(sample["image_labels"][1])
        seen.add(has_novel_label)
    assert seen == {True, False}
    whole, _, _ = build_weakshot_data(voc_cfg(voc_tree, tmp_path / "cache", "train.simformer.crop_size=32"),
                                      log=lambda m: None)
    assert all(bool(whole.load(mix, index)["image_labels"][1]) for index in range(12))   # image-level: always


# -- metric and report --------------------------------------------------------------------------------

def test_meter_by_hand():
    from util.stages.simformer import WeakShotMeter
    meter = WeakShotMeter(4)
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 3]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 3, 3]])
    meter.update(pred, target)
    s = meter.summary(base=[0, 1], novel=[2, 3], names=["bg", "a", "b", "c"])
    # IoU: bg 1/3, a 2/3, b 1/2, c 1/1 (the ignored pixel's prediction does not count)
    assert s["class_iou"] == pytest.approx({"bg": 1 / 3, "a": 2 / 3, "b": 1 / 2, "c": 1.0})
    assert s["miou_base"] == pytest.approx(0.5) and s["miou_novel"] == pytest.approx(0.75)
    assert s["miou_all"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2 + 1) / 4)
    assert s["harmonic"] == pytest.approx(2 * 0.5 * 0.75 / 1.25)
    with pytest.raises(ValueError, match="outside"):
        meter.update(pred, torch.tensor([[0, 0, 1, 9], [2, 2, 255, 3]]))


def test_report_table_orders_variants_and_refuses_mixed_runs():
    from util.weakshot_report import table
    common = {"dataset": "toy", "split": 0, "num_classes": 21, "novel_classes": [1, 2, 3, 4, 5], "num_images": 400}
    rows = [dict(common, variant=v, miou_base=0.5, miou_novel=n, miou_all=0.4, harmonic=h)
            for v, n, h in (("fully supervised", 0.6, 0.55), ("SimFormer", 0.2, 0.3), ("base-only", 0.0, 0.0))]
    text = table(rows)
    names = [line[:28].strip() for line in text.splitlines()[2:]]
    assert names == ["base-only", "SimFormer", "fully supervised"] and "harmonic (ours)" in text
    with pytest.raises(ValueError, match="num_images"):
        table([rows[0], dict(rows[1], num_images=100)])


# -- through the engine -------------------------------------------------------------------------------

def test_tiny_train_and_test_through_the_engine(toy_root, tmp_path):
    from util.engine import test, train

    def cfg(*extra):
        return load_config(ROOT / "config" / "toy" / "weakshot.yaml", TINY_MODEL + [
            f"data.root={toy_root}", f"data.cache_dir={tmp_path / 'cache'}", "data.num_workers=0", "device=cpu",
            "train.simformer.max_iter=3", "train.simformer.eval_period=3", "train.simformer.crop_size=64",
            "train.simformer.val_images=4", "train.log_every=1", *extra])

    summary = train(cfg(f"output_dir={tmp_path / 'run'}"))
    assert summary["stage"] == "simformer" and summary["global_step"] == 3 and summary["epochs_done"] == 1
    validation = next(h for h in summary["history"] if "miou_all" in h)
    assert {"miou_base", "miou_novel", "harmonic"} <= set(validation)
    last = torch.load(tmp_path / "run" / "last.pth", weights_only=True)
    assert last["stage"] == "simformer" and "criterion.balance_counts" in last["model"]
    results = test(cfg(f"weights={tmp_path / 'run' / 'best.pth'}", f"output_dir={tmp_path / 'test'}"), progress=False)
    saved = json.loads((tmp_path / "test" / "results.json").read_text())
    for key in ("miou_base", "miou_novel", "miou_all", "harmonic", "class_iou"):
        assert key in saved, key
    assert saved["stage"] == "simformer" and saved["variant"] == "SimFormer" and saved["num_images"] == 100
    assert saved["novel_classes"] == [1, 2, 3, 4, 5] and 0 <= saved["harmonic"] <= 1
    assert results["miou_all"] == saved["miou_all"]
    # resume continues from last.pth (a second evaluation period)
    more = train(cfg(f"output_dir={tmp_path / 'run'}", "resume=auto", "train.simformer.max_iter=6"))
    assert more["global_step"] == 6


def test_two_process_training_keeps_the_ranks_weights_identical(toy_root, tmp_path):
    """torchrun, 2 processes x 1 pair each (gloo on CPU): the pairs are split over the ranks,
    gradients all-reduced, so every rank ends with the same weights, different from the start."""
    import os
    import subprocess
    import sys
    overrides = [str(ROOT / "config" / "toy" / "weakshot.yaml"), *TINY_MODEL, f"data.root={toy_root}",
                 f"data.cache_dir={tmp_path / 'cache'}", "data.num_workers=0", "device=cpu",
                 "train.simformer.batch_size=4", "train.simformer.max_iter=2", "train.simformer.eval_period=2",
                 "train.simformer.crop_size=64", "train.simformer.val_images=2", "train.select=last",
                 f"output_dir={tmp_path / 'run'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    str(ROOT / "tests" / "stage_ddp_worker.py"), str(tmp_path / "ranks"), *overrides],
                   cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    digests = [json.loads((tmp_path / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert digests[0]["step"] == digests[1]["step"] == 2
    assert digests[0]["initial"] == digests[1]["initial"]
    assert digests[0]["weights"] == digests[1]["weights"] != digests[0]["initial"]
