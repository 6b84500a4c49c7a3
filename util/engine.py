"""One training loop and one test entry for every stage; the stage table (util/stages/)
says what a stage builds, reads, optimizes and measures. Nothing here names a stage.

    base     PSPNet base learner, whole network trained on base-class labels
    bam      BAM meta learner; backbone and base learner frozen (their BatchNorm in eval)
    sam_rsp  SAM-RSP decoder; SAM encoder and the RSP generator (BAM or SCCAN) frozen
    sccan    SCCAN; ImageNet backbone frozen

Each of the stage's optimizers gets its own learning-rate schedule per iteration; validation
with best-checkpoint selection on the stage's selection metric and early stop. Checkpoints hold
the trainable weights, the optimizers, the step, RNG states, the best metric and the config;
frozen parts loaded from files are referenced by path and sha256. Writes are atomic.
``resume=PATH|auto`` continues exactly where a checkpoint was written.
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

from util.atomic import write_text_atomic
from util.checkpoint import (capture_rng_state, checkpoint_payload, load_pretrained_parts, read_checkpoint,
                             restore_rng_state, restore_training_weights, save_checkpoint)
from util.config import PROJECT_ROOT, ConfigError, resolve_path, save_config
from util.distributed import broadcast_object, init_processes
from util.evaluation import make_loader
from util.feature_cache import prepare_frozen_encoders
from util.stages import OptimizerSpec, Progress, get_stage


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


def optimizer_states(optimizers: list[OptimizerSpec]) -> dict:
    """The states of a stage's optimizers by name, as a checkpoint stores them."""
    return {o.name: o.optimizer.state_dict() for o in optimizers}


def load_optimizer_states(optimizers: list[OptimizerSpec], states: Mapping, path) -> None:
    """Inverse of :func:`optimizer_states`; a checkpoint of a single optimizer written before
    stages could have several (a bare ``state_dict``) still resumes a one-optimizer stage."""
    if "param_groups" in states and len(optimizers) == 1:
        states = {optimizers[0].name: states}
    names = [o.name for o in optimizers]
    if sorted(states) != sorted(names):
        raise ConfigError(f"resume={path}: the checkpoint holds the optimizers {sorted(states)}, this stage has "
                          f"{sorted(names)} (a checkpoint of another stage?)")
    for o in optimizers:
        o.optimizer.load_state_dict(states[o.name])


