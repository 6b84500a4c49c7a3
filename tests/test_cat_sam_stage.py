"""Stage ``cat_sam``: the row, loss / optimizer / schedule, the folder format and its refused
inputs, the protocol metric by hand, a tiny train + test through util.engine, frozen tensors
bit-identical after training, and load_weights of official-format and wrong-variant files."""
from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from util.config import ConfigError, load_config
from util.io import DataError
from util.stages import STAGES, Progress, get_stage

ROOT = Path(__file__).resolve().parent.parent

# a CAT-SAM small enough for seconds on a CPU: 64 x 64 input, 4 x 4 tokens, decoder width 32
TINY = ["train.stage=cat_sam", "model.sam.type=tiny", "model.sam.embed_dim=32", "model.sam.depth=2",
        "model.sam.num_heads=2", "model.sam.global_attn_indexes=[1]", "model.sam.img_size=64",
        "model.sam.patch_size=16", "model.sam.window_size=2", "model.sam.out_chans=32",
        "model.sam.layer_norm_eps=1.0e-6", "model.sam.checkpoint=''", "model.allow_random_init=true",
        "data.num_workers=0", "device=cpu"]


def write_folder(root: Path, samples: dict, lists: dict, *, mask_ext: str = ".png") -> Path:
    """``samples``: name -> (h, w, [(y0, y1, x0, x1), ...]) rectangles of foreground (255);
    ``lists``: list file name -> sample names."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for name, (h, w, rects) in samples.items():
        image = np.full((h, w, 3), 60, np.uint8)
        mask = np.zeros((h, w), np.uint8)
        for y0, y1, x0, x1 in rects:
            mask[y0:y1, x0:x1] = 255
            image[y0:y1, x0:x1] = (200, 80, 40)
        cv2.imwrite(str(root / "images" / f"{name}.png"), image)
        cv2.imwrite(str(root / "masks" / f"{name}{mask_ext}"), mask)
    for list_name, names in lists.items():
        (root / list_name).write_text("".join(f"images/{n}.png masks/{n}{mask_ext}\n" for n in names))
    return root


SAMPLES = {"a": (40, 48, [(5, 20, 6, 22), (25, 36, 30, 44)]), "b": (44, 40, [(10, 30, 8, 30)]),
           "c": (36, 36, []), "d": (40, 40, [(2, 12, 2, 12)])}


@pytest.fixture
def folder(tmp_path):
    return write_folder(tmp_path / "data", SAMPLES, {"train_1shot.txt": ["a"], "train.txt": ["a", "b", "c", "d"],
                                                     "val.txt": ["b", "d"], "test.txt": ["a", "b", "c", "d"]})


def tiny_cfg(root: Path, *extra: str):
    return load_config(None, TINY + [f"data.root={root}", "data.dataset=mine", *extra])


# -- the row, loss, optimizer, schedule -----------------------------------------------------------

def test_row_is_appended_to_the_table():
    names = list(STAGES)
    assert names[:4] == ["base", "bam", "sam_rsp", "sccan"] and names[-1] == "cat_sam"
    spec = get_stage("cat_sam")
    assert spec.selection_metric == "fg_iou" and spec.test is not None and not spec.sub_epoch_validation
    cfg = load_config(ROOT / "config" / "cat_sam" / "kvasir.yaml")
    assert cfg.train.stage == "cat_sam" and cfg.model.sam.type == "vit_l"
    assert (cfg.train.cat_sam.epochs, cfg.train.cat_sam.batch_size, cfg.train.cat_sam.lr) == (2000, 1, 1e-3)
    assert spec.length(cfg, 20, 1, 1) == (100, 20)         # 2000 passes of 1 sample, validated every 20


def test_loss_is_bce_plus_dice_per_object():
    from model.cat_sam_loss import cat_sam_loss
    logits = [torch.zeros(2, 1, 2, 2), torch.zeros(1, 1, 2, 2)]
    targets = [torch.tensor([[[1., 0], [0, 0]], [[1, 1], [1, 1]]]), torch.zeros(1, 2, 2)]
    total, parts = get_stage("cat_sam").loss(logits, {"masks": targets}, None)
    # sigmoid(0) = 0.5: BCE = log 2 everywhere; dice object 1: 1 - (2*0.5 + 1)/(2 + 1 + 1) = 0.5,
    # object 2: 1 - (2*2 + 1)/(2 + 4 + 1) = 2/7, empty image: 1 - 1/(2 + 0 + 1) = 2/3
    dice = ((0.5 + 2 / 7) / 2 + 2 / 3) / 2
    assert float(parts["loss_bce"]) == pytest.approx(math.log(2), abs=1e-6)
    assert float(parts["loss_dice"]) == pytest.approx(dice, abs=1e-6)
    assert float(total) == pytest.approx(math.log(2) + dice, abs=1e-6)
    assert total.item() == cat_sam_loss(logits, targets)[0].item()


def test_optimizer_is_adamw_over_the_trainable_tensors_with_cosine_per_pass(folder):
    from model import build_model
    cfg = tiny_cfg(folder, "model.cat_sam.variant=t", "train.cat_sam.epochs=40", "train.cat_sam.val_every=4",
                   "train.cat_sam.min_lr=1.0e-5")
    model = build_model(cfg)
    spec = get_stage("cat_sam")
    (opt,) = spec.optimizers(model, cfg)
    assert isinstance(opt.optimizer, torch.optim.AdamW)
    params = opt.optimizer.param_groups[0]["params"]
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}
    assert opt.optimizer.param_groups[0]["weight_decay"] == 1e-4
    # 40 passes of 3 iterations each, 4 passes per engine epoch: epochs (10, 12)
    epochs, iters = spec.length(cfg, 3 * 4, 1, 1)
    assert (epochs, iters) == (10, 12)
    lrs = []
    for step in range(1, epochs * iters + 1):
        epoch = (step - 1) // iters
        lrs.append(opt.set_lr(Progress(step, epochs * iters, epoch, epochs))[0])
    expected = [1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi * p / 40)) / 2 for p in range(40)]
    assert lrs[::3] == pytest.approx(expected) and lrs[1::3] == pytest.approx(expected)   # constant within a pass
    with pytest.raises(ConfigError, match="multiple"):
        spec.configure(tiny_cfg(folder, "train.cat_sam.epochs=30", "train.cat_sam.val_every=4"))


def test_zero_shot_cannot_be_trained(folder):
    from model import build_model
    cfg = tiny_cfg(folder, "model.cat_sam.variant=zero_shot")
    with pytest.raises(ConfigError, match="zero-shot SAM is test-only"):
        get_stage("cat_sam").optimizers(build_model(cfg), cfg)


# -- the folder format ----------------------------------------------------------------------------

def test_reader_objects_boxes_and_points(folder):
    from util.cat_sam_data import build_eval_set, interior_point
    cfg = tiny_cfg(folder)
    test = build_eval_set(cfg, "test.txt")
    assert [Path(e.image).stem for e in test.entries] == ["a", "b", "c", "d"]
    a = test[0]
    assert a["image"].shape == (3, 40, 48) and a["foreground"].sum() == 15 * 16 + 11 * 14
    assert a["boxes"].tolist() == [[6, 5, 21, 19], [30, 25, 43, 35]]    # x0, y0, x1, y1, max inclusive
    assert test[2]["boxes"].shape == (0, 4) and test[2]["points"].shape == (0, 1, 2)
    # the interior point: the pixel farthest from the background (first in row-major order)
    mask = np.zeros((9, 9), bool)
    mask[1:8, 2:5] = True
    assert interior_point(mask).tolist() == [3, 2]


def test_components_rules_and_threshold(tmp_path):
    from util.cat_sam_data import ObjectRules, components, read_mask
    fg = np.zeros((20, 20), bool)
    fg[0:2, 0:2] = True                  # 4 px
    fg[2, 2] = True                      # diagonal neighbour: joins with 8-connectivity only
    fg[10:18, 10:18] = True              # 64 px
    assert len(components(fg, ObjectRules(8, 1, 0.0))) == 2
    assert len(components(fg, ObjectRules(4, 1, 0.0))) == 3
    assert len(components(fg, ObjectRules(8, 10, 0.0))) == 1        # the 5 px object is dropped
    assert len(components(fg, ObjectRules(8, 1, 0.1))) == 1         # < 0.1 x 64
    mask = np.array([[0, 127, 128, 255]], np.uint8)
    cv2.imwrite(str(tmp_path / "m.png"), mask)
    assert read_mask(tmp_path / "m.png", 127).tolist() == [[False, False, True, True]]


def test_bad_inputs_are_refused_by_name(tmp_path):
    from util.cat_sam_data import build_eval_set, build_train_set, check_boxes
    root = write_folder(tmp_path / "d", SAMPLES, {"test.txt": ["a"], "train_1shot.txt": ["c"]})
    # an empty mask in a few-shot training list
    with pytest.raises(DataError, match=r"few-shot training sample .*c\.png has an empty mask"):
        build_train_set(tiny_cfg(root), mask_size=16)
    # a missing list, a missing file, a malformed line
    with pytest.raises(DataError, match=r"val\.txt does not exist"):
        build_eval_set(tiny_cfg(root), "val.txt")
    (root / "test.txt").write_text("images/a.png masks/zz.png\n")
    with pytest.raises(DataError, match=r"mask file .*zz\.png does not exist"):
        build_eval_set(tiny_cfg(root), "test.txt")
    (root / "test.txt").write_text("images/a.png\n")
    with pytest.raises(DataError, match=r"test\.txt, line 1: expected '<image path> <mask path>'"):
        build_eval_set(tiny_cfg(root), "test.txt")
    # a mask of another size than its image
    cv2.imwrite(str(root / "masks" / "small.png"), np.zeros((10, 12), np.uint8))
    (root / "test.txt").write_text("images/a.png masks/small.png\n")
    with pytest.raises(DataError, match=r"mask .*small\.png is 12x10 .* its image .*a\.png is 48x40"):
        build_eval_set(tiny_cfg(root), "test.txt")[0]
    # a box outside the image
    with pytest.raises(DataError, match=r"box 1 \(10, 5, 49, 20\) is not an ordered box inside the 48x40 image"):
        check_boxes([[0, 0, 5, 5], [10, 5, 49, 20]], 40, 48)
    with pytest.raises(DataError, match=r"box 0 \(-1, 5, 9, 20\)"):
        check_boxes([[-1, 5, 9, 20]], 40, 48)
    with pytest.raises(DataError, match="box 0"):
        check_boxes([[10, 5, 4, 20]], 40, 48)
    assert check_boxes([0, 0, 48, 40], 40, 48).shape == (1, 4)


def test_jpeg_masks_and_training_samples_are_a_pure_function_of_seed_epoch_index(tmp_path):
    from util.cat_sam_data import build_train_set
    root = write_folder(tmp_path / "d", SAMPLES, {"train_1shot.txt": ["a"]}, mask_ext=".jpg")
    cfg = tiny_cfg(root)
    s1, s2 = build_train_set(cfg, mask_size=16, repeats=3), build_train_set(cfg, mask_size=16, repeats=3)
    assert len(s1) == 3
    s2.set_epoch(1)
    s2.set_epoch(0)
    for i in range(3):
        x, y = s1[i], s2[i]
        assert torch.equal(x["image"], y["image"]) and x["prompt"] == y["prompt"]
        assert x["masks"].shape[1:] == x["image"].shape[1:]
    s1.set_epoch(1)
    views = {(tuple(s1[i]["image"].shape), s1[i]["prompt"]) for i in range(3)}
    views |= {(tuple(s2[i]["image"].shape), s2[i]["prompt"]) for i in range(3)}
    assert len(views) > 1                      # not one fixed view (the original's worker re-seeding)
    # every prompt type, with matching object counts
    kinds = set()
    for epoch in range(8):
        s1.set_epoch(epoch)
        for i in range(3):
            sample = s1[i]
            n = sample["masks"].shape[0]
            kinds.add(sample["prompt"])
            given = [v for v in (sample["boxes"], sample["points"], sample["noisy_masks"]) if v is not None]
            assert len(given) <= 1 and all(v.shape[0] == n for v in given)
            if sample["noisy_masks"] is not None:
                assert sample["noisy_masks"].shape[1:] == (1, 16, 16)
    assert kinds == {"point", "box", "mask"}


# -- the protocol metric by hand ------------------------------------------------------------------

class FixedModel(torch.nn.Module):
    """Predicts given masks: box prompts -> ``box_masks[name]``, points -> ``point_masks[name]``."""

    mask_threshold = 0.0
    name = "fixed"

    def __init__(self, box_masks, point_masks):
        super().__init__()
        self.box_masks, self.point_masks = box_masks, point_masks

    def embed(self, images):
        return [tuple(i.shape[-2:]) for i in images], [float(i[0, 0, 0]) for i in images]

    def forward(self, features=None, boxes=None, points=None):
        sizes, keys = features
        table = self.box_masks if boxes is not None else self.point_masks
        return [torch.where(table[k], 1.0, -1.0)[None, None] for k in keys]


def test_protocol_metric_against_hand_computed_numbers(tmp_path):
    from util.distributed import ProcessInfo
    from util.cat_sam_data import build_eval_set
    from util.stages.cat_sam import evaluate_cat_sam
    samples = {"p": (10, 10, [(0, 5, 0, 4)]), "q": (10, 10, []), "r": (10, 10, [(0, 10, 0, 10)])}
    root = write_folder(tmp_path / "d", samples, {"test.txt": ["p", "q", "r"]})
    for i, name in enumerate(samples):       # distinct first pixel: the fixed model's key
        image = cv2.imread(str(root / "images" / f"{name}.png"))
        image[0, 0] = 10 * (i + 1)
        cv2.imwrite(str(root / "images" / f"{name}.png"), image)
    ds = build_eval_set(tiny_cfg(root, "data.cat_sam.min_area=1"), "test.txt")
    keys = [float(ds[i]["image"][0, 0, 0]) for i in range(3)]
    p_box = torch.zeros(10, 10, dtype=torch.bool)
    p_box[0:5, 0:2] = True                      # 10 px inside the 20 px GT: inter 10, union 20
    q_box = torch.zeros(10, 10, dtype=torch.bool)
    q_box[0:1, 0:3] = True                      # 3 false positives on the empty image: inter 0, union 3
    r_box = torch.ones(10, 10, dtype=torch.bool)    # 100 / 100
    empty = torch.zeros(10, 10, dtype=torch.bool)
    model = FixedModel(dict(zip(keys, [p_box, q_box, r_box])), dict(zip(keys, [p_box, empty, empty])))
    proc = ProcessInfo(0, 1, 0, torch.device("cpu"))
    for batch_size in (1, 2, 3):
        r = evaluate_cat_sam(model, ds, proc=proc, batch_size=batch_size, progress=False)
        assert r["fg_iou"] == pytest.approx((10 + 0 + 100) / (20 + 3 + 100))
        assert r["image_iou"] == pytest.approx((0.5 + 0.0 + 1.0) / 3)
        assert r["point_fg_iou"] == pytest.approx((10 + 0 + 0) / (20 + 0 + 100))
        assert r["point_image_iou"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)     # empty vs empty counts 1
        assert (r["num_images"], r["num_empty"], r["empty_fp_pixels"]) == (3, 1, 3)


# -- checkpoints through util.checkpoint.load_weights ---------------------------------------------

def _official(model, path: Path, wrap: bool = True) -> Path:
    state = dict(model.state_dict())
    torch.save({"model": state} if wrap else state, path)
    return path


def test_load_weights_official_format_and_refused_variant_and_size(folder, tmp_path):
    from model import build_model
    from util.checkpoint import CheckpointError, load_weights
    torch.manual_seed(0)
    a = build_model(tiny_cfg(folder, "model.cat_sam.variant=a"))
    with torch.no_grad():
        for p in a.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    file = _official(a, tmp_path / "kvasir_cat-a_vit-l_1shot.pth")
    b = build_model(tiny_cfg(folder, "model.cat_sam.variant=a"))
    report = load_weights(b, file, require_complete=True)
    assert report.format == "cat_sam"
    for (k, v), (k2, v2) in zip(a.state_dict().items(), b.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    load_weights(build_model(tiny_cfg(folder)), _official(a, tmp_path / "bare.pth", wrap=False))
    with pytest.raises(CheckpointError, match=r"a CAT-SAM-A checkpoint .* the model is CAT-SAM-T"):
        load_weights(build_model(tiny_cfg(folder, "model.cat_sam.variant=t")), file)
    with pytest.raises(CheckpointError, match=r"is for SAM a custom ViT \(width 32, depth 2\), the model is CAT-SAM-A \(tiny\) with SAM tiny"):
        load_weights(build_model(tiny_cfg(folder, "model.sam.embed_dim=64")), file)
    # alias pairs must agree
    state = dict(a.state_dict())
    state["image_encoder.hq_token"] = state["image_encoder.hq_token"] + 1
    torch.save({"model": state}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="unequal alias pairs"):
        load_weights(build_model(tiny_cfg(folder)), tmp_path / "bad.pth")


def _sam_file(model, path: Path) -> Path:
    """A segment-anything style sam_vit_*.pth of ``model``'s frozen SAM."""
    from model.cat_sam_decoder import SAM_DECODER_PREFIXES
    state = {}
    for k, v in model.canonical_state_dict().items():
        if k.startswith("ori_sam."):
            state[k[len("ori_sam."):]] = v
        elif k.startswith(tuple("mask_decoder." + p for p in SAM_DECODER_PREFIXES)):
            state[k] = v
    torch.save(state, path)
    return path


