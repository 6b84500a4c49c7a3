"""One training loop for the three stages (SPEC 4); the stage picks model, data, loss and
trainable parameters.

    base     PSPNet base learner, whole network trained on base-class labels
    bam      BAM meta learner; backbone and base learner frozen (their BatchNorm in eval)
    sam_rsp  SAM-RSP decoder; SAM encoder and BAM frozen

SGD (momentum, weight decay on every trainable parameter), poly learning rate per iteration,
validation on the test episodes (as the original) with best-checkpoint selection and early
stop. Checkpoints hold the trainable weights, the optimizer, the step, RNG states, the best
metric and the config; frozen parts loaded from files are referenced by path and sha256.
Writes are atomic. ``resume=PATH|auto`` continues exactly where a checkpoint was written.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from model import build_model
from util.atomic import write_text_atomic
from util.checkpoint import (capture_rng_state, checkpoint_payload, load_pretrained_parts, read_checkpoint,
                             restore_rng_state, restore_training_weights, save_checkpoint)
from util.config import PROJECT_ROOT, ConfigError, resolve_path, save_config
from util.dataset import build_base_dataset, build_episodes, build_source
from util.distributed import ProcessInfo, broadcast_object, init_processes
from util.evaluation import evaluate_episodes, evaluate_segmentation, make_loader
from util.feature_cache import build_runner, prepare_frozen_encoders
from util.losses import LOSSES

STAGES = ("base", "bam", "sam_rsp")


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0                 # the epoch in progress (or the next one when step_in_epoch == 0)
    step_in_epoch: int = 0         # iterations of ``epoch`` already done
    global_step: int = 0
    best_metric: float = -1.0
    best_epoch: float = -1.0            # epoch position (e.g. 3.5 = mid-epoch 4) of the best validation
    epochs_without_improvement: int = 0
    improved_in_epoch: bool = False     # a validation of ``epoch`` improved the best metric
    epoch_loss_sum: float = 0.0    # training loss summed over the iterations of ``epoch`` done so far
    history: list = field(default_factory=list)      # validations and per-epoch training losses


def default_run_dir(cfg: Mapping, stage: str) -> Path:
    data = cfg["data"]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return PROJECT_ROOT / "exp" / data["dataset"] / stage / f"split{data['split']}" / cfg["model"]["backbone"] / \
        f"{data['shot']}shot" / stamp


def make_logger(run_dir: Path | None, name: str, is_main: bool) -> logging.Logger:
    """A logger writing to the console (through tqdm) and ``run_dir/<name>.log`` on rank 0."""
    logger = logging.getLogger(f"samrsp.{name}.{run_dir}")
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.DEBUG if is_main else logging.WARNING)

    class TqdmHandler(logging.Handler):
        def emit(self, record):
            tqdm.write(self.format(record))

    console = TqdmHandler(level=logging.INFO)      # debug records (per-step losses) go to the file only
    console.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(console)
    if run_dir is not None and is_main:
        handler = logging.FileHandler(run_dir / f"{name}.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        logger.addHandler(handler)
    return logger


def param_groups(model: torch.nn.Module, cfg: Mapping, stage: str) -> list[dict]:
    """Trainable parameters with their effective learning rates (``base_lr`` of each group)."""
    stage_cfg = cfg["train"][stage]
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise RuntimeError(f"stage {stage}: the model has no trainable parameter")
    if stage == "base":   # backbone at lr_backbone, PPM + classifier at lr_head (SPEC 4.1)
        backbone = [p for n, p in trainable if n.startswith("layer")]
        head = [p for n, p in trainable if not n.startswith("layer")]
        return [{"params": backbone, "base_lr": stage_cfg["lr_backbone"], "name": "backbone"},
                {"params": head, "base_lr": stage_cfg["lr_head"], "name": "head"}]
    return [{"params": [p for _, p in trainable], "base_lr": stage_cfg["lr"], "name": "all"}]


def poly_lr(base_lr: float, step: int, max_steps: int, power: float) -> float:
    """``base_lr * (1 - step / max_steps) ** power`` with the original's 1-based step."""
    return base_lr * (1 - step / max_steps) ** power


