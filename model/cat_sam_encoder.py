"""CAT-SAM's image encoder: segment-anything's frozen ``ImageEncoderViT`` plus the encoder-side
tuning module conditioned on the CAT token through a prompt bridge (SPEC_CAT_SAM 3.4, 3.5).

* ``"t"`` (CAT-SAM-T): bridge PB-T, one MLP per block (``hq_token_proj.{i}.adapter``,
  Linear(256, 64) -> GELU -> Linear(64, C)) maps the CAT token to a 1 x 1 x C prompt token that
  block i concatenates BEFORE the spatial tokens of every attention window (deep prompting, one
  token per block, not carried over; :func:`attention_with_token`).
* ``"a"`` (CAT-SAM-A): EVP's :class:`PromptGenerator` (patch-embedding tuning + FFT high-pass
  handcrafted feature) plus bridge PB-A (``hq_token_down_proj.{j}.adapter``, c branches
  Linear(256, 32) -> GELU, one ``shared_up_proj`` Linear(32, g*g)) whose output is added to the
  generator's joint feature; block i gets ``x + prompt_i`` as input.
* ``None``: SAM's encoder unchanged (decoder-only and zero-shot variants).

The frozen ViT is shared, not copied: the wrapper holds it as ``sam_img_encoder`` (and the CAT
token as ``hq_token``, the same Parameter as the decoder's ``hf_token.weight``), which gives the
original's state-dict names (SPEC_CAT_SAM 5).

Shapes: images B x 3 x S x S (normalised), g = S / patch (64), C = ViT width, c = C / 32.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.utils.checkpoint as activation_checkpoint
from segment_anything.modeling.image_encoder import (Attention, Block, ImageEncoderViT, get_rel_pos,
                                                     window_partition, window_unpartition)

from .attention import SDPAAttention

ENCODER_TUNINGS = (None, "t", "a")


class Adapter(nn.Module):
    """A bridge branch: ``adapter`` is an ``nn.Sequential`` (keys ``adapter.{0,2}`` for PB-T,
    ``adapter.0`` for PB-A). forward: ... x in -> ... x out."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.adapter = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(x)


# ---------------------------------------------------------------------------------------------
# CAT-SAM-T: attention with one extra prompt token per window (SPEC_CAT_SAM 3.4)
# ---------------------------------------------------------------------------------------------

