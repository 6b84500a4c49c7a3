"""MaskFormer R50 as SimFormer configures it (SPEC_SIMFORMER 3), in plain PyTorch.

Parts, each a module with explicit keyword sizes (the full-size defaults are the paper's; the
tests build tiny ones):

* :class:`FrozenBNResNet`: torchvision ResNet-50 (stride in the 3x3, ``STRIDE_IN_1X1 False``)
  with every BatchNorm a :class:`torchvision.ops.FrozenBatchNorm2d` (eps 1e-5), all convs
  trainable (``FREEZE_AT 0``); forward gives ``res2..res5`` = ``layer1..layer4`` (strides 4..32,
  256/512/1024/2048 channels). Keys are torchvision's (``conv1``, ``bn1``, ``layer{1..4}.*``),
  so torchvision's ImageNet file loads without conversion (:meth:`FrozenBNResNet.load_imagenet`);
  :func:`detectron2_backbone_key` maps the original's detectron2 names to ours.
* :class:`PixelDecoder` (``BasePixelDecoder``, GN): FPN-style top-down path giving the stride-4
  pixel embeddings ``E`` (B x mask_dim x H/4 x W/4).
* :class:`TransformerPredictor`: ``num_queries`` learned queries, a post-norm DETR decoder
  (no encoder) over the 1x1-projected res5 with a sine position encoding; a ``Linear`` class head
  (K+1) and a 3-layer MLP mask embedding on every decoder layer (deep supervision);
  mask logits = mask embedding . E.
* :class:`MaskFormerHead`: pixel decoder + predictor (the original's ``sem_seg_head``).

State-dict names are the original's (``pixel_decoder.{adapter_1..3, layer_1..4, mask_features}``,
``predictor.{query_embed, input_proj, class_embed, mask_embed.layers.{0,1,2},
transformer.decoder.layers.{i}.{self_attn, multihead_attn, linear1, linear2, norm1..3},
transformer.decoder.norm}``), so the authors' weights load strictly under ``sem_seg_head.``.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.ops import FrozenBatchNorm2d

FEATURE_NAMES = ("res2", "res3", "res4", "res5")
# ImageNet normalisation of 0..255 RGB input (SPEC_SIMFORMER 3).
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
SIZE_DIVISIBILITY = 32


def c2_xavier_fill(module: nn.Module) -> None:
    """fvcore's ``c2_xavier_fill``: ``kaiming_uniform_(a=1)`` on the weight, bias 0."""
    nn.init.kaiming_uniform_(module.weight, a=1)
    if module.bias is not None:
        nn.init.constant_(module.bias, 0)


# --------------------------------------------------------------------------------------------
# Backbone
# --------------------------------------------------------------------------------------------

class FrozenBNResNet(nn.Module):
    """torchvision ResNet (Bottleneck) with frozen BatchNorm, cut after ``layer4``.

    forward(x B x 3 x H x W, normalised) -> ``{"res2": B x 256 x H/4 x W/4, "res3": B x 512 x H/8,
    "res4": B x 1024 x H/16, "res5": B x 2048 x H/32}`` (channels at ``blocks`` = any; the
    widths are ResNet-50's). ``blocks`` = bottlenecks per stage, (3, 4, 6, 3) = ResNet-50;
    (1, 1, 1, 1) gives a cheap network of the same interface for tests.

    Toy options (defaults = the original): ``width`` = the stem / first-stage width (64 = ResNet's;
    stage widths ``width x (1, 2, 4, 8)``, outputs x 4); ``norm="bn"`` trainable BatchNorm instead
    of the frozen one (a randomly initialised backbone has no statistics worth freezing).
    """

    out_channels: Dict[str, int] = {"res2": 256, "res3": 512, "res4": 1024, "res5": 2048}
    strides: Dict[str, int] = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}

    def __init__(self, *, blocks: Sequence[int] = (3, 4, 6, 3), width: int = 64, norm: str = "frozen_bn") -> None:
        super().__init__()
        if len(blocks) != 4 or any(int(b) < 1 for b in blocks):
            raise ValueError(f"ResNet blocks must be 4 positive counts, got {list(blocks)}")
        if norm not in ("frozen_bn", "bn"):
            raise ValueError(f"norm must be frozen_bn or bn, got {norm!r}")
        norm_layer = FrozenBatchNorm2d if norm == "frozen_bn" else nn.BatchNorm2d
        bottleneck = torchvision.models.resnet.Bottleneck
        net = torchvision.models.resnet.ResNet(bottleneck, [int(b) for b in blocks], norm_layer=norm_layer)
        width = int(width)
        if width != 64:
            net.inplanes = width
            net.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
            net.bn1 = norm_layer(width)
            net.layer1 = net._make_layer(bottleneck, width, int(blocks[0]))
            net.layer2 = net._make_layer(bottleneck, 2 * width, int(blocks[1]), stride=2)
            net.layer3 = net._make_layer(bottleneck, 4 * width, int(blocks[2]), stride=2)
            net.layer4 = net._make_layer(bottleneck, 8 * width, int(blocks[3]), stride=2)
            for m in net.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            self.out_channels = {"res2": 4 * width, "res3": 8 * width, "res4": 16 * width, "res5": 32 * width}
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            self.add_module(name, getattr(net, name))

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out = {}
        for name, layer in zip(FEATURE_NAMES, (self.layer1, self.layer2, self.layer3, self.layer4)):
            x = layer(x)
            out[name] = x
        return out

    def load_imagenet(self, state_dict: Dict[str, torch.Tensor]) -> None:
        """Load torchvision's ImageNet ``resnet50`` state dict (its ``fc.*`` dropped), strictly."""
        self.load_state_dict({k: v for k, v in state_dict.items() if not k.startswith("fc.")}, strict=True)


