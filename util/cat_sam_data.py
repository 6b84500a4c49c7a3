"""Data of stage ``cat_sam`` (SPEC_CAT_SAM 6-9): a generic folder format for binary segmentation
of one's own domain, the format the real datasets (Kvasir-SEG, WHU, SBU-Shadow) are converted to.

Folder format (``data.root``)::

    <root>/train.txt            every training sample              (required for data.shot=0)
    <root>/val.txt              validation samples                  (optional: model selection)
    <root>/test.txt             test samples                        (required for test.py)
    <root>/train_1shot.txt      the few-shot training lists         (optional; data.shot=K reads
    <root>/train_16shot.txt       train_<K>shot.txt)

Each non-empty line is ``<image path> <mask path>``, two paths relative to ``<root>`` separated by
white space (paths cannot contain spaces); lines starting with ``#`` are comments. Images: any
file OpenCV reads (RGB, grey is repeated to 3 channels). Masks: single channel, PNG or JPG (a
3-channel mask file is read as grey), the same height and width as the image; foreground = value
> ``data.cat_sam.mask_threshold`` (default 127: Kvasir-SEG's masks are JPEGs, whose compression
leaves values such as 240-254 inside objects and 1-20 outside; the original's > 254 drops those
pixels; for 0/255 PNG masks 127 and 254 select the same pixels). Empty masks are allowed (the
test counts them; full training gets no prompt and an all-zero target for them), except in a
few-shot training list, whose every sample must hold at least one object.

Objects = connected components of the foreground (``data.cat_sam.connectivity``: 8, or 4 as the
original on WHU; scipy.ndimage.label) with at least ``max(min_area, min_area_frac x largest
component)`` pixels; smaller components get no prompt but stay foreground for the metric.
Boxes are tight ``(x_min, y_min, x_max, y_max)`` in pixels, max inclusive (SPEC 6).

Refused by name (:class:`util.io.DataError`): a missing list or file, a malformed line, an
unreadable image or mask, a mask whose size differs from its image (the original silently
resized the image), an empty mask in a few-shot training list; :func:`check_boxes` refuses a
box outside the image (prompts given by hand to the API / predict).

Training samples (:class:`CATSAMTrainSet`) are a pure function of ``(seed, epoch, index)``: the
flips, crop, prompt type, points and mask noise come from ``numpy.random.default_rng([seed,
epoch, index])`` in the worker, never from a per-worker re-seeding (the original re-seeded every
worker with 3407 every epoch, so a 1-shot run trained 2000 times on one fixed view, SPEC 7).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from util.config import ConfigError
from util.io import DataError

PROMPT_TYPES = ("point", "box", "mask")


# -- lists and files ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    image: Path
    mask: Path

    @property
    def name(self) -> str:
        return self.image.stem


def list_path(root, name: str) -> Path:
    return Path(root) / name


def train_list_name(shot: int) -> str:
    """``train_<K>shot.txt`` for data.shot = K > 0, ``train.txt`` (full data) for 0."""
    return f"train_{shot}shot.txt" if shot > 0 else "train.txt"


def read_list(root, name: str, *, required: bool = True) -> Optional[List[Entry]]:
    """The entries of ``<root>/<name>``; a missing list is a DataError (``required``) or None."""
    root = Path(root)
    path = root / name
    if not path.is_file():
        if required:
            raise DataError(f"list file {path} does not exist (data.root={root}; the folder format is described "
                            f"in util/cat_sam_data.py)")
        return None
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise DataError(f"{path}, line {number}: expected '<image path> <mask path>' (relative to {root}), "
                            f"got {line!r}")
        entry = Entry(root / parts[0], root / parts[1])
        for what, file in (("image", entry.image), ("mask", entry.mask)):
            if not file.is_file():
                raise DataError(f"{path}, line {number}: {what} file {file} does not exist")
        entries.append(entry)
    if not entries:
        raise DataError(f"list file {path} holds no sample")
    return entries


def read_image(path: Path) -> np.ndarray:
    """H x W x 3 uint8 RGB."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise DataError(f"image file {path} cannot be read as an image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_mask(path: Path, threshold: float) -> np.ndarray:
    """H x W bool: value > ``threshold`` (single-channel PNG/JPG; colour files are read as grey)."""
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise DataError(f"mask file {path} cannot be read as an image")
    return mask > threshold


