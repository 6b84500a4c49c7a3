"""Datasets: episodes for few-shot training/testing, and base-class images for stage 1.

Sources (``data.dataset``): ``pascal`` and ``toy`` (VOC layout), ``coco`` (COCO2014 images
with class-index PNG masks) and ``custom`` (``root/<class>/<image>.jpg`` with a binary mask
``<image><data.mask_suffix>.png`` beside it). All go through the same list rules and the
same episode sampler.

Episode ``i`` drawn with seed ``s`` is a pure function of ``(s, i)`` (training: ``(seed +
epoch, i)``): the query, the class, the supports and every random transform come from a
``numpy`` generator seeded by those numbers alone, so episodes are identical for any number of
DataLoader workers, processes or batch size.

A sample is a dict of named tensors:
    query_img        3xHxW float   normalised image
    query_mask       HxW long      1 = the episode's class, 0 = other, 255 = ignore
    support_imgs     Kx3xHxW float
    support_masks    KxHxW long    (same values)
    class_id         long          the episode's class (1..N, dataset ids)
    episode          long          the episode index
  training only:
    class_base_channel  long       the class's base-learner channel (1..num_base)
    query_base_label    HxW long   base-class labels (base class -> channel, novel/bg -> 0, 255 kept)
  evaluation only:
    query_label_ori  SxS long      the episode mask at original resolution, top-left of a square of
                                   side S = max(h, w) filled with 255 (batched: padded with 255)
    query_ori_size   2 long        (h, w)
    image_id         str
    query_path       str           the query image file (decoded again by eval.refine=fastsam)
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from util.config import resolve_path
from util.folds import Fold, make_fold
from util.io import DataError, read_image, read_mask
from util.lists import (FoldList, ImageEntry, build_fold_list, check_expected_counts, class_pixel_counts,
                        read_pair_list, write_fold_list)
from util.transforms import pad_label_square, train_transform, val_transform

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
_TRAIN, _VAL = 0, 1   # stream tags: training and evaluation episodes never share a generator


def custom_class_names(root: Path) -> list[str]:
    """Class folders of a custom dataset, sorted."""
    if not root.is_dir():
        raise DataError(f"data root not found: {root} (config key data.root)")
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise DataError(f"no class folders in {root}: a custom dataset is root/<class_name>/<image>.jpg "
                        "with its mask <image>_mask.png beside it (config key data.root)")
    return names


class DataSource:
    """Where images, masks and lists of one dataset are, and the fold lists built from them.

    Args:
        dataset: ``pascal`` | ``coco`` | ``toy`` | ``custom``.
        root: data root; list entries are relative to it.
        train_list, val_list: pair lists (ignored by ``custom``, whose images come from folders).
        cache_dir: where class pixel counts and fold lists are cached.
        fold: the fold's classes.
        min_pixels, drop_novel: the list rules (util.lists).
        mask_suffix: custom only: mask file = image stem + suffix + ``.png``.
    """

    def __init__(self, *, dataset: str, root: Path, train_list: Path, val_list: Path, cache_dir: Path,
                 fold: Fold, split: int, min_pixels: int, drop_novel: bool, use_split_coco: bool = True,
                 mask_suffix: str = "_mask", workers: int = 4, progress: bool = True,
                 log: Callable[[str], None] = print):
        self.dataset, self.root, self.fold, self.split = dataset, Path(root), fold, split
        self.lists = {"train": Path(train_list), "val": Path(val_list)}
        self.cache_dir = Path(cache_dir)
        self.min_pixels, self.drop_novel, self.use_split_coco = min_pixels, drop_novel, use_split_coco
        self.mask_suffix = mask_suffix
        self.workers, self.progress, self.log = workers, progress, log
        self._entries: dict[str, list[ImageEntry]] = {}
        self._fold_lists: dict[str, FoldList] = {}
        if not self.root.is_dir():
            raise DataError(f"data root not found: {self.root} (config key data.root; see data/README.md"
                            + (", or run `python -m util.prepare toy`)" if dataset == "toy" else ")"))

    # -- reading --------------------------------------------------------------------------
    def read_label(self, mask_path: Path) -> np.ndarray:
        """Class-id label of a mask. Custom masks are binary (0/1 or 0/255: values >= 128 are
        foreground when the mask has values above 1) and get their folder's class id."""
        mask = read_mask(mask_path, "data.root")
        if self.dataset != "custom":
            return mask
        class_id = self.fold.class_names.index(Path(mask_path).parent.name) + 1
        foreground = mask >= 128 if mask.max() > 1 else mask == 1
        return (foreground * class_id).astype(np.uint8)

    def read(self, entry: ImageEntry) -> tuple[np.ndarray, np.ndarray]:
        """(image float32 HxWx3 RGB, label uint8 HxW of class ids) with the sizes checked."""
        image = read_image(self.root / entry.image, "data.root")
        label = self.read_label(self.root / entry.mask)
        if image.shape[:2] != label.shape:
            raise DataError(f"image and mask sizes differ: {self.root / entry.image} is "
                            f"{image.shape[1]}x{image.shape[0]}, {self.root / entry.mask} is "
                            f"{label.shape[1]}x{label.shape[0]} (width x height)")
        return image, label

    # -- lists ----------------------------------------------------------------------------
    def _pairs(self, mode: str) -> list[tuple[str, str]]:
        if self.dataset != "custom":
            return read_pair_list(self.lists[mode], f"data.{mode}_list")
        pairs = []
        for name in self.fold.class_names:
            folder = self.root / name
            if not folder.is_dir():
                raise DataError(f"class folder not found: {folder} (config key data.class_names)")
            for path in sorted(folder.iterdir()):
                if path.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                if self.mask_suffix and path.stem.endswith(self.mask_suffix):
                    continue
                mask = path.with_name(path.stem + self.mask_suffix + ".png")
                if mask == path:
                    continue   # mask_suffix "" and a .png image: this file is a mask
                if not mask.is_file():
                    raise DataError(f"mask not found for {path}: expected {mask} "
                                    "(config key data.mask_suffix)")
                pairs.append((f"{name}/{path.name}", f"{name}/{mask.name}"))
        return pairs

    def entries(self, mode: str) -> list[ImageEntry]:
        """Every image of the ``mode`` list with its class pixel counts (cached)."""
        if mode not in self._entries:
            pairs = self._pairs(mode)
            source = "folders" if self.dataset == "custom" else self.lists[mode].stem
            cache = self.cache_dir / self.dataset / f"{source}.counts.json"
            self._entries[mode] = class_pixel_counts(pairs, self.root, cache, self.read_label,
                                                     workers=self.workers, progress=self.progress)
        return self._entries[mode]

    def fold_list(self, mode: str) -> FoldList:
        """The fold's ``train`` or ``val`` images and class pools (printed with the original's counts)."""
        if mode not in self._fold_lists:
            fold_list = build_fold_list(self.entries(mode), self.fold, mode, min_pixels=self.min_pixels,
                                        drop_novel=self.drop_novel)
            suffix = "" if mode == "val" or self.drop_novel else "_keepnovel"
            write_fold_list(fold_list, self.cache_dir / self.dataset / f"fold{self.split}_{mode}{suffix}.txt")
            self.log(f"{self.dataset} fold {self.split} {mode} list: {len(fold_list.entries)} images "
                     f"({fold_list.dropped} of the source list not kept by the rules)")
            warning = check_expected_counts(self.dataset, mode, self.split, len(fold_list.entries),
                                            use_split_coco=self.use_split_coco, drop_novel=self.drop_novel,
                                            min_pixels=self.min_pixels)
            if warning:
                self.log("\n" + "!" * 100 + "\n" + warning + "\n" + "!" * 100)
            self._fold_lists[mode] = fold_list
        return self._fold_lists[mode]


