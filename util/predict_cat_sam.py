"""CAT-SAM on your own images: prompts in, masks out (predict.py with a CAT-SAM config).

    python predict.py config/cat_sam/kvasir.yaml weights=exp/.../best.pth \\
        --query a.jpg --box 40 30 200 180 --box 220 40 300 120 --out out/
    python predict.py CONFIG weights=... --query a.jpg --point 120 80 --bg-point 20 20 --out out/
    python predict.py CONFIG weights=... --query a.jpg b.jpg --boxes-from-mask a_gt.png \\
        --boxes-from-mask b_gt.png --out out/

A CAT-SAM config (``train.stage=cat_sam``) and ``weights=``: one of our stage-cat_sam checkpoints,
an official CAT-SAM checkpoint (``{dataset}_cat-{a|t}_vit-l_1shot.pth``), or for
``model.cat_sam.variant=zero_shot`` a SAM ``sam_vit_*.pth``. No support set: CAT-SAM is adapted at
training time and segments what the prompts point at. Prompts, in pixels of each query (x, y):

* ``--box X0 Y0 X1 Y1`` (repeatable): one object per box, corners inside the image
  (0 <= X0 <= X1 <= width, 0 <= Y0 <= Y1 <= height); every query gets the same boxes;
* ``--point X Y`` / ``--bg-point X Y`` (repeatable): ONE object described by all the points
  (foreground label 1, background label 0); with a single ``--box`` the points refine that box;
* ``--boxes-from-mask MASK`` (repeated once per query, in order; not with the above): one tight box
  (x_min, y_min, x_max, y_max, max inclusive, as the original's test protocol) per connected
  component (8-connectivity) of the mask's foreground (value > 127, or == ``--class-value``),
  components smaller than ``--boxes-min-area`` pixels skipped; a mask without foreground gives the
  original's empty-prompt prediction.

Written per query (``<stem>`` = the file name without extension), each file atomically:
``<stem>_mask.png`` (the union of the objects' masks, 0/255, the query's size) and
``<stem>_overlay.png`` (the mask tinted and outlined, boxes and points drawn). Every input is
checked before the model is loaded or anything is written; a bad one is an error naming the
argument (exit code 2).

Python API: :func:`predict_cat_sam` (a built CATSAM, query paths, prompts, an output folder).
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from util.io import DataError

BOX_COLOUR = (245, 130, 48)        # util.vis.PROMPT_COLOUR
FG_POINT_COLOUR = (60, 180, 75)    # util.vis.GROUND_TRUTH_COLOUR
BG_POINT_COLOUR = (0, 130, 200)    # util.vis.SUPPORT_COLOUR


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------

@dataclass
class QueryPrompts:
    """The prompts of one query in its pixels: boxes N x 4, points K x 2 with labels K (1 / 0)."""

    boxes: Optional[np.ndarray] = None
    points: Optional[np.ndarray] = None
    point_labels: Optional[np.ndarray] = None
    source: str = ""


def _fmt(values) -> str:
    return " ".join(f"{float(v):g}" for v in values)


def check_box(box: Sequence[float], height: int, width: int, *, argument: str = "--box",
              what: str = "the image") -> None:
    """A box (x0, y0, x1, y1) with corners inside ``what`` (0..width, 0..height) and x0 <= x1,
    y0 <= y1; otherwise a DataError naming ``argument`` and the box."""
    if len(box) != 4 or not all(math.isfinite(float(v)) for v in box):
        raise DataError(f"{argument} {_fmt(box)}: a box is four finite numbers X0 Y0 X1 Y1")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height):
        raise DataError(f"{argument} {_fmt(box)} (X0 Y0 X1 Y1) is not inside {what} ({width}x{height}, width x "
                        f"height): need 0 <= X0 <= X1 <= {width} and 0 <= Y0 <= Y1 <= {height}")


def check_point(point: Sequence[float], height: int, width: int, *, argument: str = "--point",
                what: str = "the image") -> None:
    """A point (x, y) inside ``what`` (0..width, 0..height); otherwise a DataError naming ``argument``."""
    if len(point) != 2 or not all(math.isfinite(float(v)) for v in point):
        raise DataError(f"{argument} {_fmt(point)}: a point is two finite numbers X Y")
    x, y = (float(v) for v in point)
    if not (0 <= x <= width and 0 <= y <= height):
        raise DataError(f"{argument} {_fmt(point)} (X Y) is not inside {what} ({width}x{height}, width x height)")


def boxes_from_mask(mask: np.ndarray, *, class_value: Optional[int] = None, threshold: int = 127,
                    min_area: int = 0) -> np.ndarray:
    """N x 4 float32 tight boxes (x_min, y_min, x_max, y_max; max inclusive) of the connected
    components (8-connectivity) of ``mask``'s foreground (``> threshold``, or ``== class_value``)
    with at least ``min_area`` pixels, ordered by their first pixel in row-major order."""
    from scipy import ndimage
    mask = np.asarray(mask)
    foreground = mask == class_value if class_value is not None else mask > threshold
    labels, count = ndimage.label(foreground, structure=np.ones((3, 3), dtype=int))
    boxes = []
    for index, region in enumerate(ndimage.find_objects(labels), 1):
        if region is None:
            continue
        if min_area > 0 and int((labels[region] == index).sum()) < min_area:
            continue
        ys, xs = region
        boxes.append([xs.start, ys.start, xs.stop - 1, ys.stop - 1])
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4)


def query_prompts(height: int, width: int, *, boxes: Sequence[Sequence[float]] = (),
                  points: Sequence[Sequence[float]] = (), bg_points: Sequence[Sequence[float]] = (),
                  box_mask: Optional[np.ndarray] = None, box_mask_name: str = "", class_value: Optional[int] = None,
                  min_area: int = 0, what: str = "the image") -> QueryPrompts:
    """Check the prompts against an H x W query and put them in the model's form (module docstring)."""
    boxes, points, bg_points = list(boxes or ()), list(points or ()), list(bg_points or ())
    if box_mask is not None:
        if boxes or points or bg_points:
            raise DataError("--boxes-from-mask replaces --box / --point / --bg-point: give one or the other")
        if tuple(box_mask.shape[:2]) != (height, width):
            raise DataError(f"--boxes-from-mask {box_mask_name} is {box_mask.shape[1]}x{box_mask.shape[0]}, "
                            f"{what} is {width}x{height} (width x height): the mask must have the query's size")
        found = boxes_from_mask(box_mask, class_value=class_value, min_area=min_area)
        return QueryPrompts(boxes=found if len(found) else None, source=f"{len(found)} box(es) from {box_mask_name}")
    if not boxes and not points and not bg_points:
        raise DataError("CAT-SAM needs prompts: --box X0 Y0 X1 Y1, --point X Y (and --bg-point X Y), or "
                        "--boxes-from-mask MASK")
    for box in boxes:
        check_box(box, height, width, what=what)
    for point in points:
        check_point(point, height, width, argument="--point", what=what)
    for point in bg_points:
        check_point(point, height, width, argument="--bg-point", what=what)
    if len(boxes) > 1 and (points or bg_points):
        raise DataError(f"{len(boxes)} --box and --point/--bg-point: points describe ONE object, so they go with at "
                        "most one --box (run the boxes and the points separately)")
    if not points and bg_points and not boxes:
        raise DataError("--bg-point alone marks no object: add a --point or a --box")
    prompts = QueryPrompts(source=", ".join(part for part in (
        f"{len(boxes)} box(es)" if boxes else "", f"{len(points)} point(s)" if points else "",
        f"{len(bg_points)} background point(s)" if bg_points else "") if part))
    if boxes:
        prompts.boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if points or bg_points:
        prompts.points = np.asarray(list(points) + list(bg_points), dtype=np.float32).reshape(-1, 2)
        prompts.point_labels = np.asarray([1] * len(points) + [0] * len(bg_points), dtype=np.int64)
    return prompts


