"""Image lists, fold lists and per-class support pools, built from the masks (SPEC 3.2).

A *pair list* file has one ``image mask`` line per image, paths relative to the data root
(the BAM/PFENet format). Building fold lists needs the pixel count of every class in every
mask; those counts are computed once per list file and cached (``data.cache_dir``), and the
fold lists derived from them are written next to them for inspection.

Rules (the original's):
- train: keep an image if some base class covers >= ``min_pixels`` pixels and, with
  ``drop_novel`` (the "BAM filter"), no novel class appears in it at all;
- val: keep an image if some novel class covers >= ``min_pixels`` pixels;
- support pool of class c: the kept images in which c covers >= ``min_pixels`` pixels.
An episode's class is drawn among the query's classes of the mode present with any size.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from multiprocessing.pool import ThreadPool
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

from util.atomic import write_text_atomic
from util.folds import Fold
from util.io import DataError, read_mask

# Counts of the original lists (VOC2012 + SBD, SegmentationClassAug, voc_sbd_merge_noduplicate
# train list, VOC val list, 2048-pixel rule, BAM filter on): SPEC 3.2.
EXPECTED_COUNTS = {
    ("pascal", "train"): (4208, 3726, 2752, 4510),
    ("pascal", "val"): (364, 445, 592, 336),
}
EXPECTED_COCO_FOLD0 = {"train": 21917, "val": 26052}   # use_split_coco=True


@dataclass
class ImageEntry:
    """One image of a list: paths relative to the data root and its class pixel counts."""

    image: str
    mask: str
    class_pixels: dict[int, int] = field(default_factory=dict)   # class id -> pixels (no 0, no 255)


@dataclass
class FoldList:
    """The images of one fold and mode, with the support pool of every class."""

    mode: str                           # "train" | "val"
    entries: list[ImageEntry]           # the kept images, in list order
    classes: list[list[int]]            # per kept image: the classes an episode may pick (present, any size)
    pools: dict[int, list[int]]         # class id -> indices into ``entries``
    dropped: int                        # images of the source list not kept


def read_pair_list(list_path: str | os.PathLike, config_key: str) -> list[tuple[str, str]]:
    """Parse a pair list; errors name the file, the line and the config key."""
    list_path = Path(list_path)
    if not list_path.is_file():
        raise DataError(f"image list not found: {list_path} (config key {config_key}; "
                        "`python -m util.prepare lists` writes it, see data/README.md)")
    pairs = []
    with open(list_path, "r", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2:
                raise DataError(f"{list_path}:{number}: expected 'image_path mask_path', got {line.strip()!r}")
            pairs.append((parts[0], parts[1]))
    if not pairs:
        raise DataError(f"image list {list_path} is empty (config key {config_key})")
    return pairs


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def class_pixel_counts(pairs: Sequence[tuple[str, str]], root: Path, cache_file: Path | None,
                       mask_reader: Callable[[Path], np.ndarray] | None = None,
                       workers: int = 4, progress: bool = True, count_zero: bool = False) -> list[ImageEntry]:
    """Pixel count of every class (not 0, not 255) in every mask, cached in ``cache_file``;
    ``count_zero``: value 0 is a class too (the weak-shot benchmarks: 0 = person / wall).

    The cache is keyed by the list itself (paths, in order) and the root: it is rebuilt when
    missing, unreadable or made for another list.
    """
    key_parts = ([] if not count_zero else ["with-0"]) + [str(root.resolve()), list(pairs)]
    key = hashlib.sha256(json.dumps(key_parts).encode()).hexdigest()
    skipped = (255,) if count_zero else (0, 255)
    if cache_file is not None and cache_file.is_file():
        try:
            cached = json.loads(cache_file.read_text())
            if cached.get("key") == key:
                return [ImageEntry(img, msk, {int(c): n for c, n in counts.items()})
                        for (img, msk), counts in zip(pairs, cached["counts"])]
        except (ValueError, KeyError, TypeError):
            pass   # a corrupt cache is rebuilt below
    reader = mask_reader or (lambda p: read_mask(p, "data.root"))

    def count(pair):
        mask = reader(root / pair[1])
        hist = np.bincount(mask.ravel(), minlength=256)
        return {int(c): int(hist[c]) for c in np.nonzero(hist)[0] if c not in skipped}

    with ThreadPool(max(1, workers)) as pool:
        iterator = pool.imap(count, pairs, chunksize=16)
        counts = list(tqdm(iterator, total=len(pairs), desc=f"scanning masks ({root})", disable=not progress,
                           leave=False))
    if cache_file is not None:
        write_text_atomic(cache_file, json.dumps({"key": key,
                                                  "counts": [{str(c): n for c, n in d.items()} for d in counts]}))
    return [ImageEntry(img, msk, d) for (img, msk), d in zip(pairs, counts)]


def build_fold_list(entries: Sequence[ImageEntry], fold: Fold, mode: str, *, min_pixels: int,
                    drop_novel: bool = True) -> FoldList:
    """Apply the original list rules (module docstring) for ``mode`` in ``("train", "val")``."""
    if mode not in ("train", "val"):
        raise ValueError(f"mode must be 'train' or 'val', got {mode!r}")
    wanted = set(fold.base if mode == "train" else fold.novel)
    novel = set(fold.novel)
    kept: list[ImageEntry] = []
    classes: list[list[int]] = []
    pools: dict[int, list[int]] = {c: [] for c in sorted(wanted)}
    for entry in entries:
        present = entry.class_pixels
        if mode == "train" and drop_novel and any(c in novel for c in present):
            continue
        large = [c for c in sorted(present) if c in wanted and present[c] >= min_pixels]
        if not large:
            continue
        index = len(kept)
        kept.append(entry)
        classes.append([c for c in sorted(present) if c in wanted])
        for c in large:
            pools[c].append(index)
    return FoldList(mode, kept, classes, pools, dropped=len(entries) - len(kept))


def write_fold_list(fold_list: FoldList, path: Path) -> None:
    """Write the kept images (pair-list format) and, beside them, the class pools as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{e.image} {e.mask}\n" for e in fold_list.entries))
    pools = {str(c): [fold_list.entries[i].image for i in idx] for c, idx in fold_list.pools.items()}
    path.with_suffix(".pools.json").write_text(json.dumps(pools, indent=0))


