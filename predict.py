"""Segment your own images with a trained SAM-RSP:  python predict.py CONFIG weights=PATH [key=value ...] OPTIONS

    # one class, 1-shot: a support image, its mask, and any number of queries
    python predict.py config/pascal/pascal_split0_resnet50.yaml weights=exp/.../best.pth \\
        --support dog1.jpg dog1.png --query a.jpg b.jpg --out out/
    # K-shot: K --support pairs (K = data.shot, the shots the weights were trained for)
    python predict.py CONFIG weights=... data.shot=5 --support s1.jpg s1.png ... --support s5.jpg s5.png --query q.jpg --out out/
    # N-way: one support set per class; every query is segmented into background + N classes
    python predict.py CONFIG weights=... --support-class dog d.jpg d.png --support-class cat c.jpg c.png --query q.jpg --out out/
    # masks with several classes: only value 7 is foreground; --save-prompt: RSP heat maps too
    python predict.py CONFIG weights=... --support s.jpg s.png --class-value 7 --save-prompt --query q.jpg --out out/
    # FastSAM (optional extra: pip install -r requirements-fastsam.txt, AGPL-3.0; model.fastsam.* settings):
    python predict.py CONFIG weights=... --support s.jpg s.png --query q.jpg --out out/ --refine fastsam
    python predict.py --query q.jpg --point 120 80 --out out/ --fastsam-weights initmodel/FastSAM/FastSAM-s.pt
    python predict.py --query q.jpg --box 10 20 200 180 --bg-point 50 60 --out out/     # no support, no weights=

Any image size or aspect ratio: images go through the evaluation transform (data.val_size) and
the prediction is mapped back to the query's original size as test.py scores it. Masks are
single-channel PNGs: foreground = any value other than 0 and 255 (255 = ignore), or only the
value of --class-value (--class-value 255 for a 0/255 binary mask).

Written per query (<stem> = the query's file name without extension), each file atomically:
  <stem>_mask.png          binary mask 0/255 at the query's size
  <stem>_overlay.png       the query with the mask tinted and outlined
  <stem>_prompt.png        --save-prompt: the RSP's foreground probability, colour-mapped
  <stem>_refined_mask.png, <stem>_refined_overlay.png
                           --refine fastsam: the mask refined by FastSAM proposals (select_by_mask on
                           the foreground probability; the model's mask when none fits)
--point / --bg-point / --box (FastSAM as an interactive segmenter, WITHOUT a support set and
without few-shot weights; CONFIG is optional, default config/base.yaml for model.fastsam.*):
  <stem>_mask.png, <stem>_overlay.png   the union of the FastSAM proposals the prompts select
  (boxes: the proposal of highest mask-box IoU each; points: proposals holding a --point and no
  --bg-point; both: the points filter the boxes' proposals). Coordinates are pixels of each
  query, x2 / y2 of a box exclusive.
A CAT-SAM config (train.stage=cat_sam, e.g. config/cat_sam/kvasir.yaml) with --box / --point /
--bg-point / --boxes-from-mask per query (util/predict_cat_sam.py), no support:
  <stem>_mask.png, <stem>_overlay.png   the union of the prompted objects' masks; boxes and points drawn
A SimFormer checkpoint (a config with train.stage=simformer, e.g. config/weakshot/*.yaml), no support:
  <stem>_semantic.png          index PNG with a palette: the dataset's class ids at the query's size
  <stem>_semantic_overlay.png  the query with every predicted class tinted, and a legend
N-way (--support-class) instead:
  <stem>_nway.png          index PNG with a palette: 0 background, i = the i-th class given
  <stem>_nway_overlay.png  the query with every class tinted, and a legend
  <stem>_<class>_prompt.png   --save-prompt: each class's RSP heat map

Every input is checked before anything is written; a bad input is an error naming the file
(exit code 2). The Python API is util.predictor.Predictor.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from util.config import ConfigError, load_config
from util.io import DataError

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("config", nargs="?", default=None,
                        help="YAML config file (the one the weights were trained with; optional with --point / --box)")
    parser.add_argument("overrides", nargs="*", help="weights=PATH and dotted key=value overrides (e.g. data.shot=5)")
    parser.add_argument("--support", nargs=2, action="append", default=[], metavar=("IMG", "MASK"),
                        help="a support image and its mask (repeat K times for K shots)")
    parser.add_argument("--support-class", nargs=3, action="append", default=[], metavar=("NAME", "IMG", "MASK"),
                        help="N-way: a support of class NAME (repeat: K per class, classes in the order given)")
    parser.add_argument("--query", nargs="+", action="extend", default=[], metavar="IMG", required=True,
                        help="query image(s) to segment")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
    parser.add_argument("--class-value", type=int, default=None, metavar="V",
                        help="foreground = mask value V only (default: any value other than 0 and 255)")
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="N-way: background where every class's foreground probability is below this (0.5)")
    parser.add_argument("--save-prompt", action="store_true", help="also write the RSP heat map(s)")
    parser.add_argument("--refine", choices=["none", "fastsam"], default="none",
                        help="fastsam: also write the mask refined by FastSAM proposals (<stem>_refined_*.png)")
    parser.add_argument("--point", nargs=2, type=float, action="append", default=[], metavar=("X", "Y"),
                        help="FastSAM without a support set: a foreground point (pixels; repeatable)")
    parser.add_argument("--bg-point", nargs=2, type=float, action="append", default=[], metavar=("X", "Y"),
                        help="FastSAM without a support set: a background point (repeatable)")
    parser.add_argument("--box", nargs=4, type=float, action="append", default=[], metavar=("X0", "Y0", "X1", "Y1"),
                        help="FastSAM without a support set: a box (pixels, X1 / Y1 exclusive; repeatable)")
    parser.add_argument("--fastsam-weights", default="", metavar="PATH",
                        help="the FastSAM .pt file (default: the config's model.fastsam.weights)")
    from util.predict_cat_sam import add_cat_sam_arguments
    add_cat_sam_arguments(parser)           # --boxes-from-mask, --boxes-min-area (CAT-SAM configs)
    return parser


def support_sets(args: argparse.Namespace, default_name: str) -> Dict[str, List[Tuple[Path, Path]]]:
    """Class name -> its (image, mask) paths, classes in the order first given."""
    if args.support and args.support_class:
        raise DataError("use either --support (one class) or --support-class NAME IMG MASK (N-way), not both")
    if not args.support and not args.support_class:
        raise DataError("no support given: add --support IMG MASK (or --support-class NAME IMG MASK for N-way)")
    sets: Dict[str, List[Tuple[Path, Path]]] = {}
    if args.support:
        sets[default_name] = [(Path(image), Path(mask)) for image, mask in args.support]
    for name, image, mask in args.support_class:
        if not name.strip():
            raise DataError(f"--support-class: empty class name for {image}")
        sets.setdefault(name, []).append((Path(image), Path(mask)))
    return sets


def _existing_file(path: Path, role: str) -> Path:
    if not path.exists():
        raise DataError(f"{role} not found: {path}")
    if not path.is_file():
        raise DataError(f"{role} {path} is not a file")
    return path


def read_input_image(path: Path, role: str) -> np.ndarray:
    """float32 H x W x 3 RGB (util.io.read_image), with errors naming ``path`` and its role."""
    from util.io import read_image
    return read_image(_existing_file(path, role))


def read_input_mask(path: Path, role: str) -> np.ndarray:
    """uint8 H x W single-channel mask (util.io.read_mask: grayscale or palette PNG)."""
    from util.io import read_mask
    return read_mask(_existing_file(path, role))


def check_shots(sets: Dict[str, List[Tuple[Path, Path]]], shot: int, *, nway: bool) -> None:
    """Every class needs exactly K = data.shot supports (the model is built for K shots)."""
    for name, pairs in sets.items():
        if len(pairs) != shot:
            given = f"class '{name}' has {len(pairs)} --support-class entr{'y' if len(pairs) == 1 else 'ies'}" \
                if nway else f"{len(pairs)} --support pair{'s' if len(pairs) != 1 else ''} given"
            raise DataError(f"{given}, but the config's data.shot={shot}: every class needs exactly {shot} "
                            f"support(s) (the model is built for data.shot shots); pass data.shot={len(pairs)} "
                            f"(with weights trained for {len(pairs)} shots)")
    counts = {len(pairs) for pairs in sets.values()}
    if len(counts) > 1:  # pragma: no cover - implied by the check above
        raise DataError(f"all classes need the same number of shots, got {sorted(counts)}")


def check_queries(paths: List[Path], val_size: int) -> None:
    """Every query exists, is an image the evaluation resize can take, and has its own stem."""
    from util.predictor import check_resizable
    stems: Dict[str, Path] = {}
    for path in paths:
        image = read_input_image(path, "query image")
        check_resizable(image.shape[0], image.shape[1], val_size, what=f"query image {path}")
        if path.stem in stems:
            raise DataError(f"query images {stems[path.stem]} and {path} have the same name '{path.stem}': their "
                            f"outputs ({path.stem}_*.png) would overwrite each other")
        stems[path.stem] = path


def render_single(image: np.ndarray, result: dict, stem: str, *, save_prompt: bool) -> Dict[str, bytes]:
    """PNG bytes of one query's single-class outputs; ``image`` is RGB uint8 H x W x 3."""
    from util.vis import encode_png, heat_map, overlay_mask
    mask = result["mask"]
    files = {f"{stem}_mask.png": encode_png(mask.astype(np.uint8) * 255),
             f"{stem}_overlay.png": encode_png(overlay_mask(image, mask))}
    if save_prompt:
        files[f"{stem}_prompt.png"] = encode_png(heat_map(result["prompt"]))
    return files


