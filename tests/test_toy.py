"""Tests of the toy benchmark generator (util/toy.py) and the `python -m util.prepare` entry point."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from util import toy   # the repository root is put on sys.path by tests/conftest.py
from util.toy import TOY_CLASS_NAMES, generate_toy, is_complete_toy, render_toy_image

REPO_ROOT = Path(__file__).resolve().parents[1]

NUM_TRAIN, NUM_VAL = 40, 20


@pytest.fixture(scope="module")
def toy_set(tmp_path_factory) -> tuple[Path, dict]:
    """A small toy set generated once for the module, with two worker processes."""
    root = tmp_path_factory.mktemp("toy") / "data" / "toy"
    summary = generate_toy(root, num_train=NUM_TRAIN, num_val=NUM_VAL, seed=0, workers=2, progress=False)
    return root, summary


def _read_pairs(root: Path, list_name: str) -> list[tuple[str, str]]:
    text = (root / "lists" / list_name).read_text(encoding="utf-8")
    assert text.endswith("\n")
    return [tuple(line.split(" ")) for line in text.splitlines()]


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_class_names():
    assert len(TOY_CLASS_NAMES) == 20
    assert len(set(TOY_CLASS_NAMES)) == 20
    styles = toy.CLASS_STYLES
    # Any two classes share at most one of shape, hue, texture: none differs by a single cue.
    for i, a in enumerate(styles):
        for b in styles[i + 1:]:
            shared = (a.shape == b.shape) + (a.hue == b.hue) + (a.texture == b.texture)
            assert shared <= 1, (a.name, b.name)


def test_layout_and_lists(toy_set):
    root, summary = toy_set
    for split, list_name, count in (("train", "train_aug.txt", NUM_TRAIN), ("val", "val.txt", NUM_VAL)):
        pairs = _read_pairs(root, list_name)
        assert len(pairs) == count
        ids = (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text(encoding="utf-8").splitlines()
        assert ids == [f"toy_{split}_{i:06d}" for i in range(count)]
        for image_id, (image_path, mask_path) in zip(ids, pairs):
            assert image_path == f"JPEGImages/{image_id}.jpg"
            assert mask_path == f"SegmentationClassAug/{image_id}.png"
            assert (root / image_path).is_file() and (root / mask_path).is_file()
    assert not list(root.rglob("*.part"))
    meta = json.loads((root / "toy_meta.json").read_text(encoding="utf-8"))
    assert meta["params"] == {"num_train": NUM_TRAIN, "num_val": NUM_VAL, "seed": 0}
    assert meta["class_names"] == list(TOY_CLASS_NAMES)
    assert summary["images"] == {"train": NUM_TRAIN, "val": NUM_VAL}
    assert sum(summary["objects_per_class"]["train"].values()) >= NUM_TRAIN
    assert is_complete_toy(root, num_train=NUM_TRAIN, num_val=NUM_VAL, seed=0)
    assert not is_complete_toy(root, num_train=NUM_TRAIN, num_val=NUM_VAL, seed=1)


def test_images_and_masks(toy_set):
    root, _ = toy_set
    shapes = set()
    for list_name in ("train_aug.txt", "val.txt"):
        for image_path, mask_path in _read_pairs(root, list_name):
            with Image.open(root / image_path) as image, Image.open(root / mask_path) as mask:
                assert image.mode == "RGB" and image.format == "JPEG"
                assert mask.mode == "L" and mask.format == "PNG"
                assert image.size == mask.size
                label = np.asarray(mask)
            height, width = label.shape
            assert 110 <= height <= 180 and 110 <= width <= 180
            shapes.add((height, width))
            values = set(np.unique(label).tolist())
            assert values <= set(range(21)) | {255}, mask_path
            assert values & set(range(1, 21)), f"{mask_path} has no object"
            assert 255 in values, f"{mask_path} has no ignore band"
            # The band separates every two different labels: no 4-neighbours a != b without 255.
            for a, b in ((label[1:, :], label[:-1, :]), (label[:, 1:], label[:, :-1])):
                touching = (a != b) & (a != 255) & (b != 255)
                assert not touching.any(), f"{mask_path}: labels touch without an ignore band"
            # The band is thin: most object pixels are labelled, not ignored.
            assert (label == 255).sum() < ((label > 0) & (label < 255)).sum()
    heights, widths = zip(*shapes)
    assert len(set(heights)) > 5 and len(set(widths)) > 5
    assert any(h > w for h, w in shapes) and any(w > h for h, w in shapes)


def test_all_classes_occur_roughly_uniformly():
    counts = np.zeros(21, np.int64)
    for index in range(200):
        _, label, objects = render_toy_image(seed=0, split_id=0, index=index)
        for class_id, visible in objects:
            counts[class_id] += 1
        assert set(np.unique(label).tolist()) - {0, 255} <= {c for c, _ in objects}
    assert (counts[1:] > 0).all(), counts
    assert counts[1:].min() >= 0.4 * counts[1:].mean(), counts


def test_render_is_pure_function_of_seed_split_index():
    first = render_toy_image(seed=3, split_id=1, index=7)
    again = render_toy_image(seed=3, split_id=1, index=7)
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    other_split = render_toy_image(seed=3, split_id=0, index=7)
    assert first[0].shape != other_split[0].shape or not np.array_equal(first[0], other_split[0])


def test_determinism_across_runs_and_workers(toy_set, tmp_path):
    root, _ = toy_set
    reference = _all_files(root)
    serial = tmp_path / "serial"
    generate_toy(serial, num_train=NUM_TRAIN, num_val=NUM_VAL, seed=0, workers=1, progress=False)
    assert _all_files(serial) == reference            # workers=1 vs workers=2, byte-identical
    repeat = tmp_path / "repeat"
    generate_toy(repeat, num_train=NUM_TRAIN, num_val=NUM_VAL, seed=0, workers=2, progress=False)
    assert _all_files(repeat) == reference            # same seed twice


def test_different_seed_differs(toy_set, tmp_path):
    root, _ = toy_set
    other = tmp_path / "other"
    generate_toy(other, num_train=4, num_val=2, seed=1, workers=1, progress=False)
    for name in ("JPEGImages/toy_train_000000.jpg", "SegmentationClassAug/toy_train_000000.png",
                 "JPEGImages/toy_val_000001.jpg"):
        assert (other / name).read_bytes() != (root / name).read_bytes()


def test_regeneration_removes_stale_files_and_meta_marks_completion(tmp_path):
    root = tmp_path / "toy"
    generate_toy(root, num_train=6, num_val=3, seed=0, workers=1, progress=False)
    generate_toy(root, num_train=3, num_val=2, seed=0, workers=1, progress=False)
    assert len(list((root / "JPEGImages").iterdir())) == 5
    assert len(list((root / "SegmentationClassAug").iterdir())) == 5
    assert is_complete_toy(root, num_train=3, num_val=2, seed=0)
    (root / "SegmentationClassAug" / "toy_val_000001.png").unlink()
    assert not is_complete_toy(root, num_train=3, num_val=2, seed=0)
    generate_toy(root, num_train=3, num_val=2, seed=0, workers=1, progress=False)
    (root / "toy_meta.json").unlink()   # what an interrupted run leaves
    assert not is_complete_toy(root, num_train=3, num_val=2, seed=0)


def test_temporaries_of_an_interrupted_write_are_toy_files_and_get_removed(tmp_path):
    from util.atomic import temporary_name
    root = tmp_path / "toy"
    generate_toy(root, num_train=3, num_val=2, seed=0, workers=1, progress=False)
    leftover = temporary_name(root / "JPEGImages" / "toy_train_000001.jpg", ".part")
    leftover.write_bytes(b"half a jpeg")                  # what a killed worker leaves
    (root / "toy_meta.json").unlink()
    generate_toy(root, num_train=3, num_val=2, seed=0, workers=1, progress=False)   # not "foreign"
    assert not leftover.exists() and not list(root.rglob("*.part"))
    assert is_complete_toy(root, num_train=3, num_val=2, seed=0)


def test_run_skips_complete_set_unless_forced(tmp_path, capsys):
    root = tmp_path / "toy"
    parser = argparse.ArgumentParser()
    toy.add_arguments(parser)
    args = parser.parse_args(["--root", str(root), "--num-train", "3", "--num-val", "2", "--workers", "1"])
    toy.run(args)
    assert "already holds" not in capsys.readouterr().out
    mtime = (root / "toy_meta.json").stat().st_mtime_ns
    toy.run(args)
    assert "already holds" in capsys.readouterr().out
    assert (root / "toy_meta.json").stat().st_mtime_ns == mtime
    toy.run(parser.parse_args(["--root", str(root), "--num-train", "3", "--num-val", "2", "--workers", "1", "--force"]))
    assert "already holds" not in capsys.readouterr().out


def test_refuses_foreign_dataset_and_bad_arguments(tmp_path):
    voc = tmp_path / "VOC2012"
    (voc / "JPEGImages").mkdir(parents=True)
    (voc / "JPEGImages" / "2007_000032.jpg").write_bytes(b"")
    with pytest.raises(FileExistsError, match="2007_000032.jpg"):
        generate_toy(voc, num_train=2, num_val=1, workers=1, progress=False)
    with pytest.raises(ValueError, match="num_train"):
        generate_toy(tmp_path / "toy", num_train=0, progress=False)
    with pytest.raises(ValueError, match="workers"):
        generate_toy(tmp_path / "toy", num_train=2, num_val=1, workers=0, progress=False)


@pytest.mark.parametrize("argv", [["--help"], ["toy", "--help"]])
def test_prepare_help(argv):
    result = subprocess.run([sys.executable, "-m", "util.prepare", *argv], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout
    if argv[0] == "toy":
        assert "--num-train" in result.stdout and "--force" in result.stdout


def test_prepare_toy_command(tmp_path):
    root = tmp_path / "cli_toy"
    result = subprocess.run([sys.executable, "-m", "util.prepare", "toy", "--root", str(root), "--num-train", "3",
                             "--num-val", "2", "--workers", "1"], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "red_disc" in result.stdout
    assert is_complete_toy(root, num_train=3, num_val=2, seed=0)