def build_source(cfg: Mapping, *, progress: bool = True, log: Callable[[str], None] = print) -> DataSource:
    data = cfg["data"]
    root = resolve_path(data["root"], cfg)
    names = custom_class_names(root) if data["dataset"] == "custom" and not data["class_names"] else None
    fold = make_fold(data, names)
    lists = {mode: (Path(data[f"{mode}_list"]) if os.path.isabs(data[f"{mode}_list"])
                    else root / data[f"{mode}_list"]) for mode in ("train", "val")}
    return DataSource(dataset=data["dataset"], root=root, train_list=lists["train"], val_list=lists["val"],
                      cache_dir=resolve_path(data["cache_dir"], cfg), fold=fold, split=data["split"],
                      min_pixels=data["min_class_pixels"], drop_novel=data["drop_novel_in_train"],
                      use_split_coco=data["use_split_coco"], mask_suffix=data["mask_suffix"],
                      workers=max(1, data["num_workers"]), progress=progress, log=log)


def _generators(seed: int, tag: int, index: int, count: int) -> list[np.random.Generator]:
    """``count`` independent generators that depend only on (seed, tag, index)."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence([seed, tag, index]).spawn(count)]


def episode_mask(label: np.ndarray, class_id: int, ignore_label: int = 255) -> np.ndarray:
    """1 where ``label == class_id``, ignore kept, 0 elsewhere."""
    mask = (label == class_id).astype(np.uint8)
    mask[label == ignore_label] = ignore_label
    return mask


def base_label_lut(fold: Fold, ignore_label: int = 255) -> np.ndarray:
    """Lookup table class id -> base-learner channel (novel and background -> 0, ignore kept)."""
    lut = np.zeros(256, np.uint8)
    for c in fold.base:
        lut[c] = fold.base_channel(c)
    lut[ignore_label] = ignore_label
    return lut


class EpisodeDataset(Dataset):
    """Few-shot episodes over one fold list (module docstring for the sample layout).

    Args:
        source: the data source (reading).
        fold_list: images and class pools of the mode.
        shot: K supports per episode.
        transform: the transform of query and supports (train: random, val: deterministic).
        seed: episode seed (training: the base seed; epoch e uses seed + e, see set_epoch).
        num_episodes: dataset length; None = one episode per eligible query image.
        query_order: ``sequential`` (episode i queries list[i mod N], the original test) or
            ``shuffled`` (a seeded permutation per pass); training always shuffles per epoch.
        training: training episodes (base-class extras) or evaluation (original-size label).
    """

    def __init__(self, *, source: DataSource, fold_list: FoldList, shot: int, transform, seed: int,
                 num_episodes: int | None = None, query_order: str = "sequential", training: bool,
                 ignore_label: int = 255):
        if query_order not in ("sequential", "shuffled"):
            raise ValueError(f"eval.query_order must be 'sequential' or 'shuffled', got {query_order!r}")
        if shot < 1:
            raise ValueError(f"data.shot must be >= 1, got {shot}")
        self.source, self.fold_list, self.shot, self.transform = source, fold_list, shot, transform
        self.seed, self.query_order, self.training = seed, query_order, training
        self.ignore_label = ignore_label
        self.epoch = 0
        # Queries with none of the mode's classes cannot make an episode: they are counted, not used.
        self.queries = [i for i, classes in enumerate(fold_list.classes) if classes]
        self.skipped_queries = len(fold_list.entries) - len(self.queries)
        if not self.queries:
            raise DataError(f"the {fold_list.mode} list of {source.dataset} fold {source.split} has no image "
                            "with a class of the fold; check data.root, the lists and data.split")
        self.num_episodes = len(self.queries) if num_episodes is None else int(num_episodes)
        self._check_pools()
        self._base_lut = base_label_lut(source.fold, ignore_label)
        self._order_cache: tuple[tuple, np.ndarray] | None = None

    def _check_pools(self) -> None:
        """Every class a query can pick needs K supports besides the query: K + 1 images in its
        pool (the original loops forever otherwise)."""
        needed = sorted({c for i in self.queries for c in self.fold_list.classes[i]})
        short = {c: len(self.fold_list.pools.get(c, [])) for c in needed
                 if len(self.fold_list.pools.get(c, [])) < self.shot + 1}
        if short:
            names = ", ".join(f"{self.source.fold.name(c)} (id {c}): {n}" for c, n in short.items())
            raise DataError(f"{self.shot}-shot episodes need at least {self.shot + 1} images per class in the "
                            f"{self.fold_list.mode} support pools of {self.source.dataset} fold {self.source.split}; "
                            f"too few for {names}. Add images, lower data.min_class_pixels "
                            f"({self.source.min_pixels}) or data.shot.")

    def set_epoch(self, epoch: int) -> None:
        """Training episodes of epoch e are drawn with seed + e."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_episodes

    def _query_order(self, key: tuple) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != key:
            rng = np.random.default_rng(np.random.SeedSequence(list(key)))
            self._order_cache = (key, rng.permutation(len(self.queries)))
        return self._order_cache[1]

    def episode(self, index: int) -> tuple[int, int, list[int]]:
        """(query entry index, class id, support entry indices) of episode ``index``."""
        if not 0 <= index < self.num_episodes:
            raise IndexError(f"episode {index} out of range 0..{self.num_episodes - 1}")
        n = len(self.queries)
        if self.training:
            seed, tag = self.seed + self.epoch, _TRAIN
            position = self._query_order((seed, _TRAIN, index // n))[index % n]
        else:
            seed, tag = self.seed, _VAL
            position = index % n if self.query_order == "sequential" else \
                self._query_order((seed, _VAL, index // n))[index % n]
        query = self.queries[position]
        rng = _generators(seed, tag, index, 1)[0]
        classes = self.fold_list.classes[query]
        class_id = classes[int(rng.integers(len(classes)))]
        query_image = self.fold_list.entries[query].image
        candidates = [i for i in self.fold_list.pools[class_id]
                      if i != query and self.fold_list.entries[i].image != query_image]
        supports = [candidates[int(j)] for j in rng.choice(len(candidates), self.shot, replace=False)]
        return query, class_id, supports

    def __getitem__(self, index: int) -> dict:
        query, class_id, supports = self.episode(index)
        seed = self.seed + self.epoch if self.training else self.seed
        tag = _TRAIN if self.training else _VAL
        # generator 0 drew the episode; 1 transforms the query, 2.. the supports
        rngs = _generators(seed, tag, index, self.shot + 2)[1:]
        image, label = self.source.read(self.fold_list.entries[query])
        masks = [episode_mask(label, class_id, self.ignore_label)]
        if self.training:
            masks.append(self._base_lut[label])
        query_img, query_masks = self.transform(image, masks, rngs[0])
        support_imgs, support_masks = [], []
        for k, entry_index in enumerate(supports):
            s_image, s_label = self.source.read(self.fold_list.entries[entry_index])
            s_img, (s_mask,) = self.transform(s_image, [episode_mask(s_label, class_id, self.ignore_label)],
                                              rngs[1 + k])
            support_imgs.append(s_img)
            support_masks.append(s_mask)
        sample = {
            "query_img": query_img,
            "query_mask": query_masks[0],
            "support_imgs": torch.stack(support_imgs),
            "support_masks": torch.stack(support_masks),
            "class_id": torch.tensor(class_id),
            "episode": torch.tensor(index),
        }
        if self.training:
            sample["class_base_channel"] = torch.tensor(self.source.fold.base_channel(class_id))
            sample["query_base_label"] = query_masks[1]
        else:
            sample["query_label_ori"] = torch.from_numpy(pad_label_square(masks[0], self.ignore_label)).long()
            sample["query_ori_size"] = torch.tensor(label.shape)
            sample["image_id"] = Path(self.fold_list.entries[query].image).stem
            sample["query_path"] = str(self.source.root / self.fold_list.entries[query].image)
        return sample


class BaseClassDataset(Dataset):
    """Stage 1 (the PSPNet base learner): whole images with base-class labels (base class c ->
    its channel, novel classes and background -> 0, 255 kept), from the FULL list (no filter).

    Samples: ``image`` 3xHxW, ``label`` HxW; evaluation adds ``label_ori`` (square, padded
    with 255), ``ori_size`` and ``image_id``. Sample i of epoch e is a pure function of
    (seed + e, i).
    """

    def __init__(self, *, source: DataSource, mode: str, transform, seed: int, training: bool,
                 ignore_label: int = 255):
        self.source, self.transform, self.seed, self.training = source, transform, seed, training
        self.entries = source.entries(mode)
        self.lut = base_label_lut(source.fold, ignore_label)
        self.ignore_label = ignore_label
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        entry = self.entries[index]
        image, label = self.source.read(entry)
        base_label = self.lut[label]
        rng = _generators(self.seed + self.epoch if self.training else self.seed,
                          _TRAIN if self.training else _VAL, index, 1)[0]
        img, (lbl,) = self.transform(image, [base_label], rng)
        sample = {"image": img, "label": lbl}
        if not self.training:
            sample["label_ori"] = torch.from_numpy(pad_label_square(base_label, self.ignore_label)).long()
            sample["ori_size"] = torch.tensor(label.shape)
            sample["image_id"] = Path(entry.image).stem
        return sample


def collate(batch: Sequence[dict], ignore_label: int = 255) -> dict:
    """Stack samples; square original-resolution labels of different sides are padded with
    255 to the largest; strings become lists."""
    out = {}
    for key in batch[0]:
        values = [sample[key] for sample in batch]
        if isinstance(values[0], str):
            out[key] = values
        elif key in ("query_label_ori", "label_ori"):
            side = max(v.shape[-1] for v in values)
            padded = torch.full((len(values), side, side), ignore_label, dtype=values[0].dtype)
            for i, v in enumerate(values):
                padded[i, :v.shape[0], :v.shape[1]] = v
            out[key] = padded
        else:
            out[key] = torch.stack(values)
    return out


def _train_transform(cfg: Mapping, crop_size: int, scale_range: Sequence[float]):
    data = cfg["data"]
    return train_transform(crop_size=crop_size, scale_range=scale_range, rotate_range=data["rotate_range"],
                           rotate_prob=data["rotate_prob"], blur_prob=data["blur_prob"],
                           flip_prob=data["flip_prob"], mean=data["mean"], std=data["std"],
                           ignore_label=data["ignore_label"], crop_keep_fg=data["crop_keep_fg"],
                           crop_redraws=data["crop_redraws"])


def build_episodes(cfg: Mapping, mode: str, *, source: DataSource | None = None, seed: int | None = None,
                   num_episodes: int | None = None, query_order: str | None = None) -> EpisodeDataset:
    """Training (``mode="train"``) or evaluation (``"val"``) episodes of the config's fold."""
    source = source or build_source(cfg)
    data = cfg["data"]
    training = mode == "train"
    if training:
        transform = _train_transform(cfg, data["train_size"], data["scale_range"])
    else:
        transform = val_transform(size=data["val_size"], mean=data["mean"], std=data["std"],
                                  ignore_label=data["ignore_label"])
    return EpisodeDataset(source=source, fold_list=source.fold_list(mode), shot=data["shot"], transform=transform,
                          seed=cfg["seed"] if seed is None else seed, num_episodes=num_episodes,
                          query_order=query_order or cfg["eval"]["query_order"], training=training,
                          ignore_label=data["ignore_label"])


def build_base_dataset(cfg: Mapping, mode: str, *, source: DataSource | None = None) -> BaseClassDataset:
    """Stage-1 data: the full ``mode`` list with base labels (crop/scale/val size of train.base)."""
    source = source or build_source(cfg)
    stage, data = cfg["train"]["base"], cfg["data"]
    if mode == "train":
        transform = _train_transform(cfg, stage["crop_size"], stage["scale_range"])
    else:
        transform = val_transform(size=stage["val_size"], mean=data["mean"], std=data["std"],
                                  ignore_label=data["ignore_label"])
    return BaseClassDataset(source=source, mode=mode, transform=transform, seed=cfg["seed"],
                            training=mode == "train", ignore_label=data["ignore_label"])
