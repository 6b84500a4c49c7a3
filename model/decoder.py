"""The trainable SAM-RSP head (SPEC 1, steps 5-9).

Inputs: the SAM image embedding ``F`` (B x C x g x g, C = 256, g = 64) and the rough
segmentation prompt resized to the token grid ``P`` (B x 2 x g x g). Steps:

1. pixel-level query prototype (:func:`pixel_prototype`, no gradient);
2. ``init_merge``: cat[F, prototype, P, diff(P)] (2C + 3) -> Conv1x1 -> C, ReLU;
3. ``depth`` segment-anything ``Block``s on B x g x g x C tokens; after every block but the
   last a side head ``inner_cls[i]`` (2-channel logits) and ``beta_conv[i]`` fusing
   cat[block output, side logits, diff(side logits)] back to C channels. ``side_head``
   chooses what the side head reads: ``"input"`` the block's input (HEAD dfe871c, its
   NHWC/NCHW crash fixed), ``"output"`` the block's output (commit e10510b);
4. ``q = res2(x) + x``; ``logits = cls(q)`` (B x 2 x g x g).

State-dict names are the original's (``init_merge.0``, ``blocks.{i}.*``, ``inner_cls.{i}.{0,3}``,
``beta_conv.{i}.0``, ``res2.{0,2}``, ``cls.{0,3}``).
"""
from __future__ import annotations

import math
from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Block

from .common import diff_map, residual_convs, two_class_head

SIDE_HEADS = ("input", "output")


@torch.no_grad()
def pixel_prototype(features: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """Pixel-level query prototype, batched (one bmm per product for the whole batch).

    features: B x C x h x w (F), prompt: B x 2 x h x w (P) -> B x C x h x w.

    With f = F as B x C x N: ``A = f^T f / sqrt(C)`` (B x N x N, query p by key j), each row
    min-max normalised over the keys (eps 1e-7); key column j scaled by ``clamp(P[1] - P[0], 0)``
    at j (the raw difference); values <= 0 set to -1e7; softmax over the keys;
    ``proto[c, p] = sum_j A[p, j] f[c, j]``. With no positive prompt pixel every row is uniform
    and the prototype is the mean feature. Computed in float32 whatever the autocast state.
    """
    b, c, h, w = features.shape
    with torch.autocast(device_type=features.device.type, enabled=False):
        f = features.float().reshape(b, c, h * w)
        attn = torch.bmm(f.transpose(1, 2), f) / math.sqrt(c)                  # B x N x N
        low = attn.min(2, keepdim=True)[0]
        high = attn.max(2, keepdim=True)[0]
        attn = (attn - low) / (high - low + 1e-7)
        scale = (prompt[:, 1] - prompt[:, 0]).float().reshape(b, 1, h * w).clamp(min=0)
        attn = F.threshold(attn * scale, 0, -1e7).softmax(2)
        proto = torch.bmm(attn, f.transpose(1, 2))                              # B x N x C
    return proto.transpose(1, 2).reshape(b, c, h, w).to(features.dtype)


class SAMRSPDecoder(nn.Module):
    """The prompt-transformer head.

    forward(image_embedding B x C x g x g, prompt B x 2 x g x g) ->
    ``{"logits": B x 2 x g x g, "aux_logits": [B x 2 x g x g] * (depth - 1)}``.
    """

    def __init__(self, *, embed_dim: int = 256, grid_size: int = 64, depth: int = 3, num_heads: int = 16,
                 mlp_ratio: float = 4.0, window_size: int = 14, inner_dim: int = 8,
                 side_head: str = "input") -> None:
        super().__init__()
        if side_head not in SIDE_HEADS:
            raise ValueError(f"side_head must be one of {SIDE_HEADS}, got {side_head!r}")
        if depth < 1:
            raise ValueError(f"decoder depth must be >= 1, got {depth}")
        c = embed_dim
        self.side_head = side_head
        self.init_merge = nn.Sequential(nn.Conv2d(2 * c + 3, c, kernel_size=1, bias=False), nn.ReLU(inplace=True))
        self.blocks = nn.ModuleList([
            Block(dim=c, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=nn.LayerNorm,
                  act_layer=nn.GELU, use_rel_pos=True, rel_pos_zero_init=True, window_size=window_size,
                  input_size=(grid_size, grid_size))
            for _ in range(depth)])
        self.inner_cls = nn.ModuleList([two_class_head(c, hidden=inner_dim) for _ in range(depth - 1)])
        self.beta_conv = nn.ModuleList([
            nn.Sequential(nn.Conv2d(c + 3, c, kernel_size=1, bias=False), nn.ReLU(inplace=True))
            for _ in range(depth - 1)])
        self.res2 = residual_convs(c)
        self.cls = two_class_head(c)

    def forward(self, image_embedding: torch.Tensor, prompt: torch.Tensor) -> Dict[str, object]:
        prompt_diff = diff_map(prompt)
        prototype = pixel_prototype(image_embedding, prompt)
        merge = self.init_merge(torch.cat([image_embedding, prototype, prompt, prompt_diff], 1))
        tokens = merge.permute(0, 2, 3, 1)                                      # B x g x g x C
        aux_logits: List[torch.Tensor] = []
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            out = block(tokens)
            if i == last:
                tokens = out
                break
            side_in = tokens if self.side_head == "input" else out
            side = self.inner_cls[i](side_in.permute(0, 3, 1, 2))
            aux_logits.append(side)
            fused = self.beta_conv[i](torch.cat([out.permute(0, 3, 1, 2), side, diff_map(side)], 1))
            tokens = fused.permute(0, 2, 3, 1)
        query = tokens.permute(0, 3, 1, 2)
        query = self.res2(query) + query
        return {"logits": self.cls(query), "aux_logits": aux_logits}
