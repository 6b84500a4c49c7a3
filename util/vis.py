"""Pictures, drawn with OpenCV: mask overlays, heat maps and legends (predict.py), the test's
episode pictures (``test.py ... vis=N``) and its per-class IoU bar chart.

Every picture is an RGB ``uint8`` H x W x 3 array here (converted to BGR only when encoded);
masks are H x W arrays. Files are written atomically (a temporary file in the same directory,
then a rename), so an interrupted run never leaves a truncated PNG.

Test pictures (:class:`EpisodePictures`, wired into :func:`util.engine.test` through
``run_test_protocol(..., on_batch_factory=...)``): for the first N episodes of the FIRST seed,
``<output_dir>/vis/episode_<index>_<class>.png`` shows the support image(s) with their masks,
the query with its ground truth, the RSP (BAM prompt) and the final prediction side by side,
with the episode's class and IoUs in a title strip. The query is drawn at the evaluation
resize (``util.transforms.resized_hw``, paddings cropped away); the predictions shown are the
ones scored (at original resolution, resized for display) and the IoUs are those of the
episode at original resolution. Only rank 0 draws: under torchrun the episodes are sharded
(rank 0 evaluates episodes 0, W, 2W, ... of W processes), so the pictures are of the first N
episodes rank 0 sees, which are the first N episodes only for a single process.
"""
from __future__ import annotations

import math
import os
import re
from io import BytesIO
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import cv2
import numpy as np
import torch
from PIL import Image

from util.atomic import write_bytes_atomic
from util.metrics import predict_at_original_resolution
from util.transforms import resized_hw

RGB = tuple  # (r, g, b), 0..255

PREDICTION_COLOUR: RGB = (230, 25, 75)    # final prediction / predict.py's mask overlay
GROUND_TRUTH_COLOUR: RGB = (60, 180, 75)
PROMPT_COLOUR: RGB = (245, 130, 48)       # the RSP
SUPPORT_COLOUR: RGB = (0, 130, 200)
IGNORE_COLOUR: RGB = (200, 200, 200)
TEXT_COLOUR: RGB = (20, 20, 20)
STRIP_COLOUR: RGB = (245, 245, 245)
FONT = cv2.FONT_HERSHEY_SIMPLEX


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a grayscale H x W or RGB H x W x 3 uint8 array."""
    image = np.ascontiguousarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"encode_png expects uint8, got {image.dtype}")
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, data = cv2.imencode(".png", image)
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 array
        raise RuntimeError("OpenCV could not encode the PNG")
    return data.tobytes()


def encode_index_png(labels: np.ndarray, palette: np.ndarray) -> bytes:
    """PNG bytes of an index (palette, mode "P") image: ``labels`` H x W with values < 256,
    ``palette`` n x 3 uint8 (entry i = colour of value i)."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError(f"an index PNG holds values 0..255, got {labels.min()}..{labels.max()}")
    image = Image.fromarray(labels.astype(np.uint8), mode="L").convert("P")
    flat = np.zeros((256, 3), np.uint8)
    flat[:len(palette)] = np.asarray(palette, np.uint8)[:256]
    image.putpalette(flat.reshape(-1).tolist())
    buffer = BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write a grayscale or RGB uint8 array as PNG, atomically."""
    return write_bytes_atomic(path, encode_png(image))


def safe_name(text: str) -> str:
    """``text`` usable in a file name: runs of characters other than letters, digits, ``.-_``
    become ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "class"


# ---------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------

