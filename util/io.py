"""Reading images and masks with errors that name the file."""
from __future__ import annotations

import os
import re
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError


_WORKER_HEADER = re.compile(r"\ACaught (?P<name>\w+) in DataLoader worker process \d+\.\nOriginal Traceback")


def worker_error_message(message: str) -> str:
    """The message of an exception raised in a DataLoader worker, without the worker's traceback.

    PyTorch re-raises a worker's exception in the main process as the same type built from one
    string (``torch._utils.ExceptionWrapper.reraise``): ``Caught DataError in DataLoader worker
    process 0.\nOriginal Traceback (most recent call last): ... util.io.DataError: <message>``.
    This returns ``<message>``; any other text is returned unchanged.
    """
    header = _WORKER_HEADER.match(message)
    if header is None:
        return message
    last = None
    for last in re.finditer(rf"^(?:[\w.]+\.)?{re.escape(header['name'])}: ", message, re.MULTILINE):
        pass
    return message if last is None else message[last.end():].rstrip("\n")


class DataError(RuntimeError):
    """A data file, list or directory is missing or invalid.

    Raised in a DataLoader worker, it reaches the main process with its own message (the one-line
    error naming the file), not with the worker's traceback: PyTorch rebuilds it there from the
    traceback text, which :func:`worker_error_message` reduces to the original message.
    """

    def __init__(self, *args) -> None:
        if len(args) == 1 and isinstance(args[0], str):
            args = (worker_error_message(args[0]),)
        super().__init__(*args)


def read_image(path: str | os.PathLike, config_key: str = "data.root") -> np.ndarray:
    """RGB image as float32 HxWx3 in 0..255 (as the original, read with OpenCV)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image not found: {path} (check the config key {config_key})")
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise DataError(f"cannot read image {path}: the file is corrupt or not an image")
    return np.float32(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))


def read_mask(path: str | os.PathLike, config_key: str = "data.root") -> np.ndarray:
    """Single-channel class-index mask as uint8 HxW.

    Accepts grayscale index PNGs (VOC SegmentationClassAug, COCO masks) and palette PNGs
    (VOC SegmentationClass), whose pixel values are palette indices. OpenCV's grayscale read
    would turn a palette image into luminance, so masks are read with PIL.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"mask not found: {path} (check the config key {config_key})")
    try:
        with Image.open(path) as img:
            mode = img.mode
            mask = np.array(img)
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"cannot read mask {path}: the file is corrupt or not an image ({err})") from None
    if mode not in ("L", "P", "I", "I;16", "1"):
        raise DataError(f"mask {path} has image mode {mode!r}; expected a single-channel class-index PNG "
                        "(grayscale or palette), values 0 = background, 1..N = classes, 255 = ignore")
    if mode == "1":
        mask = mask.astype(np.uint8)
    if mask.ndim != 2:
        raise DataError(f"mask {path} has shape {mask.shape}; expected a single channel")
    if mask.dtype != np.uint8:
        if mask.min() < 0 or mask.max() > 255:
            raise DataError(f"mask {path} has values outside 0..255 ({mask.min()}..{mask.max()})")
        mask = mask.astype(np.uint8)
    return mask


def read_pair(image_path: str | os.PathLike, mask_path: str | os.PathLike,
              config_key: str = "data.root") -> tuple[np.ndarray, np.ndarray]:
    """Image and mask, checked to have the same size."""
    image = read_image(image_path, config_key)
    mask = read_mask(mask_path, config_key)
    if image.shape[:2] != mask.shape:
        raise DataError(f"image and mask sizes differ: {image_path} is {image.shape[1]}x{image.shape[0]}, "
                        f"{mask_path} is {mask.shape[1]}x{mask.shape[0]} (width x height)")
    return image, mask