def _to_device(batch: Mapping, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def train(cfg: Mapping, *, on_step: Callable[[TrainState], None] | None = None) -> dict:
    """Train ``cfg.train.stage``; returns the run summary (also written to results.json)."""
    spec = get_stage(cfg["train"]["stage"])
    cfg = spec.configure(cfg)
    stage = spec.name
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
    model = spec.build_model(cfg)
    frozen_refs = load_pretrained_parts(model, cfg, stage, log=log.info)
    model.to(proc.device)
    prepare_frozen_encoders(model, device=proc.device, amp=train_cfg["amp"], compile=False, log=log.info)
    optimizers = spec.optimizers(model, cfg)
    state = TrainState()
    if resume:
        payload = read_checkpoint(resume)
        if "optimizer" not in payload or "rng" not in payload:
            raise ConfigError(f"resume={resume}: this checkpoint has no optimizer/RNG state (best.pth keeps only "
                              "what inference needs); resume from the run's last.pth")
        restore_training_weights(model, payload, expected_stage=stage, frozen_refs=frozen_refs)
        load_optimizer_states(optimizers, payload["optimizer"], resume)
        state = TrainState(**payload["train_state"])
        log.info(f"resumed {resume}: epoch {state.epoch}, iteration {state.step_in_epoch} of it, "
                 f"global step {state.global_step}")
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info(f"{type(model).__name__}: {n_trainable:,} trainable parameters")
    net = DistributedDataParallel(model, device_ids=[proc.device.index] if proc.device.type == "cuda" else None,
                                  find_unused_parameters=spec.find_unused_parameters) if proc.distributed else model

    # -- data ----------------------------------------------------------------------------------
    data = spec.build_data(cfg, log.info)
    train_set, val_set = data.train_set, data.val_set
    # e.g. the frozen encoders' work on the val queries, computed at the first validation only
    val_runner = spec.val_runner(cfg, proc.device, log.info) if spec.val_runner else None
    epochs, iters_per_epoch = spec.length(cfg, len(train_set), batch_size, proc.world_size)
    max_steps = epochs * iters_per_epoch
    val_per_epoch = train_cfg["val_per_epoch"] or (2 if spec.sub_epoch_validation and epochs <= 100 else 1)
    val_points = sorted({iters_per_epoch * (k + 1) // val_per_epoch for k in range(val_per_epoch)})
    log.info(f"{len(train_set)} training samples, {iters_per_epoch} iterations x {epochs} epochs, batch "
             f"{stage_cfg['batch_size']} ({batch_size} per process), validation {val_per_epoch}x per epoch on "
             f"{len(val_set)} samples; optimizers: " + ", ".join(
                 f"{o.name} ({o.schedule}: " + ", ".join(f"{g.get('name', i)} {g['base_lr']:g}" for i, g in
                                                          enumerate(o.optimizer.param_groups)) + ")" for o in optimizers))
    if getattr(train_set, "skipped_queries", 0) or getattr(val_set, "skipped_queries", 0):
        log.info(f"skipped queries with none of the fold's classes: train {train_set.skipped_queries}, "
                 f"val {val_set.skipped_queries}")

    def save(name: str, resumable: bool = True) -> None:
        """last.pth carries the optimizer (momentum) to resume; best.pth only what inference needs."""
        if proc.is_main:
            payload = checkpoint_payload(model, stage=stage, frozen_refs=frozen_refs,
                                         optimizer=optimizer_states(optimizers) if resumable else None, train_state=asdict(state),
                                         rng=capture_rng_state() if resumable else None, config=cfg)
            save_checkpoint(payload, run_dir / name)

    def run_validation(epoch_position: float) -> bool:
        """Validate; keep the best checkpoint. True when the metric improved."""
        metrics = spec.validate(net, val_set, cfg, proc, data.fold, runner=val_runner)
        state.history.append({"epoch": epoch_position, "step": state.global_step, **metrics})
        selected = metrics[spec.selection_metric]
        improved = selected > state.best_metric
        log.info("validation at epoch {:.1f}: {} {:.2f}{}{}".format(
            epoch_position, spec.metric_label, 100 * selected, f"  FB-IoU {100 * metrics['fbiou']:.2f}" if "fbiou" in metrics else "",
            f"  RSP mIoU {100 * metrics['prompt_miou']:.2f}" if "prompt_miou" in metrics else ""))
        if writer:
            for key, value in metrics.items():
                writer.add_scalar(f"val/{key}", value, state.global_step)
        if improved:
            state.best_metric, state.best_epoch = selected, epoch_position
            if train_cfg["select"] == "best":
                save("best.pth", resumable=False)
                log.info(f"best so far: saved best.pth ({spec.metric_label} {100 * state.best_metric:.2f})")
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
            progress = Progress(step=state.global_step, max_steps=max_steps, epoch=epoch, epochs=epochs)
            lrs = [lr for o in optimizers for lr in o.set_lr(progress)]
            batch = _to_device(batch, proc.device)
            args, kwargs = spec.inputs(batch)
            outputs = net(*args, **kwargs)
            loss, parts = spec.loss(outputs, batch, stage_cfg)
            for o in optimizers:
                o.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if stage_cfg.get("clip_grad_norm"):
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                               float(stage_cfg["clip_grad_norm"]))
            for o in optimizers:
                o.optimizer.step()
            state.step_in_epoch += 1
            loss_value = float(parts["loss"])
            state.epoch_loss_sum += loss_value
            bar.update(1)
            if state.global_step % train_cfg["log_every"] == 0 or state.step_in_epoch == iters_per_epoch:
                values = {k: float(v) for k, v in parts.items()}
                bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lrs[0]:.2e}", epoch=epoch + 1)
                log.debug(str(values))
                if writer:
                    for key, value in values.items():
                        writer.add_scalar(f"train/{key}", value, state.global_step)
                    for o in optimizers:
                        for i, group in enumerate(o.optimizer.param_groups):
                            writer.add_scalar(f"train/lr_{o.name}_{group.get('name', i)}", group["lr"], state.global_step)
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

    summary = {"stage": stage, "selection_metric": spec.selection_metric, "run_dir": str(run_dir), "epochs_done": state.epoch, "global_step": state.global_step,
               "select": train_cfg["select"], "best_metric": state.best_metric,
               "best_miou": state.best_metric,   # = best_metric, under the few-shot stages' name
               "best_epoch": state.best_epoch,
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

    if not cfg["weights"]:
        raise ConfigError("test.py needs weights=PATH: a checkpoint of this project (best.pth / last.pth of a "
                          "run) or an original checkpoint (SAM-RSP, BAM, SCCAN)")
    trained = get_stage(cfg["train"]["stage"])
    spec = get_stage(trained.test_stage or trained.name)
    if spec.test is None:
        raise ConfigError(f"train.stage={trained.name}: stage {spec.name} has no test protocol")
    cfg = spec.configure(cfg)
    stage = spec.name
    proc = init_processes(cfg["device"])
    out_dir = resolve_path(cfg["output_dir"]) if cfg["output_dir"] else default_test_dir(cfg)
    out_dir = Path(broadcast_object(str(out_dir)))
    if proc.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    log = make_logger(out_dir, "test", proc.is_main)
    model = spec.build_model(cfg)
    report = load_weights(model, resolve_path(cfg["weights"]), require_complete=True)
    log.info(f"loaded {cfg['weights']} ({report.summary()})")
    model.to(proc.device).eval()
    prepare_frozen_encoders(model, device=proc.device, amp=cfg["eval"]["amp"], compile=cfg["eval"]["compile"],
                            log=log.info)
    results = spec.test(model, cfg, proc=proc, out_dir=out_dir, log=log.info, runner=runner, progress=progress)
    results["weights"] = str(cfg["weights"])
    results["stage"] = stage
    if proc.is_main:
        log.info("\n" + spec.format_results(results))
        write_text_atomic(out_dir / "results.json", json.dumps(results, indent=2))
        log.info(f"results: {out_dir / 'results.json'}")
    results["output_dir"] = str(out_dir)
    return results
