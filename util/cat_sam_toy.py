"""A toy domain shift for CAT-SAM on 2 CPU cores (SPEC_CAT_SAM 15), deterministic from a seed.

    python -m util.cat_sam_toy prepare [--root data/toy_cat_sam] [--seed 0]
    python -m util.cat_sam_toy pretrain [--config config/toy/cat_sam.yaml] [--steps 400]
    python -m util.cat_sam_toy report RESULTS.json ...

* source domain (stands in for SAM's pretraining data): solid, saturated discs / rectangles /
  triangles / ellipses on smooth gradient backgrounds; generated on the fly for the pretraining,
  and a 40-image ``source/test.txt`` to check the pretrained model;
* target domain ("shadows", SBU-like): soft-edged darker, slightly blue regions over a cluttered
  background of many coloured shapes and texture noise; the shadows are what is to be segmented, the
  coloured shapes -- what the source model learned to cut out -- are background. ``target/``:
  ``train_1shot.txt`` = ``train.txt`` = ONE image, ``val.txt`` (10 images, model selection),
  ``test.txt`` (50 images, 8 without any shadow); all in the generic folder format
  (util/cat_sam_data.py);
* ``pretrain``: a zero-shot-style tiny SAM (model.sam of the config) with ALL its weights trainable,
  trained on the source domain with box and point prompts (BCE + Dice, AdamW), saved as a
  segment-anything ``sam_vit_*``-format state dict (``image_encoder.*``, ``prompt_encoder.*``,
  ``mask_decoder.*``): the file ``model.sam.checkpoint`` of config/toy/cat_sam.yaml, which every
  toy variant then loads as its frozen SAM;
* ``report``: one table of the test results (foreground IoU, mean per-image IoU, point IoU),
  mean +- std over the training seeds of each variant.

``bash train.sh toy-cat-sam`` runs all of it. Not a benchmark of the method: tiny networks, a
made-up shift, minutes of training.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import cv2
import numpy as np
import torch

VERSION = 1
ROOT = Path(__file__).resolve().parent.parent


# -- drawing --------------------------------------------------------------------------------------

def _shape_mask(rng: np.random.Generator, h: int, w: int, kind: str, size: Tuple[float, float]) -> np.ndarray:
    """An H x W uint8 0/1 mask of one random shape of ``kind`` with radius in ``size``."""
    mask = np.zeros((h, w), np.uint8)
    r = rng.uniform(*size)
    cx, cy = rng.uniform(r * 0.6, w - r * 0.6), rng.uniform(r * 0.6, h - r * 0.6)
    if kind == "disc":
        cv2.circle(mask, (int(cx), int(cy)), int(r), 1, -1)
    elif kind == "rect":
        a, b = r * rng.uniform(0.5, 1.0), r * rng.uniform(0.5, 1.0)
        cv2.rectangle(mask, (int(cx - a), int(cy - b)), (int(cx + a), int(cy + b)), 1, -1)
    elif kind == "triangle":
        angles = rng.uniform(0, 2 * np.pi) + np.array([0, 2.1, 4.2]) + rng.uniform(-0.3, 0.3, 3)
        pts = np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], 1).astype(np.int32)
        cv2.fillPoly(mask, [pts], 1)
    else:   # ellipse / blob
        axes = (int(r), int(r * rng.uniform(0.45, 0.9)))
        cv2.ellipse(mask, (int(cx), int(cy)), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    return mask


def _gradient(rng: np.random.Generator, h: int, w: int, low: int, high: int) -> np.ndarray:
    c0, c1 = rng.uniform(low, high, 3), rng.uniform(low, high, 3)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = (np.cos(angle) * xx / w + np.sin(angle) * yy / h)
    t = (t - t.min()) / max(1e-6, float(t.max() - t.min()))
    return c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]


def _saturated(rng: np.random.Generator) -> np.ndarray:
    colour = rng.uniform(0, 90, 3)
    colour[rng.integers(3)] = rng.uniform(180, 255)
    return colour


def _size(rng: np.random.Generator) -> Tuple[int, int]:
    return int(rng.integers(96, 129)), int(rng.integers(96, 129))


def source_image(rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """(H x W x 3 uint8 RGB, H x W bool): 1-3 solid saturated shapes on a smooth dull background."""
    h, w = _size(rng)
    image = _gradient(rng, h, w, 40, 140) + rng.normal(0, 4, (h, w, 3))
    fg = np.zeros((h, w), bool)
    for _ in range(int(rng.integers(1, 4))):
        m = _shape_mask(rng, h, w, ["disc", "rect", "triangle", "ellipse"][int(rng.integers(4))], (10, 26)) > 0
        image[m] = _saturated(rng) + rng.normal(0, 4, (int(m.sum()), 3))
        fg |= m
    return np.clip(image, 0, 255).astype(np.uint8), fg


#: the target domain's knobs: how much a shadow darkens, how strong the background texture is
DARKEN, TEXTURE = 0.5, 22.0


def target_image(rng: np.random.Generator, shadows: int) -> Tuple[np.ndarray, np.ndarray]:
    """(image, foreground): ``shadows`` soft dark regions over coloured clutter and texture."""
    h, w = _size(rng)
    image = _gradient(rng, h, w, 120, 200)
    for _ in range(int(rng.integers(8, 15))):        # clutter: the source's kind of objects, as background
        m = _shape_mask(rng, h, w, ["disc", "rect", "triangle", "ellipse"][int(rng.integers(4))], (5, 18)) > 0
        image[m] = _saturated(rng) * 0.6 + 90
    texture = cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), 1.2)
    image += TEXTURE * texture[..., None] + rng.normal(0, 5, (h, w, 3))
    fg = np.zeros((h, w), bool)
    alpha = np.zeros((h, w), np.float32)
    for _ in range(shadows):
        m = _shape_mask(rng, h, w, ["ellipse", "disc", "triangle"][int(rng.integers(3))], (14, 30)).astype(np.float32)
        a = cv2.GaussianBlur(m, (0, 0), rng.uniform(1.5, 3.0))
        alpha = np.maximum(alpha, a)
    fg = alpha > 0.5
    image = image * (1 - DARKEN * alpha[..., None]) + alpha[..., None] * np.array([0, 0, 12])
    return np.clip(image, 0, 255).astype(np.uint8), fg


# -- prepare --------------------------------------------------------------------------------------

def _write(root: Path, split_dir: str, name: str, image: np.ndarray, fg: np.ndarray) -> Tuple[str, str]:
    images, masks = root / split_dir / "images", root / split_dir / "masks"
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(images / f"{name}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(masks / f"{name}.png"), fg.astype(np.uint8) * 255)
    return f"images/{name}.png", f"masks/{name}.png"


def prepare(root: Path = ROOT / "data" / "toy_cat_sam", seed: int = 0, log=print) -> Path:
    """Write the toy (source test set, target 1-shot / val / test); kept when already there."""
    from util.cat_sam_data import write_list
    root = Path(root)
    stamp = root / "toy.json"
    meta = {"version": VERSION, "seed": seed}
    if stamp.is_file() and json.loads(stamp.read_text()) == meta:
        log(f"toy CAT-SAM data already in {root}")
        return root
    source, target = root / "source", root / "target"
    pairs = [_write(source, "", f"src{i:03d}", *source_image(np.random.default_rng([seed, 1, i]))) for i in range(40)]
    write_list(source, "test.txt", pairs)
    train = [_write(target, "", "train000", *target_image(np.random.default_rng([seed, 2, 0]), 2))]
    write_list(target, "train.txt", train)
    write_list(target, "train_1shot.txt", train)
    val = [_write(target, "", f"val{i:03d}", *target_image(np.random.default_rng([seed, 3, i]), 1 + i % 2))
           for i in range(10)]
    write_list(target, "val.txt", val)
    test = [_write(target, "", f"test{i:03d}", *target_image(np.random.default_rng([seed, 4, i]),
                                                              0 if i % 6 == 5 else 1 + i % 3 // 2))
            for i in range(50)]
    write_list(target, "test.txt", test)
    stamp.write_text(json.dumps(meta))
    log(f"toy CAT-SAM data written to {root}: source/test.txt (40), target/train_1shot.txt (1), val.txt (10), "
        f"test.txt (50, {sum(1 for i in range(50) if i % 6 == 5)} without shadow)")
    return root


# -- pretraining the tiny SAM on the source domain ------------------------------------------------

def _source_sample(seed: int, index: int):
    from util.cat_sam_data import ObjectRules, components, random_object_points, tight_box, to_image_tensor
    rng = np.random.default_rng([seed, 100, index])
    image, fg = source_image(rng)
    objects = components(fg, ObjectRules(8, 20, 0.0)) or [fg]
    sample = {"image": to_image_tensor(image), "masks": torch.from_numpy(np.stack(objects).astype(np.float32))[:, None]}
    kind = rng.random()
    if kind < 0.1:          # no prompt -> nothing (SAM's empty-prompt output; the test's images without object)
        sample["masks"] = torch.zeros((1,) + sample["masks"].shape[1:])
    elif kind < 0.6:
        sample["boxes"] = torch.from_numpy(np.stack([tight_box(o) for o in objects]))
    else:
        sample["points"] = random_object_points(objects, rng)
    return sample


def sam_state_dict(model) -> Dict[str, torch.Tensor]:
    """A CATSAM's frozen SAM as a segment-anything state dict (``sam_vit_*.pth`` keys)."""
    from model.cat_sam_decoder import SAM_DECODER_PREFIXES
    state = {}
    for key, value in model.canonical_state_dict().items():
        if key.startswith("ori_sam."):
            state[key[len("ori_sam."):]] = value.detach().clone()
        elif key.startswith(tuple("mask_decoder." + p for p in SAM_DECODER_PREFIXES)):
            state[key] = value.detach().clone()
    return state


