"""Load weights into the models, strictly, from every official checkpoint and from ours.

:func:`load_weights` (``model``, ``path``) detects the file's format from its keys and loads it,
without conversion scripts, into the right part of the model:

=====================  ==========================================================  ==========================
format                 file                                                        loads into
=====================  ==========================================================  ==========================
``sam_rsp_original``   SAM-RSP train.py ``{'state_dict', 'epoch'}``: ``Bam.*``,     SAMRSP
                       ``feature_extractor.*``, ``init_merge.0``, ``blocks.*``, ...
``bam_original``       BAM ``{'state_dict'}``: ``layer*``, ``learner_base.*``,      BAM, SAMRSP.rspg
                       ``down_query``, ...
``sccan_original``     SCCAN ``{'epoch', 'state_dict', 'optimizer',                  SCCAN, SAMRSP.rspg
                       'optimizer_swin'}``: ``backbone.body.*``, ``down_query``,    (an SCCAN)
                       ``transformer.layers.0.blocks.*``, ... (optimisers ignored)
``pspnet``             PSPNet ``best.pth``: ``layer0..4.*`` (and the same tensors   PSPNet; BAM / SAMRSP.rspg
                       again as ``encoder.{0..4}.*``), ``ppm.*``, ``cls.*``         backbone + learner_base
``sam``                SAM ``sam_vit_*.pth``: ``image_encoder.*`` (+ prompt          SAMRSP.image_encoder,
                       encoder and mask decoder, ignored)                           ImageEncoderViT
``imagenet_resnet``    deep-stem ``resnet50_v2.pth`` / ``resnet101_v2.pth``          the backbone (``layer0..4``;
                                                                                   SCCAN: ``backbone.body``)
``imagenet_vgg``       torchvision ``vgg16_bn.pth`` (``features.N.*``)              the backbone (``layer0..4``)
``sam-rsp/1``          ours: ``{"format", "model", "frozen", ...}``                  the model it was saved from
``cat_sam``            official CAT-SAM ``{'model': sd}`` or bare (``ori_sam.*``,     CATSAM (variant and SAM
                       aliases checked equal); SAM ``sam_vit_*.pth`` -> its         size checked by name;
                       frozen SAM: util/cat_sam_checkpoint.py                       util/cat_sam_checkpoint.py)
=====================  ==========================================================  ==========================

Every file may carry the ``module.`` prefix of a DistributedDataParallel model. Every rename lives
in :data:`RENAMES` (and the ignored keys in :data:`IGNORED`). After renaming, a missing or
unexpected key or a shape mismatch is a :class:`CheckpointError` listing the keys grouped by
prefix and naming the file. (Missing ``num_batches_tracked`` counters of files written before
PyTorch 0.4.1 are tolerated.) Files are always read with
``torch.load(path, map_location="cpu", weights_only=True)``.

Our checkpoints store only the trainable part (:func:`trainable_state_dict`) and name the files
the frozen parts come from, with their sha256 (:func:`sha256_file`), e.g.::

    {"format": "sam-rsp/1",
     "model": trainable_state_dict(model),
     "frozen": [{"prefix": "rspg.", "path": "initmodel/BAM/.../best.pth", "sha256": "..."},
                {"prefix": "image_encoder.", "path": "initmodel/SAM/sam_vit_l_0b3195.pth", "sha256": "..."}],
     "epoch": ..., "optimizer": ...}                  # other keys are ignored here

:func:`load_pretrained_parts` loads, for a training stage, the pretrained parts named by the
config (and returns the files loaded, to reference under ``"frozen"``); each file must fill the
whole part the stage declares in :data:`REQUIRED_KEYS`, or it is refused (never a silently random
prompt generator). For training runs,
:func:`checkpoint_payload` builds such a checkpoint (plus ``stage``, ``optimizer``,
``train_state``, ``rng``, ``config``), :func:`save_checkpoint` writes it atomically,
:func:`read_checkpoint` / :func:`restore_training_weights` / :func:`restore_rng_state` resume
from it. ``load_weights(model, path, require_complete=True)`` insists that the file fills the
whole model (testing a checkpoint), and a stage-``bam`` checkpoint of ours loaded into a SAMRSP
goes to its ``rspg``.
"""
from __future__ import annotations

import hashlib
import random
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from segment_anything.modeling.image_encoder import ImageEncoderViT

from model.backbone import LAYER_NAMES, VGG16_CUTS, ResNetBackbone, VGGBackbone
from model.bam import BAM
from model.cat_sam import CATSAM, VARIANT_NAMES as CAT_SAM_VARIANT_NAMES, sam_size_name
from model.pspnet import PSPNet
from model.sccan import SCCAN
from model.sam_encoder import SAM_CHECKPOINT_NAMES
from model.sam_rsp import SAMRSP
from util.atomic import write_atomic
from util.config import PROJECT_ROOT, resolve_path

FORMAT_VERSION = "sam-rsp/1"
MAX_LINES = 25  # per category in an error message


class CheckpointError(ValueError):
    """A weight file is missing, unreadable, of an unknown format, or does not fit the model."""


# ---------------------------------------------------------------------------------------------
# The format table: descriptions, renames, ignored keys, targets.
# ---------------------------------------------------------------------------------------------

FORMATS: Dict[str, str] = {
    "sam_rsp_original": "an original SAM-RSP checkpoint {'state_dict'} (keys Bam.*, feature_extractor.*, "
                        "init_merge.0, blocks.*, inner_cls.*, beta_conv.*, res2.*, cls.*)",
    "bam_original": "an original BAM checkpoint {'state_dict'} (keys layer0..4.*, learner_base.*, down_query.*, "
                    "down_supp.*, init_merge.*, ASPP_meta.*, ..., gram_merge, cls_merge[, kshot_rw])",
    "sccan_original": "an original SCCAN checkpoint {'epoch', 'state_dict', 'optimizer', 'optimizer_swin'} (keys "
                      "backbone.body.*, down_query.*, down_supp.*, init_merge_query.*, init_merge_supp.*, "
                      "transformer.layers.0.blocks.*, ASPP_meta.*, res1_meta.*, res2_meta.*, cls_meta.*)",
    "pspnet": "a PSPNet base-learner best.pth {'state_dict'} (keys layer0..4.*, encoder.0..4.*, ppm.*, cls.*)",
    "sam": "a SAM checkpoint sam_vit_{b,l,h}_*.pth (keys image_encoder.*, prompt_encoder.*, mask_decoder.*)",
    "imagenet_resnet": "a deep-stem ImageNet ResNet resnet50_v2.pth / resnet101_v2.pth "
                       "(keys conv1..3, bn1..3, layer1..4, fc)",
    "imagenet_vgg": "an ImageNet vgg16_bn.pth (keys features.N.*, classifier.*)",
    FORMAT_VERSION: "a checkpoint of this project {'format': 'sam-rsp/1', 'model', 'frozen', ...}",
    "cat_sam": "an official CAT-SAM checkpoint {'model': state_dict} or its bare state dict (keys ori_sam.*, "
               "image_encoder.*, prompt_encoder.*, mask_decoder.*; into a CATSAM only)",
}

