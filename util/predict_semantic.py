"""Semantic segmentation of your own images with a SimFormer checkpoint (``train.stage=simformer``):
every pixel gets one of the dataset's K classes (base and novel together, SPEC_SIMFORMER 8)::

    python predict.py config/weakshot/ade20k_split1.yaml weights=exp/.../best.pth --query a.jpg b.jpg --out vis/
    python predict.py config/toy/weakshot.yaml weights=exp/toy/.../best.pth --query q.jpg --out vis/

Each query goes through the evaluation transform of ``train.simformer`` (short side
``val_short_side``, long side <= ``val_max_side``; 0 = as it is: :func:`util.weakshot_data.eval_image`)
and the model's semantic inference (:meth:`model.simformer.SimFormer.inference`: softmax over
K+1 without "no object" times the sigmoid masks, back to the image's size), then ``argmax``.
Written per query (``<stem>`` = the file name without extension), each file atomically:

  ``<stem>_semantic.png``          index PNG (mode "P", VOC palette): value = the dataset's class id
                                   (PASCAL / COCO / toy: 0 background; COCO-Stuff-10K 0..170;
                                   ADE20K 0..149)
  ``<stem>_semantic_overlay.png``  the query tinted by class (background untouched) with a legend
                                   of the classes present ("id: name")

Python: ``predict_semantic(model, cfg, paths, out_dir)`` with a model from
``model.build_model(cfg, "simformer")`` and ``util.checkpoint.load_weights``; ``run_semantic(args,
cfg)`` is predict.py's entry for a ``simformer`` config.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from util.config import ConfigError, resolve_path
from util.io import DataError

SUFFIXES = ("_semantic.png", "_semantic_overlay.png")


def add_semantic_arguments(parser: argparse.ArgumentParser) -> None:
    """Nothing to add: the semantic mode uses predict.py's CONFIG, overrides, ``--query`` and ``--out``."""
    return None


def semantic_class_names(cfg: Mapping) -> Tuple[str, ...]:
    """The K class names of the config's weak-shot view, in class-id order."""
    from util.folds import make_fold
    from util.weakshot_benchmarks import BENCHMARKS
    data = cfg["data"]
    if data["dataset"] in BENCHMARKS:
        return tuple(BENCHMARKS[data["dataset"]].class_names)
    names = None
    if data["dataset"] == "custom" and not data["class_names"]:
        from util.dataset import custom_class_names
        names = custom_class_names(resolve_path(data["root"], cfg))
    return ("background",) + tuple(make_fold(data, names).class_names)


def has_background(cfg: Mapping) -> bool:
    """Class 0 is a background (PASCAL, COCO, toy, custom), not a class like the others."""
    from util.weakshot_benchmarks import BENCHMARKS
    return cfg["data"]["dataset"] not in BENCHMARKS


@torch.no_grad()
def predict_labels(model: torch.nn.Module, cfg: Mapping, image: np.ndarray) -> np.ndarray:
    """H x W uint8 class ids of an H x W x 3 RGB image (float 0..255), as the weak-shot evaluation
    scores it (util/stages/simformer.py ``evaluate_weakshot``)."""
    from model.simformer import preprocess_images
    from util.weakshot_data import eval_image
    stage = cfg["train"]["simformer"]
    device = next(model.parameters()).device
    tensor = eval_image(image, int(stage["val_short_side"]), int(stage["val_max_side"])).to(device)
    padded, sizes = preprocess_images([tensor])
    scores = model.inference(padded, sizes, [tuple(image.shape[:2])])[0]
    return scores.argmax(0).to(torch.uint8).cpu().numpy()


def render_semantic(image: np.ndarray, labels: np.ndarray, names: Sequence[str], stem: str, *,
                    background: bool = True) -> Dict[str, bytes]:
    """PNG bytes of one query's outputs; ``image`` RGB uint8 H x W x 3, ``labels`` H x W class ids."""
    from util.vis import add_legend, encode_index_png, encode_png, overlay_labels, voc_palette
    palette = voc_palette(256)
    shown = labels.astype(np.int32) + 1            # overlay_labels leaves value 0 untouched
    if background:
        shown[labels == 0] = 0
    colours = np.concatenate([np.zeros((1, 3), np.uint8), palette[:255]])
    present = [int(c) for c in np.unique(labels) if not (background and c == 0)]
    entries = [f"{c}: {names[c]}" for c in present] or [f"0: {names[0]} only"]
    swatches = [tuple(int(v) for v in palette[c]) for c in present] or [tuple(int(v) for v in palette[0])]
    return {f"{stem}_semantic.png": encode_index_png(labels, palette),
            f"{stem}_semantic_overlay.png": encode_png(add_legend(overlay_labels(image, shown, colours), entries,
                                                                  swatches))}


