"""The original SimFormer benchmarks (SPEC_SIMFORMER 2): COCO-Stuff-10K and ADE20K-150 as data
sources of the weak-shot view (:mod:`util.weakshot_data`), their exact splits, and the commands
that prepare them::

    python -m util.prepare cocostuff10k data/cocostuff10k          # lists/train.txt, lists/test.txt
    python -m util.prepare ade20k data/ADEChallengeData2016        # lists/train.txt, lists/val.txt

**Classes.** Train id = the value in the prepared label PNG, ``0..K-1`` (no background class:
id 0 is "person" / "wall"), 255 = ignore. COCO-Stuff-10K: K = 171 in MaskFormer's order (the 80
COCO things in category-id order, ``0 person`` .. ``79 toothbrush``, then the 91 stuff classes,
``80 banner`` .. ``170 wood``). ADE20K: K = 150 in the SceneParsing order (``0 wall`` ..
``149 flag``); names are the first synonym of each class, stripped (the original writes
``"window "`` with a trailing space; here ``window``).

**Splits** (``data.split`` = the original's split number): COCO-Stuff-10K 1-9 (1-4: 43 novel
classes; 4-9: the first 43 / 51 / 59 / 68 / 76 / 85 ids of one fixed permutation, sorted), ADE20K
1-4 (38 novel). Each list is checked at import against the sha256 the SPEC gives of its compact
JSON (``json.dumps(sorted ids, separators=(",", ":"))``, first 16 hex digits): a list that does
not reproduce its hash stops the program (:func:`verify_split_hashes`).

**Label maps** (what the prepare commands write, the original's conventions, SPEC 2.1):

* COCO-Stuff-10K v1.0 ``annotations/<name>.mat`` (MATLAB v7.3 = HDF5, read with ``h5py``;
  MATLAB arrays are column-major, so ``S`` is transposed): ``S - 2`` in uint8, so "unlabeled"
  (1) becomes 255 and 2..172 become the 171 classes 0..170. The v1.1 release stores ``S`` as
  COCO category ids (0 = unlabeled, things 1..90 with gaps, stuff 92..182) in a MATLAB v5 file
  (read with scipy): mapped to the same 171 ids, 0 -> 255. The version is told apart by the file
  format (``--mat-version`` forces one). MaskFormer's prepared folders
  (``images_detectron2/{train,test}``, ``annotations_detectron2/{train,test}``, the layout the
  authors also ship) are read as they are.
* ADE20K ``annotations/{training,validation}/<name>.png``: ``value - 1`` in uint8 (0 "other"
  becomes 255, 1..150 become 0..149), written to ``annotations_detectron2/`` as MaskFormer's
  ``prepare_ade20k_sem_seg.py`` does.

Any other value is refused naming the file and the values. **Excluded images** (the original's
filters): 7 COCO names from every list the loader reads (test included), 16 ADE training images
whose labels are all 255.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
from dataclasses import dataclass
from multiprocessing.pool import ThreadPool
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from util.atomic import write_atomic
from util.config import ConfigError
from util.dataset import DataSource
from util.folds import COCO_CLASSES, Fold
from util.io import DataError, read_mask
from util.lists import ImageEntry, class_pixel_counts, read_pair_list, write_pair_list

IGNORE = 255

# -- classes ------------------------------------------------------------------------------------------

COCO_STUFF_STUFF_CLASSES = (
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage", "cardboard", "carpet",
    "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard", "curtain", "desk-stuff",
    "dirt", "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower",
    "fog", "food-other", "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill", "house", "leaves",
    "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper", "pavement",
    "pillow", "plant-other", "plastic", "platform", "playingfield", "railing", "railroad", "river", "road", "rock",
    "roof", "rug", "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow", "solid-other", "stairs",
    "stone", "straw", "structural-other", "table", "tent", "textile-other", "towel", "tree", "vegetable",
    "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile", "wall-wood", "water-other",
    "waterdrops", "window-blind", "window-other", "wood",
)
#: the 171 classes of COCO-Stuff-10K, train ids 0..170 (MaskFormer's order)
COCO_STUFF_CLASSES = tuple(COCO_CLASSES) + COCO_STUFF_STUFF_CLASSES

#: COCO category id of each train id (things 1..90 with gaps, stuff 92..182): the v1.1 .mat values
COCO_STUFF_CATEGORY_IDS = tuple(
    [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)] + list(range(92, 183)))

#: the 150 classes of ADE20K (SceneParsing order, train ids 0..149): first synonym of each class
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "window", "grass", "cabinet", "sidewalk",
    "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water", "painting", "sofa",
    "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe",
    "lamp", "tub", "rail", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand",
    "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case",
    "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table",
    "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer",
    "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower",
    "chandelier", "awning", "street lamp", "booth", "tv", "plane", "dirt track", "clothes", "pole", "land",
    "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
    "conveyer belt", "canopy", "washer", "plaything", "pool", "stool", "barrel", "basket", "falls", "tent", "bag",
    "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal",
    "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light",
    "tray", "trash can", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
)

# -- splits (SPEC_SIMFORMER 2.3) ----------------------------------------------------------------------

#: the fixed permutation of COCO-Stuff-10K splits 4-9 (the original's ``randp``)
COCO_STUFF_RANDP = (
    170, 112, 3, 26, 121, 69, 50, 87, 14, 13, 58, 106, 17, 134, 164, 161, 100, 151, 24, 114, 25, 92, 12, 61, 102,
    113, 89, 110, 76, 128, 149, 57, 144, 137, 46, 27, 83, 133, 162, 37, 109, 33, 40, 82, 47, 0, 31, 111, 66, 91,
    120, 136, 39, 157, 163, 45, 28, 131, 9, 49, 19, 155, 150, 1, 4, 68, 130, 42, 132, 75, 71, 48, 7, 85, 116, 96,
    93, 159, 139, 115, 95, 105, 78, 156, 54, 5, 11, 44, 65, 88, 62, 60, 41, 104, 107, 8, 168, 117, 98, 143,
)
#: novel-class ratio of COCO-Stuff-10K splits 5-9: int(171 * r) ids of the permutation
COCO_STUFF_RATIOS = {5: 0.30, 6: 0.35, 7: 0.40, 8: 0.45, 9: 0.50}

COCO_STUFF_NOVEL: Dict[int, Tuple[int, ...]] = {
    1: (3, 6, 10, 11, 18, 19, 26, 27, 31, 34, 37, 38, 40, 41, 50, 53, 55, 59, 61, 68, 76, 82, 85, 90, 92, 94, 103,
        106, 108, 112, 113, 117, 120, 127, 129, 131, 141, 146, 155, 156, 159, 166, 169),
    2: (1, 3, 6, 7, 9, 10, 13, 27, 31, 35, 38, 40, 43, 44, 53, 62, 68, 74, 77, 80, 82, 84, 86, 99, 101, 108, 110,
        111, 116, 118, 121, 122, 125, 131, 137, 141, 148, 153, 155, 156, 160, 161, 166),
    3: (0, 5, 10, 13, 15, 16, 20, 23, 25, 27, 28, 31, 33, 34, 35, 36, 40, 43, 47, 50, 51, 58, 62, 69, 80, 81, 83,
        84, 87, 90, 101, 105, 119, 121, 124, 126, 137, 138, 150, 154, 157, 158, 164),
    4: tuple(sorted(COCO_STUFF_RANDP[:43])),
    **{s: tuple(sorted(COCO_STUFF_RANDP[:int(171 * r)])) for s, r in COCO_STUFF_RATIOS.items()},
}

ADE20K_NOVEL: Dict[int, Tuple[int, ...]] = {
    1: (1, 3, 6, 8, 10, 13, 17, 22, 23, 29, 33, 38, 41, 50, 51, 56, 67, 70, 71, 74, 77, 81, 92, 93, 98, 101, 102,
        103, 110, 113, 119, 121, 126, 127, 130, 136, 147, 149),
    2: (0, 10, 21, 27, 28, 29, 34, 40, 42, 43, 51, 57, 58, 65, 66, 68, 69, 73, 76, 78, 85, 88, 90, 100, 105, 110,
        111, 112, 113, 114, 117, 123, 124, 132, 134, 139, 142, 146),
    3: (0, 5, 9, 15, 16, 21, 24, 25, 27, 32, 34, 35, 38, 39, 55, 70, 76, 85, 95, 96, 98, 100, 106, 109, 111, 118,
        119, 124, 128, 132, 134, 135, 136, 138, 140, 141, 143, 144),
    4: (5, 11, 13, 16, 21, 24, 26, 32, 35, 42, 53, 56, 60, 61, 63, 64, 68, 70, 75, 82, 91, 93, 94, 99, 100, 105,
        111, 115, 118, 121, 122, 130, 132, 135, 137, 138, 141, 143),
}

#: SPEC_SIMFORMER 2.3: sha256 of the compact JSON id list, first 16 hex digits
SPLIT_HASHES: Dict[Tuple[str, int], str] = {
    ("cocostuff10k", 1): "d7c67051d1c820d5", ("cocostuff10k", 2): "fd61c6578fe6a310",
    ("cocostuff10k", 3): "7380271b17452256", ("cocostuff10k", 4): "252efd1fb826bdb4",
    ("cocostuff10k", 5): "b67763280e43c553", ("cocostuff10k", 6): "99e9888a4e801a94",
    ("cocostuff10k", 7): "9c245003a11807b7", ("cocostuff10k", 8): "e993c9f2a7d535a5",
    ("cocostuff10k", 9): "30f5af4fea06e333",
    ("ade20k", 1): "255e53bb709ea805", ("ade20k", 2): "2371628bcc288da8",
    ("ade20k", 3): "b43f2ff4a1e9be88", ("ade20k", 4): "6adba3caef81af19",
}

# -- the original's image filters (SPEC_SIMFORMER 2.1) ------------------------------------------------

COCO_STUFF_EXCLUDED = frozenset(f"COCO_train2014_{int(n):012d}" for n in (
    "016680", "230639", "382127", "429995", "314646", "003518", "058075"))
ADE20K_EXCLUDED = frozenset(f"ADE_train_{int(n):08d}" for n in (
    "5149", "5150", "5152", "5333", "5905", "6510", "13298", "14634", "14636", "14884", "15320", "15330", "15928",
    "19743", "19385", "19873"))


def split_hash(ids: Sequence[int]) -> str:
    """The SPEC's hash of a split: sha256 of ``json.dumps(sorted ids, separators=(",", ":"))``,
    first 16 hex digits."""
    text = json.dumps(sorted(int(i) for i in ids), separators=(",", ":"))
    return hashlib.sha256(text.encode("ascii")).hexdigest()[:16]


@dataclass(frozen=True)
class Benchmark:
    """One original benchmark: its classes, splits and files."""

    name: str                               # data.dataset
    title: str
    class_names: Tuple[str, ...]
    novel: Mapping[int, Tuple[int, ...]]    # split number -> novel train ids
    excluded: frozenset                     # image stems the original never reads
    lists: Mapping[str, str]                # mode -> list file (relative to the root)
    expected: Mapping[str, int]             # mode -> images of the release before the exclusions
    download: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split_classes(self, split) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
        """(base, novel) train ids of ``split`` (the original's number)."""
        if isinstance(split, bool) or not isinstance(split, int) or split not in self.novel:
            raise ConfigError(f"data.split must be one of {', '.join(map(str, sorted(self.novel)))} for "
                              f"data.dataset={self.name} (the original's split numbers), got {split!r}")
        novel = self.novel[split]
        return tuple(c for c in range(self.num_classes) if c not in novel), novel


BENCHMARKS: Dict[str, Benchmark] = {
    "cocostuff10k": Benchmark(
        name="cocostuff10k", title="COCO-Stuff-10K", class_names=COCO_STUFF_CLASSES, novel=COCO_STUFF_NOVEL,
        excluded=COCO_STUFF_EXCLUDED, lists={"train": "lists/train.txt", "val": "lists/test.txt"},
        expected={"train": 9000, "val": 1000},
        download="COCO-Stuff-10K (cocostuff-10k-v1.1.zip or v1.0: images/, annotations/*.mat, imageLists/) from "
                 "https://github.com/nightrome/cocostuff10k"),
    "ade20k": Benchmark(
        name="ade20k", title="ADE20K-150", class_names=ADE20K_CLASSES, novel=ADE20K_NOVEL,
        excluded=ADE20K_EXCLUDED, lists={"train": "lists/train.txt", "val": "lists/val.txt"},
        expected={"train": 20210, "val": 2000},
        download="ADEChallengeData2016.zip (SceneParsing, 150 classes) from "
                 "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip"),
}


def verify_split_hashes() -> None:
    """Every split reproduces the SPEC's hash, has the SPEC's size and holds valid ids (raises
    RuntimeError otherwise: a wrong list must never train or score silently)."""
    sizes = {"cocostuff10k": {1: 43, 2: 43, 3: 43, 4: 43, 5: 51, 6: 59, 7: 68, 8: 76, 9: 85},
             "ade20k": {1: 38, 2: 38, 3: 38, 4: 38}}
    if len(COCO_STUFF_CLASSES) != 171 or len(ADE20K_CLASSES) != 150 or len(COCO_STUFF_CATEGORY_IDS) != 171:
        raise RuntimeError("the benchmark class lists must hold 171 (COCO-Stuff-10K) and 150 (ADE20K) classes")
    for bench in BENCHMARKS.values():
        if len(set(bench.class_names)) != bench.num_classes:
            raise RuntimeError(f"{bench.name}: class names are not unique")
        for split, novel in bench.novel.items():
            digest = split_hash(novel)
            if digest != SPLIT_HASHES[(bench.name, split)] or len(set(novel)) != sizes[bench.name][split] \
                    or not all(0 <= c < bench.num_classes for c in novel):
                raise RuntimeError(f"{bench.name} split {split}: the novel classes hash to {digest}, the SPEC's list "
                                   f"hashes to {SPLIT_HASHES[(bench.name, split)]} ({len(novel)} ids)")


verify_split_hashes()


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ConfigError(f"unknown weak-shot benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


# -- the weak-shot view's data source -----------------------------------------------------------------

@dataclass(frozen=True)
class BenchmarkFold(Fold):
    """:class:`util.folds.Fold` of a benchmark split for the code that reads a data config's fold
    (:func:`util.folds.make_fold`, e.g. the SimFormer builder: K = ``num_classes + 1`` label values).

    Here label value 0 is a class like any other (``zero_name``: person / wall; it may be novel),
    not a background: ``class_names`` names the values 1..K-1, ``base`` and ``novel`` are the
    split's train ids in 0..K-1. Use :attr:`all_names` for the K names.
    """

    zero_name: str = ""

    @property
    def all_names(self) -> Tuple[str, ...]:
        return (self.zero_name,) + tuple(self.class_names)

    def name(self, class_id: int) -> str:
        return self.all_names[class_id]


def benchmark_fold(data_cfg: Mapping) -> BenchmarkFold:
    """The fold of ``data.dataset`` (a benchmark) and ``data.split``."""
    bench = get_benchmark(data_cfg["dataset"])
    base, novel = bench.split_classes(data_cfg["split"])
    return BenchmarkFold(tuple(bench.class_names[1:]), base, novel, zero_name=bench.class_names[0])


def count_classes(pairs: Sequence[Tuple[str, str]], root: Path, cache_file: Optional[Path], *, workers: int = 4,
                  progress: bool = True) -> List[ImageEntry]:
    """Pixel count of every label value but 255 (0 included: a class here) in every mask, cached
    in ``cache_file`` (:func:`util.lists.class_pixel_counts` with ``count_zero``)."""
    return class_pixel_counts(pairs, root, cache_file, workers=workers, progress=progress, count_zero=True)


class BenchmarkSource(DataSource):
    """:class:`util.dataset.DataSource` of a benchmark: label maps read as they are (0..K-1, 255),
    class 0 counted like the others; :meth:`weakshot_split` gives the K classes of the split."""

    @property
    def benchmark(self) -> Benchmark:
        return BENCHMARKS[self.dataset]

    def entries(self, mode: str) -> List[ImageEntry]:
        if mode not in self._entries:
            pairs = read_pair_list(self.lists[mode], f"data.{mode}_list")
            cache = self.cache_dir / self.dataset / f"{self.lists[mode].stem}.counts_with0.json"
            self._entries[mode] = count_classes(pairs, self.root, cache, workers=self.workers, progress=self.progress)
        return self._entries[mode]

    def weakshot_split(self):
        from util.weakshot_data import WeakShotSplit
        return WeakShotSplit(self.dataset, self.split, tuple(self.benchmark.class_names), tuple(self.fold.base),
                             tuple(self.fold.novel))


def build_benchmark_source(cfg: Mapping, *, progress: bool = True, log: Callable[[str], None] = print
                           ) -> BenchmarkSource:
    """The data source of a benchmark config (``data.dataset`` in :data:`BENCHMARKS`); lists from
    ``data.train_list`` / ``data.val_list`` (relative to ``data.root``), counts cached under
    ``data.cache_dir``."""
    from util.config import resolve_path
    data = cfg["data"]
    bench = get_benchmark(data["dataset"])
    root = resolve_path(data["root"], cfg)
    lists = {mode: (Path(data[f"{mode}_list"]) if os.path.isabs(data[f"{mode}_list"])
                    else root / data[f"{mode}_list"]) for mode in ("train", "val")}
    if not root.is_dir():
        raise DataError(f"data root not found: {root} (config key data.root): download {bench.download}, then run "
                        f"`python -m util.prepare {bench.name} {root}`")
    for mode, path in lists.items():
        if not path.is_file():
            raise DataError(f"image list not found: {path} (config key data.{mode}_list): run "
                            f"`python -m util.prepare {bench.name} {root}`")
    return BenchmarkSource(dataset=bench.name, root=root, train_list=lists["train"], val_list=lists["val"],
                           cache_dir=resolve_path(data["cache_dir"], cfg), fold=benchmark_fold(data),
                           split=data["split"], min_pixels=data["min_class_pixels"], drop_novel=False,
                           workers=max(1, data["num_workers"]), progress=progress, log=log)


# -- preparation: label conversion ------------------------------------------------------------------

def _bad_values(values: np.ndarray, allowed: np.ndarray) -> List[int]:
    return sorted(int(v) for v in np.unique(values) if not allowed[int(v)])


def convert_cocostuff_v10(S: np.ndarray, where: str) -> np.ndarray:
    """COCO-Stuff-10K v1.0 ``S`` (1 = unlabeled, 2..172 = the 171 classes) -> uint8 ``S - 2``
    (255 = unlabeled, 0..170); any other value is refused."""
    S = np.asarray(S)
    if S.size and (S.min() < 1 or S.max() > 172):
        raise DataError(f"{where}: label values {sorted(int(v) for v in np.unique(S) if not 1 <= v <= 172)} are not "
                        "COCO-Stuff-10K v1.0 labels (1 = unlabeled, 2..172 = the 171 classes)")
    return (S.astype(np.int64) - 2).astype(np.uint8)      # 1 - 2 wraps to 255, as the original's uint8


_V11_LUT = np.full(256, IGNORE, np.uint8)
_V11_LUT[list(COCO_STUFF_CATEGORY_IDS)] = np.arange(171, dtype=np.uint8)
_V11_ALLOWED = np.zeros(256, bool)
_V11_ALLOWED[[0, *COCO_STUFF_CATEGORY_IDS]] = True


def convert_cocostuff_v11(S: np.ndarray, where: str) -> np.ndarray:
    """COCO-Stuff-10K v1.1 ``S`` (0 = unlabeled, COCO category ids) -> uint8 train ids 0..170
    (255 = unlabeled); any other value is refused."""
    S = np.asarray(S)
    if S.size and (S.min() < 0 or S.max() > 255):
        raise DataError(f"{where}: label values {int(S.min())}..{int(S.max())} are not COCO-Stuff category ids")
    bad = _bad_values(S.astype(np.int64), _V11_ALLOWED)
    if bad:
        raise DataError(f"{where}: label values {bad} are not COCO-Stuff-10K v1.1 labels (0 = unlabeled, the 171 "
                        "COCO category ids 1..90 with gaps and 92..182)")
    return _V11_LUT[S.astype(np.int64)]


def read_cocostuff_mat(path: Path, version: str = "auto") -> np.ndarray:
    """The train-id label map (uint8, 0..170 and 255) of a COCO-Stuff-10K ``.mat`` annotation.
    ``version``: ``1.0`` (HDF5, h5py, ``S - 2``), ``1.1`` (MATLAB v5, scipy, COCO ids) or
    ``auto`` (by the file format: HDF5 = v1.0)."""
    from scipy.io import loadmat
    from scipy.io.matlab import matfile_version
    try:
        major, _ = matfile_version(str(path))
    except Exception as err:   # scipy raises several types for a file that is not a .mat
        raise DataError(f"cannot read {path}: not a MATLAB file ({err})") from None
    if version == "auto":
        version = "1.0" if major == 2 else "1.1"
    if major == 2:             # MATLAB v7.3 = HDF5
        try:
            import h5py
        except ImportError:
            raise DataError(f"{path} is a MATLAB v7.3 (HDF5) file (COCO-Stuff-10K v1.0): reading it needs h5py "
                            "(`pip install h5py`)") from None
        with h5py.File(path, "r") as f:
            if "S" not in f:
                raise DataError(f"{path}: no label map 'S' (keys: {sorted(f.keys())})")
            S = np.array(f["S"]).T        # MATLAB is column-major: HDF5 holds the transpose
    else:
        try:
            mat = loadmat(str(path), variable_names=["S"])
        except Exception as err:
            raise DataError(f"cannot read {path}: {err}") from None
        if "S" not in mat:
            raise DataError(f"{path}: no label map 'S'")
        S = mat["S"]
    if S.ndim != 2:
        raise DataError(f"{path}: label map 'S' has shape {S.shape}; expected a 2-D map")
    return convert_cocostuff_v10(S, str(path)) if version == "1.0" else convert_cocostuff_v11(S, str(path))


_ADE_ALLOWED = np.zeros(256, bool)
_ADE_ALLOWED[:151] = True


def convert_ade20k(label: np.ndarray, where: str) -> np.ndarray:
    """ADE20K SceneParsing PNG (0 = other, 1..150) -> uint8 ``value - 1`` (255, 0..149)."""
    bad = _bad_values(label, _ADE_ALLOWED)
    if bad:
        raise DataError(f"{where}: label values {bad} are not ADE20K-150 labels (0 = other, 1..150 = the classes)")
    return (label.astype(np.int64) - 1).astype(np.uint8)


def check_prepared_label(path: Path, num_classes: int) -> None:
    """A prepared label PNG holds only 0..K-1 and 255."""
    allowed = np.zeros(256, bool)
    allowed[:num_classes] = True
    allowed[IGNORE] = True
    bad = _bad_values(read_mask(path, "data.root"), allowed)
    if bad:
        raise DataError(f"{path}: label values {bad} are not train ids of the {num_classes} classes (0.."
                        f"{num_classes - 1}, {IGNORE} = ignore)")


def _write_label(path: Path, label: np.ndarray) -> None:
    write_atomic(path, lambda tmp: Image.fromarray(label, mode="L").save(tmp, format="PNG"))


# -- preparation: the commands ---------------------------------------------------------------------

@dataclass
class _Job:
    image: str                    # relative to the root
    label: str                    # the prepared PNG, relative to the root
    source: Optional[Path] = None  # the file to convert (None: the PNG is already prepared)


def _run_jobs(root: Path, jobs: Sequence[_Job], convert: Callable[[Path], np.ndarray], num_classes: int, *,
              overwrite: bool, workers: int, desc: str) -> int:
    """Convert (or, for prepared files, check) every label; returns the number written."""
    missing = [str(root / j.image) for j in jobs if not (root / j.image).is_file()]
    missing += [str(j.source) for j in jobs if j.source is not None and not j.source.is_file()]
    missing += [str(root / j.label) for j in jobs if j.source is None and not (root / j.label).is_file()]
    if missing:
        raise DataError(f"{len(missing)} file(s) of the release are missing, e.g. {', '.join(missing[:3])}")

    def one(job: _Job) -> int:
        out = root / job.label
        if job.source is None or (out.is_file() and not overwrite):
            check_prepared_label(out, num_classes)
            return 0
        _write_label(out, convert(job.source))
        return 1

    with ThreadPool(max(1, workers)) as pool:
        return sum(tqdm(pool.imap(one, jobs, chunksize=8), total=len(jobs), desc=desc, leave=False))


def _write_lists(root: Path, bench: Benchmark, lists: Mapping[str, List[_Job]]) -> Dict[str, int]:
    counts = {}
    for mode, jobs in lists.items():
        kept = [j for j in jobs if Path(j.image).stem not in bench.excluded]
        path = root / bench.lists[mode]
        write_pair_list([(j.image, j.label) for j in kept], path)
        counts[mode] = len(kept)
        note = f" ({len(jobs) - len(kept)} excluded as the original)" if len(kept) != len(jobs) else ""
        print(f"wrote {path}: {len(kept)} images{note}")
        if len(jobs) != bench.expected[mode]:
            print(f"warning: {len(jobs)} {mode} images found, the release has {bench.expected[mode]}")
    return counts


def _read_names(path: Path) -> List[str]:
    return [Path(line.strip()).stem for line in path.read_text().splitlines() if line.strip()]


def prepare_cocostuff10k(root: Path, *, overwrite: bool = False, workers: int = 4, mat_version: str = "auto"
                         ) -> Dict[str, int]:
    """Lists (and, from the release's ``.mat`` files, the label PNGs) of COCO-Stuff-10K under ``root``.

    Layouts: the release (``images/<name>.jpg``, ``annotations/<name>.mat``,
    ``imageLists/{train,test}.txt``; labels written to ``annotations_detectron2/{train,test}/``)
    or MaskFormer's prepared folders (``images_detectron2/{train,test}/*.jpg`` +
    ``annotations_detectron2/{train,test}/*.png``, checked). Writes ``lists/train.txt`` and
    ``lists/test.txt``."""
    bench = BENCHMARKS["cocostuff10k"]
    root = Path(root)
    release = root / "imageLists" / "train.txt"
    prepared = root / "images_detectron2" / "train"
    if not root.is_dir() or not (release.is_file() or prepared.is_dir()):
        raise DataError(f"COCO-Stuff-10K not found under {root}: expected {release} (the release: images/, "
                        f"annotations/*.mat, imageLists/) or {prepared} (MaskFormer's prepared folders); download "
                        f"{bench.download}")
    lists: Dict[str, List[_Job]] = {}
    for mode, split in (("train", "train"), ("val", "test")):
        if release.is_file():
            list_file = root / "imageLists" / f"{split}.txt"
            if not list_file.is_file():
                raise DataError(f"{list_file} not found (COCO-Stuff-10K release); download {bench.download}")
            lists[mode] = [_Job(f"images/{n}.jpg", f"annotations_detectron2/{split}/{n}.png",
                                root / "annotations" / f"{n}.mat") for n in _read_names(list_file)]
        else:
            folder = root / "images_detectron2" / split
            if not folder.is_dir():
                raise DataError(f"{folder} not found (MaskFormer's prepared COCO-Stuff-10K)")
            lists[mode] = [_Job(f"images_detectron2/{split}/{p.name}", f"annotations_detectron2/{split}/{p.stem}.png")
                           for p in sorted(folder.glob("*.jpg"))]
        written = _run_jobs(root, lists[mode], lambda p: read_cocostuff_mat(p, mat_version), bench.num_classes,
                            overwrite=overwrite, workers=workers, desc=f"COCO-Stuff-10K {split}")
        if written:
            print(f"converted {written} {split} label maps into {root / 'annotations_detectron2' / split}")
    return _write_lists(root, bench, lists)


def prepare_ade20k(root: Path, *, overwrite: bool = False, workers: int = 4) -> Dict[str, int]:
    """Label PNGs (``annotations_detectron2/{training,validation}/``, value - 1) and lists
    (``lists/train.txt``, ``lists/val.txt``) of ADE20K under ``root`` = ``ADEChallengeData2016``
    (``images/{training,validation}/*.jpg``, ``annotations/{training,validation}/*.png``)."""
    bench = BENCHMARKS["ade20k"]
    root = Path(root)
    lists: Dict[str, List[_Job]] = {}
    for mode, split in (("train", "training"), ("val", "validation")):
        images = root / "images" / split
        labels = root / "annotations" / split
        for folder in (images, labels):
            if not folder.is_dir():
                raise DataError(f"{folder} not found: {root} must be the ADEChallengeData2016 folder (images/ and "
                                f"annotations/, each with training/ and validation/); download {bench.download}")
        lists[mode] = [_Job(f"images/{split}/{p.name}", f"annotations_detectron2/{split}/{p.stem}.png",
                            labels / f"{p.stem}.png") for p in sorted(images.glob("*.jpg"))]
        if not lists[mode]:
            raise DataError(f"no .jpg image in {images}; download {bench.download}")
        written = _run_jobs(root, lists[mode], lambda p: convert_ade20k(read_mask(p, "data.root"), str(p)),
                            bench.num_classes, overwrite=overwrite, workers=workers, desc=f"ADE20K {split}")
        if written:
            print(f"converted {written} {split} label maps into {root / 'annotations_detectron2' / split}")
    return _write_lists(root, bench, lists)


def _add_common(parser: argparse.ArgumentParser, default_root: str) -> None:
    parser.add_argument("root", nargs="?", default=default_root, help=f"dataset root (default {default_root})")
    parser.add_argument("--overwrite", action="store_true", help="convert label maps again even when present")
    parser.add_argument("--workers", type=int, default=4)


def add_cocostuff10k_arguments(parser: argparse.ArgumentParser) -> None:
    _add_common(parser, "data/cocostuff10k")
    parser.add_argument("--mat-version", choices=("auto", "1.0", "1.1"), default="auto",
                        help="label convention of the .mat files (auto: HDF5 = v1.0, S - 2; MATLAB v5 = v1.1, "
                             "COCO ids)")


def run_cocostuff10k(args: argparse.Namespace) -> None:
    prepare_cocostuff10k(Path(args.root), overwrite=args.overwrite, workers=args.workers, mat_version=args.mat_version)


def add_ade20k_arguments(parser: argparse.ArgumentParser) -> None:
    _add_common(parser, "data/ADEChallengeData2016")


def run_ade20k(args: argparse.Namespace) -> None:
    prepare_ade20k(Path(args.root), overwrite=args.overwrite, workers=args.workers)
