"""SCCAN's self-calibrated cross-attention (SCCA) transformer (SPEC_SCCAN 1.5, 2.2).

A stack of ``depth`` SCCA blocks on a query and a support token stream of the same g x g grid
(g = 64, C = 256), followed by ``norm0``. Block i works on windows of ``ws x ws`` tokens; odd
blocks "shift" by zero-padding ``ws // 2`` tokens on every side (no roll, no attention mask).
Per block:

1. patch alignment: every query window picks the most similar support FOREGROUND window
   (:func:`patch_alignment`, an argmax of a cosine score);
2. query attention: a query window attends jointly (one softmax) over its own 64 tokens (scaled
   dot product) and the aligned support window's 64 tokens (plain cosine);
3. support self-attention in the support's own windows;
4. pre-norm residual MLPs for both streams.

Everything is batched: windows by reshape/permute, the alignment by one ``gather``, the
attention over all B * nW windows at once. State-dict names are the original's:
``layers.0.blocks.{i}.{norm1,norm2,attn_q,attn_s,mlp_q,mlp_s}.*`` and ``norm0.*``.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

ALIGN_MASK_EPS = 5e-4   # window mask sum + eps (SPEC_SCCAN 1.5.3)
COSINE_EPS = 1e-7


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """B x H x W x C -> B x nW x ws*ws x C, windows numbered row-major, tokens row-major inside."""
    b, h, w, c = x.shape
    ws = window_size
    x = x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // ws) * (w // ws), ws * ws, c)


def window_reverse(windows: torch.Tensor, window_size: int, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: B x nW x ws*ws x C -> B x H x W x C."""
    b, _, _, c = windows.shape
    ws = window_size
    x = windows.view(b, height // ws, width // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, height, width, c)


def patch_alignment(query: torch.Tensor, support: torch.Tensor, mask: torch.Tensor,
                    window_size: int) -> torch.Tensor:
    """Index of the support window aligned to each query window (SPEC_SCCAN 1.5.3).

    query, support: B x H x W x C (normalised, padded tokens), mask: B x H x W x 1 -> LongTensor
    B x nW (nW = (H / ws) * (W / ws), windows row-major).

    ``qp`` = mean of each query window; ``M`` = avg_pool(m) * ws^2 + 5e-4;
    ``sp`` = avg_pool(s * m) * ws^2 / M (masked window mean); ``gate`` = 0 where ``M == 5e-4``
    exactly (no foreground in the window), else 1;
    ``score[w', w] = (cos(sp_w', qp_w) + 1) / 2 * gate_w'`` with ``cos = a.b / (|a| |b| + 1e-7)``;
    ``idx[w] = argmax_w' score`` (torch.max: the first maximal index on CPU). The score decides a
    discrete choice with near ties under random weights, so it is computed exactly in this order,
    in float32 whatever the autocast state.
    """
    ws = window_size
    area = ws * ws
    with torch.autocast(device_type=query.device.type, enabled=False):
        q = query.float().permute(0, 3, 1, 2)                             # B x C x H x W
        s = support.float().permute(0, 3, 1, 2)
        m = mask.float().permute(0, 3, 1, 2)                              # B x 1 x H x W
        q_proto = F.avg_pool2d(q, ws).flatten(2)                          # B x C x nW
        m_sum = F.avg_pool2d(m, ws) * area + ALIGN_MASK_EPS               # B x 1 x nh x nw
        s_proto = (F.avg_pool2d(s * m, ws) * area / m_sum).flatten(2)     # B x C x nW
        gate = (m_sum != ALIGN_MASK_EPS).float().flatten(2).transpose(1, 2)   # B x nW' x 1
        q_norm = torch.norm(q_proto, 2, 1, True)                          # B x 1 x nW
        s_norm = torch.norm(s_proto, 2, 1, True)                          # B x 1 x nW'
        cosine = torch.bmm(s_proto.transpose(1, 2), q_proto) / (
            torch.bmm(s_norm.transpose(1, 2), q_norm) + COSINE_EPS)       # B x nW' x nW
        score = (cosine + 1) / 2 * gate
        return score.max(1)[1]                                            # B x nW


class SCCAttention(nn.Module):
    """Window attention with an optional aligned (cross) window (SPEC_SCCAN 1.5.4-5).

    forward(x N x T x C, aligned N x T x C | None) -> N x T x C, N = windows, T = tokens per window.

    ``Q = q(x)``; ``[K | V] = kv(cat[x, aligned])`` (K = channels [0:C], V = [C:2C], head h =
    channels hd..hd+d-1 of each). Per head: self logits ``Q K_x^T * d^-0.5``; with ``aligned``
    also cross logits ``cos(Q, K_aligned)`` (norms over the d head channels, eps 1e-7, no scale),
    concatenated after the self logits and soft-maxed TOGETHER over the 2T keys; out = softmax @ V,
    heads concatenated head-major, ``proj``. Without ``aligned``: plain scaled dot-product
    self-attention (the support stream's ``attn_s``).
    """

    def __init__(self, *, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = int(num_heads)
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, aligned: torch.Tensor | None = None) -> torch.Tensor:
        n, t, c = x.shape
        h = self.num_heads
        q = self.q(x).view(n, t, h, c // h).transpose(1, 2)                         # N x h x T x d
        source = x if aligned is None else torch.cat([x, aligned], 1)
        kv = self.kv(source).view(n, source.shape[1], 2, h, c // h).permute(2, 0, 3, 1, 4)
        k, v = kv[0], kv[1]                                                          # N x h x T(2T) x d
        logits = (q @ k[:, :, :t].transpose(-2, -1)) * self.scale                    # N x h x T x T
        if aligned is not None:
            k_al = k[:, :, t:]
            cross = (q @ k_al.transpose(-2, -1)) / (
                q.norm(dim=-1, keepdim=True) @ k_al.norm(dim=-1, keepdim=True).transpose(-2, -1) + COSINE_EPS)
            logits = torch.cat([logits, cross], -1)                                  # N x h x T x 2T
        out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(n, t, c)
        return self.proj(out)


class Mlp(nn.Module):
    """fc1 -> GELU (exact) -> fc2: ... x C -> ... x C (hidden = C * mlp_ratio)."""

    def __init__(self, *, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SCCABlock(nn.Module):
    """One SCCA block (SPEC_SCCAN 1.5). ``shift``: zero-pad ``ws // 2`` on every side after norm1.

    forward(query B x L x C, support B x L x C, mask B x L x 1, size (H, W), L = H * W) ->
    (query, support, align_index LongTensor B x nW).
    ``norm1`` and ``norm2`` are shared by both streams; both updates read the block's input.
    """

    def __init__(self, *, dim: int, num_heads: int, window_size: int, shift: bool, mlp_ratio: float) -> None:
        super().__init__()
        self.window_size = int(window_size)
        self.pad = self.window_size // 2 if shift else 0
        self.norm1 = nn.LayerNorm(dim)
        self.attn_q = SCCAttention(dim=dim, num_heads=num_heads)
        self.attn_s = SCCAttention(dim=dim, num_heads=num_heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp_q = Mlp(dim=dim, hidden=hidden)
        self.mlp_s = Mlp(dim=dim, hidden=hidden)

    def forward(self, query: torch.Tensor, support: torch.Tensor, mask: torch.Tensor,
                size: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, length, c = query.shape
        height, width = size
        ws, p = self.window_size, self.pad
        q = self.norm1(query).view(b, height, width, c)
        s = self.norm1(support).view(b, height, width, c)
        m = mask.view(b, height, width, 1)
        if p:  # the "shift": zero padding AFTER norm1, so padded tokens are exact zeros (1.5.2)
            q, s, m = (F.pad(t, (0, 0, p, p, p, p)) for t in (q, s, m))
        hp, wp = height + 2 * p, width + 2 * p
        index = patch_alignment(q, s, m, ws)                                  # B x nW
        q_win = window_partition(q, ws)                                       # B x nW x T x C
        s_win = window_partition(s, ws)
        aligned = torch.gather(s_win, 1, index[:, :, None, None].expand(-1, -1, *s_win.shape[2:]))
        out_q = self.attn_q(q_win.flatten(0, 1), aligned.flatten(0, 1)).view_as(q_win)
        out_s = self.attn_s(s_win.flatten(0, 1)).view_as(s_win)
        out_q = window_reverse(out_q, ws, hp, wp)[:, p:p + height, p:p + width].reshape(b, length, c)
        out_s = window_reverse(out_s, ws, hp, wp)[:, p:p + height, p:p + width].reshape(b, length, c)
        query = query + out_q
        query = query + self.mlp_q(self.norm2(query))
        support = support + out_s
        support = support + self.mlp_s(self.norm2(support))
        return query, support, index


class SCCAStage(nn.Module):
    """The blocks (state-dict ``blocks.{i}``); block i is shifted when i is odd."""

    def __init__(self, *, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([
            SCCABlock(dim=dim, num_heads=num_heads, window_size=window_size, shift=i % 2 == 1,
                      mlp_ratio=mlp_ratio) for i in range(depth)])


class SCCATransformer(nn.Module):
    """``layers.0`` (the SCCA blocks) + ``norm0`` (SPEC_SCCAN 1.5).

    forward(query B x C x H x W, support B x C x H x W, mask B x 1 x H x W) ->
    (B x C x H x W = norm0 of the final query tokens, [align_index B x nW_i for each block]).
    H and W must be multiples of ``window_size``. The mask is never updated across blocks.
    """

    def __init__(self, *, dim: int = 256, depth: int = 8, num_heads: int = 8, window_size: int = 8,
                 mlp_ratio: float = 1.0) -> None:
        super().__init__()
        self.window_size = int(window_size)
        self.layers = nn.ModuleList([SCCAStage(dim=dim, depth=depth, num_heads=num_heads,
                                               window_size=window_size, mlp_ratio=mlp_ratio)])
        self.norm0 = nn.LayerNorm(dim)

    def forward(self, query: torch.Tensor, support: torch.Tensor,
                mask: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        b, c, h, w = query.shape
        if h % self.window_size or w % self.window_size:
            raise ValueError(f"the token grid {h}x{w} is not a multiple of the window size {self.window_size}")
        q = query.flatten(2).transpose(1, 2)                                  # B x HW x C (row-major)
        s = support.flatten(2).transpose(1, 2)
        m = mask.flatten(2).transpose(1, 2)                                   # B x HW x 1
        indices = []
        for layer in self.layers:
            for block in layer.blocks:
                q, s, index = block(q, s, m, (h, w))
                indices.append(index)
        out = self.norm0(q)
        return out.transpose(1, 2).reshape(b, c, h, w), indices
