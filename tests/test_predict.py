"""predict.py, util.predictor.Predictor and the test pictures (util.vis), on a tiny SAM-RSP with
random weights saved as one of our checkpoints (it need not be good: its final classifier's
bias is only shifted so that a toy query comes out about half foreground, which makes the
masks compared below non-trivial)."""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import ROOT, tiny_toy_overrides
from util.config import load_config
from util.io import read_image, read_mask

CONFIG = ROOT / "config" / "toy" / "toy.yaml"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models run ~50x faster on one thread than on two oversubscribed ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(args, *, expect: int | None = 0):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    if expect is not None:
        assert result.returncode == expect, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def class_pixels(mask: np.ndarray) -> dict:
    values, counts = np.unique(mask, return_counts=True)
    return {int(v): int(n) for v, n in zip(values, counts) if v not in (0, 255)}


def pick_inputs(toy_root: Path, work: Path) -> SimpleNamespace:
    """Toy val images: supports of two classes (single class: the first), a non-square query that
    holds the first class, and that query resized to 151x97 (width x height)."""
    lines = (toy_root / "lists" / "val.txt").read_text().split("\n")
    pairs = [tuple(toy_root / p for p in line.split()) for line in lines if line.strip()]
    supports = {}
    for image, mask in pairs:
        for value, count in class_pixels(read_mask(mask)).items():
            if count >= 400 and value not in supports and len(supports) < 2:
                supports[value] = (image, mask)
    (class_a, support_a), (class_b, support_b) = list(supports.items())
    query = next((image, mask) for image, mask in pairs
                 if image not in (support_a[0], support_b[0]) and class_pixels(read_mask(mask)).get(class_a, 0) > 300
                 and read_mask(mask).shape[0] != read_mask(mask).shape[1])
    odd = work / "odd_query.png"
    cv2.imwrite(str(odd), cv2.resize(cv2.imread(str(query[0])), (151, 97), interpolation=cv2.INTER_AREA))
    return SimpleNamespace(class_a=class_a, support_a=support_a, class_b=class_b, support_b=support_b,
                           query=query[0], query_mask=query[1], odd_query=odd)


def random_checkpoint(cfg, path: Path, inputs: SimpleNamespace | None, seed: int = 0) -> Path:
    """A tiny SAM-RSP with random weights as a sam-rsp/1 checkpoint (self-contained: no frozen
    files). With ``inputs``, the final classifier's foreground bias is shifted by the median
    logit difference on the toy query, so its prediction is about half foreground."""
    from model import build_model
    from util.checkpoint import checkpoint_payload, save_checkpoint
    from util.predictor import Predictor
    torch.manual_seed(seed)
    model = build_model(cfg, "sam_rsp").eval()
    if inputs is not None:
        predictor = Predictor(model, cfg)
        predictor.set_support([read_image(inputs.support_a[0])], [read_mask(inputs.support_a[1])],
                              class_value=inputs.class_a)
        logits = predictor.forward(predictor.encode_query(read_image(inputs.query)), "object")["logits"]
        with torch.no_grad():
            model.decoder.cls[3].bias[1] -= (logits[0, 1] - logits[0, 0]).median()
    return save_checkpoint(checkpoint_payload(model, stage="sam_rsp", config=cfg), path)


@pytest.fixture(scope="module")
def tiny(toy_root, tmp_path_factory):
    work = tmp_path_factory.mktemp("predict")
    overrides = tiny_toy_overrides(toy_root, work / "cache")
    cfg = load_config(CONFIG, overrides)
    inputs = pick_inputs(toy_root, work)
    weights = random_checkpoint(cfg, work / "tiny.pth", inputs)
    return SimpleNamespace(work=work, overrides=overrides, cfg=cfg, weights=weights, inputs=inputs,
                           toy_root=toy_root)


def predict_cmd(tiny, out: Path, *options, weights=None):
    return ["predict.py", CONFIG, *tiny.overrides, f"weights={weights or tiny.weights}", *options, "--out", out]


