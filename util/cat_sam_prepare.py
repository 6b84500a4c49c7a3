"""CAT-SAM datasets -> the generic list format:  python -m util.prepare {kvasir,whu,sbu} [options]

    python -m util.prepare kvasir --root data/kvasir
    python -m util.prepare whu --root data/whu
    python -m util.prepare sbu --root data/sbu --out data/sbu_lists --no-binarize

Reads a dataset in the ORIGINAL CAT-SAM layout (SPEC_CAT_SAM 8) and writes, into ``--out``
(default: the root itself), the generic format the CAT-SAM stage reads:

    train.txt  test.txt  train_1shot.txt  train_16shot.txt

one ``<image path> <mask path>`` per line, paths relative to ``--out``; ``val.txt`` only with
``--val N`` (below).

Splits (the original's ``data/<name>/preprocess.py``, SPEC_CAT_SAM 8):

* ``whu``: train <- ``train/``, test <- WHU's **val/** split (CAT-SAM's "test" set is WHU's
  validation split; WHU's own ``test/`` folder is not used).
* ``kvasir``: train <- PraNet's ``TrainDataset`` WITHOUT the files whose stem is all digits (the
  CVC-ClinicDB part, which the original's preprocess deletes; here they are only left out, nothing
  is deleted); test <- ``TestDataset/Kvasir`` only (the other test folders are ignored).
* ``sbu``: train <- ``SBUTrain4KRecoveredSmall``, test <- ``SBU-Test``.

Few-shot lists: the FIXED samples of the original (SPEC_CAT_SAM 7), given there by NAME (file
stems), not as indices: ``train_1shot.txt`` holds the 1-shot stem, ``train_16shot.txt`` the 16
stems in the SPEC's order (the 1-shot sample is in each 16-shot list). A fixed sample missing from
the train split is an error (the download is incomplete or a different version).

Masks are listed as they are: the CAT-SAM stage binarises them with
``data.cat_sam.mask_threshold`` (default > 127; config/cat_sam/sbu.yaml: > 0). ``--binarize``
instead rewrites every mask as a 0/255 PNG with the ORIGINAL's threshold (SPEC_CAT_SAM 6: WHU
> 254, Kvasir > 254, SBU > 0; read as PIL "L") into ``<out>/masks_binary/{train,test}/<stem>.png``
and lists those, so any threshold in 0..254 then selects exactly the original's foreground
(Kvasir's JPEG-born masks: the original's > 254 drops the compressed 240-254 values inside polyps).

Validation: the original has none (it selects checkpoints on its test set). ``--val N`` writes a
``val.txt`` of N training images drawn with a fixed seed (0) among those that are NOT one of the
fixed few-shot samples, and leaves them out of ``train.txt`` (full-data training never sees them).

List lines are split on whitespace, so a path with a space cannot go into a list: WHU's folder
``3. The cropped image tiles and raster labels`` is reached through a relative symbolic link
``<out>/whu_tiles`` made here.
"""
from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from util.atomic import write_text_atomic
from util.io import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")

#: SPEC_CAT_SAM 7: the original's fixed few-shot samples (file stems of the train split).
ONE_SHOT: Dict[str, str] = {"whu": "2432", "kvasir": "cju0roawvklrq0799vmjorwfv", "sbu": "lssd1109"}
SIXTEEN_SHOT: Dict[str, Tuple[str, ...]] = {
    "whu": ("168", "515", "807", "1176", "1552", "1901", "2432", "2679", "3130", "3486", "3678", "3939", "4263",
            "4335", "4640", "4725"),
    "kvasir": ("cju7dn24o296i09871qfxb8s2", "cju83mki1jv5w0817kubxm31r", "cju6vucxvvlda0755j7msqnya",
               "cju43kj2pm34f0850l28ahpni", "cju2x7vw87mu30878hye2ca0m", "cju5ddda9bkkt0850enzwatb1",
               "cju77vvcwzcm50850lzoykuva", "cju3128yi0rpu0988o4oo5n8n", "cju8b7aqtr4a00987coba14b7",
               "cjz14qsk2wci60794un9ozwmw", "cju0s690hkp960855tjuaqvv0", "cju888fr7nveu0818r9uwtiit",
               "cju8b542nr81x0871uxnkm9ih", "cju2qtee81yd708787bsjr75d", "cju83h9ysjwe808716nt35oah",
               "cju0roawvklrq0799vmjorwfv"),
    "sbu": ("lssd3356", "lssd1409", "lssd1090", "lssd3732", "lssd2011", "lssd1901", "lssd1821", "lssd1512",
            "lssd3713", "lssd1376", "lssd3493", "lssd3729", "lssd610", "lssd3008", "lssd1319", "lssd1109"),
}
#: The original's GT binarisation: foreground = mask value > threshold (SPEC_CAT_SAM 6).
MASK_THRESHOLD: Dict[str, int] = {"whu": 254, "kvasir": 254, "sbu": 0}
#: Expected split sizes (SPEC_CAT_SAM 8); a difference is reported, not an error.
EXPECTED_COUNTS: Dict[str, Dict[str, int]] = {"whu": {"train": 4736, "test": 1036},
                                              "kvasir": {"train": 900, "test": 100},
                                              "sbu": {"train": 4089, "test": 638}}

