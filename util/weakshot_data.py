"""Weak-shot semantic segmentation data (SPEC_SIMFORMER 2, 6, 15.1): the label maps the project
already reads (:class:`util.dataset.DataSource`), seen differently.

* **classes**: train id = the label-map value, ``0`` background (a base class) .. ``N`` (the
  dataset's N classes), 255 ignore; K = N + 1. Fold k of :mod:`util.folds` names the novel
  classes (PASCAL-5i / the toy: 5, COCO-20i: 20); base = background + the others.
* **training view** (``train.simformer.supervision``):

  - ``weak_shot``: novel pixels -> 255 (hidden in "ignore", as the original), novel classes
    given as image-level labels only (``image_labels``: multi-hot over the K classes);
  - ``base_only`` (the lower bound): the same pixel map, no image-level label;
  - ``full`` (the upper bound): the full label map, no image-level label needed.

  Images are the WHOLE training list (no "BAM filter": images with novel classes are the point).
  Image-level labels come from the whole image's label map (``image_labels=image``, the fix of
  SPEC 10 defect 9: what real image-level annotations give) or, as the original, from the
  augmented crop (``image_labels=crop``), or from a JSON file of real image-level labels
  (``image_labels_file``: ``{"<image id>": ["<class name>" | id, ...]}``), which must name novel
  classes of the split only.
* **pairs** (SPEC 6, pair mode = the model has a SimNet): items ``2i`` and ``2i + 1`` of a
  process's batch are an anchor and its partner drawn by the "Deconf0.01" sampler
  (:func:`model.simformer_criterion.build_pair_index` / ``draw_partner`` over the images' class
  sets). Sample ``i`` of epoch ``e`` is a pure function of ``(seed + e, i)`` and the number of
  processes (which decides which items share a process).
* **evaluation**: every image of the val list at its original resolution (the model's input
  resized so its short side is ``val_short_side``, long side <= ``val_max_side``; 0 = as is).

A label-map value that is not a class of the dataset (nor 255) is refused naming the file and
the values; so is an image-level label naming a class outside the split's novel classes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Set

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from util.config import ConfigError, resolve_path
from util.dataset import DataSource, _generators, build_source
from util.io import DataError
from util.lists import ImageEntry
from util.transforms import train_transform

SUPERVISIONS = ("weak_shot", "base_only", "full")
IMAGE_LABELS = ("image", "crop")
IGNORE = 255
_PAIR_TAG = 7          # generator stream of the pair draws (the dataset module uses 0 and 1)


@dataclass(frozen=True)
class WeakShotSplit:
    """The classes of a weak-shot split: train ids 0..K-1 (0 = background)."""

    dataset: str
    split: int
    class_names: tuple          # K names, "background" first
    base: tuple                 # base train ids (0 included), sorted
    novel: tuple                # novel train ids, sorted

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def check_label_values(self, values: Sequence[int], where: str) -> None:
        """Refuse label-map values outside 0..K-1 and 255."""
        bad = sorted(int(v) for v in values if int(v) != IGNORE and not 0 <= int(v) < self.num_classes)
        if bad:
            raise DataError(f"{where}: label values {bad} are not classes of {self.dataset} (0..{self.num_classes - 1}"
                            f" and {IGNORE} = ignore); the weak-shot split reads the dataset's label maps as they are")

    def check_image_labels(self, labels: Sequence, where: str) -> List[int]:
        """Image-level labels (names or train ids) -> sorted novel train ids; anything that is not a
        novel class of this split is refused by name."""
        ids, bad = set(), []
        for label in labels:
            if isinstance(label, str) and label in self.class_names:
                c = self.class_names.index(label)
            elif isinstance(label, (int, np.integer)) and not isinstance(label, bool):
                c = int(label)
            else:
                bad.append(label)
                continue
            if c not in self.novel:
                bad.append(label)
            else:
                ids.add(c)
        if bad:
            novel = ", ".join(f"{c} {self.class_names[c]}" for c in self.novel)
            raise DataError(f"{where}: image-level labels {bad} name classes outside the novel classes of "
                            f"{self.dataset} split {self.split} ({novel}); image-level labels are for novel "
                            "classes only")
        return sorted(ids)


def weakshot_split(source: DataSource) -> WeakShotSplit:
    if hasattr(source, "weakshot_split"):      # util.weakshot_benchmarks: no background class
        return source.weakshot_split()
    fold = source.fold
    names = ("background",) + tuple(fold.class_names)
    return WeakShotSplit(source.dataset, source.split, names, (0,) + tuple(fold.base), tuple(fold.novel))


def pixel_target(label: np.ndarray, split: WeakShotSplit, supervision: str) -> np.ndarray:
    """The training label map: novel pixels -> 255 except with ``full`` supervision."""
    if supervision not in SUPERVISIONS:
        raise ConfigError(f"train.simformer.supervision must be one of {', '.join(SUPERVISIONS)}, got {supervision!r}")
    if supervision == "full" or not split.novel:
        return label
    out = label.copy()
    out[np.isin(label, split.novel)] = IGNORE
    return out


def multi_hot(ids: Sequence[int], num_classes: int) -> torch.Tensor:
    vec = torch.zeros(num_classes, dtype=torch.bool)
    vec[list(ids)] = True
    return vec


def read_image_labels_file(path: Path, split: WeakShotSplit) -> Dict[str, List[int]]:
    """``{"<image id>": [names or ids]}`` -> image id -> novel train ids (checked)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"train.simformer.image_labels_file = {path}: not a readable JSON file ({err})") from None
    if not isinstance(data, dict):
        raise DataError(f"train.simformer.image_labels_file = {path}: expected an object image id -> list of classes")
    return {str(k): split.check_image_labels(v if isinstance(v, list) else [v], f"{path} [{k!r}]")
            for k, v in data.items()}


