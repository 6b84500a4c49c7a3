"""Segment your own images with a trained SAM-RSP: a Python predictor (predict.py is its CLI).

    from util.predictor import Predictor
    p = Predictor.from_config("config/pascal/pascal_split0_resnet50.yaml", weights="exp/.../best.pth")
    p.set_support(images, masks)                 # K RGB uint8 HxWx3 arrays and K HxW masks (K = data.shot)
    result = p.predict(query)                    # {'mask': HxW bool, 'prob': HxW float, 'prompt': HxW float}
    p.set_support(images2, masks2, name="cat")   # N-way: one support set per class name
    result = p.predict_nway(query, threshold=0.5)   # {'labels': HxW int, 'probs': NxHxW, 'names': [...]}

Exactly the evaluation's path: every image (support or query, any size and aspect ratio) goes
through the val transform (util.transforms.val_transform: resized to ``data.val_size`` on the
zero canvas, normalised with ``data.mean``/``data.std``), and the outputs are mapped back to the
query's original size as the test protocol scores them (logits upsampled bilinear,
align_corners, to the square of side max(h, w), then cropped to h x w;
util.metrics.predict_at_original_resolution for the mask).

Support features (``rspg.extract_support_features``) are computed ONCE per class, in
:meth:`Predictor.set_support`; the query's frozen features (SAM embedding, BAM backbone) once
per query, shared by all classes of :meth:`Predictor.predict_nway`.

Masks: H x W arrays. Foreground = any value other than 0 and 255 (``ignore_label``; kept as
ignore), or only ``class_value`` when given (``class_value=255`` turns a 0/255 mask into a
binary one); boolean masks: True = foreground.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence

import cv2
import numpy as np
import torch

from model import SAMRSP, build_model
from util.config import Config, load_config, resolve_path
from util.distributed import resolve_device
from util.metrics import predict_at_original_resolution, upsample_to_original_square
from util.transforms import resized_hw, val_transform

DEFAULT_CLASS = "object"


class PredictorError(ValueError):
    """An input of the predictor is invalid (names the argument or file and what was expected)."""


# ---------------------------------------------------------------------------------------------
# Input checks and conversions (shared with predict.py, which names files instead of arguments)
# ---------------------------------------------------------------------------------------------

def as_rgb_image(image, *, what: str = "image") -> np.ndarray:
    """An RGB picture as float32 H x W x 3 in 0..255 (what util.io.read_image returns).

    Accepts a uint8 or float (0..255) H x W x 3 array, or a PIL image. ``what`` names the
    input in errors.
    """
    try:
        from PIL import Image
        if isinstance(image, Image.Image):
            image = np.asarray(image.convert("RGB"))
    except ImportError:  # pragma: no cover - pillow is a dependency
        pass
    if not isinstance(image, np.ndarray):
        raise PredictorError(f"{what}: expected an RGB H x W x 3 numpy array (or a PIL image), "
                             f"got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise PredictorError(f"{what}: expected an RGB image of shape H x W x 3, got shape {image.shape}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise PredictorError(f"{what}: the image is empty (shape {image.shape})")
    if image.dtype == np.uint8:
        return image.astype(np.float32)
    if not np.issubdtype(image.dtype, np.floating):
        raise PredictorError(f"{what}: expected uint8 (or float 0..255) pixels, got {image.dtype}")
    if not np.isfinite(image).all():
        raise PredictorError(f"{what}: the image holds NaN or infinite values")
    return image.astype(np.float32)


def check_resizable(height: int, width: int, val_size: int, *, what: str = "image") -> None:
    """The evaluation resize (long side -> ``val_size``, both sides floored to multiples of 8)
    must leave at least 8 pixels on the short side."""
    new_h, new_w = resized_hw(height, width, val_size)
    if new_h < 8 or new_w < 8:
        raise PredictorError(f"{what} is {width}x{height} (width x height): too elongated for data.val_size="
                             f"{val_size}; its short side would be {min(new_h, new_w)} px after the resize "
                             f"(at least 8 needed)")


def binary_support_mask(label, *, class_value: Optional[int] = None, ignore_label: int = 255,
                        what: str = "mask") -> np.ndarray:
    """A support mask as the model takes it: uint8 H x W, 1 = foreground, 0 = background,
    ``ignore_label`` = ignore.

    label: H x W array (bool, or integer class indices / binary values; a PIL image is read as
    its pixel values, palette indices for palette PNGs). Foreground = any value other than 0
    and ``ignore_label`` (which stays ignore), or only ``class_value`` when given (then
    ``class_value == ignore_label`` means a 0/255 binary mask with no ignore). Raises
    :class:`PredictorError` when there is no foreground.
    """
    try:
        from PIL import Image
        if isinstance(label, Image.Image):
            label = np.asarray(label)
    except ImportError:  # pragma: no cover
        pass
    label = np.asarray(label)
    if label.ndim == 3 and label.shape[2] == 1:
        label = label[:, :, 0]
    if label.ndim != 2:
        raise PredictorError(f"{what}: expected a single-channel H x W mask, got shape {label.shape}")
    if label.dtype == bool:
        foreground, ignore = label, np.zeros_like(label)
    else:
        if not (np.issubdtype(label.dtype, np.integer) or np.issubdtype(label.dtype, np.floating)):
            raise PredictorError(f"{what}: expected integer or boolean mask values, got {label.dtype}")
        if class_value is None:
            foreground = (label != 0) & (label != ignore_label)
            ignore = label == ignore_label
        else:
            foreground = label == class_value
            ignore = (label == ignore_label) if class_value != ignore_label else np.zeros(label.shape, bool)
    if not foreground.any():
        values = np.unique(label)
        shown = ", ".join(str(v) for v in values[:12]) + (", ..." if len(values) > 12 else "")
        if class_value is None:
            rule = f"foreground = any value other than 0 and {ignore_label} ({ignore_label} = ignore)"
            if set(values.tolist()) <= {0, ignore_label} and ignore_label in values:
                rule += (f"; a 0/{ignore_label} binary mask marks its object as 'ignore': pass "
                         f"--class-value {ignore_label} (Python: class_value={ignore_label})")
        else:
            rule = f"foreground = value {class_value} (--class-value / class_value)"
        raise PredictorError(f"{what} has no foreground pixel (values: {shown}); {rule}")
    mask = foreground.astype(np.uint8)
    mask[ignore] = ignore_label
    return mask


def prepare_support(image, label, *, val_size: int, class_value: Optional[int] = None, ignore_label: int = 255,
                    image_name: str = "support image", mask_name: str = "support mask") -> tuple[np.ndarray, np.ndarray]:
    """Check one support pair and convert it: (float32 H x W x 3 RGB, uint8 H x W 0/1/ignore).

    Errors (:class:`PredictorError`, naming ``image_name`` / ``mask_name``): not an RGB image,
    not a single-channel mask, sizes differ, no foreground, an image too elongated for the
    resize, or a foreground too small to survive the resize to ``val_size``.
    """
    image = as_rgb_image(image, what=image_name)
    mask = binary_support_mask(label, class_value=class_value, ignore_label=ignore_label, what=mask_name)
    if image.shape[:2] != mask.shape:
        raise PredictorError(f"{mask_name} is {mask.shape[1]}x{mask.shape[0]} but {image_name} is "
                             f"{image.shape[1]}x{image.shape[0]} (width x height); a mask must have its image's size")
    check_resizable(*image.shape[:2], val_size, what=image_name)
    new_h, new_w = resized_hw(*image.shape[:2], val_size)
    resized = cv2.resize(mask, (new_w, new_h), interpolation=cv2.INTER_NEAREST)
    if not (resized == 1).any():
        raise PredictorError(f"{mask_name}: its {int((mask == 1).sum())} foreground pixel(s) vanish when the image "
                             f"is resized to data.val_size={val_size} ({new_w}x{new_h}); the object is too small")
    return image, mask


# ---------------------------------------------------------------------------------------------
# The predictor
# ---------------------------------------------------------------------------------------------

@dataclass
class EncodedQuery:
    """A query after the val transform and the frozen encoders (shared by every class).

    image: 1 x 3 x S x S normalised canvas; size: (h, w) original size; features: BAM's
    backbone features (``rspg.extract_query_features``); embedding: SAM's 1 x C x g x g.
    """

    image: torch.Tensor
    size: tuple[int, int]
    features: Dict[str, torch.Tensor]
    embedding: torch.Tensor


def probability_at_original_resolution(logits: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Foreground probability at original size, mapped back as the test scores: 1 x 2 x h' x w'
    logits upsampled (bilinear, align_corners) to the square of side max(h, w), soft-maxed over
    the 2 channels, cropped to h x w -> float32 H x W numpy array."""
    h, w = size
    return upsample_to_original_square(logits[:1], size).softmax(1)[0, 1, :h, :w].cpu().numpy()