# ---------------------------------------------------------------------------------------------
# Prediction and pictures
# ---------------------------------------------------------------------------------------------

def segment(predictor, image: np.ndarray, prompts: QueryPrompts) -> np.ndarray:
    """H x W bool: the union of the prompts' masks (CATSAMPredictor; one encoder pass)."""
    import torch
    predictor.set_image(torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1))
    boxes = None if prompts.boxes is None else torch.from_numpy(prompts.boxes)
    points = labels = None
    if prompts.points is not None:
        points = torch.from_numpy(prompts.points)[None]           # 1 prompt of K points
        labels = torch.from_numpy(prompts.point_labels)[None]
    masks, _ = predictor.predict(boxes=boxes, points=points, point_labels=labels)
    predictor.reset_image()
    return masks.any(0)[0].cpu().numpy()


def draw_prompts(picture: np.ndarray, prompts: QueryPrompts) -> np.ndarray:
    """``picture`` (RGB uint8) with the boxes (outlines) and points (discs: foreground green,
    background blue, white rim) drawn in place; returned."""
    import cv2
    from util.vis import line_thickness
    height, width = picture.shape[:2]
    thick = line_thickness(height, width) + 1
    for x0, y0, x1, y1 in ([] if prompts.boxes is None else prompts.boxes.tolist()):
        cv2.rectangle(picture, (int(round(x0)), int(round(y0))), (int(round(x1)), int(round(y1))), BOX_COLOUR, thick)
    radius = max(3, int(round(min(height, width) / 80)))
    if prompts.points is not None:
        for (x, y), label in zip(prompts.points.tolist(), prompts.point_labels.tolist()):
            centre = (int(round(x)), int(round(y)))
            cv2.circle(picture, centre, radius + 1, (255, 255, 255), -1, cv2.LINE_AA)
            cv2.circle(picture, centre, radius, FG_POINT_COLOUR if label else BG_POINT_COLOUR, -1, cv2.LINE_AA)
    return picture


