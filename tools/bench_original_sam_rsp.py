"""Time the ORIGINAL SAM-RSP code from a checkout of it: the worker behind ``python -m util.bench CONFIG
--original PATH``.

Run by path, in its own process, with only the checkout on ``sys.path`` (the original has packages
named ``model`` and ``util``, like this project) and a scratch working directory (the original reads
its weights from fixed relative paths). Nothing of the original is copied into this project: this
script imports the checkout's ``model.SAM_RSP.OneModel`` and drives it as the original's train.py and
test.py do (``get_optim``, ``freeze_modules``, ``fix_bn``, the forward's 6 arguments, the loss
``loss_weight[0] * aux_loss + loss_weight[1] * main_loss``, the checkpoint dict it saves).

What the checkout needs (``python tools/bench_original_sam_rsp.py --check PATH`` lists what is
missing): SAM-RSP's own files (Jiaguang-NEU/SAM-RSP), the BAM files it imports but does not hold
(chunbolang/BAM: ``model/resnet.py``, ``vgg.py``, ``PSPNet.py``, ``PPM.py``, ``util/config.py``),
segment-anything's ``modeling/common.py`` saved as ``model/common.py``, and the Python packages its
modules import (``util/util.py`` imports seaborn, pandas, scipy, matplotlib, cv2, tqdm).

Weights are random, as in ``util.bench``: ``--kind prepare`` writes, into the scratch directory, the
files the original insists on reading (an empty ImageNet state dict, loaded with ``strict=False``; a
PSPNet ``best.pth`` holding the original PSPNet's own random initialisation; an empty SAM checkpoint,
which leaves the encoder at its initialisation). ``RSPG_weight_path`` stays empty, so BAM keeps its
random initialisation (the original skips the load silently).

On a machine without CUDA the original's hard-coded CUDA placements (``.cuda()`` in its loss,
``torch.arange(..., device='cuda')`` in BAM's training branch) are redirected to the CPU: they move
tensors, they do not change what is computed.

Prints one line ``BENCH_RESULT {json}`` with the same keys as util.bench's own workers.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

#: file in the checkout -> where it comes from (the message for a missing one)
REQUIRED_FILES = {
    "model/SAM_RSP.py": "Jiaguang-NEU/SAM-RSP",
    "model/BAM.py": "Jiaguang-NEU/SAM-RSP",
    "model/image_encoder.py": "Jiaguang-NEU/SAM-RSP",
    "model/ASPP.py": "Jiaguang-NEU/SAM-RSP",
    "model/common.py": "facebookresearch/segment-anything: segment_anything/modeling/common.py, saved as model/common.py",
    "model/resnet.py": "chunbolang/BAM: model/resnet.py",
    "model/vgg.py": "chunbolang/BAM: model/vgg.py",
    "model/PSPNet.py": "chunbolang/BAM: model/PSPNet.py",
    "model/PPM.py": "chunbolang/BAM: model/PPM.py",
    "util/util.py": "Jiaguang-NEU/SAM-RSP",
}


def missing_files(checkout: Path) -> list:
    """``[(relative path, where to get it)]`` of the files the original's model needs and the checkout lacks."""
    return [(rel, source) for rel, source in REQUIRED_FILES.items() if not (checkout / rel).is_file()]


def load_original_args(checkout: Path, config_file: str, overrides: list) -> argparse.Namespace:
    """The original's ``args``: every section of its YAML flattened into one namespace (as its
    ``util/config.py`` does), then ``key=value`` overrides (values parsed as YAML)."""
    import yaml
    path = checkout / config_file
    if not path.is_file():
        raise SystemExit(f"error: the original's config {path} does not exist")
    with open(path) as handle:
        sections = yaml.safe_load(handle)
    flat = {}
    for section in sections.values():
        flat.update(section or {})
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in flat:
            raise SystemExit(f"error: override {item!r}: expected KEY=VALUE with KEY one of the original's config "
                             f"keys ({config_file})")
        flat[key] = yaml.safe_load(value)
    return argparse.Namespace(**flat)


def redirect_cuda_to_cpu(torch) -> None:
    """Make the original's hard-coded CUDA placements no-ops on a CPU-only machine."""
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self
    arange = torch.arange

    def cpu_arange(*args, device=None, **kwargs):
        if device is not None and torch.device(device).type == "cuda":
            device = "cpu"
        return arange(*args, device=device, **kwargs)

    torch.arange = cpu_arange


def backbone_name(args) -> str:
    return "vgg" if args.vgg else f"resnet{args.layers}"


def prepare(args, torch) -> None:
    """The weight files the original reads at construction (cwd = the scratch directory)."""
    Path("initmodel").mkdir(exist_ok=True)
    imagenet = "initmodel/vgg16_bn.pth" if args.vgg else f"initmodel/resnet{args.layers}_v2.pth"
    torch.save({}, imagenet)   # loaded with strict=False: the backbone keeps its initialisation
    torch.save({}, args.SAM_pretrained_path)
    from model.PSPNet import OneModel as PSPNet
    torch.manual_seed(0)
    pspnet = PSPNet(args)
    path = Path(f"initmodel/PSPNet/{args.data_set}/split{args.split}/{backbone_name(args)}/best.pth")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": pspnet.state_dict()}, path)


