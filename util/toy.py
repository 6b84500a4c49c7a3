"""The built-in toy benchmark: a small synthetic few-shot segmentation dataset in PASCAL VOC layout.

It lets the PASCAL-5i code path (lists, folds, episodes, training, evaluation) run unchanged on
a CPU in minutes, and it is the data of the quick start and of the tests.

Twenty classes, class id = index in :data:`TOY_CLASS_NAMES` + 1. Every class is a fixed
combination of shape, hue and texture; any two classes share at most one of the three, so a
class is recognisable from appearance alone. The ten shapes each occur in two classes: class
``k`` and class ``k + 10`` share the shape but differ in hue and texture, which puts every
shape of a PASCAL-5i fold's novel classes also among its base classes (the model must look at
more than the outline).

Each image holds 1 to 3 objects of uniformly drawn classes (at different scales, positions and
rotations; later objects occlude earlier ones) on a cluttered, low-saturation background of
gradients, noise, blobs, lines and specks that belong to no class. Masks mark a 255 "ignore"
band one pixel either side of every outline, like VOC's boundary band.

Layout under the root (``data/toy`` by default)::

    JPEGImages/toy_train_000123.jpg          RGB, JPEG quality 95
    SegmentationClassAug/toy_train_000123.png   mode "L": 0 background, 1..20 class, 255 ignore
    lists/train_aug.txt, lists/val.txt       "JPEGImages/<id>.jpg SegmentationClassAug/<id>.png"
    ImageSets/Segmentation/train.txt, val.txt   ids only
    toy_meta.json                            written last: its presence means "complete"

Image ``i`` of a split is a pure function of ``(seed, split, i)``, so the files are
byte-identical whatever the number of worker processes.

    python -m util.prepare toy                      # data/toy, 1200 train + 400 val images
    python -m util.prepare toy --root /tmp/toy --num-train 40 --num-val 20 --force
"""
from __future__ import annotations

import argparse
import colorsys
import json
import math
import multiprocessing
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from util.atomic import write_atomic, write_text_atomic

GENERATOR_VERSION = 1          # bump whenever the pictures change, so old sets are regenerated
META_FILE = "toy_meta.json"
IMAGE_DIR = "JPEGImages"
MASK_DIR = "SegmentationClassAug"
LIST_DIR = "lists"
IMAGESET_DIR = "ImageSets/Segmentation"
# (split name, split number mixed into the seed, pair-list file name)
SPLITS = (("train", 0, "train_aug.txt"), ("val", 1, "val.txt"))
IGNORE_LABEL = 255
MIN_SIDE, MAX_SIDE = 110, 180              # image height and width, drawn independently
OBJECT_FRACTION_RANGE = (0.04, 0.16)       # target area of one object / image area (log-uniform)
REPORT_MIN_PIXELS = 128                    # the toy config's data.min_class_pixels; only reported
JPEG_QUALITY = 95
MAX_IMAGES_PER_SPLIT = 999_999             # ids have six digits
# a toy image or mask, or the temporary of an interrupted write of one (util.atomic.temporary_name)
_FILE_PATTERN = re.compile(r"^(toy_(train|val)_\d{6}\.(jpg|png)|\.toy_(train|val)_\d{6}\.(jpg|png)\.\d+\.[0-9a-f]{8}\.part)$")


@dataclass(frozen=True)
class ClassStyle:
    """The appearance of one toy class: outline, hue (degrees) and surface pattern."""

    name: str
    shape: str        # see _unit_contours
    hue: float        # HSV hue in degrees; saturation and value are drawn per instance
    texture: str      # solid | striped | dotted | checkered


