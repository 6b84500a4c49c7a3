"""segment-anything's ``ImageEncoderViT``, built by name with every number overridable.

``vit_b`` / ``vit_l`` / ``vit_h`` use segment-anything's registry numbers; all: patch 16,
mlp_ratio 4, out_chans 256, qkv_bias, absolute and (zero-initialised) relative positions,
window 14. The token grid is ``img_size // patch_size`` (64 at 1024).

LayerNorm eps: segment-anything's registry uses 1e-6, but the original SAM-RSP builds its ViT
with ``nn.LayerNorm``'s default, 1e-5 (the parity fixture proves it: with 1e-6 the final
logits differ by 9e-4, with 1e-5 by 8e-6). The default here is the original's 1e-5;
``layer_norm_eps`` (config ``model.sam.layer_norm_eps``) selects SAM's 1e-6. The neck's
LayerNorm2d keeps its fixed 1e-6 in both.
"""
from __future__ import annotations

from functools import partial
from typing import Optional, Sequence

import torch.nn as nn
from segment_anything.modeling.image_encoder import ImageEncoderViT

from .attention import set_attention

SAM_ENCODER_SPECS = {
    "vit_b": {"embed_dim": 768, "depth": 12, "num_heads": 12, "global_attn_indexes": (2, 5, 8, 11)},
    "vit_l": {"embed_dim": 1024, "depth": 24, "num_heads": 16, "global_attn_indexes": (5, 11, 17, 23)},
    "vit_h": {"embed_dim": 1280, "depth": 32, "num_heads": 16, "global_attn_indexes": (7, 15, 23, 31)},
}

# The official checkpoint file of each type (https://github.com/facebookresearch/segment-anything#model-checkpoints).
SAM_CHECKPOINT_NAMES = {"vit_b": "sam_vit_b_01ec64.pth", "vit_l": "sam_vit_l_0b3195.pth",
                        "vit_h": "sam_vit_h_4b8939.pth"}


def build_sam_encoder(type: str = "vit_l", *, img_size: int = 1024, patch_size: int = 16,
                      embed_dim: Optional[int] = None, depth: Optional[int] = None,
                      num_heads: Optional[int] = None, global_attn_indexes: Optional[Sequence[int]] = None,
                      window_size: int = 14, out_chans: int = 256, layer_norm_eps: float = 1e-5,
                      attention: str = "sdpa") -> ImageEncoderViT:
    """An ``ImageEncoderViT`` of type ``vit_b | vit_l | vit_h``; ``None`` numbers come from the type.

    The encoder maps B x 3 x img_size x img_size to B x out_chans x g x g, g = img_size // patch_size.
    ``attention`` selects the Attention implementation (see :mod:`model.attention`).
    """
    if type not in SAM_ENCODER_SPECS:
        raise ValueError(f"unknown SAM encoder type {type!r}; choose one of {', '.join(SAM_ENCODER_SPECS)}")
    if img_size % patch_size:
        raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
    spec = SAM_ENCODER_SPECS[type]
    encoder = ImageEncoderViT(
        img_size=img_size, patch_size=patch_size,
        embed_dim=spec["embed_dim"] if embed_dim is None else embed_dim,
        depth=spec["depth"] if depth is None else depth,
        num_heads=spec["num_heads"] if num_heads is None else num_heads,
        global_attn_indexes=tuple(spec["global_attn_indexes"] if global_attn_indexes is None
                                  else global_attn_indexes),
        mlp_ratio=4.0, out_chans=out_chans, qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=layer_norm_eps), act_layer=nn.GELU, use_abs_pos=True,
        use_rel_pos=True, rel_pos_zero_init=True, window_size=window_size)
    return set_attention(encoder, attention)