def load_project_bench():
    """This project's util/bench.py, loaded by file path under another name: in this process ``util`` is
    the original's package. Its timing, peak-memory reading and synthetic inputs are the ones our own
    workers use, so both columns see the same episode."""
    path = Path(__file__).resolve().parent.parent / "util" / "bench.py"
    spec = importlib.util.spec_from_file_location("sam_rsp_project_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BENCH = load_project_bench()
timed, max_rss_mb, parameter_counts, RESULT_PREFIX = (BENCH.timed, BENCH.max_rss_mb, BENCH.parameter_counts,
                                                      BENCH.RESULT_PREFIX)


def synthetic_episode(torch, *, batch: int, shot: int, size: int, device):
    """util.bench's synthetic episode (same generator seed), on ``device``."""
    tensors = BENCH.synthetic_episode(batch=batch, shot=shot, size=size, generator=torch.Generator().manual_seed(0))
    return tuple(t.to(device) for t in tensors)


def build(args, torch, device):
    from model.SAM_RSP import OneModel
    torch.manual_seed(0)
    model = OneModel(args)
    optimizer = model.get_optim(model, args, LR=args.base_lr)   # as the original's get_model: optimizer, then freeze
    model.freeze_modules(model)
    return model.to(device), optimizer


def worker_eval(args, opts, torch, device, sync) -> dict:
    import torch.nn.functional as F
    model, _ = build(args, torch, device)
    model.eval()
    query, supports, masks, target = synthetic_episode(torch, batch=1, shot=args.shot, size=args.val_size,
                                                       device=device)
    class_ids = [torch.zeros(1, dtype=torch.long)]   # the loader's subcls: a list holding one id per episode

    def episode():
        with torch.no_grad():   # as the original's test.py validate()
            return model(s_x=supports, s_y=masks, x=query, y_m=target, y_b=target, cat_idx=class_ids)

    def sam_call():
        with torch.no_grad():   # the original's step 4: a 1024x1024 stretch, then the encoder
            return model.feature_extractor(F.interpolate(query, size=(1024, 1024), mode="bilinear",
                                                         align_corners=True))

    result = {"episode_s": timed(episode, repeat=opts.episodes, warmup=opts.warmup, sync=sync)}
    print(f"[original] eval episode: median {result['episode_s']['median']:.3f} s", file=sys.stderr, flush=True)
    result["sam_call_s"] = timed(sam_call, repeat=opts.episodes, warmup=opts.warmup, sync=sync)
    result["max_rss_mb"] = max_rss_mb()
    result["cuda_max_allocated_mb"] = BENCH._cuda_peak_mb(device)
    result["parameters"] = parameter_counts(model)
    return result


def fix_bn(module) -> None:
    """The original's train.py applies this after model.train(): every BatchNorm stays in eval mode."""
    if module.__class__.__name__.find("BatchNorm") != -1:
        module.eval()


def worker_train(args, opts, torch, device, sync) -> dict:
    model, optimizer = build(args, torch, device)
    model.train()
    if args.fix_bn:
        model.apply(fix_bn)
    query, supports, masks, target = synthetic_episode(torch, batch=opts.train_batch, shot=args.shot,
                                                       size=args.train_h, device=device)
    class_ids = [torch.zeros(opts.train_batch, dtype=torch.long)]

    def step():
        _, aux_loss, main_loss = model(s_x=supports, s_y=masks, x=query, y_m=target, y_b=target, cat_idx=class_ids)
        loss = args.loss_weight[0] * aux_loss + args.loss_weight[1] * main_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    result = {"step_s": timed(step, repeat=opts.steps, warmup=opts.warmup, sync=sync)}
    print(f"[original] train step: median {result['step_s']['median']:.3f} s", file=sys.stderr, flush=True)
    result["max_rss_mb"] = max_rss_mb()
    result["cuda_max_allocated_mb"] = BENCH._cuda_peak_mb(device)
    result["parameters"] = parameter_counts(model)
    result["trainable_parameters"] = result["parameters"]["trainable"]
    with tempfile.TemporaryDirectory() as tmp:   # what the original's train.py saves every epoch
        path = Path(tmp) / "train_epoch.pth"
        torch.save({"epoch": 1, "state_dict": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
        size = path.stat().st_size / 2 ** 20
    result["checkpoint"] = {"weights_only_mb": size, "with_optimizer_mb": size}
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkout", type=Path, required=True, help="the original SAM-RSP checkout")
    parser.add_argument("--check", action="store_true", help="only list what the checkout lacks (exit 3 if anything)")
    parser.add_argument("--kind", choices=("prepare", "eval", "train"), default="eval")
    parser.add_argument("--config-file", default="config/pascal/pascal_split0_resnet50.yaml",
                        help="the original's config, relative to the checkout")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of the original's config")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--episodes", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--train-batch", type=int, default=1)
    return parser


def main(argv=None) -> int:
    opts = build_parser().parse_args(argv)
    checkout = opts.checkout.resolve()
    if not checkout.is_dir():
        print(f"error: --original {checkout}: no such directory (expected a checkout of Jiaguang-NEU/SAM-RSP)",
              file=sys.stderr)
        return 3
    missing = missing_files(checkout)
    if missing:
        lines = "\n".join(f"  {rel}  <- {source}" for rel, source in missing)
        print(f"error: the original checkout {checkout} lacks files its model imports:\n{lines}", file=sys.stderr)
        return 3
    if opts.check:
        print(f"{checkout}: every file the original's model imports is present")
        return 0
    sys.path.insert(0, str(checkout))
    import torch
    device = torch.device(opts.device)
    if device.type != "cuda":
        redirect_cuda_to_cpu(torch)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    args = load_original_args(checkout, opts.config_file, opts.set)
    try:
        if opts.kind == "prepare":
            prepare(args, torch)
            return 0
        worker = {"eval": worker_eval, "train": worker_train}[opts.kind]
        result = worker(args, opts, torch, device, sync)
    except ModuleNotFoundError as err:
        print(f"error: the original's code imports {err.name!r}, which this Python ({sys.executable}) lacks: "
              f"install it, or pass --original-python with an interpreter that has the original's requirements",
              file=sys.stderr)
        return 3
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
