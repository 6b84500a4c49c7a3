"""The training/evaluation engine on a tiny toy set: losses go down, checkpoints are lean and
atomic, resuming is exact, test.py writes the results, 2 gloo processes give the same numbers."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, tiny_toy_overrides
from util.checkpoint import load_weights, read_checkpoint, save_checkpoint
from util.config import load_config

CONFIG = ROOT / "config" / "toy" / "toy.yaml"


def toy_cfg(toy_root, work: Path, out: Path | None, *extra):
    return load_config(CONFIG, tiny_toy_overrides(toy_root, work / "cache", out) + list(extra))


@pytest.fixture(scope="module")
def pipeline(toy_root, tmp_path_factory):
    """The three stages, trained briefly, each reading the previous one's best.pth."""
    from util.engine import train
    work = tmp_path_factory.mktemp("pipeline")
    runs = {}
    runs["base"] = train(toy_cfg(toy_root, work, work / "base", "train.stage=base", "train.base.epochs=3",
                                 "train.iters_per_epoch=8", "train.base.lr_backbone=0.01", "train.base.lr_head=0.01"))
    runs["bam"] = train(toy_cfg(toy_root, work, work / "bam", "train.stage=bam", "train.bam.epochs=3",
                                "train.iters_per_epoch=8", f"model.base_learner.checkpoint={work / 'base' / 'best.pth'}"))
    runs["sam_rsp"] = train(toy_cfg(toy_root, work, work / "sam_rsp", "train.stage=sam_rsp", "train.sam_rsp.epochs=3",
                                    "train.iters_per_epoch=8", f"model.rspg.checkpoint={work / 'bam' / 'best.pth'}"))
    return work, runs


@pytest.mark.parametrize("stage", ["base", "bam", "sam_rsp"])
def test_each_stage_lowers_its_loss(pipeline, stage):
    losses = [h["train_loss"] for h in pipeline[1][stage]["history"] if "train_loss" in h]
    assert len(losses) == 3
    assert losses[-1] < losses[0], losses


def test_run_directory_contents(pipeline):
    work, runs = pipeline
    for stage in ("base", "bam", "sam_rsp"):
        run = work / stage
        for name in ("config.yaml", "train.log", "last.pth", "best.pth", "results.json"):
            assert (run / name).is_file(), (stage, name)
        assert any((run / "tensorboard").iterdir())
        results = json.loads((run / "results.json").read_text())
        assert results["stage"] == stage and results["best_miou"] >= 0 and results["global_step"] == 24
        assert load_config(run / "config.yaml").train.stage == stage   # the effective config reloads


def test_checkpoints_hold_no_frozen_weights(pipeline):
    work, _ = pipeline
    bam = read_checkpoint(work / "bam" / "best.pth")
    assert bam["frozen"][0]["prefix"] == "" and bam["frozen"][0]["path"].endswith("base/best.pth")
    assert not any(k.startswith(("layer", "learner_base")) for k in bam["model"])
    assert {"train_state", "config"} <= set(bam) and "optimizer" not in bam     # best.pth: for inference
    assert {"optimizer", "train_state", "rng", "config"} <= set(read_checkpoint(work / "bam" / "last.pth"))
    sam_rsp = read_checkpoint(work / "sam_rsp" / "best.pth")
    assert [e["prefix"] for e in sam_rsp["frozen"]] == ["rspg."]
    assert not any(k.startswith("rspg.") for k in sam_rsp["model"])
    # the toy's SAM encoder has no file (random init): it must travel with the checkpoint
    assert any(k.startswith("image_encoder.") for k in sam_rsp["model"])


def test_frozen_sam_from_a_file_is_referenced_not_copied(pipeline, toy_root):
    from model import build_model
    from util.engine import train
    work, _ = pipeline
    cfg = toy_cfg(toy_root, work, None, "train.stage=sam_rsp")
    encoder = build_model(cfg).image_encoder
    torch.save({"image_encoder." + k: v for k, v in encoder.state_dict().items()}, work / "sam_tiny.pth")
    train(toy_cfg(toy_root, work, work / "sam_file", "train.stage=sam_rsp", "train.sam_rsp.epochs=1",
                  "train.iters_per_epoch=1", f"model.sam.checkpoint={work / 'sam_tiny.pth'}",
                  f"model.rspg.checkpoint={work / 'bam' / 'best.pth'}"))
    payload = read_checkpoint(work / "sam_file" / "last.pth")
    assert all(k.startswith("decoder.") for k in payload["model"])
    assert sorted(e["prefix"] for e in payload["frozen"]) == ["image_encoder.", "rspg."]


def _weights(path):
    return read_checkpoint(path)["model"]


