"""COCO-20i preparation: class-index PNG masks from COCO's instance annotations.

``python -m util.prepare coco_masks --root data/coco`` reads
``<root>/annotations/instances_{train,val}2014.json`` (pycocotools) and writes
``<root>/annotations/{train,val}2014/<image stem>.png``: single-channel uint8, 0 background,
1..80 = COCO's 80 categories in the order of their category ids (util.folds.COCO_CLASSES).
Instances are painted from the largest to the smallest area, so a small object lying on a
large one stays visible; crowd annotations are painted like the others. Existing PNGs are kept
unless ``--force``.
"""
from __future__ import annotations

import argparse
import json
from functools import partial
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from util.atomic import write_atomic
from util.io import DataError

SPLITS = ("train2014", "val2014")


def _load_coco(annotation_file: Path):
    try:
        from pycocotools.coco import COCO
    except ImportError as err:  # pragma: no cover - pycocotools is in requirements.txt
        raise DataError("pycocotools is needed for coco_masks: pip install pycocotools") from err
    if not annotation_file.is_file():
        raise DataError(f"COCO annotation file not found: {annotation_file}; download "
                        "annotations_trainval2014.zip from https://cocodataset.org/#download and unzip it "
                        "into the COCO root (see data/README.md)")
    return COCO(str(annotation_file))


def category_index(coco) -> dict[int, int]:
    """COCO category id (1..90 with gaps) -> mask value 1..80, in category-id order."""
    return {cat_id: i + 1 for i, cat_id in enumerate(sorted(coco.getCatIds()))}


def render_mask(coco, image_id: int, categories: dict[int, int]) -> np.ndarray:
    """The class-index mask of one image (largest instances painted first)."""
    info = coco.loadImgs(image_id)[0]
    mask = np.zeros((info["height"], info["width"]), np.uint8)
    annotations = coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=None))
    for ann in sorted(annotations, key=lambda a: -a["area"]):
        mask[coco.annToMask(ann) > 0] = categories[ann["category_id"]]
    return mask


def _write_one(image_id: int, coco, categories, out_dir: Path, force: bool) -> int:
    info = coco.loadImgs(image_id)[0]
    path = out_dir / (Path(info["file_name"]).stem + ".png")
    if path.is_file() and not force:
        return 0
    mask = Image.fromarray(render_mask(coco, image_id, categories), mode="L")
    write_atomic(path, lambda tmp: mask.save(tmp, format="PNG"))
    return 1


def write_masks(root: Path, split: str, *, workers: int = 2, force: bool = False, progress: bool = True) -> dict:
    coco = _load_coco(root / "annotations" / f"instances_{split}.json")
    categories = category_index(coco)
    if len(categories) != 80:
        raise DataError(f"instances_{split}.json has {len(categories)} categories, expected COCO's 80")
    out_dir = root / "annotations" / split
    out_dir.mkdir(parents=True, exist_ok=True)
    image_ids = sorted(coco.getImgIds())
    job = partial(_write_one, coco=coco, categories=categories, out_dir=out_dir, force=force)
    if workers > 1:
        with Pool(workers) as pool:
            written = list(tqdm(pool.imap(job, image_ids, chunksize=64), total=len(image_ids),
                                desc=f"COCO {split} masks", disable=not progress))
    else:
        written = [job(i) for i in tqdm(image_ids, desc=f"COCO {split} masks", disable=not progress)]
    return {"split": split, "images": len(image_ids), "written": int(sum(written)), "directory": str(out_dir)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", default="data/coco", help="COCO root holding annotations/instances_*2014.json")
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--force", action="store_true", help="rewrite existing masks")


def run(args: argparse.Namespace) -> None:
    root = Path(args.root)
    for split in args.splits:
        summary = write_masks(root, split, workers=args.workers, force=args.force)
        print(json.dumps(summary))