_RESNET_STEM = (("conv1.", "layer0.0."), ("bn1.", "layer0.1."), ("conv2.", "layer0.3."),
                ("bn2.", "layer0.4."), ("conv3.", "layer0.6."), ("bn3.", "layer0.7."))
# torchvision's features.N -> layer k, local index j (see model.backbone.VGG16_CUTS).
_VGG_FEATURES = tuple((f"features.{start + j}.", f"{LAYER_NAMES[k]}.{j}.")
                      for k, (start, stop) in enumerate(VGG16_CUTS) for j in range(stop - start))

#: (format, kind of target) -> (checkpoint prefix, our prefix) pairs; the first matching pair
#: renames a key, a key matching none keeps its name.
RENAMES: Dict[Tuple[str, str], Tuple[Tuple[str, str], ...]] = {
    ("sam_rsp_original", "SAMRSP"): (("Bam.", "rspg."), ("feature_extractor.", "image_encoder."), ("", "decoder.")),
    ("bam_original", "BAM"): (),
    ("sccan_original", "SCCAN"): (),
    ("pspnet", "PSPNet"): (),
    ("pspnet", "BAM"): (("ppm.", "learner_base.0."), ("cls.", "learner_base.1.")),
    ("sam", "ImageEncoderViT"): (("image_encoder.", ""),),
    ("imagenet_resnet", "backbone"): _RESNET_STEM,
    ("imagenet_resnet", "sccan_backbone"): (("", "backbone.body."),),
    ("imagenet_vgg", "backbone"): _VGG_FEATURES,
}

#: format -> checkpoint prefixes deliberately not loaded (reported).
IGNORED: Dict[str, Tuple[str, ...]] = {
    "pspnet": ("encoder.",),                          # the same tensors as layer0..4
    "sam": ("prompt_encoder.", "mask_decoder.", "pixel_mean", "pixel_std"),   # SAM-RSP uses only the image encoder
    "imagenet_resnet": ("fc.",),
    "imagenet_vgg": ("classifier.",),
}

#: (format, kind) -> key suffixes deliberately not loaded (reported): SCCAN's FrozenBatchNorm2d
#: has no ``num_batches_tracked`` counter; one in the file is dropped (SPEC_SCCAN 2.1).
IGNORED_SUFFIXES: Dict[Tuple[str, str], Tuple[str, ...]] = {
    ("sccan_original", "SCCAN"): ("num_batches_tracked",),
    ("imagenet_resnet", "sccan_backbone"): ("num_batches_tracked",),
}

_BACKBONE_KEYS = tuple(name + "." for name in LAYER_NAMES)

#: (format, kind) -> prefixes of the target's keys the file must fill (default: all of them).
SCOPES: Dict[Tuple[str, str], Tuple[str, ...]] = {
    ("pspnet", "BAM"): _BACKBONE_KEYS + ("learner_base.",),
    ("imagenet_resnet", "backbone"): _BACKBONE_KEYS,
    ("imagenet_resnet", "sccan_backbone"): ("backbone.body.",),
    ("imagenet_vgg", "backbone"): _BACKBONE_KEYS,
}

_BACKBONE_OWNERS = (PSPNet, BAM, ResNetBackbone, VGGBackbone)

#: format -> ((model class(es), submodule path, kind of target), ...): where the file goes.
TARGETS = {
    "sam_rsp_original": (((SAMRSP,), "", "SAMRSP"),),
    "bam_original": (((BAM,), "", "BAM"), ((SAMRSP,), "rspg", "BAM")),
    "sccan_original": (((SCCAN,), "", "SCCAN"), ((SAMRSP,), "rspg", "SCCAN")),
    "pspnet": (((PSPNet,), "", "PSPNet"), ((BAM,), "", "BAM"), ((SAMRSP,), "rspg", "BAM")),
    "sam": (((SAMRSP,), "image_encoder", "ImageEncoderViT"), ((ImageEncoderViT,), "", "ImageEncoderViT")),
    "imagenet_resnet": ((_BACKBONE_OWNERS, "", "backbone"), ((SAMRSP,), "rspg", "backbone"),
                        ((SCCAN,), "", "sccan_backbone"), ((SAMRSP,), "rspg", "sccan_backbone")),
    "imagenet_vgg": ((_BACKBONE_OWNERS, "", "backbone"), ((SAMRSP,), "rspg", "backbone")),
}

#: kind of target -> the prompt generator a SAMRSP must have for it (``SAMRSP.rspg`` is a BAM or an
#: SCCAN): a BAM file does not go into a SAM-RSP over an SCCAN, nor an SCCAN file into one over a BAM.
RSPG_CLASSES: Dict[str, type] = {"SAMRSP": BAM, "BAM": BAM, "backbone": BAM, "SCCAN": SCCAN, "sccan_backbone": SCCAN}


# ---------------------------------------------------------------------------------------------
# Reports and errors
# ---------------------------------------------------------------------------------------------

@dataclass
class LoadReport:
    """What :func:`load_weights` did. ``loaded``: keys of the model passed in that received
    values; ``ignored``: checkpoint keys deliberately skipped; ``parts``: nested loads (frozen
    parts of our checkpoints); ``stage``: the training stage recorded in one of our checkpoints."""

    path: str
    format: str
    target: str
    loaded: List[str] = field(default_factory=list)
    ignored: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    parts: List["LoadReport"] = field(default_factory=list)
    stage: Optional[str] = None

    def summary(self) -> str:
        """One line: format, target, counts."""
        text = f"{self.format} -> {self.target}: {len(self.loaded)} tensors"
        if self.ignored:
            text += f", {len(self.ignored)} ignored"
        if self.parts:
            text += "; frozen parts: " + "; ".join(p.summary() for p in self.parts)
        return text

    def __str__(self) -> str:
        lines = [f"{self.path}: {self.format} -> {self.target}: {len(self.loaded)} tensors loaded"]
        if self.ignored:
            groups = ", ".join(f"{g} ({n})" for g, n in _group_keys(self.ignored, self.ignored))
            lines.append(f"  ignored {len(self.ignored)} keys (deliberately): {groups}")
        lines += [f"  {note}" for note in self.notes]
        for part in self.parts:
            lines += ["  " + line for line in str(part).splitlines()]
        return "\n".join(lines)


