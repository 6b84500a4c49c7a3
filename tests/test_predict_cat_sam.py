"""util/predict_cat_sam.py: CAT-SAM prompts -> <stem>_mask.png / <stem>_overlay.png, with a tiny CATSAM."""
from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from model.cat_sam import CATSAM, CATSAMPredictor
from util import predict_cat_sam as pcs
from util.io import DataError

SMALL = dict(sam_type="tiny", embed_dim=64, depth=2, num_heads=4, global_attn_indexes=(1,), img_size=128,
             patch_size=16, window_size=4, out_chans=64)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = CATSAM(variant="a", **SMALL).eval()
    with torch.no_grad():          # logits that straddle 0, so masks are neither empty nor full
        m.mask_decoder.embedding_maskfeature[-1].bias.normal_(0, 1.0)
    return m


def write_query(path: Path, height=60, width=80) -> Path:
    image = np.full((height, width, 3), 50, np.uint8)
    image[10:30, 15:40] = (220, 200, 30)
    image[35:55, 50:75] = (30, 60, 230)
    cv2.imwrite(str(path), image)
    return path


def write_mask(path: Path, height=60, width=80) -> Path:
    mask = np.zeros((height, width), np.uint8)
    mask[10:30, 15:40] = 255
    mask[35:55, 50:75] = 255
    mask[2, 2] = 255             # a 1-pixel speck
    cv2.imwrite(str(path), mask)
    return path