def render_nway(image: np.ndarray, result: dict, stem: str, *, save_prompt: bool) -> Dict[str, bytes]:
    """PNG bytes of one query's N-way outputs (index PNG, overlay with legend, prompts)."""
    from util.vis import encode_index_png, encode_png, heat_map, nway_overlay, safe_name, voc_palette
    palette = voc_palette(256)
    names, labels = result["names"], result["labels"]
    files = {f"{stem}_nway.png": encode_index_png(labels, palette),
             f"{stem}_nway_overlay.png": encode_png(nway_overlay(image, labels, names, palette))}
    if save_prompt:
        for name, prompt in zip(names, result["prompts"]):
            files[f"{stem}_{safe_name(name)}_prompt.png"] = encode_png(heat_map(prompt))
    return files


OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*=")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Options and ``key=value`` overrides in any order; an override right after ``--query``'s
    images (which ``--query`` would take for one) is moved back to the overrides."""
    args = build_parser().parse_intermixed_args(argv)
    if args.config is not None and OVERRIDE.match(args.config) and not Path(args.config).exists():
        args.overrides.insert(0, args.config)      # no config file: the first positional is an override
        args.config = None
    for item in list(args.query):
        if OVERRIDE.match(item) and not Path(item).exists():
            args.query.remove(item)
            args.overrides.append(item)
    if not args.query:
        build_parser().error("--query needs at least one image")
    return args


DEFAULT_CONFIG = Path(__file__).resolve().parent / "config" / "base.yaml"


def render_refined(image: np.ndarray, result: dict, stem: str) -> Dict[str, bytes]:
    """PNG bytes of a query's FastSAM-refined mask and overlay (``--refine fastsam``)."""
    from util.vis import encode_png, overlay_mask
    mask = result["mask"]
    return {f"{stem}_refined_mask.png": encode_png(mask.astype(np.uint8) * 255),
            f"{stem}_refined_overlay.png": encode_png(overlay_mask(image, mask))}


