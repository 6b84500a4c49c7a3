"""python -m util.prepare {kvasir,whu,sbu}: synthetic trees in the original CAT-SAM layout ->
generic lists with the original's splits and fixed few-shot samples (SPEC_CAT_SAM 7, 8)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from util import cat_sam_prepare as cp
from util import prepare
from util.io import DataError


def _write(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _pair(image_dir: Path, mask_dir: Path, stem: str, image_ext: str = ".png", mask_ext: str = ".png",
          mask_values=(0, 255)) -> None:
    _write(image_dir / f"{stem}{image_ext}", np.full((8, 10, 3), 90, np.uint8))
    mask = np.full((8, 10), mask_values[0], np.uint8)
    mask[2:5, 3:7] = mask_values[1]
    _write(mask_dir / f"{stem}{mask_ext}", mask)


def make_tree(root: Path, dataset: str, *, extra_train=("a1", "a2"), test=("t1", "t2"), drop=()) -> Path:
    """The original layout with the 16 fixed samples (minus ``drop``) plus ``extra_train`` in train."""
    layout = cp.LAYOUTS[dataset]
    exts = {"whu": (".tif", ".tif"), "kvasir": (".png", ".png"), "sbu": (".jpg", ".png")}[dataset]
    values = {"whu": (0, 255), "kvasir": (0, 255), "sbu": (0, 40)}[dataset]   # SBU: foreground > 0
    for stem in [s for s in cp.SIXTEEN_SHOT[dataset] if s not in drop] + list(extra_train):
        _pair(root / layout["train"].images, root / layout["train"].masks, stem, *exts, mask_values=values)
    for stem in test:
        _pair(root / layout["test"].images, root / layout["test"].masks, stem, *exts, mask_values=values)
    return root


def read_list(path: Path):
    return [line.split() for line in path.read_text().splitlines()]


@pytest.mark.parametrize("dataset", cp.DATASETS)
def test_lists_written_with_fixed_samples(tmp_path, dataset):
    root = make_tree(tmp_path / dataset, dataset)
    assert prepare.main([dataset, "--root", str(root), "--binarize"]) == 0
    for name in ("train", "test", "train_1shot", "train_16shot"):
        assert (root / f"{name}.txt").is_file()
    assert not (root / "val.txt").exists()
    train, test = read_list(root / "train.txt"), read_list(root / "test.txt")
    assert len(train) == 18 and len(test) == 2
    one, sixteen = read_list(root / "train_1shot.txt"), read_list(root / "train_16shot.txt")
    assert [Path(img).stem for img, _ in one] == [cp.ONE_SHOT[dataset]]
    assert [Path(img).stem for img, _ in sixteen] == list(cp.SIXTEEN_SHOT[dataset])   # the SPEC's order
    assert cp.ONE_SHOT[dataset] in cp.SIXTEEN_SHOT[dataset]
    for img, msk in train + test:                         # every line: two existing files, relative to root
        assert len(img.split()) == 1 and not Path(img).is_absolute()
        assert (root / img).is_file() and (root / msk).is_file()
        assert Path(img).stem == Path(msk).stem
        mask = np.asarray(Image.open(root / msk))
        assert set(np.unique(mask)) == {0, 255} and (mask > 127).sum() == 12   # 0/255 with the original threshold
    assert all(Path(img).stem.startswith("t") for img, _ in test)


def test_sbu_binarisation_uses_the_original_threshold(tmp_path):
    root = make_tree(tmp_path / "sbu", "sbu")
    prepare.main(["sbu", "--root", str(root), "--binarize"])
    img, msk = read_list(root / "train_1shot.txt")[0]
    assert msk == "masks_binary/train/lssd1109.png"
    assert (np.asarray(Image.open(root / msk)) > 127).sum() == 12      # the value-40 pixels are foreground (> 0)


def test_no_binarize_lists_original_masks(tmp_path):
    root = make_tree(tmp_path / "kv", "kvasir")
    prepare.main(["kvasir", "--root", str(root)])
    img, msk = read_list(root / "train_1shot.txt")[0]
    assert (img, msk) == ("TrainDataset/image/cju0roawvklrq0799vmjorwfv.png",
                          "TrainDataset/masks/cju0roawvklrq0799vmjorwfv.png")
    assert not (root / "masks_binary").exists()


def test_val_holds_out_non_fixed_train_images(tmp_path):
    root = make_tree(tmp_path / "kv", "kvasir", extra_train=("a1", "a2", "a3", "a4"))
    assert prepare.main(["kvasir", "--root", str(root), "--val", "2"]) == 0
    val = [Path(img).stem for img, _ in read_list(root / "val.txt")]
    train = [Path(img).stem for img, _ in read_list(root / "train.txt")]
    assert len(val) == 2 and set(val) <= {"a1", "a2", "a3", "a4"} and not set(val) & set(train)
    assert len(train) == 18 and set(cp.SIXTEEN_SHOT["kvasir"]) <= set(train)
    first = (root / "val.txt").read_text()
    prepare.main(["kvasir", "--root", str(root), "--val", "2"])
    assert (root / "val.txt").read_text() == first                  # fixed seed
    with pytest.raises(DataError, match="--val 9"):
        cp.prepare("kvasir", root, val=9)


def test_kvasir_leaves_out_digit_stems_and_other_test_folders(tmp_path):
    root = make_tree(tmp_path / "kv", "kvasir", extra_train=("a1", "123", "45"))
    _pair(root / "TestDataset/CVC-300/images", root / "TestDataset/CVC-300/masks", "other")
    prepare.main(["kvasir", "--root", str(root)])
    stems = [Path(img).stem for img, _ in read_list(root / "train.txt")]
    assert "123" not in stems and "45" not in stems and "a1" in stems and len(stems) == 17
    assert [Path(img).stem for img, _ in read_list(root / "test.txt")] == ["t1", "t2"]
    assert (root / "TrainDataset/image/123.png").is_file()        # nothing deleted


def test_whu_test_is_val_split_and_spaces_go_through_a_link(tmp_path):
    root = make_tree(tmp_path / "whu", "whu")
    _pair(root / cp.WHU_TILES / "test/image", root / cp.WHU_TILES / "test/label", "unused", ".tif", ".tif")
    out = tmp_path / "lists out"
    assert prepare.main(["whu", "--root", str(root), "--out", str(out), "--val", "0"]) == 0
    test = read_list(out / "test.txt")
    assert [line[0] for line in test] == ["whu_tiles/val/image/t1.tif", "whu_tiles/val/image/t2.tif"]
    assert (out / "whu_tiles").is_symlink() and (out / test[0][1]).is_file()
    train = read_list(out / "train.txt")
    assert [Path(img).stem for img, _ in train][:3] == ["168", "515", "807"]      # natural order
    # rerunning keeps the link
    assert prepare.main(["whu", "--root", str(root), "--out", str(out), "--val", "0"]) == 0


def test_out_dir_paths_relative_to_out(tmp_path):
    root = make_tree(tmp_path / "sbu", "sbu")
    out = tmp_path / "generic"
    prepare.main(["sbu", "--root", str(root), "--out", str(out), "--val", "0"])
    img, msk = read_list(out / "train_1shot.txt")[0]
    assert img == "../sbu/SBU-shadow/SBUTrain4KRecoveredSmall/ShadowImages/lssd1109.jpg"
    assert (out / img).is_file() and (out / msk).is_file()
    assert not (root / "train.txt").exists()


def test_missing_root_and_folders_are_named(tmp_path, capsys):
    assert prepare.main(["kvasir", "--root", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "nothing" in err and "TrainDataset.zip" in err and "PraNet" in err
    (tmp_path / "sbu").mkdir()
    with pytest.raises(DataError, match=r"SBUTrain4KRecoveredSmall/ShadowImages.*SBU-shadow\.zip.*stonybrook"):
        cp.prepare("sbu", tmp_path / "sbu")
    root = make_tree(tmp_path / "whu", "whu")
    import shutil
    shutil.rmtree(root / cp.WHU_TILES / "val" / "label")
    with pytest.raises(DataError, match=r"val/label.*gpcv\.whu\.edu\.cn"):
        cp.prepare("whu", root)


def test_missing_fixed_sample_and_missing_mask_are_named(tmp_path):
    root = make_tree(tmp_path / "sbu", "sbu", drop=("lssd610",))
    with pytest.raises(DataError, match=r"16-shot sample\(s\) lssd610 are not in the train split"):
        cp.prepare("sbu", root)
    root = make_tree(tmp_path / "kv", "kvasir", drop=(cp.ONE_SHOT["kvasir"],))
    with pytest.raises(DataError, match=r"1-shot sample\(s\) cju0roawvklrq0799vmjorwfv"):
        cp.prepare("kvasir", root)
    root = make_tree(tmp_path / "kv2", "kvasir")
    (root / "TrainDataset/masks/a2.png").unlink()
    with pytest.raises(DataError, match=r"no mask for image .*TrainDataset/image/a2\.png"):
        cp.prepare("kvasir", root)
    for name in ("train", "test", "train_1shot", "train_16shot"):     # nothing written on an error
        assert not (root / f"{name}.txt").exists()
