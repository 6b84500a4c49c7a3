"""CAT-SAM's mask decoder: segment-anything's ``MaskDecoder`` (frozen, SAM weights) plus the
trainable HQ-SAM-style branch with the CAT token (SPEC_CAT_SAM 3.3).

Trainable, randomly initialised (not SAM-HQ's weights), D = transformer_dim (256):

* ``hf_token``: nn.Embedding(1, D) -- the CAT token (init N(0, 1));
* ``hf_mlp``: MLP D -> D -> D -> D/8, ReLU between (SAM-HQ's hypernetwork for the CAT token);
* ``compress_vit_feat``: ConvT(C, D, 2, 2) -> LayerNorm2d -> GELU -> ConvT(D, D/8, 2, 2);
* ``embedding_encoder``: ConvT(D, D/4, 2, 2) -> LayerNorm2d -> GELU -> ConvT(D/4, D/8, 2, 2);
* ``embedding_maskfeature``: Conv3x3(D/8, D/4) -> LayerNorm2d -> GELU -> Conv3x3(D/4, D/8).

With ``hq=False`` it is SAM's decoder alone (zero-shot SAM: mask token 0, multimask off).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.mask_decoder import MLP, MaskDecoder
from segment_anything.modeling.transformer import TwoWayTransformer

SAM_DECODER_PREFIXES = ("transformer.", "iou_token.", "mask_tokens.", "output_upscaling.",
                        "output_hypernetworks_mlps.", "iou_prediction_head.")
HQ_PREFIXES = ("hf_token.", "hf_mlp.", "compress_vit_feat.", "embedding_encoder.", "embedding_maskfeature.")


class CATMaskDecoder(MaskDecoder):
    """forward(image_embedding 1 x D x g x g, image_pe 1 x D x g x g, sparse N x k x D,
    dense N x D x g x g, interm_embedding 1 x g x g x C) -> N x 1 x 4g x 4g logits.

    HQ (``hq=True``): the CAT mask only (SPEC_CAT_SAM 3.3, steps 1-5); SAM's own masks and the
    IoU head, which the original computes and discards, are skipped. ``hq=False``: SAM's
    single-mask output (mask token 0). ``vit_dim``: C, the width of the interm feature.
    """

    def __init__(self, *, transformer_dim: int = 256, vit_dim: int = 1024, hq: bool = True,
                 num_multimask_outputs: int = 3, transformer_depth: int = 2, transformer_mlp_dim: int = 2048,
                 transformer_heads: int = 8, iou_head_depth: int = 3, iou_head_hidden_dim: int = 256) -> None:
        super().__init__(
            transformer_dim=transformer_dim,
            transformer=TwoWayTransformer(depth=transformer_depth, embedding_dim=transformer_dim,
                                          mlp_dim=transformer_mlp_dim, num_heads=transformer_heads),
            num_multimask_outputs=num_multimask_outputs, activation=nn.GELU,
            iou_head_depth=iou_head_depth, iou_head_hidden_dim=iou_head_hidden_dim)
        self.hq = bool(hq)
        if not self.hq:
            return
        d = transformer_dim
        self.hf_token = nn.Embedding(1, d)
        self.hf_mlp = MLP(d, d, d // 8, 3)
        self.compress_vit_feat = nn.Sequential(
            nn.ConvTranspose2d(vit_dim, d, kernel_size=2, stride=2), LayerNorm2d(d), nn.GELU(),
            nn.ConvTranspose2d(d, d // 8, kernel_size=2, stride=2))
        self.embedding_encoder = nn.Sequential(
            nn.ConvTranspose2d(d, d // 4, kernel_size=2, stride=2), LayerNorm2d(d // 4), nn.GELU(),
            nn.ConvTranspose2d(d // 4, d // 8, kernel_size=2, stride=2))
        self.embedding_maskfeature = nn.Sequential(
            nn.Conv2d(d // 8, d // 4, 3, 1, 1), LayerNorm2d(d // 4), nn.GELU(), nn.Conv2d(d // 4, d // 8, 3, 1, 1))

    def sam_modules(self):
        """The frozen SAM submodules (everything but the HQ branch)."""
        return [self.transformer, self.iou_token, self.mask_tokens, self.output_upscaling,
                self.output_hypernetworks_mlps, self.iou_prediction_head]

    def hq_features(self, image_embedding: torch.Tensor, interm_embedding: torch.Tensor) -> torch.Tensor:
        """Step 1: embedding_encoder(image embedding) + compress_vit_feat(first global block's output).

        image_embedding: B x D x g x g, interm_embedding: B x g x g x C -> B x D/8 x 4g x 4g.
        """
        return self.embedding_encoder(image_embedding) + self.compress_vit_feat(interm_embedding.permute(0, 3, 1, 2))

    def forward(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, sparse_prompt_embeddings: torch.Tensor,
                dense_prompt_embeddings: torch.Tensor, interm_embedding: Optional[torch.Tensor] = None,
                hq_features: Optional[torch.Tensor] = None) -> torch.Tensor:
        """See the class docstring; ``hq_features`` (1 x D/8 x 4g x 4g) may be passed precomputed
        instead of ``interm_embedding``."""
        n = sparse_prompt_embeddings.shape[0]
        # Step 2: output tokens [iou, 4 mask tokens, CAT token] + sparse prompts; SAM's transformer.
        weights = [self.iou_token.weight, self.mask_tokens.weight] + ([self.hf_token.weight] if self.hq else [])
        output_tokens = torch.cat(weights, dim=0).unsqueeze(0).expand(n, -1, -1)
        tokens = torch.cat((output_tokens, sparse_prompt_embeddings), dim=1)
        src = torch.repeat_interleave(image_embeddings, n, dim=0) + dense_prompt_embeddings
        pos_src = torch.repeat_interleave(image_pe, n, dim=0)
        b, c, h, w = src.shape
        hs, src = self.transformer(src, pos_src, tokens)
        # Step 3: SAM's upscaling (frozen path).
        upscaled_sam = self.output_upscaling(src.transpose(1, 2).view(b, c, h, w))        # N x D/8 x 4g x 4g
        _, c8, h4, w4 = upscaled_sam.shape
        if not self.hq:
            hyper = self.output_hypernetworks_mlps[0](hs[:, 1, :])                           # N x D/8
            return (hyper.unsqueeze(1) @ upscaled_sam.view(b, c8, h4 * w4)).view(b, 1, h4, w4)
        if hq_features is None:
            if interm_embedding is None:
                raise ValueError("the HQ branch needs the interm embedding (or precomputed hq_features)")
            hq_features = self.hq_features(image_embeddings, interm_embedding)
        upscaled_cat = self.embedding_maskfeature(upscaled_sam) + hq_features
        # Steps 4-5: the CAT token's output (index 1 + num_mask_tokens) through hf_mlp; CAT mask only.
        hyper = self.hf_mlp(hs[:, 1 + self.num_mask_tokens, :])                            # N x D/8
        return (hyper.unsqueeze(1) @ upscaled_cat.reshape(b, c8, h4 * w4)).view(b, 1, h4, w4)
