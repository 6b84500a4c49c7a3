"""The custom folder dataset and the COCO mask preparation."""
import json

import cv2
import numpy as np
import pytest
from PIL import Image

from util.config import load_config
from util.dataset import build_episodes, build_source
from util.io import DataError


def make_custom(root, classes=("ant", "bee", "cat", "dog"), per_class=4, suffix="_mask", mask_value=255):
    for c, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True)
        for k in range(per_class):
            image = np.full((50, 70, 3), 30 * c, np.uint8)
            mask = np.zeros((50, 70), np.uint8)
            mask[5 + k:35 + k, 10:50] = mask_value
            cv2.imwrite(str(folder / f"{k}.jpg"), image)
            Image.fromarray(mask).save(folder / f"{k}{suffix}.png")
    return root


def custom_cfg(root, tmp_path, *extra):
    return load_config(None, [f"data.root={root}", "data.dataset=custom", f"data.cache_dir={tmp_path / 'cache'}",
                              "data.fold_classes=[[ant, bee], [cat, dog]]", "data.min_class_pixels=100",
                              "data.train_size=33", "data.val_size=33", *extra])


@pytest.mark.parametrize("suffix,value", [("_mask", 255), ("", 255), ("_mask", 1)])
def test_custom_dataset_episodes(tmp_path, suffix, value):
    root = make_custom(tmp_path / "fss", suffix=suffix, mask_value=value)
    cfg = custom_cfg(root, tmp_path, f"data.mask_suffix={suffix!r}" if suffix else "data.mask_suffix=''")
    source = build_source(cfg)
    assert source.fold.class_names == ("ant", "bee", "cat", "dog") and source.fold.novel == (1, 2)
    val = build_episodes(cfg, "val", num_episodes=6)
    train = build_episodes(cfg, "train")
    assert len(val.fold_list.entries) == 8 and len(train.fold_list.entries) == 8
    for i in range(6):
        s = val[i]
        assert int(s["class_id"]) in (1, 2) and set(s["query_mask"].unique().tolist()) <= {0, 1, 255}
        assert (s["query_mask"] == 1).sum() > 50
    assert int(train[0]["class_id"]) in (3, 4)


def test_custom_dataset_missing_mask(tmp_path):
    root = make_custom(tmp_path / "fss")
    (root / "cat" / "2_mask.png").unlink()
    with pytest.raises(DataError, match=r"mask not found for .*cat/2\.jpg: expected .*2_mask\.png.*data\.mask_suffix"):
        build_episodes(custom_cfg(root, tmp_path), "val")


# COCO category ids of the 80 classes (1..90 with gaps)
COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


def test_coco_masks_from_instance_json(tmp_path):
    pytest.importorskip("pycocotools")
    from util.coco import write_masks
    assert len(COCO_IDS) == 80
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    square = lambda x0, y0, s: [[x0, y0, x0 + s, y0, x0 + s, y0 + s, x0, y0 + s]]
    instances = {
        "images": [{"id": 1, "file_name": "COCO_val2014_000000000001.jpg", "height": 40, "width": 60},
                   {"id": 2, "file_name": "COCO_val2014_000000000002.jpg", "height": 30, "width": 30}],
        "categories": [{"id": i, "name": f"c{i}"} for i in COCO_IDS],
        "annotations": [
            # a big person (id 1 -> 1) under a small toothbrush (id 90 -> 80): the small one stays on top
            {"id": 1, "image_id": 1, "category_id": 1, "segmentation": square(0, 0, 30), "area": 900.0,
             "bbox": [0, 0, 30, 30], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 90, "segmentation": square(10, 10, 10), "area": 100.0,
             "bbox": [10, 10, 10, 10], "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 13, "segmentation": square(5, 5, 10), "area": 100.0,
             "bbox": [5, 5, 10, 10], "iscrowd": 0},   # stop sign: category id 13 -> 12
        ],
    }
    (root / "annotations" / "instances_val2014.json").write_text(json.dumps(instances))
    summary = write_masks(root, "val2014", workers=1, progress=False)
    assert summary["written"] == 2
    first = np.array(Image.open(root / "annotations" / "val2014" / "COCO_val2014_000000000001.png"))
    assert first.shape == (40, 60) and first[2, 2] == 1 and first[15, 15] == 80 and first[35, 50] == 0
    second = np.array(Image.open(root / "annotations" / "val2014" / "COCO_val2014_000000000002.png"))
    assert second[10, 10] == 12 and set(np.unique(second)) == {0, 12}
