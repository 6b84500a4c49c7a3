"""predict.py's semantic mode (util/predict_semantic.py): a tiny SimFormer with random weights saved
through the engine's checkpoint format, label maps and overlays written atomically, refused inputs."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from util.config import load_config
from util.io import DataError

ROOT = Path(__file__).resolve().parent.parent


def _toy_cfg(*extra: str):
    """config/toy/weakshot.yaml's tiny SimFormer (random weights), evaluated at the images' size."""
    return load_config(ROOT / "config" / "toy" / "weakshot.yaml", ["device=cpu", *extra])


def _checkpoint(cfg, path: Path) -> Path:
    from model import build_model
    from util.checkpoint import checkpoint_payload, save_checkpoint
    torch.manual_seed(0)
    model = build_model(cfg, "simformer")
    save_checkpoint(checkpoint_payload(model, stage="simformer", config=cfg), path)
    return path


def _query(path: Path, h: int, w: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    cv2.rectangle(image, (5, 5), (w // 2, h // 2), (250, 30, 30), -1)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), image)
    return path


@pytest.fixture(scope="module")
def toy_weights(tmp_path_factory):
    return _checkpoint(_toy_cfg(), tmp_path_factory.mktemp("ckpt") / "best.pth")


def test_label_map_and_overlay(toy_weights, tmp_path):
    from model.simformer import preprocess_images
    from util.predict_semantic import build_semantic_model, predict_semantic
    from util.vis import voc_palette
    from util.weakshot_data import eval_image
    cfg = _toy_cfg(f"weights={toy_weights}", "train.simformer.val_short_side=64", "train.simformer.val_max_side=100")
    model, report = build_semantic_model(cfg)
    queries = [_query(tmp_path / "in" / "a.jpg", 90, 130), _query(tmp_path / "in" / "b.png", 70, 70, seed=1)]
    written = predict_semantic(model, cfg, queries, tmp_path / "out")
    assert sorted(p.name for p in written) == ["a_semantic.png", "a_semantic_overlay.png", "b_semantic.png",
                                               "b_semantic_overlay.png"]
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]    # no temporaries left
    with Image.open(tmp_path / "out" / "a_semantic.png") as im:
        assert im.mode == "P" and im.size == (130, 90)
        labels = np.array(im)
        assert im.getpalette()[:3 * 21] == voc_palette(21).reshape(-1).tolist()
    assert labels.max() < 21
    # the evaluation path of the stage: eval resize (short side 64, long <= 100), inference, argmax
    image = cv2.cvtColor(cv2.imread(str(queries[0])), cv2.COLOR_BGR2RGB).astype(np.float32)
    tensor = eval_image(image, 64, 100)
    assert tuple(tensor.shape[1:]) == (64, 92)
    padded, sizes = preprocess_images([tensor])
    expected = model.inference(padded, sizes, [(90, 130)])[0].argmax(0).numpy()
    assert np.array_equal(labels, expected)
    overlay = cv2.imread(str(tmp_path / "out" / "a_semantic_overlay.png"))
    assert overlay.shape[0] >= 90 and overlay.shape[1] > 130          # the legend on the right
    # deterministic: a second run writes the same bytes
    again = predict_semantic(model, cfg, queries[:1], tmp_path / "again")
    assert again[0].read_bytes() == (tmp_path / "out" / "a_semantic.png").read_bytes()


def test_render_tints_class_zero_only_without_background():
    from util.predict_semantic import render_semantic
    image = np.full((20, 30, 3), 128, np.uint8)
    labels = np.zeros((20, 30), np.uint8)
    labels[:, 15:] = 3
    names = [f"c{i}" for i in range(5)]

    def overlay(background):
        data = render_semantic(image, labels, names, "q", background=background)["q_semantic_overlay.png"]
        return cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)

    with_bg, without_bg = overlay(True), overlay(False)
    assert (with_bg[5, 5] == 128).all() and not (without_bg[5, 5] == 128).all()      # class 0 tinted only as a class
    assert not (with_bg[5, 25] == 128).all()
    assert with_bg.shape[1] > 30 and without_bg.shape[1] > 30
    index = render_semantic(image, labels, names, "q")["q_semantic.png"]
    decoded = cv2.imdecode(np.frombuffer(index, np.uint8), cv2.IMREAD_UNCHANGED)
    assert decoded is not None


def test_benchmark_config_predicts_its_classes(tmp_path):
    from util.predict_semantic import build_semantic_model, predict_semantic, semantic_class_names
    tiny = ["model.simformer.backbone_blocks=[1, 1, 1, 1]", "model.simformer.backbone_width=16",
            "model.simformer.conv_dim=32", "model.simformer.mask_dim=16", "model.simformer.hidden_dim=16",
            "model.simformer.num_queries=6", "model.simformer.nheads=2", "model.simformer.dim_feedforward=32",
            "model.simformer.dec_layers=2", "model.simformer.simnet_hidden=16", "model.allow_random_init=true",
            "model.simformer.backbone_checkpoint=", "device=cpu", "train.simformer.val_short_side=64"]
    cfg = load_config(ROOT / "config" / "weakshot" / "ade20k_split1.yaml", tiny)
    weights = _checkpoint(cfg, tmp_path / "ade.pth")
    cfg = load_config(ROOT / "config" / "weakshot" / "ade20k_split1.yaml", tiny + [f"weights={weights}"])
    assert len(semantic_class_names(cfg)) == 150 and semantic_class_names(cfg)[0] == "wall"
    model, _ = build_semantic_model(cfg)
    predict_semantic(model, cfg, [_query(tmp_path / "q.jpg", 80, 100)], tmp_path / "out")
    with Image.open(tmp_path / "out" / "q_semantic.png") as im:
        assert im.size == (100, 80) and np.array(im).max() < 150
    # a model of another dataset is refused by name
    toy_cfg = _toy_cfg()
    with pytest.raises(Exception, match="predicts 21 classes but data.dataset=ade20k has 150"):
        from model import build_model
        predict_semantic(build_model(toy_cfg, "simformer"), cfg, [tmp_path / "q.jpg"], tmp_path / "x")


def test_run_semantic_through_predict_parser(toy_weights, tmp_path, capsys):
    import predict
    query = _query(tmp_path / "q.jpg", 60, 80)
    config = str(ROOT / "config" / "toy" / "weakshot.yaml")

    def run(*argv):   # predict.py's own entry point: a simformer config dispatches to run_semantic
        return predict.main([config, *argv])

    assert run(f"weights={toy_weights}", "device=cpu", "--query", str(query), "--out", str(tmp_path / "out")) == 0
    assert (tmp_path / "out" / "q_semantic.png").is_file() and (tmp_path / "out" / "q_semantic_overlay.png").is_file()
    assert "1 query segmented into 21 classes: 2 files" in capsys.readouterr().out
    # refused before anything is written
    cases = [
        (["--support", str(query), str(query)], "--support: few-shot options"),
        ([], "needs weights=PATH"),
        ([f"weights={toy_weights}", "--query", str(tmp_path / "missing.jpg")], "query image not found"),
        ([f"weights={tmp_path / 'none.pth'}"], "none.pth"),
    ]
    for extra, message in cases:
        out = tmp_path / "refused"
        argv = [*extra] + ([] if "--query" in extra else ["--query", str(query)]) + ["--out", str(out), "device=cpu"]
        assert run(*argv) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()
    twin = _query(tmp_path / "other" / "q.png", 60, 80)
    assert run(f"weights={toy_weights}", "--query", str(query), str(twin), "--out", str(tmp_path / "o2")) == 2
    assert "have the same name 'q'" in capsys.readouterr().err


def test_semantic_class_names():
    from util.predict_semantic import has_background, semantic_class_names
    cfg = _toy_cfg()
    names = semantic_class_names(cfg)
    assert len(names) == 21 and names[0] == "background" and has_background(cfg)
    pascal = load_config(ROOT / "config" / "weakshot" / "pascal_split0.yaml")
    assert semantic_class_names(pascal)[1] == "aeroplane"
    coco = load_config(ROOT / "config" / "weakshot" / "cocostuff10k_split2.yaml")
    assert semantic_class_names(coco)[170] == "wood" and not has_background(coco)
    with pytest.raises(DataError):
        from util.predict_semantic import _check_queries
        _check_queries([Path("/nonexistent/x.jpg")])