def render(image: np.ndarray, mask: np.ndarray, prompts: QueryPrompts, stem: str) -> Dict[str, bytes]:
    """PNG bytes of ``<stem>_mask.png`` (0/255) and ``<stem>_overlay.png``."""
    from util.vis import encode_png, overlay_mask
    picture = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return {f"{stem}_mask.png": encode_png(mask.astype(np.uint8) * 255),
            f"{stem}_overlay.png": encode_png(draw_prompts(overlay_mask(picture, mask), prompts))}


def _read_query(path: Path) -> np.ndarray:
    from util.io import read_image
    if not path.is_file():
        raise DataError(f"query image not found: {path}" if not path.exists() else f"query image {path} is not a file")
    return read_image(path)


def _read_box_mask(path: Path) -> np.ndarray:
    from util.io import read_mask
    if not path.is_file():
        raise DataError(f"--boxes-from-mask: mask not found: {path}")
    return read_mask(path)


def plan(queries: Sequence, *, boxes=(), points=(), bg_points=(), box_masks: Sequence = (),
         class_value: Optional[int] = None, min_area: int = 0) -> List[Tuple[Path, QueryPrompts]]:
    """Read every query (and box mask) and check its prompts: (path, prompts) per query. Raises
    DataError before any model work or file writing."""
    queries = [Path(q) for q in queries]
    if not queries:
        raise DataError("no query image given (--query IMG ...)")
    box_masks = [Path(m) for m in box_masks or ()]
    if box_masks and len(box_masks) != len(queries):
        raise DataError(f"--boxes-from-mask: {len(box_masks)} mask(s) for {len(queries)} quer"
                        f"{'y' if len(queries) == 1 else 'ies'}: give one mask per query, in the same order")
    stems: Dict[str, Path] = {}
    planned = []
    for i, path in enumerate(queries):
        if path.stem in stems:
            raise DataError(f"query images {stems[path.stem]} and {path} have the same name '{path.stem}': their "
                            f"outputs ({path.stem}_*.png) would overwrite each other")
        stems[path.stem] = path
        image = _read_query(path)
        mask = _read_box_mask(box_masks[i]) if box_masks else None
        prompts = query_prompts(image.shape[0], image.shape[1], boxes=boxes, points=points, bg_points=bg_points,
                                box_mask=mask, box_mask_name=str(box_masks[i]) if box_masks else "",
                                class_value=class_value, min_area=min_area, what=f"query image {path}")
        planned.append((path, prompts))
    return planned


