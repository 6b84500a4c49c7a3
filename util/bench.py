"""Speed and memory benchmark:  python -m util.bench CONFIG [key=value ...] [options]

    python -m util.bench sccan|cat_sam|fastsam|simformer [options]           # the other methods' benchmarks

    python -m util.bench config/toy/toy.yaml                       # seconds; the protocol is measured
    python -m util.bench config/pascal/pascal_split0_resnet50.yaml --episodes 3 --steps 3 --compare
    python -m util.bench CONFIG --reference                         # our emulation of the original's paths only
    python -m util.bench CONFIG --compare --json bench.json         # both, with ratios, saved
    python -m util.bench CONFIG --original ../SAM-RSP                # ours and the ORIGINAL code, side by side

The model has RANDOM weights (model.allow_random_init=true and every checkpoint path emptied:
no file is read, no download needed; speed and memory do not depend on the weights) and the
inputs are synthetic (batch 1, data.shot supports, the config's sizes). Every measurement runs
in a fresh subprocess, so each peak memory (max RSS; CUDA max allocated on a GPU) is its own:

* eval episode: one fresh episode (no cache), median of --episodes after --warmup; also one
  SAM encoder call and one episode whose SAM embedding comes from the cache;
* train step: stage sam_rsp (forward, backward, SGD step), batch --train-batch, median of --steps;
* test protocol (eval.seeds x eval.episodes): encoder calls and wall time without and with the
  feature cache. MEASURED on the toy set (data.dataset=toy with data.root present:
  ``python -m util.prepare toy``); for PASCAL / COCO EXTRAPOLATED from the timings above with
  the official list sizes (PASCAL val 364/445/592/336 images per fold; COCO: the first 1000
  list entries, sequential queries) and the cache's memory bound;
* checkpoint of stage sam_rsp: our format with the frozen parts referenced (the decoder's
  weights; and with the optimizer's momentum, as in last.pth).

``--original PATH`` times the original SAM-RSP code itself, from a checkout of it, in its own
processes (``tools/bench_original_sam_rsp.py``: only the checkout on ``sys.path``, a scratch working
directory with random weight files where the original insists on reading some; nothing of it is
copied into this project), and prints the ratios ours / original. ``--original-python`` names an
interpreter with the original's requirements (default: this one). The original hard-codes SAM ViT-L
and BAM as the prompt generator; it is the runnable version (e7fb444) whose decoder side heads are
256 wide and read each block's output, so compare with ``model.decoder.inner_dim=256
model.decoder.side_head=output``: the table prints both models' parameter counts and warns when
they differ.

``--reference`` is an EMULATION of the original, not the original: our model run through the
original's code paths on the same machine: segment-anything's attention
(model.sam.attention=reference), BAM's supports encoded in a per-shot loop (the original
loops over the K shots; same work for 1 shot), no feature cache (the original protocol runs
the encoders seeds x episodes times) and a checkpoint holding the whole model and its
optimizer. ``--compare`` adds it as a column ("emulation") with the ratios ours / emulation.

Figures depend on the machine's load: the table prints the load average before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Sequence

RESULT_PREFIX = "BENCH_RESULT "
# The original's per-fold val list sizes (SPEC 3.2) and its COCO protocol (first 1000 entries).
PASCAL_VAL_IMAGES = (364, 445, 592, 336)
COCO_QUERIES = 1000
RANDOM_WEIGHTS = ["model.allow_random_init=true", "model.backbone_checkpoint=", "model.base_learner.checkpoint=",
                  "model.rspg.checkpoint=", "model.sam.checkpoint=", "weights=", "resume=", "train.stage=sam_rsp"]
VARIANTS = ("ours", "original", "reference")
#: table headers: "reference" is our emulation of the original's code paths, not the original
VARIANT_LABELS = {"ours": "ours", "original": "original", "reference": "emulation"}
ORIGINAL_WORKER = Path(__file__).resolve().parent.parent / "tools" / "bench_original_sam_rsp.py"


# ---------------------------------------------------------------------------------------------
# Helpers shared by the workers
# ---------------------------------------------------------------------------------------------

def load_bench_config(config: str, overrides: Sequence[str], variant: str):
    """The config with random weights forced; ``reference`` also switches to the original's paths."""
    from util.config import load_config
    extra = list(RANDOM_WEIGHTS)
    if variant == "reference":
        extra += ["model.sam.attention=reference", "eval.cache=none", "eval.amp=false", "train.amp=false",
                  "eval.compile=false"]
    return load_config(config, list(overrides) + extra)


