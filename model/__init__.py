"""The models of every stage: the PSPNet base learner (``base``), BAM (``bam``), SAM-RSP
(``sam_rsp``, over a BAM or an SCCAN prompt generator: ``model.rspg.type``), SCCAN (``sccan``),
SimFormer (``simformer``, weak-shot semantic segmentation) and CAT-SAM (``cat_sam``).

``build_model(cfg)`` builds the model of ``cfg.train.stage`` from the ``model`` and ``data``
config sections; it reads no file. Weights are loaded afterwards with
:func:`util.checkpoint.load_weights` / :func:`util.checkpoint.load_pretrained_parts`.
"""
from __future__ import annotations

from typing import Callable, Dict, Mapping, Optional

import torch.nn as nn

from .attention import SDPAAttention, set_attention
from .backbone import ResNetBackbone, VGGBackbone, build_backbone
from .bam import BAM
from .decoder import SAMRSPDecoder, pixel_prototype
from .pspnet import PPM, PSPNet
from .sam_encoder import SAM_CHECKPOINT_NAMES, SAM_ENCODER_SPECS, build_sam_encoder
from .sam_rsp import SAMRSP

__all__ = [
    "BAM", "BUILDERS", "PPM", "PSPNet", "ResNetBackbone", "SAMRSP", "SAMRSPDecoder", "SAM_CHECKPOINT_NAMES",
    "SAM_ENCODER_SPECS", "SDPAAttention", "VGGBackbone", "build_backbone", "build_bam", "build_model",
    "build_pspnet", "build_sam_rsp", "build_sam_encoder", "build_sccan", "build_simformer_from_config",
    "build_cat_sam_from_config",
    "pixel_prototype", "set_attention",
]


def _num_base_channels(cfg: Mapping) -> int:
    from util.folds import make_fold
    data = cfg["data"]
    names = None
    if data["dataset"] == "custom" and not data["class_names"]:
        # the classes of a custom dataset default to its folder names (a directory listing)
        from util.config import resolve_path
        from util.dataset import custom_class_names
        names = custom_class_names(resolve_path(data["root"], cfg))
    return make_fold(data, names).num_base_channels


def _backbone_kwargs(m: Mapping) -> dict:
    return {"backbone": m["backbone"], "backbone_width": int(m["backbone_width"]),
            "backbone_blocks": list(m["backbone_blocks"]) or None}


def build_pspnet(cfg: Mapping) -> PSPNet:
    """Stage ``base``: the PSPNet base learner."""
    m = cfg["model"]
    base = m["base_learner"]
    return PSPNet(**_backbone_kwargs(m), num_classes=_num_base_channels(cfg), ppm_bins=tuple(base["ppm_bins"]),
                  hidden_dim=int(base["hidden_dim"]), dropout=float(base["dropout"]))


def build_bam(cfg: Mapping) -> BAM:
    """Stage ``bam``: BAM with a frozen backbone and base learner."""
    m = cfg["model"]
    base, rspg = m["base_learner"], m["rspg"]
    return BAM(**_backbone_kwargs(m), num_base_channels=_num_base_channels(cfg), shot=int(cfg["data"]["shot"]),
               reduce_dim=int(rspg["reduce_dim"]), kshot_trans_dim=int(rspg["kshot_trans_dim"]),
               low_feature=rspg["low_feature"], ppm_bins=tuple(base["ppm_bins"]),
               base_hidden_dim=int(base["hidden_dim"]), base_dropout=float(base["dropout"]))


def build_sccan(cfg: Mapping) -> nn.Module:
    """Stage ``sccan``: SCCAN over a frozen ImageNet ResNet-50/101 (``model.sccan``)."""
    from .sccan import SCCAN
    m = cfg["model"]
    if m["backbone"] not in ("resnet50", "resnet101"):
        raise ValueError(f"SCCAN has a ResNet-50/101 backbone only (SPEC_SCCAN 0); model.backbone is "
                         f"{m['backbone']!r}")
    s = m["sccan"]
    return SCCAN(**_backbone_kwargs(m), reduce_dim=int(s["reduce_dim"]), depth=int(s["depth"]),
                 num_heads=int(s["num_heads"]), window_size=int(s["window_size"]), mlp_ratio=float(s["mlp_ratio"]),
                 grid_size=int(s["grid_size"]))


