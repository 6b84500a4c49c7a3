"""The stage table: the engine names no stage; a new stage runs through it with nothing but its
table row; schedules; several optimizers; the SCCAN row; the toy report."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from util.config import ConfigError, load_config
from util.stages import (STAGES, OptimizerSpec, Progress, Stage, StageData, constant, cosine_per_epoch, get_stage,
                         poly)

ROOT = Path(__file__).resolve().parent.parent


def test_the_engine_names_no_stage():
    source = (ROOT / "util" / "engine.py").read_text()
    code = "\n".join(line.split("#", 1)[0] for line in source.splitlines())
    # docstrings may list the stages; code may not compare against or index by a stage name
    body = re.sub(r'"""[\s\S]*?"""', "", code)
    for name in STAGES:
        assert f'"{name}"' not in body and f"'{name}'" not in body, name


def test_unknown_stage_is_a_config_error():
    with pytest.raises(ConfigError, match="train.stage must be one of base, bam, sam_rsp, sccan"):
        get_stage("pspnet")


def test_schedules_by_hand():
    p = Progress(step=5, max_steps=10, epoch=1, epochs=4)
    assert poly(0.1, p, power=0.9) == pytest.approx(0.1 * 0.5 ** 0.9)
    assert constant(6e-5, p) == 6e-5
    assert cosine_per_epoch(1.0, p) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
    assert cosine_per_epoch(1.0, Progress(1, 10, 0, 4)) == 1.0


def test_sccan_row_splits_transformer_and_head():
    cfg = load_config(ROOT / "config" / "toy" / "toy.yaml", ["train.stage=sccan"])
    spec = get_stage("sccan")
    model = spec.build_model(cfg)
    sgd, adamw = spec.optimizers(model, cfg)
    assert isinstance(sgd.optimizer, torch.optim.SGD) and sgd.schedule == "poly"
    assert isinstance(adamw.optimizer, torch.optim.AdamW) and adamw.schedule == "constant"
    names = {id(p): n for n, p in model.named_parameters()}
    in_adamw = {names[id(p)] for g in adamw.optimizer.param_groups for p in g["params"]}
    in_sgd = {names[id(p)] for g in sgd.optimizer.param_groups for p in g["params"]}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert in_adamw == {n for n in trainable if n.startswith("transformer.")}
    assert in_sgd == trainable - in_adamw
    assert adamw.optimizer.param_groups[0]["weight_decay"] == cfg.train.sccan.transformer_weight_decay
    # poly on SGD, AdamW constant, as the original (SPEC_SCCAN 5)
    late = Progress(step=9, max_steps=10, epoch=2, epochs=3)
    assert sgd.set_lr(late) == [pytest.approx(cfg.train.sccan.lr * 0.1 ** 0.9)]
    assert adamw.set_lr(late) == [cfg.train.sccan.transformer_lr]


def test_sccan_crop_size_on_coco_is_473():
    cfg = load_config(ROOT / "config" / "coco" / "coco_split0_resnet50.yaml", ["train.stage=sccan"])
    effective = get_stage("sccan").configure(cfg)
    assert (effective.data.train_size, effective.data.val_size) == (473, 473)
    assert cfg.data.train_size == 641      # the loaded config itself is not changed


# -- a stage that exists only in this test -----------------------------------------------------

class _Squares(torch.utils.data.Dataset):
    """Images with a bright square; the label is the square."""

    def __init__(self, count: int):
        self.count = count
        self.epochs = []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        gen = torch.Generator().manual_seed(index)
        image = torch.randn(3, 16, 16, generator=gen) * 0.1
        label = torch.zeros(16, 16, dtype=torch.long)
        y, x = int(torch.randint(0, 8, (1,), generator=gen)), int(torch.randint(0, 8, (1,), generator=gen))
        image[:, y:y + 8, x:x + 8] += 1.0
        label[y:y + 8, x:x + 8] = 1
        return {"image": image, "label": label}


class _TwoPart(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, image):
        return {"logits": self.head(torch.relu(self.body(image)))}


def _optimizers(model, cfg):
    sgd = torch.optim.SGD([{"params": model.body.parameters(), "base_lr": 0.1, "name": "body"}], lr=0.0, momentum=0.9)
    adamw = torch.optim.AdamW([{"params": model.head.parameters(), "base_lr": 0.01, "name": "head"}], lr=0.0)
    return [OptimizerSpec("sgd", sgd, "poly", {"power": 0.9}), OptimizerSpec("adamw", adamw, "cosine_per_epoch")]


def _validate(model, val_set, cfg, proc, fold, runner=None):
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for i in range(len(val_set)):
            item = val_set[i]
            pred = model(item["image"][None])["logits"].argmax(1)[0]
            correct += int((pred == item["label"]).sum())
            total += item["label"].numel()
    model.train()
    return {"accuracy": correct / total}


def test_a_new_stage_runs_through_the_engine_with_only_its_row(monkeypatch, tmp_path):
    from util import checkpoint, engine
    seen = {}

    def data(cfg, log):
        seen["train"], seen["val"] = _Squares(32), _Squares(8)
        return StageData(seen["train"], seen["val"])

    def loss(outputs, batch, stage_cfg):
        value = nn.functional.cross_entropy(outputs["logits"], batch["label"])
        return value, {"loss": value.detach()}

    stage = Stage(name="squares", description="test stage", build_model=lambda cfg: _TwoPart(), build_data=data,
                  inputs=lambda batch: ((batch["image"],), {}), loss=loss, optimizers=_optimizers,
                  validate=_validate, selection_metric="accuracy", metric_label="accuracy")
    monkeypatch.setitem(STAGES, "squares", stage)
    monkeypatch.setitem(checkpoint.PRETRAINED_PARTS, "squares", ())
    cfg = load_config(ROOT / "config" / "toy" / "toy.yaml",
                      [f"output_dir={tmp_path / 'run'}", "data.num_workers=0", "device=cpu", "train.val_per_epoch=1"])
    cfg["train"]["stage"] = "squares"
    cfg["train"]["squares"] = {"epochs": 3, "batch_size": 8}
    summary = engine.train(cfg)

    assert summary["stage"] == "squares" and summary["selection_metric"] == "accuracy"
    assert summary["global_step"] == 3 * 4 and seen["train"].epochs == [0, 1, 2]
    validations = [h for h in summary["history"] if "accuracy" in h]
    assert len(validations) == 3 and summary["best_miou"] == max(h["accuracy"] for h in validations)
    losses = [h["train_loss"] for h in summary["history"] if "train_loss" in h]
    assert losses[-1] < losses[0]
    last = torch.load(tmp_path / "run" / "last.pth", weights_only=True)
    assert sorted(last["optimizer"]) == ["adamw", "sgd"]      # both optimizers' states, to resume
    assert last["stage"] == "squares"
    assert json.loads((tmp_path / "run" / "results.json").read_text())["stage"] == "squares"


def test_toy_report_combines_runs_and_refuses_other_protocols():
    from util.toy_report import table
    common = {"dataset": "toy", "split": 0, "shot": 1, "seeds": [1, 2], "episodes": 10, "query_order": "sequential",
              "baseline_miou_mean": 0.1, "baseline_miou_std": 0.0, "baseline_fbiou_mean": 0.2, "baseline_fbiou_std": 0.0}
    bam = dict(common, model="SAMRSP", rspg="BAM", miou_mean=0.5, miou_std=0.01, fbiou_mean=0.7, fbiou_std=0.02,
               prompt_miou_mean=0.4, prompt_miou_std=0.03, prompt_fbiou_mean=0.6, prompt_fbiou_std=0.01)
    sccan = dict(bam, rspg="SCCAN", miou_mean=0.55, prompt_miou_mean=0.45)
    text = table([bam, sccan])
    rows = [line.split()[0] for line in text.splitlines()[2:]]
    assert rows == ["all-foreground", "BAM", "SAMRSP(BAM)", "SCCAN", "SAMRSP(SCCAN)"]
    assert "45.00 +-  3.00" in text and "55.00" in text
    with pytest.raises(ValueError, match="episodes"):
        table([bam, dict(sccan, episodes=20)])


# -- SCCAN through the engine: stage sccan, then SAM-RSP over it, then test.py's protocol --------

def test_public_api_builds_sccan_and_sam_rsp_over_sccan():
    from model import SAMRSP, build_model
    from model.sccan import SCCAN
    cfg = load_config(ROOT / "config" / "pascal" / "pascal_split0_resnet50.yaml", ["train.stage=sccan", "data.shot=5"])
    model = build_model(cfg)
    assert isinstance(model, SCCAN)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 11_373_314
    assert sum(p.numel() for p in model.parameters()) == 34_951_618
    toy = load_config(ROOT / "config" / "toy" / "toy.yaml", ["train.stage=sam_rsp", "model.rspg.type=sccan"])
    over = build_model(toy)
    assert isinstance(over, SAMRSP) and isinstance(over.rspg, SCCAN)
    assert not over.frozen_train_mode          # SCCAN always runs in eval mode inside SAM-RSP
    over.train()
    assert not over.rspg.training and over.decoder.training
    with pytest.raises(ValueError, match="model.rspg.type"):
        build_model(load_config(ROOT / "config" / "toy" / "toy.yaml", ["model.rspg.type=pspnet"]))
    with pytest.raises(ValueError, match="ResNet-50/101"):
        build_model(load_config(ROOT / "config" / "pascal" / "pascal_split0_vgg.yaml", ["train.stage=sccan"]))


def test_sccan_then_sam_rsp_over_sccan_then_test(toy_root, tmp_path):
    from tests.conftest import tiny_toy_overrides
    from util.engine import test, train
    sccan_size = ["model.sccan.reduce_dim=16", "model.sccan.num_heads=2", "model.sccan.depth=2"]

    def cfg(out, *extra):
        return load_config(ROOT / "config" / "toy" / "toy.yaml",
                           tiny_toy_overrides(toy_root, tmp_path / "cache", out) + sccan_size + list(extra))

    sccan = train(cfg(tmp_path / "sccan", "train.stage=sccan", "train.sccan.epochs=1", "train.iters_per_epoch=3",
                      "train.sccan.batch_size=2"))
    assert sccan["global_step"] == 3
    last = torch.load(tmp_path / "sccan" / "last.pth", weights_only=True)
    assert sorted(last["optimizer"]) == ["adamw", "sgd"]
    over = train(cfg(tmp_path / "over", "train.stage=sam_rsp", "model.rspg.type=sccan", "train.sam_rsp.epochs=1",
                     "train.iters_per_epoch=2", f"model.rspg.checkpoint={tmp_path / 'sccan' / 'best.pth'}"))
    assert over["global_step"] == 2
    results = test(cfg(tmp_path / "test", "model.rspg.type=sccan", f"weights={tmp_path / 'over' / 'best.pth'}",
                       "eval.protocol=sccan"), progress=False)
    assert results["protocol"] == "sccan" and results["seeds"] == [321] and results["episodes"] == 12
    assert results["rspg"] == "SCCAN" and "prompt_miou_mean" in results
    saved = json.loads((tmp_path / "test" / "results.json").read_text())
    assert saved["protocol"] == "sccan" and saved["stage"] == "sam_rsp"
    # an SCCAN tested on its own: the same protocol, SCCAN's logits as the final output
    alone = test(cfg(tmp_path / "test_alone", "train.stage=sccan", f"weights={tmp_path / 'sccan' / 'best.pth'}"),
                 progress=False)
    assert alone["model"] == "SCCAN" and "prompt_miou_mean" not in alone and alone["seeds"] == [1, 2]
