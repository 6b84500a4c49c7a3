"""segment-anything's ``Attention`` computed with ``torch.nn.functional.scaled_dot_product_attention``.

:class:`SDPAAttention` subclasses segment-anything's ``Attention``: same parameters, same
state-dict keys, same numbers (within float rounding). The decomposed relative-position bias is
passed to SDPA as a float ``attn_mask``; as in segment-anything it is computed from the UNSCALED
query, while SDPA applies the ``1/sqrt(head_dim)`` scale to ``q k^T`` itself. Queries are
processed in chunks of whole token rows so that the bias of one chunk,
``(B*heads) x chunk x N``, stays below :data:`MAX_BIAS_ELEMENTS` elements (global attention of
ViT-L/H at 64x64 tokens would otherwise need a 1 GB bias per image). Small chunks are also
faster: a bias that stays in the CPU cache while SDPA reads it (measured on a 2-core Zen 4,
ViT-L global attention at 64x64 tokens: 1.06 s with 16 MB chunks against 1.51 s with 128 MB).

:func:`set_attention` switches every ``Attention`` inside a module between the two
implementations by swapping the instance's class; parameters are untouched.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as activation_checkpoint
from segment_anything.modeling.image_encoder import Attention, get_rel_pos

MAX_BIAS_ELEMENTS = 1 << 22  # 4M elements = 16 MB in float32 per chunk: one token row of ViT-L/H global attention

ATTENTION_IMPLS = ("sdpa", "reference")


class SDPAAttention(Attention):
    """Multi-head attention with decomposed relative-position bias, via SDPA.

    x: B x H x W x C -> B x H x W x C (tokens on an HxW grid, as segment-anything's ``Attention``).

    ``checkpoint_chunks`` (an instance attribute, default False): when gradients are enabled,
    recompute each query chunk's bias and attention in the backward pass instead of keeping them
    (``torch.utils.checkpoint``, non-reentrant). SDPA's math kernel with a float mask saves the
    chunk's bias and attention probabilities for backward: for a frozen ViT that gradients flow
    through (CAT-SAM), that is (B*heads) x N x N per global block, several times the rest of
    the block's activations. CAT-SAM switches it on with ``checkpoint_encoder``.
    """

    checkpoint_chunks: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = x.shape
        tokens = height * width
        # q, k, v: B x heads x N x head_dim
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if not self.use_rel_pos:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            rel_h_table = get_rel_pos(height, height, self.rel_pos_h)   # H x H x head_dim
            rel_w_table = get_rel_pos(width, width, self.rel_pos_w)     # W x W x head_dim
            per_row = batch * self.num_heads * width * tokens
            rows = max(1, min(height, MAX_BIAS_ELEMENTS // max(per_row, 1)))
            recompute = self.checkpoint_chunks and torch.is_grad_enabled()
            chunks = []
            for r0 in range(0, height, rows):
                r1 = min(height, r0 + rows)
                args = (q[:, :, r0 * width:r1 * width], k, v, rel_h_table[r0:r1], rel_w_table)
                chunks.append(activation_checkpoint.checkpoint(self._chunk, *args, use_reentrant=False)
                              if recompute else self._chunk(*args))
            out = chunks[0] if len(chunks) == 1 else torch.cat(chunks, 2)
        out = out.view(batch, self.num_heads, height, width, -1).permute(0, 2, 3, 1, 4)
        return self.proj(out.reshape(batch, height, width, -1))

    def _chunk(self, q_chunk: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h_rows: torch.Tensor,
               rel_w_table: torch.Tensor) -> torch.Tensor:
        """Attention of the query rows ``q_chunk`` (B x heads x rows*W x head_dim) over all tokens,
        with their decomposed relative-position bias (rows x H x head_dim, W x W x head_dim)."""
        batch, heads, _, _ = q_chunk.shape
        rows, width = rel_h_rows.shape[0], rel_w_table.shape[0]
        grid_q = q_chunk.reshape(batch, heads, rows, width, -1)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, rel_h_rows)
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid_q, rel_w_table)
        bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(batch, heads, rows * width, k.shape[2])
        return F.scaled_dot_product_attention(q_chunk, k, v, attn_mask=bias.to(q_chunk.dtype), scale=self.scale)


def set_attention(module: nn.Module, impl: str) -> nn.Module:
    """Use ``impl`` (``"sdpa"`` | ``"reference"``) for every segment-anything Attention in ``module``."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention implementation must be one of {ATTENTION_IMPLS}, got {impl!r}")
    cls = SDPAAttention if impl == "sdpa" else Attention
    for m in module.modules():
        if isinstance(m, Attention):
            m.__class__ = cls
    return module