def _frozen_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- through the engine ---------------------------------------------------------------------------

def test_tiny_train_and_test_through_the_engine(folder, tmp_path):
    from model import build_model
    from util.checkpoint import CheckpointError, load_weights
    from util.engine import test, train
    torch.manual_seed(1)
    sam = _sam_file(build_model(tiny_cfg(folder, "model.cat_sam.variant=zero_shot")), tmp_path / "sam_vit_tiny.pth")
    base = [f"model.sam.checkpoint={sam}", "model.allow_random_init=false", "train.cat_sam.epochs=4",
            "train.cat_sam.val_every=2", "train.cat_sam.batch_size=2", "data.shot=0", "train.select=best",
            "train.early_stop=0"]
    snapshots = {}

    def cfg(*extra):
        return tiny_cfg(folder, *base, *extra)

    for variant in ("a", "t"):
        run = tmp_path / f"run_{variant}"
        summary = train(cfg(f"model.cat_sam.variant={variant}", f"output_dir={run}"))
        assert summary["epochs_done"] == 2 and summary["global_step"] == 2 * 4
        assert [h["epoch"] for h in summary["history"] if "fg_iou" in h] == [1, 2]
        best = Path(summary["checkpoint"])
        payload = torch.load(best, weights_only=True)
        assert payload["stage"] == "cat_sam" and payload["frozen"][0]["prefix"] == ""
        assert not any(k.startswith(("ori_sam.", "image_encoder.sam_img_encoder.")) for k in payload["model"])
        results = test(cfg(f"model.cat_sam.variant={variant}", f"weights={best}", f"output_dir={run / 'test'}"),
                       progress=False)
        saved = json.loads((run / "test" / "results.json").read_text())
        assert saved["protocol"] == "cat_sam" and saved["num_images"] == 4 and saved["num_empty"] == 1
        assert 0 <= saved["fg_iou"] <= 1 and "point_fg_iou" in saved and results["variant"] == variant
        snapshots[variant] = best
    # the checkpoint of another variant is refused by name through load_weights
    with pytest.raises(CheckpointError, match=r"a CAT-SAM-T \(SAM a custom ViT \(width 32, depth 2\)\) checkpoint"):
        load_weights(build_model(cfg("model.cat_sam.variant=a")), snapshots["t"])
    # zero-shot: test-only, the SAM file is its weights
    zs = test(cfg("model.cat_sam.variant=zero_shot", f"weights={sam}", f"output_dir={tmp_path / 'zs'}"),
              progress=False)
    assert zs["num_images"] == 4
    with pytest.raises(ConfigError, match="test-only"):
        train(cfg("model.cat_sam.variant=zero_shot", f"output_dir={tmp_path / 'zs_train'}"))
    # a SAM file is not a whole CAT-SAM-A
    with pytest.raises(CheckpointError, match="RANDOM"):
        test(cfg("model.cat_sam.variant=a", f"weights={sam}", f"output_dir={tmp_path / 'bad'}"), progress=False)
    # select=val without val.txt is refused with train.select=best
    (folder / "val.txt").unlink()
    with pytest.raises(ConfigError, match="val.txt does not exist"):
        train(cfg(f"output_dir={tmp_path / 'noval'}"))