# Ten shapes x two variants. Variant 0 (ids 1-10) uses hue i for shape i; variant 1 (ids 11-20)
# uses hue i+5 and a different texture, chosen so that two classes sharing a shape, a hue or a
# texture differ in both other attributes. Hues are 28-44 degrees apart, far more than the
# per-instance jitter (+-5 degrees).
CLASS_STYLES: tuple[ClassStyle, ...] = (
    ClassStyle("red_disc", "disc", 0.0, "solid"),
    ClassStyle("orange_square_striped", "square", 28.0, "striped"),
    ClassStyle("yellow_triangle_dotted", "triangle", 54.0, "dotted"),
    ClassStyle("lime_star_checkered", "star", 88.0, "checkered"),
    ClassStyle("green_cross", "cross", 130.0, "solid"),
    ClassStyle("teal_ring_striped", "ring", 172.0, "striped"),
    ClassStyle("sky_hexagon_dotted", "hexagon", 200.0, "dotted"),
    ClassStyle("blue_ellipse_checkered", "ellipse", 228.0, "checkered"),
    ClassStyle("purple_diamond", "diamond", 272.0, "solid"),
    ClassStyle("magenta_crescent_striped", "crescent", 312.0, "striped"),
    ClassStyle("teal_disc_dotted", "disc", 172.0, "dotted"),
    ClassStyle("sky_square_checkered", "square", 200.0, "checkered"),
    ClassStyle("blue_triangle", "triangle", 228.0, "solid"),
    ClassStyle("purple_star_striped", "star", 272.0, "striped"),
    ClassStyle("magenta_cross_dotted", "cross", 312.0, "dotted"),
    ClassStyle("red_ring_checkered", "ring", 0.0, "checkered"),
    ClassStyle("orange_hexagon", "hexagon", 28.0, "solid"),
    ClassStyle("yellow_ellipse_striped", "ellipse", 54.0, "striped"),
    ClassStyle("lime_diamond_dotted", "diamond", 88.0, "dotted"),
    ClassStyle("green_crescent_checkered", "crescent", 130.0, "checkered"),
)
TOY_CLASS_NAMES: tuple[str, ...] = tuple(style.name for style in CLASS_STYLES)


# --------------------------------------------------------------------------------------------
# Shapes and textures
# --------------------------------------------------------------------------------------------

def _circle(radius: float, num_points: int = 64, start: float = 0.0) -> np.ndarray:
    angles = start + np.linspace(0.0, 2.0 * np.pi, num_points, endpoint=False)
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


def _regular_polygon(num_corners: int, start: float) -> np.ndarray:
    return _circle(1.0, num_corners, start=start)


def _crescent() -> np.ndarray:
    """The unit disc minus a disc of radius 0.85 centred at (0.55, 0), as one closed outline."""
    offset, inner_radius = 0.55, 0.85
    # Where the two circles cross (x, +-y).
    x_cross = (1.0 - inner_radius ** 2 + offset ** 2) / (2.0 * offset)
    y_cross = math.sqrt(1.0 - x_cross ** 2)
    outer_start = math.atan2(y_cross, x_cross)
    outer = np.linspace(outer_start, 2.0 * np.pi - outer_start, 48)            # through angle pi
    inner_start = math.atan2(-y_cross, x_cross - offset) + 2.0 * np.pi         # lower crossing
    inner_end = math.atan2(y_cross, x_cross - offset)                          # upper crossing
    inner = np.linspace(inner_start, inner_end, 40)[1:-1]                      # back through pi
    points = np.concatenate([
        np.stack([np.cos(outer), np.sin(outer)], axis=1),
        np.stack([offset + inner_radius * np.cos(inner), inner_radius * np.sin(inner)], axis=1),
    ])
    # Centre the bounding box so that rotation keeps the crescent near its placement point.
    return points - (points.min(axis=0) + points.max(axis=0)) / 2.0


