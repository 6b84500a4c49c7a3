"""A corrupt image read by a DataLoader worker (data.num_workers > 0) ends the command with the
same one-line error, naming the file, as when the main process reads it -- not with the
worker's traceback that PyTorch re-raises in the main process."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import ROOT, data_overrides, small_voc_images, write_voc_tree
from util.io import DataError, worker_error_message

CONFIG = ROOT / "config" / "base.yaml"
TINY = ["device=cpu", "model.backbone_width=8", "model.backbone_blocks=[1,1,1,1]", "model.rspg.reduce_dim=16",
        "model.base_learner.hidden_dim=16", "model.sam.img_size=64", "model.sam.patch_size=8",
        "model.sam.embed_dim=16", "model.sam.depth=2", "model.sam.num_heads=2", "model.sam.global_attn_indexes=[1]",
        "model.sam.out_chans=32", "model.decoder.num_heads=4", "model.allow_random_init=true",
        "model.backbone_checkpoint=''", "model.base_learner.checkpoint=''", "model.rspg.checkpoint=''",
        "model.sam.checkpoint=''"]
CORRUPT = "c06_0"     # a base class of fold 0 (read by stage base) ...
QUERY = "c01_0"       # ... and the first query of the fold-0 test episodes


@pytest.fixture()
def tree(tmp_path):
    """A VOC tree whose training list holds 4 base-class images, one of them a corrupt JPEG, and
    whose first test query is a corrupt JPEG."""
    images = small_voc_images(num_per_class=3)
    train_ids = [CORRUPT, "c06_1", "c07_0", "c07_1"]
    val_ids = sorted(images)
    root = write_voc_tree(tmp_path / "voc", images, train_ids, val_ids)
    for name in (CORRUPT, QUERY):
        (root / "JPEGImages" / f"{name}.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated JPEG")
    return root


def assert_one_line_error(code: int, err: str, image: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err and "DataLoader worker" not in err, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    assert errors[0] == f"error: cannot read image {image}: the file is corrupt or not an image", err


def test_training_loader_worker_error_is_one_line(tree, tmp_path, capsys):
    import train
    overrides = data_overrides(tree, tmp_path / "cache", **{"data.num_workers": 2}) + TINY + [
        "train.stage=base", "train.base.crop_size=65", "train.base.val_size=65", "train.base.batch_size=2",
        "train.base.epochs=1", "train.iters_per_epoch=2", f"output_dir={tmp_path / 'run'}"]
    code = train.main([str(CONFIG), *overrides])
    assert_one_line_error(code, capsys.readouterr().err, str(tree / "JPEGImages" / f"{CORRUPT}.jpg"))


def test_evaluation_loader_worker_error_is_one_line(tree, tmp_path, capsys):
    import test as test_py
    from model import build_model
    from util.checkpoint import checkpoint_payload, save_checkpoint
    from util.config import load_config
    overrides = data_overrides(tree, tmp_path / "cache", **{"data.num_workers": 2}) + TINY
    torch.manual_seed(0)
    model = build_model(load_config(CONFIG, overrides), "sam_rsp")
    weights = save_checkpoint(checkpoint_payload(model, stage="sam_rsp"), tmp_path / "sam_rsp.pth")
    code = test_py.main([str(CONFIG), *overrides, f"weights={weights}", f"output_dir={tmp_path / 'test'}",
                         "eval.seeds=[1]", "eval.episodes=4", "eval.batch_size=1", "eval.query_order=sequential"])
    assert_one_line_error(code, capsys.readouterr().err, str(tree / "JPEGImages" / f"{QUERY}.jpg"))


def test_wrapped_worker_message_is_reduced_to_the_original():
    """What torch's ExceptionWrapper.reraise hands the exception class in the main process."""
    from torch._utils import ExceptionWrapper
    try:
        raise DataError("cannot read image /data/x.jpg: the file is corrupt or not an image")
    except DataError:
        wrapper = ExceptionWrapper(where="in DataLoader worker process 1")
    with pytest.raises(DataError) as err:
        wrapper.reraise()
    assert str(err.value) == "cannot read image /data/x.jpg: the file is corrupt or not an image"
    assert worker_error_message("plain message") == "plain message"
    wrapped = ("Caught FileNotFoundError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
               "last):\n  File \"x.py\", line 1, in f\nFileNotFoundError: no such list: a.txt\n")
    assert worker_error_message(wrapped) == "no such list: a.txt"
