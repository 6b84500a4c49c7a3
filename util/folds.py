"""Class names and fold splits of PASCAL-5i, COCO-20i, the toy benchmark and custom datasets.

Class ids are the values in the masks: 1..N (0 background, 255 ignore). A fold's *novel*
classes are held out of training; its *base* classes, sorted, give the base learner's
channels: base class c -> channel ``base.index(c) + 1`` (0 = background).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from util.config import ConfigError

PASCAL_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)

# COCO's 80 categories in the order of their category ids (1..90 with gaps) -> mask ids 1..80.
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)


@dataclass(frozen=True)
class Fold:
    """The classes of one fold. ``base`` and ``novel`` hold class ids (1..N), sorted."""

    class_names: tuple[str, ...]
    base: tuple[int, ...]
    novel: tuple[int, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_base_channels(self) -> int:
        """Channels of the base learner: the base classes plus background."""
        return len(self.base) + 1

    def base_channel(self, class_id: int) -> int:
        """Base-learner channel of a base class (1..len(base)); 0 for a novel class."""
        return self.base.index(class_id) + 1 if class_id in self.base else 0

    def name(self, class_id: int) -> str:
        return self.class_names[class_id - 1]


def pascal_fold(split: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """PASCAL-5i: fold i holds out classes 5i+1..5i+5."""
    _check_split(split, 4)
    novel = tuple(range(5 * split + 1, 5 * split + 6))
    base = tuple(c for c in range(1, 21) if c not in novel)
    return base, novel


def coco_fold(split: int, use_split_coco: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """COCO-20i. ``use_split_coco`` (all original configs): novel = i+1, i+5, ..., i+77;
    otherwise novel = 20i+1..20i+20."""
    _check_split(split, 4)
    if use_split_coco:
        novel = tuple(range(split + 1, 81, 4))
    else:
        novel = tuple(range(20 * split + 1, 20 * split + 21))
    base = tuple(c for c in range(1, 81) if c not in novel)
    return base, novel


def _check_split(split: int, num_splits: int) -> None:
    if not isinstance(split, int) or not 0 <= split < num_splits:
        raise ConfigError(f"data.split must be an integer in 0..{num_splits - 1}, got {split!r}")


def make_fold(data_cfg: Mapping, class_names: Sequence[str] | None = None) -> Fold:
    """The fold described by a config's ``data`` section.

    ``class_names`` is needed for ``custom`` datasets whose names come from the folders
    (see :func:`util.dataset.custom_class_names`); other datasets have fixed names.
    """
    dataset = data_cfg["dataset"]
    split = data_cfg["split"]
    if dataset in ("pascal", "toy"):
        base, novel = pascal_fold(split)
        if dataset == "pascal":
            names = PASCAL_CLASSES
        else:
            from util.toy import TOY_CLASS_NAMES
            names = tuple(TOY_CLASS_NAMES)
        return Fold(tuple(names), base, novel)
    if dataset == "coco":
        base, novel = coco_fold(split, data_cfg["use_split_coco"])
        return Fold(COCO_CLASSES, base, novel)
    if dataset == "custom":
        names = tuple(class_names if class_names is not None else data_cfg["class_names"])
        if not names:
            raise ConfigError("data.class_names is empty for a custom dataset; list the class folders "
                             "or let util.dataset.custom_class_names read them from data.root")
        folds = data_cfg["fold_classes"]
        if not folds:
            raise ConfigError("data.fold_classes is empty: a custom dataset needs, per fold, the list of "
                             "novel class names (e.g. data.fold_classes=[[cat,dog],[car,bus]])")
        _check_split(split, len(folds))
        unknown = [n for n in folds[split] if n not in names]
        if unknown:
            raise ConfigError(f"data.fold_classes[{split}] names classes that do not exist: {unknown}; "
                             f"known classes: {list(names)}")
        novel = tuple(sorted(names.index(n) + 1 for n in folds[split]))
        base = tuple(c for c in range(1, len(names) + 1) if c not in novel)
        return Fold(names, base, novel)
    from util.weakshot_benchmarks import BENCHMARKS, benchmark_fold
    if dataset in BENCHMARKS:   # weak-shot only (COCO-Stuff-10K, ADE20K): label value 0 is a class
        return benchmark_fold(data_cfg)
    raise ConfigError(f"data.dataset must be one of pascal, coco, toy, custom, {', '.join(BENCHMARKS)}; "
                      f"got {dataset!r}")