def test_frozen_tensors_are_bit_identical_after_training(folder, tmp_path):
    """Train through the engine with a hook that captures the model: every frozen tensor is
    bit-identical afterwards, every trainable one changed."""
    from model import build_model
    from util.engine import train
    from util.stages import cat_sam as stage_module
    torch.manual_seed(2)
    sam = _sam_file(build_model(tiny_cfg(folder, "model.cat_sam.variant=zero_shot")), tmp_path / "sam_vit_tiny.pth")
    built = []
    spec = get_stage("cat_sam")

    def capture(cfg):
        model = stage_module.build(cfg)
        built.append(model)
        return model

    import dataclasses
    import util.engine as engine
    patched = dataclasses.replace(spec, build_model=capture)
    original = engine.get_stage
    engine.get_stage = lambda name: patched if name == "cat_sam" else original(name)
    try:
        from util.checkpoint import load_pretrained_parts
        cfg = tiny_cfg(folder, f"model.sam.checkpoint={sam}", "model.allow_random_init=false", "model.cat_sam.variant=a",
                       "train.cat_sam.epochs=3", "train.cat_sam.val_every=3", "train.select=last", "data.shot=0",
                       f"output_dir={tmp_path / 'run'}")
        torch.manual_seed(cfg.seed)          # the engine's initialisation
        reference = build_model(cfg)
        load_pretrained_parts(reference, cfg)
        before = _frozen_state(reference)
        train(cfg)
    finally:
        engine.get_stage = original
    (model,) = built
    trainable = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    after = model.state_dict()
    assert set(after) == set(before)
    changed = [k for k in after if not torch.equal(after[k].cpu(), before[k])]
    assert changed and set(changed) <= trainable
    frozen = [k for k in after if k not in trainable]
    assert frozen and all(torch.equal(after[k].cpu(), before[k]) for k in frozen)
    # the trainable tensors other than frozen-SAM all moved (AdamW with weight decay)
    assert {k for k in trainable if k in after} <= set(changed)


