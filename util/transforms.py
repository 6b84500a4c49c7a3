"""The original training and evaluation transforms (SPEC 3.4), for an image and any number of masks.

Every op takes ``(image, masks, rng)`` and returns ``(image, masks)``: ``image`` is float32
HxWx3 (RGB, 0..255) until :class:`ToTensor`, ``masks`` a list of uint8 HxW arrays that receive
the same geometry (nearest-neighbour, borders = ignore label). ``rng`` is a
``numpy.random.Generator``: the randomness of a sample is a pure function of its generator,
so an episode is reproducible whatever process or worker draws it.

The first mask is the *target*: the foreground-retaining crop counts its pixels equal to 1.
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
import torch

Masks = list


class Compose:
    def __init__(self, ops: Sequence):
        self.ops = list(ops)

    def __call__(self, image: np.ndarray, masks: Masks, rng: np.random.Generator | None = None):
        for op in self.ops:
            image, masks = op(image, masks, rng)
        return image, masks


class RandScale:
    """Resize by a factor drawn uniformly from ``scale_range`` (linear image, nearest masks)."""

    def __init__(self, scale_range: Sequence[float]):
        low, high = scale_range
        if not 0 < low <= high:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
        self.low, self.high = float(low), float(high)

    def __call__(self, image, masks, rng):
        scale = self.low + (self.high - self.low) * rng.random()
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
        masks = [cv2.resize(m, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST) for m in masks]
        return image, masks


class RandRotate:
    """With probability ``prob`` rotate about the centre by an angle from ``angle_range`` (degrees);
    image border = the pixel mean, mask border = ignore."""

    def __init__(self, angle_range: Sequence[float], prob: float, fill: Sequence[float], ignore_label: int = 255):
        self.low, self.high = float(angle_range[0]), float(angle_range[1])
        self.prob = prob
        self.fill = [float(v) for v in fill]
        self.ignore_label = ignore_label

    def __call__(self, image, masks, rng):
        if rng.random() < self.prob:
            angle = self.low + (self.high - self.low) * rng.random()
            h, w = image.shape[:2]
            matrix = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1)
            image = cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR,
                                   borderMode=cv2.BORDER_CONSTANT, borderValue=self.fill)
            masks = [cv2.warpAffine(m, matrix, (w, h), flags=cv2.INTER_NEAREST,
                                    borderMode=cv2.BORDER_CONSTANT, borderValue=self.ignore_label)
                     for m in masks]
        return image, masks


class RandBlur:
    """With probability ``prob`` a ``kernel`` x ``kernel`` Gaussian blur of the image only."""

    def __init__(self, prob: float, kernel: int = 5):
        self.prob, self.kernel = prob, kernel

    def __call__(self, image, masks, rng):
        if rng.random() < self.prob:
            image = cv2.GaussianBlur(image, (self.kernel, self.kernel), 0)
        return image, masks


class RandFlip:
    """Horizontal flip with probability ``prob``."""

    def __init__(self, prob: float):
        self.prob = prob

    def __call__(self, image, masks, rng):
        if rng.random() < self.prob:
            image = np.ascontiguousarray(image[:, ::-1])
            masks = [np.ascontiguousarray(m[:, ::-1]) for m in masks]
        return image, masks


class RandCrop:
    """Pad centrally to at least ``size`` (image: ``fill``, masks: ignore), then take a random
    ``size`` x ``size`` crop. While the crop keeps fewer than ``keep_fg`` of the target's
    foreground pixels (first mask == 1), the crop is re-drawn, at most ``redraws`` times (the
    original: 0.85 and 31)."""

    def __init__(self, size: int, fill: Sequence[float], ignore_label: int = 255,
                 keep_fg: float = 0.85, redraws: int = 31):
        self.size = int(size)
        self.fill = [float(v) for v in fill]
        self.ignore_label = ignore_label
        self.keep_fg, self.redraws = keep_fg, redraws

    def __call__(self, image, masks, rng):
        h, w = image.shape[:2]
        pad_h, pad_w = max(self.size - h, 0), max(self.size - w, 0)
        if pad_h or pad_w:
            top, left = pad_h // 2, pad_w // 2
            border = (top, pad_h - top, left, pad_w - left)
            image = cv2.copyMakeBorder(image, *border, cv2.BORDER_CONSTANT, value=self.fill)
            masks = [cv2.copyMakeBorder(m, *border, cv2.BORDER_CONSTANT, value=self.ignore_label)
                     for m in masks]
            h, w = image.shape[:2]
        total_fg = int(np.count_nonzero(masks[0] == 1)) if masks else 0
        for attempt in range(self.redraws + 1):
            top = int(rng.integers(0, h - self.size + 1))
            left = int(rng.integers(0, w - self.size + 1))
            window = (slice(top, top + self.size), slice(left, left + self.size))
            if not masks or np.count_nonzero(masks[0][window] == 1) >= self.keep_fg * total_fg:
                break
        image = np.ascontiguousarray(image[window])
        masks = [np.ascontiguousarray(m[window]) for m in masks]
        return image, masks


def resized_hw(height: int, width: int, size: int) -> tuple[int, int]:
    """The evaluation resize: long side -> ``size``, the other side scaled (truncated), then
    both floored to a multiple of 8 (the original ``Resize``)."""
    if height >= width:
        new_h, new_w = size, int(width * (size / height))
    else:
        new_h, new_w = int(height * (size / width)), size
    return new_h // 8 * 8, new_w // 8 * 8


class ValResize:
    """Evaluation resize: the image at the top-left of a ``size`` x ``size`` ZERO canvas (zero
    before normalisation, as the original), masks on a canvas of ignore label."""

    def __init__(self, size: int, ignore_label: int = 255):
        self.size, self.ignore_label = int(size), ignore_label

    def __call__(self, image, masks, rng=None):
        new_h, new_w = resized_hw(image.shape[0], image.shape[1], self.size)
        canvas = np.zeros((self.size, self.size, 3), np.float32)
        canvas[:new_h, :new_w] = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        out_masks = []
        for m in masks:
            padded = np.full((self.size, self.size), self.ignore_label, np.uint8)
            padded[:new_h, :new_w] = cv2.resize(m, (new_w, new_h), interpolation=cv2.INTER_NEAREST)
            out_masks.append(padded)
        return canvas, out_masks


class ToTensor:
    """Image -> normalised float 3xHxW tensor ``(x - mean) / std``; masks -> long HxW tensors."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image, masks, rng=None):
        tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32))
        tensor = (tensor - self.mean) / self.std
        return tensor, [torch.from_numpy(np.ascontiguousarray(m)).long() for m in masks]