def detectron2_backbone_key(key: str) -> str:
    """A detectron2 ResNet key (the original's ``backbone.*`` without the prefix) -> ours.

    ``stem.conv1.weight`` -> ``conv1.weight``, ``stem.conv1.norm.*`` -> ``bn1.*``,
    ``res{s}.{i}.conv{j}.weight`` -> ``layer{s-1}.{i}.conv{j}.weight``, ``.conv{j}.norm.*`` ->
    ``.bn{j}.*``, ``.shortcut.weight`` -> ``.downsample.0.weight``, ``.shortcut.norm.*`` ->
    ``.downsample.1.*``.
    """
    parts = key.split(".")
    if parts[0] == "stem":
        return ("bn1." + ".".join(parts[3:])) if parts[2] == "norm" else "conv1." + ".".join(parts[2:])
    if parts[0].startswith("res"):
        head = f"layer{int(parts[0][3:]) - 1}.{parts[1]}"
        conv, rest = parts[2], parts[3:]
        norm = rest[0] == "norm"
        if conv == "shortcut":
            return f"{head}.downsample.{1 if norm else 0}." + ".".join(rest[1:] if norm else rest)
        j = conv[len("conv"):]
        return f"{head}.{'bn' + j if norm else conv}." + ".".join(rest[1:] if norm else rest)
    raise KeyError(f"not a detectron2 ResNet key: {key!r}")


# --------------------------------------------------------------------------------------------
# Pixel decoder
# --------------------------------------------------------------------------------------------

