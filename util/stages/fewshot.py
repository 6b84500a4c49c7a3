"""The SAM-RSP stages (SPEC 4): ``base`` (PSPNet), ``bam`` (BAM meta learner), ``sam_rsp``
(the SAM-RSP decoder), and the episodic validation and test protocol they share with SCCAN.

All three train with SGD (momentum, weight decay on every trainable parameter) and a poly
learning rate per iteration; BAM and SAM-RSP validate on the test episodes (as the original).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Mapping

import torch

from model import build_model
from util.dataset import build_base_dataset, build_episodes, build_source
from util.distributed import ProcessInfo
from util.evaluation import build_refiner, evaluate_episodes, evaluate_segmentation, format_results, run_test_protocol
from util.feature_cache import all_reduce_counts, build_runner
from util.losses import bam_loss, base_loss, sam_rsp_loss
from util.config import ConfigError
from util.stages import OptimizerSpec, Stage, StageData, trainable_parameters


def sgd(cfg: Mapping, groups: List[dict], name: str = "sgd") -> OptimizerSpec:
    """SGD with the config's momentum and weight decay, poly schedule with ``train.power``."""
    train = cfg["train"]
    optimizer = torch.optim.SGD(groups, lr=0.0, momentum=train["momentum"], weight_decay=train["weight_decay"])
    return OptimizerSpec(name, optimizer, "poly", {"power": float(train["power"])})


# -- base: PSPNet on the base classes -----------------------------------------------------------

def base_data(cfg: Mapping, log: Callable[[str], None]) -> StageData:
    source = build_source(cfg, log=log)
    return StageData(build_base_dataset(cfg, "train", source=source), build_base_dataset(cfg, "val", source=source),
                     source.fold)


def base_optimizers(model: torch.nn.Module, cfg: Mapping) -> List[OptimizerSpec]:
    """Backbone at ``lr_backbone``, PPM + classifier at ``lr_head`` (SPEC 4.1)."""
    stage_cfg = cfg["train"]["base"]
    trainable = trainable_parameters(model, "base")
    backbone = [p for n, p in trainable if n.startswith("layer")]
    head = [p for n, p in trainable if not n.startswith("layer")]
    return [sgd(cfg, [{"params": backbone, "base_lr": stage_cfg["lr_backbone"], "name": "backbone"},
                      {"params": head, "base_lr": stage_cfg["lr_head"], "name": "head"}])]


def base_validate(model, val_set, cfg: Mapping, proc: ProcessInfo, fold, runner=None) -> dict:
    """Base-class semantic mIoU at original resolution."""
    summary = evaluate_segmentation(model, val_set, num_classes=fold.num_base_channels, proc=proc,
                                    batch_size=cfg["eval"]["batch_size"], num_workers=cfg["data"]["num_workers"])
    return {"miou": summary["miou"]}


def base_loss_of(outputs, batch, stage_cfg):
    return base_loss(outputs, batch)


BASE_STAGE = Stage(
    name="base", description="PSPNet base learner, whole network trained on base-class labels",
    build_model=lambda cfg: build_model(cfg, "base"), build_data=base_data,
    inputs=lambda batch: ((batch["image"],), {}), loss=base_loss_of, optimizers=base_optimizers,
    validate=base_validate, sub_epoch_validation=False, test_stage="sam_rsp")


# -- episodic stages: shared data, validation and test --------------------------------------------

def episode_data(cfg: Mapping, log: Callable[[str], None]) -> StageData:
    """Training episodes, and the validation episodes (the test episodes of seed train.val_seed,
    sequential queries, as the original selects its checkpoints)."""
    source = build_source(cfg, log=log)
    train_set = build_episodes(cfg, "train", source=source)
    val_set = build_episodes(cfg, "val", source=source, seed=cfg["train"]["val_seed"],
                             num_episodes=cfg["train"]["val_episodes"], query_order="sequential")
    return StageData(train_set, val_set, source.fold)


def episode_inputs(batch: Mapping):
    return (batch["query_img"], batch["support_imgs"], batch["support_masks"]), {}


def episode_inputs_with_class(batch: Mapping):
    """BAM (and a BAM-driven SAM-RSP) leaves each episode's own class out of its base map in training."""
    return (batch["query_img"], batch["support_imgs"], batch["support_masks"]), {"class_ids": batch["class_base_channel"]}