def _unit_contours(shape: str) -> list[np.ndarray]:
    """Outline(s) of a shape of size ~1 around the origin, (x, y) rows; later ones are holes."""
    if shape == "disc":
        return [_circle(1.0)]
    if shape == "square":
        return [np.array([[-0.8, -0.8], [0.8, -0.8], [0.8, 0.8], [-0.8, 0.8]])]
    if shape == "triangle":
        return [_regular_polygon(3, -np.pi / 2)]
    if shape == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return [np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)]
    if shape == "cross":
        a, b = 0.3, 1.0   # half width and half length of the arms
        return [np.array([[-a, -b], [a, -b], [a, -a], [b, -a], [b, a], [a, a],
                          [a, b], [-a, b], [-a, a], [-b, a], [-b, -a], [-a, -a]])]
    if shape == "ring":
        return [_circle(1.0), _circle(0.55)]
    if shape == "hexagon":
        return [_regular_polygon(6, 0.0)]
    if shape == "ellipse":
        return [_circle(1.0) * np.array([1.0, 0.55])]
    if shape == "diamond":
        return [np.array([[0.0, -1.0], [0.65, 0.0], [0.0, 1.0], [-0.65, 0.0]])]
    if shape == "crescent":
        return [_crescent()]
    raise ValueError(f"unknown toy shape {shape!r}")


def _polygon_area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _contours_area(contours: Sequence[np.ndarray]) -> float:
    return _polygon_area(contours[0]) - sum(_polygon_area(hole) for hole in contours[1:])


def _texture_mix(texture: str, u: np.ndarray, v: np.ndarray, pixel: float) -> np.ndarray:
    """Weight of the secondary colour at object coordinates (u, v), anti-aliased.

    ``pixel`` is the size of one image pixel in object units; edges are ramped over about one
    pixel so the pattern does not alias or ring after JPEG compression.
    """
    period = 0.5   # in object units: ~4 repeats across a disc, whatever the object's size
    if texture == "solid":
        return np.zeros_like(u)
    if texture == "striped":
        wave = np.sin(2.0 * np.pi * u / period)
        return np.clip(0.5 + wave * (period / (2.0 * np.pi)) / pixel, 0.0, 1.0)
    if texture == "dotted":
        du = np.mod(u / period, 1.0) - 0.5
        dv = np.mod(v / period, 1.0) - 0.5
        distance = np.sqrt(du * du + dv * dv) * period
        return np.clip(0.5 + (0.14 - distance) / pixel, 0.0, 1.0)
    if texture == "checkered":
        wave_u = np.sin(np.pi * u / period)
        wave_v = np.sin(np.pi * v / period)
        distance = np.minimum(np.abs(wave_u), np.abs(wave_v)) * (period / np.pi)
        return np.clip(0.5 + np.sign(wave_u * wave_v) * distance / pixel, 0.0, 1.0)
    raise ValueError(f"unknown toy texture {texture!r}")


def _hsv_to_rgb(hue_degrees: float, saturation: float, value: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb((hue_degrees % 360.0) / 360.0, saturation, value),
                    dtype=np.float32) * 255.0


# --------------------------------------------------------------------------------------------
# Rendering one image
# --------------------------------------------------------------------------------------------

def _dull_colour(rng: np.random.Generator) -> np.ndarray:
    """A low-saturation colour: background and distractors never look like a (saturated) class."""
    return _hsv_to_rgb(rng.uniform(0.0, 360.0), rng.uniform(0.0, 0.2), rng.uniform(0.25, 0.9))


def _blend_layer(image: np.ndarray, layer: np.ndarray, colour: np.ndarray, opacity: float) -> None:
    """Paint ``colour`` over ``image`` where the uint8 coverage ``layer`` is non-zero."""
    alpha = layer.astype(np.float32)[..., None] * (opacity / 255.0)
    image *= 1.0 - alpha
    image += alpha * colour