def build_stage_data(cfg: Mapping, stage: str, log: Callable[[str], None]):
    source = build_source(cfg, log=log)
    if stage == "base":
        return source, build_base_dataset(cfg, "train", source=source), build_base_dataset(cfg, "val", source=source)
    train_set = build_episodes(cfg, "train", source=source)
    val_set = build_episodes(cfg, "val", source=source, seed=cfg["train"]["val_seed"],
                             num_episodes=cfg["train"]["val_episodes"], query_order="sequential")
    return source, train_set, val_set


def training_inputs(stage: str, batch: Mapping) -> tuple[tuple, dict]:
    """The model's arguments for a training batch (already on the device)."""
    if stage == "base":
        return (batch["image"],), {}
    return (batch["query_img"], batch["support_imgs"], batch["support_masks"]), {"class_ids": batch["class_base_channel"]}


def validate(model, val_set, cfg: Mapping, stage: str, proc: ProcessInfo, fold, runner=None) -> dict:
    """The selection metric of the stage: base-class mIoU (base) or novel-class mIoU of the
    final output on the validation episodes (bam, sam_rsp). ``runner``: the episode runner,
    whose feature cache keeps the frozen encoders' work on the val queries between validations."""
    workers = cfg["data"]["num_workers"]
    if stage == "base":
        summary = evaluate_segmentation(model, val_set, num_classes=fold.num_base_channels, proc=proc,
                                        batch_size=cfg["eval"]["batch_size"], num_workers=workers)
        return {"miou": summary["miou"]}
    summary = evaluate_episodes(model, val_set, class_ids=fold.novel, proc=proc, batch_size=cfg["eval"]["batch_size"],
                                num_workers=workers, desc="val", runner=runner)
    result = {"miou": summary["final"]["miou"], "fbiou": summary["final"]["fbiou"]}
    if "prompt" in summary:
        result.update(prompt_miou=summary["prompt"]["miou"], prompt_fbiou=summary["prompt"]["fbiou"])
    return result


