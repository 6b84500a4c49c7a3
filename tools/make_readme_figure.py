"""The README's "use it on your own images" figure (docs/toy_overlay.png), from the toy benchmark.

    python tools/make_readme_figure.py exp/toy/quickstart/sam_rsp/best.pth
    python tools/make_readme_figure.py WEIGHTS --config config/toy/toy.yaml --out docs/toy_overlay.png [key=value ...]
    python tools/make_readme_figure.py --random-init --out /tmp/check.png    # checks the script, no trained model

Trains nothing. It picks, deterministically, the first toy val image holding two novel classes
of the fold (``data.split``) as the query and, for each of the two classes, K = data.shot
support images from other val images; then draws, through util.predictor.Predictor (the code
predict.py runs), side by side: the supports with their masks, the query's single-class
overlay (predict.py's ``<stem>_overlay.png``) and its 2-way overlay with a legend
(``<stem>_nway_overlay.png``). The PNG is reduced to 256 colours (legend colours kept exact), then
shrunk, until it is under ``--max-kb``.
"""
from __future__ import annotations

import argparse
import sys
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from util.config import load_config, resolve_path  # noqa: E402
from util.folds import make_fold  # noqa: E402
from util.io import read_image, read_mask  # noqa: E402
from util.lists import read_pair_list  # noqa: E402


def pick_episode(cfg, *, min_pixels: int) -> tuple[Path, list[int], dict]:
    """(query image, its 2 novel classes, class -> K (image, mask) support paths) from the val list."""
    data = cfg["data"]
    root = resolve_path(data["root"], cfg)
    val_list = Path(data["val_list"]) if Path(data["val_list"]).is_absolute() else root / data["val_list"]
    pairs = [(root / image, root / mask) for image, mask in read_pair_list(val_list, "data.val_list")]
    novel = set(make_fold(data).novel)
    shot = int(data["shot"])

    def classes_of(mask_path: Path) -> dict:
        values, counts = np.unique(read_mask(mask_path), return_counts=True)
        return {int(v): int(n) for v, n in zip(values, counts) if int(v) in novel and n >= min_pixels}

    contents = [(image, mask, classes_of(mask)) for image, mask in pairs]
    for query, query_mask, classes in contents:
        if len(classes) < 2:
            continue
        chosen = sorted(classes, key=lambda c: -classes[c])[:2]
        supports = {c: [(image, mask) for image, mask, found in contents if c in found and image != query][:shot]
                    for c in chosen}
        if all(len(s) == shot for s in supports.values()):
            return query, chosen, supports
    raise SystemExit(f"no val image of {root} holds two novel classes with >= {min_pixels} pixels each "
                     f"and {shot} support images per class")