def pretrain(config: Path = ROOT / "config" / "toy" / "cat_sam.yaml", *, steps: int = 400, batch: int = 4,
             lr: float = 2e-3, seed: int = 0, force: bool = False, log=print) -> Path:
    """Train a tiny SAM (model.sam of ``config``) on the source domain; save it to model.sam.checkpoint."""
    from model import build_model
    from model.cat_sam_loss import cat_sam_loss
    from util.atomic import write_atomic
    from util.config import load_config, resolve_path
    cfg = load_config(config, ["model.cat_sam.variant=zero_shot"])
    out = resolve_path(cfg["model"]["sam"]["checkpoint"], cfg)
    if out.is_file() and not force:
        log(f"pretrained toy SAM already in {out}")
        return out
    torch.manual_seed(seed)
    model = build_model(cfg)
    for p in model.parameters():
        p.requires_grad_(True)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    model.train()
    start = time.time()
    for step in range(steps):
        for group in optimizer.param_groups:        # cosine to 0
            group["lr"] = lr * (1 + math.cos(math.pi * step / steps)) / 2
        samples = [_source_sample(seed, step * batch + b) for b in range(batch)]
        outputs = model(images=[s["image"] for s in samples], boxes=[s.get("boxes") for s in samples],
                        points=[s.get("points") for s in samples])
        loss, _ = cat_sam_loss(outputs, [s["masks"] for s in samples])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % 100 == 0:
            log(f"source pretraining step {step + 1}/{steps}: loss {loss.item():.4f} ({time.time() - start:.0f} s)")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda tmp: torch.save(sam_state_dict(model), tmp))
    log(f"pretrained toy SAM saved to {out} ({time.time() - start:.0f} s)")
    return out


