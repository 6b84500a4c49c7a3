"""CAT-SAM (Xiao, Xuan et al., ECCV 2024): conditional tuning of a frozen Segment Anything
model for few-shot adaptation (SPEC_CAT_SAM).

One class, four variants (``variant``), so a zero-shot / decoder-only / T / A table comes from
the same code, the same frozen SAM and the same pre/post-processing:

==================  ================================================================  =====================
variant             trains                                                            vit_b trainable
==================  ================================================================  =====================
``"zero_shot"``     nothing: SAM's own decoder, single-mask output (mask token 0)     0
``"decoder_only"``  the HQ decoder branch with the CAT token (HQ-SAM row, SPEC 14)    1,071,104
``"t"``             HQ branch + PB-T bridge and per-block prompt tokens (SPEC 3.4)    1,867,520
``"a"``             HQ branch + PB-A bridge and EVP adapters (SPEC 3.5)               1,466,960
==================  ================================================================  =====================

Every SAM weight is frozen (requires_grad False; SAM's modules stay in eval mode). The output is
the HQ (CAT) mask only. Public API::

    model = CATSAM(variant="a", sam_type="vit_l")
    load_cat_sam_checkpoint(model, "sbu_cat-a_vit-l_1shot.pth")     # util.cat_sam_checkpoint
    logits = model(images=[img], boxes=[boxes])                     # [N x 1 x H x W] per image
    feats = model.embed([img])                                      # encoder once ...
    logits = model(features=feats, boxes=[b1])                      # ... prompts reuse it
    p = CATSAMPredictor(model); p.set_image(img); masks, logits = p.predict(boxes=boxes)

Images: 3 x H x W float RGB in 0..255 (H x W or 1 x H x W grey are repeated to 3), any size;
a list of images of different sizes is allowed. Prompts are in original-image pixels (x, y).

Pre/post-processing (SPEC_CAT_SAM 3.1): ``resize="squash"`` (the original's, default: the
released checkpoints were trained with it) resizes to S x S (bilinear, align_corners False, no
antialias; aspect ratio NOT kept) and rounds the scaled prompt coordinates; the output 4g x 4g
logits are resized straight to (H, W). ``resize="longest_side"`` is SAM's: resize the longest
side to S (antialiased bilinear), pad bottom/right with zeros, prompts scaled without rounding,
logits upsampled to S, cropped, resized to (H, W). Both normalise with SAM's pixel mean/std
ALWAYS (fixes the original's defect: an image already S x S skipped normalisation, SPEC 13).

State dict (SPEC_CAT_SAM 5): the original's names, each frozen SAM tensor under two names and
the CAT token under two (shared tensors, so ``load_state_dict`` of an official checkpoint is
strict and ``torch.save`` stores them once): ``ori_sam.{image_encoder,prompt_encoder}.*`` =
``image_encoder.sam_img_encoder.*`` / ``prompt_encoder.sam_prompt_encoder.*``;
``mask_decoder.hf_token.weight`` = ``image_encoder.hq_token``. :data:`ALIAS_PREFIXES` lists
them; :meth:`CATSAM.canonical_state_dict` holds each tensor once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import ImageEncoderViT
from segment_anything.modeling.prompt_encoder import PromptEncoder

from .attention import set_attention
from .cat_sam_decoder import CATMaskDecoder
from .cat_sam_encoder import CATImageEncoder

#: segment-anything's registry numbers (build_sam.py); ``tiny`` is the parity fixtures' SAM
#: (SPEC_CAT_SAM 12: embed 64, depth 2, 4 heads, global block [1]; prompt encoder and decoder full size).
SAM_PRESETS: Dict[str, Dict[str, object]] = {
    "vit_b": {"embed_dim": 768, "depth": 12, "num_heads": 12, "global_attn_indexes": (2, 5, 8, 11)},
    "vit_l": {"embed_dim": 1024, "depth": 24, "num_heads": 16, "global_attn_indexes": (5, 11, 17, 23)},
    "vit_h": {"embed_dim": 1280, "depth": 32, "num_heads": 16, "global_attn_indexes": (7, 15, 23, 31)},
    "tiny": {"embed_dim": 64, "depth": 2, "num_heads": 4, "global_attn_indexes": (1,)},
}

VARIANTS = ("zero_shot", "decoder_only", "t", "a")
VARIANT_NAMES = {"zero_shot": "zero-shot SAM", "decoder_only": "decoder-only (HQ branch, no bridge)",
                 "t": "CAT-SAM-T", "a": "CAT-SAM-A"}
RESIZE_MODES = ("squash", "longest_side")

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)

#: (alias prefix, canonical prefix): the same tensors under two names in the original's state dict.
ALIAS_PREFIXES: Tuple[Tuple[str, str], ...] = (
    ("image_encoder.sam_img_encoder.", "ori_sam.image_encoder."),
    ("prompt_encoder.sam_prompt_encoder.", "ori_sam.prompt_encoder."),
    ("image_encoder.hq_token", "mask_decoder.hf_token.weight"),
)


def sam_size_name(embed_dim: int, depth: int) -> str:
    """``vit_b`` / ``vit_l`` / ``vit_h`` / ``tiny`` for a preset's ViT width and depth, else a description."""
    for name, preset in SAM_PRESETS.items():
        if (preset["embed_dim"], preset["depth"]) == (embed_dim, depth):
            return name
    return f"a custom ViT (width {embed_dim}, depth {depth})"