def _image_id(entry: ImageEntry) -> str:
    return Path(entry.image).stem


class WeakShotTrainSet(Dataset):
    """Training images of the weak-shot view (module docstring). ``num_items`` = images per
    "epoch" (an evaluation period) over all processes; ``pairs``: item 2i+1 of a process is the
    partner of item 2i (then the per-process batch must be even)."""

    def __init__(self, *, source: DataSource, split: WeakShotSplit, transform, seed: int, num_items: int,
                 supervision: str = "weak_shot", image_labels: str = "image",
                 file_labels: Optional[Dict[str, List[int]]] = None, pairs: bool = False,
                 pair_options: Optional[Mapping] = None, world_size: int = 1, log: Callable[[str], None] = print):
        if supervision not in SUPERVISIONS:
            raise ConfigError(f"train.simformer.supervision must be one of {', '.join(SUPERVISIONS)}, "
                              f"got {supervision!r}")
        if image_labels not in IMAGE_LABELS:
            raise ConfigError(f"train.simformer.image_labels must be one of {', '.join(IMAGE_LABELS)}, "
                              f"got {image_labels!r}")
        self.source, self.split, self.transform, self.seed = source, split, transform, int(seed)
        self.supervision, self.image_labels, self.file_labels = supervision, image_labels, file_labels
        self.pairs, self.world_size, self.num_items = bool(pairs), int(world_size), int(num_items)
        self.epoch = 0
        self.entries = source.entries("train")
        if not self.entries:
            raise DataError(f"the train list of {source.dataset} is empty")
        novel = set(split.novel)
        self.base_sets: List[Set[int]] = []
        self.novel_sets: List[Set[int]] = []
        for entry in self.entries:
            split.check_label_values(entry.class_pixels, str(source.root / entry.mask))
            present = {int(c) for c in entry.class_pixels}
            self.base_sets.append(present - novel)
            self.novel_sets.append(present & novel)
        if file_labels is not None:
            missing = [_image_id(e) for e in self.entries if _image_id(e) not in file_labels]
            if missing:
                raise DataError(f"train.simformer.image_labels_file has no entry for {len(missing)} training images "
                                f"(first: {missing[:3]})")
        self.pair_index = None
        if self.pairs:
            from model.simformer_criterion import build_pair_index
            options = dict(pair_options or {})
            self.min_prob = float(options.pop("min_prob", 0.01))
            novel_sets = self.novel_sets if file_labels is None else \
                [set(file_labels[_image_id(e)]) for e in self.entries]
            self.pair_index = build_pair_index(self.base_sets, novel_sets, num_classes=split.num_classes,
                                               rng=np.random.default_rng(self.seed), **options)
            anchors = sum(len(d) >= 2 for d in self.pair_index["deconf"])
            log(f"pair index: {anchors} of {len(self.entries)} images are anchors with >= 2 novel classes "
                f"with candidates (Deconf0.01)")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_items

    def _order(self, block: int) -> np.ndarray:
        key = (self.seed + self.epoch, block)
        if getattr(self, "_order_key", None) != key:
            self._order_key = key
            self._order_perm = np.random.default_rng(np.random.SeedSequence([self.seed + self.epoch, 3, block])) \
                .permutation(len(self.entries))
        return self._order_perm

    def image_of(self, index: int) -> int:
        """The entry index of item ``index`` (anchors in a seeded order per pass; partners drawn)."""
        n = len(self.entries)
        if not self.pairs:
            return int(self._order(index // n)[index % n])
        w = self.world_size
        rank, local = index % w, index // w
        pair = (local // 2) * w + rank
        anchor = int(self._order(pair // n)[pair % n])
        if local % 2 == 0:
            return anchor
        from model.simformer_criterion import draw_partner
        rng = np.random.default_rng(np.random.SeedSequence([self.seed + self.epoch, _PAIR_TAG, pair]))
        return draw_partner(self.pair_index, anchor, rng, min_prob=self.min_prob)

    def __getitem__(self, index: int) -> dict:
        return self.load(self.image_of(index), index)

    def load(self, image_index: int, index: int) -> dict:
        """Training entry ``image_index`` transformed with the draws of item ``index``."""
        entry = self.entries[image_index]
        image, label = self.source.read(entry)
        self.split.check_label_values(np.unique(label), str(self.source.root / entry.mask))
        rng = _generators(self.seed + self.epoch, 0, index, 1)[0]
        marker = np.zeros(label.shape, np.uint8)          # 255 where the transform pads (outside the image)
        img, (pad, full) = self.transform(image, [marker, label], rng)
        pad = pad == IGNORE
        full[pad] = IGNORE
        target = torch.from_numpy(pixel_target(full.numpy().astype(np.uint8), self.split, self.supervision)).long()
        tags: List[int] = []
        if self.supervision == "weak_shot":
            if self.file_labels is not None:
                tags = self.file_labels[_image_id(entry)]
            elif self.image_labels == "crop":
                tags = sorted(int(c) for c in torch.unique(full).tolist() if int(c) in self.split.novel)
            else:
                tags = sorted(self.novel_sets[image_index])
        return {"image": img, "label": target, "pad": pad.to(torch.uint8),
                "image_labels": multi_hot(tags, self.split.num_classes), "image_index": torch.tensor(image_index)}


def eval_size(height: int, width: int, short_side: int, max_side: int) -> tuple:
    """detectron2's ResizeShortestEdge: short side -> ``short_side``, long side <= ``max_side``
    (0 = no resize / no cap)."""
    if not short_side:
        return height, width
    scale = short_side / min(height, width)
    if max_side and max(height, width) * scale > max_side:
        scale = max_side / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


class WeakShotEvalSet(Dataset):
    """Evaluation images: ``image`` 3 x h x w float 0..255 RGB (resized, not normalised: the model
    normalises and pads), ``label`` H x W long at the original size (all K classes), ``image_id``."""

    def __init__(self, *, source: DataSource, split: WeakShotSplit, short_side: int = 0, max_side: int = 0,
                 limit: int = 0):
        self.source, self.split = source, split
        self.short_side, self.max_side = int(short_side), int(max_side)
        self.entries = source.entries("val")
        if limit:
            self.entries = self.entries[:int(limit)]
        for entry in self.entries:
            split.check_label_values(entry.class_pixels, str(source.root / entry.mask))

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        entry = self.entries[index]
        image, label = self.source.read(entry)
        self.split.check_label_values(np.unique(label), str(self.source.root / entry.mask))
        return {"image": eval_image(image, self.short_side, self.max_side),
                "label": torch.from_numpy(label.astype(np.int64)), "image_id": _image_id(entry)}


def eval_image(image: np.ndarray, short_side: int, max_side: int) -> torch.Tensor:
    """The evaluation input of an H x W x 3 RGB image (float 0..255): resized by :func:`eval_size`
    (bilinear), as a 3 x h x w float tensor, not normalised (the model normalises and pads)."""
    h, w = eval_size(image.shape[0], image.shape[1], short_side, max_side)
    if (h, w) != image.shape[:2]:
        image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32))


def collate_list(batch: Sequence[dict]) -> dict:
    """Evaluation batches of differently sized images: lists."""
    return {key: [sample[key] for sample in batch] for key in batch[0]}


def _build_source(cfg: Mapping, log: Callable[[str], None]) -> DataSource:
    """``data.dataset``'s source; COCO-Stuff-10K and ADE20K from util.weakshot_benchmarks."""
    from util.weakshot_benchmarks import BENCHMARKS, build_benchmark_source
    if cfg["data"]["dataset"] in BENCHMARKS:
        return build_benchmark_source(cfg, log=log)
    return build_source(cfg, log=log)


def _world_size() -> int:
    import torch.distributed as dist
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def build_weakshot_data(cfg: Mapping, log: Callable[[str], None] = print, *, pairs: Optional[bool] = None):
    """(train set, val set, split) of the config's weak-shot view (``train.simformer``)."""
    stage, data = cfg["train"]["simformer"], cfg["data"]
    source = _build_source(cfg, log)
    split = weakshot_split(source)
    if pairs is None:
        pairs = bool(cfg["model"]["simformer"]["simnet"])
    world = _world_size()
    batch = int(stage["batch_size"])
    if pairs and (batch // world) % 2:
        raise ConfigError(f"train.simformer.batch_size={batch} gives {batch // world} images per process: pair mode "
                          "(model.simformer.simnet=true) needs an even number of images per process (pairs 2i, 2i+1)")
    crop = int(stage["crop_size"] or data["train_size"])
    transform = train_transform(crop_size=crop, scale_range=stage["scale_range"], rotate_range=data["rotate_range"],
                                rotate_prob=data["rotate_prob"], blur_prob=data["blur_prob"],
                                flip_prob=data["flip_prob"], mean=data["mean"], std=data["std"],
                                ignore_label=IGNORE, crop_keep_fg=0.0, crop_redraws=0)
    file_labels = None
    if stage["image_labels_file"]:
        file_labels = read_image_labels_file(resolve_path(stage["image_labels_file"], cfg), split)
    train_set = WeakShotTrainSet(
        source=source, split=split, transform=transform, seed=cfg["seed"],
        num_items=int(stage["eval_period"]) * batch, supervision=stage["supervision"],
        image_labels=stage["image_labels"], file_labels=file_labels, pairs=pairs,
        pair_options={"min_prob": stage["pair_min_prob"], "deconf_cap": stage["deconf_cap"],
                      "novel_comm_cap": stage["novel_comm_cap"], "base_comm_cap": stage["base_comm_cap"]},
        world_size=world, log=log)
    val_set = WeakShotEvalSet(source=source, split=split, short_side=stage["val_short_side"],
                              max_side=stage["val_max_side"], limit=stage["val_images"])
    return train_set, val_set, split


def build_weakshot_test_set(cfg: Mapping, log: Callable[[str], None] = print):
    """(every val image, split) for the test protocol."""
    stage = cfg["train"]["simformer"]
    source = _build_source(cfg, log)
    split = weakshot_split(source)
    return WeakShotEvalSet(source=source, split=split, short_side=stage["val_short_side"],
                           max_side=stage["val_max_side"]), split