def train_transform(*, crop_size: int, scale_range: Sequence[float], rotate_range: Sequence[float],
                    rotate_prob: float, blur_prob: float, flip_prob: float, mean: Sequence[float],
                    std: Sequence[float], ignore_label: int = 255, crop_keep_fg: float = 0.85,
                    crop_redraws: int = 31) -> Compose:
    """The original training pipeline, in its order: scale, rotate, blur, flip, crop, normalise."""
    return Compose([
        RandScale(scale_range),
        RandRotate(rotate_range, rotate_prob, fill=mean, ignore_label=ignore_label),
        RandBlur(blur_prob),
        RandFlip(flip_prob),
        RandCrop(crop_size, fill=mean, ignore_label=ignore_label, keep_fg=crop_keep_fg, redraws=crop_redraws),
        ToTensor(mean, std),
    ])


def val_transform(*, size: int, mean: Sequence[float], std: Sequence[float], ignore_label: int = 255) -> Compose:
    """The original evaluation pipeline: resize onto a zero canvas, normalise."""
    return Compose([ValResize(size, ignore_label), ToTensor(mean, std)])


def pad_label_square(label: np.ndarray, ignore_label: int = 255) -> np.ndarray:
    """Original-resolution scoring ("ori_resize"): the label at the top-left of a square of side
    max(h, w) filled with the ignore label."""
    h, w = label.shape
    side = max(h, w)
    square = np.full((side, side), ignore_label, np.uint8)
    square[:h, :w] = label
    return square