def max_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def timed(fn: Callable[[], object], *, repeat: int, warmup: int, sync: Callable[[], None]) -> Dict[str, object]:
    """Median / min wall seconds (and process CPU seconds) of ``repeat`` calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    sync()
    walls, cpus = [], []
    for _ in range(max(1, repeat)):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        sync()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return {"median": statistics.median(walls), "min": min(walls), "all": walls, "cpu_median": statistics.median(cpus)}


def synthetic_episode(*, batch: int, shot: int, size: int, generator):
    """Random normalised images, support masks with a foreground square (and an ignored border),
    a query target. Shapes: Bx3xSxS, BxKx3xSxS, BxKxSxS, BxSxS."""
    import torch
    query = torch.randn(batch, 3, size, size, generator=generator)
    supports = torch.randn(batch, shot, 3, size, size, generator=generator)
    masks = torch.zeros(batch, shot, size, size)
    masks[..., size // 4:3 * size // 4, size // 4:3 * size // 4] = 1
    masks[..., :2, :] = 255
    target = torch.zeros(batch, size, size, dtype=torch.long)
    target[:, size // 3:2 * size // 3, size // 3:2 * size // 3] = 1
    return query, supports, masks, target


def per_shot_support_features(rspg, supports, masks):
    """The original's support path: the backbone once per shot (B x 1 each), concatenated."""
    import torch
    feats = [rspg.extract_support_features(supports[:, k:k + 1], masks[:, k:k + 1]) for k in range(supports.shape[1])]
    return {name: torch.cat([f[name] for f in feats], 1) for name in feats[0]}


def _device_and_sync(cfg):
    import torch
    from util.distributed import resolve_device
    device = resolve_device(cfg["device"])
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    return device, sync


def _cuda_peak_mb(device) -> Optional[float]:
    import torch
    return torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None