#: model.rspg.type -> the builder of SAM-RSP's prompt generator
RSP_GENERATORS: Dict[str, Callable[[Mapping], nn.Module]] = {"bam": build_bam, "sccan": build_sccan}


def build_sam_rsp(cfg: Mapping) -> SAMRSP:
    """Stage ``sam_rsp``: frozen prompt generator (``model.rspg.type``: BAM or SCCAN) + frozen SAM
    image encoder + the trainable decoder.

    ``model.sam.attention`` selects the implementation of every attention layer of the model
    (the encoder's and the decoder's blocks alike; both are numerically equal).
    """
    m = cfg["model"]
    sam, dec = m["sam"], m["decoder"]
    encoder = build_sam_encoder(
        sam["type"], img_size=int(sam["img_size"]), patch_size=int(sam["patch_size"]),
        embed_dim=sam["embed_dim"], depth=sam["depth"], num_heads=sam["num_heads"],
        global_attn_indexes=sam["global_attn_indexes"], window_size=int(sam["window_size"]),
        out_chans=int(sam["out_chans"]), layer_norm_eps=float(sam["layer_norm_eps"]),
        attention=sam["attention"])
    decoder = SAMRSPDecoder(
        embed_dim=int(sam["out_chans"]), grid_size=int(sam["img_size"]) // int(sam["patch_size"]),
        depth=int(dec["depth"]), num_heads=int(dec["num_heads"]), window_size=int(dec["window_size"]),
        inner_dim=int(dec["inner_dim"]), side_head=dec["side_head"])
    kind = m["rspg"]["type"]
    if kind not in RSP_GENERATORS:
        raise ValueError(f"model.rspg.type must be one of {', '.join(RSP_GENERATORS)}, got {kind!r}")
    # SCCAN always runs in eval mode inside SAM-RSP (SPEC_SCCAN 11); the train-mode quirk is BAM's
    model = SAMRSP(rspg=RSP_GENERATORS[kind](cfg), image_encoder=encoder, decoder=decoder,
                   frozen_train_mode=bool(m["rspg"]["frozen_train_mode"]) and kind == "bam")
    return set_attention(model, sam["attention"])


def build_simformer_from_config(cfg: Mapping) -> nn.Module:
    """Stage ``simformer``: SimFormer (MaskFormer R50 + the SimNet criterion) from ``model.simformer``;
    K = the dataset's classes + background, the novel classes = fold ``data.split``'s (none for
    ``train.simformer.supervision=full``: every class then has pixel masks)."""
    from util.folds import make_fold
    from .simformer import build_simformer
    s = cfg["model"]["simformer"]
    fold = make_fold(cfg["data"])
    novel = () if cfg["train"]["simformer"]["supervision"] == "full" else fold.novel
    matcher = {"column_order": s["column_order"], "novel_mask_cost": s["novel_mask_cost"]}
    criterion = {k: s[k] for k in (
        "no_object_weight", "cls_weight", "mask_focal_weight", "mask_dice_weight", "comp_weight", "comp_floor_logit",
        "sim_weight", "dist_weight", "dist_func", "base_points", "base_pos_frac", "novel_points", "base_detach",
        "deep_supervision", "balance_window", "balance_stride", "student_pairs", "distill_padding", "teacher_bn",
        "pair_layout", "balance_state", "recompute_mask_losses")}
    return build_simformer(
        num_classes=fold.num_classes + 1, novel_ids=novel, backbone_blocks=list(s["backbone_blocks"]),
        backbone_width=int(s["backbone_width"]), backbone_norm=s["backbone_norm"],
        conv_dim=int(s["conv_dim"]), mask_dim=int(s["mask_dim"]), hidden_dim=int(s["hidden_dim"]),
        num_queries=int(s["num_queries"]), nheads=int(s["nheads"]), dim_feedforward=int(s["dim_feedforward"]),
        dec_layers=int(s["dec_layers"]), dropout=float(s["dropout"]), simnet=bool(s["simnet"]),
        simnet_hidden=int(s["simnet_hidden"]), simnet_layers=int(s["simnet_layers"]), simnet_bn=bool(s["simnet_bn"]),
        residual_add=s["residual_add"], matcher_kwargs=matcher, criterion_kwargs=criterion)