def small_png(picture: np.ndarray, max_kb: int, exact_colours: list) -> bytes:
    """PNG bytes of an RGB picture under ``max_kb``: full colour; else 256 palette colours (a
    median-cut palette plus ``exact_colours``, e.g. the legend's, kept exactly; no dithering);
    else the palette version shrunk by steps of 10%, down to 60% of the size."""
    import cv2

    def encode(scale: float, quantize: bool) -> bytes:
        image = picture if scale == 1.0 else cv2.resize(picture, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        image = Image.fromarray(image)
        if quantize:
            exact = [tuple(int(v) for v in c) for c in dict.fromkeys(tuple(c) for c in exact_colours)]
            base = image.quantize(colors=256 - len(exact), method=Image.Quantize.MEDIANCUT)
            entries = base.getpalette()[:3 * (256 - len(exact))] + [v for colour in exact for v in colour]
            palette = Image.new("P", (1, 1))
            palette.putpalette(entries + [0] * (768 - len(entries)))
            image = image.quantize(palette=palette, dither=Image.Dither.NONE)
        buffer = BytesIO()
        image.save(buffer, format="PNG", optimize=True)
        return buffer.getvalue()

    for scale, quantize in ((1.0, False), (1.0, True), (0.9, True), (0.8, True), (0.7, True), (0.6, True)):
        data = encode(scale, quantize)
        if len(data) <= max_kb * 1024:
            return data
    raise SystemExit(f"the figure does not fit in {max_kb} KB even at 60% of its size with 256 colours")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("weights", nargs="?", default="", help="a SAM-RSP checkpoint trained on the toy benchmark")
    parser.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    parser.add_argument("--config", default=str(ROOT / "config" / "toy" / "toy.yaml"))
    parser.add_argument("--out", default=str(ROOT / "docs" / "toy_overlay.png"))
    parser.add_argument("--random-init", action="store_true",
                        help="random weights instead of a checkpoint: only to check that the script runs")
    parser.add_argument("--panel-height", type=int, default=200)
    parser.add_argument("--min-pixels", type=int, default=600, help="smallest object (pixels) a class may have")
    parser.add_argument("--max-kb", type=int, default=140)
    args = parser.parse_args(argv)
    if "=" in args.weights:            # no weights given: the first positional is an override
        args.overrides.insert(0, args.weights)
        args.weights = ""
    if bool(args.weights) == args.random_init:
        parser.error("give either WEIGHTS or --random-init")

    import cv2
    import torch
    from model import build_model
    from util.predictor import Predictor
    from util.vis import (STRIP_COLOUR, SUPPORT_COLOUR, TEXT_COLOUR, captioned, hstack, nway_overlay, overlay_mask,
                          resize_to_height, text_strip, voc_palette, vstack)
    from util.atomic import write_bytes_atomic

    cfg = load_config(args.config, args.overrides)
    if args.random_init:
        torch.manual_seed(0)
        predictor = Predictor(build_model(cfg, "sam_rsp"), cfg, device="cpu")
    else:
        predictor = Predictor.from_cfg(cfg, weights=args.weights)
    query, classes, supports = pick_episode(cfg, min_pixels=args.min_pixels)
    names = [make_fold(cfg["data"]).name(c) for c in classes]
    height = args.panel_height

    def scaled(image: np.ndarray, label_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Image (linear) and label map (nearest) at the panel height."""
        image = resize_to_height(image.astype(np.uint8), height)
        return image, cv2.resize(label_map.astype(np.uint8), image.shape[1::-1], interpolation=cv2.INTER_NEAREST)

    panels = []
    for class_id, name in zip(classes, names):
        images = [read_image(image) for image, _ in supports[class_id]]
        labels = [read_mask(mask) for _, mask in supports[class_id]]
        predictor.set_support(images, labels, name=name, class_value=class_id)
        for image, label in zip(images, labels):
            image, label = scaled(image, label)
            picture = overlay_mask(image, label == class_id, SUPPORT_COLOUR, ignore=label == 255)
            panels.append(captioned(picture, f"support: {name}"))
    query_image = read_image(query).astype(np.uint8)
    image, mask = scaled(query_image, predictor.predict(query_image, name=names[0])["mask"])
    panels.append(captioned(overlay_mask(image, mask == 1), f"query: {names[0]}"))
    nway = predictor.predict_nway(query_image, threshold=0.5)
    image, labels = scaled(query_image, nway["labels"])
    panels.append(captioned(nway_overlay(image, labels, nway["names"]), "query: 2-way"))
    body = hstack(panels, gap=6)
    title = (f"toy benchmark, fold {cfg['data']['split']} novel classes, {cfg['data']['shot']}-shot: "
             "supports -> predict.py overlays")
    if args.random_init:
        title = "RANDOM WEIGHTS (script check only) - " + title
    figure = vstack([text_strip(body.shape[1], title, height=24), body])
    exact = [(255, 255, 255), (0, 0, 0), STRIP_COLOUR, TEXT_COLOUR, *voc_palette(len(names) + 1)[1:]]
    data = small_png(figure, args.max_kb, exact)
    out = write_bytes_atomic(args.out, data)
    width, height = Image.open(BytesIO(data)).size
    print(f"{out}: {width}x{height}, {len(data) / 1024:.0f} KB "
          f"(query {query.name}, classes {', '.join(names)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