def interactive_prompts(args: argparse.Namespace) -> dict:
    """``predict()`` arguments of FastSAMSegmenter from --point / --bg-point / --box."""
    points = [list(p) for p in args.point] + [list(p) for p in args.bg_point]
    return {"points": points or None,
            "point_labels": ([1] * len(args.point) + [0] * len(args.bg_point)) if points else None,
            "boxes": [list(b) for b in args.box] or None}


def check_prompts(prompts: dict, height: int, width: int, path: Path) -> None:
    """Finite coordinates, and every box keeps a pixel of the query (points are clipped to it)."""
    import math
    for name, values in (("--point/--bg-point", prompts["points"]), ("--box", prompts["boxes"])):
        for value in values or []:
            if not all(math.isfinite(v) for v in value):
                raise DataError(f"{name} {' '.join(str(v) for v in value)}: coordinates must be finite numbers")
    for box in prompts["boxes"] or []:
        x0, y0, x1, y1 = (min(max(int(v), 0), limit) for v, limit in zip(box, (width, height, width, height)))
        if x1 <= x0 or y1 <= y0:
            raise DataError(f"--box {' '.join(f'{v:g}' for v in box)} (X0 Y0 X1 Y1, X1 / Y1 exclusive) holds no pixel "
                            f"of query image {path} ({width}x{height}, width x height)")