def parameter_counts(model) -> Dict[str, int]:
    """Total and trainable parameters: the signature that says two benchmarked models are the same."""
    return {"total": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def _build(cfg, device, *, amp: bool, compile: bool, log: Callable[[str], None]):
    import torch
    from model import build_model
    from util.feature_cache import prepare_frozen_encoders
    torch.manual_seed(0)
    model = build_model(cfg, "sam_rsp").to(device)
    prepare_frozen_encoders(model, device=device, amp=amp, compile=compile, log=log)
    return model


# ---------------------------------------------------------------------------------------------
# Workers (each in its own process)
# ---------------------------------------------------------------------------------------------

def worker_eval(cfg, variant: str, args) -> dict:
    """Fresh-episode latency, one SAM encoder call, an episode with a cached embedding, peak memory."""
    import torch
    device, sync = _device_and_sync(cfg)
    model = _build(cfg, device, amp=cfg["eval"]["amp"], compile=cfg["eval"]["compile"], log=_err).eval()
    gen = torch.Generator().manual_seed(0)
    query, supports, masks, _ = synthetic_episode(batch=1, shot=cfg["data"]["shot"], size=cfg["data"]["val_size"],
                                                  generator=gen)
    query, supports, masks = query.to(device), supports.to(device), masks.to(device)

    def episode():
        with torch.no_grad():
            if variant == "reference":
                feats = per_shot_support_features(model.rspg, supports, masks)
                return model(query, None, None, support_feats=feats)
            return model(query, supports, masks)

    result = {}
    if cfg["eval"]["compile"]:   # torch.compile works at the first call: keep it out of the medians
        start = time.perf_counter()
        episode()
        sync()
        result["compile_and_first_episode_s"] = time.perf_counter() - start
    result["episode_s"] = timed(episode, repeat=args.episodes, warmup=args.warmup, sync=sync)
    _err(f"[{variant}] eval episode: median {result['episode_s']['median']:.3f} s")
    with torch.no_grad():
        result["sam_call_s"] = timed(lambda: model.embed_query(query), repeat=args.episodes, warmup=args.warmup,
                                     sync=sync)
        embedding = model.embed_query(query)
        result["cached_episode_s"] = timed(lambda: model(query, supports, masks, query_embedding=embedding),
                                           repeat=args.episodes, warmup=args.warmup, sync=sync)
    result["embedding_bytes"] = embedding[0].numel() * embedding.element_size()
    result["parameters"] = parameter_counts(model)
    result["max_rss_mb"] = max_rss_mb()
    result["cuda_max_allocated_mb"] = _cuda_peak_mb(device)
    return result


def worker_train(cfg, variant: str, args) -> dict:
    """Train-step latency (stage sam_rsp), peak memory, and the checkpoint sizes."""
    import torch
    from util.losses import LOSSES
    device, sync = _device_and_sync(cfg)
    model = _build(cfg, device, amp=cfg["train"]["amp"], compile=False, log=_err).train()
    stage = cfg["train"]["sam_rsp"]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=stage["lr"], momentum=cfg["train"]["momentum"],
                                weight_decay=cfg["train"]["weight_decay"])
    gen = torch.Generator().manual_seed(0)
    size = cfg["data"]["train_size"]
    query, supports, masks, target = synthetic_episode(batch=args.train_batch, shot=cfg["data"]["shot"], size=size,
                                                       generator=gen)
    query, supports, masks, target = query.to(device), supports.to(device), masks.to(device), target.to(device)
    class_ids = torch.ones(args.train_batch, dtype=torch.long, device=device)   # base-learner channel 1

    def step():
        if variant == "reference":
            with torch.no_grad():
                feats = per_shot_support_features(model.rspg, supports, masks)
            outputs = model(query, None, None, class_ids, support_feats=feats)
        else:
            outputs = model(query, supports, masks, class_ids)
        loss, _ = LOSSES["sam_rsp"](outputs, {"query_mask": target}, stage["loss_weights"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    result = {"step_s": timed(step, repeat=args.steps, warmup=args.warmup, sync=sync)}
    _err(f"[{variant}] train step: median {result['step_s']['median']:.3f} s")
    result["max_rss_mb"] = max_rss_mb()
    result["cuda_max_allocated_mb"] = _cuda_peak_mb(device)
    result["trainable_parameters"] = sum(p.numel() for p in params)
    result["checkpoint"] = checkpoint_sizes(model, optimizer, cfg, variant)
    return result


def checkpoint_sizes(model, optimizer, cfg, variant: str) -> Dict[str, float]:
    """File sizes (MB) of the stage-sam_rsp checkpoint: ours references the frozen BAM and SAM
    files (fake references here: random weights have no file); the original stores everything."""
    import torch
    from util.checkpoint import PretrainedPart, capture_rng_state, checkpoint_payload, save_checkpoint
    with tempfile.TemporaryDirectory() as tmp:
        if variant == "reference":
            path = Path(tmp) / "original.pth"
            torch.save({"epoch": 1, "state_dict": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
            size = path.stat().st_size / 2 ** 20
            return {"weights_only_mb": size, "with_optimizer_mb": size}
        refs = [PretrainedPart(prefix, f"initmodel/{name} (not read: random weights)", "0" * 64,
                               tuple(prefix + k for k in module.state_dict()))
                for prefix, name, module in (("rspg.", "BAM/best.pth", model.rspg),
                                             ("image_encoder.", "SAM/sam_vit.pth", model.image_encoder))]
        weights = save_checkpoint(checkpoint_payload(model, stage="sam_rsp", frozen_refs=refs, config=cfg),
                                  Path(tmp) / "weights.pth")
        full = save_checkpoint(checkpoint_payload(model, stage="sam_rsp", frozen_refs=refs, optimizer=optimizer,
                                                  train_state={"epoch": 1}, rng=capture_rng_state(), config=cfg),
                               Path(tmp) / "last.pth")
        return {"weights_only_mb": weights.stat().st_size / 2 ** 20, "with_optimizer_mb": full.stat().st_size / 2 ** 20}


def worker_protocol(cfg, variant: str, args) -> dict:
    """The test protocol on the toy set, without (and, for ours, with) the feature cache."""
    import torch
    from util.distributed import ProcessInfo
    from util.evaluation import EpisodeRunner, run_test_protocol
    from util.feature_cache import build_runner
    device, _ = _device_and_sync(cfg)
    model = _build(cfg, device, amp=cfg["eval"]["amp"], compile=cfg["eval"]["compile"], log=_err).eval()
    proc = ProcessInfo(0, 1, 0, device)
    result = {"measured": True, "seeds": len(cfg["eval"]["seeds"]), "episodes": cfg["eval"]["episodes"]}
    runs = [("uncached", lambda: EpisodeRunner(device))]
    if variant == "ours":
        runs.append(("cached", lambda: build_runner(cfg, device=device, log=_err)))
    for name, make_runner in runs:
        runner = make_runner()
        start = time.perf_counter()
        with torch.no_grad():
            results = run_test_protocol(model, cfg, proc=proc, runner=runner, progress=False, log=lambda _: None)
        result[name] = {"wall_s": time.perf_counter() - start, "encoder_calls": runner.stats["encoder_calls"],
                        "cache_hits": runner.stats["cache_hits"], "miou_mean": results["miou_mean"]}
        _err(f"[{variant}] protocol {name}: {result[name]['wall_s']:.1f} s, "
             f"{result[name]['encoder_calls']} encoder calls")
    return result


WORKERS = {"eval": worker_eval, "train": worker_train, "protocol": worker_protocol}


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Extrapolation (datasets other than the toy)
# ---------------------------------------------------------------------------------------------

def protocol_encoder_calls(*, list_size: int, episodes: int, seeds: int, capacity: int) -> int:
    """Encoder calls of the cached protocol with sequential queries (episode i queries image
    i mod N, the same images for every seed) and the keep-the-first-entries memory policy."""
    cached, calls = set(), 0
    for _ in range(seeds):
        for i in range(episodes):
            image = i % list_size
            if image not in cached:
                calls += 1
                if len(cached) < capacity:
                    cached.add(image)
    return calls


def extrapolate_protocol(cfg, eval_result: Mapping, variant: str) -> dict:
    """Per-fold encoder calls and wall time from the measured parts (see the module docstring).
    The cached estimate keeps only SAM embeddings (BAM features cached too would be faster)."""
    ev = cfg["eval"]
    seeds, episodes = len(ev["seeds"]), ev["episodes"]
    total = seeds * episodes
    dataset = cfg["data"]["dataset"]
    if dataset == "pascal":
        folds = [(f"PASCAL fold {i}", n) for i, n in enumerate(PASCAL_VAL_IMAGES)]
    elif dataset == "coco":
        folds = [("COCO (first 1000 list entries)", COCO_QUERIES)]
    else:
        return {"measured": False, "folds": [], "note": f"no official list sizes for dataset {dataset!r}"}
    t_fresh = eval_result["episode_s"]["median"]
    t_sam = eval_result["sam_call_s"]["median"]
    use_cache = variant == "ours" and ev["cache"] != "none"
    capacity = 0
    if use_cache:
        t_cached = eval_result["cached_episode_s"]["median"]
        bytes_per_image = eval_result["embedding_bytes"] * (2 if ev["cache_dtype"] == "float16" else 4) // 4
        capacity = int(ev["cache_mb"] * 2 ** 20 // max(1, bytes_per_image))
    rows = []
    for name, list_size in folds:
        calls = protocol_encoder_calls(list_size=list_size, episodes=episodes, seeds=seeds, capacity=capacity) \
            if use_cache else total
        row = {"name": name, "list_size": list_size, "uncached": {"encoder_calls": total, "wall_s": total * t_fresh}}
        if use_cache:
            row["cached"] = {"encoder_calls": calls, "wall_s": calls * t_sam + total * t_cached}
        rows.append(row)
    return {"measured": False, "seeds": seeds, "episodes": episodes, "cache_capacity_images": capacity, "folds": rows}


# ---------------------------------------------------------------------------------------------
# The parent: run the workers, print the table
# ---------------------------------------------------------------------------------------------

def run_worker(kind: str, variant: str, args) -> dict:
    command = [sys.executable, "-m", "util.bench", args.config, *args.overrides, "--worker", kind,
               "--variant", variant, "--episodes", str(args.episodes), "--warmup", str(args.warmup),
               "--steps", str(args.steps), "--train-batch", str(args.train_batch)]
    _err(f"running {kind} ({variant}) in a fresh process ...")
    proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=None, text=True,
                          cwd=Path(__file__).resolve().parent.parent)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark worker {kind}/{variant} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


class OriginalError(RuntimeError):
    """The original checkout cannot be benchmarked (missing files or packages, an unsupported config)."""


def original_settings(cfg) -> tuple:
    """``(config file in the checkout, [key=value overrides])``: the original's ``args`` for the model
    our config describes. The original knows PASCAL and COCO, BAM as prompt generator and SAM ViT-L only."""
    data, model = cfg["data"], cfg["model"]
    if data["dataset"] not in ("pascal", "coco"):
        raise OriginalError(f"--original: data.dataset is {data['dataset']!r}; the original knows pascal and coco only")
    if model["rspg"]["type"] != "bam":
        raise OriginalError(f"--original: model.rspg.type is {model['rspg']['type']!r}; the original has BAM only")
    if model["sam"]["type"] != "vit_l":
        raise OriginalError(f"--original: model.sam.type is {model['sam']['type']!r}; the original hard-codes vit_l")
    backbones = {"vgg16_bn": (50, True), "resnet50": (50, False), "resnet101": (101, False)}
    if model["backbone"] not in backbones:
        raise OriginalError(f"--original: model.backbone {model['backbone']!r} is not one of {sorted(backbones)}")
    layers, vgg = backbones[model["backbone"]]
    config_file = f"config/{data['dataset']}/{data['dataset']}_split0_{'vgg' if vgg else 'resnet50'}.yaml"
    overrides = [f"split={data['split']}", f"shot={data['shot']}", f"layers={layers}", f"vgg={vgg}",
                 f"train_h={data['train_size']}", f"train_w={data['train_size']}", f"val_size={data['val_size']}",
                 f"depth={model['decoder']['depth']}",
                 # random weights: no BAM checkpoint (the original then skips the load), an empty SAM file
                 "RSPG_weight_path=no_rspg_weights.pth", "SAM_pretrained_path=sam_random.pth"]
    return config_file, overrides


def _run_original_process(args, *worker_args: str, cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
    """The worker script on the checkout, PYTHONPATH dropped (the original's ``util`` and ``model``, not
    ours); its own clear errors (exit 3: a missing file or package) become an :class:`OriginalError`."""
    command = [args.original_python, str(ORIGINAL_WORKER), "--checkout", str(Path(args.original).resolve()),
               *worker_args]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env)
    message = proc.stderr.strip()
    if proc.returncode == 3 and "error:" in message:
        raise OriginalError(message[message.rfind("error:") + 6:].strip())
    return proc


def run_original_worker(kind: str, args, cfg, workdir: Path) -> dict:
    """One measurement of the original's code, in a fresh process with only the checkout importable."""
    config_file, overrides = original_settings(cfg)
    device, _ = _device_and_sync(cfg)
    _err(f"running {kind} (original) in a fresh process ...")
    proc = _run_original_process(args, "--kind", kind, "--config-file", config_file, "--device", device.type,
                                 "--episodes", str(args.episodes), "--warmup", str(args.warmup),
                                 "--steps", str(args.steps), "--train-batch", str(args.train_batch),
                                 "--set", *overrides, cwd=workdir)
    sys.stderr.write(proc.stderr[-4000:])
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or (kind != "prepare" and not lines):
        raise OriginalError(f"the original's {kind} run failed (exit {proc.returncode}); its output:\n"
                            f"{(proc.stdout + proc.stderr)[-3000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX):]) if lines else {}


def check_original_checkout(args) -> None:
    """The worker's ``--check``: every file the original's model imports is in the checkout."""
    proc = _run_original_process(args, "--check")
    if proc.returncode != 0:
        raise OriginalError(proc.stderr.strip())


def run_original(args) -> dict:
    """Prepare the random weight files once, then the eval and train measurements (each its own process)."""
    cfg = load_bench_config(args.config, args.overrides, "ours")
    with tempfile.TemporaryDirectory(prefix="sam_rsp_original_") as tmp:
        run_original_worker("prepare", args, cfg, Path(tmp))
        report = {"eval": run_original_worker("eval", args, cfg, Path(tmp)),
                  "train": run_original_worker("train", args, cfg, Path(tmp))}
    report["checkpoint"] = report["train"].pop("checkpoint")
    if toy_data_present(cfg) or args.no_protocol:
        report["protocol"] = {"measured": False, "folds": [], "note": "not run for the original"}
    else:   # the original has no cache: every episode runs both encoders
        report["protocol"] = extrapolate_protocol(cfg, report["eval"], "original")
    return report


def toy_data_present(cfg) -> bool:
    from util.config import resolve_path
    return cfg["data"]["dataset"] == "toy" and resolve_path(cfg["data"]["root"], cfg).is_dir()


def run_variant(variant: str, args) -> dict:
    if variant == "original":
        return run_original(args)
    cfg = load_bench_config(args.config, args.overrides, variant)
    report = {"eval": run_worker("eval", variant, args), "train": run_worker("train", variant, args)}
    report["checkpoint"] = report["train"].pop("checkpoint")
    if args.no_protocol:
        report["protocol"] = {"measured": False, "folds": [], "note": "skipped (--no-protocol)"}
    elif toy_data_present(cfg):
        report["protocol"] = run_worker("protocol", variant, args)
    else:
        report["protocol"] = extrapolate_protocol(cfg, report["eval"], variant)
    return report


def _fmt(value, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "s":
        return f"{value:.3f}" if value < 100 else f"{value:.0f}"
    if unit in ("MB", "h", "%"):
        return f"{value:.2f}" if unit == "%" else f"{value:.1f}"
    return f"{value:,}" if isinstance(value, int) else f"{value:.3g}"


def format_report(report: Mapping) -> str:
    """The readable table of :func:`main`'s report."""
    variants = [v for v in VARIANTS if v in report]
    #: ratio columns: ours / each other variant measured
    others = [v for v in variants if v != "ours"] if "ours" in report else []
    short = {"original": "orig", "reference": "emul"}
    meta = report["meta"]
    lines = [f"SAM-RSP benchmark: {meta['config']} on {meta['device']} ({meta['threads']} threads), torch {meta['torch']}",
             "RANDOM weights: model.allow_random_init=true and every checkpoint path emptied (no file is read)",
             f"synthetic inputs, {meta['shot']}-shot: eval batch 1 at {meta['val_size']}, train batch "
             f"{meta['train_batch']} at {meta['train_size']}; medians of {meta['episodes']} episodes / "
             f"{meta['steps']} steps after {meta['warmup']} warm-up",
             f"load average (1 min) before {meta['load_before']:.2f}, after {meta['load_after']:.2f}: other "
             "processes on the machine slow every figure down"]
    lines.append(f"ours: attention {meta['attention']}, eval.amp {meta['eval_amp']}, train.amp {meta['train_amp']} "
                 f"(autocast on CUDA only), eval.compile {meta['eval_compile']}, eval.cache {meta['cache']}")
    if "original" in report:
        lines.append(f"original = the original SAM-RSP code from {meta.get('original', '?')}, in its own processes "
                     "(tools/bench_original_sam_rsp.py)")
    if "reference" in report:
        lines.append("emulation (--reference) = OUR model through the original's paths: segment-anything attention, "
                     "per-shot support loop, no cache, whole-model checkpoint; not the original code")
    lines.append("")
    header = (f"{'':46s}{'unit':>6s}" + "".join(f"{VARIANT_LABELS[v]:>13s}" for v in variants)
              + "".join(f"{'ours/' + short[v]:>11s}" for v in others))
    lines.append(header)

    def row(label: str, unit: str, getter: Callable[[Mapping], object]):
        values = []
        for v in variants:
            try:
                values.append(getter(report[v]))
            except (KeyError, TypeError, IndexError):
                values.append(None)
        line = f"{label:46s}{unit:>6s}" + "".join(f"{_fmt(x, unit):>13s}" for x in values)
        for other in others:
            mine, theirs = values[0], values[variants.index(other)]
            usable = all(isinstance(x, (int, float)) and not isinstance(x, bool) and x for x in (mine, theirs))
            line += f"{mine / theirs:>11.2f}" if usable else f"{'-':>11s}"
        lines.append(line)

    if meta["eval_compile"]:
        row("torch.compile + first eval episode", "s", lambda r: r["eval"]["compile_and_first_episode_s"])
    row("eval episode (fresh, no cache), median", "s", lambda r: r["eval"]["episode_s"]["median"])
    row("  same, process CPU time", "s", lambda r: r["eval"]["episode_s"]["cpu_median"])
    row("  SAM encoder call", "s", lambda r: r["eval"]["sam_call_s"]["median"])
    row("  episode with a cached SAM embedding", "s", lambda r: r["eval"]["cached_episode_s"]["median"])
    row(f"train step (sam_rsp, batch {meta['train_batch']}), median", "s", lambda r: r["train"]["step_s"]["median"])
    row("  same, process CPU time", "s", lambda r: r["train"]["step_s"]["cpu_median"])
    row("peak memory, eval (max RSS)", "MB", lambda r: r["eval"]["max_rss_mb"])
    row("peak memory, train (max RSS)", "MB", lambda r: r["train"]["max_rss_mb"])
    if meta["device"].startswith("cuda"):
        row("peak CUDA memory, eval (max allocated)", "MB", lambda r: r["eval"]["cuda_max_allocated_mb"])
        row("peak CUDA memory, train (max allocated)", "MB", lambda r: r["train"]["cuda_max_allocated_mb"])
    def as_run(run: Mapping) -> Mapping:
        """The protocol as the variant runs it: ours with the cache, the reference without."""
        return run.get("cached") or run["uncached"]

    first = report[variants[0]]["protocol"]
    if first.get("measured"):
        lines.append(f"test protocol ({first['seeds']} seeds x {first['episodes']} episodes), MEASURED on the toy set:")
        row("  encoder calls, no cache", "", lambda r: r["protocol"]["uncached"]["encoder_calls"])
        row("  encoder calls, feature cache", "", lambda r: r["protocol"]["cached"]["encoder_calls"])
        row("  wall time, no cache", "s", lambda r: r["protocol"]["uncached"]["wall_s"])
        row("  wall time, feature cache", "s", lambda r: r["protocol"]["cached"]["wall_s"])
        if others:
            row("  encoder calls as run (ours cached, others not)", "", lambda r: as_run(r["protocol"])["encoder_calls"])
            row("  wall time as run (ours cached, others not)", "s", lambda r: as_run(r["protocol"])["wall_s"])
        row("  mIoU, no cache (random weights)", "%", lambda r: 100 * r["protocol"]["uncached"]["miou_mean"])
        row("  mIoU, feature cache (random weights)", "%", lambda r: 100 * r["protocol"]["cached"]["miou_mean"])
    elif first.get("folds"):
        lines.append(f"test protocol per fold ({first['seeds']} seeds x {first['episodes']} episodes, sequential "
                     f"queries), EXTRAPOLATED from the timings above (cache: SAM embeddings only, "
                     f"room for {first.get('cache_capacity_images', '-')} images):")
        for i, fold in enumerate(first["folds"]):
            lines.append(f"  {fold['name']} ({fold['list_size']} query images)")
            fold_of = (lambda r, i=i: r["protocol"]["folds"][i])
            row("    encoder calls, no cache", "", lambda r, f=fold_of: f(r)["uncached"]["encoder_calls"])
            row("    encoder calls, feature cache", "", lambda r, f=fold_of: f(r)["cached"]["encoder_calls"])
            row("    wall time, no cache", "h", lambda r, f=fold_of: f(r)["uncached"]["wall_s"] / 3600)
            row("    wall time, feature cache", "h", lambda r, f=fold_of: f(r)["cached"]["wall_s"] / 3600)
            if others:
                row("    encoder calls as run (ours cached, others not)", "", lambda r, f=fold_of: as_run(f(r))["encoder_calls"])
                row("    wall time as run (ours cached, others not)", "h", lambda r, f=fold_of: as_run(f(r))["wall_s"] / 3600)
    else:
        lines.append(f"test protocol: {first.get('note', 'not measured')}")
    row("checkpoint, stage sam_rsp (weights)", "MB", lambda r: r["checkpoint"]["weights_only_mb"])
    row("  with optimizer state (as last.pth)", "MB", lambda r: r["checkpoint"]["with_optimizer_mb"])
    if "ours" in report:
        lines.append("  (ours: trainable decoder weights, frozen BAM and SAM referenced by path + sha256; "
                     "original and emulation: the whole model, as the original saves it)")
    row("parameters, total", "", lambda r: r["eval"]["parameters"]["total"])
    row("parameters, trainable", "", lambda r: r["eval"]["parameters"]["trainable"])
    counts = {v: report[v]["eval"].get("parameters") for v in variants}
    if "ours" in counts and "original" in counts and counts["ours"] != counts["original"]:
        lines.append("WARNING: ours and the original differ in their parameter counts: the ratios compare DIFFERENT "
                     "models (the checkout is the runnable version e7fb444: add model.decoder.inner_dim=256 "
                     "model.decoder.side_head=output; and the same backbone, shot and sizes)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m util.bench", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    parser.add_argument("--episodes", type=int, default=3, help="timed eval episodes (median); default 3")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up episodes / steps; default 1")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps (median); default 3")
    parser.add_argument("--train-batch", type=int, default=1, help="training batch size; default 1 (the original's)")
    parser.add_argument("--reference", action="store_true", help="measure only the emulation: our model through the original's code paths")
    parser.add_argument("--compare", action="store_true", help="also measure the emulation (--reference), with the ratios ours / emulation")
    parser.add_argument("--original", metavar="PATH", default=None,
                        help="also time the original SAM-RSP code from this checkout of it (tools/bench_original_sam_rsp.py)")
    parser.add_argument("--original-python", metavar="PYTHON", default=sys.executable,
                        help="interpreter for the original's processes (one with its requirements); default: this one")
    parser.add_argument("--no-protocol", action="store_true", help="skip the test-protocol measurement")
    parser.add_argument("--json", type=Path, default=None, help="also write the report to this JSON file")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS, default="ours", help=argparse.SUPPRESS)
    return parser


#: ``python -m util.bench <method> [options]``: the benchmarks of the other methods, one module each
METHOD_BENCHMARKS = {"sccan": "util.bench_sccan", "cat_sam": "util.bench_cat_sam", "fastsam": "util.fastsam_bench",
                     "simformer": "util.bench_simformer"}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in METHOD_BENCHMARKS:
        import importlib
        result = importlib.import_module(METHOD_BENCHMARKS[argv[0]]).main(argv[1:])
        return result if isinstance(result, int) else 0
    args = build_parser().parse_args(argv)
    from util.config import ConfigError
    try:
        if args.worker:
            cfg = load_bench_config(args.config, args.overrides, args.variant)
            result = WORKERS[args.worker](cfg, args.variant, args)
            print(RESULT_PREFIX + json.dumps(result), flush=True)
            return 0
        import torch
        cfg = load_bench_config(args.config, args.overrides, "ours")   # validates the config early
        device, _ = _device_and_sync(cfg)
        variants = ["reference"] if args.reference and not args.compare else ["ours"]
        if args.original:
            variants.append("original")
            original_settings(cfg)   # an unsupported config or checkout fails before anything runs
            check_original_checkout(args)
        if args.compare:
            variants.append("reference")
        report: Dict[str, object] = {"meta": {
            "config": args.config, "overrides": list(args.overrides), "device": str(device),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "shot": cfg["data"]["shot"],
            "val_size": cfg["data"]["val_size"], "train_size": cfg["data"]["train_size"],
            "train_batch": args.train_batch, "episodes": args.episodes, "steps": args.steps, "warmup": args.warmup,
            "attention": cfg["model"]["sam"]["attention"], "eval_amp": cfg["eval"]["amp"], "train_amp": cfg["train"]["amp"],
            "eval_compile": cfg["eval"]["compile"], "cache": cfg["eval"]["cache"],
            "load_before": os.getloadavg()[0], "original": args.original}}
        for variant in variants:
            report[variant] = run_variant(variant, args)
        report["meta"]["load_after"] = os.getloadavg()[0]
        print(format_report(report))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2))
            print(f"report written to {args.json}")
    except (ConfigError, OriginalError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