def _draw_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Gradient + low-frequency shading + blobs, lines and specks, all of low saturation."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0.0, 2.0 * np.pi)
    ramp = xs * math.cos(angle) + ys * math.sin(angle)
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1.0)
    start, end = _dull_colour(rng), _dull_colour(rng)
    image = start * (1.0 - ramp[..., None]) + end * ramp[..., None]
    # Grey (colourless) low-frequency shading, so it adds clutter without adding saturation.
    shading = cv2.resize(rng.normal(0.0, 14.0, size=(4, 4)).astype(np.float32), (width, height),
                         interpolation=cv2.INTER_CUBIC)
    image += shading[..., None]

    layer = np.zeros((height, width), np.uint8)
    for _ in range(int(rng.integers(2, 7))):
        # Irregular blob: a circle whose radius wobbles with a few low harmonics.
        centre = rng.uniform([0.0, 0.0], [width, height])
        mean_radius = rng.uniform(8.0, 30.0)
        angles = np.linspace(0.0, 2.0 * np.pi, 48, endpoint=False)
        wobble = np.ones_like(angles)
        for harmonic in (2, 3, 4):
            wobble += rng.uniform(0.05, 0.2) * np.sin(harmonic * angles + rng.uniform(0.0, 2.0 * np.pi))
        outline = centre + mean_radius * wobble[:, None] * np.stack([np.cos(angles), np.sin(angles)], 1)
        layer[:] = 0
        cv2.fillPoly(layer, [np.round(outline * 16).astype(np.int32)], 255, cv2.LINE_AA, shift=4)
        _blend_layer(image, layer, _dull_colour(rng), rng.uniform(0.35, 0.8))
    for _ in range(int(rng.integers(2, 7))):
        ends = rng.uniform([-20.0, -20.0, -20.0, -20.0], [width + 20, height + 20, width + 20, height + 20])
        layer[:] = 0
        points = np.round(ends * 16).astype(np.int64)
        cv2.line(layer, (int(points[0]), int(points[1])), (int(points[2]), int(points[3])), 255,
                 int(rng.integers(1, 4)), cv2.LINE_AA, shift=4)
        _blend_layer(image, layer, _dull_colour(rng), rng.uniform(0.5, 1.0))
    for _ in range(int(rng.integers(15, 60))):
        centre = rng.integers([0, 0], [width, height])
        colour = _dull_colour(rng)
        cv2.circle(image, (int(centre[0]), int(centre[1])), int(rng.integers(1, 3)),
                   tuple(float(c) for c in colour), -1)
    return image


@dataclass(frozen=True)
class _Placement:
    class_id: int
    centre: tuple[float, float]
    radius: float      # scale of the unit shape, pixels
    extent: float      # radius of the circle around the centre that holds the whole shape


def _place_objects(rng: np.random.Generator, height: int, width: int) -> list[_Placement]:
    """Draw 1-3 objects: class, size (as a fraction of the image), position with limited overlap."""
    placements: list[_Placement] = []
    for _ in range(int(rng.integers(1, 4))):
        class_id = int(rng.integers(1, len(CLASS_STYLES) + 1))
        contours = _unit_contours(CLASS_STYLES[class_id - 1].shape)
        unit_extent = float(np.max(np.linalg.norm(contours[0], axis=1)))
        fraction = math.exp(rng.uniform(math.log(OBJECT_FRACTION_RANGE[0]), math.log(OBJECT_FRACTION_RANGE[1])))
        radius = math.sqrt(fraction * height * width / _contours_area(contours))
        # Long thin shapes (star, cross) of a large area would not fit; shrink those.
        radius = min(radius, 0.46 * min(height, width) / unit_extent)
        extent = radius * unit_extent
        # A few candidate positions; keep the first that overlaps little with earlier objects,
        # else the one farthest from them. Overlap is allowed, a hidden object is not wanted.
        margin = 0.85 * extent   # objects may be cut a little by the image border
        best_centre, best_score = None, -math.inf
        for _ in range(20):
            centre = (float(rng.uniform(min(margin, width / 2), max(width - margin, width / 2))),
                      float(rng.uniform(min(margin, height / 2), max(height - margin, height / 2))))
            score = min((math.dist(centre, other.centre) / (other.extent + extent) for other in placements),
                        default=math.inf)
            if score > best_score:
                best_centre, best_score = centre, score
            if score >= 0.6:
                break
        placements.append(_Placement(class_id, best_centre, radius, extent))
    return placements