def write_outputs(jobs, out_dir: Path) -> int:
    """Run ``jobs`` (yielding file name -> PNG bytes per query) and write every file atomically."""
    from tqdm import tqdm
    from util.atomic import write_bytes_atomic
    from util.predictor import PredictorError
    written = 0
    try:
        for files in tqdm(jobs, desc="predict", unit="query", dynamic_ncols=True):
            for file_name, data_bytes in files.items():   # every output complete before it is written
                write_bytes_atomic(out_dir / file_name, data_bytes)
                written += 1
    except (DataError, PredictorError) as err:
        print(f"error: {err}", file=sys.stderr)
        return -2
    except OSError as err:
        print(f"error: cannot write the outputs into {out_dir}: {err}", file=sys.stderr)
        return -1
    except KeyboardInterrupt:
        print(f"interrupted: {written} file(s) written into {out_dir}", file=sys.stderr)
        return -130
    return written


def main_interactive(args: argparse.Namespace) -> int:
    """--point / --bg-point / --box: FastSAM proposals of each query selected by the prompts, no
    support set, no few-shot weights."""
    from model.fastsam import FastSAMUnavailable
    from util.checkpoint import CheckpointError
    from util.predictor import FastSAMSegmenter, PredictorError
    try:
        cfg = load_config(args.config or DEFAULT_CONFIG, args.overrides)
        if args.support or args.support_class:
            raise DataError("--point / --bg-point / --box segment the query with FastSAM alone, without a support "
                            "set: drop --support / --support-class (or drop the prompts to run the few-shot model)")
        if args.refine != "none":
            raise DataError("--refine refines the few-shot model's output: it does not combine with --point / --box")
        if args.save_prompt:
            raise DataError("--save-prompt writes the few-shot model's RSP: it does not combine with --point / --box")
        out_dir = Path(args.out)
        if out_dir.exists() and not out_dir.is_dir():
            raise DataError(f"--out {out_dir} exists and is not a directory")
        prompts = interactive_prompts(args)
        queries = [Path(q) for q in args.query]
        stems: Dict[str, Path] = {}
        for path in queries:             # every query read and its prompts checked before anything is written
            image = read_input_image(path, "query image")
            check_prompts(prompts, image.shape[0], image.shape[1], path)
            if path.stem in stems:
                raise DataError(f"query images {stems[path.stem]} and {path} have the same name '{path.stem}': their "
                                f"outputs ({path.stem}_*.png) would overwrite each other")
            stems[path.stem] = path
        segmenter = FastSAMSegmenter.from_cfg(cfg, weights=args.fastsam_weights)
        print(f"FastSAM {segmenter.proposer.weights}", file=sys.stderr)
    except (ConfigError, DataError, CheckpointError, PredictorError, FastSAMUnavailable) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    selected = []

    def jobs():
        for path in queries:
            image = read_input_image(path, "query image")
            segmenter.set_image(image, what=f"query image {path}")
            result = segmenter.predict(**prompts)
            selected.append(len(result["indices"]))
            yield render_single(image.astype(np.uint8), result, path.stem, save_prompt=False)

    written = write_outputs(jobs(), out_dir)
    if written < 0:
        return -written
    print(f"{len(queries)} quer{'y' if len(queries) == 1 else 'ies'} segmented by FastSAM prompts "
          f"(selected proposals: {', '.join(map(str, selected))}): {written} files in {out_dir}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    from util.predict_cat_sam import cat_sam_config, run_cat_sam
    cat_sam_cfg = cat_sam_config(args)          # the config when it is a CAT-SAM one (train.stage=cat_sam)
    if cat_sam_cfg is not None or args.boxes_from_mask:
        return run_cat_sam(args, cat_sam_cfg)  # prompts (--box / --point / --boxes-from-mask), no support set
    if args.point or args.bg_point or args.box:
        return main_interactive(args)
    try:
        from model.fastsam import FastSAMUnavailable
        from util.checkpoint import CheckpointError
        from util.predictor import DEFAULT_CLASS, FastSAMSegmenter, Predictor, PredictorError, prepare_support
    except ImportError as err:  # pragma: no cover - a broken installation
        print(f"error: {err}", file=sys.stderr)
        return 1
    try:
        if args.config is None:
            raise ConfigError("predict.py needs CONFIG (the weights' config file), unless it runs FastSAM alone "
                              "with --point / --bg-point / --box")
        cfg = load_config(args.config, args.overrides)
        if cfg["train"]["stage"] == "simformer":      # weak-shot semantic segmentation: util/predict_semantic.py
            from util.predict_semantic import run_semantic
            return run_semantic(args, cfg)
        if not cfg["weights"]:
            raise ConfigError("predict.py needs weights=PATH: a checkpoint of this project (best.pth of a sam_rsp "
                              "run) or an original SAM-RSP checkpoint")
        if args.class_value is not None and not 1 <= args.class_value <= 255:
            raise DataError(f"--class-value must be in 1..255, got {args.class_value}")
        if not 0.0 <= args.threshold <= 1.0:
            raise DataError(f"--threshold must be in [0, 1], got {args.threshold}")
        out_dir = Path(args.out)
        if out_dir.exists() and not out_dir.is_dir():
            raise DataError(f"--out {out_dir} exists and is not a directory")
        nway = bool(args.support_class)
        if nway and args.refine != "none":
            raise DataError("--refine fastsam refines a single-class prediction (--support): N-way "
                            "(--support-class) is not supported")
        sets = support_sets(args, DEFAULT_CLASS)
        check_shots(sets, int(cfg["data"]["shot"]), nway=nway)
        # -- every input is read and checked before the model is loaded or anything written --
        data = cfg["data"]
        supports: Dict[str, Tuple[list, list]] = {}
        for name, pairs in sets.items():
            images, masks = [], []
            for image_path, mask_path in pairs:
                image = read_input_image(image_path, "support image")
                label = read_input_mask(mask_path, "support mask")
                image, _ = prepare_support(image, label, val_size=data["val_size"], class_value=args.class_value,
                                           ignore_label=data["ignore_label"], image_name=f"support image {image_path}",
                                           mask_name=f"support mask {mask_path}")
                images.append(image)
                masks.append(label)
            supports[name] = (images, masks)
        queries = [Path(q) for q in args.query]
        check_queries(queries, data["val_size"])

        segmenter = None
        if args.refine == "fastsam":          # the FastSAM file and extra are checked before the model loads
            segmenter = FastSAMSegmenter.from_cfg(cfg, weights=args.fastsam_weights)
            print(f"FastSAM refinement: {segmenter.proposer.weights}", file=sys.stderr)
        predictor = Predictor.from_cfg(cfg)
        print(f"weights {cfg['weights']}: {predictor.weights_report.summary()}", file=sys.stderr)
        for name, (images, masks) in supports.items():
            predictor.set_support(images, masks, name=name, class_value=args.class_value)
    except (ConfigError, DataError, CheckpointError, PredictorError, FastSAMUnavailable) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    def jobs():
        for path in queries:
            image = read_input_image(path, "query image")
            if nway:
                result = predictor.predict_nway(image, threshold=args.threshold, return_prompts=args.save_prompt)
                files = render_nway(image.astype(np.uint8), result, path.stem, save_prompt=args.save_prompt)
            else:
                result = predictor.predict(image)
                files = render_single(image.astype(np.uint8), result, path.stem, save_prompt=args.save_prompt)
                if segmenter is not None:
                    refined = segmenter.refine(image, result["prob"], result["mask"], what=f"query image {path}")
                    files.update(render_refined(image.astype(np.uint8), refined, path.stem))
            yield files

    written = write_outputs(jobs(), out_dir)
    if written < 0:
        return -written
    print(f"{len(queries)} quer{'y' if len(queries) == 1 else 'ies'} segmented "
          f"({'N-way: ' + ', '.join(supports) if nway else '1 class'}): {written} files in {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