WHU_TILES = "3. The cropped image tiles and raster labels"
WHU_LINK = "whu_tiles"
DOWNLOAD: Dict[str, str] = {
    "whu": ("WHU building dataset, aerial imagery: '3. The cropped aerial image tiles and raster labels' (0.3 m) "
            "from http://gpcv.whu.edu.cn/data/building_dataset.html; unzip it into the root so that "
            f"'<root>/{WHU_TILES}/{{train,val}}/{{image,label}}/' exist"),
    "kvasir": ("Kvasir-SEG as split by PraNet: TrainDataset.zip and TestDataset.zip (Google Drive links in PraNet's "
               "README, https://github.com/DengPingFan/PraNet, and in CAT-SAM's data/kvasir/README.md); unzip both "
               "into the root so that '<root>/TrainDataset/{image,masks}/' and "
               "'<root>/TestDataset/Kvasir/{images,masks}/' exist"),
    "sbu": ("SBU-Shadow: SBU-shadow.zip from https://www3.cs.stonybrook.edu/~cvl/ (the SBU Shadow dataset page); "
            "unzip it into the root so that '<root>/SBU-shadow/SBUTrain4KRecoveredSmall/{ShadowImages,ShadowMasks}/' "
            "and '<root>/SBU-shadow/SBU-Test/{ShadowImages,ShadowMasks}/' exist"),
}


@dataclass(frozen=True)
class Split:
    """Where one split's images and masks are, relative to the dataset root."""

    images: str
    masks: str


#: SPEC_CAT_SAM 8 layouts, relative to the dataset root.
LAYOUTS: Dict[str, Dict[str, Split]] = {
    "whu": {"train": Split(f"{WHU_TILES}/train/image", f"{WHU_TILES}/train/label"),
            "test": Split(f"{WHU_TILES}/val/image", f"{WHU_TILES}/val/label")},
    "kvasir": {"train": Split("TrainDataset/image", "TrainDataset/masks"),
               "test": Split("TestDataset/Kvasir/images", "TestDataset/Kvasir/masks")},
    "sbu": {"train": Split("SBU-shadow/SBUTrain4KRecoveredSmall/ShadowImages",
                           "SBU-shadow/SBUTrain4KRecoveredSmall/ShadowMasks"),
            "test": Split("SBU-shadow/SBU-Test/ShadowImages", "SBU-shadow/SBU-Test/ShadowMasks")},
}
DATASETS = tuple(LAYOUTS)