def _to_device(batch: Mapping, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def train(cfg: Mapping, *, on_step: Callable[[TrainState], None] | None = None) -> dict:
    """Train ``cfg.train.stage``; returns the run summary (also written to results.json)."""
    stage = cfg["train"]["stage"]
    if stage not in STAGES:
        raise ConfigError(f"train.stage must be one of {STAGES}, got {stage!r}")
    stage_cfg, train_cfg = cfg["train"][stage], cfg["train"]
    proc = init_processes(cfg["device"])
    if stage_cfg["batch_size"] % proc.world_size:
        raise ConfigError(f"train.{stage}.batch_size={stage_cfg['batch_size']} (the total over processes) is not "
                         f"divisible by the {proc.world_size} processes")
    batch_size = stage_cfg["batch_size"] // proc.world_size

    # -- run directory, config, logs --------------------------------------------------------
    resume = cfg["resume"]
    if resume == "auto":
        if not cfg["output_dir"]:
            raise ConfigError("resume=auto continues output_dir/last.pth: set output_dir to the run directory")
        resume = str(resolve_path(cfg["output_dir"]) / "last.pth")
        if not Path(resume).is_file():
            resume = ""   # nothing to continue yet: a fresh run in that directory
    run_dir = resolve_path(cfg["output_dir"]) if cfg["output_dir"] else \
        (Path(resume).parent if resume else default_run_dir(cfg, stage))
    run_dir = Path(broadcast_object(str(run_dir)))
    if proc.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    log = make_logger(run_dir, "train", proc.is_main)
    log.info(f"stage {stage} | run directory {run_dir} | {proc.world_size} process(es) on {proc.device}")
    writer = None
    if proc.is_main:
        from tensorboardX import SummaryWriter
        writer = SummaryWriter(str(run_dir / "tensorboard"))

    # -- model, pretrained parts, optimizer ---------------------------------------------------
    torch.manual_seed(cfg["seed"])
    model = build_model(cfg, stage)
    frozen_refs = load_pretrained_parts(model, cfg, stage, log=log.info)
    model.to(proc.device)
    prepare_frozen_encoders(model, device=proc.device, amp=train_cfg["amp"], compile=False, log=log.info)
    optimizer = torch.optim.SGD(param_groups(model, cfg, stage), lr=0.0, momentum=train_cfg["momentum"],
                                weight_decay=train_cfg["weight_decay"])
    state = TrainState()
    if resume:
        payload = read_checkpoint(resume)
        if "optimizer" not in payload or "rng" not in payload:
            raise ConfigError(f"resume={resume}: this checkpoint has no optimizer/RNG state (best.pth keeps only "
                              "what inference needs); resume from the run's last.pth")
        restore_training_weights(model, payload, expected_stage=stage, frozen_refs=frozen_refs)
        optimizer.load_state_dict(payload["optimizer"])
        state = TrainState(**payload["train_state"])
        log.info(f"resumed {resume}: epoch {state.epoch}, iteration {state.step_in_epoch} of it, "
                 f"global step {state.global_step}")
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info(f"{type(model).__name__}: {n_trainable:,} trainable parameters")
    net = DistributedDataParallel(model, device_ids=[proc.device.index] if proc.device.type == "cuda" else None) \
        if proc.distributed else model

    # -- data ----------------------------------------------------------------------------------
    source, train_set, val_set = build_stage_data(cfg, stage, log.info)
    # the frozen encoders' work on the val queries is computed at the first validation only
    val_runner = None if stage == "base" else build_runner(cfg, device=proc.device, log=log.info)
    iters_per_epoch = (len(train_set) // proc.world_size) // batch_size
    if train_cfg["iters_per_epoch"]:
        iters_per_epoch = min(iters_per_epoch, train_cfg["iters_per_epoch"])
    if iters_per_epoch < 1:
        raise ConfigError(f"stage {stage}: {len(train_set)} training samples are fewer than one batch of "
                         f"{stage_cfg['batch_size']}")
    epochs = stage_cfg["epochs"]
    max_steps = epochs * iters_per_epoch
    val_per_epoch = train_cfg["val_per_epoch"] or (1 if stage == "base" or epochs > 100 else 2)
    val_points = sorted({iters_per_epoch * (k + 1) // val_per_epoch for k in range(val_per_epoch)})
    loss_fn, weights = LOSSES[stage], stage_cfg.get("loss_weights", ())
    log.info(f"{len(train_set)} training samples, {iters_per_epoch} iterations x {epochs} epochs, batch "
             f"{stage_cfg['batch_size']} ({batch_size} per process), validation {val_per_epoch}x per epoch on "
             f"{len(val_set)} {'images' if stage == 'base' else 'episodes'}")
    if getattr(train_set, "skipped_queries", 0) or getattr(val_set, "skipped_queries", 0):
        log.info(f"skipped queries with none of the fold's classes: train {train_set.skipped_queries}, "
                 f"val {val_set.skipped_queries}")

    def save(name: str, resumable: bool = True) -> None:
        """last.pth carries the optimizer (momentum) to resume; best.pth only what inference needs."""
        if proc.is_main:
            payload = checkpoint_payload(model, stage=stage, frozen_refs=frozen_refs,
                                         optimizer=optimizer if resumable else None, train_state=asdict(state),
                                         rng=capture_rng_state() if resumable else None, config=cfg)
            save_checkpoint(payload, run_dir / name)

    def run_validation(epoch_position: float) -> bool:
        """Validate; keep the best checkpoint. True when the metric improved."""
        metrics = validate(net, val_set, cfg, stage, proc, source.fold, runner=val_runner)
        state.history.append({"epoch": epoch_position, "step": state.global_step, **metrics})
        improved = metrics["miou"] > state.best_metric
        log.info("validation at epoch {:.1f}: mIoU {:.2f}{}{}".format(
            epoch_position, 100 * metrics["miou"], f"  FB-IoU {100 * metrics['fbiou']:.2f}" if "fbiou" in metrics else "",
            f"  RSP mIoU {100 * metrics['prompt_miou']:.2f}" if "prompt_miou" in metrics else ""))
        if writer:
            for key, value in metrics.items():
                writer.add_scalar(f"val/{key}", value, state.global_step)
        if improved:
            state.best_metric, state.best_epoch = metrics["miou"], epoch_position
            if train_cfg["select"] == "best":
                save("best.pth", resumable=False)
                log.info(f"best so far: saved best.pth (mIoU {100 * state.best_metric:.2f})")
        return improved

    # -- the loop -----------------------------------------------------------------------------
    net.train()
    bar = tqdm(total=max_steps, initial=state.global_step, desc=f"train {stage}", dynamic_ncols=True,
               disable=not proc.is_main)
    for epoch in range(state.epoch, epochs):
        train_set.set_epoch(epoch)
        if state.step_in_epoch == 0:
            torch.manual_seed(cfg["seed"] + epoch)   # the original re-seeds every epoch
        else:
            restore_rng_state(payload["rng"])        # a resumed epoch continues its RNG streams
        loader = make_loader(train_set, proc, batch_size, cfg["data"]["num_workers"],
                             limit=iters_per_epoch * batch_size, skip=state.step_in_epoch * batch_size)
        for batch in loader:
            state.global_step += 1
            lrs = [poly_lr(g["base_lr"], state.global_step, max_steps, train_cfg["power"]) for g in optimizer.param_groups]
            for group, lr in zip(optimizer.param_groups, lrs):
                group["lr"] = lr
            batch = _to_device(batch, proc.device)
            args, kwargs = training_inputs(stage, batch)
            outputs = net(*args, **kwargs)
            loss, parts = loss_fn(outputs, batch, weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            state.step_in_epoch += 1
            loss_value = float(parts["loss"])
            state.epoch_loss_sum += loss_value
            bar.update(1)
            if state.global_step % train_cfg["log_every"] == 0 or state.step_in_epoch == iters_per_epoch:
                values = {k: float(v) for k, v in parts.items()}
                bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lrs[-1]:.2e}", epoch=epoch + 1)
                log.debug(str(values))
                if writer:
                    for key, value in values.items():
                        writer.add_scalar(f"train/{key}", value, state.global_step)
                    writer.add_scalar("train/lr", lrs[-1], state.global_step)
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"stage {stage}: loss is {loss_value} at step {state.global_step}")
            if state.step_in_epoch in val_points:
                state.improved_in_epoch |= run_validation(epoch + state.step_in_epoch / iters_per_epoch)
            if state.step_in_epoch == iters_per_epoch:
                mean_loss = state.epoch_loss_sum / iters_per_epoch
                state.history.append({"epoch": epoch + 1, "step": state.global_step, "train_loss": mean_loss})
                state.epochs_without_improvement = 0 if state.improved_in_epoch else state.epochs_without_improvement + 1
                state.epoch, state.step_in_epoch, state.epoch_loss_sum, state.improved_in_epoch = epoch + 1, 0, 0.0, False
                log.info(f"epoch {epoch + 1}/{epochs} done, mean training loss {mean_loss:.4f}")
                save("last.pth")
            elif train_cfg["checkpoint_every"] and state.step_in_epoch % train_cfg["checkpoint_every"] == 0:
                save("last.pth")
            if on_step is not None:
                on_step(state)
        if train_cfg["select"] == "best" and train_cfg["early_stop"] and \
                state.epochs_without_improvement >= train_cfg["early_stop"]:
            log.info(f"early stop: no improvement for {state.epochs_without_improvement} epochs")
            break
    bar.close()

    summary = {"stage": stage, "run_dir": str(run_dir), "epochs_done": state.epoch, "global_step": state.global_step,
               "select": train_cfg["select"], "best_miou": state.best_metric, "best_epoch": state.best_epoch,
               "last_validation": next((h for h in reversed(state.history) if "miou" in h), None),
               "history": state.history,
               "checkpoint": str(run_dir / ("best.pth" if train_cfg["select"] == "best" else "last.pth"))}
    if proc.is_main:
        write_text_atomic(run_dir / "results.json", json.dumps(summary, indent=2))
        log.info(f"done: {summary['checkpoint']}" + (f" (best mIoU {100 * state.best_metric:.2f} at epoch "
                                                    f"{state.best_epoch:g})" if train_cfg['select'] == 'best' else ""))
    if writer:
        writer.close()
    return summary


def default_test_dir(cfg: Mapping) -> Path:
    return default_run_dir(cfg, "test")


def test(cfg: Mapping, *, runner=None, progress: bool = True) -> dict:
    """Evaluate ``cfg.weights`` with the test protocol; prints the tables and writes results.json."""
    from util.checkpoint import load_weights
    from util.evaluation import format_results, run_test_protocol
    from util.feature_cache import all_reduce_counts

    if not cfg["weights"]:
        raise ConfigError("test.py needs weights=PATH: a checkpoint of this project (best.pth / last.pth of a "
                          "run) or an original SAM-RSP / BAM checkpoint")
    stage = "bam" if cfg["train"]["stage"] == "bam" else "sam_rsp"
    proc = init_processes(cfg["device"])
    out_dir = resolve_path(cfg["output_dir"]) if cfg["output_dir"] else default_test_dir(cfg)
    out_dir = Path(broadcast_object(str(out_dir)))
    if proc.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    log = make_logger(out_dir, "test", proc.is_main)
    model = build_model(cfg, stage)
    report = load_weights(model, resolve_path(cfg["weights"]), require_complete=True)
    log.info(f"loaded {cfg['weights']} ({report.summary()})")
    model.to(proc.device).eval()
    prepare_frozen_encoders(model, device=proc.device, amp=cfg["eval"]["amp"], compile=cfg["eval"]["compile"],
                            log=log.info)
    # one runner (and so one feature cache) for every seed of the protocol
    runner = runner or build_runner(cfg, device=proc.device, log=log.info)
    if cfg["vis"] < 0:
        raise ConfigError(f"vis must be >= 0 (pictures of the first N episodes), got {cfg['vis']}")
    pictures = None   # vis=N: the first N episodes of the first seed, drawn by rank 0 (see util/vis.py)
    if cfg["vis"] and proc.is_main:
        from util.vis import episode_pictures_factory
        pictures = episode_pictures_factory(cfg, out_dir=out_dir / "vis", num_episodes=cfg["vis"])
    results = run_test_protocol(model, cfg, proc=proc, runner=runner, progress=progress, log=log.info,
                                on_batch_factory=pictures)
    results["weights"] = str(cfg["weights"])
    counts = all_reduce_counts(runner.stats, proc.device)
    results.update(encoder_calls=counts["encoder_calls"], cache_hits=counts["cache_hits"], cache_counts=counts)
    log.info(f"query encoder calls: {counts['encoder_calls']}, cache hits: {counts['cache_hits']}"
             + (f" ({', '.join(f'{k} {v}' for k, v in counts.items() if k not in ('encoder_calls', 'cache_hits'))})"
                if len(counts) > 2 else ""))
    if proc.is_main:
        log.info("\n" + format_results(results))
        write_text_atomic(out_dir / "results.json", json.dumps(results, indent=2))
        log.info(f"results: {out_dir / 'results.json'}")
        if cfg["vis"]:
            from util.vis import write_class_iou_chart
            chart = write_class_iou_chart(results, out_dir / "class_iou.png")
            log.info(f"pictures: {out_dir / 'vis'} (first {cfg['vis']} episodes of seed {cfg['eval']['seeds'][0]}), "
                     f"per-class IoU chart: {chart}")
    results["output_dir"] = str(out_dir)
    return results