#: model.cat_sam.variant -> CATSAM's variant ("decoder" is the config's short name of "decoder_only")
CAT_SAM_VARIANTS = {"a": "a", "t": "t", "decoder": "decoder_only", "decoder_only": "decoder_only",
                    "zero_shot": "zero_shot"}


def build_cat_sam_from_config(cfg: Mapping) -> nn.Module:
    """Stage ``cat_sam``: CAT-SAM (model/cat_sam.py) of ``model.cat_sam.variant`` over the SAM of
    ``model.sam`` (``type`` vit_b / vit_l / vit_h, or ``tiny``; ``embed_dim`` / ``depth`` /
    ``num_heads`` / ``global_attn_indexes`` override the type's numbers when not null; ``img_size``,
    ``patch_size``, ``window_size``, ``out_chans``, ``layer_norm_eps``, ``attention``). Reads no
    file: the SAM file (``model.sam.checkpoint``) is loaded by util.checkpoint.load_pretrained_parts,
    a trained checkpoint by util.checkpoint.load_weights. ``train.checkpoint_encoder`` sets
    ``model.checkpoint_encoder``."""
    from .cat_sam import CATSAM
    sam, c = cfg["model"]["sam"], cfg["model"]["cat_sam"]
    variant = c["variant"]
    if variant not in CAT_SAM_VARIANTS:
        raise ValueError(f"model.cat_sam.variant must be one of a, t, decoder, zero_shot; got {variant!r}")
    indexes = sam["global_attn_indexes"]
    from .cat_sam import SAM_PRESETS
    if sam["type"] not in SAM_PRESETS:
        raise ValueError(f"model.sam.type must be one of {', '.join(SAM_PRESETS)} for CAT-SAM, got {sam['type']!r}")
    preset = SAM_PRESETS[sam["type"]]
    depth = int(preset["depth"] if sam["depth"] is None else sam["depth"])
    effective = tuple(preset["global_attn_indexes"] if indexes is None else indexes)
    if any(not 0 <= int(i) < depth for i in effective):
        raise ValueError(f"model.sam.global_attn_indexes {list(effective)} (null = those of model.sam.type="
                         f"{sam['type']}) must be blocks of the ViT's depth {depth}: set model.sam.global_attn_indexes")
    return CATSAM(variant=CAT_SAM_VARIANTS[variant], sam_type=sam["type"], embed_dim=sam["embed_dim"],
                  depth=sam["depth"], num_heads=sam["num_heads"],
                  global_attn_indexes=None if indexes is None else tuple(indexes), img_size=int(sam["img_size"]),
                  patch_size=int(sam["patch_size"]), out_chans=int(sam["out_chans"]),
                  window_size=int(sam["window_size"]), pb_t_hidden_dim=int(c["pb_t_hidden_dim"]),
                  evp_scale_factor=int(c["evp_scale_factor"]), pb_a_hidden_dim=int(c["pb_a_hidden_dim"]),
                  freq_nums=float(c["freq_nums"]), layer_norm_eps=float(sam["layer_norm_eps"]), resize=c["resize"],
                  checkpoint_encoder=bool(cfg["train"]["checkpoint_encoder"]),
                  attention=sam["attention"])


BUILDERS: Dict[str, Callable[[Mapping], nn.Module]] = {
    "base": build_pspnet,
    "bam": build_bam,
    "sam_rsp": build_sam_rsp,
    "sccan": build_sccan,
    "simformer": build_simformer_from_config,
    "cat_sam": build_cat_sam_from_config,
}


def build_model(cfg: Mapping, stage: Optional[str] = None) -> nn.Module:
    """The model of ``stage`` (default ``cfg.train.stage``): ``base`` | ``bam`` | ``sam_rsp`` | ``sccan``."""
    stage = stage or cfg["train"]["stage"]
    if stage not in BUILDERS:
        raise ValueError(f"unknown stage {stage!r}; choose one of {', '.join(BUILDERS)}")
    return BUILDERS[stage](cfg)