def read_png(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


def test_boxes_from_mask_tight_boxes_per_component(tmp_path):
    mask = read_png(write_mask(tmp_path / "m.png"))
    boxes = pcs.boxes_from_mask(mask)
    assert boxes.tolist() == [[2, 2, 2, 2], [15, 10, 39, 29], [50, 35, 74, 54]]    # max inclusive
    assert pcs.boxes_from_mask(mask, min_area=2).tolist() == [[15, 10, 39, 29], [50, 35, 74, 54]]
    labels = np.zeros((5, 6), np.uint8)
    labels[1:3, 1:3] = 7
    labels[3, 4] = 9
    assert pcs.boxes_from_mask(labels, class_value=7).tolist() == [[1, 1, 2, 2]]
    diagonal = np.eye(4, dtype=np.uint8) * 255             # 8-connectivity: one component
    assert pcs.boxes_from_mask(diagonal).tolist() == [[0, 0, 3, 3]]
    assert pcs.boxes_from_mask(np.zeros((4, 4), np.uint8)).shape == (0, 4)


def test_boxes_write_union_mask_and_overlay(tmp_path, model):
    query = write_query(tmp_path / "q.png")
    out = tmp_path / "out"
    boxes = [[15, 10, 39, 29], [50, 35, 74, 54]]
    written = pcs.predict_cat_sam(model, [query], out, boxes=boxes)
    assert sorted(p.name for p in written) == ["q_mask.png", "q_overlay.png"]
    mask = read_png(out / "q_mask.png")
    assert mask.shape == (60, 80) and set(np.unique(mask)) <= {0, 255}
    overlay = read_png(out / "q_overlay.png")
    assert overlay.shape == (60, 80, 3)
    # the union of the per-box masks, as CATSAMPredictor computes it on the same image
    image = torch.from_numpy(cv2.cvtColor(cv2.imread(str(query)), cv2.COLOR_BGR2RGB).astype(np.float32))
    predictor = CATSAMPredictor(model)
    predictor.set_image(image.permute(2, 0, 1))
    expected = predictor.predict_union(torch.tensor(boxes, dtype=torch.float32)).numpy()
    assert 0 < expected.sum() < expected.size
    assert np.array_equal(mask > 127, expected)
    assert overlay[10, 15:40].tolist() != cv2.imread(str(query))[10, 15:40].tolist()   # box outline drawn
    assert not list(out.glob(".*"))                                                     # no temporaries left


def test_points_and_boxes_from_mask(tmp_path, model):
    a, b = write_query(tmp_path / "a.png"), write_query(tmp_path / "b.jpg", 48, 64)
    out = tmp_path / "out"
    pcs.predict_cat_sam(model, [a], out, points=[[20, 20], [30, 15]], bg_points=[[70, 5]])
    assert read_png(out / "a_mask.png").shape == (60, 80)
    ma, mb = write_mask(tmp_path / "ma.png"), write_mask(tmp_path / "mb.png", 48, 64)
    pcs.predict_cat_sam(model, [a, b], out, box_masks=[ma, mb], min_area=2)
    assert read_png(out / "b_mask.png").shape == (48, 64)
    empty = tmp_path / "empty.png"
    cv2.imwrite(str(empty), np.zeros((60, 80), np.uint8))
    pcs.predict_cat_sam(model, [a], tmp_path / "out2", box_masks=[empty])       # the empty-prompt prediction
    assert (tmp_path / "out2" / "a_mask.png").is_file()


@pytest.mark.parametrize("kwargs, message", [
    (dict(boxes=[[10, 10, 90, 20]]), r"--box 10 10 90 20 \(X0 Y0 X1 Y1\) is not inside query image .*q\.png \(80x60"),
    (dict(boxes=[[-1, 0, 5, 5]]), r"--box -1 0 5 5"),
    (dict(boxes=[[30, 10, 20, 20]]), r"--box 30 10 20 20"),
    (dict(points=[[5, 61]]), r"--point 5 61 \(X Y\) is not inside"),
    (dict(points=[[5, 5]], bg_points=[[81, 5]]), r"--bg-point 81 5"),
    (dict(boxes=[[1, 1, 5, 5], [6, 6, 9, 9]], points=[[3, 3]]), r"points describe ONE object"),
    (dict(), r"CAT-SAM needs prompts"),
    (dict(bg_points=[[3, 3]]), r"--bg-point alone"),
    (dict(boxes=[[1, 1, 5, 5]], box_masks=["m.png"]), r"--boxes-from-mask replaces --box"),
    (dict(box_masks=["m.png", "m.png"]), r"2 mask\(s\) for 1 query"),
    (dict(box_masks=["small.png"]), r"--boxes-from-mask .*small\.png is 8x8, query image .* is 80x60"),
    (dict(box_masks=["nothing.png"]), r"--boxes-from-mask: mask not found: .*nothing\.png"),
])
def test_bad_prompts_are_named_and_nothing_is_written(tmp_path, model, kwargs, message):
    query = write_query(tmp_path / "q.png")
    write_mask(tmp_path / "m.png")
    cv2.imwrite(str(tmp_path / "small.png"), np.zeros((8, 8), np.uint8))
    if "box_masks" in kwargs:
        kwargs = {**kwargs, "box_masks": [tmp_path / m for m in kwargs["box_masks"]]}
    with pytest.raises(DataError, match=message):
        pcs.predict_cat_sam(model, [query], tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_query_errors(tmp_path, model):
    with pytest.raises(DataError, match=r"query image not found: .*missing\.png"):
        pcs.predict_cat_sam(model, [tmp_path / "missing.png"], tmp_path / "out", boxes=[[0, 0, 1, 1]])
    write_query(tmp_path / "q.png")
    (tmp_path / "d").mkdir()
    write_query(tmp_path / "d" / "q.jpg")
    with pytest.raises(DataError, match="the same name 'q'"):
        pcs.predict_cat_sam(model, [tmp_path / "q.png", tmp_path / "d" / "q.jpg"], tmp_path / "out",
                            boxes=[[0, 0, 1, 1]])


class _Report:
    def summary(self) -> str:
        return "tiny test model"


def _cli_args(parser_argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("config", nargs="?")
    parser.add_argument("overrides", nargs="*")
    pcs.add_cat_sam_arguments(parser)
    return parser.parse_intermixed_args(parser_argv)


def test_run_cat_sam_cli(tmp_path, model, monkeypatch, capsys):
    monkeypatch.setattr(pcs, "load_cat_sam_model", lambda cfg: (model, _Report()))
    query, mask = write_query(tmp_path / "q.png"), write_mask(tmp_path / "m.png")
    out = tmp_path / "out"
    args = _cli_args(["--query", str(query), "--box", "15", "10", "39", "29", "--out", str(out)])
    assert pcs.run_cat_sam(args, {"weights": "w.pth"}) == 0
    assert (out / "q_mask.png").is_file() and (out / "q_overlay.png").is_file()
    assert "1 query segmented by CAT-SAM: 2 files" in capsys.readouterr().out
    args = _cli_args(["--query", str(query), "--boxes-from-mask", str(mask), "--boxes-min-area", "2",
                      "--out", str(tmp_path / "o2")])
    assert pcs.run_cat_sam(args, {"weights": "w.pth"}) == 0
    assert "2 box(es) from" in capsys.readouterr().err
    args = _cli_args(["--query", str(query), "--box", "0", "0", "81", "5", "--out", str(tmp_path / "o3")])
    assert pcs.run_cat_sam(args, {"weights": "w.pth"}) == 2
    assert "--box 0 0 81 5" in capsys.readouterr().err and not (tmp_path / "o3").exists()
    args = _cli_args(["--query", str(query), "--boxes-from-mask", str(mask), "--out", str(tmp_path / "o4")])
    assert pcs.run_cat_sam(args, None) == 2                       # not a CAT-SAM config
    assert "--boxes-from-mask is a CAT-SAM option" in capsys.readouterr().err


def test_arguments_fit_predict_py_parser():
    import predict
    parser = predict.build_parser()                   # predict.py adds the CAT-SAM options to its own parser
    args = parser.parse_intermixed_args(["CFG", "weights=x", "--query", "a.png", "b.png", "--out", "o",
                                         "--boxes-from-mask", "ma.png", "--box", "1", "2", "3", "4",
                                         "--boxes-from-mask", "mb.png"])
    assert args.boxes_from_mask == ["ma.png", "mb.png"] and args.box == [[1, 2, 3, 4]] and args.boxes_min_area == 0
    assert pcs.cat_sam_config(argparse.Namespace(config=None, overrides=[])) is None
    assert pcs.cat_sam_config(argparse.Namespace(config="config/toy/toy.yaml", overrides=[])) is None   # sam_rsp


def test_load_cat_sam_model_from_config(tmp_path):
    """build_model + load_weights with an official-format file, once stage cat_sam is in the config."""
    from util.config import load_config
    torch.manual_seed(3)
    source = CATSAM(variant="a", **SMALL)
    weights = tmp_path / "official.pth"
    torch.save({"model": source.state_dict()}, weights)
    overrides = ["train.stage=cat_sam", "model.cat_sam.variant=a", "model.sam.type=tiny", "model.sam.embed_dim=64",
                 "model.sam.depth=2", "model.sam.num_heads=4", "model.sam.global_attn_indexes=[1]",
                 "model.sam.img_size=128", "model.sam.window_size=4", "model.sam.out_chans=64",
                 "model.sam.layer_norm_eps=1.0e-6", "device=cpu", f"weights={weights}"]
    cfg = load_config("config/base.yaml", overrides)
    model, report = pcs.load_cat_sam_model(cfg)
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    # the same through predict.py's entry point: a CAT-SAM config dispatches to run_cat_sam
    import predict
    query = write_query(tmp_path / "q.png")
    out = tmp_path / "out"
    assert predict.main(["config/base.yaml", *overrides, "--query", str(query), "--box", "15", "10", "39", "29",
                         "--out", str(out)]) == 0
    assert (out / "q_mask.png").is_file() and (out / "q_overlay.png").is_file()
    assert predict.main(["config/base.yaml", *overrides, "--query", str(query), "--box", "0", "0", "999", "5",
                         "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()