def load_pair(entry: Entry, threshold: float) -> Tuple[np.ndarray, np.ndarray]:
    """(image H x W x 3 uint8, foreground H x W bool); sizes must agree."""
    image, mask = read_image(entry.image), read_mask(entry.mask, threshold)
    if image.shape[:2] != mask.shape:
        raise DataError(f"mask {entry.mask} is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image {entry.image} is "
                        f"{image.shape[1]}x{image.shape[0]}: a mask must have its image's size")
    return image, mask


# -- objects, boxes, points -----------------------------------------------------------------------

def random_object_points(objects, rng: np.random.Generator) -> torch.Tensor:
    """One point drawn uniformly among each object's pixels: N x 1 x 2 (x, y) float32 (the
    training point prompt, SPEC_CAT_SAM 6)."""
    points = []
    for o in objects:
        ys, xs = np.nonzero(o)
        k = int(rng.integers(len(xs)))
        points.append([[xs[k], ys[k]]])
    return torch.tensor(points, dtype=torch.float32)


@dataclass(frozen=True)
class ObjectRules:
    """Which connected components are objects (``data.cat_sam``)."""

    connectivity: int = 8
    min_area: int = 20
    min_area_frac: float = 0.001

    @classmethod
    def from_config(cls, cfg: Mapping) -> "ObjectRules":
        d = cfg["data"]["cat_sam"]
        if int(d["connectivity"]) not in (4, 8):
            raise ConfigError(f"data.cat_sam.connectivity must be 4 or 8, got {d['connectivity']}")
        return cls(int(d["connectivity"]), int(d["min_area"]), float(d["min_area_frac"]))


def components(foreground: np.ndarray, rules: ObjectRules = ObjectRules()) -> List[np.ndarray]:
    """The objects of a binary mask: H x W bool per kept connected component, in label order."""
    structure = np.ones((3, 3), bool) if rules.connectivity == 8 else ndimage.generate_binary_structure(2, 1)
    labels, count = ndimage.label(foreground, structure=structure)
    if count == 0:
        return []
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    floor = max(rules.min_area, rules.min_area_frac * areas.max())
    return [labels == i + 1 for i in range(count) if areas[i] >= floor]


def tight_box(mask: np.ndarray) -> np.ndarray:
    """(x_min, y_min, x_max, y_max), max inclusive, of a non-empty H x W bool mask."""
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float32)


def interior_point(mask: np.ndarray) -> np.ndarray:
    """The test's point prompt of an object: (x, y) of its pixel farthest from the background
    (maximum of the Euclidean distance transform, the image border counting as background; ties:
    the first in row-major order). SPEC_CAT_SAM gives no rule for test points (the original draws
    random ones at test time and never uses them); this one is deterministic and always inside."""
    dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return np.array([x, y], dtype=np.float32)


def check_boxes(boxes, height: int, width: int, what: str = "box") -> torch.Tensor:
    """N x 4 (or 4) boxes (x_min, y_min, x_max, y_max) in pixels with corners inside the H x W
    image (0..W, 0..H, as util/predict_cat_sam.py) and ordered (min <= max); anything else is a
    DataError naming the box."""
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        if not all(math.isfinite(v) for v in (x0, y0, x1, y1)) or \
                not (0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height):
            raise DataError(f"{what} {i} ({x0:g}, {y0:g}, {x1:g}, {y1:g}) is not an ordered box inside the "
                            f"{width}x{height} image (corners in 0..{width} x 0..{height}, min <= max)")
    return boxes


# -- noisy mask prompts (SPEC 6) ------------------------------------------------------------------