def predict_cat_sam(model, queries: Sequence, out_dir, *, boxes=(), points=(), bg_points=(),
                    box_masks: Sequence = (), class_value: Optional[int] = None, min_area: int = 0,
                    log=None) -> List[Path]:
    """Segment ``queries`` (image paths) with a CATSAM ``model`` and write ``<stem>_mask.png`` and
    ``<stem>_overlay.png`` per query into ``out_dir`` (atomically). Prompts as the module
    docstring says (``box_masks``: one mask path per query). Every input is checked before the
    first prediction; returns the files written."""
    from model.cat_sam import CATSAMPredictor
    from util.atomic import write_bytes_atomic
    planned = plan(queries, boxes=boxes, points=points, bg_points=bg_points, box_masks=box_masks,
                   class_value=class_value, min_area=min_area)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"--out {out_dir} exists and is not a directory")
    predictor = CATSAMPredictor(model)
    written: List[Path] = []
    for path, prompts in planned:
        image = _read_query(path)
        mask = segment(predictor, image, prompts)
        for name, data in render(image, mask, prompts, path.stem).items():   # both complete before writing
            written.append(write_bytes_atomic(out_dir / name, data))
        if log is not None:
            log(f"{path}: {prompts.source or 'empty prompt'} -> {int(mask.sum())} foreground pixels")
    return written


# ---------------------------------------------------------------------------------------------
# predict.py
# ---------------------------------------------------------------------------------------------

def add_cat_sam_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """CAT-SAM's options on ``parser``; --box / --point / --bg-point / --query / --out /
    --class-value are added only when the parser does not have them already (predict.py does)."""
    have = parser._option_string_actions     # noqa: SLF001 - argparse offers no public lookup
    group = parser.add_argument_group("CAT-SAM (a config with train.stage=cat_sam)")
    if "--query" not in have:
        group.add_argument("--query", nargs="+", action="extend", default=[], metavar="IMG", required=True,
                           help="query image(s) to segment")
    if "--out" not in have:
        group.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
    if "--box" not in have:
        group.add_argument("--box", nargs=4, type=float, action="append", default=[], metavar=("X0", "Y0", "X1", "Y1"),
                           help="a box prompt in pixels (repeatable: one object each)")
    if "--point" not in have:
        group.add_argument("--point", nargs=2, type=float, action="append", default=[], metavar=("X", "Y"),
                           help="a foreground point (repeatable; all points = one object)")
    if "--bg-point" not in have:
        group.add_argument("--bg-point", nargs=2, type=float, action="append", default=[], metavar=("X", "Y"),
                           help="a background point (repeatable)")
    if "--class-value" not in have:
        group.add_argument("--class-value", type=int, default=None, metavar="V",
                           help="--boxes-from-mask: foreground = mask value V only (default: value > 127)")
    group.add_argument("--boxes-from-mask", action="append", default=[], metavar="MASK",
                       help="CAT-SAM: one box per connected component of MASK's foreground (value > 127, or "
                            "--class-value); repeat once per --query, in the same order; replaces --box / --point")
    group.add_argument("--boxes-min-area", type=int, default=0, metavar="PIXELS",
                       help="CAT-SAM --boxes-from-mask: skip components smaller than this (default 0: none)")
    return parser


def cat_sam_config(args: argparse.Namespace):
    """The loaded config when ``args.config`` is a CAT-SAM one (``train.stage=cat_sam``), else
    None (no config, another stage, or a config error, which predict.py's own path reports)."""
    from util.config import ConfigError, load_config
    if getattr(args, "config", None) is None:
        return None
    try:
        cfg = load_config(args.config, list(getattr(args, "overrides", [])))
    except ConfigError:
        return None
    return cfg if cfg["train"]["stage"] == "cat_sam" else None


