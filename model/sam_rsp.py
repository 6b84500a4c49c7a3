"""SAM-RSP: a frozen rough-segmentation-prompt generator (BAM, SPEC 2, or SCCAN, SPEC_SCCAN 11),
a frozen SAM image encoder and the trainable :class:`~model.decoder.SAMRSPDecoder` (SPEC 1).

The generator is any module with ``prompt(query_img, support_imgs, support_masks, *, class_ids,
query_feats, support_feats) -> B x 2 x H x W`` (BAM: its ``final_out``; SCCAN: ``softmax(meta_out)``)
and ``extract_query_features`` / ``extract_support_features``.

The frozen parts can be computed separately and reused (e.g. across episodes that share a query
image): :meth:`SAMRSP.embed_query` gives the SAM embedding and ``rspg.extract_query_features``
BAM's query backbone features; pass them to ``forward`` as ``query_embedding`` / ``query_feats``.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager, Dict, Optional

import torch
import torch.nn as nn
from segment_anything.modeling.image_encoder import ImageEncoderViT

from .common import batchnorm_eval, freeze, one_image_at_a_time, resize
from .decoder import SAMRSPDecoder


class SAMRSP(nn.Module):
    """forward(query_img Bx3xHxW, support_imgs BxKx3xHxW, support_masks BxKxHxW (0/1/255),
    class_ids LongTensor B | None) -> dict:

    * ``logits``: B x 2 x H x W, the final logits;
    * ``prompt_logits``: B x 2 x H x W, the generator's prompt (probability-like) at the input size;
    * in training mode, ``aux_logits``: the side heads' B x 2 x H x W logits (depth - 1 of them).

    Training mode: the decoder trains; the SAM encoder stays in eval; BAM runs in train mode
    except its BatchNorm (Dropout active, each episode's own class, ``class_ids``, left out of
    BAM's base map: the original's behaviour) when ``frozen_train_mode`` is true, otherwise in
    eval mode. ``class_ids`` (base-learner channel of each episode's class) is required then.

    ``frozen_amp_dtype`` (None = off; set by ``util.feature_cache.prepare_frozen_encoders`` for
    ``eval.amp`` / ``train.amp`` on CUDA) autocasts the frozen SAM encoder and BAM to that
    dtype; their outputs are cast back to float32, so the decoder always runs in float32.
    """

    def __init__(self, *, rspg: nn.Module, image_encoder: ImageEncoderViT, decoder: SAMRSPDecoder,
                 frozen_train_mode: bool = True) -> None:
        super().__init__()
        self.rspg = freeze(rspg)
        self.image_encoder = freeze(image_encoder)
        self.decoder = decoder
        self.frozen_train_mode = bool(frozen_train_mode)
        self.frozen_amp_dtype: Optional[torch.dtype] = None
        self.train(self.training)

    @property
    def grid_size(self) -> int:
        """Side of SAM's token grid (img_size // patch_size)."""
        return int(self.image_encoder.pos_embed.shape[1])

    def train(self, mode: bool = True) -> "SAMRSP":
        super().train(mode)
        self.image_encoder.eval()
        self.rspg.train(mode and self.frozen_train_mode)
        batchnorm_eval(self.rspg)
        return self

    def frozen_autocast(self, device_type: str) -> ContextManager:
        """Autocast to ``frozen_amp_dtype`` for the frozen encoders (a null context when off)."""
        if self.frozen_amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device_type, dtype=self.frozen_amp_dtype)

    @torch.no_grad()
    def embed_query(self, query_img: torch.Tensor) -> torch.Tensor:
        """SAM embedding of the query stretched to img_size x img_size (bilinear, align_corners).

        query_img: Bx3xHxW -> B x out_chans x g x g (float32). In eval mode one image at a time
        (:func:`~model.common.one_image_at_a_time`: batch-invariant, so cached embeddings are exact).
        """
        size = self.image_encoder.img_size

        def encode(images: torch.Tensor) -> torch.Tensor:
            return self.image_encoder(resize(images, (size, size))).float()

        with self.frozen_autocast(query_img.device.type):
            return encode(query_img) if self.training else one_image_at_a_time(encode, query_img)

    @torch.no_grad()
    def query_features(self, query_img: torch.Tensor) -> Dict[str, torch.Tensor]:
        """BAM's frozen query backbone features (``rspg.extract_query_features``), float32.

        query_img: Bx3xHxW -> dict of B x C x h x w tensors.
        """
        with self.frozen_autocast(query_img.device.type):
            feats = self.rspg.extract_query_features(query_img)
        return {name: value.float() for name, value in feats.items()}

    def forward(self, query_img: torch.Tensor, support_imgs: Optional[torch.Tensor],
                support_masks: Optional[torch.Tensor], class_ids: Optional[torch.Tensor] = None, *,
                query_embedding: Optional[torch.Tensor] = None,
                query_feats: Optional[Dict[str, torch.Tensor]] = None,
                support_feats: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, object]:
        """See the class docstring. Precomputed frozen work, when given, is used instead of
        recomputing it: ``query_embedding`` = :meth:`embed_query`, ``query_feats`` =
        ``rspg.extract_query_features``, ``support_feats`` = ``rspg.extract_support_features``
        (then ``support_imgs`` / ``support_masks`` may be None)."""
        height, width = query_img.shape[-2:]
        with torch.no_grad():
            with self.frozen_autocast(query_img.device.type):
                prompt = self.rspg.prompt(query_img, support_imgs, support_masks,
                                          class_ids=class_ids if self.rspg.training else None,
                                          query_feats=query_feats, support_feats=support_feats).float()
            if query_embedding is None:
                query_embedding = self.embed_query(query_img)
            grid = query_embedding.shape[-2:]
            prompt_grid = resize(prompt, grid)
        out = self.decoder(query_embedding, prompt_grid)
        result: Dict[str, object] = {"logits": resize(out["logits"], (height, width)), "prompt_logits": prompt}
        if self.training:
            result["aux_logits"] = [resize(o, (height, width)) for o in out["aux_logits"]]
        return result