@pytest.fixture(scope="module")
def single_run(tiny):
    out = tiny.work / "single"
    i = tiny.inputs
    result = run(predict_cmd(tiny, out, "--support", i.support_a[0], i.support_a[1], "--class-value", i.class_a,
                             "--query", i.query, i.odd_query, "--save-prompt"))
    return out, result


def test_cli_writes_masks_overlays_and_prompts_at_the_original_size(tiny, single_run):
    out, result = single_run
    assert "Traceback" not in result.stderr
    for query in (tiny.inputs.query, tiny.inputs.odd_query):
        h, w = cv2.imread(str(query)).shape[:2]
        mask = np.array(Image.open(out / f"{query.stem}_mask.png"))
        assert mask.shape == (h, w) and mask.dtype == np.uint8
        assert set(np.unique(mask).tolist()) <= {0, 255}
        overlay = cv2.imread(str(out / f"{query.stem}_overlay.png"))
        prompt = cv2.imread(str(out / f"{query.stem}_prompt.png"))
        assert overlay.shape == (h, w, 3) and prompt.shape == (h, w, 3)
        assert not np.array_equal(overlay, cv2.imread(str(query)))   # tinted where the mask is
    assert cv2.imread(str(tiny.inputs.odd_query)).shape[:2] == (97, 151)
    first = np.array(Image.open(out / f"{tiny.inputs.query.stem}_mask.png"))
    assert 0.05 < (first == 255).mean() < 0.95           # a non-trivial mask (the test model is calibrated)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{q.stem}_{kind}.png" for q in (tiny.inputs.query, tiny.inputs.odd_query) for kind in ("mask", "overlay", "prompt"))


def test_predictor_gives_the_cli_mask(tiny, single_run):
    from util.predictor import Predictor
    out, _ = single_run
    i = tiny.inputs
    predictor = Predictor.from_config(CONFIG, weights=tiny.weights, overrides=tiny.overrides, device="cpu")
    support = np.asarray(Image.open(i.support_a[0]).convert("RGB"))            # uint8 RGB, as a user has it
    predictor.set_support([support], [np.asarray(Image.open(i.support_a[1]))], name="a", class_value=i.class_a)
    for query in (i.query, i.odd_query):
        result = predictor.predict(np.asarray(Image.open(query).convert("RGB")))
        cli_mask = np.array(Image.open(out / f"{query.stem}_mask.png")) == 255
        assert result["mask"].dtype == bool and np.array_equal(result["mask"], cli_mask)
        assert result["prob"].shape == result["prompt"].shape == cli_mask.shape
        assert result["prob"].min() >= 0 and result["prob"].max() <= 1
        assert np.array_equal(result["prob"] > 0.5, result["mask"])
        cli_prompt = cv2.imread(str(out / f"{query.stem}_prompt.png"))
        from util.vis import heat_map
        assert np.array_equal(cv2.cvtColor(heat_map(result["prompt"]), cv2.COLOR_RGB2BGR), cli_prompt)


def test_cli_nway_writes_a_palette_index_png_and_a_legend_overlay(tiny):
    from util.predictor import Predictor
    from util.vis import voc_palette
    out = tiny.work / "nway"
    i = tiny.inputs
    run(predict_cmd(tiny, out, "--support-class", "first", i.support_a[0], i.support_a[1],
                    "--support-class", "second", i.support_b[0], i.support_b[1],
                    "--query", i.query, i.odd_query, "--threshold", "0.3", "--save-prompt"))
    predictor = Predictor.from_config(CONFIG, weights=tiny.weights, overrides=tiny.overrides)
    for name, (image, mask) in (("first", i.support_a), ("second", i.support_b)):
        predictor.set_support([read_image(image)], [read_mask(mask)], name=name)
    for query in (i.query, i.odd_query):
        h, w = cv2.imread(str(query)).shape[:2]
        index = Image.open(out / f"{query.stem}_nway.png")
        assert index.mode == "P" and index.size == (w, h)
        labels = np.array(index)
        assert set(np.unique(labels).tolist()) <= {0, 1, 2}
        palette = np.array(index.getpalette()[:9]).reshape(3, 3)
        assert np.array_equal(palette, voc_palette(3))
        overlay = cv2.imread(str(out / f"{query.stem}_nway_overlay.png"))
        assert overlay.shape[0] >= h and overlay.shape[1] > w               # the legend is on the right
        for name in ("first", "second"):
            assert (out / f"{query.stem}_{name}_prompt.png").is_file()
        result = predictor.predict_nway(read_image(query), threshold=0.3)
        assert result["names"] == ["first", "second"] and result["probs"].shape == (2, h, w)
        assert np.array_equal(result["labels"], labels)


