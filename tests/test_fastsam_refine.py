"""eval.refine=fastsam (SPEC_FASTSAM 5.2 (a)): test.py scores the FastSAM-refined output beside
the unrefined one on the same episodes, with a seeded random-weight FastSAM-s (YOLOv8s-seg,
nothing downloaded) and the calibrated tiny SAM-RSP of tests/test_cache.py.

* both rows in results.json and in the printed table;
* with zero proposals (random weights at conf 0.4) the refined figures EQUAL the unrefined ones
  exactly, and the other numbers are those of a run without refinement;
* with forced proposals every episode is accounted for and each refined prediction is
  select_by_mask of the proposals under the final probability;
* a missing weight file fails before any episode, naming the file (and through test.py, exit 2);
* predict.py: ``--refine fastsam`` writes the refined mask beside the unrefined one (equal with
  zero proposals); ``--point`` / ``--box`` on a query without a support set (and without few-shot
  weights) write the mask util.predictor.FastSAMSegmenter gives; a missing FastSAM file is an
  error naming it before anything is written.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT
from tests.test_predict import predict_cmd, run as run_script, tiny  # noqa: F401
from tests.test_cache import CONFIG, EPISODES, SEEDS, _overrides, distinct_queries, numbers, one_thread, weights  # noqa: F401
from util.config import load_config

pytest.importorskip("ultralytics")

IMGSZ = 160        # FastSAM input side for the toy's ~150 px images (the paper's 1024 would only cost time)


@pytest.fixture(scope="module")
def random_fastsam(tmp_path_factory) -> dict:
    """Seeded random-weight FastSAM-s checkpoints: ``plain`` (stock init: no proposal reaches conf
    0.4) and ``forced`` (class logits biased: up to max_det proposals per image)."""
    from model.fastsam import save_random_fastsam
    root = tmp_path_factory.mktemp("fastsam")
    return {"plain": save_random_fastsam(root / "FastSAM-s.pt", seed=0, config_dir=root / "config"),
            "forced": save_random_fastsam(root / "forced" / "FastSAM-s.pt", seed=0, class_bias=5.0,
                                          config_dir=root / "config")}


def run_test(toy_root, weights, out: Path, *extra) -> tuple[dict, dict]:    # noqa: F811 (weights: fixture)
    from util.engine import test
    work, path = weights
    cfg = load_config(CONFIG, _overrides(toy_root, work, f"weights={path}", f"output_dir={out}", *extra))
    returned = test(cfg, progress=False)
    return json.loads((out / "results.json").read_text()), returned


def refine_options(fastsam: Path, *extra) -> list[str]:
    return ["eval.refine=fastsam", f"model.fastsam.weights={fastsam}", f"model.fastsam.imgsz={IMGSZ}", *extra]


def test_zero_proposals_refined_equals_unrefined(toy_root, weights, random_fastsam, tmp_path, capsys):
    plain, _ = run_test(toy_root, weights, tmp_path / "plain")
    refined, _ = run_test(toy_root, weights, tmp_path / "refined", *refine_options(random_fastsam["plain"]))
    # both rows, side by side
    assert refined["refine"] == "fastsam"
    assert refined["refine_outputs"] == {"refined": "+ FastSAM", "fastsam_match": "FastSAM-match (no training)"}
    # the training-free baseline (SPEC_FASTSAM 5.2 (c)): no proposal, nothing selected
    assert refined["fastsam_match_miou_mean"] == 0.0 and refined["fastsam_match_fbiou_mean"] > 0
    for key in ("miou", "fbiou"):
        for stat in ("mean", "std"):
            assert refined[f"refined_{key}_{stat}"] == refined[f"{key}_{stat}"]       # exactly
    for row in refined["per_seed"]:
        assert row["refined_miou"] == row["miou"] and row["refined_fbiou"] == row["fbiou"]
    assert refined["refined_class_iou"] == refined["class_iou"]
    assert len(refined["per_seed"]) == len(SEEDS)
    # the unrefined numbers are those of a run without refinement
    extra_keys = {k for k in refined if k.startswith(("refine", "refined_", "fastsam_match_"))}
    plain_rows = plain["per_seed"]
    refined_rows = [{k: v for k, v in row.items() if not k.startswith(("refined_", "fastsam_match_"))} for row in refined["per_seed"]]
    assert refined_rows == plain_rows
    assert {k: v for k, v in numbers(refined).items() if k not in extra_keys and k != "per_seed"} == \
        {k: v for k, v in numbers(plain).items() if k != "per_seed"}
    # every episode fell back for lack of proposals; FastSAM ran once per distinct query image
    stats = refined["refine_stats"]
    total = len(SEEDS) * EPISODES
    assert stats["refined_episodes"] == stats["refine_no_proposals"] == total
    assert stats["refine_kept"] == stats["refine_none_kept"] == stats["refine_disagrees"] == 0
    distinct = distinct_queries(toy_root, weights[0])
    assert stats["fastsam_network_calls"] == distinct and stats["fastsam_cache_hits"] == total - distinct
    # the printed table has the "+ FastSAM" row
    from util.evaluation import format_results
    table = format_results(refined)
    assert "SAM-RSP (final) + FastSAM" in table and "+FS mIoU" in table
    assert "FastSAM-match (no training)" in table and "FSm mIoU" in table
    assert "+ FastSAM" not in format_results(plain)
    assert "clip" not in sys.modules


def test_forced_proposals_are_selected_by_the_final_probability(toy_root, weights, random_fastsam, tmp_path):
    """With proposals, each refined prediction is select_by_mask(proposals, final probability,
    model mask = the unrefined prediction), in the square original-resolution frame."""
    from model import build_model
    from model.fastsam import FastSAMProposer
    from model.fastsam_select import select_by_mask
    from util.checkpoint import load_weights
    from util.dataset import build_episodes, collate
    from util.evaluation import FastSAMRefiner, evaluate_episodes
    from util.distributed import ProcessInfo
    from util.metrics import foreground_probability_at_original_resolution, predict_at_original_resolution
    work, path = weights
    cfg = load_config(CONFIG, _overrides(toy_root, work))
    model = build_model(cfg).eval()
    load_weights(model, path, require_complete=True)
    proposer = FastSAMProposer(random_fastsam["forced"], imgsz=IMGSZ, conf=0.4)
    refiner = FastSAMRefiner(proposer, purity=0.5, guard_iou=0.0)
    episodes = build_episodes(cfg, "val", seed=SEEDS[0], num_episodes=6)
    batch = collate([episodes[i] for i in range(6)])
    with torch.no_grad():
        outputs = model(batch["query_img"], batch["support_imgs"], batch["support_masks"])
    preds = predict_at_original_resolution(outputs["logits"], batch["query_ori_size"])
    refined = refiner(model, batch, outputs, preds)["refined"]
    probs = foreground_probability_at_original_resolution(outputs["logits"], batch["query_ori_size"])
    kept = 0
    for pred, out, prob, image_path, (h, w) in zip(preds, refined, probs, batch["query_path"],
                                                    batch["query_ori_size"].tolist()):
        from util.io import read_image
        found = proposer.proposals(read_image(image_path).astype("uint8"))
        assert found["masks"].shape[1:] == (h, w) and found["masks"].shape[0] > 0
        expected = select_by_mask(found["masks"], prob, model_mask=pred[:h, :w].bool(), purity=0.5, guard_iou=0.0)
        assert out.shape == pred.shape
        assert torch.equal(out[:h, :w].bool(), expected.mask)
        assert torch.equal(out[h:], pred[h:]) and torch.equal(out[:, w:], pred[:, w:])
        kept += expected.fallback == ""
    assert kept == refiner.stats["refine_kept"] > 0
    assert sum(refiner.stats[k] for k in ("refine_kept", "refine_no_proposals", "refine_none_kept",
                                          "refine_disagrees")) == refiner.stats["refined_episodes"] == 6
    # the training-free baseline: the proposals of best mean cosine to the support prototype
    from model.fastsam_select import select_by_similarity
    from util.evaluation import support_similarity
    baseline = FastSAMRefiner(proposer, baseline_delta=0.0)
    matched = baseline(model, batch, outputs, preds)["fastsam_match"]
    similarity = support_similarity(model, batch)
    for out, sim, image_path, (h, w) in zip(matched, similarity, batch["query_path"], batch["query_ori_size"].tolist()):
        from util.io import read_image
        found = proposer.proposals(read_image(image_path).astype("uint8"))
        assert sim.shape == (h, w) and float(sim.abs().max()) <= 1 + 1e-5
        expected = select_by_similarity(found["masks"], sim, delta=0.0)
        assert torch.equal(out[:h, :w].bool(), expected.mask) and expected.mask.any()
        assert not out[h:].any() and not out[:, w:].any()
    # and evaluate_episodes scores them with their own meter
    proc = ProcessInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    summary = evaluate_episodes(model, episodes,
                                class_ids=episodes.source.fold.novel, proc=proc, batch_size=3,
                                refiner=FastSAMRefiner(proposer, purity=0.5, guard_iou=0.0), progress=False)
    assert set(summary) >= {"final", "prompt", "baseline", "refined"}
    assert summary["refined"]["episodes"] == summary["final"]["episodes"]


def test_missing_weights_fail_before_any_episode(toy_root, weights, tmp_path, monkeypatch):
    import util.evaluation
    from model.fastsam import FastSAMWeightsError
    ran = []
    monkeypatch.setattr(util.evaluation, "evaluate_episodes", lambda *a, **k: ran.append(1))
    missing = tmp_path / "nowhere" / "FastSAM-s.pt"
    with pytest.raises(FastSAMWeightsError) as err:
        run_test(toy_root, weights, tmp_path / "out", *refine_options(missing))
    assert str(missing) in str(err.value) and "model.fastsam.weights" in str(err.value)
    assert ran == [] and not (tmp_path / "out" / "results.json").exists()


def test_test_py_missing_weights_is_a_clear_error(toy_root, weights, tmp_path):
    work, path = weights
    missing = tmp_path / "FastSAM-x.pt"
    args = [sys.executable, "test.py", str(CONFIG), *_overrides(toy_root, work, f"weights={path}",
                                                               f"output_dir={tmp_path / 'out'}"),
            *refine_options(missing)]
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and str(missing) in result.stderr
    assert "seed" not in result.stderr.split("error:")[0].split("\n")[-1]
    assert not (tmp_path / "out" / "results.json").exists()


# ---------------------------------------------------------------------------------------------
# predict.py
# ---------------------------------------------------------------------------------------------

def read_png(path: Path):
    import numpy as np
    from PIL import Image
    return np.array(Image.open(path))


def test_predict_refine_fastsam_writes_the_refined_mask_beside(tiny, random_fastsam):   # noqa: F811
    import numpy as np
    out = tiny.work / "refine"
    i = tiny.inputs
    result = run_script(predict_cmd(tiny, out, "--support", i.support_a[0], i.support_a[1], "--class-value", i.class_a,
                                    "--query", i.query, "--refine", "fastsam", "--fastsam-weights",
                                    random_fastsam["plain"], f"model.fastsam.imgsz={IMGSZ}"))
    assert "Traceback" not in result.stderr
    stem = i.query.stem
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{stem}_{kind}.png" for kind in ("mask", "overlay", "refined_mask", "refined_overlay"))
    mask, refined = read_png(out / f"{stem}_mask.png"), read_png(out / f"{stem}_refined_mask.png")
    assert mask.shape == refined.shape and np.array_equal(mask, refined)     # zero proposals: the model's mask
    assert 0 < (mask == 255).mean() < 1


def test_predictor_refine_with_proposals(tiny, random_fastsam):   # noqa: F811
    import numpy as np
    from util.io import read_image, read_mask
    from util.predictor import FastSAMSegmenter, Predictor
    from model.fastsam_select import select_by_mask
    i = tiny.inputs
    cfg = load_config(CONFIG, tiny.overrides + [f"model.fastsam.imgsz={IMGSZ}", "model.fastsam.guard_iou=0.0",
                                                "model.fastsam.purity=0.5"])
    predictor = Predictor.from_cfg(cfg, weights=str(tiny.weights), device="cpu")
    predictor.set_support([read_image(i.support_a[0])], [read_mask(i.support_a[1])], class_value=i.class_a)
    segmenter = FastSAMSegmenter.from_cfg(cfg, weights=random_fastsam["forced"], device="cpu")
    query = read_image(i.query)
    result = predictor.predict(query)
    refined = segmenter.refine(query, result["prob"], result["mask"])
    found = segmenter.proposals(query)
    expected = select_by_mask(found["masks"], torch.as_tensor(result["prob"]), model_mask=torch.as_tensor(result["mask"]),
                              purity=0.5, guard_iou=0.0)
    assert refined["num_proposals"] > 0 and refined["fallback"] == expected.fallback
    assert np.array_equal(refined["mask"], expected.mask.numpy())


def interactive_cmd(out: Path, query: Path, fastsam, *options):
    return ["predict.py", "--query", query, *options, "--fastsam-weights", fastsam, "--out", out,
            f"model.fastsam.imgsz={IMGSZ}", "device=cpu"]


def test_predict_point_and_box_without_support(tiny, random_fastsam):   # noqa: F811
    import numpy as np
    from util.io import read_image
    from util.predictor import FastSAMSegmenter
    query = tiny.inputs.query
    image = read_image(query)
    h, w = image.shape[:2]
    cfg = load_config(ROOT / "config" / "base.yaml", [f"model.fastsam.imgsz={IMGSZ}", "device=cpu"])
    segmenter = FastSAMSegmenter.from_cfg(cfg, weights=random_fastsam["forced"])
    segmenter.set_image(image)
    cases = {"point": (["--point", w // 2, h // 2], dict(points=[[w // 2, h // 2]])),
             "box": (["--box", 5, 5, w // 2, h // 2], dict(boxes=[[5, 5, w // 2, h // 2]])),
             "both": (["--box", 0, 0, w, h, "--bg-point", 1, 1], dict(boxes=[[0, 0, w, h]], points=[[1, 1]],
                                                                       point_labels=[0]))}
    for name, (options, api) in cases.items():
        out = tiny.work / f"interactive_{name}"
        result = run_script(interactive_cmd(out, query, random_fastsam["forced"], *options))
        assert "Traceback" not in result.stderr
        assert sorted(p.name for p in out.iterdir()) == [f"{query.stem}_mask.png", f"{query.stem}_overlay.png"]
        mask = read_png(out / f"{query.stem}_mask.png")
        assert mask.shape == (h, w) and set(np.unique(mask).tolist()) <= {0, 255}
        expected = segmenter.predict(**api)
        assert np.array_equal(mask == 255, expected["mask"])
        if name != "both":
            assert expected["mask"].any() and len(expected["indices"]) >= 1
    with pytest.raises(Exception, match="set_image"):
        FastSAMSegmenter(segmenter.proposer).predict(points=[[1, 1]])


def test_predict_missing_fastsam_weights_write_nothing(tiny, tmp_path):   # noqa: F811
    missing = tmp_path / "none" / "FastSAM-s.pt"
    i = tiny.inputs
    for options in (interactive_cmd(tmp_path / "a", i.query, missing, "--point", 10, 10),
                    predict_cmd(tiny, tmp_path / "b", "--support", i.support_a[0], i.support_a[1], "--class-value",
                                i.class_a, "--query", i.query, "--refine", "fastsam", "--fastsam-weights", missing)):
        result = run_script(options, expect=2)
        assert "Traceback" not in result.stderr and str(missing) in result.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # prompts are checked before anything too: a box outside the query
    result = run_script(interactive_cmd(tmp_path / "c", i.query, missing, "--box", 5000, 5000, 6000, 6000), expect=2)
    assert "holds no pixel" in result.stderr and not (tmp_path / "c").exists()