class ConvNormAct(nn.Conv2d):
    """detectron2's ``Conv2d(norm=, activation=)``: conv -> ``norm`` -> optional ReLU.

    The norm is a child named ``norm`` (keys ``weight``, ``norm.weight``, ``norm.bias``).
    """

    def __init__(self, in_channels: int, out_channels: int, *, kernel_size: int, bias: bool,
                 norm: Optional[nn.Module] = None, relu: bool = False) -> None:
        super().__init__(in_channels, out_channels, kernel_size=kernel_size, padding=kernel_size // 2, bias=bias)
        self.norm = norm
        self.relu = bool(relu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        if self.norm is not None:
            x = self.norm(x)
            return F.relu(x, inplace=True) if self.relu else x      # GroupNorm's backward needs its input only
        return F.relu(x) if self.relu else x


class PixelDecoder(nn.Module):
    """MaskFormer's ``BasePixelDecoder`` with GroupNorm(32) (SPEC_SIMFORMER 3, "pixel decoder").

    res5: ``layer_4`` = Conv3x3 (C5 -> conv_dim, no bias) + GN + ReLU. Then top-down for res4,
    res3, res2 (index k = 3, 2, 1): ``y = adapter_k(x) + nearest_upsample(y)`` (Conv1x1 no bias +
    GN), ``y = layer_k(y)`` (Conv3x3 no bias + GN + ReLU). Output ``mask_features(y)``: Conv3x3
    conv_dim -> mask_dim with bias, no norm.

    forward(features {"res2".."res5"}) -> E: B x mask_dim x H/4 x W/4.
    """

    def __init__(self, *, in_channels: Sequence[int], conv_dim: int = 256, mask_dim: int = 256,
                 num_groups: int = 32) -> None:
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError(f"in_channels must list res2..res5, got {list(in_channels)}")
        for k, cin in enumerate(in_channels, start=1):
            if k < 4:
                self.add_module(f"adapter_{k}", ConvNormAct(cin, conv_dim, kernel_size=1, bias=False,
                                                            norm=nn.GroupNorm(num_groups, conv_dim)))
                self.add_module(f"layer_{k}", ConvNormAct(conv_dim, conv_dim, kernel_size=3, bias=False,
                                                          norm=nn.GroupNorm(num_groups, conv_dim), relu=True))
            else:
                self.add_module("layer_4", ConvNormAct(cin, conv_dim, kernel_size=3, bias=False,
                                                       norm=nn.GroupNorm(num_groups, conv_dim), relu=True))
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, kernel_size=3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                c2_xavier_fill(m)

    def forward(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        y = self.layer_4(features["res5"])
        for k, name in ((3, "res4"), (2, "res3"), (1, "res2")):
            lateral = getattr(self, f"adapter_{k}")(features[name])
            y = lateral + F.interpolate(y, size=lateral.shape[-2:], mode="nearest")
            y = getattr(self, f"layer_{k}")(y)
        return self.mask_features(y)


# --------------------------------------------------------------------------------------------
# Transformer predictor
# --------------------------------------------------------------------------------------------

def sine_position_encoding(x: torch.Tensor, num_pos_feats: int, temperature: float = 10000.0,
                           scale: float = 2 * math.pi) -> torch.Tensor:
    """DETR's normalised sine position encoding of a B x C x h x w map (no padding mask).

    -> B x 2*num_pos_feats x h x w: [y features | x features], each ``sin, cos`` interleaved of
    ``pos / temperature^(2 floor(i/2) / num_pos_feats)`` with pos = cumulative index (1..h or
    1..w) / (last + 1e-6) * scale.
    """
    b, _, h, w = x.shape
    ones = torch.ones((b, h, w), dtype=torch.float32, device=x.device)
    y_embed = ones.cumsum(1)
    x_embed = ones.cumsum(2)
    eps = 1e-6
    y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale
    x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=x.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    pos_x = x_embed[:, :, :, None] / dim_t
    pos_y = y_embed[:, :, :, None] / dim_t
    pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2).to(x.dtype)


class DecoderLayer(nn.Module):
    """DETR post-norm decoder layer, sequence-first (L x B x C).

    tgt = norm1(tgt + drop(self_attn(q = k = tgt + query_pos, v = tgt)));
    tgt = norm2(tgt + drop(cross_attn(q = tgt + query_pos, k = memory + pos, v = memory)));
    tgt = norm3(tgt + drop(linear2(drop(relu(linear1(tgt)))))).
    """

    def __init__(self, *, d_model: int, nhead: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor,
                query_pos: torch.Tensor) -> torch.Tensor:
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, k, value=tgt, need_weights=False)[0]))
        attn = self.multihead_attn(query=tgt + query_pos, key=memory + pos, value=memory, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(attn))
        tgt = self.norm3(tgt + self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(tgt))))))
        return tgt


class TransformerDecoder(nn.Module):
    """``num_layers`` :class:`DecoderLayer` s; every layer's output goes through the shared final
    LayerNorm ``norm`` (return_intermediate). -> L x N x B x C."""

    def __init__(self, *, d_model: int, nhead: int, dim_feedforward: int, dropout: float, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([DecoderLayer(d_model=d_model, nhead=nhead, dim_feedforward=dim_feedforward,
                                                  dropout=dropout) for _ in range(num_layers)])
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor,
                query_pos: torch.Tensor) -> torch.Tensor:
        outputs = []
        for layer in self.layers:
            tgt = layer(tgt, memory, pos, query_pos)
            outputs.append(self.norm(tgt))
        return torch.stack(outputs)