def test_nway_labels_follow_the_probabilities_and_the_threshold(tiny):
    from util.predictor import Predictor
    i = tiny.inputs
    predictor = Predictor.from_config(CONFIG, weights=tiny.weights, overrides=tiny.overrides)
    predictor.set_support([read_image(i.support_a[0])], [read_mask(i.support_a[1])], name="a", class_value=i.class_a)
    predictor.set_support([read_image(i.support_b[0])], [read_mask(i.support_b[1])], name="b", class_value=i.class_b)
    query = read_image(i.query)
    result = predictor.predict_nway(query, threshold=0.5)
    probs, labels = result["probs"], result["labels"]
    best = probs.max(0)
    assert np.array_equal(labels == 0, best < 0.5)
    assert np.array_equal(labels[best >= 0.5], probs.argmax(0)[best >= 0.5] + 1)
    for k, name in enumerate(["a", "b"]):                # each class's map is its single-class probability
        assert np.allclose(probs[k], predictor.predict(query, name=name)["prob"], atol=1e-6)
    assert (predictor.predict_nway(query, threshold=0.0)["labels"] > 0).all()
    assert (predictor.predict_nway(query, threshold=1.0)["labels"] == 0).all()


def test_predictor_equals_the_test_protocol_scoring(tiny):
    """The binary prediction of an evaluation episode through the Predictor (raw images +
    episode masks) is exactly the one test.py scores at original resolution."""
    from model import build_model
    from util.checkpoint import load_weights
    from util.dataset import build_episodes, episode_mask
    from util.distributed import ProcessInfo
    from util.evaluation import evaluate_episodes
    from util.predictor import Predictor
    cfg = tiny.cfg
    model = build_model(cfg, "sam_rsp")
    load_weights(model, tiny.weights, require_complete=True)
    episodes = build_episodes(cfg, "val", seed=5, num_episodes=6)
    scored = {}

    def on_batch(batch, outputs, preds):
        for episode, pred, (h, w) in zip(batch["episode"].tolist(), preds, batch["query_ori_size"].tolist()):
            scored[episode] = pred[:h, :w].cpu().numpy().astype(bool)

    evaluate_episodes(model, episodes, class_ids=episodes.source.fold.novel, batch_size=1, progress=False,
                      proc=ProcessInfo(0, 1, 0, torch.device("cpu")), on_batch=on_batch)
    assert sorted(scored) == list(range(6))
    predictor = Predictor.from_config(CONFIG, weights=tiny.weights, overrides=tiny.overrides)
    entries, source = episodes.fold_list.entries, episodes.source
    for index in range(6):
        query, class_id, supports = episodes.episode(index)
        images, masks = [], []
        for s in supports:
            image, label = source.read(entries[s])
            images.append(image.astype(np.uint8))
            masks.append(episode_mask(label, class_id))
        predictor.set_support(images, masks, name="episode")
        mask = predictor.predict(read_image(source.root / entries[query].image).astype(np.uint8))["mask"]
        assert mask.shape == scored[index].shape and np.array_equal(mask, scored[index]), index
    assert any(0 < m.mean() < 1 for m in scored.values())      # not all-background / all-foreground