def canonical_key(key: str) -> str:
    """The canonical name of a state-dict key (aliases -> ``ori_sam.*`` / ``mask_decoder.hf_token.weight``)."""
    for alias, canonical in ALIAS_PREFIXES:
        if key == alias or (alias.endswith(".") and key.startswith(alias)):
            return canonical + key[len(alias):]
    return key


class SAMParts(nn.Module):
    """The original's ``ori_sam``: SAM's image encoder and prompt encoder (its mask decoder
    lives in :class:`~model.cat_sam_decoder.CATMaskDecoder`)."""

    def __init__(self, *, image_encoder: ImageEncoderViT, prompt_encoder: PromptEncoder) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder


class PromptEncoderAlias(nn.Module):
    """The original's ``prompt_encoder`` wrapper: holds the shared PromptEncoder as ``sam_prompt_encoder``."""

    def __init__(self, *, sam_prompt_encoder: PromptEncoder) -> None:
        super().__init__()
        self.sam_prompt_encoder = sam_prompt_encoder

    def forward(self, *args, **kwargs):
        return self.sam_prompt_encoder(*args, **kwargs)


@dataclass
class CATSAMFeatures:
    """What the encoder computes once per image, reused by every prompt of that image.

    image_embeddings: B x out_chans x g x g; interm_embeddings: [B x g x g x C] (outputs of the
    global-attention blocks; the HQ branch uses the first); original_sizes: (H, W) per image;
    input_sizes: (h, w) of the resized image inside the S x S input (S x S when squashing).
    """

    image_embeddings: torch.Tensor
    interm_embeddings: List[torch.Tensor]
    original_sizes: List[Tuple[int, int]]
    input_sizes: List[Tuple[int, int]]
    trace: Dict[str, object] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.image_embeddings.shape[0]


Prompt = Optional[torch.Tensor]