class Predictor:
    """Few-shot segmentation of arbitrary images with a SAM-RSP model (module docstring).

    Args:
        model: a SAM-RSP model with its weights loaded (:func:`model.build_sam_rsp`); put in
            eval mode and on ``device``.
        cfg: its configuration (``data.val_size``, ``data.mean``, ``data.std``,
            ``data.ignore_label``; the number of shots K comes from the model, = ``data.shot``).
        device: where the model runs (``torch.device`` or a name such as ``"cpu"``, ``"cuda:0"``).

    Build it with :meth:`from_config` (config file + weights). Stage-``bam`` models (BAM
    alone) are not supported: test those with test.py.
    """

    def __init__(self, model: torch.nn.Module, cfg: Mapping, *, device: torch.device | str = "cpu") -> None:
        if not isinstance(model, SAMRSP):
            raise PredictorError(f"the Predictor runs a SAM-RSP model (train.stage=sam_rsp); got a "
                                 f"{type(model).__name__}. BAM alone (train.stage=bam) is not supported here: "
                                 f"evaluate it with test.py")
        data = cfg["data"]
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.val_size = int(data["val_size"])
        self.ignore_label = int(data["ignore_label"])
        self.shot = int(model.rspg.shot)
        self._transform = val_transform(size=self.val_size, mean=data["mean"], std=data["std"],
                                        ignore_label=self.ignore_label)
        self._supports: Dict[str, Dict[str, torch.Tensor]] = {}
        self.weights_report = None   # util.checkpoint.LoadReport when built by from_config / from_cfg

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: str | os.PathLike, *, weights: str | os.PathLike = "",
                    overrides: Sequence[str] = (), device: str = "") -> "Predictor":
        """Load ``config`` (with dotted ``key=value`` ``overrides``, as train.py/test.py) and the
        checkpoint ``weights`` (ours or an original SAM-RSP one; default: the config's
        ``weights`` key). ``device``: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` (default: the
        config's ``device`` key, itself ``auto`` by default).
        Raises util.config.ConfigError, util.checkpoint.CheckpointError or PredictorError."""
        cfg = load_config(config, list(overrides))
        return cls.from_cfg(cfg, weights=str(weights) if weights else "", device=device)

    @classmethod
    def from_cfg(cls, cfg: Config, *, weights: str = "", device: str = "") -> "Predictor":
        """:meth:`from_config` for an already loaded config (``weights``/``device`` default to
        the config's keys). Relative weight paths are taken from the project root, like test.py."""
        from util.checkpoint import load_weights
        weights = weights or cfg["weights"]
        if not weights:
            raise PredictorError("the predictor needs weights=PATH: a checkpoint of this project (best.pth of a "
                                 "sam_rsp run) or an original SAM-RSP checkpoint")
        if cfg["train"]["stage"] == "bam":
            raise PredictorError("train.stage=bam: the predictor runs SAM-RSP models only (train.stage=sam_rsp); "
                                 "evaluate a BAM checkpoint with test.py")
        model = build_model(cfg, "sam_rsp")
        report = load_weights(model, resolve_path(weights), require_complete=True)
        predictor = cls(model, cfg, device=resolve_device(device or cfg["device"]))
        predictor.weights_report = report
        return predictor

    # -- supports -----------------------------------------------------------------------------
    @property
    def class_names(self) -> List[str]:
        """The classes with a support set, in the order they were first set."""
        return list(self._supports)

    @torch.no_grad()
    def set_support(self, images: Sequence, masks: Sequence, *, name: str = DEFAULT_CLASS,
                    class_value: Optional[int] = None) -> None:
        """Set (or replace) the support set of class ``name``: K = data.shot images (RGB uint8
        H x W x 3, any sizes) and their masks (H x W; see the module docstring for values and
        ``class_value``). Their features are computed here, once, and reused for every query."""
        if not isinstance(name, str) or not name:
            raise PredictorError(f"name: a class name must be a non-empty string, got {name!r}")
        if len(images) != len(masks):
            raise PredictorError(f"class '{name}': {len(images)} support image(s) but {len(masks)} mask(s)")
        if len(images) != self.shot:
            raise PredictorError(
                f"class '{name}': {len(images)} support image(s), but the model is built for {self.shot} shot(s) "
                f"(data.shot={self.shot}); give {self.shot} per class, or pass data.shot={len(images)} "
                f"(with weights trained for {len(images)} shots)")
        tensors, mask_tensors = [], []
        for k, (image, label) in enumerate(zip(images, masks)):
            image, mask = prepare_support(image, label, val_size=self.val_size, class_value=class_value,
                                          ignore_label=self.ignore_label,
                                          image_name=f"support image {k} of class '{name}'",
                                          mask_name=f"support mask {k} of class '{name}'")
            tensor, (mask_tensor,) = self._transform(image, [mask])
            tensors.append(tensor)
            mask_tensors.append(mask_tensor)
        support_imgs = torch.stack(tensors)[None].to(self.device)        # 1 x K x 3 x S x S
        support_masks = torch.stack(mask_tensors)[None].to(self.device)  # 1 x K x S x S
        self._supports[name] = self.model.rspg.extract_support_features(support_imgs, support_masks)

    def remove_support(self, name: str) -> None:
        """Forget the support set of class ``name``."""
        if name not in self._supports:
            raise PredictorError(f"no support set named '{name}'; classes: {self.class_names}")
        del self._supports[name]

    def clear_supports(self) -> None:
        """Forget every support set."""
        self._supports.clear()

    # -- queries ------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_query(self, query, *, what: str = "query") -> EncodedQuery:
        """The query through the val transform and the frozen encoders (reusable for every class)."""
        image = as_rgb_image(query, what=what)
        height, width = image.shape[:2]
        check_resizable(height, width, self.val_size, what=what)
        tensor, _ = self._transform(image, [])
        tensor = tensor[None].to(self.device)                           # 1 x 3 x S x S
        return EncodedQuery(image=tensor, size=(height, width),
                            features=self.model.rspg.extract_query_features(tensor),
                            embedding=self.model.embed_query(tensor))

    @torch.no_grad()
    def forward(self, query: EncodedQuery, name: str) -> Dict[str, torch.Tensor]:
        """The model's outputs for ``query`` and the support set ``name``: ``logits`` and
        ``prompt_logits``, each 1 x 2 x S x S (on the canvas)."""
        if name not in self._supports:
            raise PredictorError(f"no support set named '{name}'; call set_support(images, masks, name='{name}') "
                                 f"first (classes: {self.class_names})")
        if self.model.training:   # someone switched the shared model to training mode: dropout would be on
            self.model.eval()
        return self.model(query.image, None, None, query_feats=query.features, query_embedding=query.embedding,
                          support_feats=self._supports[name])

    def _single_class(self, name: Optional[str]) -> str:
        if name is not None:
            return name
        if len(self._supports) == 1:
            return next(iter(self._supports))
        if not self._supports:
            raise PredictorError("no support set: call set_support(images, masks) before predict()")
        raise PredictorError(f"several support sets ({self.class_names}): pass name=... to predict(), "
                             f"or use predict_nway()")

    @torch.no_grad()
    def predict(self, query, *, name: Optional[str] = None) -> Dict[str, np.ndarray]:
        """Segment ``query`` (RGB H x W x 3) for class ``name`` (default: the only support set).

        Returns, at the query's original H x W: ``mask`` (bool, the prediction the test scores),
        ``prob`` (float32, foreground probability = softmax of the final logits) and ``prompt``
        (float32, the RSP's foreground probability = softmax of BAM's prompt).
        """
        name = self._single_class(name)
        encoded = self.encode_query(query)
        outputs = self.forward(encoded, name)
        sizes = torch.tensor([encoded.size])
        mask = predict_at_original_resolution(outputs["logits"], sizes)[0]
        h, w = encoded.size
        return {"mask": mask[:h, :w].bool().cpu().numpy(),
                "prob": probability_at_original_resolution(outputs["logits"], encoded.size),
                "prompt": probability_at_original_resolution(outputs["prompt_logits"], encoded.size)}

    @torch.no_grad()
    def predict_nway(self, query, *, threshold: float = 0.5, names: Optional[Sequence[str]] = None,
                     return_prompts: bool = False) -> Dict[str, object]:
        """Segment ``query`` into background + N classes (default: every support set, in order).

        One K-shot episode per class; per pixel the class with the highest foreground
        probability (softmax of its final logits, at original size) wins, background where
        that maximum is below ``threshold``. Returns ``labels`` (int32 H x W: 0 background,
        i = the i-th class), ``probs`` (float32 N x H x W) and ``names``; with
        ``return_prompts`` also ``prompts`` (float32 N x H x W, the RSPs' foreground probability).
        """
        if not 0.0 <= threshold <= 1.0:
            raise PredictorError(f"threshold must be in [0, 1], got {threshold}")
        names = list(names) if names is not None else self.class_names
        if not names:
            raise PredictorError("no support set: call set_support(images, masks, name=...) for each class first")
        encoded = self.encode_query(query)
        probs, prompts = [], []
        for name in names:
            outputs = self.forward(encoded, name)
            probs.append(probability_at_original_resolution(outputs["logits"], encoded.size))
            if return_prompts:
                prompts.append(probability_at_original_resolution(outputs["prompt_logits"], encoded.size))
        stacked = np.stack(probs)                                       # N x H x W
        labels = (stacked.argmax(0) + 1).astype(np.int32)
        labels[stacked.max(0) < threshold] = 0
        result: Dict[str, object] = {"labels": labels, "probs": stacked, "names": names}
        if return_prompts:
            result["prompts"] = np.stack(prompts)
        return result