def _group_keys(bad: Iterable[str], universe: Iterable[str]) -> List[Tuple[str, int]]:
    """Group ``bad`` keys by the longest prefixes whose keys (in ``universe``) are all bad.

    E.g. all layer3 keys and the 4 keys of layer4.0 missing -> [("layer3.*", 48), ("layer4.0.*", 4)].
    """
    bad = set(bad)
    keys = sorted(set(universe) | bad)
    groups: List[Tuple[str, int]] = []

    def visit(prefix: str, members: List[str]) -> None:
        hits = [k for k in members if k in bad]
        if not hits:
            return
        if prefix and len(hits) == len(members) and len(members) > 1:
            groups.append((prefix + "*", len(hits)))
            return
        children: Dict[str, List[str]] = defaultdict(list)
        for k in members:
            rest = k[len(prefix):]
            if "." in rest:
                children[prefix + rest.split(".", 1)[0] + "."].append(k)
            elif k in bad:
                groups.append((k, 1))
        for child in sorted(children):
            visit(child, children[child])

    visit("", keys)
    return groups


def _format_groups(title: str, bad: Sequence[str], universe: Iterable[str]) -> List[str]:
    groups = _group_keys(bad, universe)
    lines = [f"  {title} {len(bad)} key{'s' if len(bad) != 1 else ''}:"]
    for name, count in groups[:MAX_LINES]:
        lines.append(f"    {name} ({count})" if count > 1 or name.endswith("*") else f"    {name}")
    if len(groups) > MAX_LINES:
        lines.append(f"    ... and {len(groups) - MAX_LINES} more groups")
    return lines


def _shot_hint(missing: Sequence[str], unexpected: Sequence[str]) -> List[str]:
    """BAM's K-shot weighting ``kshot_rw`` exists only for data.shot > 1: say which side is K-shot."""
    def has_kshot(keys):
        return any("kshot_rw" in key.split(".") for key in keys)
    if has_kshot(unexpected):
        return ["  the file has BAM's K-shot weighting (kshot_rw.*), the model has none: the file was trained "
                "for data.shot > 1 (e.g. 5-shot) and the model is built 1-shot; set data.shot to the file's "
                "shot count or give a file trained with this data.shot"]
    if has_kshot(missing):
        return ["  the model (data.shot > 1) needs BAM's K-shot weighting (kshot_rw.*), the file has none: it "
                "was trained 1-shot; set data.shot=1 or give a file trained with this data.shot"]
    return []


def _mismatch_error(path, what: str, missing: Sequence[str], expected: Iterable[str], unexpected: Sequence[str],
                    given: Iterable[str], shapes: Sequence[Tuple[str, tuple, tuple]]) -> CheckpointError:
    lines = [f"{path}: {what} does not fit the model (strict loading, after renaming):"]
    bad = list(missing) + list(unexpected) + [key for key, _, _ in shapes]
    if any(set(key.split(".")[:2]) & set(LAYER_NAMES) for key in bad):   # layerN.* or <part>.layerN.*
        lines.append("  the backbone layers (layer0..layer4) differ: the file was made for another backbone "
                     "(model.backbone: vgg16_bn | resnet50 | resnet101) or backbone size (model.backbone_width, "
                     "model.backbone_blocks); use the config the weights were trained with")
    lines += _shot_hint(missing, unexpected)
    if missing:
        lines += _format_groups("missing (in the model, not in the file)", missing, expected)
    if unexpected:
        lines += _format_groups("unexpected (in the file, not in the model)", unexpected, given)
    if shapes:
        lines.append(f"  shape mismatch on {len(shapes)} key{'s' if len(shapes) != 1 else ''}:")
        for key, file_shape, model_shape in shapes[:MAX_LINES]:
            lines.append(f"    {key}: file {list(file_shape)} vs model {list(model_shape)}")
        if len(shapes) > MAX_LINES:
            lines.append(f"    ... and {len(shapes) - MAX_LINES} more")
    return CheckpointError("\n".join(lines))


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def sha256_file(path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DataParallel / DistributedDataParallel."""
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return model


def trainable_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The trainable part of ``model``'s state dict: the parameters with ``requires_grad`` and
    the buffers of modules whose own parameters are all trainable (detached tensors)."""
    model = _unwrap(model)
    out: Dict[str, torch.Tensor] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if isinstance(value, nn.Parameter):
            if value.requires_grad:
                out[key] = value.detach()
            continue
        owner = model.get_submodule(key.rsplit(".", 1)[0]) if "." in key else model
        own = list(owner.parameters(recurse=False))
        # buffers of modules with trainable parameters (BatchNorm statistics of a trained head);
        # a module without parameters (FrozenBatchNorm2d) is frozen, not trainable
        if own and all(p.requires_grad for p in own):
            out[key] = value.detach()
    return out


def _read(path: Path):
    if not path.is_file():
        raise CheckpointError(f"weight file not found: {path}")
    try:
        try:
            # memory-mapped: a 1.2 GB SAM file is not held twice while its tensors are copied in
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:   # files in the legacy (non-zip) serialisation cannot be mapped
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any reading failure becomes one clear error
        raise CheckpointError(f"{path}: cannot be read as a PyTorch weight file ({type(err).__name__}: {err})") from None


def _accepted() -> str:
    return "accepted formats:\n" + "\n".join(f"  - {desc}" for desc in FORMATS.values())


def _state_dict_of(obj, path: Path) -> Dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError(f"{path}: not a recognised weight file (neither a state dict nor "
                              f"{{'state_dict': ...}}); {_accepted()}")
    return dict(obj)


def _strip_module(state: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], bool]:
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}, True
    return dict(state), False


def detect_format(state: Mapping[str, torch.Tensor], path="<state dict>") -> str:
    """The format of a state dict (``module.`` already stripped), from its keys."""
    tops = {k.split(".", 1)[0] for k in state}
    if tops & {"Bam", "feature_extractor"}:
        return "sam_rsp_original"
    if "image_encoder" in tops:
        return "sam"
    # before BAM: SCCAN has down_query / ASPP_meta / cls_meta too
    if tops & {"init_merge_query", "init_merge_supp"} or any(
            k.startswith(("backbone.body.", "transformer.layers.")) for k in state):
        return "sccan_original"
    if tops & {"down_query", "down_supp", "learner_base", "ASPP_meta", "res1_meta", "cls_meta", "gram_merge"}:
        return "bam_original"
    if {"ppm", "cls", "layer0"} <= tops:
        return "pspnet"
    if "features" in tops and "features.0.weight" in state:
        return "imagenet_vgg"
    if "conv1.weight" in state:
        if "conv2.weight" in state and "conv3.weight" in state:
            return "imagenet_resnet"
        shape = list(state["conv1.weight"].shape)
        raise CheckpointError(
            f"{path}: this is a ResNet with a single {shape[-2]}x{shape[-1]} stem convolution "
            f"(conv1.weight {shape}, no conv2/conv3), e.g. torchvision's resnet50-*.pth; the PSPNet/BAM "
            f"backbone needs the deep-stem ImageNet weights resnet50_v2.pth / resnet101_v2.pth "
            f"(three 3x3 stem convolutions conv1..conv3), see initmodel/README.md")
    shown = ", ".join(sorted(tops)[:12])
    raise CheckpointError(f"{path}: unrecognised weight file (top-level key names: {shown}); {_accepted()}")