@pytest.mark.parametrize("shot", [1, 2])
def test_precomputed_support_features_equal_the_plain_forward(tiny, shot):
    from model import build_model
    cfg = load_config(CONFIG, tiny.overrides + [f"data.shot={shot}"])
    torch.manual_seed(shot)
    model = build_model(cfg, "sam_rsp").eval()
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 3, 65, 65, generator=generator)
    support_imgs = torch.randn(2, shot, 3, 65, 65, generator=generator)
    support_masks = (torch.rand(2, shot, 65, 65, generator=generator) > 0.6).long()
    support_masks[:, :, :5] = 255
    with torch.no_grad():
        plain = model(query, support_imgs, support_masks)
        feats = model.rspg.extract_support_features(support_imgs, support_masks)
        reused = model(query, None, None, support_feats=feats)
        again = model(query, None, None, support_feats=feats)   # the features are not consumed
    for key in ("logits", "prompt_logits"):
        assert torch.allclose(plain[key], reused[key], atol=1e-6, rtol=0), key
        assert torch.equal(reused[key], again[key])


def test_support_masks_rules():
    from util.predictor import PredictorError, binary_support_mask, prepare_support
    label = np.array([[0, 3, 7], [255, 7, 0]], np.uint8)
    assert binary_support_mask(label).tolist() == [[0, 1, 1], [255, 1, 0]]
    assert binary_support_mask(label, class_value=7).tolist() == [[0, 0, 1], [255, 1, 0]]
    assert binary_support_mask(label > 5).tolist() == [[0, 0, 1], [1, 1, 0]]
    binary = np.array([[0, 255], [255, 0]], np.uint8)
    with pytest.raises(PredictorError, match="--class-value 255"):
        binary_support_mask(binary, what="m.png")
    assert binary_support_mask(binary, class_value=255).tolist() == [[0, 1], [1, 0]]
    image = np.zeros((40, 30, 3), np.uint8)
    with pytest.raises(PredictorError, match="s.png is 2x2 but i.jpg is 30x40"):
        prepare_support(image, np.ones((2, 2), np.uint8), val_size=65, image_name="i.jpg", mask_name="s.png")
    dot = np.zeros((2000, 2000), np.uint8)
    dot[1001, 1001] = 1
    with pytest.raises(PredictorError, match="vanish"):
        prepare_support(np.zeros((2000, 2000, 3), np.uint8), dot, val_size=65)


def test_wrong_number_of_shots_is_an_error_suggesting_data_shot(tiny):
    from util.predictor import Predictor, PredictorError
    i = tiny.inputs
    predictor = Predictor.from_config(CONFIG, weights=tiny.weights, overrides=tiny.overrides)
    image, mask = read_image(i.support_a[0]), read_mask(i.support_a[1])
    with pytest.raises(PredictorError, match=r"built for 1 shot.*data.shot=2"):
        predictor.set_support([image, image], [mask, mask], name="dog")
    out = tiny.work / "bad_shots"
    result = run(predict_cmd(tiny, out, "--support-class", "dog", *i.support_a, "--support-class", "dog",
                             *i.support_a, "--query", i.query), expect=2)
    assert "data.shot=2" in result.stderr and "'dog'" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


@pytest.fixture(scope="module")
def vgg_weights(tiny):
    cfg = load_config(CONFIG, tiny.overrides + ["model.backbone=vgg16_bn"])
    return random_checkpoint(cfg, tiny.work / "tiny_vgg.pth", None)


