"""Shared test helpers: a tiny synthetic VOC-layout tree with known masks."""
from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def write_voc_tree(root: Path, images: dict, train_ids, val_ids) -> Path:
    """Write a VOC-layout tree.

    ``images`` maps an id to ``(height, width, [(class_id, y0, y1, x0, x1), ...])``; each
    rectangle is painted with its class in the mask and a class-specific colour in the image.
    Lists ``lists/train_aug.txt`` and ``lists/val.txt`` hold ``train_ids`` / ``val_ids``.
    """
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "SegmentationClassAug").mkdir(parents=True, exist_ok=True)
    (root / "lists").mkdir(parents=True, exist_ok=True)
    for image_id, (h, w, rects) in images.items():
        image = np.full((h, w, 3), 40, np.uint8)
        mask = np.zeros((h, w), np.uint8)
        for class_id, y0, y1, x0, x1 in rects:
            mask[y0:y1, x0:x1] = class_id
            image[y0:y1, x0:x1] = ((class_id * 37) % 255, (class_id * 91) % 255, 200)
        cv2.imwrite(str(root / "JPEGImages" / f"{image_id}.jpg"), image)
        cv2.imwrite(str(root / "SegmentationClassAug" / f"{image_id}.png"), mask)
    for name, ids in (("train_aug", train_ids), ("val", val_ids)):
        (root / "lists" / f"{name}.txt").write_text(
            "".join(f"JPEGImages/{i}.jpg SegmentationClassAug/{i}.png\n" for i in ids))
    return root


def small_voc_images(num_per_class: int = 3, size: tuple[int, int] = (60, 80)) -> dict:
    """Images with one big object of each PASCAL class (several per class), ids ``c{class}_{k}``,
    plus a few with two classes."""
    h, w = size
    images = {}
    for c in range(1, 21):
        for k in range(num_per_class):
            y0 = 5 + 3 * k
            images[f"c{c:02d}_{k}"] = (h, w, [(c, y0, y0 + 30, 10 + 2 * k, 50 + 2 * k)])
    images["mix_1_7"] = (h, w, [(1, 5, 35, 5, 40), (7, 30, 58, 40, 78)])
    images["mix_6_7"] = (h, w, [(6, 5, 35, 5, 40), (7, 30, 58, 40, 78)])
    return images


@pytest.fixture()
def voc_tree(tmp_path):
    images = small_voc_images()
    ids = sorted(images)
    return write_voc_tree(tmp_path / "voc", images, ids, ids)


def data_overrides(root: Path, cache: Path, **extra) -> list[str]:
    """Config overrides pointing the PASCAL code path at a test tree."""
    items = {"data.root": str(root), "data.cache_dir": str(cache), "data.min_class_pixels": 100,
             "data.train_size": 65, "data.val_size": 65, "data.num_workers": 0, **extra}
    return [f"{k}={v}" for k, v in items.items()]


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory):
    """A small toy benchmark (80 train / 100 val images), generated once per test session."""
    from util.toy import generate_toy
    root = tmp_path_factory.mktemp("toy") / "toy"
    generate_toy(root, num_train=80, num_val=100, seed=0, workers=1, progress=False)
    return root


def tiny_toy_overrides(root: Path, cache: Path, out: Path | None = None, **extra) -> list[str]:
    """The toy config shrunk further, for engine tests that train in seconds."""
    items = {
        "data.root": str(root), "data.cache_dir": str(cache), "data.num_workers": 0,
        "data.train_size": 65, "data.val_size": 65, "device": "cpu",
        "model.backbone_width": 8, "model.base_learner.hidden_dim": 16, "model.rspg.reduce_dim": 16,
        "model.sam.img_size": 64, "model.sam.patch_size": 8, "model.sam.embed_dim": 16, "model.sam.num_heads": 2,
        "model.sam.out_chans": 32, "model.decoder.num_heads": 4,
        "train.base.crop_size": 65, "train.base.val_size": 65, "train.base.batch_size": 4,
        "train.bam.batch_size": 4, "train.sam_rsp.batch_size": 2,
        "train.val_episodes": 12, "train.log_every": 1,
        "eval.episodes": 12, "eval.seeds": [1, 2], "eval.batch_size": 3,
    }
    if out is not None:
        items["output_dir"] = str(out)
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]


def pytest_collection_finish(session):
    """Some test modules import ultralytics at collection (``pytest.importorskip``), which patches
    ``PIL.Image.open`` and ``torch.save`` for the whole process; undo that as model.fastsam does
    after its own import, so that every other test sees the libraries as users do."""
    if "ultralytics" in sys.modules:
        from model.fastsam import undo_global_patches
        undo_global_patches()
