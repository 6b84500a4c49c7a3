"""FastSAM instance proposals (SPEC_FASTSAM), run by the OPTIONAL ``ultralytics`` extra.

    pip install -r requirements-fastsam.txt                       # the extra (ultralytics, AGPL-3.0)

    from model.fastsam import FastSAMProposer
    from model.fastsam_select import select_by_mask
    proposer = FastSAMProposer("initmodel/FastSAM/FastSAM-s.pt", device="cpu")
    out = proposer.proposals(image)        # RGB uint8 H x W x 3 -> masks N x H x W bool, boxes N x 4, scores N, runs
    refined = select_by_mask(out["masks"], prob, runs=out["runs"])   # prob: H x W, e.g. Predictor.predict()['prob']
    refined.mask                           # H x W bool; refined.fallback says why the model's own mask was kept

FastSAM (Zhao et al. 2023) = a one-class YOLOv8-seg that proposes every instance of an image;
prompts only select among the proposals (:mod:`model.fastsam_select`, plain torch). The paper's
inference settings ``imgsz=1024, conf=0.4, iou=0.9, retina_masks=True`` (max_det 300) are
this module's defaults and are always passed explicitly (ultralytics' own defaults differ:
640 / 0.25 / 0.7 / False).

LICENCE. ultralytics is AGPL-3.0 and the FastSAM weights must be treated as AGPL-3.0 as well
(SPEC_FASTSAM 2). This module is the ONLY one of the project that imports ultralytics, and
only inside :func:`import_ultralytics`, when a :class:`FastSAMProposer` is built: the rest of
the project neither needs nor loads it. Whoever distributes or serves (AGPL section 13) the
combination must comply with the AGPL for it. No ultralytics or FastSAM code is copied here,
and no weights are shipped: the user passes a path.

OFFLINE. Nothing is downloaded, ever (SPEC_FASTSAM 4.3):

* before the first ``import ultralytics`` the environment gets ``YOLO_OFFLINE=1`` (no
  connectivity probe, no analytics), ``YOLO_AUTOINSTALL=0`` and
  ``ULTRALYTICS_SKIP_REQUIREMENTS_CHECKS=1`` (no pip install of a missing requirement), and,
  unless already set, ``YOLO_CONFIG_DIR`` (where ultralytics writes its settings.json;
  default ``$XDG_CACHE_HOME/sam-rsp/ultralytics``, else ``~/.cache/sam-rsp/ultralytics``,
  instead of ``~/.config/Ultralytics``). If ultralytics was imported earlier by someone else,
  its module flags (ONLINE, AUTOINSTALL, analytics) are switched off as well;
* the weights path is checked (an existing ``.pt`` file) before ultralytics sees it: given a
  missing path whose name is an official asset (``FastSAM-s.pt``, even ``/nonexistent/FastSAM-x.pt``)
  ultralytics would fetch it from GitHub;
* the predictor never plots (no font download) and never uses text prompts (no CLIP install).

Weights: ``FastSAM-s.pt`` (YOLOv8s-seg, 12 M parameters) or ``FastSAM-x.pt`` (YOLOv8x-seg, 72 M),
from the FastSAM README
(https://github.com/CASIA-IVA-Lab/FastSAM#model-checkpoints) or the ultralytics assets release
(https://github.com/ultralytics/assets/releases/download/v8.4.0/FastSAM-s.pt); put them in
``initmodel/FastSAM/``. :func:`save_random_fastsam` writes a random-weight stand-in (tests,
benchmarks).

Speed (``python -m util.fastsam_bench``, 2-core CPU, random weights, 1024 x 1024 image): FastSAM-s
proposals 0.7-1.7 s with 0 proposals, 3-8 s with 300 (the retina-mask post-processing of 300
image-size masks dominates), against 14-29 s for segment-anything's ViT-B image encoder and
9.5-16 s for this codebase's SDPA one in the same process (ranges: machine load).
"""
from __future__ import annotations

import hashlib
import os
import re
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Optional, Union

import numpy as np
import torch

from model.fastsam_select import mask_runs
from util.checkpoint import CheckpointError

PathLike = Union[str, os.PathLike]

EXTRA_FILE = "requirements-fastsam.txt"
INSTALL_HINT = f"pip install -r {EXTRA_FILE}"
WEIGHTS_HINT = ("FastSAM weights are FastSAM-s.pt or FastSAM-x.pt: get them from the FastSAM README "
                "(https://github.com/CASIA-IVA-Lab/FastSAM#model-checkpoints) or the ultralytics assets release "
                "(https://github.com/ultralytics/assets/releases/download/v8.4.0/FastSAM-s.pt) and put them in "
                "initmodel/FastSAM/; nothing is downloaded at run time")