def _draw_object(image: np.ndarray, label: np.ndarray, placement: _Placement,
                 rng: np.random.Generator) -> tuple[tuple[int, int, int, int], np.ndarray] | None:
    """Composite one object into ``image`` and ``label``; return its box and own hard mask."""
    style = CLASS_STYLES[placement.class_id - 1]
    height, width = label.shape
    angle = rng.uniform(0.0, 2.0 * np.pi)
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    rotation = np.array([[cos_a, -sin_a], [sin_a, cos_a]])
    centre = np.array(placement.centre)
    contours = [points @ rotation.T * placement.radius + centre for points in _unit_contours(style.shape)]
    base = _hsv_to_rgb(style.hue + rng.uniform(-5.0, 5.0), rng.uniform(0.72, 0.95), rng.uniform(0.72, 0.95))
    if style.texture == "dotted":
        secondary = base * 0.3 + 255.0 * 0.7     # pale dots
    else:
        secondary = base * 0.3                   # dark stripes / squares
    light_angle = rng.uniform(0.0, 2.0 * np.pi)

    outline = np.concatenate(contours)
    x0, y0 = np.maximum(np.floor(outline.min(axis=0)).astype(int) - 1, 0)
    x1, y1 = np.minimum(np.ceil(outline.max(axis=0)).astype(int) + 1, [width, height])
    if x1 <= x0 or y1 <= y0:
        return None
    # Coverage by 4x4 supersampling: anti-aliased edges in the picture, a clean hard label.
    supersample = 4
    canvas = np.zeros(((y1 - y0) * supersample, (x1 - x0) * supersample), np.uint8)
    # fillPoly puts integer coordinates at pixel centres, hence the -0.5; shift=4 keeps 1/16 px.
    polygons = [np.round(((points - [x0, y0]) * supersample - 0.5) * 16).astype(np.int32) for points in contours]
    cv2.fillPoly(canvas, polygons, 255, cv2.LINE_8, shift=4)
    coverage = cv2.resize(canvas, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0

    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
    dx, dy = xs - centre[0], ys - centre[1]
    u = (dx * cos_a + dy * sin_a) / placement.radius
    v = (-dx * sin_a + dy * cos_a) / placement.radius
    mix = _texture_mix(style.texture, u, v, pixel=1.0 / placement.radius)[..., None]
    shade = 1.0 + 0.12 * (u * math.cos(light_angle) + v * math.sin(light_angle))   # soft lighting
    colour = (base * (1.0 - mix) + secondary * mix) * shade[..., None]
    region = image[y0:y1, x0:x1]
    region += coverage[..., None] * (colour - region)
    own_mask = coverage >= 0.5
    label[y0:y1, x0:x1][own_mask] = placement.class_id
    return (int(x0), int(y0), int(x1), int(y1)), own_mask


def render_toy_image(*, seed: int, split_id: int, index: int) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """Render image ``index`` of split ``split_id``: (RGB uint8 HxWx3, mask uint8 HxW, objects).

    ``objects`` lists ``(class_id, visible labelled pixels)`` in drawing order. The result
    depends on ``(seed, split_id, index)`` only.
    """
    rng = np.random.default_rng([seed, split_id, index])
    height, width = (int(side) for side in rng.integers(MIN_SIDE, MAX_SIDE + 1, size=2))
    image = _draw_background(rng, height, width)
    label = np.zeros((height, width), np.uint8)
    drawn = []
    for placement in _place_objects(rng, height, width):
        result = _draw_object(image, label, placement, rng)
        if result is not None:
            drawn.append((placement.class_id, *result))
    image += rng.normal(0.0, 3.0, size=image.shape).astype(np.float32)   # sensor-like noise
    rgb = np.clip(np.round(image), 0, 255).astype(np.uint8)

    # Ignore band: every pixel with a 4-neighbour of another label, i.e. one pixel either side
    # of each outline (including where objects touch). Morphology pads the border neutrally.
    cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    band = cv2.dilate(label, cross) != cv2.erode(label, cross)
    label[band] = IGNORE_LABEL
    objects = []
    for class_id, (x0, y0, x1, y1), own_mask in drawn:
        visible = int(np.count_nonzero((label[y0:y1, x0:x1] == class_id) & own_mask))
        objects.append((class_id, visible))
    return rgb, label, objects


# --------------------------------------------------------------------------------------------
# Writing the set
# --------------------------------------------------------------------------------------------

def _image_id(split: str, index: int) -> str:
    return f"toy_{split}_{index:06d}"


def _replace_with(path: Path, write: Callable[[Path], object]) -> None:
    """Write atomically; a killed run leaves at most a ``.part`` temporary, which the next run removes."""
    write_atomic(path, write, suffix=".part")


def _write_text(path: Path, lines: Iterable[str]) -> None:
    write_text_atomic(path, "".join(f"{line}\n" for line in lines))


def _render_and_write(task: tuple[str, int, str, int, int]) -> dict:
    """Worker: render one image, write its JPEG and PNG, return its statistics."""
    root, seed, split, split_id, index = task
    rgb, label, objects = render_toy_image(seed=seed, split_id=split_id, index=index)
    image_id = _image_id(split, index)
    _replace_with(Path(root) / IMAGE_DIR / f"{image_id}.jpg",
                  lambda tmp: Image.fromarray(rgb, "RGB").save(tmp, format="JPEG", quality=JPEG_QUALITY,
                                                               subsampling=0))
    _replace_with(Path(root) / MASK_DIR / f"{image_id}.png",
                  lambda tmp: Image.fromarray(label, "L").save(tmp, format="PNG"))
    pixels = np.bincount(label.ravel(), minlength=256)
    return {"split": split, "id": image_id, "objects": objects,
            "pixels": {int(c): int(pixels[c]) for c in range(1, len(CLASS_STYLES) + 1) if pixels[c]}}


def _init_worker() -> None:
    # One process per core already; OpenCV's own threads would only oversubscribe the CPU.
    cv2.setNumThreads(1)


def _check_root(root: Path) -> None:
    """Refuse to write into a directory that holds another dataset (e.g. the real VOC root)."""
    if (root / META_FILE).is_file():
        return
    for sub in (IMAGE_DIR, MASK_DIR):
        folder = root / sub
        if not folder.is_dir():
            continue
        foreign = next((entry.name for entry in os.scandir(folder) if not _FILE_PATTERN.match(entry.name)), None)
        if foreign is not None:
            raise FileExistsError(f"{folder} holds {foreign!r}, which is not a toy file: {root} looks like "
                                  "another dataset; choose an empty or toy-only --root for the toy benchmark")


def _remove_stale(root: Path, keep: set[str]) -> int:
    """Delete toy files of an earlier, larger or interrupted run that the new lists do not name."""
    removed = 0
    for sub in (IMAGE_DIR, MASK_DIR):
        for entry in os.scandir(root / sub):
            if _FILE_PATTERN.match(entry.name) and f"{sub}/{entry.name}" not in keep:
                os.remove(entry.path)
                removed += 1
    return removed


def _params(*, num_train: int, num_val: int, seed: int) -> dict:
    return {"num_train": num_train, "num_val": num_val, "seed": seed}


def _validate(*, num_train: int, num_val: int, seed: int, workers: int) -> None:
    for name, value, low in (("num_train", num_train, 1), ("num_val", num_val, 1), ("seed", seed, 0),
                             ("workers", workers, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"generate_toy: {name} must be an integer >= {low}, got {value!r}")
    for name, value in (("num_train", num_train), ("num_val", num_val)):
        if value > MAX_IMAGES_PER_SPLIT:
            raise ValueError(f"generate_toy: {name} must be <= {MAX_IMAGES_PER_SPLIT} (six-digit ids), got {value}")


def generate_toy(root: str | os.PathLike, *, num_train: int = 1200, num_val: int = 400, seed: int = 0,
                 workers: int = 2, progress: bool = True) -> dict:
    """Write the toy benchmark under ``root``; return a summary.

    The summary holds ``params``, ``images`` (per split), per split and class name
    ``objects_per_class`` (instances drawn), ``images_per_class`` (images where the class has
    a labelled pixel), ``pixels_per_class`` (labelled pixels, band excluded),
    ``objects_below_min_pixels`` (instances with fewer than 128 visible pixels), ``seconds``
    and ``paths`` (everything written). The meta file is removed first and written last, so an
    interrupted run is seen as incomplete by :func:`is_complete_toy`.
    """
    _validate(num_train=num_train, num_val=num_val, seed=seed, workers=workers)
    started = time.perf_counter()
    root = Path(root)
    _check_root(root)
    for sub in (IMAGE_DIR, MASK_DIR, LIST_DIR, IMAGESET_DIR):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / META_FILE).unlink(missing_ok=True)

    counts = {"train": num_train, "val": num_val}
    tasks = [(str(root), seed, split, split_id, index)
             for split, split_id, _ in SPLITS for index in range(counts[split])]
    workers = min(workers, len(tasks))
    bar = tqdm(total=len(tasks), desc=f"toy -> {root}", unit="img", disable=not progress)
    if workers == 1:
        results = []
        for task in tasks:
            results.append(_render_and_write(task))
            bar.update()
    else:
        # spawn, not fork: the caller (a test session, a training script) may hold threads.
        with multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker) as pool:
            results = []
            for result in pool.imap(_render_and_write, tasks, chunksize=8):
                results.append(result)
                bar.update()
    bar.close()

    written: dict[str, str] = {"root": str(root.resolve()), "images": str(root / IMAGE_DIR),
                               "masks": str(root / MASK_DIR)}
    keep = set()
    for split, _, list_name in SPLITS:
        ids = [r["id"] for r in results if r["split"] == split]
        pairs = [f"{IMAGE_DIR}/{i}.jpg {MASK_DIR}/{i}.png" for i in ids]
        keep.update(path for pair in pairs for path in pair.split())
        _write_text(root / LIST_DIR / list_name, pairs)
        _write_text(root / IMAGESET_DIR / f"{split}.txt", ids)
        written[f"{split}_list"] = str(root / LIST_DIR / list_name)
        written[f"{split}_ids"] = str(root / IMAGESET_DIR / f"{split}.txt")
    _remove_stale(root, keep)

    stats = _statistics(results)
    meta = {"generator": "util.toy", "version": GENERATOR_VERSION,
            "params": _params(num_train=num_train, num_val=num_val, seed=seed),
            "class_names": list(TOY_CLASS_NAMES), "ignore_label": IGNORE_LABEL,
            "image_side_range": [MIN_SIDE, MAX_SIDE], **stats}
    # No timing, worker count or absolute path in the meta file: it must be as reproducible as the images.
    _write_text(root / META_FILE, [json.dumps(meta, indent=1)])
    written["meta"] = str(root / META_FILE)
    return {"params": {**meta["params"], "workers": workers}, **stats,
            "seconds": round(time.perf_counter() - started, 2), "paths": written}


