"""Stage ``sccan``: SCCAN (ICCV 2023) trained in one stage over a frozen ImageNet backbone
(SPEC_SCCAN 5).

* loss: weighted Dice on ``meta_out`` (SPEC_SCCAN 1.7), no cross-entropy, no auxiliary loss;
* two optimizers: SGD (momentum, weight decay ``train.weight_decay``) with poly per iteration
  at ``train.sccan.lr`` (the original's 0.005 x 10) on everything but the transformer, and
  AdamW at a CONSTANT ``train.sccan.transformer_lr`` (6e-5, weight decay 0.01, torch's betas and
  eps) on the transformer: the original calls its poly helper on the SGD optimizer only;
* data, validation and test: the episodic ones of SAM-RSP/BAM (util/stages/fewshot.py), at
  ``train.sccan.crop_size`` / ``train.sccan.val_size`` when set (473 for COCO too, as the
  original; BAM uses 641 there).
"""
from __future__ import annotations

import copy
from typing import List, Mapping

import torch

from model import build_model
from util.stages import OptimizerSpec, Stage, trainable_parameters
from util.stages.fewshot import EPISODIC, episode_inputs, sgd


def sccan_optimizers(model: torch.nn.Module, cfg: Mapping) -> List[OptimizerSpec]:
    """SGD + poly on the convolutional head, AdamW (constant lr) on ``transformer.*``."""
    stage_cfg = cfg["train"]["sccan"]
    trainable = trainable_parameters(model, "sccan")
    transformer = [p for n, p in trainable if n.startswith("transformer.")]
    others = [p for n, p in trainable if not n.startswith("transformer.")]
    if not transformer:
        raise RuntimeError("stage sccan: the model has no trainable 'transformer.*' parameters")
    adamw = torch.optim.AdamW([{"params": transformer, "base_lr": stage_cfg["transformer_lr"], "name": "transformer"}],
                              lr=stage_cfg["transformer_lr"], weight_decay=stage_cfg["transformer_weight_decay"])
    return [sgd(cfg, [{"params": others, "base_lr": stage_cfg["lr"], "name": "head"}]),
            OptimizerSpec("adamw", adamw, "constant")]


def sccan_loss_of(outputs, batch, stage_cfg):
    from util.losses import sccan_loss
    return sccan_loss(outputs, batch)


def sccan_configure(cfg: Mapping) -> Mapping:
    """Crop and evaluation sizes of SCCAN (``train.sccan.crop_size`` / ``val_size``; null = the
    data section's), written into the effective config's data section."""
    stage_cfg = cfg["train"]["sccan"]
    if stage_cfg["crop_size"] is None and stage_cfg["val_size"] is None:
        return cfg
    cfg = copy.deepcopy(cfg)
    if stage_cfg["crop_size"] is not None:
        cfg["data"]["train_size"] = int(stage_cfg["crop_size"])
    if stage_cfg["val_size"] is not None:
        cfg["data"]["val_size"] = int(stage_cfg["val_size"])
    return cfg


SCCAN_STAGE = Stage(
    name="sccan", description="SCCAN: SCCA transformer + ASPP decoder over a frozen ImageNet ResNet",
    build_model=lambda cfg: build_model(cfg, "sccan"), inputs=episode_inputs, loss=sccan_loss_of,
    optimizers=sccan_optimizers, configure=sccan_configure,
    # the last SCCA block's support stream feeds nothing: its attn_s / mlp_s get no gradient (as
    # in the original, which also trains with find_unused_parameters=True)
    find_unused_parameters=True, **EPISODIC)