def episode_validate(model, val_set, cfg: Mapping, proc: ProcessInfo, fold, runner=None) -> dict:
    """Novel-class mIoU (and FB-IoU) of the final output on the validation episodes, and of
    the RSP when the model has one. ``runner``: the episode runner, whose feature cache keeps
    the frozen encoders' work on the val queries between validations."""
    summary = evaluate_episodes(model, val_set, class_ids=fold.novel, proc=proc, batch_size=cfg["eval"]["batch_size"],
                                num_workers=cfg["data"]["num_workers"], desc="val", runner=runner)
    result = {"miou": summary["final"]["miou"], "fbiou": summary["final"]["fbiou"]}
    if "prompt" in summary:
        result.update(prompt_miou=summary["prompt"]["miou"], prompt_fbiou=summary["prompt"]["fbiou"])
    return result


def episode_val_runner(cfg: Mapping, device: torch.device, log: Callable[[str], None]):
    return build_runner(cfg, device=device, log=log)


def episodic_test(model, cfg: Mapping, *, proc: ProcessInfo, out_dir: Path, log: Callable[[str], None],
                  runner=None, progress: bool = True) -> dict:
    """The few-shot test protocol (util.evaluation.run_test_protocol) with one feature cache for
    every seed, ``vis=N`` episode pictures, a per-class IoU chart and, with ``eval.refine=fastsam``,
    the FastSAM-refined output scored beside the others (util.evaluation.build_refiner: its
    weights and the extra are checked here, before any episode)."""
    refiner = build_refiner(cfg, device=proc.device, log=log, model=getattr(model, "module", model))
    # one runner (and so one feature cache) for every seed of the protocol
    runner = runner or build_runner(cfg, device=proc.device, log=log)
    if cfg["vis"] < 0:
        raise ConfigError(f"vis must be >= 0 (pictures of the first N episodes), got {cfg['vis']}")
    pictures = None   # vis=N: the first N episodes of the first seed, drawn by rank 0 (see util/vis.py)
    if cfg["vis"] and proc.is_main:
        from util.vis import episode_pictures_factory
        pictures = episode_pictures_factory(cfg, out_dir=out_dir / "vis", num_episodes=cfg["vis"])
    results = run_test_protocol(model, cfg, proc=proc, runner=runner, progress=progress, log=log,
                                on_batch_factory=pictures, refiner=refiner)
    if refiner is not None:
        results["refine_stats"] = all_reduce_counts(refiner.stats, proc.device)
    counts = all_reduce_counts(runner.stats, proc.device)
    results.update(encoder_calls=counts["encoder_calls"], cache_hits=counts["cache_hits"], cache_counts=counts)
    log(f"query encoder calls: {counts['encoder_calls']}, cache hits: {counts['cache_hits']}"
        + (f" ({', '.join(f'{k} {v}' for k, v in counts.items() if k not in ('encoder_calls', 'cache_hits'))})"
           if len(counts) > 2 else ""))
    if cfg["vis"] and proc.is_main:
        from util.vis import write_class_iou_chart
        chart = write_class_iou_chart(results, out_dir / "class_iou.png")
        log(f"pictures: {out_dir / 'vis'} (first {cfg['vis']} episodes of seed {results['seeds'][0]}), "
            f"per-class IoU chart: {chart}")
    return results


def single_lr_optimizers(model: torch.nn.Module, cfg: Mapping) -> List[OptimizerSpec]:
    """Every trainable parameter at ``train.<stage>.lr``."""
    stage = cfg["train"]["stage"]
    params = [p for _, p in trainable_parameters(model, stage)]
    return [sgd(cfg, [{"params": params, "base_lr": cfg["train"][stage]["lr"], "name": "all"}])]


def weighted(loss_fn):
    """A loss of ``(outputs, batch, weights)`` called with ``train.<stage>.loss_weights``."""
    def loss(outputs, batch, stage_cfg):
        return loss_fn(outputs, batch, tuple(stage_cfg["loss_weights"]))
    loss.__doc__ = loss_fn.__doc__
    return loss


#: what every episodic stage (bam, sam_rsp, sccan) shares: data, validation, test protocol
EPISODIC = dict(build_data=episode_data, validate=episode_validate, val_runner=episode_val_runner,
                test=episodic_test, format_results=format_results)

BAM_STAGE = Stage(
    name="bam", description="BAM meta learner; backbone and base learner frozen (their BatchNorm in eval)",
    build_model=lambda cfg: build_model(cfg, "bam"), inputs=episode_inputs_with_class, loss=weighted(bam_loss),
    optimizers=single_lr_optimizers, **EPISODIC)

SAM_RSP_STAGE = Stage(
    name="sam_rsp", description="SAM-RSP decoder; SAM encoder and the RSP generator (BAM or SCCAN) frozen",
    build_model=lambda cfg: build_model(cfg, "sam_rsp"), inputs=episode_inputs_with_class,
    loss=weighted(sam_rsp_loss), optimizers=single_lr_optimizers, **EPISODIC)