def _resolve_target(model: nn.Module, fmt: str, path: Path) -> Tuple[str, str, nn.Module]:
    for classes, attr, kind in TARGETS[fmt]:
        if isinstance(model, classes):
            if isinstance(model, SAMRSP) and not isinstance(model.rspg, RSPG_CLASSES.get(kind, nn.Module)):
                continue   # made for (or holding) the other prompt generator
            target = model.get_submodule(attr) if attr else model
            if kind == "backbone":
                _check_backbone_family(target, fmt, path)
            return attr, kind, target

    def name(cls: type, attr: str, kind: str) -> str:
        text = cls.__name__ + (f".{attr}" if attr else "")
        if issubclass(cls, SAMRSP) and kind in RSPG_CLASSES:
            text += f" (a {RSPG_CLASSES[kind].__name__})" if attr else f" (over a {RSPG_CLASSES[kind].__name__})"
        return text
    names = sorted({name(c, attr, kind) for classes, attr, kind in TARGETS[fmt] for c in classes})
    have = f"a {type(model).__name__}"
    if isinstance(model, SAMRSP):
        have += f" whose prompt generator (rspg, model.rspg.type) is a {type(model.rspg).__name__}"
    raise CheckpointError(f"{path}: {FORMATS[fmt]} loads into {', '.join(names)}, not into {have}")


def _check_backbone_family(target: nn.Module, fmt: str, path: Path) -> None:
    is_vgg = isinstance(target, VGGBackbone) or str(getattr(target, "backbone_name", "")).startswith("vgg")
    if (fmt == "imagenet_vgg") != is_vgg:
        have = "VGG16-bn" if is_vgg else "ResNet"
        raise CheckpointError(f"{path}: {FORMATS[fmt]} does not fit this model's {have} backbone")


def _rename(state: Mapping[str, torch.Tensor], fmt: str, kind: str):
    renames = RENAMES[(fmt, kind)]
    ignored_prefixes = IGNORED.get(fmt, ())
    ignored_suffixes = IGNORED_SUFFIXES.get((fmt, kind), ())
    mapped: Dict[str, torch.Tensor] = {}
    ignored: List[str] = []
    for key, value in state.items():
        if key.startswith(ignored_prefixes) or key.endswith(ignored_suffixes):
            ignored.append(key)
            continue
        for old, new in renames:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        mapped[key] = value
    return mapped, ignored