def _statistics(results: Sequence[dict]) -> dict:
    """Per split and class: object instances, images containing the class, labelled pixels."""
    stats: dict = {"images": {}, "objects_per_class": {}, "images_per_class": {}, "pixels_per_class": {},
                   "objects_below_min_pixels": {}}
    for split, _, _ in SPLITS:
        objects = np.zeros(len(CLASS_STYLES) + 1, np.int64)
        images = np.zeros_like(objects)
        pixels = np.zeros_like(objects)
        small = 0
        split_results = [r for r in results if r["split"] == split]
        for result in split_results:
            for class_id, visible in result["objects"]:
                objects[class_id] += 1
                small += visible < REPORT_MIN_PIXELS
            for class_id, count in result["pixels"].items():
                images[class_id] += 1
                pixels[class_id] += count
        stats["images"][split] = len(split_results)
        stats["objects_per_class"][split] = {n: int(objects[i + 1]) for i, n in enumerate(TOY_CLASS_NAMES)}
        stats["images_per_class"][split] = {n: int(images[i + 1]) for i, n in enumerate(TOY_CLASS_NAMES)}
        stats["pixels_per_class"][split] = {n: int(pixels[i + 1]) for i, n in enumerate(TOY_CLASS_NAMES)}
        stats["objects_below_min_pixels"][split] = int(small)
    return stats