BAD_INPUTS = ["mask_size", "empty_mask", "not_an_image", "missing_file", "other_backbone"]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_a_clear_error_and_writes_nothing(tiny, vgg_weights, case, tmp_path):
    i = tiny.inputs
    support_image, support_mask, query, weights = i.support_a[0], i.support_a[1], i.query, tiny.weights
    options = ["--class-value", i.class_a]
    if case == "mask_size":
        named = tmp_path / "small_mask.png"
        mask = read_mask(support_mask)
        cv2.imwrite(str(named), cv2.resize(mask, (mask.shape[1] // 2, mask.shape[0]), interpolation=cv2.INTER_NEAREST))
        support_mask, expected = named, "must have its image's size"
    elif case == "empty_mask":
        named = tmp_path / "empty_mask.png"
        cv2.imwrite(str(named), np.zeros(read_mask(support_mask).shape, np.uint8))
        support_mask, expected, options = named, "no foreground", []
    elif case == "not_an_image":
        named = tmp_path / "notes.jpg"
        named.write_text("not a picture")
        query, expected = named, "not an image"
    elif case == "missing_file":
        named = tmp_path / "nowhere.jpg"
        support_image, expected = named, "not found"
    else:
        named, weights, expected = vgg_weights, vgg_weights, "model.backbone=vgg16_bn"
    out = tmp_path / "out"
    result = run(predict_cmd(tiny, out, "--support", support_image, support_mask, *options, "--query", query,
                             weights=weights), expect=2)
    assert str(named) in result.stderr and expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists() or not any(out.iterdir())


def test_test_py_vis_draws_episode_pictures_and_the_class_iou_chart(tiny, tmp_path):
    out = tmp_path / "test"
    run(["test.py", CONFIG, *tiny.overrides, f"weights={tiny.weights}", f"output_dir={out}", "vis=2",
         "eval.seeds=[3, 4]", "eval.episodes=5", "eval.batch_size=2"])
    pictures = sorted((out / "vis").glob("*.png"))
    assert [p.name.split("_")[1] for p in pictures] == ["0000", "0001"]   # episodes 0 and 1 of the first seed
    for path in pictures:
        picture = cv2.imread(str(path))
        assert picture.shape[0] > 100 and picture.shape[1] > 4 * 100       # title + support, query, RSP, final
    chart = cv2.imread(str(out / "class_iou.png"))
    results = json.loads((out / "results.json").read_text())
    assert chart is not None and chart.shape[0] > 20 * len(results["class_iou"])


def test_episode_pictures_crop_the_canvas_padding():
    from util.transforms import ValResize, resized_hw
    from util.vis import support_valid_hw
    rng = np.random.default_rng(0)
    for h, w in ((60, 80), (97, 151), (150, 40), (65, 65)):
        image = rng.integers(1, 255, (h, w, 3)).astype(np.float32)
        mask = (rng.random((h, w)) > 0.5).astype(np.uint8)
        canvas, (padded,) = ValResize(65)(image, [mask])
        assert support_valid_hw(canvas, padded, 65) == resized_hw(h, w, 65)


def test_episode_pictures_of_a_model_without_rsp(tmp_path):
    """A stage-bam model has no prompt: the picture has supports, ground truth and prediction."""
    from util.vis import EpisodePictures
    size, (h, w) = 65, (40, 60)
    label = torch.zeros(size, size, dtype=torch.long).fill_(255)
    label[:h, :w] = 0
    label[10:30, 10:40] = 1
    batch = {"query_img": torch.randn(1, 3, size, size), "support_imgs": torch.randn(1, 2, 3, size, size),
             "support_masks": (torch.rand(1, 2, size, size) > 0.5).long(), "query_mask": label[None],
             "query_label_ori": label[None, :w, :w], "query_ori_size": torch.tensor([[h, w]]),
             "class_id": torch.tensor([3]), "episode": torch.tensor([7]), "image_id": ["q"]}
    pred = torch.zeros(w, w, dtype=torch.long)
    pred[10:30, 10:25] = 1
    pictures = EpisodePictures(tmp_path, num_episodes=5, val_size=size, mean=[0, 0, 0], std=[1, 1, 1],
                               class_name=lambda c: f"class {c}", panel_height=64)
    pictures(batch, {"logits": torch.randn(1, 2, size, size)}, [pred])
    assert [p.name for p in pictures.written] == ["episode_0007_class_3.png"]
    picture = cv2.imread(str(pictures.written[0]))
    assert picture.shape[0] == 26 + 20 + 64          # title, captions, panels
    assert picture.shape[1] > 3 * 64                  # 2 supports, query + ground truth, prediction