# -- the toy domain shift ---------------------------------------------------------------------------

def test_toy_is_deterministic_in_the_folder_format_and_reported(tmp_path):
    from util.cat_sam_data import build_eval_set, read_list
    from util.cat_sam_toy import prepare, table
    a = prepare(tmp_path / "a", seed=3, log=lambda *_: None)
    b = prepare(tmp_path / "b", seed=3, log=lambda *_: None)
    for name in ("train_1shot.txt", "val.txt", "test.txt"):
        entries = read_list(a / "target", name)
        assert [e.image.name for e in entries] == [e.image.name for e in read_list(b / "target", name)]
        for e in entries[:3]:
            assert e.image.read_bytes() == (b / "target" / e.image.relative_to(a / "target")).read_bytes()
    assert len(read_list(a / "target", "train_1shot.txt")) == 1 and len(read_list(a / "target", "test.txt")) == 50
    test = build_eval_set(tiny_cfg(a / "target"), "test.txt")
    assert sum(len(test[i]["boxes"]) == 0 for i in range(len(test))) == 8
    rows = [{"variant": v, "fg_iou": x, "image_iou": x, "point_fg_iou": x, "point_image_iou": x, "num_images": 50,
             "num_empty": 8} for v, x in (("zero_shot", 0.1), ("a", 0.8), ("a", 0.9))]
    text = table(rows)
    assert "CAT-SAM-A" in text and " 85.0 +-  7.1" in text and " 10.0 +-  0.0" in text