def is_complete_toy(root: str | os.PathLike, *, num_train: int, num_val: int, seed: int) -> bool:
    """Whether ``root`` holds a finished toy set of this generator version and these parameters."""
    root = Path(root)
    try:
        meta = json.loads((root / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if (meta.get("generator") != "util.toy" or meta.get("version") != GENERATOR_VERSION
            or meta.get("params") != _params(num_train=num_train, num_val=num_val, seed=seed)):
        return False
    for split, _, list_name in SPLITS:
        list_path = root / LIST_DIR / list_name
        if not list_path.is_file() or not (root / IMAGESET_DIR / f"{split}.txt").is_file():
            return False
        lines = list_path.read_text(encoding="utf-8").split("\n")[:-1]
        if len(lines) != (num_train if split == "train" else num_val):
            return False
        if not all((root / path).is_file() for line in lines for path in line.split()):
            return False
    return True


# --------------------------------------------------------------------------------------------
# Command line: python -m util.prepare toy
# --------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m util.prepare toy``."""
    parser.add_argument("--root", default="data/toy",
                        help="output directory, relative to the current directory or absolute (default: data/toy)")
    parser.add_argument("--num-train", type=int, default=1200, help="training images (default: 1200)")
    parser.add_argument("--num-val", type=int, default=400, help="validation images (default: 400)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default: 0)")
    parser.add_argument("--workers", type=int, default=2,
                        help="worker processes; the output does not depend on it (default: 2)")
    parser.add_argument("--force", action="store_true",
                        help="regenerate even if a complete set of these parameters exists")


def format_summary(summary: dict) -> str:
    """A human-readable table of a summary (or of the counts stored in toy_meta.json)."""
    lines = []
    splits = [split for split, _, _ in SPLITS]
    lines.append("images: " + ", ".join(f"{s} {summary['images'][s]}" for s in splits))
    header = f"{'id':>3} {'class':<26}" + "".join(f"{s + ' obj':>10}{s + ' img':>10}{s + ' px':>11}" for s in splits)
    lines.append(header)
    for class_id, name in enumerate(TOY_CLASS_NAMES, 1):
        row = f"{class_id:>3} {name:<26}"
        for s in splits:
            row += (f"{summary['objects_per_class'][s][name]:>10}{summary['images_per_class'][s][name]:>10}"
                    f"{summary['pixels_per_class'][s][name]:>11}")
        lines.append(row)
    lines.append(f"objects with < {REPORT_MIN_PIXELS} visible pixels: "
                 + ", ".join(f"{s} {summary['objects_below_min_pixels'][s]}" for s in splits))
    if "seconds" in summary:
        lines.append(f"written in {summary['seconds']:.1f} s with {summary['params']['workers']} worker(s)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> None:
    """``python -m util.prepare toy``: generate unless a complete set of the same parameters exists."""
    params = {"num_train": args.num_train, "num_val": args.num_val, "seed": args.seed}
    if not args.force and is_complete_toy(args.root, **params):
        print(f"{args.root} already holds a complete toy set ({args.num_train} train, {args.num_val} val, "
              f"seed {args.seed}); nothing to do (--force regenerates it)")
        meta = json.loads((Path(args.root) / META_FILE).read_text(encoding="utf-8"))
        print(format_summary(meta))
        return
    summary = generate_toy(args.root, workers=args.workers, progress=True, **params)
    print(format_summary(summary))
    print(f"wrote {summary['paths']['root']} (lists: {summary['paths']['train_list']}, {summary['paths']['val_list']})")