def check_expected_counts(dataset: str, mode: str, split: int, count: int, *, use_split_coco: bool,
                          drop_novel: bool, min_pixels: int) -> str | None:
    """A loud warning when a PASCAL (or COCO fold 0) list differs from the original's count."""
    if min_pixels != 2048 or (mode == "train" and not drop_novel):
        return None
    if dataset == "pascal":
        expected = EXPECTED_COUNTS[("pascal", mode)][split]
    elif dataset == "coco" and use_split_coco and split == 0:
        expected = EXPECTED_COCO_FOLD0[mode]
    else:
        return None
    if count == expected:
        return None
    return (f"WARNING: the {dataset} fold {split} {mode} list has {count} images, the original has {expected}. "
            f"Your lists or masks differ from the standard VOC2012+SBD (SegmentationClassAug) / COCO2014 "
            f"setup, so numbers will not be comparable with papers. See data/README.md.")


# -- `python -m util.prepare lists` ------------------------------------------------------------
def pascal_pair_lists(root: Path) -> dict[str, list[tuple[str, str]]]:
    """VOC2012 + SBD: val = VOC's segmentation val ids; train = every SegmentationClassAug mask
    with its JPEG whose id is not in val (the 10,582-image "train_aug" = voc_sbd_merge_noduplicate)."""
    mask_dir, image_dir = root / "SegmentationClassAug", root / "JPEGImages"
    val_ids_file = root / "ImageSets" / "Segmentation" / "val.txt"
    for needed, what in ((image_dir, "VOC2012 JPEGImages"), (val_ids_file, "VOC2012 ImageSets/Segmentation/val.txt"),
                         (mask_dir, "SegmentationClassAug (VOC2012 + SBD masks)")):
        if not needed.exists():
            raise DataError(f"{needed} not found: the PASCAL root needs {what}; see data/README.md")
    val_ids = [line.strip() for line in val_ids_file.read_text().splitlines() if line.strip()]
    val_set = set(val_ids)
    train_ids = sorted(p.stem for p in mask_dir.glob("*.png")
                       if p.stem not in val_set and (image_dir / f"{p.stem}.jpg").is_file())
    missing_val = [i for i in val_ids if not (mask_dir / f"{i}.png").is_file()]
    if missing_val:
        raise DataError(f"{len(missing_val)} VOC val masks are missing from {mask_dir}, e.g. {missing_val[:3]}")

    def pairs(ids):
        return [(f"JPEGImages/{i}.jpg", f"SegmentationClassAug/{i}.png") for i in ids]
    return {"train_aug": pairs(train_ids), "val": pairs(val_ids)}


