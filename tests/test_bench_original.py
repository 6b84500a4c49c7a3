"""``python -m util.bench CONFIG --original PATH``: timing the original SAM-RSP code from a checkout.

The real original hard-codes SAM ViT-L at 1024 x 1024 (minutes per call on this CPU), so these tests
drive the whole path -- the check of the checkout, the scratch directory with the prepared weight
files, the CUDA redirection, the isolation from this project's own ``model`` / ``util`` packages,
the table and its ratios -- with a FAKE checkout: a few small files with the original's interface
(``OneModel(args)``, ``get_optim``, ``freeze_modules``, ``forward(x, s_x, s_y, y_m, y_b, cat_idx)``,
``feature_extractor``), written by the test.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import ROOT
from util import bench
from util.config import load_config

WORKER = ROOT / "tools" / "bench_original_sam_rsp.py"

FAKE_SAM_RSP = '''
import os
import torch
from torch import nn
import util.util        # the checkout's util package, not the project's (the fake's holds a marker)

assert util.util.FAKE_ORIGINAL_UTIL, "the worker imported the wrong util package"


class OneModel(nn.Module):
    def __init__(self, args):
        super().__init__()
        # the original reads these at construction, relative to the working directory
        assert os.path.isfile(args.SAM_pretrained_path), "the SAM file was not prepared"
        assert torch.load(args.SAM_pretrained_path) == {}
        backbone = "vgg" if args.vgg else "resnet" + str(args.layers)
        pspnet = torch.load(f"initmodel/PSPNet/{args.data_set}/split{args.split}/{backbone}/best.pth")
        from model.PSPNet import OneModel as PSPNet
        self.psp = PSPNet(args)
        self.psp.load_state_dict(pspnet["state_dict"])
        self.feature_extractor = nn.Conv2d(3, 4, 16, stride=16)
        self.head = nn.Conv2d(4, 2, 1)
        self.criterion = nn.CrossEntropyLoss(ignore_index=255)

    def get_optim(self, model, args, LR):
        return torch.optim.SGD(model.head.parameters(), lr=LR, momentum=args.momentum, weight_decay=args.weight_decay)

    def freeze_modules(self, model):
        for p in list(model.psp.parameters()) + list(model.feature_extractor.parameters()):
            p.requires_grad = False

    def forward(self, x, s_x, s_y, y_m, y_b, cat_idx=None):
        assert s_x.dim() == 5 and s_y.dim() == 4 and isinstance(cat_idx, list)
        with torch.no_grad():
            feats = self.feature_extractor(nn.functional.interpolate(x, size=(64, 64)))
        out = nn.functional.interpolate(self.head(feats), size=x.shape[-2:])
        if self.training:
            ids = torch.arange(3, device="cuda")          # as BAM's training branch
            main_loss = self.criterion(out, y_m.long())
            aux_loss = torch.zeros_like(main_loss).cuda() + 0 * ids.sum()   # as the original's loss
            return out.max(1)[1], aux_loss, main_loss
        return out, out
'''

FAKE_PSPNET = '''
import torch
from torch import nn


class OneModel(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.layer0 = nn.Conv2d(3, 2, 3)
'''

FAKE_CONFIG = '''
Data:
  data_root: ../data
  classes: 2
Train:
  train_h: 473
  train_w: 473
  val_size: 473
  depth: 3
  split: 0
  shot: 1
  data_set: 'pascal'
  base_lr: 0.001
  momentum: 0.9
  weight_decay: 0.0001
  fix_bn: True
  RSPG_weight_path:
  SAM_pretrained_path:
Method:
  layers: 50
  vgg: False
  loss_weight: [1.0, 1.0]
'''


def make_fake_checkout(root: Path, *, skip: tuple = ()) -> Path:
    files = {rel: "" for rel in bench_worker_required()}
    files.update({"model/SAM_RSP.py": FAKE_SAM_RSP, "model/PSPNet.py": FAKE_PSPNET,
                  "util/util.py": "FAKE_ORIGINAL_UTIL = True\n",
                  "config/pascal/pascal_split0_resnet50.yaml": FAKE_CONFIG,
                  "config/pascal/pascal_split0_vgg.yaml": FAKE_CONFIG.replace("vgg: False", "vgg: True")})
    for rel, text in files.items():
        if rel in skip:
            continue
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def bench_worker_required():
    sys.path.insert(0, str(WORKER.parent))
    try:
        import bench_original_sam_rsp
    finally:
        sys.path.pop(0)
    return bench_original_sam_rsp.REQUIRED_FILES


def test_check_lists_each_missing_file_and_where_it_comes_from(tmp_path):
    checkout = make_fake_checkout(tmp_path / "SAM-RSP", skip=("model/common.py", "model/PSPNet.py"))
    result = subprocess.run([sys.executable, str(WORKER), "--checkout", str(checkout), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 3
    assert "model/common.py  <- facebookresearch/segment-anything" in result.stderr
    assert "model/PSPNet.py  <- chunbolang/BAM" in result.stderr
    assert "model/SAM_RSP.py" not in result.stderr
    complete = make_fake_checkout(tmp_path / "complete")
    result = subprocess.run([sys.executable, str(WORKER), "--checkout", str(complete), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_worker_error_for_an_unknown_config_key(tmp_path):
    checkout = make_fake_checkout(tmp_path / "SAM-RSP")
    result = subprocess.run([sys.executable, str(WORKER), "--checkout", str(checkout), "--kind", "prepare",
                             "--set", "no_such_key=1"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode != 0 and "no_such_key=1" in result.stderr


def pascal_tiny(extra=()):
    """The toy config as a PASCAL ViT-L model (the names the original accepts), tiny numbers."""
    return ["data.dataset=pascal", "model.sam.type=vit_l", "data.train_size=65", "data.val_size=65",
            "model.backbone_width=8", "model.base_learner.hidden_dim=16", "model.rspg.reduce_dim=16",
            "model.sam.img_size=64", "model.sam.patch_size=8", "model.sam.embed_dim=16", "model.sam.num_heads=2",
            "model.sam.out_chans=32", "model.decoder.num_heads=4", "eval.seeds=[1,2]", "eval.episodes=20", *extra]


def test_bench_with_original_prints_both_columns_and_ratios(tmp_path):
    checkout = make_fake_checkout(tmp_path / "SAM-RSP")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))   # the worker must drop PYTHONPATH
    result = subprocess.run([sys.executable, "-m", "util.bench", "config/toy/toy.yaml", *pascal_tiny(),
                             "--original", str(checkout), "--episodes", "1", "--steps", "1", "--warmup", "0",
                             "--json", str(tmp_path / "bench.json")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    header = next(line for line in out.splitlines() if "ours/orig" in line)
    assert "original" in header and "emulation" not in header
    assert f"original = the original SAM-RSP code from {checkout}" in out
    report = json.loads((tmp_path / "bench.json").read_text())
    original, ours = report["original"], report["ours"]
    # the fake's numbers came back through the worker
    assert original["eval"]["parameters"] == {"total": 2 * 3 * 9 + 2 + 3 * 4 * 256 + 4 + 4 * 2 + 2,
                                              "trainable": 4 * 2 + 2}
    assert original["train"]["step_s"]["median"] > 0 and original["eval"]["sam_call_s"]["median"] > 0
    assert original["checkpoint"]["weights_only_mb"] == original["checkpoint"]["with_optimizer_mb"] > 0
    # PASCAL: the protocol is extrapolated for the original without a cache: seeds x episodes encoder calls
    assert [f["uncached"]["encoder_calls"] for f in original["protocol"]["folds"]] == [40] * 4
    assert all("cached" not in f for f in original["protocol"]["folds"])
    # the ratio column is ours / original, row by row
    episode_line = next(line for line in out.splitlines() if line.startswith("eval episode (fresh, no cache)"))
    expected = ours["eval"]["episode_s"]["median"] / original["eval"]["episode_s"]["median"]
    assert episode_line.split()[-1] == f"{expected:.2f}"
    assert "WARNING: ours and the original differ in their parameter counts" in out


def fake_report(ours_params, original_params):
    def variant(episode, rss, params, cached=None):
        return {"eval": {"episode_s": {"median": episode, "cpu_median": episode}, "sam_call_s": {"median": episode / 2},
                         "cached_episode_s": {"median": cached} if cached else {}, "max_rss_mb": rss,
                         "parameters": params},
                "train": {"step_s": {"median": 2 * episode, "cpu_median": 2 * episode}, "max_rss_mb": rss + 100},
                "checkpoint": {"weights_only_mb": 10.0, "with_optimizer_mb": 20.0},
                "protocol": {"measured": False, "folds": [], "note": "not run"}}
    meta = {"config": "c.yaml", "device": "cpu", "threads": 2, "torch": "x", "shot": 1, "val_size": 473,
            "train_size": 473, "train_batch": 1, "episodes": 3, "steps": 3, "warmup": 1, "load_before": 1.0,
            "load_after": 1.5, "attention": "sdpa", "eval_amp": False, "train_amp": False, "eval_compile": False,
            "cache": "memory", "original": "/x/SAM-RSP"}
    return {"meta": meta, "ours": variant(3.0, 3000.0, ours_params, cached=1.0),
            "original": variant(4.0, 6000.0, original_params), "reference": variant(6.0, 5000.0, ours_params)}


def test_report_ratios_against_the_original_and_the_labelled_emulation():
    same = {"total": 100, "trainable": 10}
    text = bench.format_report(fake_report(same, same))
    lines = text.splitlines()
    header = next(line for line in lines if "ours/orig" in line)
    assert header.split()[-5:] == ["ours", "original", "emulation", "ours/orig", "ours/emul"]
    assert "emulation (--reference) = OUR model through the original's paths" in text
    episode = next(line for line in lines if line.startswith("eval episode (fresh"))
    assert episode.split()[-2:] == ["0.75", "0.50"]                     # 3/4, 3/6
    memory = next(line for line in lines if line.startswith("peak memory, eval"))
    assert memory.split()[-2:] == ["0.50", "0.60"]                      # 3000/6000, 3000/5000
    cached = next(line for line in lines if "cached SAM embedding" in line)
    assert cached.split()[-2:] == ["-", "-"]                            # the original has no cache
    assert "WARNING" not in text
    differ = bench.format_report(fake_report(same, {"total": 101, "trainable": 10}))
    assert "WARNING: ours and the original differ in their parameter counts" in differ


def cfg_for(*overrides):
    return load_config(ROOT / "config" / "pascal" / "pascal_split0_resnet50.yaml", list(overrides))


def test_original_settings_map_our_config_to_the_originals_args():
    config_file, overrides = bench.original_settings(cfg_for("data.split=2", "data.shot=5"))
    assert config_file == "config/pascal/pascal_split0_resnet50.yaml"
    assert {"split=2", "shot=5", "layers=50", "vgg=False", "train_h=473", "val_size=473", "depth=3"} <= set(overrides)
    config_file, overrides = bench.original_settings(load_config(ROOT / "config" / "coco" / "coco_split1_vgg.yaml"))
    assert config_file == "config/coco/coco_split0_vgg.yaml" and "vgg=True" in overrides and "split=1" in overrides
    _, overrides = bench.original_settings(load_config(ROOT / "config" / "pascal" / "pascal_split0_resnet101.yaml"))
    assert "layers=101" in overrides
    for bad, word in (("model.sam.type=vit_h", "vit_l"), ("model.rspg.type=sccan", "BAM")):
        with pytest.raises(bench.OriginalError, match=word):
            bench.original_settings(cfg_for(bad))
    with pytest.raises(bench.OriginalError, match="pascal and coco"):
        bench.original_settings(load_config(ROOT / "config" / "toy" / "toy.yaml"))
