"""Evaluation: the few-shot test protocol (SPEC 5) and the base learner's validation.

Every evaluation runs under ``torch.no_grad()`` with the model in eval mode, shards its
episodes over processes (``ShardSampler``) and all-reduces integer counts, so a result does not
depend on the number of processes or on ``eval.batch_size``.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Mapping, Sequence

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from util.config import ConfigError
from util.dataset import build_episodes, build_source, collate
from util.distributed import ProcessInfo, ShardSampler
from util.metrics import (FewShotMeter, SegmentationMeter, crop_targets, foreground_probability_at_original_resolution,
                          predict_at_original_resolution)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DistributedDataParallel (evaluation never goes through DDP: ranks may
    have different numbers of batches)."""
    return model.module if hasattr(model, "module") else model


def episode_inputs(batch: Mapping, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (batch["query_img"].to(device, non_blocking=True), batch["support_imgs"].to(device, non_blocking=True),
            batch["support_masks"].to(device, non_blocking=True))


def make_loader(dataset, proc: ProcessInfo, batch_size: int, num_workers: int, *, limit: int | None = None,
                skip: int = 0) -> DataLoader:
    sampler = ShardSampler(len(dataset), proc.rank, proc.world_size, limit=limit, skip=skip)
    # A private generator: creating the loader must not consume the global RNG (dropout masks
    # of a resumed run would differ otherwise).
    # a dataset may bring its own collate (e.g. lists of differently sized samples: stage cat_sam)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=getattr(dataset, "collate_fn", None) or collate,
                      pin_memory=proc.device.type == "cuda", drop_last=False, generator=torch.Generator(),
                      persistent_workers=False)


