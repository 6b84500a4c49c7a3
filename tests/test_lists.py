"""List rules (SPEC 3.2) on a small synthetic VOC tree with known answers, and their cache."""
import json

import pytest

from tests.conftest import write_voc_tree
from util.folds import make_fold
from util.lists import (build_fold_list, check_expected_counts, class_pixel_counts, read_pair_list)

FOLD0 = make_fold({"dataset": "pascal", "split": 0, "use_split_coco": True})   # novel 1..5

# id -> rectangles (class, y0, y1, x0, x1); pixel counts in the comments
IMAGES = {
    "a": (40, 40, [(6, 0, 10, 0, 20)]),                              # 6:200
    "b": (40, 40, [(6, 0, 10, 0, 20), (1, 20, 25, 0, 10)]),          # 6:200, novel 1:50
    "c": (40, 40, [(7, 0, 5, 0, 10)]),                               # 7:50 (too small)
    "d": (40, 40, [(1, 0, 15, 0, 20)]),                              # novel 1:300
    "e": (40, 40, [(2, 0, 15, 0, 20), (3, 20, 26, 0, 10)]),          # novel 2:300, novel 3:60
    "f": (40, 40, [(8, 0, 10, 0, 15), (9, 20, 30, 0, 12)]),          # 8:150, 9:120
    "g": (40, 40, [(255, 0, 10, 0, 10)]),                            # ignore only
}


@pytest.fixture()
def entries(tmp_path):
    root = write_voc_tree(tmp_path / "voc", IMAGES, sorted(IMAGES), sorted(IMAGES))
    pairs = read_pair_list(root / "lists" / "train_aug.txt", "data.train_list")
    return class_pixel_counts(pairs, root, tmp_path / "cache" / "counts.json", progress=False)


def ids(fold_list):
    return [e.image.split("/")[1][0] for e in fold_list.entries]


def test_pixel_counts(entries):
    counts = {e.image.split("/")[1][0]: e.class_pixels for e in entries}
    assert counts["b"] == {6: 200, 1: 50} and counts["e"] == {2: 300, 3: 60} and counts["g"] == {}


def test_train_rules_with_and_without_the_novel_filter(entries):
    train = build_fold_list(entries, FOLD0, "train", min_pixels=100, drop_novel=True)
    assert ids(train) == ["a", "f"] and train.dropped == 5
    assert train.classes == [[6], [8, 9]]
    assert {c: len(v) for c, v in train.pools.items() if v} == {6: 1, 8: 1, 9: 1}
    keep = build_fold_list(entries, FOLD0, "train", min_pixels=100, drop_novel=False)
    assert ids(keep) == ["a", "b", "f"]
    assert keep.classes[1] == [6]                     # the novel class is never an episode class in training
    assert [keep.entries[i].image[-5] for i in keep.pools[6]] == ["a", "b"]


def test_val_rules(entries):
    val = build_fold_list(entries, FOLD0, "val", min_pixels=100)
    assert ids(val) == ["d", "e"]
    assert val.classes == [[1], [2, 3]]               # episode classes: any size
    assert val.pools[1] == [0] and val.pools[2] == [1] and val.pools[3] == []   # pools: >= min_pixels


def test_threshold_is_inclusive(entries):
    val = build_fold_list(entries, FOLD0, "val", min_pixels=60)
    assert val.pools[3] == [1]


def test_counts_are_cached_and_rebuilt_for_another_list(tmp_path, entries):
    root = tmp_path / "voc"
    pairs = read_pair_list(root / "lists" / "train_aug.txt", "data.train_list")

    def exploding_reader(path):
        raise AssertionError("the cache should have been used")
    again = class_pixel_counts(pairs, root, tmp_path / "cache" / "counts.json", exploding_reader, progress=False)
    assert [e.class_pixels for e in again] == [e.class_pixels for e in entries]
    with pytest.raises(AssertionError, match="cache should"):
        class_pixel_counts(pairs[:3], root, tmp_path / "cache" / "counts.json", exploding_reader, progress=False)
    # a corrupt cache is rebuilt, not trusted
    (tmp_path / "cache" / "counts.json").write_text("{not json")
    rebuilt = class_pixel_counts(pairs, root, tmp_path / "cache" / "counts.json", progress=False)
    assert [e.class_pixels for e in rebuilt] == [e.class_pixels for e in entries]
    assert json.loads((tmp_path / "cache" / "counts.json").read_text())["counts"][0] == {"6": 200}


def test_expected_pascal_counts_warning():
    assert check_expected_counts("pascal", "train", 0, 4208, use_split_coco=True, drop_novel=True,
                                 min_pixels=2048) is None
    warning = check_expected_counts("pascal", "val", 2, 590, use_split_coco=True, drop_novel=True, min_pixels=2048)
    assert "590" in warning and "592" in warning
    # other settings are not comparable: no warning
    assert check_expected_counts("pascal", "train", 0, 5000, use_split_coco=True, drop_novel=False,
                                 min_pixels=2048) is None
    assert "21917" in check_expected_counts("coco", "train", 0, 1, use_split_coco=True, drop_novel=True,
                                            min_pixels=2048)


def test_prepare_pascal_lists_from_voc_layout(tmp_path):
    from util.lists import pascal_pair_lists
    root = write_voc_tree(tmp_path / "voc", IMAGES, [], [])
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("d\ne\n")
    (root / "JPEGImages" / "g.jpg").unlink()          # a mask without its image is not listed
    lists = pascal_pair_lists(root)
    assert lists["val"] == [("JPEGImages/d.jpg", "SegmentationClassAug/d.png"),
                            ("JPEGImages/e.jpg", "SegmentationClassAug/e.png")]
    assert [p[0] for p in lists["train_aug"]] == [f"JPEGImages/{i}.jpg" for i in "abcf"]
    (root / "SegmentationClassAug" / "e.png").unlink()
    from util.io import DataError
    with pytest.raises(DataError, match="VOC val masks are missing"):
        pascal_pair_lists(root)