def attention_with_token(attn: Attention, x: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """segment-anything's ``Attention`` with ``token`` prepended to the keys/values of every window.

    x: B x h x w x C (B = images x windows; already norm1-ed), token: 1 x 1 x C (NOT normalised)
    -> B x h x w x C. The block's frozen qkv / proj / scale / heads are used; the decomposed
    relative-position bias is added only between spatial tokens (zero in the token's column);
    the softmax runs over 1 + h*w keys. The token's own output row is dropped by the original,
    so its query is not computed here (softmax rows are independent: same numbers).
    """
    batch, height, width, dim = x.shape
    tokens = height * width
    heads = attn.num_heads
    seq = torch.cat([token.to(x.dtype).expand(batch, 1, dim), x.reshape(batch, tokens, dim)], dim=1)
    # qkv: 3 x (B * heads) x (1 + n) x head_dim
    qkv = attn.qkv(seq).reshape(batch, 1 + tokens, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, batch * heads, 1 + tokens, -1).unbind(0)
    q = q[:, 1:]                                                        # spatial queries only
    scores = (q * attn.scale) @ k.transpose(-2, -1)                     # (B*heads) x n x (1 + n)
    if attn.use_rel_pos:
        rel_h_table = get_rel_pos(height, height, attn.rel_pos_h)       # h x h x head_dim
        rel_w_table = get_rel_pos(width, width, attn.rel_pos_w)         # w x w x head_dim
        grid_q = q.reshape(batch * heads, height, width, -1)
        rel_h = torch.einsum("bhwc,hkc->bhwk", grid_q, rel_h_table)
        rel_w = torch.einsum("bhwc,wkc->bhwk", grid_q, rel_w_table)
        spatial = (scores[..., 1:].reshape(batch * heads, height, width, height, width)
                   + rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).reshape(batch * heads, tokens, tokens)
        scores = torch.cat([scores[..., :1], spatial], dim=-1)
    out = scores.softmax(dim=-1) @ v                                    # (B*heads) x n x head_dim
    out = out.view(batch, heads, height, width, -1).permute(0, 2, 3, 1, 4).reshape(batch, height, width, -1)
    return attn.proj(out)


def block_forward(block: Block, x: torch.Tensor, token: Optional[torch.Tensor] = None) -> torch.Tensor:
    """segment-anything's ``Block.forward`` with an optional prompt token in its attention.

    x: B x g x g x C -> B x g x g x C; token: 1 x 1 x C or None (then exactly ``block(x)``).
    """
    if token is None:
        return block(x)
    shortcut = x
    x = block.norm1(x)
    if block.window_size > 0:
        height, width = x.shape[1], x.shape[2]
        x, pad_hw = window_partition(x, block.window_size)
    x = attention_with_token(block.attn, x, token)
    if block.window_size > 0:
        x = window_unpartition(x, block.window_size, pad_hw, (height, width))
    x = shortcut + x
    return x + block.mlp(block.norm2(x))


# ---------------------------------------------------------------------------------------------
# CAT-SAM-A: EVP prompt generator (SPEC_CAT_SAM 3.5)
# ---------------------------------------------------------------------------------------------

def fft_high_pass(images: torch.Tensor, rate: float = 0.25) -> torch.Tensor:
    """EVP's handcrafted input: |ifft2(high-pass(fft2(x)))|.

    images: B x 3 x S x S -> B x 3 x S x S. fft2 and ifft2 with norm "forward"; after fftshift
    the centred block of side ``2 * int(sqrt(S * S * rate) // 2)`` (512 at S = 1024, rate 0.25)
    is zeroed; real part, absolute value. (The original shifts over all dims, batch and channel
    included; with a mask equal for every image and channel that is the spatial shift used here.)
    """
    height, width = images.shape[-2:]
    line = int(math.sqrt(height * width * rate) // 2)
    spectrum = torch.fft.fftshift(torch.fft.fft2(images.float(), norm="forward"), dim=(-2, -1))
    keep = torch.ones(height, width, device=images.device)
    keep[height // 2 - line:height // 2 + line, width // 2 - line:width // 2 + line] = 0
    spectrum = torch.fft.ifftshift(spectrum * keep, dim=(-2, -1))
    return torch.fft.ifft2(spectrum, norm="forward").real.abs().to(images.dtype)


class HighPassPatchEmbed(nn.Module):
    """EVP's ``PatchEmbed2``: ``proj`` Conv2d(3, c, patch, stride patch).

    high-pass image B x 3 x S x S -> B x c x g x g.
    """

    def __init__(self, *, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 24) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class PromptGenerator(nn.Module):
    """EVP / SAM-Adapter's PromptGenerator (scale_factor 32, input "fft", freq_nums 0.25,
    handcrafted and embedding tuning on).

    Keys: ``shared_mlp`` Linear(c, C), ``embedding_generator`` Linear(C, c),
    ``lightweight_mlp_{i}.0`` Linear(c, c) per block, ``prompt_generator.proj`` Conv2d(3, c, p, p).
    Init (SPEC_CAT_SAM 3.5): Linear trunc_normal(std 0.02, clipped at +-2), bias 0; conv
    normal(0, sqrt(2 / (p * p * c))), bias 0.
    """

    def __init__(self, *, embed_dim: int, depth: int, scale_factor: int = 32, patch_size: int = 16,
                 freq_nums: float = 0.25) -> None:
        super().__init__()
        if embed_dim % scale_factor:
            raise ValueError(f"embed_dim {embed_dim} is not a multiple of the EVP scale factor {scale_factor}")
        self.embed_dim = embed_dim
        self.depth = depth
        self.freq_nums = freq_nums
        self.hidden_dim = embed_dim // scale_factor
        c = self.hidden_dim
        self.shared_mlp = nn.Linear(c, embed_dim)
        self.embedding_generator = nn.Linear(embed_dim, c)
        for i in range(depth):
            self.add_module(f"lightweight_mlp_{i}", nn.Sequential(nn.Linear(c, c), nn.GELU()))
        self.prompt_generator = HighPassPatchEmbed(patch_size=patch_size, in_chans=3, embed_dim=c)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            nn.init.zeros_(m.bias)

    def embedding_feature(self, patches: torch.Tensor) -> torch.Tensor:
        """Patch embedding BEFORE the absolute positions, B x g x g x C -> B x g*g x c (row-major)."""
        return self.embedding_generator(patches.flatten(1, 2))

    def handcrafted_feature(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images B x 3 x S x S -> B x c x g x g (FFT high-pass, then ``prompt_generator``)."""
        return self.prompt_generator(fft_high_pass(images, self.freq_nums))

    def prompt(self, joint: torch.Tensor, index: int) -> torch.Tensor:
        """Block ``index``'s additive prompt: shared_mlp(GELU(lightweight_mlp_i(joint))).

        joint: B x g*g x c -> B x g*g x C.
        """
        return self.shared_mlp(getattr(self, f"lightweight_mlp_{index}")(joint))


# ---------------------------------------------------------------------------------------------
# The wrapper
# ---------------------------------------------------------------------------------------------

class CATImageEncoder(nn.Module):
    """forward(images B x 3 x S x S, normalised) -> (image_embeddings B x out_chans x g x g,
    interm_embeddings: [B x g x g x C], one per global-attention block).

    ``tuning``: ``"t"`` | ``"a"`` | None (see the module docstring). ``cat_token``: the decoder's
    CAT token Parameter (1 x 256), registered here as ``hq_token`` (not with ``tuning=None``).
    ``checkpoint_blocks``: recompute each ViT block in the backward pass
    (``torch.utils.checkpoint``, non-reentrant) when gradients flow through the encoder.
    """

    def __init__(self, *, sam_img_encoder: ImageEncoderViT, tuning: Optional[str] = None,
                 cat_token: Optional[nn.Parameter] = None, token_dim: int = 256, pb_t_hidden_dim: int = 64,
                 evp_scale_factor: int = 32, pb_a_hidden_dim: int = 32, freq_nums: float = 0.25,
                 checkpoint_blocks: bool = False) -> None:
        super().__init__()
        if tuning not in ENCODER_TUNINGS:
            raise ValueError(f"encoder tuning must be one of {ENCODER_TUNINGS}, got {tuning!r}")
        if tuning is not None and cat_token is None:
            raise ValueError("the encoder tuning of CAT-SAM-T/A needs the decoder's CAT token (cat_token)")
        self.tuning = tuning
        if tuning is not None:
            self.hq_token = cat_token          # the same Parameter as mask_decoder.hf_token.weight
        self.sam_img_encoder = sam_img_encoder
        self.checkpoint_blocks = bool(checkpoint_blocks)
        embed_dim = sam_img_encoder.patch_embed.proj.out_channels
        depth = len(sam_img_encoder.blocks)
        patch_size = sam_img_encoder.patch_embed.proj.kernel_size[0]
        self.grid_size = sam_img_encoder.img_size // patch_size
        if tuning == "t":
            # PB-T (SPEC_CAT_SAM 3.4): one MLP per block, PyTorch default Linear init.
            self.hq_token_proj = nn.ModuleList(
                Adapter(nn.Linear(token_dim, pb_t_hidden_dim), nn.GELU(), nn.Linear(pb_t_hidden_dim, embed_dim))
                for _ in range(depth))
        elif tuning == "a":
            self.prompt_generator = PromptGenerator(embed_dim=embed_dim, depth=depth, scale_factor=evp_scale_factor,
                                                    patch_size=patch_size, freq_nums=freq_nums)
            # PB-A (SPEC_CAT_SAM 3.5): c branches, one shared up-projection to g*g.
            self.hq_token_down_proj = nn.ModuleList(
                Adapter(nn.Linear(token_dim, pb_a_hidden_dim), nn.GELU())
                for _ in range(self.prompt_generator.hidden_dim))
            self.shared_up_proj = nn.Linear(pb_a_hidden_dim, self.grid_size * self.grid_size)

    # -- bridges ----------------------------------------------------------------------------

    def block_tokens(self) -> List[torch.Tensor]:
        """CAT-SAM-T: token_i = PB-T_i(CAT token), L tensors 1 x 1 x C (image-independent)."""
        return [proj(self.hq_token).unsqueeze(0) for proj in self.hq_token_proj]

    def hq_feature(self) -> torch.Tensor:
        """CAT-SAM-A: PB-A(CAT token) -> 1 x g*g x c (branch j = column j)."""
        return torch.stack([self.shared_up_proj(branch(self.hq_token)) for branch in self.hq_token_down_proj],
                           dim=-1).reshape(1, self.grid_size * self.grid_size, -1)

    # -- forward ----------------------------------------------------------------------------

    @property
    def checkpoint_blocks(self) -> bool:
        return self._checkpoint_blocks

    @checkpoint_blocks.setter
    def checkpoint_blocks(self, value: bool) -> None:
        """Global-attention blocks recompute their attention per query chunk instead
        (``SDPAAttention.checkpoint_chunks``): there the bias and probabilities of the
        (B*heads) x N x N attention are the peak, and the rest of the block is small."""
        self._checkpoint_blocks = bool(value)
        for block in self.sam_img_encoder.blocks:
            block.attn.checkpoint_chunks = bool(value) and block.window_size == 0

    def _chunk_checkpointed(self, block: Block, token: Optional[torch.Tensor]) -> bool:
        """The block's memory is bounded by its attention's per-chunk recomputation (an SDPA global
        block without a prompt token), so the whole block need not be recomputed."""
        return token is None and bool(getattr(block.attn, "checkpoint_chunks", False)) \
            and isinstance(block.attn, SDPAAttention)

    def _run(self, fn, *args: torch.Tensor, whole_block: bool = True) -> torch.Tensor:
        """``fn(*args)``; with ``checkpoint_blocks`` and gradients, recomputed in backward
        (non-reentrant) unless ``whole_block`` is False (the block checkpoints its attention chunks)."""
        if self.checkpoint_blocks and whole_block and torch.is_grad_enabled():
            return activation_checkpoint.checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward(self, images: torch.Tensor,
                trace: Optional[Dict[str, object]] = None) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """See the class docstring. ``trace`` (a dict, for debugging/parity) receives
        ``block_inputs`` (each block's input, after the A prompt is added), and per variant
        ``block_prompt_tokens`` (T) or ``embedding_feature`` / ``handcrafted_feature`` /
        ``hq_feature`` (A); blocks are not checkpointed while tracing."""
        enc = self.sam_img_encoder
        patches = enc.patch_embed(images)                                  # B x g x g x C
        x = patches if enc.pos_embed is None else patches + enc.pos_embed
        tokens: List[Optional[torch.Tensor]] = [None] * len(enc.blocks)
        joint = None
        if self.tuning == "t":
            tokens = self.block_tokens()
        elif self.tuning == "a":
            gen = self.prompt_generator
            embedding = gen.embedding_feature(patches)                     # B x g*g x c
            handcrafted = gen.handcrafted_feature(images)                  # B x c x g x g
            hq = self.hq_feature()                                         # 1 x g*g x c
            joint = embedding + handcrafted.flatten(2).transpose(1, 2) + hq
            if trace is not None:
                trace.update(embedding_feature=embedding, handcrafted_feature=handcrafted, hq_feature=hq)
        if trace is not None:
            trace["block_inputs"] = []
            if self.tuning == "t":
                trace["block_prompt_tokens"] = tokens
        interm: List[torch.Tensor] = []
        for i, block in enumerate(enc.blocks):
            if trace is not None:
                if joint is not None:
                    x = x + self.prompt_generator.prompt(joint, i).reshape(x.shape)
                trace["block_inputs"].append(x)
                x = block_forward(block, x, tokens[i])
            elif joint is not None:
                x = self._run(partial(self._adapted_block, i), x, joint,
                              whole_block=not self._chunk_checkpointed(block, None))
            elif tokens[i] is not None:
                x = self._run(partial(block_forward, block), x, tokens[i])
            else:
                x = self._run(block, x, whole_block=not self._chunk_checkpointed(block, None))
            if block.window_size == 0:
                interm.append(x)
        return enc.neck(x.permute(0, 3, 1, 2)), interm

    def _adapted_block(self, index: int, x: torch.Tensor, joint: torch.Tensor) -> torch.Tensor:
        """CAT-SAM-A block ``index``: ``block(x + prompt_index(joint))`` (prompt computed inside, so
        a checkpointed block keeps only x and the small joint feature)."""
        x = x + self.prompt_generator.prompt(joint, index).reshape(x.shape)
        return self.sam_img_encoder.blocks[index](x)