def natural_key(text: str):
    """Sort key: digit runs compare as numbers ("2" < "10")."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text) if part]


def _image_files(folder: Path) -> Dict[str, Path]:
    files: Dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith("."):
            if path.stem in files:
                raise DataError(f"two files with the stem '{path.stem}' in {folder}: {files[path.stem].name} and "
                                f"{path.name}; remove one")
            files[path.stem] = path
    return files


def _require_dir(path: Path, dataset: str) -> None:
    if not path.is_dir():
        raise DataError(f"{dataset}: folder not found: {path}. Download: {DOWNLOAD[dataset]}")


def scan_split(root: Path, dataset: str, split: str) -> List[Tuple[str, Path, Path]]:
    """(stem, image, mask) of one split in the original layout, sorted naturally by stem."""
    layout = LAYOUTS[dataset][split]
    image_dir, mask_dir = root / layout.images, root / layout.masks
    _require_dir(image_dir, dataset)
    _require_dir(mask_dir, dataset)
    images, masks = _image_files(image_dir), _image_files(mask_dir)
    if dataset == "kvasir" and split == "train":       # the CVC-ClinicDB part, deleted by the original
        images = {stem: path for stem, path in images.items() if not stem.isdigit()}
        masks = {stem: path for stem, path in masks.items() if not stem.isdigit()}
    if not images:
        raise DataError(f"{dataset}: no images ({', '.join(IMAGE_EXTENSIONS)}) in {image_dir}. "
                        f"Download: {DOWNLOAD[dataset]}")
    missing = [images[stem] for stem in images if stem not in masks]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"{dataset}: no mask for image {missing[0]}{more}: expected a file with the stem "
                        f"'{missing[0].stem}' in {mask_dir}")
    return [(stem, images[stem], masks[stem]) for stem in sorted(images, key=natural_key)]


def fewshot(dataset: str, train: Sequence[Tuple[str, Path, Path]], shots: int) -> List[Tuple[str, Path, Path]]:
    """The original's fixed 1- or 16-shot samples (SPEC_CAT_SAM 7), in the SPEC's order."""
    stems = (ONE_SHOT[dataset],) if shots == 1 else SIXTEEN_SHOT[dataset]
    by_stem = {entry[0]: entry for entry in train}
    absent = [stem for stem in stems if stem not in by_stem]
    if absent:
        raise DataError(f"{dataset}: the original's fixed {shots}-shot sample(s) {', '.join(absent)} are not in the "
                        f"train split ({len(train)} images): the download is incomplete or another version. "
                        f"Download: {DOWNLOAD[dataset]}")
    return [by_stem[stem] for stem in stems]


def binarize_mask(source: Path, target: Path, threshold: int) -> None:
    """``source`` read as the original does (PIL, mode "L") -> 0/255 PNG ``target`` (foreground =
    value > ``threshold``), written atomically."""
    from PIL import Image, UnidentifiedImageError
    from util.vis import write_png
    try:
        with Image.open(source) as img:
            values = np.asarray(img.convert("L"))
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"cannot read mask {source}: the file is corrupt or not an image ({err})") from None
    write_png(target, np.where(values > threshold, 255, 0).astype(np.uint8))


class _Paths:
    """Paths as written into a list: relative to ``out``, without whitespace."""

    def __init__(self, out: Path, links: Dict[Path, str]) -> None:
        self.out = out.resolve()
        self.links = {folder.resolve(): name for folder, name in links.items()}

    def __call__(self, path: Path) -> str:
        path = path.absolute()
        for folder, name in self.links.items():
            try:
                inside = path.resolve().relative_to(folder)
            except ValueError:
                continue
            text = (Path(name) / inside).as_posix()
            break
        else:
            text = Path(os.path.relpath(path.resolve(), self.out)).as_posix()
        if any(ch.isspace() for ch in text):
            raise DataError(f"the path {text!r} (of {path}, relative to {self.out}) contains whitespace, which a list "
                            "line '<image> <mask>' cannot hold: rename the folder or pick another --out")
        return text


def _link(out: Path, name: str, target: Path) -> None:
    """``out/name`` -> ``target`` (a relative symbolic link), kept if it already points there."""
    link = out / name
    if link.is_symlink() or link.exists():
        if link.resolve() == target.resolve():
            return
        raise DataError(f"{link} exists and is not a link to {target}: remove it (it is made by this command)")
    try:
        link.symlink_to(os.path.relpath(target.resolve(), out.resolve()), target_is_directory=True)
    except OSError as err:
        raise DataError(f"cannot create the symbolic link {link} -> {target} ({err}); the folder name has spaces, "
                        "which a list line cannot hold: rename the folder to one without spaces") from None


def prepare(dataset: str, root: str | os.PathLike, out: Optional[str | os.PathLike] = None, *,
            binarize: bool = False, val: int = 0, log=print) -> Dict[str, Path]:
    """Write the generic lists of ``dataset`` (see the module docstring); returns name -> list path."""
    if dataset not in LAYOUTS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{dataset}: dataset root not found: {root}. Download: {DOWNLOAD[dataset]}")
    out = Path(out) if out is not None else root
    splits = {split: scan_split(root, dataset, split) for split in ("train", "test")}
    shots = {1: fewshot(dataset, splits["train"], 1), 16: fewshot(dataset, splits["train"], 16)}
    val_entries: List[Tuple[str, Path, Path]] = []
    if val:
        fixed = set(SIXTEEN_SHOT[dataset])
        pool = [entry for entry in splits["train"] if entry[0] not in fixed]
        if not 0 < val < len(pool):
            raise DataError(f"--val {val}: pick 1..{len(pool) - 1} (the train split has {len(pool)} images besides "
                            "the fixed few-shot samples)")
        chosen = set(np.random.default_rng(0).choice(len(pool), size=val, replace=False).tolist())
        val_entries = [entry for i, entry in enumerate(pool) if i in chosen]
        held = {entry[0] for entry in val_entries}
        splits["train"] = [entry for entry in splits["train"] if entry[0] not in held]

    out.mkdir(parents=True, exist_ok=True)
    links: Dict[Path, str] = {}
    if dataset == "whu":
        _link(out, WHU_LINK, root / WHU_TILES)
        links[root / WHU_TILES] = WHU_LINK
    rel = _Paths(out, links)

    masks: Dict[Tuple[str, str], Path] = {}
    for split, entries in (("train", splits["train"] + val_entries), ("test", splits["test"])):
        for stem, _, mask in entries:
            masks[split, stem] = mask
    if binarize:
        threshold = MASK_THRESHOLD[dataset]
        log(f"{dataset}: binarising {len(masks)} masks (foreground = value > {threshold}, as the original) "
            f"into {out / 'masks_binary'}")
        for (split, stem), mask in masks.items():
            target = out / "masks_binary" / split / f"{stem}.png"
            binarize_mask(mask, target, threshold)
            masks[split, stem] = target

    def lines(entries, split):
        return "".join(f"{rel(image)} {rel(masks[split, stem])}\n" for stem, image, _ in entries)

    written = {"train": write_text_atomic(out / "train.txt", lines(splits["train"], "train")),
               "test": write_text_atomic(out / "test.txt", lines(splits["test"], "test")),
               "train_1shot": write_text_atomic(out / "train_1shot.txt", lines(shots[1], "train")),
               "train_16shot": write_text_atomic(out / "train_16shot.txt", lines(shots[16], "train"))}
    if val_entries:
        written["val"] = write_text_atomic(out / "val.txt", lines(val_entries, "train"))
        log(f"{dataset} val: {len(val_entries)} images held out of train (seed 0, no fixed few-shot sample)")
    for split, entries in splits.items():
        expected = EXPECTED_COUNTS[dataset][split] - (len(val_entries) if split == "train" else 0)
        note = "" if len(entries) == expected else f" (the original's: {expected}; check the download)"
        log(f"{dataset} {split}: {len(entries)} images{note}")
    log(f"{dataset}: 1-shot {ONE_SHOT[dataset]}, 16-shot {len(shots[16])} fixed samples; lists in {out}")
    return written


def add_arguments(parser: argparse.ArgumentParser, dataset: str) -> None:
    parser.add_argument("--root", default=f"data/{dataset}",
                        help=f"the dataset root in the original layout (default data/{dataset})")
    parser.add_argument("--out", default=None, help="where the lists go (default: the root)")
    parser.add_argument("--binarize", action="store_true",
                        help=f"write 0/255 masks with the original's threshold (> {MASK_THRESHOLD[dataset]}) into "
                             "<out>/masks_binary and list those (default: list the original mask files)")
    parser.add_argument("--val", type=int, default=0, metavar="N",
                        help="also write val.txt: N train images (seed 0, never a fixed few-shot sample), "
                             "left out of train.txt (default 0: no val.txt, as the original)")
    parser.set_defaults(cat_sam_dataset=dataset)


def run(args: argparse.Namespace) -> None:
    prepare(args.cat_sam_dataset, args.root, args.out, binarize=args.binarize, val=args.val)