class Transformer(nn.Module):
    """DETR transformer with 0 encoder layers (the memory is the projected res5 tokens) and a
    decoder with intermediate outputs. Every >1-D parameter xavier-uniform initialised."""

    def __init__(self, *, d_model: int, nhead: int, dim_feedforward: int, dropout: float,
                 num_decoder_layers: int) -> None:
        super().__init__()
        self.decoder = TransformerDecoder(d_model=d_model, nhead=nhead, dim_feedforward=dim_feedforward,
                                          dropout=dropout, num_layers=num_decoder_layers)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src: torch.Tensor, query_embed: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """src, pos: B x C x h x w; query_embed: N x C -> hs: L x B x N x C."""
        b = src.shape[0]
        memory = src.flatten(2).permute(2, 0, 1)                              # hw x B x C
        pos = pos.flatten(2).permute(2, 0, 1)
        query_pos = query_embed.unsqueeze(1).repeat(1, b, 1)                   # N x B x C
        tgt = torch.zeros_like(query_pos)
        return self.decoder(tgt, memory, pos, query_pos).transpose(1, 2)


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between (keys ``layers.{i}``)."""

    def __init__(self, *, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == last else F.relu(layer(x))
        return x


class TransformerPredictor(nn.Module):
    """MaskFormer's transformer predictor (SPEC_SIMFORMER 3, "transformer predictor" .. "mask head").

    forward(x = res5 B x C5 x h5 x w5, mask_features = E B x mask_dim x h x w) -> dict:

    * ``pred_logits``: B x N x (K+1) (last decoder layer), ``pred_masks``: B x N x h x w logits;
    * ``aux_outputs``: one ``{"pred_logits", "pred_masks"}`` per earlier layer (0 .. L-2);
    * ``all_logits``: L x B x N x (K+1), ``all_masks``: L x B x N x h x w (every layer, stacked).

    Queries: ``query_embed`` (N x hidden) is the query position, the initial target is zeros.
    ``input_proj`` is a Conv1x1 C5 -> hidden (identity when C5 == hidden and
    ``enforce_input_project`` is false, as the original).
    """

    def __init__(self, *, in_channels: int, num_classes: int, hidden_dim: int = 256, num_queries: int = 100,
                 nheads: int = 8, dim_feedforward: int = 2048, dec_layers: int = 6, dropout: float = 0.1,
                 mask_dim: int = 256, enforce_input_project: bool = False) -> None:
        super().__init__()
        if dec_layers < 1:
            raise ValueError(f"dec_layers must be >= 1, got {dec_layers}")
        self.num_classes = int(num_classes)
        self.hidden_dim = int(hidden_dim)
        self.transformer = Transformer(d_model=hidden_dim, nhead=nheads, dim_feedforward=dim_feedforward,
                                       dropout=dropout, num_decoder_layers=dec_layers)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        if in_channels != hidden_dim or enforce_input_project:
            self.input_proj = nn.Conv2d(in_channels, hidden_dim, kernel_size=1)
            c2_xavier_fill(self.input_proj)
        else:
            self.input_proj = nn.Sequential()
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(input_dim=hidden_dim, hidden_dim=hidden_dim, output_dim=mask_dim, num_layers=3)

    def forward(self, x: torch.Tensor, mask_features: torch.Tensor) -> Dict[str, object]:
        pos = sine_position_encoding(x, self.hidden_dim // 2)
        hs = self.transformer(self.input_proj(x), self.query_embed.weight, pos)       # L x B x N x C
        logits = self.class_embed(hs)
        masks = torch.einsum("lbqc,bchw->lbqhw", self.mask_embed(hs), mask_features)
        aux: List[Dict[str, torch.Tensor]] = [{"pred_logits": a, "pred_masks": b}
                                              for a, b in zip(logits[:-1], masks[:-1])]
        return {"pred_logits": logits[-1], "pred_masks": masks[-1], "aux_outputs": aux,
                "all_logits": logits, "all_masks": masks}


class MaskFormerHead(nn.Module):
    """The original's ``sem_seg_head``: :class:`PixelDecoder` + :class:`TransformerPredictor` on res5.

    forward(features {"res2".."res5"}) -> the predictor's dict plus ``pixel_features`` = E
    (B x mask_dim x H/4 x W/4, the SimNet's pixel embeddings).

    Sizes (SPEC_SIMFORMER 3): full = ``in_channels=(256, 512, 1024, 2048), conv_dim=256,
    mask_dim=256, hidden_dim=256, num_queries=100, nheads=8, dim_feedforward=2048, dec_layers=6,
    dropout=0.1``; K = ``num_classes`` (171 COCO-Stuff, 150 ADE20K).
    """

    def __init__(self, *, in_channels: Sequence[int], num_classes: int, conv_dim: int = 256, mask_dim: int = 256,
                 hidden_dim: int = 256, num_queries: int = 100, nheads: int = 8, dim_feedforward: int = 2048,
                 dec_layers: int = 6, dropout: float = 0.1, num_groups: int = 32,
                 enforce_input_project: bool = False) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.pixel_decoder = PixelDecoder(in_channels=in_channels, conv_dim=conv_dim, mask_dim=mask_dim,
                                          num_groups=num_groups)
        self.predictor = TransformerPredictor(
            in_channels=int(in_channels[-1]), num_classes=num_classes, hidden_dim=hidden_dim,
            num_queries=num_queries, nheads=nheads, dim_feedforward=dim_feedforward, dec_layers=dec_layers,
            dropout=dropout, mask_dim=mask_dim, enforce_input_project=enforce_input_project)

    def forward(self, features: Dict[str, torch.Tensor]) -> Dict[str, object]:
        pixel_features = self.pixel_decoder(features)
        out = self.predictor(features["res5"], pixel_features)
        out["pixel_features"] = pixel_features
        return out