def noisy_mask(mask: np.ndarray, size: int, rng: np.random.Generator, scale: int = 8,
               threshold: float = 0.5) -> torch.Tensor:
    """The original's mask prompt: the object mask resized bilinearly to size x size, N(0, 1)
    noise added on its "incoherent" band ``|m - up(down(m, 1/scale))| >= 0.01``, then > threshold.
    Returns 1 x size x size float 0/1."""
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    m = F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False)
    low = F.interpolate(m, size=(max(1, size // scale),) * 2, mode="bilinear", align_corners=False)
    band = (m - F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)).abs() >= 0.01
    noise = torch.from_numpy(rng.standard_normal((size, size)).astype(np.float32))[None, None]
    return ((m + noise * band) > threshold).float()[0]


# -- samples --------------------------------------------------------------------------------------

def to_image_tensor(image: np.ndarray) -> torch.Tensor:
    """H x W x 3 uint8 -> 3 x H x W float 0..255 (the model's input)."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float()


def object_targets(objects: Sequence[np.ndarray], height: int, width: int) -> torch.Tensor:
    """N x H x W float per-object targets; one all-zero target for an image without objects."""
    if not objects:
        return torch.zeros(1, height, width)
    return torch.from_numpy(np.stack(objects).astype(np.float32))


def collate_lists(batch: Sequence[dict]) -> dict:
    """Samples of different sizes and object counts: every field a list over the batch."""
    return {key: [sample[key] for sample in batch] for key in batch[0]}


@dataclass(frozen=True)
class Augment:
    """Training augmentation and prompts (``train.cat_sam``; SPEC 6)."""

    flip_prob: float = 0.5
    crop: bool = True
    crop_area: Tuple[float, float] = (0.1, 1.0)
    prompt_types: Tuple[str, ...] = PROMPT_TYPES
    noise_scale: int = 8
    noise_threshold: float = 0.5
    max_objects: int = 0

    @classmethod
    def from_config(cls, cfg: Mapping) -> "Augment":
        t = cfg["train"]["cat_sam"]
        types = tuple(t["prompt_types"])
        bad = [p for p in types if p not in PROMPT_TYPES]
        if not types or bad:
            raise ConfigError(f"train.cat_sam.prompt_types must be a non-empty list of {', '.join(PROMPT_TYPES)}; "
                            f"got {list(types)}")
        low, high = (float(v) for v in t["crop_area"])
        if not 0 < low <= high <= 1:
            raise ConfigError(f"train.cat_sam.crop_area must be [low, high] with 0 < low <= high <= 1, got {t['crop_area']}")
        return cls(float(t["flip_prob"]), bool(t["crop"]), (low, high), types, int(t["noise_scale"]),
                   float(t["noise_threshold"]), int(cfg["data"]["cat_sam"]["max_objects"]))


class CATSAMTrainSet(torch.utils.data.Dataset):
    """Training samples: image (3 x H x W, 0..255, after flips and crop), per-object ``masks``
    (N x H x W), and the prompts of ONE type drawn per sample (``boxes`` N x 4, or ``points``
    N x 1 x 2 with ``point_labels`` N x 1, or ``noisy_masks`` N x 1 x m x m; the others None).

    ``repeats``: the dataset is read ``repeats`` times per engine epoch (an engine epoch is
    ``train.cat_sam.val_every`` passes); item i of engine epoch e is sample ``i % n`` of data epoch
    ``e * repeats + i // n``, drawn from ``default_rng([seed, data_epoch, i % n])``.
    """

    def __init__(self, entries: Sequence[Entry], *, threshold: float, rules: ObjectRules, augment: Augment,
                 mask_size: int, seed: int, repeats: int = 1, require_objects: bool = False) -> None:
        self.entries = list(entries)
        self.threshold, self.rules, self.augment = threshold, rules, augment
        self.mask_size, self.seed, self.repeats = int(mask_size), int(seed), int(repeats)
        self.epoch = 0
        self.collate_fn = collate_lists
        if require_objects:
            for entry in self.entries:
                _, fg = load_pair(entry, threshold)
                if not components(fg, rules):
                    raise DataError(f"few-shot training sample {entry.image} has an empty mask {entry.mask} (no "
                                    f"object above data.cat_sam.min_area): a few-shot list needs an object in every sample")

    def __len__(self) -> int:
        return len(self.entries) * self.repeats

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def rng(self, index: int) -> np.random.Generator:
        n = len(self.entries)
        data_epoch = self.epoch * self.repeats + index // n
        return np.random.default_rng([self.seed, data_epoch, index % n])

    def __getitem__(self, index: int) -> dict:
        entry = self.entries[index % len(self.entries)]
        rng = self.rng(index)
        image, fg = load_pair(entry, self.threshold)
        a = self.augment
        if rng.random() < a.flip_prob:             # vertical
            image, fg = image[::-1], fg[::-1]
        if rng.random() < a.flip_prob:             # horizontal
            image, fg = image[:, ::-1], fg[:, ::-1]
        if a.crop:
            height, width = fg.shape
            side = float(np.sqrt(rng.uniform(*a.crop_area)))
            h, w = max(1, int(round(height * side))), max(1, int(round(width * side)))
            y, x = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            image, fg = image[y:y + h, x:x + w], fg[y:y + h, x:x + w]
        image, fg = np.ascontiguousarray(image), np.ascontiguousarray(fg)
        objects = components(fg, self.rules)
        if a.max_objects and len(objects) > a.max_objects:
            keep = sorted(rng.choice(len(objects), a.max_objects, replace=False).tolist())
            objects = [objects[k] for k in keep]
        kind = a.prompt_types[int(rng.integers(len(a.prompt_types)))]
        sample = {"image": to_image_tensor(image), "masks": object_targets(objects, *fg.shape), "boxes": None,
                  "points": None, "point_labels": None, "noisy_masks": None, "prompt": kind, "name": entry.name}
        if objects:
            if kind == "box":
                sample["boxes"] = torch.from_numpy(np.stack([tight_box(o) for o in objects]))
            elif kind == "point":
                sample["points"] = random_object_points(objects, rng)
                sample["point_labels"] = torch.ones(len(objects), 1, dtype=torch.int64)
            else:
                sample["noisy_masks"] = torch.stack([noisy_mask(o, self.mask_size, rng, a.noise_scale,
                                                                a.noise_threshold) for o in objects])
        return sample


class CATSAMEvalSet(torch.utils.data.Dataset):
    """Evaluation samples (SPEC 9): image, binary ``foreground`` (H x W bool: all foreground pixels,
    what the metric counts), tight ``boxes`` (N x 4) and interior ``points`` (N x 1 x 2) of the
    objects; N = 0 for an image without objects."""

    def __init__(self, entries: Sequence[Entry], *, threshold: float, rules: ObjectRules) -> None:
        self.entries = list(entries)
        self.threshold, self.rules = threshold, rules
        self.collate_fn = collate_lists

    def __len__(self) -> int:
        return len(self.entries)

    def set_epoch(self, epoch: int) -> None:
        pass

    def __getitem__(self, index: int) -> dict:
        entry = self.entries[index]
        image, fg = load_pair(entry, self.threshold)
        objects = components(fg, self.rules)
        boxes = torch.from_numpy(np.stack([tight_box(o) for o in objects])) if objects else torch.zeros(0, 4)
        points = torch.from_numpy(np.stack([interior_point(o) for o in objects]))[:, None] if objects \
            else torch.zeros(0, 1, 2)
        return {"image": to_image_tensor(image), "foreground": torch.from_numpy(fg), "boxes": boxes,
                "points": points, "name": entry.name}


def threshold_of(cfg: Mapping) -> float:
    return float(cfg["data"]["cat_sam"]["mask_threshold"])


def build_eval_set(cfg: Mapping, list_name: str, *, required: bool = True) -> Optional[CATSAMEvalSet]:
    from util.config import resolve_path
    entries = read_list(resolve_path(cfg["data"]["root"], cfg), list_name, required=required)
    if entries is None:
        return None
    return CATSAMEvalSet(entries, threshold=threshold_of(cfg), rules=ObjectRules.from_config(cfg))


def build_train_set(cfg: Mapping, *, mask_size: int, repeats: int = 1) -> CATSAMTrainSet:
    from util.config import resolve_path
    shot = int(cfg["data"]["shot"])
    entries = read_list(resolve_path(cfg["data"]["root"], cfg), train_list_name(shot))
    return CATSAMTrainSet(entries, threshold=threshold_of(cfg), rules=ObjectRules.from_config(cfg),
                          augment=Augment.from_config(cfg), mask_size=mask_size, seed=int(cfg["seed"]),
                          repeats=repeats, require_objects=shot > 0)


def write_list(root, name: str, pairs: Sequence[Tuple[str, str]]) -> Path:
    """Write ``<root>/<name>`` from (image, mask) paths relative to ``root`` (converters, the toy)."""
    path = Path(root) / name
    for image, mask in pairs:
        if any(c.isspace() for c in str(image) + str(mask)):
            raise DataError(f"{name}: paths of the folder format cannot contain white space: {image!r} {mask!r}")
    path.write_text("".join(f"{image} {mask}\n" for image, mask in pairs))
    return path


__all__ = ["Augment", "CATSAMEvalSet", "CATSAMTrainSet", "Entry", "ObjectRules", "PROMPT_TYPES", "build_eval_set",
           "build_train_set", "check_boxes", "collate_lists", "components", "interior_point", "load_pair",
           "noisy_mask", "read_list", "read_mask", "tight_box", "train_list_name", "write_list"]