def test_public_api_from_the_kvasir_config(tmp_path):
    """load_config(kvasir.yaml, tiny numbers) -> build_model -> load_weights(official file) -> forward."""
    from model import build_model
    from util.checkpoint import load_weights
    tiny = ["model.cat_sam.variant=a", "model.sam.type=tiny", "model.sam.embed_dim=64", "model.sam.depth=2",
            "model.sam.num_heads=4", "model.sam.global_attn_indexes=[1]", "model.sam.img_size=64",
            "model.sam.window_size=2", "model.sam.out_chans=32"]
    cfg = load_config(ROOT / "config" / "cat_sam" / "kvasir.yaml", tiny)
    torch.manual_seed(0)
    source = build_model(cfg)
    file = _official(source, tmp_path / "kvasir_cat-a_vit-l_1shot.pth")
    model = build_model(cfg)
    load_weights(model, file)
    image = torch.rand(3, 50, 70) * 255
    boxes = torch.tensor([[5., 6., 30., 40.], [20., 10., 60., 45.]])
    kwargs = dict(images=[image], boxes=[boxes], points=[torch.tensor([[[10., 20.]], [[40., 30.]]])],
                  point_labels=[torch.ones(2, 1)], noisy_masks=[torch.zeros(2, 1, 16, 16)])
    with torch.no_grad():
        out, ref = model(**kwargs), source(**kwargs)
    assert out[0].shape == (2, 1, 50, 70) and torch.equal(out[0], ref[0])
    with pytest.raises(ValueError, match="global_attn_indexes .* depth 2"):
        build_model(load_config(ROOT / "config" / "cat_sam" / "kvasir.yaml", ["model.sam.depth=2"]))


