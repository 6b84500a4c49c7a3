"""model.fastsam: the optional FastSAM proposer (SPEC_FASTSAM 5.4).

(a) Errors, with or without the extra: a missing weight file, a wrong suffix and a missing
    extra are clear errors naming the file / ``pip install -r requirements-fastsam.txt``, and no
    network connection is attempted (sockets are blocked and every attempt recorded).
(b) With the extra (skipped without it): a seeded random-weight YOLOv8s-seg saved as a FastSAM
    checkpoint (nothing downloaded) runs offline on a synthetic image; the refinement falls
    back to the model's mask exactly with zero proposals and returns a subset of proposals
    otherwise; runs are deterministic and cached; our point / box rules agree with
    ultralytics' own ``FastSAMPredictor.prompt``.
"""
from __future__ import annotations

import builtins
import re
import socket
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from model.fastsam import (EXTRA_FILE, FastSAMProposer, FastSAMUnavailable, FastSAMWeightsError, check_weights,
                           import_ultralytics)
from model.fastsam_select import mask_runs, select_by_box, select_by_mask, select_by_points, union_of
from tests.conftest import ROOT


@pytest.fixture()
def no_network(monkeypatch):
    """Every socket connection or name lookup raises; the attempts are recorded."""
    attempts = []

    def refuse(kind):
        def blocked(*args, **kwargs):
            attempts.append((kind, args[1:] if kind == "connect" else args[:1]))
            raise OSError(f"network blocked by the test ({kind})")
        return blocked

    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("connect"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    return attempts


# ---------------------------------------------------------------------------------------------
# (a) errors
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/nonexistent/dir/FastSAM-x.pt", "/nonexistent/foo.pt", "FastSAM-s.pt"])
def test_missing_weights_name_the_file(path, no_network):
    with pytest.raises(FastSAMWeightsError) as err:
        FastSAMProposer(path)
    message = str(err.value)
    assert "not found" in message and path in message
    assert "initmodel/FastSAM" in message and "FastSAM-s.pt" in message      # where to get them
    assert no_network == []


def test_wrong_suffix_and_directories_are_refused(tmp_path, no_network):
    for name in ("FastSAM-s.pth", "yolov8s-seg.yaml", "FastSAM-s"):
        path = tmp_path / name
        path.write_bytes(b"not a checkpoint")
        with pytest.raises(FastSAMWeightsError, match=re.escape(str(path))) as err:
            FastSAMProposer(path)
        assert ".pt" in str(err.value)
    (tmp_path / "dir.pt").mkdir()
    with pytest.raises(FastSAMWeightsError, match="is a directory"):
        check_weights(tmp_path / "dir.pt")
    renamed = tmp_path / "yolov5s.pt"          # ultralytics would swap it for yolov5su.pt and download that
    renamed.write_bytes(b"x")
    with pytest.raises(FastSAMWeightsError, match="rename"):
        check_weights(renamed)
    with pytest.raises(FastSAMWeightsError, match="no FastSAM weight file"):
        check_weights("")
    assert no_network == []


def _check_extra_message(err) -> None:
    assert isinstance(err.value, ImportError)
    assert f"pip install -r {EXTRA_FILE}" in str(err.value) and "AGPL-3.0" in str(err.value)


def test_missing_extra_via_sys_modules(tmp_path, monkeypatch, no_network):
    weights = tmp_path / "FastSAM-s.pt"
    weights.write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "ultralytics", None)        # "import ultralytics" raises ImportError
    with pytest.raises(FastSAMUnavailable) as err:
        FastSAMProposer(weights)
    _check_extra_message(err)
    with pytest.raises(ImportError):                             # catchable as a plain ImportError
        import_ultralytics()
    assert no_network == []