# -- report ---------------------------------------------------------------------------------------

ORDER = ("zero_shot", "decoder", "decoder_only", "t", "a")
NAMES = {"zero_shot": "zero-shot SAM (source-pretrained)", "decoder": "decoder-only (HQ branch)",
         "decoder_only": "decoder-only (HQ branch)", "t": "CAT-SAM-T", "a": "CAT-SAM-A"}
COLUMNS = (("fg_iou", "fg IoU (box)"), ("image_iou", "img IoU (box)"), ("point_fg_iou", "fg IoU (point)"),
           ("point_image_iou", "img IoU (point)"))


def _mean_std(values: Sequence[float]) -> str:
    values = [100 * v for v in values]
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return f"{mean:5.1f} +- {std:4.1f}"


def table(results: Sequence[Dict]) -> str:
    groups: Dict[str, List[Dict]] = {}
    for r in results:
        groups.setdefault(r["variant"], []).append(r)
    head = f"{'model':<36s} {'seeds':>5s}  " + "  ".join(f"{title:>15s}" for _, title in COLUMNS)
    lines = [head, "-" * len(head)]
    for variant in sorted(groups, key=lambda v: ORDER.index(v) if v in ORDER else len(ORDER)):
        rows = groups[variant]
        seeds = "-" if variant == "zero_shot" else str(len(rows))
        lines.append(f"{NAMES.get(variant, variant):<36s} {seeds:>5s}  " +
                     "  ".join(f"{_mean_std([r[k] for r in rows]):>15s}" for k, _ in COLUMNS))
    first = results[0]
    lines.append(f"test set: {first['num_images']} images ({first['num_empty']} without object); fg IoU = dataset-level "
                 f"foreground IoU, one tight GT box (or one interior point) per object; mean +- std over training seeds")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--root", default=str(ROOT / "data" / "toy_cat_sam"))
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("pretrain")
    p.add_argument("--config", default=str(ROOT / "config" / "toy" / "cat_sam.yaml"))
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true")
    p = sub.add_parser("report")
    p.add_argument("results", nargs="+")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(Path(args.root), args.seed)
    elif args.command == "pretrain":
        pretrain(Path(args.config), steps=args.steps, seed=args.seed, force=args.force)
    else:
        print(table([json.loads(Path(f).read_text()) for f in args.results]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