def _load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], expected: Sequence[str], path,
                 what: str, own: Optional[Mapping[str, torch.Tensor]] = None, hint: str = "") -> List[str]:
    """Check ``state`` against the ``expected`` keys of ``module`` and load it. Returns notes."""
    own = module.state_dict() if own is None else own
    expected_set = set(expected)
    missing = [k for k in expected if k not in state]
    tolerated = [k for k in missing if k.endswith("num_batches_tracked")]
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected_set]
    shapes = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items()
              if k in expected_set and tuple(v.shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        universe = [k for k in expected if not k.endswith("num_batches_tracked")]
        error = _mismatch_error(path, what, missing, universe, unexpected, state.keys(), shapes)
        raise CheckpointError(f"{error}\n  {hint}" if hint else str(error))
    module.load_state_dict(dict(state), strict=False)
    return [f"{len(tolerated)} BatchNorm num_batches_tracked counters absent from the file (kept)"] if tolerated else []


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def load_weights(model: nn.Module, path, require_complete: bool = False) -> LoadReport:
    """Load the weight file ``path`` into ``model`` (or the part of it the file is for); see the
    module docstring for the formats. Raises :class:`CheckpointError`.

    ``require_complete``: the file must fill the WHOLE model (e.g. for testing), not only a part
    of it such as a backbone or SAM's encoder; otherwise an error lists what it left out.
    """
    model = _unwrap(model)
    path = Path(path)
    obj = _read(path)
    try:
        if isinstance(model, CATSAM):
            report = _load_cat_sam(model, obj, path)
        elif isinstance(obj, Mapping) and "format" in obj and obj.get("stage") == "base" \
                and not isinstance(model, PSPNet) and obj.get("format") == FORMAT_VERSION:
            # A stage-1 checkpoint holds a whole PSPNet: it goes wherever a PSPNet best.pth goes
            # (the backbone and learner_base of a BAM, or of SAMRSP.rspg).
            report = _load_official(model, {"state_dict": obj["model"]}, path)
            report.format = FORMAT_VERSION + " (stage base, as a PSPNet)"
            report.stage = "base"
        elif isinstance(obj, Mapping) and "format" in obj:
            report = _load_ours_explained(model, obj, path)
        else:
            report = _load_official(model, obj, path)
    except CheckpointError as err:
        if not require_complete:
            raise
        raise CheckpointError(f"{err}\n  expected here: {_expected_model(model)}") from None
    if require_complete:
        needed = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
        loaded = set(report.loaded)
        left = [k for k in needed if k not in loaded]
        if left:
            lines = [f"{path}: this file holds {_file_holds(report)}, but {_expected_model(model)} is needed "
                     f"here; it fills only part of the {type(model).__name__} ({report.target}: "
                     f"{len(needed) - len(left)} of {len(needed)} tensors) and the rest would keep its RANDOM "
                     f"initialisation."]
            lines += _format_groups("left unloaded", left, needed)
            if isinstance(model, SAMRSP) and report.target.startswith("SAMRSP.rspg"):
                kind = "sccan" if isinstance(model.rspg, SCCAN) else "bam"
                lines.append(f"  (a {type(model.rspg).__name__} checkpoint is tested with train.stage={kind}; SAM-RSP "
                             f"needs the best.pth of a train.stage=sam_rsp run)")
            raise CheckpointError("\n".join(lines))
    return report


def _with_aliases(model: CATSAM, report: LoadReport) -> LoadReport:
    """A CATSAM holds each frozen SAM tensor (and the CAT token) under two names: the alias of
    every loaded tensor counts as loaded (frozen-part references, require_complete)."""
    loaded = set(report.loaded)
    report.loaded = list(report.loaded) + [alias for alias, canonical in model.alias_pairs()
                                           if canonical in loaded and alias not in loaded]
    return report


def _check_cat_sam_ours(model: CATSAM, ckpt: Mapping, path: Path) -> None:
    """One of our stage-cat_sam checkpoints must be of the model's variant and SAM size (by name)."""
    from util.cat_sam_checkpoint import checkpoint_variant
    state = ckpt.get("model")
    if ckpt.get("stage") != "cat_sam" or not isinstance(state, Mapping):
        return
    state, _ = _strip_module(dict(state))
    variant = checkpoint_variant(state)
    feat = state.get("mask_decoder.compress_vit_feat.0.weight")
    width = int(feat.shape[0]) if feat is not None else model.embed_dim
    blocks = {k.split(".")[2] for k in state if k.startswith("image_encoder.hq_token_proj.")} or \
        {k.split(".")[2] for k in state if k.startswith("image_encoder.prompt_generator.lightweight_mlp_")}
    depth = len(blocks) if blocks else model.depth
    trained = f"{CAT_SAM_VARIANT_NAMES[variant]} (SAM {sam_size_name(width, depth)})"
    if variant != model.variant:
        raise CheckpointError(f"{path}: a {trained} checkpoint of stage cat_sam; the model is {model.name}: set "
                              f"model.cat_sam.variant={'decoder' if variant == 'decoder_only' else variant}")
    if (width, depth) != (model.embed_dim, model.depth):
        raise CheckpointError(f"{path}: a {trained} checkpoint of stage cat_sam; the model is {model.name}: build "
                              f"it with that SAM size (model.sam.type and the numbers of its saved config)")


def _load_cat_sam(model: CATSAM, obj, path: Path) -> LoadReport:
    """A CATSAM: ours (stage cat_sam, frozen SAM referenced by path), an official CAT-SAM checkpoint
    or a SAM ``sam_vit_*.pth`` (util/cat_sam_checkpoint.py)."""
    if isinstance(obj, Mapping) and "format" in obj:
        _check_cat_sam_ours(model, obj, path)
        return _load_ours_explained(model, obj, path)
    from util.cat_sam_checkpoint import load_cat_sam_checkpoint
    return _with_aliases(model, load_cat_sam_checkpoint(model, path))


def _load_official(model: nn.Module, obj, path: Path) -> LoadReport:
    state, had_module = _strip_module(_state_dict_of(obj, path))
    fmt = detect_format(state, path)
    attr, kind, target = _resolve_target(model, fmt, path)
    mapped, ignored = _rename(state, fmt, kind)
    own = target.state_dict()
    scope = SCOPES.get((fmt, kind))
    expected = [k for k in own if scope is None or k.startswith(scope)]
    notes = _load_strict(target, mapped, expected, path, FORMATS[fmt], own)
    if had_module:
        notes.insert(0, "'module.' prefix removed")
    if ignored and fmt == "sam":
        notes.append("the prompt encoder and mask decoder of SAM are not part of SAM-RSP: ignored")
    prefix = attr + "." if attr else ""
    target_name = type(model).__name__ + (f".{attr}" if attr else "")
    if scope is not None:
        target_name += " (" + ", ".join(p.rstrip(".") for p in scope) + ")"
    return LoadReport(str(path), fmt, target_name, [prefix + k for k in mapped], ignored, notes)


#: the model class of each training stage; our checkpoints record their stage.
STAGE_MODELS = {"base": PSPNet, "bam": BAM, "sam_rsp": SAMRSP, "sccan": SCCAN, "cat_sam": CATSAM}


def _route_ours(model: nn.Module, stage, path: Path) -> Tuple[str, nn.Module]:
    """Where a checkpoint of ``stage`` goes in ``model``: itself, or SAMRSP.rspg for a BAM."""
    if stage is None or stage not in STAGE_MODELS or isinstance(model, STAGE_MODELS[stage]):
        return "", model
    if stage in ("bam", "sccan") and isinstance(model, SAMRSP) and isinstance(model.rspg, STAGE_MODELS[stage]):
        return "rspg", model.rspg
    have = type(model).__name__
    if isinstance(model, SAMRSP):
        have += f" whose prompt generator (rspg, model.rspg.type) is a {type(model.rspg).__name__}"
    raise CheckpointError(f"{path}: a checkpoint of stage '{stage}' (a {STAGE_MODELS[stage].__name__}) "
                          f"does not load into a {have}")


def _backbone_note(model: nn.Module, ckpt: Mapping) -> Optional[str]:
    """When our checkpoint's saved config names another backbone than ``model``'s, say so."""
    config = ckpt.get("config")
    trained = config.get("model", {}).get("backbone") if isinstance(config, Mapping) else None
    built = getattr(model, "backbone_name", None) or getattr(getattr(model, "rspg", None), "backbone_name", None)
    if trained and built and trained != built:
        return (f"this checkpoint was trained with model.backbone={trained} (its saved config), but the model "
                f"here is built with model.backbone={built}: use the config the checkpoint was trained with")
    return None


def _load_ours_explained(model: nn.Module, ckpt: Mapping, path: Path) -> LoadReport:
    """:func:`_load_ours`; its errors always start with ``path`` (also when a frozen part it
    references fails) and name a backbone that differs from the one the checkpoint was trained with."""
    try:
        return _load_ours(model, ckpt, path)
    except CheckpointError as err:
        note = _backbone_note(model, ckpt)
        if note is None and str(err).startswith(f"{path}:"):
            raise
        raise CheckpointError(f"{path}: {note or 'a frozen part it references does not load'}\n{err}") from None


def _load_ours(model: nn.Module, ckpt: Mapping, path: Path) -> LoadReport:
    if ckpt.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {ckpt.get('format')!r} is not supported "
                              f"(this code reads {FORMAT_VERSION!r})")
    state = ckpt.get("model")
    frozen = ckpt.get("frozen", [])
    if not isinstance(state, Mapping) or not isinstance(frozen, (list, tuple)):
        raise CheckpointError(f"{path}: a {FORMAT_VERSION} checkpoint needs a 'model' state dict and a "
                              f"'frozen' list")
    attr, target = _route_ours(model, ckpt.get("stage"), path)
    if attr:
        report = _load_ours(target, ckpt, path)
        report.target = f"{type(model).__name__}.{attr}"
        report.loaded = [f"{attr}.{k}" for k in report.loaded]
        return report
    report = LoadReport(str(path), FORMAT_VERSION, type(model).__name__, stage=ckpt.get("stage"))
    covered = set()
    for entry in frozen:
        prefix, part_path, digest = entry["prefix"], resolve_path(entry["path"]), entry["sha256"]
        if not part_path.is_file():
            raise CheckpointError(f"{path}: its frozen part '{prefix}' comes from {part_path}, which does not exist "
                                  f"(the checkpoint stores only the trainable weights; put that file back)")
        actual = sha256_file(part_path)
        if actual != digest:
            raise CheckpointError(f"{path}: its frozen part '{prefix}' comes from {part_path}, whose sha256 "
                                  f"{actual} differs from the recorded {digest} (a different file)")
        try:
            submodule = model.get_submodule(prefix.rstrip(".")) if prefix else model
        except AttributeError:
            raise CheckpointError(f"{path}: frozen part prefix '{prefix}' is not a submodule of "
                                  f"{type(model).__name__}") from None
        part = load_weights(submodule, part_path)
        covered.update(prefix + k for k in part.loaded)
        report.parts.append(part)
    state, had_module = _strip_module({k: v for k, v in state.items()})
    own = model.state_dict()
    expected = [k for k in own if k not in covered or k in state]
    prefixes = ", ".join(repr(e["prefix"]) for e in frozen) or "none"
    report.notes = _load_strict(model, state, expected, path, FORMATS[FORMAT_VERSION], own,
                                hint=f"(its 'model' holds the trainable weights; frozen parts: {prefixes})")
    if had_module:
        report.notes.insert(0, "'module.' prefix removed")
    report.loaded = sorted(covered | set(state))
    return report