@pytest.mark.parametrize("checkpoint_every,stop_at", [(1, 3), (0, 6)])
def test_resume_after_an_interruption_is_exact(pipeline, toy_root, tmp_path, checkpoint_every, stop_at):
    """Stage bam (dropout, shuffled episodes): stopping after iteration ``stop_at`` and resuming
    gives bit-identical weights to an uninterrupted run (per-iteration checkpoints, or the
    epoch-end checkpoint only)."""
    from util.engine import train
    work, _ = pipeline
    common = ["train.stage=bam", "train.bam.epochs=2", "train.iters_per_epoch=4",
              f"train.checkpoint_every={checkpoint_every}", f"model.base_learner.checkpoint={work / 'base' / 'best.pth'}"]
    train(toy_cfg(toy_root, work, tmp_path / "straight", *common))

    class Interrupt(Exception):
        pass

    def stop(state):
        if state.global_step == stop_at:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(toy_cfg(toy_root, work, tmp_path / "broken", *common), on_step=stop)
    interrupted = read_checkpoint(tmp_path / "broken" / "last.pth")["train_state"]
    assert interrupted["global_step"] == (stop_at if checkpoint_every else 4)
    train(toy_cfg(toy_root, work, tmp_path / "broken", *common, "resume=auto"))
    straight, resumed = _weights(tmp_path / "straight" / "last.pth"), _weights(tmp_path / "broken" / "last.pth")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_a_killed_write_never_leaves_a_truncated_checkpoint(tmp_path, monkeypatch):
    save_checkpoint({"format": "sam-rsp/1", "model": {"w": torch.ones(3)}}, tmp_path / "last.pth")

    def dying_save(obj, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"format": "sam-rsp/1", "model": {"w": torch.zeros(3)}}, tmp_path / "last.pth")
    monkeypatch.undo()
    assert torch.equal(read_checkpoint(tmp_path / "last.pth")["model"]["w"], torch.ones(3))


def run_script(args, cwd=ROOT, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    env.setdefault("OMP_NUM_THREADS", "1")
    result = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


RESULT_FIELDS = {"miou_mean", "miou_std", "fbiou_mean", "fbiou_std", "prompt_miou_mean", "prompt_fbiou_mean",
                 "per_seed", "class_iou", "episodes", "seeds", "shot", "split", "baseline_miou_mean"}


def test_test_py_end_to_end(pipeline, toy_root, tmp_path):
    work, _ = pipeline
    overrides = tiny_toy_overrides(toy_root, work / "cache", tmp_path / "test",
                                   weights=str(work / "sam_rsp" / "best.pth"))
    out = run_script(["test.py", str(CONFIG), *overrides]).stdout + ""
    results = json.loads((tmp_path / "test" / "results.json").read_text())
    assert RESULT_FIELDS <= set(results)
    assert results["seeds"] == [1, 2] and results["episodes"] == 12 and results["shot"] == 1
    assert [r["seed"] for r in results["per_seed"]] == [1, 2]
    assert {"seed", "miou", "fbiou", "prompt_miou", "prompt_fbiou"} <= set(results["per_seed"][0])
    assert set(results["class_iou"]) == {"red_disc", "blue_square_striped"} or len(results["class_iou"]) == 5
    assert 0 <= results["baseline_miou_mean"] < 0.3


def test_missing_weights_argument_is_a_clear_error(toy_root, tmp_path):
    result = subprocess.run([sys.executable, "test.py", str(CONFIG), *tiny_toy_overrides(toy_root, tmp_path)],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "needs weights=PATH" in result.stderr


def torchrun(args, nproc=2):
    return run_script(["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args])


def test_two_process_evaluation_equals_one_process(pipeline, toy_root, tmp_path):
    work, _ = pipeline
    results = {}
    for nproc in (1, 2):
        overrides = tiny_toy_overrides(toy_root, work / "cache", tmp_path / f"p{nproc}",
                                       weights=str(work / "sam_rsp" / "best.pth"))
        if nproc == 1:
            run_script(["test.py", str(CONFIG), *overrides])
        else:
            torchrun(["test.py", str(CONFIG), *overrides])
        results[nproc] = json.loads((tmp_path / f"p{nproc}" / "results.json").read_text())
    for key in ("miou_mean", "fbiou_mean", "prompt_miou_mean", "baseline_miou_mean", "per_seed", "class_iou"):
        assert results[1][key] == results[2][key], key


def test_two_process_training_keeps_ranks_identical(pipeline, toy_root, tmp_path):
    work, _ = pipeline
    overrides = tiny_toy_overrides(toy_root, work / "cache", tmp_path / "ddp", **{
        "train.stage": "sam_rsp", "train.sam_rsp.epochs": 1, "train.iters_per_epoch": 3,
        "train.sam_rsp.batch_size": 2, "model.rspg.checkpoint": str(work / "bam" / "best.pth")})
    torchrun(["tests/ddp_train_worker.py", str(CONFIG), str(tmp_path / "ranks"), *overrides])
    digests = [json.loads((tmp_path / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert digests[0]["step"] == digests[1]["step"] == 3
    assert digests[0]["weights"] == digests[1]["weights"]
    assert digests[0]["weights"] != digests[0]["initial"]     # the weights did change


def test_resuming_from_best_pth_is_a_clear_error(pipeline, toy_root, tmp_path):
    from util.config import ConfigError
    from util.engine import train
    work, _ = pipeline
    cfg = toy_cfg(toy_root, work, tmp_path / "again", "train.stage=bam", f"resume={work / 'bam' / 'best.pth'}",
                  f"model.base_learner.checkpoint={work / 'base' / 'best.pth'}")
    with pytest.raises(ConfigError, match="resume from the run's last.pth"):
        train(cfg)