class EpisodeRunner:
    """Runs a few-shot model on a batch of episodes: ``outputs = runner(model, batch)``.

    The plain runner calls ``model(query_img, support_imgs, support_masks)``; the feature cache
    (util.feature_cache.CachedEpisodeRunner) plugs in here to reuse the frozen encoders' outputs.
    ``stats["encoder_calls"]`` counts the query images that went through the (frozen) query
    encoder: here one per episode; ``stats["cache_hits"]`` the ones a cache served instead.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.stats = {"encoder_calls": 0, "cache_hits": 0}

    def begin(self, dataset) -> None:
        """Called by :func:`evaluate_episodes` before the episodes of ``dataset`` run."""

    def __call__(self, model: torch.nn.Module, batch: Mapping) -> dict:
        query_img, support_imgs, support_masks = episode_inputs(batch, self.device)
        self.stats["encoder_calls"] += int(query_img.shape[0])
        return model(query_img, support_imgs, support_masks)


class Refiner:
    """A pluggable post-processor of :func:`evaluate_episodes`: more predictions of the same
    episodes, each scored by its own FewShotMeter.

    ``outputs``: name -> table label of every prediction it returns (the prefix of its keys in
    results.json, e.g. ``refined`` -> ``refined_miou_mean``); ``__call__(model, batch, outputs,
    preds)`` -> name -> list of square original-resolution 0/1 maps, like ``preds`` (the final
    output's, from util.metrics.predict_at_original_resolution); ``stats``: integer counters
    (summed over processes into results.json ``refine_stats``).
    """

    outputs: Dict[str, str] = {}
    name: str = "refiner"

    def __init__(self) -> None:
        self.stats: Dict[str, int] = {}

    def begin(self, dataset) -> None:
        """Called before the episodes of ``dataset`` run."""

    def __call__(self, model: torch.nn.Module, batch: Mapping, outputs: dict, preds: list) -> Dict[str, list]:
        raise NotImplementedError


class FastSAMRefiner(Refiner):
    """``eval.refine=fastsam`` (SPEC_FASTSAM 5.2 (a)): FastSAM proposals of each query image at
    its original size (:class:`model.fastsam.FastSAMProposer`, cached per image: the protocol
    queries the same images in every seed), selected by the model's final foreground
    probability (softmax of the final logits mapped to the original size as the scoring maps
    them) with :func:`model.fastsam_select.select_by_mask`; the model's own mask is the
    fallback, so with no proposal the refined prediction IS the unrefined one.

    With ``baseline_delta`` set (a float) it also returns the training-free baseline of
    SPEC_FASTSAM 5.2 (c) (``fastsam_match``): a prototype of the support foreground pooled from
    the model's frozen query/support features, the cosine map of the query's features to it,
    and the proposals of highest mean cosine (:func:`model.fastsam_select.select_by_similarity`).
    """

    name = "fastsam"

    def __init__(self, proposer, *, label: str = "+ FastSAM", purity: float = 0.6, nested: float = 0.9,
                 guard_iou: float = 0.5, baseline_delta: float | None = None) -> None:
        super().__init__()
        self.proposer = proposer
        self.purity, self.nested, self.guard_iou = float(purity), float(nested), float(guard_iou)
        self.baseline_delta = baseline_delta
        self.outputs = {"refined": label}
        if baseline_delta is not None:
            self.outputs["fastsam_match"] = "FastSAM-match (no training)"
        self.stats = {"refined_episodes": 0, "refine_kept": 0, "refine_no_proposals": 0, "refine_none_kept": 0,
                      "refine_disagrees": 0, "fastsam_network_calls": 0, "fastsam_cache_hits": 0}

    def proposals(self, path: str) -> Dict[str, torch.Tensor]:
        """The proposals of the image file ``path`` (decoded as the dataset reads it)."""
        import numpy as np

        from util.io import read_image
        image = read_image(path).astype(np.uint8)          # read_image gives the uint8 pixels as float32
        calls, hits = self.proposer.network_calls, self.proposer.cache_hits
        result = self.proposer.proposals(image)
        self.stats["fastsam_network_calls"] += self.proposer.network_calls - calls
        self.stats["fastsam_cache_hits"] += self.proposer.cache_hits - hits
        return result

    def __call__(self, model: torch.nn.Module, batch: Mapping, outputs: dict, preds: list) -> Dict[str, list]:
        from model.fastsam_select import select_by_mask

        sizes = batch["query_ori_size"]
        probs = foreground_probability_at_original_resolution(outputs["logits"], sizes)
        refined, matched = [], []
        similarities = self.similarity_maps(model, batch) if self.baseline_delta is not None else None
        for i, (pred, prob, (h, w)) in enumerate(zip(preds, probs, sizes.tolist())):
            found = self.proposals(batch["query_path"][i])
            model_mask = pred[:h, :w].bool().cpu()
            selection = select_by_mask(found["masks"], prob.cpu(), runs=found["runs"], model_mask=model_mask,
                                       purity=self.purity, nested=self.nested, guard_iou=self.guard_iou)
            self.stats["refined_episodes"] += 1
            key = {"": "refine_kept", "no proposals": "refine_no_proposals", "none kept": "refine_none_kept",
                   "disagrees": "refine_disagrees"}[selection.fallback]
            self.stats[key] += 1
            out = pred.clone()
            out[:h, :w] = selection.mask.to(out.device, out.dtype)
            refined.append(out)
            if similarities is not None:
                matched.append(self._match(found, similarities[i], pred, h, w))
        result = {"refined": refined}
        if similarities is not None:
            result["fastsam_match"] = matched
        return result

    # -- the training-free baseline (SPEC_FASTSAM 5.2 (c)) ----------------------------------------
    def similarity_maps(self, model: torch.nn.Module, batch: Mapping) -> list:
        """Per episode the cosine similarity (H x W at the query's original size) of the query's
        frozen features to the support foreground prototype (module :func:`support_similarity`)."""
        return support_similarity(model, batch)

    def _match(self, found: Dict[str, torch.Tensor], similarity: torch.Tensor, pred: torch.Tensor, h: int,
               w: int) -> torch.Tensor:
        from model.fastsam_select import select_by_similarity
        selection = select_by_similarity(found["masks"], similarity.cpu(), delta=float(self.baseline_delta),
                                         runs=found["runs"])
        out = torch.zeros_like(pred)
        out[:h, :w] = selection.mask.to(out.device, out.dtype)
        return out


def feature_source(model: torch.nn.Module):
    """The module whose frozen features the FastSAM-match baseline pools: the model itself (BAM,
    SCCAN) or its prompt generator (SAM-RSP); None when neither has the feature extractors."""
    for candidate in (model, getattr(model, "rspg", None)):
        if candidate is not None and hasattr(candidate, "extract_query_features") \
                and hasattr(candidate, "extract_support_features"):
            return candidate
    return None


@torch.no_grad()
def support_similarity(model: torch.nn.Module, batch: Mapping, layer: str = "layer3") -> list:
    """SPEC_FASTSAM 5.2 (c), steps 1-2: per episode the cosine similarity of the query's frozen
    ``layer`` features to the support prototype (masked average pooling of the supports' same
    features under their masks, over the K shots), mapped to the query's original size as the
    logits are (bilinear, align_corners, to the square of side max(h, w); cropped to h x w)."""
    import torch.nn.functional as F

    from util.metrics import upsample_to_original_square
    source = feature_source(model)
    if source is None:
        raise ValueError(f"{type(model).__name__} has no extract_query_features / extract_support_features")
    device = next(source.parameters()).device
    query_img = batch["query_img"].to(device)
    support_imgs, support_masks = batch["support_imgs"].to(device), batch["support_masks"].to(device)
    query = source.extract_query_features(query_img)[layer].float()                     # B x C x h x w
    support = source.extract_support_features(support_imgs, support_masks)[layer].float()  # B x K x C x h' x w'
    b, k = support.shape[:2]
    masks = (support_masks == 1).float().flatten(0, 1)[:, None]
    masks = F.interpolate(masks, size=support.shape[-2:], mode="bilinear", align_corners=True).unflatten(0, (b, k))
    prototype = (support * masks).sum((1, 3, 4)) / masks.sum((1, 3, 4)).clamp(min=1e-5)  # B x C
    cosine = F.cosine_similarity(query, prototype[:, :, None, None], dim=1, eps=1e-7)  # B x h x w
    return [upsample_to_original_square(c[None, None], (h, w))[0, 0, :h, :w]
            for c, (h, w) in zip(cosine, batch["query_ori_size"].tolist())]


def build_refiner(cfg: Mapping, *, device: torch.device, log: Callable[[str], None] = print,
                  model: torch.nn.Module | None = None) -> Refiner | None:
    """The refiner of ``eval.refine`` (None for ``none``). Builds the FastSAM proposer NOW, so that a
    missing weight file or a missing extra fails before any episode runs. With ``model`` (whose
    frozen features the baseline pools, :func:`feature_source`) the refiner also returns the
    training-free FastSAM-match baseline (SPEC_FASTSAM 5.2 (c), ``model.fastsam.similarity_delta``)."""
    method = cfg["eval"]["refine"]
    if method in (None, "none", ""):
        return None
    if method != "fastsam":
        raise ConfigError(f"eval.refine must be none or fastsam, got {method!r}")
    from model.fastsam import FastSAMProposer, FastSAMUnavailable, FastSAMWeightsError
    from util.config import resolve_path
    fs = cfg["model"]["fastsam"]
    weights = resolve_path(fs["weights"], cfg) if fs["weights"] else ""
    try:
        proposer = FastSAMProposer(weights, imgsz=fs["imgsz"], conf=fs["conf"], iou=fs["iou"],
                                   retina_masks=fs["retina_masks"], max_det=fs["max_det"], device=str(device),
                                   cache_mb=fs["cache_mb"])
    except FastSAMWeightsError as err:
        raise FastSAMWeightsError(f"eval.refine=fastsam (config key model.fastsam.weights): {err}") from err
    except FastSAMUnavailable as err:
        raise ConfigError(f"eval.refine=fastsam: {err}") from err
    except ValueError as err:
        raise ConfigError(f"model.fastsam: {err}") from err
    log(f"eval.refine=fastsam: {proposer.weights} (imgsz {proposer.imgsz}, conf {proposer.conf}, iou {proposer.iou}, "
        f"retina_masks {proposer.retina_masks}); select_by_mask purity {fs['purity']}, nested {fs['nested']}, "
        f"guard_iou {fs['guard_iou']}")
    delta = None
    if model is not None and feature_source(model) is not None:
        delta = float(fs["similarity_delta"])
        log(f"eval.refine=fastsam: also the training-free FastSAM-match baseline (support prototype of the "
            f"frozen layer3 features, cosine map, select_by_similarity delta {delta})")
    return FastSAMRefiner(proposer, purity=fs["purity"], nested=fs["nested"], guard_iou=fs["guard_iou"],
                          baseline_delta=delta)


@torch.no_grad()
def evaluate_episodes(model: torch.nn.Module, dataset, *, class_ids: Sequence[int], proc: ProcessInfo,
                      batch_size: int = 1, num_workers: int = 0, runner: EpisodeRunner | None = None,
                      progress: bool = True, desc: str = "eval",
                      on_batch: Callable[[Mapping, dict, list], None] | None = None,
                      refiner: "Refiner | None" = None) -> dict:
    """Score every episode of ``dataset`` at original resolution.

    Returns the summaries (util.metrics.FewShotMeter) of the final output (``final``), of the
    RSP when the model has one (``prompt``), and of the all-foreground predictor on the same
    episodes (``baseline``), summed over processes. ``refiner`` (:class:`Refiner`, e.g.
    :class:`FastSAMRefiner`): further predictions of the same episodes, one summary per name of
    ``refiner.outputs``.
    """
    net = unwrap(model)
    was_training = net.training
    net.eval()
    runner = runner or EpisodeRunner(proc.device)
    names = ("final", "prompt", "baseline") + (tuple(refiner.outputs) if refiner is not None else ())
    meters = {name: FewShotMeter(class_ids, device=proc.device) for name in names}
    has_prompt = False
    loader = make_loader(dataset, proc, batch_size, num_workers)
    runner.begin(dataset)
    if refiner is not None:
        refiner.begin(dataset)
    for batch in tqdm(loader, desc=desc, disable=not (progress and proc.is_main), leave=False, dynamic_ncols=True):
        outputs = runner(net, batch)
        sizes = batch["query_ori_size"]
        targets = [t.to(proc.device) for t in crop_targets(batch["query_label_ori"], sizes)]
        preds = predict_at_original_resolution(outputs["logits"], sizes)
        meters["final"].update(preds, targets, batch["class_id"])
        if "prompt_logits" in outputs:
            has_prompt = True
            meters["prompt"].update(predict_at_original_resolution(outputs["prompt_logits"], sizes), targets,
                                    batch["class_id"])
        meters["baseline"].update([torch.ones_like(t) for t in targets], targets, batch["class_id"])
        if refiner is not None:
            for name, refined in refiner(net, batch, outputs, preds).items():
                meters[name].update(refined, targets, batch["class_id"])
        if on_batch is not None:
            on_batch(batch, outputs, preds)
    for meter in meters.values():
        meter.all_reduce()
    net.train(was_training)
    summary = {name: meter.summary() for name, meter in meters.items()}
    if not has_prompt:
        summary.pop("prompt")
    return summary


@torch.no_grad()
def evaluate_segmentation(model: torch.nn.Module, dataset, *, num_classes: int, proc: ProcessInfo,
                          batch_size: int = 1, num_workers: int = 0, progress: bool = True) -> dict:
    """The base learner's validation: semantic mIoU over the base classes at original resolution."""
    net = unwrap(model)
    was_training = net.training
    net.eval()
    meter = SegmentationMeter(num_classes, device=proc.device)
    for batch in tqdm(make_loader(dataset, proc, batch_size, num_workers), desc="val", leave=False,
                      disable=not (progress and proc.is_main), dynamic_ncols=True):
        logits = net(batch["image"].to(proc.device))["logits"]
        preds = predict_at_original_resolution(logits, batch["ori_size"])
        targets = [t.to(proc.device) for t in crop_targets(batch["label_ori"], batch["ori_size"])]
        meter.update(preds, targets)
    meter.all_reduce()
    net.train(was_training)
    return meter.summary()


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


#: eval.protocol -> what it is. ``samrsp`` reads eval.seeds / eval.episodes; the others fix them.
PROTOCOLS = {
    "samrsp": "eval.seeds x eval.episodes (default SAM-RSP's 5 seeds x 1000), mean +- sample std over seeds",
    "sccan": "SCCAN's published protocol: one seed 321 x 1000 episodes (PASCAL) / 4000 (COCO); the original "
             "also selected its checkpoints on these episodes, so the figure is not an independent test",
}
_SCCAN_EPISODES = {"pascal": 1000, "coco": 4000}


def protocol_settings(cfg: Mapping) -> tuple[str, list[int], int]:
    """``(name, seeds, episodes per seed)`` of ``eval.protocol``."""
    ev = cfg["eval"]
    name = ev["protocol"]
    if name not in PROTOCOLS:
        raise ConfigError(f"eval.protocol must be one of {', '.join(PROTOCOLS)}, got {name!r}")
    if name == "sccan":
        # other datasets (toy, custom) keep eval.episodes: the original defines PASCAL and COCO only
        return name, [321], _SCCAN_EPISODES.get(cfg["data"]["dataset"], int(ev["episodes"]))
    return name, list(ev["seeds"]), int(ev["episodes"])


def run_test_protocol(model: torch.nn.Module, cfg: Mapping, *, proc: ProcessInfo, runner: EpisodeRunner | None = None,
                      progress: bool = True, log: Callable[[str], None] = print,
                      on_batch_factory: Callable[[int], Callable | None] | None = None,
                      refiner: Refiner | None = None) -> dict:
    """The test protocol of ``eval.protocol`` (:data:`PROTOCOLS`): seeds x episodes; mean +- std
    over seeds and every seed's figures (never the best seed). ``refiner``: more predictions of
    the same episodes (:class:`Refiner`), reported beside the others under their prefixes."""
    ev = cfg["eval"]
    protocol, seeds, num_episodes = protocol_settings(cfg)
    source = build_source(cfg, progress=progress and proc.is_main, log=log if proc.is_main else (lambda _: None))
    fold = source.fold
    per_seed, class_ious, prompt_class_ious = [], [], []
    extra = dict(refiner.outputs) if refiner is not None else {}
    extra_class_ious = {name: [] for name in extra}
    skipped = 0
    for seed_index, seed in enumerate(seeds):
        episodes = build_episodes(cfg, "val", source=source, seed=seed, num_episodes=num_episodes)
        skipped = episodes.skipped_queries
        on_batch = on_batch_factory(seed_index) if on_batch_factory else None
        summary = evaluate_episodes(model, episodes, class_ids=fold.novel, proc=proc, batch_size=ev["batch_size"],
                                    num_workers=cfg["data"]["num_workers"], runner=runner, progress=progress,
                                    desc=f"seed {seed}", on_batch=on_batch, refiner=refiner)
        row = {"seed": seed, "miou": summary["final"]["miou"], "fbiou": summary["final"]["fbiou"],
               "baseline_miou": summary["baseline"]["miou"], "baseline_fbiou": summary["baseline"]["fbiou"],
               "classes_unseen": summary["final"]["classes_unseen"]}
        class_ious.append(summary["final"]["class_iou"])
        if "prompt" in summary:
            row.update(prompt_miou=summary["prompt"]["miou"], prompt_fbiou=summary["prompt"]["fbiou"])
            prompt_class_ious.append(summary["prompt"]["class_iou"])
        for name in extra:
            row.update({f"{name}_miou": summary[name]["miou"], f"{name}_fbiou": summary[name]["fbiou"]})
            extra_class_ious[name].append(summary[name]["class_iou"])
        per_seed.append(row)
        if proc.is_main:
            log("seed {seed}: mIoU {m:.2f}  FB-IoU {f:.2f}{p}{x}".format(
                seed=seed, m=100 * row["miou"], f=100 * row["fbiou"],
                p=f"  | RSP mIoU {100 * row['prompt_miou']:.2f}  FB-IoU {100 * row['prompt_fbiou']:.2f}"
                if "prompt_miou" in row else "",
                x="".join(f"  | {name} mIoU {100 * row[name + '_miou']:.2f}  FB-IoU {100 * row[name + '_fbiou']:.2f}"
                          for name in extra)))
            if row["classes_unseen"]:
                log(f"  note: no episode of classes {row['classes_unseen']} (counted as IoU 0, as the original)")
    results = {"dataset": cfg["data"]["dataset"], "split": cfg["data"]["split"], "shot": cfg["data"]["shot"],
               "backbone": cfg["model"]["backbone"], "protocol": protocol, "protocol_description": PROTOCOLS[protocol],
               "model": type(unwrap(model)).__name__, "rspg": _generator_name(model),
               "seeds": seeds, "episodes": num_episodes,
               "query_order": ev["query_order"], "skipped_queries": skipped, "per_seed": per_seed}
    keys = ["miou", "fbiou", "baseline_miou", "baseline_fbiou"]
    if prompt_class_ious:
        keys += ["prompt_miou", "prompt_fbiou"]
    for name in extra:
        keys += [f"{name}_miou", f"{name}_fbiou"]
    for key in keys:
        results[f"{key}_mean"], results[f"{key}_std"] = _mean_std([row[key] for row in per_seed])
    results["class_iou"] = {fold.name(c): sum(d[c] for d in class_ious) / len(class_ious) for c in fold.novel}
    if prompt_class_ious:
        results["prompt_class_iou"] = {fold.name(c): sum(d[c] for d in prompt_class_ious) / len(prompt_class_ious)
                                       for c in fold.novel}
    if extra:
        results["refine"] = refiner.name
        results["refine_outputs"] = extra
        for name, ious in extra_class_ious.items():
            results[f"{name}_class_iou"] = {fold.name(c): sum(d[c] for d in ious) / len(ious) for c in fold.novel}
    return results


def _generator_name(model: torch.nn.Module) -> str | None:
    """The class name of a SAM-RSP's prompt generator (BAM / SCCAN), None for other models."""
    rspg = getattr(unwrap(model), "rspg", None)
    return type(rspg).__name__ if rspg is not None else None


def format_results(results: Mapping) -> str:
    """The results as text tables: summary (mean +- std over seeds), per seed, per class. The
    outputs of a refiner (``refine_outputs``: prefix -> label; a label starting with "+" follows
    the final output's) get a row, per-seed columns and a per-class column each."""
    pct = lambda v: f"{100 * v:6.2f}"
    has_prompt = "prompt_miou_mean" in results
    final_label = (results.get("model") or "final") if not has_prompt else "SAM-RSP (final)"
    extra = {prefix: (f"{final_label} {label}" if label.startswith("+") else label)
             for prefix, label in (results.get("refine_outputs") or {}).items()}
    rows = [("all-foreground baseline", "baseline_")]
    if has_prompt:
        rows.append((f"RSP ({results.get('rspg') or 'BAM'} prompt)", "prompt_"))
    rows.append((final_label, ""))
    rows += [(label, f"{prefix}_") for prefix, label in extra.items()]
    width = max([24] + [len(label) + 1 for label, _ in rows])
    lines = [f"{results['dataset']} fold {results['split']}, {results['shot']}-shot, {results['backbone']}: "
             f"{len(results['seeds'])} seed{'s' if len(results['seeds']) != 1 else ''} x {results['episodes']} episodes "
             f"({results['query_order']} queries, protocol {results.get('protocol', 'samrsp')}), mean +- std over seeds",
             f"{'':{width}s}{'mIoU':>16s}{'FB-IoU':>16s}"]
    for label, prefix in rows:
        lines.append(f"{label:{width}s}{pct(results[prefix + 'miou_mean'])} +- {pct(results[prefix + 'miou_std']).strip():>5s}"
                     f"{pct(results[prefix + 'fbiou_mean'])} +- {pct(results[prefix + 'fbiou_std']).strip():>5s}")
    short = {prefix: ("+FS" if prefix == "refined" else "FSm" if prefix == "fastsam_match" else prefix[:4])
             for prefix in extra}
    lines.append("")
    header = f"{'seed':>6s}{'mIoU':>9s}{'FB-IoU':>9s}" + (f"{'RSP mIoU':>10s}{'RSP FB':>9s}" if has_prompt else "")
    header += "".join(f"{short[p] + ' mIoU':>10s}{short[p] + ' FB':>9s}" for p in extra)
    lines.append(header)
    for row in results["per_seed"]:
        line = f"{row['seed']:>6d}{pct(row['miou']):>9s}{pct(row['fbiou']):>9s}"
        if "prompt_miou" in row:
            line += f"{pct(row['prompt_miou']):>10s}{pct(row['prompt_fbiou']):>9s}"
        for prefix in extra:
            line += f"{pct(row[prefix + '_miou']):>10s}{pct(row[prefix + '_fbiou']):>9s}"
        lines.append(line)
    lines.append("")
    lines.append(f"{'class':24s}{'IoU':>8s}" + (f"{'RSP IoU':>10s}" if "prompt_class_iou" in results else "")
                 + "".join(f"{short[p] + ' IoU':>10s}" for p in extra))
    for name, iou in results["class_iou"].items():
        line = f"{name:24s}{pct(iou):>8s}"
        if "prompt_class_iou" in results:
            line += f"{pct(results['prompt_class_iou'][name]):>10s}"
        for prefix in extra:
            line += f"{pct(results[prefix + '_class_iou'][name]):>10s}"
        lines.append(line)
    if extra and results.get("refine_stats"):
        stats = results["refine_stats"]
        lines.append("")
        lines.append(f"FastSAM refinement: {stats.get('refine_kept', 0)} of {stats.get('refined_episodes', 0)} episodes "
                     f"took the proposals; fell back to the model's mask: {stats.get('refine_no_proposals', 0)} no "
                     f"proposal, {stats.get('refine_none_kept', 0)} none pure enough, {stats.get('refine_disagrees', 0)} "
                     f"disagreeing; FastSAM network calls {stats.get('fastsam_network_calls', 0)}, cache hits "
                     f"{stats.get('fastsam_cache_hits', 0)}")
    return "\n".join(lines)
