"""The stage table: everything the engine needs to know about a training stage, in one place.

The engine (util/engine.py) runs one loop for every stage and holds no ``if stage == ...``;
each stage is one :class:`Stage` entry in :data:`STAGES`, defined in the stage's own module:

=============  ==========================  =====================================================
stage          module                      what it trains
=============  ==========================  =====================================================
``base``       util/stages/fewshot.py      PSPNet base learner (BAM stage 1)
``bam``        util/stages/fewshot.py      BAM meta learner over the frozen base learner
``sam_rsp``    util/stages/fewshot.py      SAM-RSP decoder over a frozen RSP generator + SAM
``sccan``      util/stages/sccan.py        SCCAN (one stage: frozen ImageNet backbone)
``simformer``  util/stages/simformer.py    SimFormer: weak-shot semantic segmentation (MaskFormer)
``cat_sam``    util/stages/cat_sam.py      CAT-SAM: few-shot adaptation of a frozen SAM (T / A)
=============  ==========================  =====================================================

A stage declares:

* ``build_model(cfg)``: the model (pretrained files are loaded afterwards by
  :func:`util.checkpoint.load_pretrained_parts` from the parts declared there per stage);
* ``build_data(cfg, log) -> StageData``: training set, validation set, fold;
* ``inputs(batch) -> (args, kwargs)``: the model's arguments for a training batch;
* ``loss(outputs, batch, stage_cfg) -> (total, parts)``: outside the model's forward;
* ``optimizers(model, cfg) -> [OptimizerSpec]``: one or several optimizers, each with its own
  learning-rate :data:`SCHEDULES` entry (poly per iteration, constant, cosine per epoch);
* ``length(cfg, num_samples, batch_per_process, world_size) -> (epochs, iters_per_epoch)``:
  epoch-based (a pass over the data) or iteration-based (an "epoch" is an evaluation period);
* ``validate(model, val_set, cfg, proc, fold, runner) -> metrics`` with the selection metric
  ``selection_metric``; ``val_runner(cfg, device, log)`` builds what validation reuses between
  calls (the frozen-feature cache);
* ``test(model, cfg, proc, runner, ...)`` and ``format_results``: the test protocol of test.py,
  and ``test_stage``: the stage whose model test.py builds for it;
* ``configure(cfg)``: stage-specific effective settings (e.g. SCCAN's 473 crops on COCO).

Adding a stage = its model file(s), its module here with its ``Stage`` entry, one line in
:data:`STAGES`, its checkpoint-format entry (util/checkpoint.py) and its configs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from util.config import ConfigError


@dataclass(frozen=True)
class Progress:
    """Where training stands when a learning rate is computed (``step`` is 1-based, as the
    originals' poly schedules)."""

    step: int
    max_steps: int
    epoch: int
    epochs: int


def poly(base_lr: float, progress: Progress, power: float = 0.9) -> float:
    """``base_lr * (1 - step / max_steps) ** power`` per iteration (PSPNet/BAM/SAM-RSP/SCCAN SGD)."""
    return base_lr * (1 - progress.step / progress.max_steps) ** power


def constant(base_lr: float, progress: Progress) -> float:
    """The learning rate as given (SCCAN's AdamW on the transformer)."""
    return base_lr


def cosine_per_epoch(base_lr: float, progress: Progress, min_lr: float = 0.0) -> float:
    """Cosine annealing stepped once per epoch: ``min + (base - min) (1 + cos(pi e / E)) / 2``."""
    return min_lr + (base_lr - min_lr) * (1 + math.cos(math.pi * progress.epoch / progress.epochs)) / 2


#: name -> schedule(base_lr, progress, **options) -> lr.
SCHEDULES: Dict[str, Callable[..., float]] = {"poly": poly, "constant": constant, "cosine_per_epoch": cosine_per_epoch}


@dataclass
class OptimizerSpec:
    """One optimizer of a stage. Its param groups carry ``base_lr`` (and ``name``); the engine
    sets ``group["lr"] = schedule(group["base_lr"], progress, **schedule_options)`` before every
    step."""

    name: str
    optimizer: torch.optim.Optimizer
    schedule: str = "poly"
    schedule_options: Dict[str, Any] = field(default_factory=dict)

    def set_lr(self, progress: Progress) -> List[float]:
        rule = SCHEDULES[self.schedule]
        lrs = [rule(group["base_lr"], progress, **self.schedule_options) for group in self.optimizer.param_groups]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        return lrs


@dataclass
class StageData:
    """What a stage trains and validates on."""

    train_set: Any
    val_set: Any
    fold: Any = None


def trainable_parameters(model: torch.nn.Module, stage: str) -> List[Tuple[str, torch.nn.Parameter]]:
    """``(name, parameter)`` of every parameter with ``requires_grad``; none is an error."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise RuntimeError(f"stage {stage}: the model has no trainable parameter")
    return trainable


def epoch_length(cfg: Mapping, num_samples: int, batch_per_process: int, world_size: int) -> Tuple[int, int]:
    """Epoch-based stages: ``train.<stage>.epochs`` passes over the data, each
    ``len(data) // world // batch`` iterations (at most ``train.iters_per_epoch`` when set)."""
    stage = cfg["train"]["stage"]
    iters = (num_samples // world_size) // batch_per_process
    if cfg["train"]["iters_per_epoch"]:
        iters = min(iters, cfg["train"]["iters_per_epoch"])
    if iters < 1:
        raise ConfigError(f"stage {stage}: {num_samples} training samples are fewer than one batch of "
                          f"{cfg['train'][stage]['batch_size']}")
    return int(cfg["train"][stage]["epochs"]), iters


def identity_config(cfg: Mapping) -> Mapping:
    return cfg


@dataclass(frozen=True)
class Stage:
    """One row of the stage table (module docstring)."""

    name: str
    description: str
    build_model: Callable[[Mapping], torch.nn.Module]
    build_data: Callable[[Mapping, Callable[[str], None]], StageData]
    inputs: Callable[[Mapping], Tuple[tuple, dict]]
    loss: Callable[[Mapping, Mapping, Mapping], Tuple[torch.Tensor, dict]]
    optimizers: Callable[[torch.nn.Module, Mapping], List[OptimizerSpec]]
    validate: Callable[..., dict]
    selection_metric: str = "miou"
    val_runner: Optional[Callable[..., Any]] = None
    length: Callable[[Mapping, int, int, int], Tuple[int, int]] = epoch_length
    # validations per epoch when train.val_per_epoch is 0: the originals validate twice per epoch
    # when epochs <= 100 ("SubEpoch_val"), except PSPNet's stage 1
    sub_epoch_validation: bool = True
    test: Optional[Callable[..., dict]] = None
    format_results: Optional[Callable[[Mapping], str]] = None
    test_stage: Optional[str] = None         # the stage whose model test.py evaluates (default: this one)
    configure: Callable[[Mapping], Mapping] = identity_config
    find_unused_parameters: bool = False     # DDP: some trainable parameters may get no gradient in a step
    metric_label: str = "mIoU"


def _table() -> Dict[str, Stage]:
    from util.stages.fewshot import BAM_STAGE, BASE_STAGE, SAM_RSP_STAGE
    from util.stages.sccan import SCCAN_STAGE
    from util.stages.simformer import SIMFORMER_STAGE
    from util.stages.cat_sam import CAT_SAM_STAGE
    return {stage.name: stage for stage in (BASE_STAGE, BAM_STAGE, SAM_RSP_STAGE, SCCAN_STAGE, SIMFORMER_STAGE,
                                            CAT_SAM_STAGE)}


STAGES: Dict[str, Stage] = _table()


def get_stage(name: str) -> Stage:
    """The table entry of ``name``; an unknown name is a :class:`ConfigError` listing the stages."""
    if name not in STAGES:
        raise ConfigError(f"train.stage must be one of {', '.join(STAGES)}, got {name!r}")
    return STAGES[name]


__all__ = ["OptimizerSpec", "Progress", "SCHEDULES", "STAGES", "Stage", "StageData", "constant", "cosine_per_epoch",
           "epoch_length", "get_stage", "poly", "trainable_parameters"]
