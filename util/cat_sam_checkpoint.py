"""Load official CAT-SAM checkpoints and SAM ``sam_vit_*.pth`` files into :class:`model.cat_sam.CATSAM`,
strictly (SPEC_CAT_SAM 5).

    from util.cat_sam_checkpoint import load_cat_sam_checkpoint
    report = load_cat_sam_checkpoint(model, "sbu_cat-a_vit-l_1shot.pth")    # or sam_vit_l_0b3195.pth

=================  ===============================================================  ===================
format             file                                                             loads into
=================  ===============================================================  ===================
``cat_sam``        the README's ``{'model': state_dict}`` or train.py's bare state     the whole CATSAM
                   dict: ``ori_sam.*``, ``image_encoder.*``, ``prompt_encoder.*``,
                   ``mask_decoder.*``, the frozen SAM and the CAT token twice (aliases)
``sam``            SAM ``sam_vit_{b,l,h}_*.pth``: ``image_encoder.*``,                SAM's encoders and
                   ``prompt_encoder.*``, ``mask_decoder.*``                           decoder (frozen part)
=================  ===============================================================  ===================

Checks, each a :class:`~util.checkpoint.CheckpointError` naming the file: the checkpoint's
variant (CAT-SAM-T / CAT-SAM-A / decoder-only / zero-shot, from its keys) and SAM size (vit_b /
vit_l / vit_h, from the ViT width and depth) must be the model's -- refused by name otherwise;
every alias pair (``image_encoder.sam_img_encoder.*`` / ``ori_sam.image_encoder.*``,
``prompt_encoder.sam_prompt_encoder.*`` / ``ori_sam.prompt_encoder.*``, ``image_encoder.hq_token``
/ ``mask_decoder.hf_token.weight``) must hold equal tensors; then one name of each pair is
dropped and the rest is loaded strictly (missing / unexpected keys and shape mismatches listed).
A file without any alias key (e.g. :meth:`CATSAM.canonical_state_dict` saved) is accepted too.
A DistributedDataParallel ``module.`` prefix is removed.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, Mapping, Tuple

import torch

from model.cat_sam import VARIANT_NAMES, CATSAM, canonical_key, sam_size_name
from model.cat_sam_decoder import SAM_DECODER_PREFIXES
from util.checkpoint import CheckpointError, LoadReport, _load_strict, _read, _strip_module

FORMATS = {
    "cat_sam": "an official CAT-SAM checkpoint ({'model': state_dict} or the bare state dict; keys ori_sam.*, "
               "image_encoder.*, prompt_encoder.*, mask_decoder.*)",
    "sam": "a SAM checkpoint sam_vit_{b,l,h}_*.pth (keys image_encoder.*, prompt_encoder.*, mask_decoder.*)",
}

#: SAM-file prefix -> CATSAM canonical prefix (SPEC_CAT_SAM 5: ``ori_sam.X`` <- ``X``; decoder keys unchanged).
SAM_RENAMES = (("image_encoder.", "ori_sam.image_encoder."), ("prompt_encoder.", "ori_sam.prompt_encoder."))
SAM_IGNORED = ("pixel_mean", "pixel_std")


def _state_of(obj, path: Path) -> Dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and "format" in obj:
        raise CheckpointError(f"{path}: a checkpoint of this project (format {obj.get('format')!r}), not an official "
                              f"CAT-SAM or SAM file; load it with util.checkpoint.load_weights")
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not obj or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError(f"{path}: not a recognised weight file (neither a state dict nor {{'model': ...}}); "
                              f"accepted: " + "; ".join(FORMATS.values()))
    return dict(obj)


def detect_format(state: Mapping[str, torch.Tensor], path="<state dict>") -> str:
    """``"cat_sam"`` | ``"sam"`` from the keys (``module.`` already stripped)."""
    if any(k.startswith("ori_sam.") for k in state):
        return "cat_sam"
    if "image_encoder.patch_embed.proj.weight" in state and any(k.startswith("mask_decoder.") for k in state):
        return "sam"
    tops = ", ".join(sorted({k.split(".", 1)[0] for k in state})[:12])
    raise CheckpointError(f"{path}: unrecognised weight file (top-level key names: {tops}); accepted: "
                          + "; ".join(FORMATS.values()))


def checkpoint_variant(state: Mapping[str, torch.Tensor]) -> str:
    """The CATSAM variant a CAT-SAM state dict was saved from, from its keys."""
    if any(k.startswith("image_encoder.hq_token_proj.") for k in state):
        return "t"
    if any(k.startswith(("image_encoder.prompt_generator.", "image_encoder.hq_token_down_proj.")) for k in state):
        return "a"
    if "mask_decoder.hf_token.weight" in state:
        return "decoder_only"
    return "zero_shot"


def encoder_size(state: Mapping[str, torch.Tensor], prefix: str) -> Tuple[int, int, int]:
    """(width, depth, token grid) of the ViT stored under ``prefix`` (e.g. ``ori_sam.image_encoder.``)."""
    pos = state.get(prefix + "pos_embed")
    patch = state.get(prefix + "patch_embed.proj.weight")
    width = int(patch.shape[0]) if patch is not None else -1
    grid = int(pos.shape[1]) if pos is not None else -1
    pattern = re.compile(re.escape(prefix) + r"blocks\.(\d+)\.")
    depth = len({m.group(1) for m in (pattern.match(k) for k in state) if m})
    return width, depth, grid


def _model_size(model: CATSAM) -> Tuple[int, int, int]:
    return model.embed_dim, model.depth, model.grid_size


def _check_size(model: CATSAM, state: Mapping[str, torch.Tensor], prefix: str, path: Path, what: str) -> None:
    width, depth, grid = encoder_size(state, prefix)
    mine = _model_size(model)
    if (width, depth) != mine[:2]:
        raise CheckpointError(f"{path}: {what} is for SAM {sam_size_name(width, depth)}, the model is "
                              f"{model.name} with SAM {sam_size_name(*mine[:2])}; build the model with that SAM size")
    if grid != mine[2]:
        raise CheckpointError(f"{path}: {what} has a {grid}x{grid} token grid, the model {mine[2]}x{mine[2]} "
                              f"(img_size / patch_size differ)")


def _check_aliases(state: Mapping[str, torch.Tensor], path: Path) -> Dict[str, torch.Tensor]:
    """Verify every alias pair is equal; return the state with the alias names dropped."""
    aliases = {k: canonical_key(k) for k in state if canonical_key(k) != k}
    unequal, unpaired = [], []
    for alias, canonical in aliases.items():
        if canonical not in state:
            unpaired.append(f"{alias} (no {canonical})")
        elif state[alias].shape != state[canonical].shape or not torch.equal(state[alias], state[canonical]):
            unequal.append(f"{alias} != {canonical}")
    if unequal or unpaired:
        lines = [f"{path}: the duplicated tensors of the CAT-SAM state dict do not agree "
                 f"({len(unequal)} unequal alias pairs, {len(unpaired)} aliases without their original):"]
        lines += [f"    {line}" for line in (unequal + unpaired)[:25]]
        if len(unequal) + len(unpaired) > 25:
            lines.append(f"    ... and {len(unequal) + len(unpaired) - 25} more")
        raise CheckpointError("\n".join(lines))
    return {k: v for k, v in state.items() if k not in aliases}


def load_cat_sam_checkpoint(model: CATSAM, path) -> LoadReport:
    """Load ``path`` (official CAT-SAM checkpoint or SAM file) into ``model``; see the module docstring."""
    model = getattr(model, "module", model)
    if not isinstance(model, CATSAM):
        raise CheckpointError(f"{path}: CAT-SAM / SAM files load into a CATSAM here, not a {type(model).__name__}")
    path = Path(path)
    state, had_module = _strip_module(_state_of(_read(path), path))
    fmt = detect_format(state, path)
    notes = ["'module.' prefix removed"] if had_module else []
    own = model.canonical_state_dict()
    if fmt == "cat_sam":
        variant = checkpoint_variant(state)
        width, depth, _ = encoder_size(state, "ori_sam.image_encoder.")
        if variant != model.variant:
            raise CheckpointError(f"{path}: a {VARIANT_NAMES[variant]} checkpoint (SAM {sam_size_name(width, depth)}); "
                                  f"the model is {model.name}: build CATSAM(variant={variant!r}, ...) for it")
        _check_size(model, state, "ori_sam.image_encoder.", path, f"this {VARIANT_NAMES[variant]} checkpoint")
        aliases = sum(canonical_key(k) != k for k in state)
        mapped = _check_aliases(state, path)
        if aliases:
            notes.append(f"{aliases} alias keys checked equal to their originals and dropped")
        notes += _load_strict(model, mapped, list(own), path, FORMATS[fmt], own)
        return LoadReport(str(path), fmt, model.name, list(mapped), [], notes)
    # A SAM file: the frozen SAM part (image encoder, prompt encoder, SAM's mask decoder).
    _check_size(model, state, "image_encoder.", path, "this SAM checkpoint")
    mapped, ignored = {}, []
    for key, value in state.items():
        if key.startswith(SAM_IGNORED):
            ignored.append(key)
            continue
        for old, new in SAM_RENAMES:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        mapped[key] = value
    expected = [k for k in own if k.startswith("ori_sam.")
                or k.startswith(tuple("mask_decoder." + p for p in SAM_DECODER_PREFIXES))]
    notes += _load_strict(model, mapped, expected, path, FORMATS[fmt], own)
    return LoadReport(str(path), fmt, f"{model.name}: frozen SAM part", list(mapped), ignored, notes)