# ---------------------------------------------------------------------------------------------
# FastSAM: refinement of the predictor's output, and an interactive segmenter (no support set)
# ---------------------------------------------------------------------------------------------

class FastSAMSegmenter:
    """FastSAM instance proposals of an image, selected by prompts (SPEC_FASTSAM 5.2 (a)).

        from util.predictor import FastSAMSegmenter
        seg = FastSAMSegmenter.from_cfg(cfg, weights="initmodel/FastSAM/FastSAM-s.pt")   # or FastSAMSegmenter(proposer)
        seg.set_image(image)                                           # RGB uint8 H x W x 3 (proposals cached)
        seg.predict(points=[[120, 80]], point_labels=[1])              # {'mask': H x W bool, 'indices': ..., ...}
        seg.predict(boxes=[[10, 20, 200, 180]])                        # x2 / y2 exclusive
        seg.refine(image, result["prob"], result["mask"])              # a Predictor's output refined

    Prompts select among the proposals (model/fastsam_select.py, ultralytics 8.4's rules): a box
    takes the proposal of highest mask-vs-box IoU (several boxes: the union); points keep every
    proposal holding a foreground point and no background point; with both, the points filter
    the proposals the boxes selected (ultralytics' order). ``refine`` is
    :func:`model.fastsam_select.select_by_mask` with the fallback to the model's own mask.

    Needs the optional extra (``pip install -r requirements-fastsam.txt``, AGPL-3.0) and a
    FastSAM weight file; both are checked when the segmenter is built
    (:class:`model.fastsam.FastSAMWeightsError`, :class:`model.fastsam.FastSAMUnavailable`).
    """

    def __init__(self, proposer, *, purity: float = 0.6, nested: float = 0.9, guard_iou: float = 0.5) -> None:
        self.proposer = proposer
        self.purity, self.nested, self.guard_iou = float(purity), float(nested), float(guard_iou)
        self._image: Optional[np.ndarray] = None
        self._proposals: Optional[Dict[str, torch.Tensor]] = None

    @classmethod
    def from_cfg(cls, cfg: Mapping, *, weights: str | os.PathLike = "", device: str = "") -> "FastSAMSegmenter":
        """Built from ``model.fastsam`` (``weights``: default ``model.fastsam.weights``, relative paths from
        the project root; ``device``: default the config's ``device``)."""
        from model.fastsam import FastSAMProposer, FastSAMWeightsError
        fs = cfg["model"]["fastsam"]
        weights = str(weights) if weights else fs["weights"]
        path = resolve_path(weights, cfg) if weights else ""
        try:
            proposer = FastSAMProposer(path, imgsz=fs["imgsz"], conf=fs["conf"], iou=fs["iou"],
                                       retina_masks=fs["retina_masks"], max_det=fs["max_det"],
                                       device=str(resolve_device(device or cfg["device"])), cache_mb=fs["cache_mb"])
        except FastSAMWeightsError:
            raise
        except ValueError as err:
            raise PredictorError(f"model.fastsam: {err}") from err
        return cls(proposer, purity=fs["purity"], nested=fs["nested"], guard_iou=fs["guard_iou"])

    @staticmethod
    def _uint8(image, what: str) -> np.ndarray:
        image = as_rgb_image(image, what=what)
        return np.clip(np.rint(image), 0, 255).astype(np.uint8)

    def proposals(self, image, *, what: str = "image") -> Dict[str, torch.Tensor]:
        """FastSAM's proposals of ``image`` (RGB H x W x 3) at its size (cached per image)."""
        return self.proposer.proposals(self._uint8(image, what))

    def set_image(self, image, *, what: str = "image") -> None:
        """The image the next :meth:`predict` calls select on (its proposals are computed here)."""
        self._image = self._uint8(image, what)
        self._proposals = self.proposer.proposals(self._image)

    def predict(self, *, points=None, point_labels=None, boxes=None) -> Dict[str, object]:
        """Select proposals of the image of :meth:`set_image` with ``points`` (P x 2 (x, y) pixels;
        ``point_labels`` 1 foreground / 0 background, default all 1) and / or ``boxes`` (B x 4
        (x1, y1, x2, y2), x2 / y2 exclusive). Returns ``mask`` (H x W bool numpy: the union of
        the selected proposals, all False when none is), ``indices`` (int64 numpy) and
        ``num_proposals``."""
        from model.fastsam_select import SelectionError, select_by_box, select_by_points, union_of
        if self._proposals is None:
            raise PredictorError("no image: call set_image(image) before predict()")
        if points is None and boxes is None:
            raise PredictorError("predict() needs points= and / or boxes=")
        masks, runs = self._proposals["masks"], self._proposals["runs"]
        try:
            indices = torch.arange(masks.shape[0])
            if boxes is not None:
                indices = select_by_box(masks, torch.as_tensor(boxes), runs=runs)
            if points is not None:
                kept = select_by_points(masks[indices], torch.as_tensor(points),
                                        None if point_labels is None else torch.as_tensor(point_labels))
                indices = indices[kept]
        except SelectionError as err:
            raise PredictorError(str(err)) from err
        mask = union_of(masks, indices, runs=runs)
        return {"mask": mask.cpu().numpy(), "indices": indices.cpu().numpy(), "num_proposals": int(masks.shape[0])}

    def refine(self, image, prob, mask=None, *, what: str = "query") -> Dict[str, object]:
        """A few-shot prediction refined by the proposals of ``image``: ``prob`` (H x W foreground
        probability, e.g. :meth:`Predictor.predict`'s ``prob``), ``mask`` (the model's own mask, default
        ``prob > 0.5``). Returns ``mask`` (H x W bool), ``fallback`` ("" when the proposals were
        taken, else why the model's mask was kept), ``indices`` and ``num_proposals``."""
        from model.fastsam_select import SelectionError, select_by_mask
        found = self.proposals(image, what=what)
        try:
            selection = select_by_mask(found["masks"], torch.as_tensor(np.asarray(prob, np.float32)), runs=found["runs"],
                                       model_mask=None if mask is None else torch.as_tensor(np.asarray(mask, bool)),
                                       purity=self.purity, nested=self.nested, guard_iou=self.guard_iou)
        except SelectionError as err:
            raise PredictorError(str(err)) from err
        return {"mask": selection.mask.cpu().numpy(), "fallback": selection.fallback,
                "indices": selection.indices.cpu().numpy(), "num_proposals": int(found["masks"].shape[0])}