class CATSAM(nn.Module):
    """forward(images=[3 x H x W], boxes=[N x 4 | None], points=[N x K x 2 | None],
    point_labels=[N x K | None], noisy_masks=[N x h x w | N x 1 x h x w | None], features=None)
    -> [N x 1 x H x W logits per image]; see the module docstring.

    Constructor: ``variant`` (:data:`VARIANTS`; "t" | "a" are CAT-SAM-T / -A); SAM size:
    ``sam_type`` (:data:`SAM_PRESETS`) whose numbers ``embed_dim``, ``depth``, ``num_heads``,
    ``global_attn_indexes`` can be overridden, and ``img_size``, ``patch_size``, ``out_chans``
    (= prompt/decoder width), ``window_size``; bridges/adapters: ``pb_t_hidden_dim`` (PB-T
    hidden width, 64), ``evp_scale_factor`` (c = C / 32), ``pb_a_hidden_dim`` (PB-A branch
    width, 32), ``freq_nums`` (FFT mask rate 0.25); ``layer_norm_eps`` of the ViT (SAM's 1e-6);
    ``resize`` (:data:`RESIZE_MODES`); ``checkpoint_encoder``: activation checkpointing of
    the frozen ViT blocks (T/A training: gradients flow through them to the bridge/adapters);
    ``attention``: "reference" | "sdpa" for the plain (token-free) ViT blocks.
    """

    mask_threshold: float = 0.0

    def __init__(self, *, variant: str = "a", sam_type: str = "vit_l", embed_dim: Optional[int] = None,
                 depth: Optional[int] = None, num_heads: Optional[int] = None,
                 global_attn_indexes: Optional[Sequence[int]] = None, img_size: int = 1024, patch_size: int = 16,
                 out_chans: int = 256, window_size: int = 14, pb_t_hidden_dim: int = 64, evp_scale_factor: int = 32,
                 pb_a_hidden_dim: int = 32, freq_nums: float = 0.25, layer_norm_eps: float = 1e-6,
                 resize: str = "squash", checkpoint_encoder: bool = False, attention: str = "reference") -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if sam_type not in SAM_PRESETS:
            raise ValueError(f"sam_type must be one of {tuple(SAM_PRESETS)}, got {sam_type!r}")
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        preset = SAM_PRESETS[sam_type]
        self.variant = variant
        self.sam_type = sam_type
        self.resize_mode = resize
        self.img_size = int(img_size)
        self.embed_dim = int(preset["embed_dim"] if embed_dim is None else embed_dim)
        self.depth = int(preset["depth"] if depth is None else depth)
        num_heads = int(preset["num_heads"] if num_heads is None else num_heads)
        global_attn_indexes = tuple(preset["global_attn_indexes"] if global_attn_indexes is None
                                    else global_attn_indexes)
        if not global_attn_indexes and variant in ("t", "a", "decoder_only"):
            raise ValueError("the HQ branch reads the first global-attention block's output: "
                             "global_attn_indexes must not be empty")
        grid = img_size // patch_size
        self.grid_size = grid

        # The frozen SAM (SPEC_CAT_SAM 3.2): segment-anything's registry numbers.
        sam_image_encoder = ImageEncoderViT(
            img_size=img_size, patch_size=patch_size, in_chans=3, embed_dim=self.embed_dim, depth=self.depth,
            num_heads=num_heads, mlp_ratio=4.0, out_chans=out_chans, qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=layer_norm_eps), act_layer=nn.GELU, use_abs_pos=True,
            use_rel_pos=True, rel_pos_zero_init=True, window_size=window_size,
            global_attn_indexes=global_attn_indexes)
        set_attention(sam_image_encoder, attention)
        sam_prompt_encoder = PromptEncoder(embed_dim=out_chans, image_embedding_size=(grid, grid),
                                           input_image_size=(img_size, img_size), mask_in_chans=16)
        hq = variant != "zero_shot"
        mask_decoder = CATMaskDecoder(transformer_dim=out_chans, vit_dim=self.embed_dim, hq=hq)
        tuning = variant if variant in ("t", "a") else None

        # Registration order = the original's state-dict order: ori_sam, image_encoder, prompt_encoder, mask_decoder.
        self.ori_sam = SAMParts(image_encoder=sam_image_encoder, prompt_encoder=sam_prompt_encoder)
        self.image_encoder = CATImageEncoder(
            sam_img_encoder=sam_image_encoder, tuning=tuning, cat_token=mask_decoder.hf_token.weight if hq else None,
            token_dim=out_chans, pb_t_hidden_dim=pb_t_hidden_dim, evp_scale_factor=evp_scale_factor,
            pb_a_hidden_dim=pb_a_hidden_dim, freq_nums=freq_nums, checkpoint_blocks=checkpoint_encoder)
        self.prompt_encoder = PromptEncoderAlias(sam_prompt_encoder=sam_prompt_encoder)
        self.mask_decoder = mask_decoder
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(-1, 1, 1), persistent=False)

        for module in self.frozen_modules():
            for p in module.parameters():
                p.requires_grad_(False)
        self.train(self.training)

    # -- structure ----------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """E.g. ``"CAT-SAM-A (vit_l)"`` (the SAM size named from the ViT's actual width and depth)."""
        return f"{VARIANT_NAMES[self.variant]} ({sam_size_name(self.embed_dim, self.depth)})"

    @property
    def checkpoint_encoder(self) -> bool:
        return self.image_encoder.checkpoint_blocks

    @checkpoint_encoder.setter
    def checkpoint_encoder(self, value: bool) -> None:
        self.image_encoder.checkpoint_blocks = bool(value)

    def frozen_modules(self) -> List[nn.Module]:
        """SAM's image encoder, prompt encoder and the SAM part of the mask decoder."""
        return [self.ori_sam.image_encoder, self.ori_sam.prompt_encoder] + self.mask_decoder.sam_modules()

    def train(self, mode: bool = True) -> "CATSAM":
        """The frozen SAM stays in eval mode (no dropout/BatchNorm anywhere: same numbers)."""
        super().train(mode)
        for module in [self.ori_sam, self.prompt_encoder] + self.frozen_modules():
            module.eval()
        return self

    def named_trainable_parameters(self) -> Iterator[Tuple[str, nn.Parameter]]:
        """(canonical name, parameter) of every trainable tensor, each once (the CAT token as
        ``mask_decoder.hf_token.weight``)."""
        for name, p in self.named_parameters():
            if p.requires_grad:
                yield canonical_key(name), p

    def trainable_parameters(self) -> List[nn.Parameter]:
        """What the optimizer gets (SPEC_CAT_SAM 4): ``[p for p in parameters() if p.requires_grad]``."""
        return [p for p in self.parameters() if p.requires_grad]

    def canonical_state_dict(self) -> Dict[str, torch.Tensor]:
        """The state dict with each tensor once, under its canonical name (aliases dropped)."""
        return {k: v for k, v in self.state_dict().items() if canonical_key(k) == k}

    def alias_pairs(self) -> List[Tuple[str, str]]:
        """(alias key, canonical key) of every duplicated tensor of this model's state dict."""
        return [(k, canonical_key(k)) for k in self.state_dict() if canonical_key(k) != k]

    # -- pre-processing -------------------------------------------------------------------------

    def _as_image(self, image: torch.Tensor) -> torch.Tensor:
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"an image must be a tensor (3 x H x W, RGB 0..255), got {type(image).__name__}")
        if image.dim() == 2:
            image = image.unsqueeze(0)
        if image.dim() != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"an image must be 3 x H x W (or H x W / 1 x H x W grey), got shape {tuple(image.shape)}")
        if image.shape[0] == 1:
            image = image.expand(3, -1, -1)
        return image.to(device=self.pixel_mean.device, dtype=torch.float32)

    def _input_size(self, height: int, width: int) -> Tuple[int, int]:
        """(h, w) of the resized image inside the S x S input."""
        if self.resize_mode == "squash":
            return self.img_size, self.img_size
        scale = self.img_size / max(height, width)          # SAM's ResizeLongestSide.get_preprocess_shape
        return int(height * scale + 0.5), int(width * scale + 0.5)

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """One image 3 x H x W (0..255) -> 3 x S x S, resized (``resize`` mode) and normalised.

        Normalisation always happens (the original skipped it for an image already S x S).
        """
        height, width = image.shape[-2:]
        h, w = self._input_size(height, width)
        x = image.unsqueeze(0)
        if (height, width) != (h, w):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False,
                              antialias=self.resize_mode == "longest_side")
        x = (x - self.pixel_mean) / self.pixel_std
        if (h, w) != (self.img_size, self.img_size):
            x = F.pad(x, (0, self.img_size - w, 0, self.img_size - h))
        return x[0]

    def _images(self, images) -> List[torch.Tensor]:
        if isinstance(images, torch.Tensor):
            images = list(images) if images.dim() == 4 else [images]
        if not isinstance(images, (list, tuple)) or not images:
            raise ValueError("images must be a non-empty list of 3 x H x W tensors (or a B x 3 x H x W tensor)")
        return [self._as_image(image) for image in images]

    # -- encoder ------------------------------------------------------------------------------

    def embed(self, images, trace: bool = False) -> CATSAMFeatures:
        """Run the encoder ONCE for a batch of images (list of 3 x H x W, 0..255).

        Gradients flow only when the encoder has a trainable part (T, A) and grad is enabled;
        otherwise it runs under no_grad. ``trace``: also keep the encoder's intermediate tensors
        (``features.trace``: block inputs, prompt tokens / EVP features; see CATImageEncoder).
        """
        images = self._images(images)
        sizes = [tuple(int(s) for s in image.shape[-2:]) for image in images]
        batch = torch.stack([self.preprocess(image) for image in images])
        record: Optional[Dict[str, object]] = {} if trace else None
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.image_encoder.tuning is not None):
            embeddings, interm = self.image_encoder(batch, trace=record)
        return CATSAMFeatures(embeddings, interm, sizes, [self._input_size(*s) for s in sizes], record or {})

    # -- prompts --------------------------------------------------------------------------------

    def _scale_coords(self, coords: torch.Tensor, index: int, features: CATSAMFeatures) -> torch.Tensor:
        """(x, y) in original pixels -> the S x S input frame (SPEC_CAT_SAM 3.1)."""
        (height, width), (h, w) = features.original_sizes[index], features.input_sizes[index]
        coords = coords.to(device=self.pixel_mean.device, dtype=torch.float32).clone()
        coords[..., 0] = coords[..., 0] * (w / width)
        coords[..., 1] = coords[..., 1] * (h / height)
        return torch.round(coords) if self.resize_mode == "squash" else coords

    def _mask_prompt(self, masks: torch.Tensor, index: int, features: CATSAMFeatures) -> torch.Tensor:
        """N x h x w or N x 1 x h x w -> N x 1 x 4g x 4g, SAM's dense mask input (fed as given:
        the original passes 0/1 maps). A mask at 4g x 4g is taken as already in that frame; a mask
        at the image's original size is mapped with the image's geometry."""
        masks = masks.to(device=self.pixel_mean.device, dtype=torch.float32)
        if masks.dim() == 3:
            masks = masks.unsqueeze(1)
        low = self.ori_sam.prompt_encoder.mask_input_size
        if tuple(masks.shape[-2:]) == tuple(low):
            return masks
        if tuple(masks.shape[-2:]) != features.original_sizes[index]:
            raise ValueError(f"noisy_masks[{index}] must be N x {low[0]} x {low[1]} or at the image size "
                             f"{features.original_sizes[index]}, got {tuple(masks.shape)}")
        scale = low[0] / self.img_size
        h, w = features.input_sizes[index]
        h, w = int(round(h * scale)), int(round(w * scale))
        masks = F.interpolate(masks, size=(h, w), mode="bilinear", align_corners=False)
        return F.pad(masks, (0, low[1] - w, 0, low[0] - h))

    def encode_prompts(self, index: int, features: CATSAMFeatures, boxes: Prompt = None, points: Prompt = None,
                       point_labels: Prompt = None,
                       noisy_masks: Prompt = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Image ``index``'s prompts -> SAM prompt-encoder (sparse N x k x D, dense N x D x g x g).

        boxes: N x 4 or 4 (x0, y0, x1, y1); points: N x K x 2 (N prompts of K points) or K x 2
        (one prompt); point_labels: N x K (default: all 1); noisy_masks: see :meth:`_mask_prompt`.
        No prompt at all (None or 0 boxes / points): one empty prompt (N = 1), as the original does
        for an image without objects (SPEC_CAT_SAM 9).
        """
        if boxes is not None and torch.as_tensor(boxes).numel() == 0:
            boxes = None
        if points is not None and torch.as_tensor(points).numel() == 0:
            points, point_labels = None, None
        counts = {}
        if boxes is not None:
            boxes = self._scale_coords(torch.as_tensor(boxes).reshape(-1, 2, 2), index, features).reshape(-1, 4)
            counts["boxes"] = boxes.shape[0]
        point_input = None
        if points is not None:
            points = torch.as_tensor(points)
            if points.dim() == 2:
                points = points.unsqueeze(0)
            if points.dim() != 3 or points.shape[-1] != 2:
                raise ValueError(f"points[{index}] must be N x K x 2 (or K x 2), got {tuple(points.shape)}")
            labels = (torch.ones(points.shape[:2]) if point_labels is None
                      else torch.as_tensor(point_labels).reshape(points.shape[:2]))
            point_input = (self._scale_coords(points, index, features),
                           labels.to(device=self.pixel_mean.device, dtype=torch.int64))
            counts["points"] = points.shape[0]
        if noisy_masks is not None:
            noisy_masks = self._mask_prompt(torch.as_tensor(noisy_masks), index, features)
            counts["noisy_masks"] = noisy_masks.shape[0]
        if len(set(counts.values())) > 1:
            raise ValueError(f"image {index}: the prompts disagree on the number of objects: {counts}")
        return self.ori_sam.prompt_encoder(points=point_input, boxes=boxes, masks=noisy_masks)

    # -- post-processing -----------------------------------------------------------------------

    def postprocess(self, low_res: torch.Tensor, index: int, features: CATSAMFeatures) -> torch.Tensor:
        """N x 1 x 4g x 4g logits -> N x 1 x H x W at image ``index``'s original size (bilinear,
        align_corners False; SPEC_CAT_SAM 3.1, or SAM's crop of the padding with ``longest_side``)."""
        original = features.original_sizes[index]
        if self.resize_mode == "longest_side":
            low_res = F.interpolate(low_res, (self.img_size, self.img_size), mode="bilinear", align_corners=False)
            h, w = features.input_sizes[index]
            low_res = low_res[..., :h, :w]
        if tuple(low_res.shape[-2:]) == original:
            return low_res
        return F.interpolate(low_res, original, mode="bilinear", align_corners=False)

    # -- forward --------------------------------------------------------------------------------

    def forward(self, images=None, boxes: Optional[Sequence[Prompt]] = None,
                points: Optional[Sequence[Prompt]] = None, point_labels: Optional[Sequence[Prompt]] = None,
                noisy_masks: Optional[Sequence[Prompt]] = None,
                features: Optional[CATSAMFeatures] = None) -> List[torch.Tensor]:
        """See the class docstring. Prompt lists have one entry per image (None allowed, or the
        whole list None); ``features`` (:meth:`embed`) replaces ``images``."""
        if features is None:
            if images is None:
                raise ValueError("give images or precomputed features")
            features = self.embed(images)
        count = len(features)

        def per_image(values, what):
            if values is None:
                return [None] * count
            if isinstance(values, torch.Tensor):
                raise TypeError(f"{what} must be a list with one entry per image (None allowed), got a tensor")
            if len(values) != count:
                raise ValueError(f"{what} has {len(values)} entries for {count} images")
            return list(values)

        boxes, points = per_image(boxes, "boxes"), per_image(points, "points")
        point_labels, noisy_masks = per_image(point_labels, "point_labels"), per_image(noisy_masks, "noisy_masks")
        image_pe = self.ori_sam.prompt_encoder.get_dense_pe()
        outputs = []
        for i in range(count):
            sparse, dense = self.encode_prompts(i, features, boxes[i], points[i], point_labels[i], noisy_masks[i])
            interm = features.interm_embeddings[0][i:i + 1] if self.mask_decoder.hq else None
            low_res = self.mask_decoder(features.image_embeddings[i:i + 1], image_pe, sparse, dense,
                                        interm_embedding=interm)
            outputs.append(self.postprocess(low_res, i, features))
        return outputs


class CATSAMPredictor:
    """Encoder once per image, any number of prompts after it.

        p = CATSAMPredictor(model); p.set_image(img)       # 3 x H x W RGB 0..255
        masks, logits = p.predict(boxes=boxes)             # N x 1 x H x W bool, float

    Runs without gradients; the model's mode is left as it is (train and eval compute the same).
    """

    def __init__(self, model: CATSAM) -> None:
        self.model = model
        self.features: Optional[CATSAMFeatures] = None

    @torch.no_grad()
    def set_image(self, image: torch.Tensor) -> CATSAMFeatures:
        """Encode ``image`` (3 x H x W, float RGB 0..255) once; returns the cached features."""
        self.features = self.model.embed([image])
        return self.features

    def reset_image(self) -> None:
        self.features = None

    @torch.no_grad()
    def predict(self, boxes: Prompt = None, points: Prompt = None, point_labels: Prompt = None,
                noisy_masks: Prompt = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Prompts of the current image in original pixels: boxes N x 4 or 4; points N x K x 2
        (N prompts) or K x 2 (one prompt of K points), labels default 1; no prompt: one empty prompt.
        Returns (masks N x 1 x H x W bool = logits > 0, logits N x 1 x H x W)."""
        if self.features is None:
            raise RuntimeError("call set_image before predict")
        logits = self.model(features=self.features, boxes=[boxes], points=[points], point_labels=[point_labels],
                            noisy_masks=[noisy_masks])[0]
        return logits > self.model.mask_threshold, logits

    def predict_union(self, boxes: Prompt = None) -> torch.Tensor:
        """The test protocol's prediction (SPEC_CAT_SAM 9): one box per object (N x 4), the N masks
        united -> H x W bool; no box (None or 0 x 4): the empty-prompt mask."""
        masks, _ = self.predict(boxes=boxes)
        return masks.any(0)[0]
