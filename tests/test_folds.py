"""Fold class sets of PASCAL-5i and COCO-20i (both conventions) and base-learner channels."""
import pytest

from util.folds import COCO_CLASSES, PASCAL_CLASSES, coco_fold, make_fold, pascal_fold


def test_pascal_folds():
    assert pascal_fold(0) == (tuple(range(6, 21)), (1, 2, 3, 4, 5))
    assert pascal_fold(2)[1] == (11, 12, 13, 14, 15)
    assert pascal_fold(2)[0] == tuple(range(1, 11)) + tuple(range(16, 21))
    assert pascal_fold(3) == (tuple(range(1, 16)), (16, 17, 18, 19, 20))
    for k in range(4):
        base, novel = pascal_fold(k)
        assert sorted(base + novel) == list(range(1, 21))


def test_coco_split_conventions():
    base, novel = coco_fold(0, use_split_coco=True)      # FWB: 1, 5, 9, ..., 77
    assert novel == tuple(range(1, 78, 4)) and len(novel) == 20 and novel[-1] == 77
    assert coco_fold(3, True)[1] == tuple(range(4, 81, 4))
    assert coco_fold(1, True)[1][:3] == (2, 6, 10)
    assert coco_fold(0, use_split_coco=False)[1] == tuple(range(1, 21))
    assert coco_fold(2, False)[1] == tuple(range(41, 61))
    for k in range(4):
        for fwb in (True, False):
            base, novel = coco_fold(k, fwb)
            assert len(base) == 60 and sorted(base + novel) == list(range(1, 81)) and list(base) == sorted(base)


def test_base_channels_and_names():
    fold = make_fold({"dataset": "pascal", "split": 1, "use_split_coco": True})
    assert fold.num_base_channels == 16
    assert fold.base_channel(1) == 1 and fold.base_channel(11) == 6 and fold.base_channel(6) == 0
    assert fold.name(15) == "person" and len(PASCAL_CLASSES) == 20
    coco = make_fold({"dataset": "coco", "split": 0, "use_split_coco": True})
    assert coco.num_base_channels == 61 and coco.base_channel(2) == 1 and coco.base_channel(80) == 60
    assert len(COCO_CLASSES) == 80 and coco.name(1) == "person" and coco.name(80) == "toothbrush"


def test_custom_fold_and_errors():
    data = {"dataset": "custom", "split": 1, "use_split_coco": True, "class_names": [],
            "fold_classes": [["cat"], ["dog", "bus"]]}
    fold = make_fold(data, ["bus", "cat", "dog", "eel"])
    assert fold.novel == (1, 3) and fold.base == (2, 4)
    with pytest.raises(ValueError, match="do not exist"):
        make_fold({**data, "fold_classes": [["cat"], ["fox"]]}, ["bus", "cat", "dog"])
    with pytest.raises(ValueError, match="fold_classes is empty"):
        make_fold({**data, "fold_classes": []}, ["bus", "cat"])
    with pytest.raises(ValueError, match="data.split"):
        make_fold({"dataset": "pascal", "split": 4, "use_split_coco": True})
