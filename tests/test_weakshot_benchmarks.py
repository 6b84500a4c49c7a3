"""The original SimFormer benchmarks (util/weakshot_benchmarks.py): the SPEC's split hashes, the
class lists, ``python -m util.prepare cocostuff10k|ade20k`` on synthetic trees (label conversion,
exclusions, lists, refused values, missing files), the weak-shot data view over them (label value
0 is a class, possibly novel) and the split configs."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from util.config import ConfigError, load_config
from util.io import DataError
from util.weakshot_benchmarks import (ADE20K_CLASSES, BENCHMARKS, COCO_STUFF_CATEGORY_IDS, COCO_STUFF_CLASSES,
                                      COCO_STUFF_RANDP, convert_cocostuff_v10, convert_cocostuff_v11, split_hash)

ROOT = Path(__file__).resolve().parent.parent

# SPEC_SIMFORMER 2.3, copied here on purpose: the module's lists must keep reproducing them
SPEC_HASHES = {
    "cocostuff10k": {1: "d7c67051d1c820d5", 2: "fd61c6578fe6a310", 3: "7380271b17452256", 4: "252efd1fb826bdb4",
                     5: "b67763280e43c553", 6: "99e9888a4e801a94", 7: "9c245003a11807b7", 8: "e993c9f2a7d535a5",
                     9: "30f5af4fea06e333"},
    "ade20k": {1: "255e53bb709ea805", 2: "2371628bcc288da8", 3: "b43f2ff4a1e9be88", 4: "6adba3caef81af19"},
}
TINY_MODEL = ["model.simformer.backbone_blocks=[1, 1, 1, 1]", "model.simformer.conv_dim=32",
              "model.simformer.mask_dim=16", "model.simformer.hidden_dim=16", "model.simformer.num_queries=6",
              "model.simformer.nheads=2", "model.simformer.dim_feedforward=32", "model.simformer.dec_layers=2",
              "model.simformer.simnet_hidden=16", "model.simformer.base_points=10", "model.simformer.novel_points=8",
              "model.allow_random_init=true", "model.simformer.backbone_checkpoint="]


# -- splits and classes -------------------------------------------------------------------------------

def test_split_hashes_follow_the_spec_recipe():
    for name, hashes in SPEC_HASHES.items():
        bench = BENCHMARKS[name]
        assert sorted(bench.novel) == sorted(hashes)
        for split, expected in hashes.items():
            novel = bench.novel[split]
            compact = json.dumps(list(novel), separators=(",", ":"))
            assert list(novel) == sorted(novel) and " " not in compact
            assert hashlib.sha256(compact.encode()).hexdigest()[:16] == expected == split_hash(novel)
    sizes = [len(BENCHMARKS["cocostuff10k"].novel[s]) for s in range(1, 10)]
    assert sizes == [43, 43, 43, 43, 51, 59, 68, 76, 85]
    assert [len(BENCHMARKS["ade20k"].novel[s]) for s in range(1, 5)] == [38] * 4
    # splits 4-9 are nested prefixes of one permutation
    for s in range(4, 10):
        assert set(BENCHMARKS["cocostuff10k"].novel[s]) == set(COCO_STUFF_RANDP[:sizes[s - 1]])
    assert split_hash([3, 1, 2]) == split_hash([1, 2, 3])


def test_class_lists_and_split_names():
    assert len(COCO_STUFF_CLASSES) == 171 and len(ADE20K_CLASSES) == 150
    assert len(set(COCO_STUFF_CLASSES)) == 171 and len(set(ADE20K_CLASSES)) == 150
    assert (COCO_STUFF_CLASSES[0], COCO_STUFF_CLASSES[79], COCO_STUFF_CLASSES[80], COCO_STUFF_CLASSES[170]) == \
        ("person", "toothbrush", "banner", "wood")
    assert (ADE20K_CLASSES[0], ADE20K_CLASSES[8], ADE20K_CLASSES[130], ADE20K_CLASSES[149]) == \
        ("wall", "window", "screen", "flag")
    coco = BENCHMARKS["cocostuff10k"]
    names = [coco.class_names[c] for c in coco.novel[1]]
    assert names[:5] == ["motorcycle", "train", "fire hydrant", "stop sign", "sheep"]
    assert names[-4:] == ["towel", "wall-brick", "water-other", "window-other"]
    assert [coco.class_names[c] for c in coco.novel[3]][-5:] == ["stone", "tent", "tree", "vegetable", "wall-tile"]
    assert "mirror-stuff" in [coco.class_names[c] for c in coco.novel[3]]
    ade = BENCHMARKS["ade20k"]
    assert [ade.class_names[c] for c in ade.novel[1]][:5] == ["building", "floor", "road", "window", "cabinet"]
    assert [ade.class_names[c] for c in ade.novel[4]][-4:] == ["tray", "trash can", "crt screen", "monitor"]
    assert [ade.class_names[c] for c in ade.novel[2]][:4] == ["wall", "cabinet", "water", "mirror"]
    assert len(COCO_STUFF_CATEGORY_IDS) == 171 and COCO_STUFF_CATEGORY_IDS[79] == 90 and \
        COCO_STUFF_CATEGORY_IDS[80] == 92


def test_fold_of_a_benchmark_config():
    from util.folds import make_fold
    fold = make_fold({"dataset": "ade20k", "split": 2})
    assert fold.num_classes + 1 == 150 and 0 in fold.novel and 0 not in fold.base
    assert fold.name(0) == "wall" and fold.name(149) == "flag" and len(fold.all_names) == 150
    assert set(fold.base) | set(fold.novel) == set(range(150))
    with pytest.raises(ConfigError, match="data.split must be one of 1, 2, 3, 4 for data.dataset=ade20k"):
        make_fold({"dataset": "ade20k", "split": 0})
    with pytest.raises(ConfigError, match="1, 2, 3, 4, 5, 6, 7, 8, 9"):
        make_fold({"dataset": "cocostuff10k", "split": 10})


# -- label conventions --------------------------------------------------------------------------------

def test_cocostuff_label_conventions():
    v10 = np.array([[1, 2, 3], [172, 100, 1]])
    assert convert_cocostuff_v10(v10, "x").tolist() == [[255, 0, 1], [170, 98, 255]]
    for bad in (0, 173):
        with pytest.raises(DataError, match=rf"x: label values \[{bad}\] are not COCO-Stuff-10K v1.0"):
            convert_cocostuff_v10(np.array([[1, bad]]), "x")
    v11 = np.array([[0, 1, 90], [92, 182, 0]])
    assert convert_cocostuff_v11(v11, "y").tolist() == [[255, 0, 79], [80, 170, 255]]
    for bad in (12, 91, 183):
        with pytest.raises(DataError, match=rf"y: label values \[{bad}\] are not COCO-Stuff-10K v1.1"):
            convert_cocostuff_v11(np.array([[0, bad]]), "y")


# -- synthetic trees ----------------------------------------------------------------------------------

def _image(path: Path, h: int = 64, w: int = 96) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((h, w, 3), 90, np.uint8))


def _png(path: Path, label: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(label.astype(np.uint8), mode="L").save(path)


def _labels(values, h: int = 64, w: int = 96) -> np.ndarray:
    """Vertical stripes of ``values``."""
    label = np.zeros((h, w), np.uint8)
    for i, v in enumerate(values):
        label[:, i * w // len(values):(i + 1) * w // len(values)] = v
    return label


def write_ade_tree(root: Path, train: dict, val: dict) -> Path:
    """ADEChallengeData2016 layout; ``train`` / ``val``: name -> raw label values (0 other, 1..150)."""
    for split, items in (("training", train), ("validation", val)):
        for name, values in items.items():
            _image(root / "images" / split / f"{name}.jpg")
            _png(root / "annotations" / split / f"{name}.png", _labels(values))
    return root


def ade_tree(root: Path) -> Path:
    train = {f"ADE_train_{i:08d}": values for i, values in
             enumerate([(1, 2, 0), (1, 3), (2, 4, 1), (5, 1), (3, 2), (1, 28)], start=1)}   # raw 1 = wall, 28 = mirror
    train["ADE_train_00005149"] = (0, 0)          # excluded by the original (all ignore)
    val = {f"ADE_val_{i:08d}": values for i, values in enumerate([(1, 2), (3, 28, 0)], start=1)}
    return write_ade_tree(root, train, val)


def test_prepare_ade20k_writes_labels_and_lists(tmp_path, capsys):
    from util.prepare import main
    root = ade_tree(tmp_path / "ADEChallengeData2016")
    assert main(["ade20k", str(root), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "1 excluded as the original" in out and "warning: 7 train images found, the release has 20210" in out
    train = (root / "lists" / "train.txt").read_text().splitlines()
    val = (root / "lists" / "val.txt").read_text().splitlines()
    assert len(train) == 6 and len(val) == 2 and not any("00005149" in line for line in train)
    assert train[0] == "images/training/ADE_train_00000001.jpg annotations_detectron2/training/ADE_train_00000001.png"
    label = np.array(Image.open(root / "annotations_detectron2" / "training" / "ADE_train_00000001.png"))
    assert sorted(np.unique(label).tolist()) == [0, 1, 255]          # raw 1, 2, 0 -> 0, 1, 255
    # a second run keeps (and checks) the converted maps; a bad raw value is refused by name
    assert main(["ade20k", str(root), "--workers", "1"]) == 0
    _png(root / "annotations" / "training" / "ADE_train_00000002.png", _labels((1, 151)))
    assert main(["ade20k", str(root), "--workers", "1", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "ADE_train_00000002.png: label values [151] are not ADE20K-150 labels" in err


def test_prepare_ade20k_missing_files(tmp_path, capsys):
    from util.prepare import main
    assert main(["ade20k", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "nowhere" / "images" / "training") in err and "ADEChallengeData2016.zip" in err
    root = ade_tree(tmp_path / "ade")
    (root / "annotations" / "validation" / "ADE_val_00000001.png").unlink()
    assert main(["ade20k", str(root), "--workers", "1"]) == 2
    assert "ADE_val_00000001.png" in capsys.readouterr().err


def write_cocostuff_release(root: Path, train: dict, test: dict) -> Path:
    """COCO-Stuff-10K release layout with MATLAB v5 .mat files (``S`` as given)."""
    for split, items in (("train", train), ("test", test)):
        (root / "imageLists").mkdir(parents=True, exist_ok=True)
        (root / "imageLists" / f"{split}.txt").write_text("".join(f"{n}\n" for n in items))
        for name, values in items.items():
            _image(root / "images" / f"{name}.jpg")
            (root / "annotations").mkdir(parents=True, exist_ok=True)
            savemat(str(root / "annotations" / f"{name}.mat"), {"S": _labels(values).astype(np.uint16)})
    return root


def test_prepare_cocostuff10k_release_v11_and_forced_v10(tmp_path, capsys):
    from util.prepare import main
    train = {"COCO_train2014_000000000009": (0, 1, 92), "COCO_train2014_000000016680": (1, 2),   # the latter excluded
             "COCO_train2014_000000000025": (182, 90)}
    test = {"COCO_train2014_000000000030": (1, 0)}
    root = write_cocostuff_release(tmp_path / "cs", train, test)
    assert main(["cocostuff10k", str(root), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "1 excluded as the original" in out
    lines = (root / "lists" / "train.txt").read_text().splitlines()
    assert lines == ["images/COCO_train2014_000000000009.jpg annotations_detectron2/train/COCO_train2014_000000000009.png",
                     "images/COCO_train2014_000000000025.jpg annotations_detectron2/train/COCO_train2014_000000000025.png"]
    assert len((root / "lists" / "test.txt").read_text().splitlines()) == 1
    label = np.array(Image.open(root / "annotations_detectron2" / "train" / "COCO_train2014_000000000009.png"))
    assert sorted(np.unique(label).tolist()) == [0, 80, 255]         # v1.1: 0 -> 255, COCO id 1 -> 0, 92 -> 80
    # forced v1.0 convention (S - 2) on the same files: COCO id 0 is not a v1.0 label
    assert main(["cocostuff10k", str(root), "--workers", "1", "--overwrite", "--mat-version", "1.0"]) == 2
    assert "label values [0] are not COCO-Stuff-10K v1.0 labels" in capsys.readouterr().err
    root10 = write_cocostuff_release(tmp_path / "cs10", {"COCO_train2014_000000000009": (1, 2, 172)},
                                     {"COCO_train2014_000000000030": (3,)})
    assert main(["cocostuff10k", str(root10), "--workers", "1", "--mat-version", "1.0"]) == 0
    label = np.array(Image.open(root10 / "annotations_detectron2" / "train" / "COCO_train2014_000000000009.png"))
    assert sorted(np.unique(label).tolist()) == [0, 170, 255]


def test_prepare_cocostuff10k_prepared_folders_and_errors(tmp_path, capsys):
    from util.prepare import main
    root = tmp_path / "prepared"
    for split, names in (("train", ["a", "b"]), ("test", ["c"])):
        for n in names:
            _image(root / "images_detectron2" / split / f"{n}.jpg")
            _png(root / "annotations_detectron2" / split / f"{n}.png", _labels((0, 170, 255)))
    assert main(["cocostuff10k", str(root), "--workers", "1"]) == 0
    assert (root / "lists" / "train.txt").read_text().splitlines()[0] == \
        "images_detectron2/train/a.jpg annotations_detectron2/train/a.png"
    _png(root / "annotations_detectron2" / "train" / "b.png", _labels((3, 171)))
    assert main(["cocostuff10k", str(root), "--workers", "1"]) == 2
    assert "b.png: label values [171] are not train ids of the 171 classes" in capsys.readouterr().err
    assert main(["cocostuff10k", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "empty" / "imageLists" / "train.txt") in err and "cocostuff10k" in err


# -- the weak-shot view -------------------------------------------------------------------------------

def _ade_cfg(root: Path, cache: Path, *extra: str):
    return load_config(ROOT / "config" / "weakshot" / "ade20k_split2.yaml", TINY_MODEL + [
        f"data.root={root}", f"data.cache_dir={cache}", "data.num_workers=0", "device=cpu",
        "train.simformer.crop_size=64", "train.simformer.scale_range=[1.0, 1.0]", "data.rotate_prob=0.0",
        "data.blur_prob=0.0", "data.flip_prob=0.0", "train.simformer.batch_size=2", "train.simformer.eval_period=2",
        "train.simformer.max_iter=2", "train.simformer.val_short_side=0", "train.simformer.val_max_side=0", *extra])


def test_weakshot_view_of_ade20k(tmp_path):
    from util.weakshot_data import build_weakshot_data
    from util.prepare import main
    root = ade_tree(tmp_path / "ADEChallengeData2016")
    assert main(["ade20k", str(root), "--workers", "1"]) == 0
    train_set, val_set, split = build_weakshot_data(_ade_cfg(root, tmp_path / "cache"), log=lambda m: None)
    assert split.num_classes == 150 and split.class_names[0] == "wall" and split.class_names[27] == "mirror"
    assert 0 in split.novel and 27 in split.novel and 1 in split.base and 0 not in split.base
    assert len(train_set.entries) == 6 and len(val_set) == 2
    first = train_set.entries[0]
    assert first.class_pixels.keys() == {0, 1}                   # class 0 (wall) counted like the others
    sample = train_set.load(0, 0)
    assert set(np.unique(sample["label"].numpy()).tolist()) <= {1, 255}        # wall (novel) hidden
    assert (sample["label"] == 1).any() and sample["image_labels"][0] and sample["image_labels"].sum() == 1
    item = val_set[1]
    assert set(np.unique(item["label"].numpy()).tolist()) == {2, 27, 255}       # all classes at test time
    # a value outside 0..149 / 255 in a prepared map is refused by name
    bad = root / "annotations_detectron2" / "training" / "ADE_train_00000003.png"
    _png(bad, _labels((1, 200)))
    with pytest.raises(DataError, match=r"ADE_train_00000003.png: label values \[200\] are not classes of ade20k"):
        build_weakshot_data(_ade_cfg(root, tmp_path / "cache2"), log=lambda m: None)


def test_missing_lists_name_the_prepare_command(tmp_path):
    from util.weakshot_data import build_weakshot_data
    (tmp_path / "ade").mkdir()
    with pytest.raises(DataError, match="python -m util.prepare ade20k"):
        build_weakshot_data(_ade_cfg(tmp_path / "ade", tmp_path / "cache"), log=lambda m: None)


def test_tiny_train_and_test_on_a_synthetic_ade20k(tmp_path):
    from util.engine import test, train
    from util.prepare import main
    root = ade_tree(tmp_path / "ADEChallengeData2016")
    assert main(["ade20k", str(root), "--workers", "1"]) == 0
    summary = train(_ade_cfg(root, tmp_path / "cache", f"output_dir={tmp_path / 'run'}"))
    assert summary["global_step"] == 2
    results = test(_ade_cfg(root, tmp_path / "cache", f"weights={tmp_path / 'run' / 'best.pth'}",
                            f"output_dir={tmp_path / 'test'}"), progress=False)
    assert results["num_classes"] == 150 and results["dataset"] == "ade20k" and results["split"] == 2
    assert results["novel_classes"] == list(BENCHMARKS["ade20k"].novel[2]) and 0 <= results["miou_all"] <= 1


# -- configs ------------------------------------------------------------------------------------------

def test_split_configs_load_with_the_original_schedule():
    from model import build_model
    expected_dist = {1: (0.0, "ce"), 2: (0.1, "cce"), 3: (0.1, "ce")}
    for split in range(1, 10):
        cfg = load_config(ROOT / "config" / "weakshot" / f"cocostuff10k_split{split}.yaml")
        s, t = cfg.model.simformer, cfg.train.simformer
        assert (cfg.data.dataset, cfg.data.split, cfg.train.stage) == ("cocostuff10k", split, "simformer")
        assert (t.max_iter, t.eval_period, t.crop_size, t.batch_size, t.val_short_side, t.val_max_side) == \
            (60000, 10000, 640, 8, 640, 2560)
        assert s.comp_weight == 0.15 and (s.dist_weight, s.dist_func) == expected_dist.get(split, (0.1, "cce"))
        assert s.simnet and s.num_queries == 100 and cfg.data.val_list == "lists/test.txt"
    for split in range(1, 5):
        cfg = load_config(ROOT / "config" / "weakshot" / f"ade20k_split{split}.yaml")
        s, t = cfg.model.simformer, cfg.train.simformer
        assert (cfg.data.dataset, cfg.data.split) == ("ade20k", split)
        assert (t.max_iter, t.eval_period, t.crop_size, t.val_short_side, t.val_max_side) == (160000, 20000, 512, 512, 2048)
        assert (s.comp_weight, s.dist_weight, s.dist_func) == (0.2, 0.5, "cce")
    # the model of a split has K = 171 / 150 outputs and the split's novel classes
    model = build_model(load_config(ROOT / "config" / "weakshot" / "cocostuff10k_split3.yaml", TINY_MODEL))
    assert model.num_classes == 171