def coco_pair_lists(root: Path) -> dict[str, list[tuple[str, str]]]:
    """COCO2014: every image of train2014 / val2014 with its mask in annotations/<split>/."""
    lists = {}
    for split, name in (("train2014", "train"), ("val2014", "val")):
        image_dir, mask_dir = root / split, root / "annotations" / split
        if not image_dir.is_dir():
            raise DataError(f"{image_dir} not found; download COCO2014 images (see data/README.md)")
        if not mask_dir.is_dir():
            raise DataError(f"{mask_dir} not found; run `python -m util.prepare coco_masks --root {root}`")
        images = sorted(image_dir.glob("*.jpg"))
        missing = [p.name for p in images if not (mask_dir / f"{p.stem}.png").is_file()]
        if missing:
            raise DataError(f"{len(missing)} {split} images have no mask in {mask_dir}, e.g. {missing[:3]}; "
                            f"run `python -m util.prepare coco_masks --root {root}`")
        lists[name] = [(f"{split}/{p.name}", f"annotations/{split}/{p.stem}.png") for p in images]
    return lists


def write_pair_list(pairs: Sequence[tuple[str, str]], path: Path) -> None:
    write_text_atomic(path, "".join(f"{img} {msk}\n" for img, msk in pairs))


def add_arguments(parser) -> None:
    parser.add_argument("--dataset", choices=("pascal", "coco"), required=True)
    parser.add_argument("--root", help="dataset root (default data/VOCdevkit/VOC2012 or data/coco)")
    parser.add_argument("--cache-dir", default="data/cache", help="where mask statistics are cached")
    parser.add_argument("--no-check", action="store_true",
                        help="do not scan the masks for the per-fold counts")
    parser.add_argument("--workers", type=int, default=4)


def run(args) -> None:
    from util.folds import coco_fold, pascal_fold, PASCAL_CLASSES, COCO_CLASSES

    root = Path(args.root or ("data/VOCdevkit/VOC2012" if args.dataset == "pascal" else "data/coco"))
    lists = pascal_pair_lists(root) if args.dataset == "pascal" else coco_pair_lists(root)
    for name, pairs in lists.items():
        write_pair_list(pairs, root / "lists" / f"{name}.txt")
        print(f"wrote {root / 'lists' / (name + '.txt')}: {len(pairs)} images")
    if args.no_check:
        return
    names = PASCAL_CLASSES if args.dataset == "pascal" else COCO_CLASSES
    for list_name, pairs in lists.items():
        mode = "val" if list_name == "val" else "train"
        entries = class_pixel_counts(pairs, root, Path(args.cache_dir) / args.dataset / f"{list_name}.counts.json",
                                     workers=args.workers)
        for split in range(4):
            base, novel = pascal_fold(split) if args.dataset == "pascal" else coco_fold(split, True)
            fold_list = build_fold_list(entries, Fold(names, base, novel), mode, min_pixels=2048, drop_novel=True)
            count = len(fold_list.entries)
            warning = check_expected_counts(args.dataset, mode, split, count, use_split_coco=True,
                                            drop_novel=True, min_pixels=2048)
            known = args.dataset == "pascal" or split == 0
            note = f"\n{warning}" if warning else (" (the original's count)" if known else "")
            print(f"fold {split} {mode}: {count} images{note}")