def voc_palette(num_colours: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map: ``num_colours`` x 3 uint8, entry 0 black (background)."""
    palette = np.zeros((num_colours, 3), np.uint8)
    for index in range(num_colours):
        value, r, g, b = index, 0, 0, 0
        for bit in range(8):
            r |= ((value >> 0) & 1) << (7 - bit)
            g |= ((value >> 1) & 1) << (7 - bit)
            b |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        palette[index] = (r, g, b)
    return palette


def line_thickness(height: int, width: int) -> int:
    """Contour thickness for a picture of this size (1 px up to ~400 px, then thicker)."""
    return max(1, int(round(min(height, width) / 300)))


def tint(image: np.ndarray, mask: np.ndarray, colour: RGB, alpha: float = 0.45) -> np.ndarray:
    """``image`` (RGB uint8 H x W x 3) blended with ``colour`` where ``mask`` (H x W bool)."""
    out = image.copy()
    if mask.any():
        blended = image[mask].astype(np.float32) * (1 - alpha) + np.float32(colour) * alpha
        out[mask] = np.clip(np.round(blended), 0, 255).astype(np.uint8)
    return out


def draw_contour(image: np.ndarray, mask: np.ndarray, colour: RGB, thickness: Optional[int] = None) -> np.ndarray:
    """``image`` with the outline of ``mask`` (H x W bool) drawn in ``colour`` (in place; returned)."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if contours:
        cv2.drawContours(image, contours, -1, tuple(int(c) for c in colour),
                         thickness or line_thickness(*mask.shape))
    return image


def overlay_mask(image: np.ndarray, mask: np.ndarray, colour: RGB = PREDICTION_COLOUR, alpha: float = 0.45,
                 ignore: Optional[np.ndarray] = None) -> np.ndarray:
    """RGB H x W x 3: ``image`` tinted with ``colour`` on ``mask`` (H x W bool) and the mask's
    contour drawn; ``ignore`` (H x W bool), when given, tinted light grey."""
    out = tint(image, ignore, IGNORE_COLOUR, 0.6) if ignore is not None else image
    out = tint(out, mask, colour, alpha)
    return draw_contour(out, mask, colour)


def overlay_labels(image: np.ndarray, labels: np.ndarray, colours: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """RGB H x W x 3: ``image`` tinted by the label map ``labels`` (H x W int; 0 = untouched,
    i = ``colours[i]``) with every region's contour."""
    out = image.copy()
    for index in np.unique(labels):
        if index == 0:
            continue
        region = labels == index
        out = tint(out, region, tuple(int(c) for c in colours[index]), alpha)
        draw_contour(out, region, tuple(int(c) for c in colours[index]))
    return out


def nway_overlay(image: np.ndarray, labels: np.ndarray, names: Sequence[str],
                 palette: Optional[np.ndarray] = None) -> np.ndarray:
    """predict.py's N-way picture: ``image`` (RGB uint8 H x W x 3) tinted by ``labels`` (H x W:
    0 background, i = ``names[i - 1]``) in the colours of ``palette`` (default: VOC), with a
    legend of the class names on the right."""
    palette = voc_palette(256) if palette is None else palette
    colours = [tuple(int(c) for c in palette[i + 1]) for i in range(len(names))]
    return add_legend(overlay_labels(image, labels, palette), names, colours)


def heat_map(prob: np.ndarray) -> np.ndarray:
    """RGB H x W x 3 colour map (OpenCV's JET: blue 0 .. red 1) of a probability map H x W."""
    values = np.clip(np.round(np.asarray(prob, np.float32) * 255), 0, 255).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(values, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)


def text_size(text: str, scale: float, thickness: int = 1) -> tuple[int, int]:
    """(width, height above the baseline + below it) of ``text`` in pixels."""
    (w, h), baseline = cv2.getTextSize(text, FONT, scale, thickness)
    return w, h + baseline


def put_text(image: np.ndarray, text: str, origin: tuple[int, int], scale: float, colour: RGB = TEXT_COLOUR,
             thickness: int = 1) -> None:
    """Draw ``text`` with its baseline-left corner at ``origin`` (in place)."""
    cv2.putText(image, text, origin, FONT, scale, tuple(int(c) for c in colour), thickness, cv2.LINE_AA)


def fit_scale(text: str, width: int, scale: float = 0.5, min_scale: float = 0.3) -> float:
    """The largest font scale <= ``scale`` (down to ``min_scale``) at which ``text`` fits ``width``."""
    w, _ = text_size(text, scale)
    return max(min_scale, min(scale, scale * (width - 8) / max(w, 1)))


def text_strip(width: int, text: str, *, height: int = 24, scale: float = 0.5) -> np.ndarray:
    """A light strip ``height`` x ``width`` x 3 with ``text`` on it (shrunk to fit)."""
    strip = np.full((height, width, 3), STRIP_COLOUR, np.uint8)
    scale = fit_scale(text, width, scale)
    _, h = text_size(text, scale)
    put_text(strip, text, (4, (height + h) // 2 - 2), scale)
    return strip


def add_legend(image: np.ndarray, names: Sequence[str], colours: Sequence[RGB], *, scale: float = 0.45) -> np.ndarray:
    """``image`` with a legend panel on its right: one colour swatch and name per class. The
    result is wider than ``image`` (and taller, when the legend needs more rows)."""
    row = max(16, text_size("Ag", scale)[1] + 6)
    swatch = row - 6
    width = 12 + swatch + 6 + max(text_size(n, scale)[0] for n in names) + 8
    height = max(image.shape[0], row * len(names) + 8)
    panel = np.full((height, width, 3), 255, np.uint8)
    for i, (name, colour) in enumerate(zip(names, colours)):
        top = 4 + i * row
        cv2.rectangle(panel, (8, top + 3), (8 + swatch, top + 3 + swatch), tuple(int(c) for c in colour), -1)
        cv2.rectangle(panel, (8, top + 3), (8 + swatch, top + 3 + swatch), (0, 0, 0), 1)
        put_text(panel, name, (8 + swatch + 6, top + row - 4), scale)
    out = np.full((height, image.shape[1] + width, 3), 255, np.uint8)
    out[:image.shape[0], :image.shape[1]] = image
    out[:, image.shape[1]:] = panel
    return out


def hstack(panels: Sequence[np.ndarray], gap: int = 4, fill: RGB = (255, 255, 255)) -> np.ndarray:
    """Panels side by side (top-aligned), ``gap`` pixels apart."""
    height = max(p.shape[0] for p in panels)
    width = sum(p.shape[1] for p in panels) + gap * (len(panels) - 1)
    out = np.full((height, width, 3), fill, np.uint8)
    x = 0
    for p in panels:
        out[:p.shape[0], x:x + p.shape[1]] = p
        x += p.shape[1] + gap
    return out


def vstack(rows: Sequence[np.ndarray], fill: RGB = (255, 255, 255)) -> np.ndarray:
    """Pictures one above the other (left-aligned)."""
    width = max(r.shape[1] for r in rows)
    out = np.full((sum(r.shape[0] for r in rows), width, 3), fill, np.uint8)
    y = 0
    for r in rows:
        out[y:y + r.shape[0], :r.shape[1]] = r
        y += r.shape[0]
    return out


def captioned(panel: np.ndarray, caption: str, *, height: int = 20, scale: float = 0.42) -> np.ndarray:
    """``panel`` with ``caption`` in a strip above it."""
    return vstack([text_strip(panel.shape[1], caption, height=height, scale=scale), panel])


def resize_to_height(image: np.ndarray, height: int, *, nearest: bool = False) -> np.ndarray:
    """``image`` (H x W [x C]) scaled to ``height`` rows, aspect kept (linear, or nearest for labels)."""
    h, w = image.shape[:2]
    width = max(1, int(round(w * height / h)))
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR)


# ---------------------------------------------------------------------------------------------
# Test pictures
# ---------------------------------------------------------------------------------------------

def denormalise(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A normalised 3 x H x W tensor back to RGB uint8 H x W x 3 (``x * std + mean``)."""
    array = image.detach().float().cpu().numpy().transpose(1, 2, 0)
    array = array * np.float32(std) + np.float32(mean)
    return np.clip(np.round(array), 0, 255).astype(np.uint8)


def support_valid_hw(image: np.ndarray, mask: np.ndarray, size: int, ignore_label: int = 255) -> tuple[int, int]:
    """The image region (height, width) of a support on the ``size`` x ``size`` evaluation canvas.

    Supports carry no original size in a batch, so it is read off the canvas: the long side of
    the resize is ``size // 8 * 8`` (util.transforms.resized_hw); the short side is ``size``
    minus the trailing rows/columns that are pure padding (image black AND mask = ignore),
    rounded up to a multiple of 8. A real image whose last rows are black and ignore-labelled
    would be cropped a little early (the picture only).
    """
    longest = size // 8 * 8
    padding = (mask == ignore_label) & (image.max(axis=2) <= 0)

    def trailing(flags: np.ndarray) -> int:
        count = 0
        for flag in flags[::-1]:
            if not flag:
                break
            count += 1
        return count

    height = size - trailing(padding.all(axis=1))
    width = size - trailing(padding.all(axis=0))
    height = min(longest, max(8, int(math.ceil(height / 8)) * 8))
    width = min(longest, max(8, int(math.ceil(width / 8)) * 8))
    return height, width


def episode_iou(pred: np.ndarray, target: np.ndarray, ignore_label: int = 255) -> float:
    """Foreground IoU of one episode (H x W 0/1 prediction, H x W 0/1/ignore target), pixels of
    ``ignore_label`` left out, as the test counts them; NaN when the union is empty."""
    valid = target != ignore_label
    pred_fg, target_fg = (pred == 1) & valid, (target == 1) & valid
    union = int(np.count_nonzero(pred_fg | target_fg))
    return float(np.count_nonzero(pred_fg & target_fg)) / union if union else float("nan")


def _percent(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.1f}"


class EpisodePictures:
    """``on_batch`` hook of :func:`util.evaluation.evaluate_episodes`: draws the first
    ``num_episodes`` episodes it receives into ``out_dir`` (see the module docstring).

    Args:
        out_dir: where ``episode_<index>_<class>.png`` go (created on the first picture).
        num_episodes: how many episodes to draw.
        val_size: data.val_size (the evaluation canvas side).
        mean, std: data.mean / data.std (0..255), to un-normalise the images.
        class_name: class id -> name.
        panel_height: height of every panel, in pixels.
    """

    def __init__(self, out_dir: str | os.PathLike, *, num_episodes: int, val_size: int, mean: Sequence[float],
                 std: Sequence[float], class_name: Callable[[int], str], ignore_label: int = 255,
                 panel_height: int = 192) -> None:
        self.out_dir = Path(out_dir)
        self.num_episodes, self.val_size = int(num_episodes), int(val_size)
        self.mean, self.std = list(mean), list(std)
        self.class_name, self.ignore_label, self.panel_height = class_name, ignore_label, int(panel_height)
        self.written: list[Path] = []

    def __call__(self, batch: Mapping, outputs: Mapping, preds: Sequence[torch.Tensor]) -> None:
        """batch: a collated evaluation batch; outputs: the model's dict (``logits``, optional
        ``prompt_logits``: B x 2 x h x w); preds: B original-resolution predictions (side x side)."""
        for i in range(len(preds)):
            if len(self.written) >= self.num_episodes:
                return
            self.written.append(self.draw_episode(batch, outputs, preds, i))

    def draw_episode(self, batch: Mapping, outputs: Mapping, preds: Sequence[torch.Tensor], i: int) -> Path:
        """Draw sample ``i`` of the batch; returns the file written."""
        sizes = batch["query_ori_size"]
        h, w = (int(v) for v in sizes[i].tolist())
        new_h, new_w = resized_hw(h, w, self.val_size)
        ph = self.panel_height
        target = batch["query_label_ori"][i][:h, :w].cpu().numpy()
        final = preds[i][:h, :w].cpu().numpy()
        prompt = None
        if "prompt_logits" in outputs:
            prompt = predict_at_original_resolution(outputs["prompt_logits"][i:i + 1], sizes[i:i + 1])[0]
            prompt = prompt[:h, :w].cpu().numpy()
        class_id = int(batch["class_id"][i])
        episode = int(batch["episode"][i])
        name = self.class_name(class_id)

        panels = []
        support_imgs, support_masks = batch["support_imgs"][i], batch["support_masks"][i]
        shots = len(support_imgs)
        for k in range(shots):
            image = denormalise(support_imgs[k], self.mean, self.std)
            mask = support_masks[k].cpu().numpy()
            sh, sw = support_valid_hw(image, mask, self.val_size, self.ignore_label)
            image = resize_to_height(image[:sh, :sw], ph)
            mask = cv2.resize(mask[:sh, :sw].astype(np.uint8), image.shape[1::-1], interpolation=cv2.INTER_NEAREST)
            picture = overlay_mask(image, mask == 1, SUPPORT_COLOUR, ignore=mask == self.ignore_label)
            panels.append(captioned(picture, f"support {k + 1}/{shots}" if shots > 1 else "support"))

        query = resize_to_height(denormalise(batch["query_img"][i], self.mean, self.std)[:new_h, :new_w], ph)
        size = query.shape[1::-1]

        def at_panel(label_map: np.ndarray) -> np.ndarray:
            return cv2.resize(label_map.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)

        truth = at_panel(target)
        panels.append(captioned(overlay_mask(query, truth == 1, GROUND_TRUTH_COLOUR, ignore=truth == self.ignore_label),
                                "query + ground truth"))
        final_iou = episode_iou(final, target, self.ignore_label)
        title = f"episode {episode} | {name} | IoU {_percent(final_iou)}"
        if prompt is not None:
            prompt_iou = episode_iou(prompt, target, self.ignore_label)
            panels.append(captioned(overlay_mask(query, at_panel(prompt) == 1, PROMPT_COLOUR),
                                    f"RSP  IoU {_percent(prompt_iou)}"))
            title += f" (RSP {_percent(prompt_iou)})"
        panels.append(captioned(overlay_mask(query, at_panel(final) == 1, PREDICTION_COLOUR),
                                f"{'SAM-RSP' if prompt is not None else 'prediction'}  IoU {_percent(final_iou)}"))
        if "image_id" in batch:
            title += f" | query {batch['image_id'][i]}"
        body = hstack(panels)
        picture = vstack([text_strip(body.shape[1], title, height=26, scale=0.5), body])
        return write_png(self.out_dir / f"episode_{episode:04d}_{safe_name(name)}.png", picture)


def fold_class_name(cfg: Mapping) -> Callable[[int], str]:
    """Class id -> name for the config's dataset (custom datasets: the class folders)."""
    from util.config import resolve_path
    from util.dataset import custom_class_names
    from util.folds import make_fold
    data = cfg["data"]
    names = None
    if data["dataset"] == "custom" and not data["class_names"]:
        names = custom_class_names(resolve_path(data["root"], cfg))
    return make_fold(data, names).name


def episode_pictures_factory(cfg: Mapping, *, out_dir: str | os.PathLike,
                             num_episodes: int) -> Callable[[int], Optional[EpisodePictures]]:
    """``on_batch_factory`` for :func:`util.evaluation.run_test_protocol`: an
    :class:`EpisodePictures` for the first seed (index 0), nothing for the others."""
    data = cfg["data"]
    pictures = EpisodePictures(out_dir, num_episodes=num_episodes, val_size=data["val_size"], mean=data["mean"],
                               std=data["std"], class_name=fold_class_name(cfg), ignore_label=data["ignore_label"])
    return lambda seed_index: pictures if seed_index == 0 else None


def draw_class_iou_chart(results: Mapping, *, bar_width: int = 360) -> np.ndarray:
    """Horizontal bar chart (RGB) of a test's per-class IoU: for every class a bar of the final
    output (``results['class_iou']``) and, when present, one of the RSP
    (``results['prompt_class_iou']``), values in percent (mean over the seeds)."""
    final = dict(results["class_iou"])
    prompt = dict(results.get("prompt_class_iou") or {})
    names = list(final)
    series = [("SAM-RSP" if prompt else "final", final, PREDICTION_COLOUR, "miou_mean")]
    if prompt:
        series.insert(0, ("RSP", prompt, PROMPT_COLOUR, "prompt_miou_mean"))
    scale = 0.45
    bar_h, gap = 12, 10
    label_w = max(text_size(n, scale)[0] for n in names) + 16
    value_w = text_size("100.0", scale)[0] + 10
    row_h = bar_h * len(series) + gap
    title = (f"{results.get('dataset', '')} fold {results.get('split', '')}, {results.get('shot', '')}-shot: "
             f"per-class IoU (%), mean of {len(results.get('seeds', [])) or 1} seed(s)")
    top, bottom = 58, 26
    width = label_w + bar_width + value_w + 10
    height = top + row_h * len(names) + bottom
    chart = np.full((height, width, 3), 255, np.uint8)
    put_text(chart, title, (6, 18), fit_scale(title, width, 0.5))
    legend_x = 6
    for label, _, colour, mean_key in series:
        mean = results.get(mean_key)
        text = f"{label}" + (f" (mIoU {100 * mean:.1f})" if mean is not None else "")
        cv2.rectangle(chart, (legend_x, 30), (legend_x + 12, 42), colour, -1)
        put_text(chart, text, (legend_x + 18, 41), scale)
        legend_x += 18 + text_size(text, scale)[0] + 16
    x0 = label_w
    for tick in range(0, 101, 25):
        x = x0 + int(round(bar_width * tick / 100))
        cv2.line(chart, (x, top - 4), (x, height - bottom + 2), (225, 225, 225), 1)
        label = str(tick)
        put_text(chart, label, (x - text_size(label, 0.4)[0] // 2, height - 8), 0.4, (90, 90, 90))
    for row, name in enumerate(names):
        y = top + row * row_h
        put_text(chart, name, (label_w - 8 - text_size(name, scale)[0], y + (bar_h * len(series)) // 2 + 5), scale)
        for j, (_, values, colour, _) in enumerate(series):
            value = float(values.get(name, float("nan")))
            by = y + j * bar_h
            length = 0 if math.isnan(value) else max(1, int(round(bar_width * value)))
            if length:
                cv2.rectangle(chart, (x0, by), (x0 + length, by + bar_h - 2), colour, -1)
            put_text(chart, _percent(value), (x0 + length + 4, by + bar_h - 2), 0.38, (60, 60, 60))
    cv2.line(chart, (x0, top - 4), (x0, height - bottom + 2), (0, 0, 0), 1)
    return chart


def write_class_iou_chart(results: Mapping, path: str | os.PathLike) -> Path:
    """Draw :func:`draw_class_iou_chart` and write it as PNG (atomically)."""
    return write_png(path, draw_class_iou_chart(results))