def test_two_processes_keep_identical_weights(folder, tmp_path):
    """DDP (the engine's): each rank trains on its own samples, gradients are all-reduced (the
    original trained every rank under no_sync: its replicas diverged, SPEC_CAT_SAM 13)."""
    import os
    import subprocess
    import sys
    overrides = TINY + [f"data.root={folder}", "data.dataset=custom", "data.shot=0", "model.cat_sam.variant=a",
                        "train.cat_sam.epochs=2", "train.cat_sam.val_every=1", "train.cat_sam.batch_size=2",
                        "train.select=last", f"output_dir={tmp_path / 'run'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    str(ROOT / "tests" / "stage_ddp_worker.py"), str(tmp_path / "ranks"), *overrides],
                   cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    digests = [json.loads((tmp_path / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert digests[0]["step"] == digests[1]["step"] == 4           # 4 samples / 2 ranks / 1 per rank, 2 epochs
    assert digests[0]["initial"] == digests[1]["initial"]
    assert digests[0]["weights"] == digests[1]["weights"] != digests[0]["initial"]


def test_config_mistakes_are_config_errors(folder):
    from util.cat_sam_data import Augment, ObjectRules
    with pytest.raises(ConfigError, match="prompt_types"):
        Augment.from_config(tiny_cfg(folder, "train.cat_sam.prompt_types=[box, scribble]"))
    with pytest.raises(ConfigError, match="crop_area"):
        Augment.from_config(tiny_cfg(folder, "train.cat_sam.crop_area=[0.0, 1.0]"))
    with pytest.raises(ConfigError, match="connectivity"):
        ObjectRules.from_config(tiny_cfg(folder, "data.cat_sam.connectivity=6"))
    with pytest.raises(ConfigError, match="val or test"):
        get_stage("cat_sam").configure(tiny_cfg(folder, "train.cat_sam.select=train"))
    # train.select=last without val.txt: no validation set, no error
    (folder / "val.txt").unlink()
    data = get_stage("cat_sam").build_data(tiny_cfg(folder, "train.select=last"), lambda *_: None)
    assert len(data.val_set) == 0 and len(data.train_set) == 20      # 1 sample x val_every 20


def test_train_checkpoint_encoder_reaches_the_model(folder):
    from model import build_model
    from model.attention import SDPAAttention
    for flag in (False, True):
        model = build_model(tiny_cfg(folder, f"train.checkpoint_encoder={str(flag).lower()}",
                                     "model.sam.attention=sdpa"), "cat_sam")
        assert model.checkpoint_encoder is flag
        blocks = model.image_encoder.sam_img_encoder.blocks
        assert any(isinstance(b.attn, SDPAAttention) and b.window_size == 0 for b in blocks)
        assert [bool(getattr(b.attn, "checkpoint_chunks", False)) for b in blocks] == \
            [flag and b.window_size == 0 for b in blocks]