class PretrainedPart(NamedTuple):
    """A file loaded into the model: submodule ``prefix`` ('' = the whole model), path, sha256,
    and the model keys it filled."""

    prefix: str
    path: str
    sha256: str
    keys: Tuple[str, ...] = ()


#: stage -> (config key, submodule prefix) of each pretrained part.
PRETRAINED_PARTS: Dict[str, Tuple[Tuple[str, str], ...]] = {
    "base": (("model.backbone_checkpoint", ""),),
    "bam": (("model.base_learner.checkpoint", ""),),
    "sam_rsp": (("model.rspg.checkpoint", "rspg."), ("model.sam.checkpoint", "image_encoder.")),
    "sccan": (("model.backbone_checkpoint", ""),),   # the ImageNet init of SCCAN's frozen backbone
    "cat_sam": (("model.sam.checkpoint", ""),),      # SAM sam_vit_*.pth -> CAT-SAM's frozen SAM (util/cat_sam_checkpoint)
}

#: the frozen SAM inside a CATSAM: its encoders (under both names) and SAM's part of the mask decoder
_CAT_SAM_FROZEN = ("ori_sam.", "image_encoder.sam_img_encoder.", "prompt_encoder.sam_prompt_encoder.") + tuple(
    "mask_decoder." + p for p in ("transformer.", "iou_token.", "mask_tokens.", "output_upscaling.",
                                  "output_hypernetworks_mlps.", "iou_prediction_head."))

#: (stage, config key) -> prefixes of the model keys the file of that key must fill, every one of
#: them (``num_batches_tracked`` counters excepted): a file that loads but leaves one of them at
#: its random initialisation is refused (e.g. a PSPNet best.pth, which fills only the backbone and
#: learner_base of a BAM, given as SAM-RSP's prompt generator). A pair not listed here must fill
#: every frozen weight under its submodule prefix.
REQUIRED_KEYS: Dict[Tuple[str, str], Tuple[str, ...]] = {
    ("base", "model.backbone_checkpoint"): _BACKBONE_KEYS,                     # the whole backbone
    # the frozen part of BAM; its meta learner is what stage bam trains
    ("bam", "model.base_learner.checkpoint"): _BACKBONE_KEYS + ("learner_base.",),
    ("sam_rsp", "model.rspg.checkpoint"): ("rspg.",),                          # the whole prompt generator
    ("sam_rsp", "model.sam.checkpoint"): ("image_encoder.",),
    ("sccan", "model.backbone_checkpoint"): ("backbone.body.",),               # SCCAN's frozen backbone
    ("cat_sam", "model.sam.checkpoint"): _CAT_SAM_FROZEN,                      # the whole frozen SAM
}

#: what a file of each format holds, in words (errors about a file given where another is expected)
_FORMAT_HOLDS: Dict[str, str] = {
    "pspnet": "a PSPNet base learner (stage base)",
    "bam_original": "a BAM prompt generator (stage bam; an original BAM checkpoint)",
    "sam_rsp_original": "a whole SAM-RSP model (stage sam_rsp; an original SAM-RSP checkpoint)",
    "sam": "SAM weights (its image encoder)",
    "imagenet_resnet": "only ImageNet weights of a ResNet backbone",
    "imagenet_vgg": "only ImageNet weights of a VGG16-bn backbone",
    "sccan_original": "an SCCAN prompt generator (stage sccan; an original SCCAN checkpoint)",
    "cat_sam": "a whole CAT-SAM model (an official CAT-SAM checkpoint)",
}
_STAGE_HOLDS = {"base": "a PSPNet base learner", "bam": "a BAM prompt generator", "sam_rsp": "a whole SAM-RSP model",
                "sccan": "an SCCAN prompt generator", "cat_sam": "a whole CAT-SAM model"}


def _file_holds(report: LoadReport) -> str:
    """What the file of ``report`` holds, e.g. 'a PSPNet base learner (stage base)'."""
    if report.format.startswith(FORMAT_VERSION):
        stage = report.stage
        if not stage:
            return f"a checkpoint of this project ({FORMAT_VERSION}, no stage recorded)"
        model_class = STAGE_MODELS.get(stage)
        what = _STAGE_HOLDS.get(stage) or (f"a {model_class.__name__}" if model_class else "the model")
        return f"{what} (stage {stage}; a checkpoint of this project)"
    return _FORMAT_HOLDS.get(report.format) or FORMATS.get(report.format, report.format)


def _expected_model(model: nn.Module) -> str:
    """What a complete checkpoint of ``model`` is (test.py / predict.py ``weights=``)."""
    if isinstance(model, SAMRSP):
        return ("a whole SAM-RSP model (stage sam_rsp: the best.pth of a train.stage=sam_rsp run, or an original "
                "SAM-RSP checkpoint)")
    if isinstance(model, BAM):
        return "a whole BAM (stage bam: the best.pth of a train.stage=bam run, or an original BAM checkpoint)"
    if isinstance(model, PSPNet):
        return "a whole PSPNet base learner (stage base: the best.pth of a train.stage=base run)"
    if isinstance(model, CATSAM):
        if model.variant == "zero_shot":
            return f"{model.name}: a SAM sam_vit_*.pth file (nothing of zero-shot SAM is trained)"
        return (f"a whole {model.name} (the best.pth / last.pth of a train.stage=cat_sam run, or an official "
                f"CAT-SAM checkpoint)")
    stage = next((s for s, cls in STAGE_MODELS.items() if isinstance(model, cls)), None)
    return f"a whole {type(model).__name__}" + (f" (stage {stage})" if stage else "")