def _check_queries(paths: Sequence[Path]) -> None:
    from util.io import read_image
    stems: Dict[str, Path] = {}
    for path in paths:
        if not path.is_file():
            raise DataError(f"query image not found: {path}" if not path.exists() else f"query image {path} is not a file")
        read_image(path, "--query")
        if path.stem in stems:
            raise DataError(f"query images {stems[path.stem]} and {path} have the same name '{path.stem}': their "
                            f"outputs ({path.stem}_semantic*.png) would overwrite each other")
        stems[path.stem] = path


def predict_semantic(model: torch.nn.Module, cfg: Mapping, image_paths: Sequence, out_dir, *,
                     log: Callable[[str], None] = lambda message: None) -> List[Path]:
    """Write ``<stem>_semantic.png`` and ``<stem>_semantic_overlay.png`` of every image into
    ``out_dir`` (atomically); every input is checked before anything is written. ``model``: a
    SimFormer with its weights loaded (it is put in eval mode). Returns the files written."""
    from util.atomic import write_bytes_atomic
    from util.io import read_image
    names = semantic_class_names(cfg)
    num_classes = int(getattr(model, "num_classes", len(names)))
    if num_classes != len(names):
        raise ConfigError(f"the model predicts {num_classes} classes but data.dataset={cfg['data']['dataset']} "
                          f"has {len(names)}: use the config the checkpoint was trained with")
    if num_classes > 256:
        raise ConfigError(f"{num_classes} classes do not fit an index PNG (at most 256)")
    paths = [Path(p) for p in image_paths]
    if not paths:
        raise DataError("no query image given")
    _check_queries(paths)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"output directory {out_dir} exists and is not a directory")
    model.eval()
    background = has_background(cfg)
    written: List[Path] = []
    for path in paths:
        image = read_image(path, "--query")
        labels = predict_labels(model, cfg, image)
        files = render_semantic(image.astype(np.uint8), labels, names, path.stem, background=background)
        for file_name, data in files.items():     # both complete before either is written
            written.append(write_bytes_atomic(out_dir / file_name, data))
        present = [names[int(c)] for c in np.unique(labels) if not (background and c == 0)]
        log(f"{path}: {', '.join(present) or names[0] + ' only'}")
    return written


def build_semantic_model(cfg: Mapping):
    """(SimFormer with ``cfg.weights`` loaded completely, load report) on ``cfg.device``."""
    from model import build_model
    from util.checkpoint import load_weights
    from util.distributed import resolve_device
    model = build_model(cfg, "simformer")
    report = load_weights(model, resolve_path(cfg["weights"]), require_complete=True)
    return model.to(resolve_device(cfg["device"])).eval(), report


_FEW_SHOT_OPTIONS = (("support", "--support"), ("support_class", "--support-class"), ("class_value", "--class-value"),
                     ("save_prompt", "--save-prompt"), ("point", "--point"), ("bg_point", "--bg-point"),
                     ("box", "--box"))


def run_semantic(args: argparse.Namespace, cfg: Mapping) -> int:
    """predict.py for a ``train.stage=simformer`` config: exit code 0, or 2 with one error line."""
    from util.checkpoint import CheckpointError
    try:
        used = [flag for attr, flag in _FEW_SHOT_OPTIONS if getattr(args, attr, None) not in (None, False, [], ())]
        if getattr(args, "refine", "none") not in (None, "none"):
            used.append("--refine")
        if used:
            raise DataError(f"{', '.join(used)}: few-shot options; a SimFormer (train.stage=simformer) segments a "
                            "query into all the dataset's classes without a support set: give only --query and --out")
        if not cfg["weights"]:
            raise ConfigError("predict.py needs weights=PATH: the best.pth / last.pth of a train.stage=simformer run")
        queries = [Path(q) for q in args.query]
        _check_queries(queries)
        out_dir = Path(args.out)
        if out_dir.exists() and not out_dir.is_dir():
            raise DataError(f"--out {out_dir} exists and is not a directory")
        model, report = build_semantic_model(cfg)
        print(f"weights {cfg['weights']}: {report.summary()}", file=sys.stderr)
        written = predict_semantic(model, cfg, queries, out_dir, log=lambda m: print(m, file=sys.stderr))
    except (ConfigError, DataError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: cannot write the outputs into {args.out}: {err}", file=sys.stderr)
        return 1
    print(f"{len(queries)} quer{'y' if len(queries) == 1 else 'ies'} segmented into "
          f"{len(semantic_class_names(cfg))} classes: {len(written)} files in {out_dir}")
    return 0