# The environment switches set before ultralytics is imported (SPEC_FASTSAM 4.3).
OFFLINE_ENVIRONMENT = {"YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "0", "ULTRALYTICS_SKIP_REQUIREMENTS_CHECKS": "1"}
# File names ultralytics silently renames to a "u" model (and would download): refused.
_RENAMED_BY_ULTRALYTICS = re.compile(r"yolov5[nsmlx]6?\.pt|yolov3(-tiny|-spp)?\.pt")


class FastSAMUnavailable(ImportError):
    """The optional FastSAM extra (ultralytics) is not installed or cannot be imported."""


class FastSAMWeightsError(CheckpointError):
    """The FastSAM weight file is missing, not a ``.pt`` file or not loadable (names the file)."""


class FastSAMInputError(ValueError):
    """An image given to :meth:`FastSAMProposer.proposals` is not an RGB uint8 H x W x 3 array."""


# ---------------------------------------------------------------------------------------------
# The lazy, offline import
# ---------------------------------------------------------------------------------------------

def default_config_dir() -> Path:
    """Where ultralytics writes its settings.json unless ``YOLO_CONFIG_DIR`` is set."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "sam-rsp" / "ultralytics"


def undo_global_patches() -> None:
    """Undo what importing ultralytics changes for the whole process: it replaces ``PIL.Image.open``
    (a file Pillow cannot identify then triggers ``check_requirements("pi-heif")``, an install
    attempt, instead of ``UnidentifiedImageError``) and ``torch.save``. The rest of the project
    relies on both behaving as documented (a corrupt mask is a DataError naming the file), so the
    originals, which ultralytics keeps, are put back. A no-op when ultralytics is not imported."""
    patches = sys.modules.get("ultralytics.utils.patches")
    if patches is None:
        return
    from PIL import Image
    if getattr(patches, "_image_open", None) is not None and Image.open is getattr(patches, "image_open", None):
        Image.open = patches._image_open
    if getattr(patches, "_torch_save", None) is not None and torch.save is getattr(patches, "torch_save", None):
        torch.save = patches._torch_save


def _switch_off_network() -> None:
    """Module flags for an ultralytics imported before our environment was set (no-ops otherwise)."""
    utils = sys.modules.get("ultralytics.utils")
    checks = sys.modules.get("ultralytics.utils.checks")
    events = sys.modules.get("ultralytics.utils.events")
    for module, name in ((utils, "ONLINE"), (checks, "ONLINE"), (utils, "AUTOINSTALL"), (checks, "AUTOINSTALL")):
        if module is not None and hasattr(module, name):
            setattr(module, name, False)
    if events is not None and hasattr(getattr(events, "events", None), "enabled"):
        events.events.enabled = False


def import_ultralytics(config_dir: Optional[PathLike] = None):
    """Import ultralytics offline (module docstring) and return the module.

    config_dir: ``YOLO_CONFIG_DIR`` for ultralytics' settings (default: keep the environment's,
    else :func:`default_config_dir`); only effective before the first import in the process.
    Raises :class:`FastSAMUnavailable` (an ImportError) naming ``pip install -r
    requirements-fastsam.txt`` when the extra is missing.
    """
    os.environ.update(OFFLINE_ENVIRONMENT)
    if config_dir is not None:
        os.environ["YOLO_CONFIG_DIR"] = str(Path(config_dir).expanduser())
    else:
        os.environ.setdefault("YOLO_CONFIG_DIR", str(default_config_dir()))
    try:
        import ultralytics
        from ultralytics import FastSAM  # noqa: F401  (checks the extra is complete)
    except ImportError as err:
        raise FastSAMUnavailable(
            f"FastSAM needs the optional extra: {INSTALL_HINT} (installs ultralytics, licensed AGPL-3.0); "
            f"importing it failed: {err}") from err
    _switch_off_network()
    undo_global_patches()
    return ultralytics


def check_weights(weights: PathLike) -> Path:
    """The FastSAM weight file as an absolute path, checked BEFORE ultralytics sees it: an
    existing file with the ``.pt`` suffix. Raises :class:`FastSAMWeightsError` naming it."""
    if weights is None or str(weights) == "":
        raise FastSAMWeightsError(f"no FastSAM weight file given; {WEIGHTS_HINT}")
    path = Path(weights).expanduser()
    if path.suffix.lower() != ".pt":
        raise FastSAMWeightsError(f"FastSAM weights must be an ultralytics .pt checkpoint, got {path} (suffix "
                                  f"'{path.suffix}'); {WEIGHTS_HINT}")
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "not found"
        raise FastSAMWeightsError(f"FastSAM weight file {what}: {path}; {WEIGHTS_HINT}")
    if _RENAMED_BY_ULTRALYTICS.fullmatch(path.name):
        raise FastSAMWeightsError(f"FastSAM weight file {path}: ultralytics replaces this file name by a "
                                  f"'u' model it would download; rename the file (e.g. FastSAM-s.pt)")
    return path.resolve()


def save_random_fastsam(path: PathLike, *, size: str = "s", seed: int = 0, reg_max: int = 26,
                        class_bias: Optional[float] = None, config_dir: Optional[PathLike] = None) -> Path:
    """Write a RANDOM-weight FastSAM checkpoint that ultralytics loads like the real one (tests,
    benchmarks; SPEC_FASTSAM 4.2). Nothing is downloaded: the architecture is ultralytics'
    packaged ``yolov8{size}-seg.yaml`` with one class and ``reg_max`` (26, FastSAM's), seeded.

    The file is ``{"model": SegmentationModel, "train_args": {"task": "segment", ...}}`` (the
    task must be in ``train_args``: ultralytics reads it there and would take the model for a
    detector otherwise). With stock initialisation the class scores are about 1e-3, so conf
    0.4 gives NO proposal; ``class_bias`` (e.g. 5.0) overwrites the class logits' bias so that
    every anchor scores high and max_det (300) proposals come out.
    """
    import_ultralytics(config_dir)
    from ultralytics.nn.tasks import SegmentationModel, yaml_model_load

    if size not in {"n", "s", "m", "l", "x"}:
        raise ValueError(f"size must be one of n, s, m, l, x (FastSAM-s = s, FastSAM-x = x), got {size!r}")
    cfg = yaml_model_load(f"yolov8{size}-seg.yaml")
    cfg["nc"], cfg["reg_max"] = 1, int(reg_max)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = SegmentationModel(cfg, ch=3, nc=1, verbose=False)
    finally:
        torch.random.set_rng_state(state)
    if class_bias is not None:
        with torch.no_grad():
            for branch in model.model[-1].cv3:
                branch[-1].bias.fill_(float(class_bias))
    model.names = {0: "object"}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model, "train_args": {"task": "segment", "imgsz": 1024, "single_cls": True}}, path)
    return path


# ---------------------------------------------------------------------------------------------
# The proposer
# ---------------------------------------------------------------------------------------------

def _check_image(image) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise FastSAMInputError(f"image: expected an RGB uint8 H x W x 3 numpy array, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise FastSAMInputError(f"image: expected an RGB uint8 H x W x 3 array, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise FastSAMInputError(f"image: expected uint8 pixels (0..255), got {image.dtype}")
    return np.ascontiguousarray(image)


def _check_fraction(value: float, name: str) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


class FastSAMProposer:
    """FastSAM's instance proposals of an image, cached per image (module docstring).

    Args:
        weights: the FastSAM ``.pt`` file (checked before ultralytics sees it).
        imgsz: network input size (long side; letterboxed to a multiple of 32). Paper: 1024.
        conf: confidence threshold. Paper: 0.4.
        iou: NMS IoU threshold (0.9 keeps nested part / whole masks). Paper: 0.9.
        retina_masks: masks computed at the image's size (True, the paper's) or at the network's
            input size and then resized to the image's size (False; cheaper, coarser).
        max_det: most proposals kept per image (ultralytics' default, 300).
        device: ``cpu`` | ``cuda`` | ``cuda:N`` | ``auto``.
        cache_mb: memory bound of the per-image cache (least recently used entries go first;
            0 disables it). A 300-proposal 1024 x 1024 image takes about 300 MB.
        config_dir: ultralytics' settings directory (:func:`import_ultralytics`).

    Raises :class:`FastSAMWeightsError` (missing / non-``.pt`` / unloadable file, naming it)
    and :class:`FastSAMUnavailable` (the extra is not installed).
    """

    def __init__(self, weights: PathLike, *, imgsz: int = 1024, conf: float = 0.4, iou: float = 0.9,
                 retina_masks: bool = True, max_det: int = 300, device: Union[str, torch.device] = "cpu",
                 cache_mb: float = 1024.0, config_dir: Optional[PathLike] = None) -> None:
        from util.distributed import resolve_device

        self.weights = check_weights(weights)
        if int(imgsz) != imgsz or imgsz < 32:
            raise ValueError(f"imgsz must be an integer >= 32, got {imgsz}")
        if int(max_det) != max_det or max_det < 1:
            raise ValueError(f"max_det must be an integer >= 1, got {max_det}")
        if cache_mb < 0:
            raise ValueError(f"cache_mb must be >= 0, got {cache_mb}")
        self.imgsz, self.max_det = int(imgsz), int(max_det)
        self.conf = _check_fraction(conf, "conf")
        self.iou = _check_fraction(iou, "iou")
        self.retina_masks = bool(retina_masks)
        self.device = resolve_device(str(device))
        self.cache_bytes = int(cache_mb * (1 << 20))
        self._ultralytics = import_ultralytics(config_dir)
        try:
            self._model = self._ultralytics.FastSAM(str(self.weights))
        except Exception as err:   # ultralytics raises TypeError / RuntimeError / AttributeError for bad files
            raise FastSAMWeightsError(f"cannot load FastSAM weights {self.weights}: {type(err).__name__}: {err}; "
                                      f"{WEIGHTS_HINT}") from err
        if getattr(self._model, "task", None) != "segment":
            raise FastSAMWeightsError(f"{self.weights} is a '{getattr(self._model, 'task', None)}' model, not a "
                                      f"FastSAM (segment) checkpoint; {WEIGHTS_HINT}")
        self._cache: "OrderedDict[str, Dict[str, torch.Tensor]]" = OrderedDict()
        self._cached_bytes = 0
        self.network_calls = 0
        self.cache_hits = 0

    @property
    def settings(self) -> Dict[str, object]:
        """The predict() arguments passed to ultralytics for every image."""
        return {"imgsz": self.imgsz, "conf": self.conf, "iou": self.iou, "retina_masks": self.retina_masks,
                "max_det": self.max_det, "device": str(self.device), "verbose": False,
                "save": False}

    def clear_cache(self) -> None:
        """Forget every cached image."""
        self._cache.clear()
        self._cached_bytes = 0

    @staticmethod
    def image_key(image: np.ndarray) -> str:
        """The cache key of an image: sha256 of its shape and bytes."""
        digest = hashlib.sha256(repr(image.shape).encode())
        digest.update(memoryview(np.ascontiguousarray(image)).cast("B"))
        return digest.hexdigest()

    @torch.no_grad()
    def proposals(self, image: np.ndarray) -> Dict[str, torch.Tensor]:
        """FastSAM's proposals of an RGB uint8 H x W x 3 image, at the image's size, on the CPU:

        * ``masks``: N x H x W bool (N = 0 when nothing reaches ``conf``);
        * ``boxes``: N x 4 float32 (x1, y1, x2, y2) pixels, after ultralytics' full-image box
          snap (SPEC_FASTSAM 1.1; the masks stay cropped to the raw predicted box);
        * ``scores``: N float32, the box confidences (sorted descending);
        * ``runs``: R x 4 int64, :func:`model.fastsam_select.mask_runs` of the masks (pass it to
          the selection functions as ``runs=``: selection then costs milliseconds).

        The network runs once per distinct image: a repeated image (same bytes and shape) is
        served from the in-memory cache. Treat the returned tensors as read-only (they are the
        cached ones).
        """
        image = _check_image(image)
        key = self.image_key(image)
        if key in self._cache:
            self._cache.move_to_end(key)
            self.cache_hits += 1
            return dict(self._cache[key])
        result = self._predict(image)
        self._store(key, result)
        return dict(result)

    def _predict(self, image: np.ndarray) -> Dict[str, torch.Tensor]:
        height, width = image.shape[:2]
        bgr = np.ascontiguousarray(image[:, :, ::-1])      # ultralytics reads numpy images as BGR (OpenCV)
        results = self._model.predict(bgr, **self.settings)
        self.network_calls += 1
        result = results[0]
        if result.masks is None or len(result) == 0:
            masks = torch.zeros(0, height, width, dtype=torch.bool)
            boxes = torch.zeros(0, 4, dtype=torch.float32)
            scores = torch.zeros(0, dtype=torch.float32)
        else:
            masks = result.masks.data
            if tuple(masks.shape[1:]) != (height, width):     # retina_masks=False: input-size masks
                from ultralytics.utils.ops import scale_masks
                masks = scale_masks(masks[None].float(), (height, width))[0] > 0.5
            masks = masks.bool().cpu().contiguous()
            boxes = result.boxes.xyxy.float().cpu().clone()
            scores = result.boxes.conf.float().cpu().clone()
        return {"masks": masks, "boxes": boxes, "scores": scores, "runs": mask_runs(masks)}

    @staticmethod
    def _entry_bytes(result: Dict[str, torch.Tensor]) -> int:
        """The bytes an entry holds (its tensors, plus 1 KiB for the key and bookkeeping, so that
        even 0-proposal entries count)."""
        return 1024 + sum(t.numel() * t.element_size() for t in result.values())

    def _store(self, key: str, result: Dict[str, torch.Tensor]) -> None:
        size = self._entry_bytes(result)
        if size > self.cache_bytes:          # also: cache_mb=0 disables the cache
            return
        while self._cache and self._cached_bytes + size > self.cache_bytes:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= self._entry_bytes(old)
        self._cache[key] = result
        self._cached_bytes += size