def _required_keys(model: nn.Module, stage: str, key: str, prefix: str) -> List[str]:
    """The model keys the file of config ``key`` must fill in ``stage`` (see :data:`REQUIRED_KEYS`)."""
    declared = REQUIRED_KEYS.get((stage, key))
    if declared is None:
        trainable = set(trainable_state_dict(model))
        keys = [k for k in model.state_dict() if k.startswith(prefix) and k not in trainable]
    else:
        keys = [k for k in model.state_dict() if k.startswith(declared)]
    return [k for k in keys if not k.endswith("num_batches_tracked")]


def _earlier_stage_hint(key: str, report: LoadReport, value, cfg: Mapping) -> Optional[str]:
    """When the file is the input of an earlier stage than the one ``key`` expects, say what to train."""
    holds_base = report.format == "pspnet" or report.stage == "base"
    holds_imagenet = report.format.startswith("imagenet_")
    if key == "model.rspg.checkpoint" and holds_imagenet and cfg["model"]["rspg"].get("type") == "sccan":
        return (f"ImageNet weights are what stage sccan starts from: train SCCAN on them first (train.stage=sccan "
                f"model.backbone_checkpoint={value}) and give that run's best.pth here")
    if key == "model.rspg.checkpoint" and holds_base:
        return (f"a PSPNet base learner is what stage bam starts from: train BAM on it first (train.stage=bam "
                f"model.base_learner.checkpoint={value}) and give that run's best.pth here")
    if key == "model.rspg.checkpoint" and holds_imagenet:
        return ("ImageNet weights are what stage base starts from: train stage base, then stage bam, and give the "
                "bam run's best.pth here")
    if key == "model.base_learner.checkpoint" and holds_imagenet:
        return (f"ImageNet weights are what stage base starts from: train the PSPNet on them first (train.stage=base "
                f"model.backbone_checkpoint={value}) and give that run's best.pth here")
    return None


def _incomplete_part_error(model: nn.Module, stage: str, key: str, value, path: Path, prefix: str,
                           report: LoadReport, cfg: Mapping) -> Optional[CheckpointError]:
    """The error for a pretrained file that loads but leaves required keys unfilled (or None)."""
    needed = _required_keys(model, stage, key, prefix)
    loaded = {prefix + k for k in report.loaded}
    left = [k for k in needed if k not in loaded]
    if not left:
        return None
    part = prefix.rstrip(".") or type(model).__name__
    lines = [f"config key {key} = {value!r}: {path} holds {_file_holds(report)}, but stage {stage} expects "
             f"{_expected_file(key, cfg)}. Loaded into '{part}' it fills only {len(needed) - len(left)} of the "
             f"{len(needed)} tensors that must come from this file ({report.format} -> {report.target}); the "
             f"others would keep their RANDOM initialisation."]
    lines += _format_groups("left unloaded", left, needed)
    hint = _earlier_stage_hint(key, report, value, cfg)
    if hint:
        lines.append(f"  ({hint})")
    return CheckpointError("\n".join(lines))


_IMAGENET_FILES = {"resnet50": "initmodel/resnet50_v2.pth", "resnet101": "initmodel/resnet101_v2.pth",
                   "vgg16_bn": "initmodel/vgg16_bn.pth"}
_BACKBONE_DIRS = {"resnet50": "resnet50", "resnet101": "resnet101", "vgg16_bn": "vgg"}


def _expected_file(key: str, cfg: Mapping) -> str:
    """What the file of config ``key`` is, where it usually lives and where to get it."""
    m, d = cfg["model"], cfg["data"]
    backbone = m["backbone"]
    if key == "model.backbone_checkpoint":
        return (f"the ImageNet initialisation of the {backbone} backbone, {_IMAGENET_FILES.get(backbone, '?')} "
                f"(deep-stem ResNet resnet50_v2.pth / resnet101_v2.pth or vgg16_bn.pth from the PSPNet/PFENet/BAM "
                f"initmodel downloads, put in initmodel/; torchvision's resnet50 does not fit; see initmodel/README.md)")
    if key == "model.base_learner.checkpoint":
        return (f"the PSPNet base learner, e.g. initmodel/PSPNet/{d['dataset']}/split{d['split']}/"
                f"{_BACKBONE_DIRS.get(backbone, backbone)}/best.pth (trained by this project's stage 1, "
                f"train.stage=base, or from the BAM authors' release)")
    if key == "model.rspg.checkpoint" and m["rspg"].get("type") == "sccan":
        return (f"the SCCAN prompt generator, e.g. initmodel/SCCAN/{d['dataset']}/split{d['split']}/"
                f"{_BACKBONE_DIRS.get(backbone, backbone)}/{d['shot']}shot/best.pth (trained by this project's "
                f"train.stage=sccan, or from the SCCAN authors' release)")
    if key == "model.rspg.checkpoint":
        return (f"the BAM prompt generator, e.g. initmodel/BAM/{d['dataset']}/split{d['split']}/"
                f"{_BACKBONE_DIRS.get(backbone, backbone)}/{d['shot']}shot/best.pth (trained by this project's "
                f"stage 2, train.stage=bam, or from the BAM authors' release)")
    if key == "model.sam.checkpoint":
        name = SAM_CHECKPOINT_NAMES.get(m["sam"]["type"], "sam_vit_*.pth")
        return (f"the SAM {m['sam']['type']} weights initmodel/SAM/{name} (download from "
                f"https://github.com/facebookresearch/segment-anything#model-checkpoints into initmodel/SAM/)")
    return key


def _config_value(cfg: Mapping, key: str):
    value = cfg
    for part in key.split("."):
        value = value[part]
    return value