def test_missing_extra_via_import_hook(tmp_path, monkeypatch, no_network):
    weights = tmp_path / "FastSAM-s.pt"
    weights.write_bytes(b"x")
    for name in [m for m in sys.modules if m == "ultralytics" or m.startswith("ultralytics.")]:
        monkeypatch.delitem(sys.modules, name)                   # restored after the test
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "ultralytics" or name.startswith("ultralytics."):
            raise ModuleNotFoundError(f"No module named '{name}'", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(FastSAMUnavailable) as err:
        FastSAMProposer(weights)
    _check_extra_message(err)
    assert "No module named 'ultralytics'" in str(err.value)
    assert no_network == []


def test_only_model_fastsam_imports_ultralytics():
    """ultralytics (AGPL-3.0) is imported by model/fastsam.py alone, lazily: no other file of the
    project names it in an import, and importing the FastSAM modules does not load it."""
    pattern = re.compile(r"^\s*(import\s+ultralytics|from\s+ultralytics[\s.])", re.MULTILINE)
    allowed = {ROOT / "model" / "fastsam.py", ROOT / "tests" / "test_fastsam.py"}
    offenders = [str(path.relative_to(ROOT)) for path in ROOT.rglob("*.py")
                 if ".venv" not in path.parts and path not in allowed and pattern.search(path.read_text())]
    assert offenders == []
    code = ("import sys; import model.fastsam, model.fastsam_select, util.predictor; "
            "assert 'ultralytics' not in sys.modules, 'ultralytics imported at module level'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# ---------------------------------------------------------------------------------------------
# (b) offline end to end with a random-weight FastSAM-s (needs the extra)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def random_fastsam(tmp_path_factory):
    """A seeded random-weight FastSAM-s checkpoint (YOLOv8s-seg, nc=1, reg_max=26), built from
    ultralytics' packaged yaml: nothing is downloaded."""
    pytest.importorskip("ultralytics")
    from model.fastsam import save_random_fastsam
    root = tmp_path_factory.mktemp("fastsam")
    return save_random_fastsam(root / "FastSAM-s.pt", size="s", seed=0, config_dir=root / "config")


def synthetic_image(height: int = 256, width: int = 320) -> np.ndarray:
    rng = np.random.RandomState(0)
    image = np.full((height, width, 3), 90, np.uint8)
    image[40:160, 50:200] = (220, 40, 40)
    image[120:230, 180:300] = (30, 200, 60)
    return np.clip(image + rng.randint(0, 30, image.shape), 0, 255).astype(np.uint8)


def test_random_fastsam_zero_proposals_fall_back_exactly(random_fastsam, no_network):
    proposer = FastSAMProposer(random_fastsam, device="cpu")           # the paper's settings
    assert proposer.settings["imgsz"] == 1024 and proposer.settings["conf"] == 0.4
    assert proposer.settings["iou"] == 0.9 and proposer.settings["retina_masks"] is True
    image = synthetic_image()
    out = proposer.proposals(image)
    assert out["masks"].shape == (0, 256, 320) and out["masks"].dtype == torch.bool   # stock init: nothing >= 0.4
    assert out["boxes"].shape == (0, 4) and out["scores"].shape == (0,) and out["runs"].shape == (0, 4)
    prob = torch.zeros(256, 320)
    prob[40:160, 50:200] = 0.9
    model_mask = prob > 0.5
    model_mask[0, 0] = True                    # the model's own mask, whatever it is, comes back unchanged
    result = select_by_mask(out["masks"], prob, runs=out["runs"], model_mask=model_mask)
    assert result.fallback == "no proposals" and torch.equal(result.mask, model_mask)
    assert no_network == []
    assert "clip" not in sys.modules           # no text prompt, no CLIP


def test_random_fastsam_forced_proposals(random_fastsam, no_network):
    image = synthetic_image()
    proposer = FastSAMProposer(random_fastsam, conf=0.01)              # random class scores are ~0.01
    out = proposer.proposals(image)
    masks, n = out["masks"], out["masks"].shape[0]
    assert n == 300 and masks.shape == (300, 256, 320) and masks.dtype == torch.bool
    assert out["boxes"].shape == (300, 4) and out["scores"].shape == (300,)
    assert torch.all(out["scores"][:-1] >= out["scores"][1:]) and torch.all(out["scores"] >= 0.01)
    assert torch.equal(out["runs"], mask_runs(masks))
    # the probability of one proposal selects it (the proposals inside it are skipped as nested)
    k = int(torch.nonzero(masks.sum((1, 2)) > 0)[0])
    result = select_by_mask(masks, masks[k].float(), runs=out["runs"], purity=1.0)   # only masks inside k
    assert result.fallback == "" and set(result.indices.tolist()) <= set(range(n)) and k in result.indices
    assert torch.equal(result.mask, union_of(masks, result.indices)) and torch.equal(result.mask, masks[k])
    # an arbitrary probability: a union of a subset of proposals, or the model's mask exactly
    prob = torch.zeros(256, 320)
    prob[40:160, 50:200] = 0.9
    result = select_by_mask(masks, prob, runs=out["runs"], purity=0.5, guard_iou=0.3)
    if result.fallback:
        assert torch.equal(result.mask, prob > 0.5)
    else:
        assert torch.equal(result.mask, union_of(masks, result.indices))
    # cached: the network ran once; a cleared cache and a second proposer give identical outputs
    assert proposer.network_calls == 1
    again = proposer.proposals(image.copy())
    assert proposer.network_calls == 1 and proposer.cache_hits == 1
    proposer.clear_cache()
    rerun = proposer.proposals(image)
    other = FastSAMProposer(random_fastsam, conf=0.01, cache_mb=0).proposals(image)
    assert proposer.network_calls == 2
    for key in out:
        assert torch.equal(out[key], again[key]) and torch.equal(out[key], rerun[key])
        assert torch.equal(out[key], other[key])
    # retina_masks=False: computed at the input size, returned at the image's size
    coarse = FastSAMProposer(random_fastsam, conf=0.01, retina_masks=False, imgsz=320).proposals(image)
    assert coarse["masks"].shape[1:] == (256, 320) and coarse["masks"].dtype == torch.bool
    assert no_network == []


def test_bad_images_are_refused(random_fastsam):
    from model.fastsam import FastSAMInputError
    proposer = FastSAMProposer(random_fastsam)
    for bad in (np.zeros((10, 10), np.uint8), np.zeros((10, 10, 3), np.float32), torch.zeros(10, 10, 3)):
        with pytest.raises(FastSAMInputError, match="image"):
            proposer.proposals(bad)


# ---------------------------------------------------------------------------------------------
# Parity of our point / box rules with ultralytics' FastSAMPredictor.prompt (SPEC 5.4.1)
# ---------------------------------------------------------------------------------------------

def ultralytics_prompt(masks: torch.Tensor, **prompts) -> list:
    """The indices ultralytics 8.4's ``FastSAMPredictor.prompt`` keeps, on a Results built from
    ``masks`` (N x H x W bool). Box confidences encode the mask index."""
    import_ultralytics()
    from ultralytics.engine.results import Results
    from ultralytics.models.fastsam import FastSAMPredictor

    n, h, w = masks.shape
    boxes = torch.zeros(n, 6)
    boxes[:, 2:4] = 1.0
    boxes[:, 4] = (torch.arange(n) + 1) / (n + 1)          # conf = (index + 1) / (n + 1)
    result = Results(orig_img=np.zeros((h, w, 3), np.uint8), path="parity", names={0: "object"}, boxes=boxes,
                     masks=masks.to(torch.uint8))
    predictor = types.SimpleNamespace(device=torch.device("cpu"))   # prompt() only reads .device
    kept = FastSAMPredictor.prompt(predictor, result, **prompts)[0]
    return sorted(int(round(c * (n + 1))) - 1 for c in kept.boxes.conf.tolist())


def test_parity_with_ultralytics_on_the_spec_masks():
    pytest.importorskip("ultralytics")
    from tests.test_fastsam_select import spec_masks
    masks = spec_masks()
    for points, labels in ([[[30, 30]], [1]], [[[60, 60]], [1]], [[[30, 30], [60, 60]], [1, 0]],
                           [[[60, 60], [30, 30]], [0, 1]], [[[30, 30], [50, 5]], [1, 1]], [[[60, 60]], [0]]):
        assert sorted(select_by_points(masks, points, labels).tolist()) == \
            ultralytics_prompt(masks, points=points, labels=labels)
    for box in ([15, 15, 55, 55], [0, 0, 100, 100], [35, 35, 75, 75], [0, 0, 100, 12]):
        assert select_by_box(masks, [box]).tolist() == ultralytics_prompt(masks, bboxes=[box])


def test_parity_with_ultralytics_on_random_proposals(random_fastsam):
    image = synthetic_image()
    out = FastSAMProposer(random_fastsam, conf=0.01).proposals(image)
    masks = out["masks"][::7]            # 43 overlapping proposals of a real (random-weight) network
    assert masks.shape[0] > 10
    h, w = masks.shape[1:]
    g = torch.Generator().manual_seed(0)
    for trial in range(12):
        count = 1 + trial % 4
        points = torch.stack([torch.randint(0, w, (count,), generator=g),
                              torch.randint(0, h, (count,), generator=g)], 1).tolist()
        labels = torch.randint(0, 2, (count,), generator=g).tolist()
        assert sorted(select_by_points(masks, points, labels).tolist()) == \
            ultralytics_prompt(masks, points=points, labels=labels)
        x1, x2 = sorted(torch.randint(0, w, (2,), generator=g).tolist())
        y1, y2 = sorted(torch.randint(0, h, (2,), generator=g).tolist())
        boxes = [[x1, y1, x2 + 1, y2 + 1], [0, 0, w, h]]
        assert select_by_box(masks, boxes, runs=mask_runs(masks)).tolist() == ultralytics_prompt(masks, bboxes=boxes)


def test_cache_bound_and_lru(random_fastsam):
    """The per-image cache: keyed by the image bytes, LRU within cache_mb, off at cache_mb=0."""
    calls = []

    def fake_predict(image):
        calls.append(int(image[0, 0, 0]))
        n = int(image[0, 0, 1])                   # proposals to fake
        masks = torch.zeros(n, 512, 512, dtype=torch.bool)
        return {"masks": masks, "boxes": torch.zeros(n, 4), "scores": torch.zeros(n), "runs": mask_runs(masks)}

    def image(tag: int, n: int = 0) -> np.ndarray:
        picture = np.zeros((512, 512, 3), np.uint8)
        picture[0, 0] = (tag, n, 0)
        return picture

    off = FastSAMProposer(random_fastsam, cache_mb=0)
    off._predict = fake_predict
    off.proposals(image(1))
    off.proposals(image(1))                       # 0 proposals: still not cached when the cache is off
    assert calls == [1, 1] and off.cache_hits == 0
    calls.clear()
    # each 4-proposal entry holds 4 x 512 x 512 bool = 1 MiB (+ boxes, scores, runs, 1 KiB): 2 fit in 2.5 MiB
    lru = FastSAMProposer(random_fastsam, cache_mb=2.5)
    lru._predict = fake_predict
    for tag in (1, 2, 1, 3, 1, 2):
        lru.proposals(image(tag, 4))
    # 1 miss, 2 miss, 1 hit, 3 miss (evicts 2), 1 hit, 2 miss (evicts 3)
    assert calls == [1, 2, 3, 2] and lru.cache_hits == 2
    big = FastSAMProposer(random_fastsam, cache_mb=0.5)   # an entry larger than the bound is not kept
    big._predict = fake_predict
    big.proposals(image(5, 4))
    big.proposals(image(5, 4))
    assert calls[-2:] == [5, 5] and big.cache_hits == 0


FRESH_PROCESS = r"""
import json, socket, sys
attempts = []
def blocked(kind):
    def refuse(*args, **kwargs):
        attempts.append(kind)
        raise OSError("network blocked by the test")
    return refuse
socket.socket.connect = blocked("connect")
socket.socket.connect_ex = blocked("connect_ex")
socket.getaddrinfo = blocked("getaddrinfo")
socket.create_connection = blocked("create_connection")
import numpy as np
from model.fastsam import FastSAMProposer, save_random_fastsam
weights = save_random_fastsam(sys.argv[1] + "/FastSAM-s.pt", config_dir=sys.argv[1] + "/config")
out = FastSAMProposer(weights, imgsz=320, conf=0.01).proposals(np.zeros((64, 96, 3), np.uint8))
import ultralytics.utils as u
print(json.dumps({"attempts": attempts, "n": int(out["masks"].shape[0]), "online": bool(u.ONLINE),
                  "clip": "clip" in sys.modules, "settings": str(u.SETTINGS_FILE)}))
"""


def test_fresh_process_makes_no_connection_attempt(random_fastsam, tmp_path):
    """From the first ``import ultralytics`` (offline switches set before it) to a prediction,
    a fresh process with every socket call blocked records no attempt."""
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(tmp_path)], cwd=ROOT, check=True,
                          capture_output=True, text=True)
    import json
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["attempts"] == [] and report["online"] is False and report["clip"] is False
    assert report["n"] > 0
    assert report["settings"] == str(tmp_path / "config" / "Ultralytics" / "settings.json")


def test_importing_the_extra_leaves_pil_and_torch_save_alone(tmp_path):
    """ultralytics replaces PIL.Image.open (a corrupt image then tries to install pi-heif) and
    torch.save; import_ultralytics puts the originals back, so a corrupt mask stays a DataError."""
    pytest.importorskip("ultralytics")
    from PIL import Image
    from model.fastsam import import_ultralytics
    from util.io import DataError, read_mask
    patches = import_ultralytics().utils.patches
    assert Image.open is patches._image_open and torch.save is patches._torch_save
    Image.open, torch.save = patches.image_open, patches.torch_save      # as right after a plain import
    try:
        import_ultralytics()
        assert Image.open is patches._image_open and torch.save is patches._torch_save
    finally:
        Image.open, torch.save = patches._image_open, patches._torch_save
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match="bad.png"):
        read_mask(bad)