def load_cat_sam_model(cfg: Mapping):
    """CATSAM of ``cfg`` (model.build_model) with ``cfg.weights`` loaded completely
    (util.checkpoint.load_weights); returns (model in eval mode on cfg.device, load report)."""
    from model import build_model
    from util.checkpoint import load_weights
    from util.config import ConfigError, resolve_path
    from util.distributed import resolve_device
    if not cfg["weights"]:
        raise ConfigError("predict.py with a CAT-SAM config needs weights=PATH: a checkpoint of stage cat_sam "
                          "(best.pth of a run), an official CAT-SAM checkpoint, or for model.cat_sam.variant=zero_shot "
                          "a SAM sam_vit_*.pth")
    model = build_model(cfg, "cat_sam")
    report = load_weights(model, resolve_path(cfg["weights"]), require_complete=True)
    return model.to(resolve_device(cfg["device"])).eval(), report


def run_cat_sam(args: argparse.Namespace, cfg: Optional[Mapping]) -> int:
    """predict.py's CAT-SAM path: check every input, load the model, write the outputs. Returns
    the exit code (0; 2 for a bad input, config or weight file)."""
    from util.checkpoint import CheckpointError
    from util.config import ConfigError
    box_masks = list(getattr(args, "boxes_from_mask", []) or [])
    try:
        if cfg is None:
            raise ConfigError("--boxes-from-mask is a CAT-SAM option: give a CAT-SAM config (train.stage=cat_sam) "
                              "and weights=PATH")
        for option, attr in (("--support", "support"), ("--support-class", "support_class")):
            if getattr(args, attr, None):
                raise DataError(f"{option}: CAT-SAM takes no support set (it was adapted at training time): segment "
                                "with --box / --point / --boxes-from-mask")
        if getattr(args, "refine", "none") not in (None, "none"):
            raise DataError("--refine is for the few-shot SAM-RSP models, not CAT-SAM")
        if getattr(args, "save_prompt", False):
            raise DataError("--save-prompt writes SAM-RSP's prompt maps: CAT-SAM has none")
        out_dir = Path(args.out)
        if out_dir.exists() and not out_dir.is_dir():
            raise DataError(f"--out {out_dir} exists and is not a directory")
        options = dict(boxes=args.box, points=args.point, bg_points=getattr(args, "bg_point", []) or [],
                       box_masks=box_masks, class_value=getattr(args, "class_value", None),
                       min_area=int(getattr(args, "boxes_min_area", 0)))
        plan(args.query, **options)                   # every input checked before the model is loaded
        model, report = load_cat_sam_model(cfg)
        print(f"{model.name}, weights {cfg['weights']}: {report.summary()}", file=sys.stderr)
        written = predict_cat_sam(model, args.query, out_dir, **options,
                                  log=lambda line: print(line, file=sys.stderr))
    except (ConfigError, DataError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: cannot write the outputs into {args.out}: {err}", file=sys.stderr)
        return 1
    count = len(args.query)
    print(f"{count} quer{'y' if count == 1 else 'ies'} segmented by CAT-SAM: {len(written)} files in {out_dir}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m util.predict_cat_sam CONFIG [key=value ...] --query ... --out ...`` (the same as
    predict.py with a CAT-SAM config)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="a CAT-SAM config (train.stage=cat_sam)")
    parser.add_argument("overrides", nargs="*", help="weights=PATH and dotted key=value overrides")
    add_cat_sam_arguments(parser)
    args = parser.parse_intermixed_args(argv)
    from util.config import ConfigError, load_config
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if cfg["train"]["stage"] != "cat_sam":
        print(f"error: {args.config} is a train.stage={cfg['train']['stage']} config; CAT-SAM needs "
              "train.stage=cat_sam", file=sys.stderr)
        return 2
    return run_cat_sam(args, cfg)


if __name__ == "__main__":
    sys.exit(main())