def load_pretrained_parts(model: nn.Module, cfg: Mapping, stage: Optional[str] = None,
                          log: Optional[Callable[[str], None]] = None) -> List[PretrainedPart]:
    """Load the pretrained parts of ``stage`` (default ``cfg.train.stage``) from the config's paths:

    * ``base``: ``model.backbone_checkpoint`` (ImageNet) into the PSPNet backbone;
    * ``bam``: ``model.base_learner.checkpoint`` (PSPNet best.pth) into BAM's backbone + learner_base;
    * ``sam_rsp``: ``model.rspg.checkpoint`` into ``rspg``, ``model.sam.checkpoint`` into ``image_encoder``.

    Paths go through :func:`util.config.resolve_path` ({split}/{shot}/{dataset} filled in). An
    empty path is an error unless ``model.allow_random_init`` (then a warning is printed and the
    part keeps its random weights; ``log``, when given, receives the warning and one line per
    file loaded). A file must fill its part completely (:data:`REQUIRED_KEYS`: e.g. the whole
    ``rspg`` in stage ``sam_rsp``, but only the backbone and learner_base of BAM in stage ``bam``):
    one that loads only partly is a :class:`CheckpointError` naming the config key, the file, what
    it holds, what was expected and the groups of keys left unloaded. Load errors also name the
    config key and what it expects. Returns the files loaded as :class:`PretrainedPart` -- for
    stages ``bam``/``sam_rsp`` exactly the frozen parts our checkpoints reference under
    ``"frozen"``; for stage ``base`` only the initialisation (everything is trainable there, so
    a stage-1 checkpoint needs no frozen reference).
    """
    model = _unwrap(model)
    stage = stage or cfg["train"]["stage"]
    if stage not in PRETRAINED_PARTS:
        raise ValueError(f"unknown stage {stage!r}; choose one of {', '.join(PRETRAINED_PARTS)}")
    loaded: List[PretrainedPart] = []
    for key, prefix in PRETRAINED_PARTS[stage]:
        value = _config_value(cfg, key)
        if not value:
            if cfg["model"]["allow_random_init"]:
                warning = (f"WARNING: {key} is empty and model.allow_random_init is true: "
                           f"'{prefix or type(model).__name__}' keeps its RANDOM initialisation")
                if log is None:
                    print(warning, file=sys.stderr)
                else:
                    log(warning)
                continue
            raise CheckpointError(f"config key {key} is empty; it must name {_expected_file(key, cfg)} "
                                  f"(or set model.allow_random_init=true for random weights)")
        path = resolve_path(value, cfg)
        if not path.is_file():
            raise CheckpointError(f"config key {key} = {value!r}: file {path} does not exist; "
                                  f"expected {_expected_file(key, cfg)}")
        submodule = model.get_submodule(prefix.rstrip(".")) if prefix else model
        try:
            report = load_weights(submodule, path)
        except CheckpointError as err:
            raise CheckpointError(f"config key {key} = {value!r} must name {_expected_file(key, cfg)}; "
                                  f"{path} does not load:\n{err}") from None
        incomplete = _incomplete_part_error(model, stage, key, value, path, prefix, report, cfg)
        if incomplete is not None:
            raise incomplete
        loaded.append(PretrainedPart(prefix, _portable(path), sha256_file(path),
                                     tuple(prefix + k for k in report.loaded)))
        if log is not None:
            log(f"{key}: loaded {path} into '{prefix or type(model).__name__}' ({report.summary()})")
    return loaded


def _portable(path: Path) -> str:
    """``path`` relative to the project root when it lies inside it (checkpoints stay movable)."""
    try:
        return str(path.resolve().relative_to(PROJECT_ROOT.resolve()))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------------------------
# Training checkpoints (our format): payload, atomic save, read, resume
# ---------------------------------------------------------------------------------------------

def _frozen_entries(model: nn.Module, frozen_refs: Iterable[PretrainedPart]) -> Tuple[List[Dict[str, str]], set]:
    """The references worth keeping -- files that filled non-trainable weights (the ImageNet
    initialisation of stage ``base`` is not one: every PSPNet weight is saved) -- and the set
    of frozen model keys they cover."""
    trainable = set(trainable_state_dict(model))
    entries, covered = [], set()
    for ref in frozen_refs:
        frozen_keys = {k for k in ref.keys if k not in trainable}
        if frozen_keys:
            entries.append({"prefix": ref.prefix, "path": str(ref.path), "sha256": ref.sha256})
            covered |= frozen_keys
    return entries, covered


def _saved_state(model: nn.Module, covered: set) -> Dict[str, torch.Tensor]:
    """What a checkpoint stores: the trainable weights, plus every weight no referenced file
    provides (a frozen part left at its random initialisation, e.g. the toy's SAM encoder,
    must travel with the checkpoint to be reproducible)."""
    trainable = trainable_state_dict(model)
    return {k: (trainable[k] if k in trainable else v.detach()) for k, v in model.state_dict().items()
            if k in trainable or k not in covered}


def checkpoint_payload(model: nn.Module, *, stage: str, frozen_refs: Iterable = (), optimizer=None,
                       train_state: Optional[Mapping] = None, rng: Optional[Mapping] = None,
                       config: Optional[Mapping] = None, **extra: Any) -> Dict[str, Any]:
    """A ``sam-rsp/1`` checkpoint: the trainable weights, the frozen files by path and sha256,
    and the training state (optimizer, progress, RNG, config). Readable with weights_only=True."""
    model = _unwrap(model)
    frozen, covered = _frozen_entries(model, frozen_refs)
    payload: Dict[str, Any] = {"format": FORMAT_VERSION, "stage": stage, "model": _saved_state(model, covered),
                               "frozen": frozen}
    if optimizer is not None:
        # an optimizer, or the states of a stage's optimizers by name (util.engine.optimizer_states)
        payload["optimizer"] = dict(optimizer) if isinstance(optimizer, Mapping) else optimizer.state_dict()
    if train_state is not None:
        payload["train_state"] = dict(train_state)
    if rng is not None:
        payload["rng"] = dict(rng)
    if config is not None:
        payload["config"] = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    payload.update(extra)
    return payload


def save_checkpoint(payload: Mapping, path) -> Path:
    """Write ``payload`` atomically (a temporary file, then rename)."""
    return write_atomic(path, lambda tmp: torch.save(dict(payload), tmp))


def read_checkpoint(path) -> Dict[str, Any]:
    """Read one of OUR checkpoints (for resuming); anything else is a :class:`CheckpointError`."""
    path = Path(path)
    obj = _read(path)
    if not isinstance(obj, Mapping) or obj.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: not a checkpoint of this project ({FORMAT_VERSION}); resuming needs "
                              f"a last.pth/best.pth written by train.py")
    return dict(obj)


def restore_training_weights(model: nn.Module, payload: Mapping, expected_stage: Optional[str] = None,
                             frozen_refs: Iterable[PretrainedPart] = ()) -> None:
    """Put a payload's weights back into ``model`` (whose frozen parts are already loaded from
    the config as ``frozen_refs``), strictly: exactly the keys a checkpoint of this model holds."""
    model = _unwrap(model)
    stage = payload.get("stage")
    if expected_stage is not None and stage is not None and stage != expected_stage:
        raise CheckpointError(f"the checkpoint is of stage '{stage}', not '{expected_stage}'")
    state, _ = _strip_module(dict(payload["model"]))
    _, covered = _frozen_entries(model, frozen_refs)
    _load_strict(model, state, list(_saved_state(model, covered)), "<checkpoint>", f"the weights of "
                 f"stage '{stage}'", hint="(trainable parts differ from the model's: another configuration?)")


def capture_rng_state() -> Dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states, in types ``weights_only`` loading accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: Dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
