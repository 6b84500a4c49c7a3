"""Every bad-input case of the data pipeline gives a clear error naming the file or key."""
import numpy as np
import pytest
from PIL import Image

from tests.conftest import data_overrides, small_voc_images, write_voc_tree
from util.config import load_config
from util.dataset import EpisodeDataset, build_episodes, build_source
from util.io import DataError, read_mask
from util.lists import FoldList, ImageEntry
from util.transforms import val_transform


@pytest.fixture()
def tree(tmp_path):
    images = small_voc_images(num_per_class=3)
    ids = sorted(images)
    return write_voc_tree(tmp_path / "voc", images, ids, ids), tmp_path / "cache"


def cfg_for(tree, *extra):
    return load_config(None, data_overrides(*tree) + list(extra))


def test_missing_data_root(tmp_path):
    with pytest.raises(DataError, match=r"data root not found: .*nowhere.*data\.root"):
        build_source(load_config(None, data_overrides(tmp_path / "nowhere", tmp_path / "c")))


def test_missing_list(tree):
    (tree[0] / "lists" / "val.txt").unlink()
    with pytest.raises(DataError, match=r"image list not found: .*val\.txt.*data\.val_list"):
        build_episodes(cfg_for(tree), "val")


def test_malformed_list_line(tree):
    (tree[0] / "lists" / "val.txt").write_text("JPEGImages/a.jpg\n")
    with pytest.raises(DataError, match=r"val\.txt:1: expected 'image_path mask_path'"):
        build_episodes(cfg_for(tree), "val")


def test_missing_mask_while_scanning(tree):
    (tree[0] / "SegmentationClassAug" / "c01_0.png").unlink()
    with pytest.raises(DataError, match=r"mask not found: .*c01_0\.png.*data\.root"):
        build_episodes(cfg_for(tree), "val")


def test_missing_image(tree):
    episodes = build_episodes(cfg_for(tree), "val")
    query, _, _ = episodes.episode(0)
    (tree[0] / episodes.fold_list.entries[query].image).unlink()
    with pytest.raises(DataError, match=r"image not found: .*\.jpg.*data\.root"):
        episodes[0]


def test_image_and_mask_of_different_sizes(tree):
    episodes = build_episodes(cfg_for(tree), "val")
    query, _, _ = episodes.episode(0)
    mask_path = tree[0] / episodes.fold_list.entries[query].mask
    mask = np.array(Image.open(mask_path))
    Image.fromarray(np.pad(mask, ((0, 3), (0, 0)))).save(mask_path)
    with pytest.raises(DataError, match=r"sizes differ: .*\.jpg is 80x60, .*\.png is 80x63"):
        episodes[0]


def test_corrupt_image(tree):
    episodes = build_episodes(cfg_for(tree), "val")
    query, _, _ = episodes.episode(0)
    (tree[0] / episodes.fold_list.entries[query].image).write_bytes(b"not a jpeg at all")
    with pytest.raises(DataError, match=r"cannot read image .*\.jpg: the file is corrupt or not an image"):
        episodes[0]


def test_corrupt_and_rgb_masks(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match=r"cannot read mask .*bad\.png"):
        read_mask(bad)
    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(rgb)
    with pytest.raises(DataError, match=r"rgb\.png has image mode 'RGB'; expected a single-channel"):
        read_mask(rgb)


def test_palette_masks_are_read_as_indices(tmp_path):
    index = np.array([[0, 1], [15, 255]], np.uint8)
    image = Image.fromarray(index, mode="P")
    image.putpalette([255, 0, 0] * 256)   # every index the same colour: a grey read would lose the classes
    image.save(tmp_path / "p.png")
    assert np.array_equal(read_mask(tmp_path / "p.png"), index)


def test_too_small_support_pool_is_an_error_at_startup(tree):
    # 3 images per class (+ mixed ones): 5-shot needs 6
    with pytest.raises(DataError, match=r"5-shot episodes need at least 6 images per class.*aeroplane \(id 1\): 4"):
        build_episodes(cfg_for(tree, "data.shot=5"), "val")


def test_queries_without_a_fold_class_are_skipped_and_counted(tree):
    source = build_source(cfg_for(tree))
    real = source.fold_list("val")
    empty = ImageEntry("JPEGImages/x.jpg", "SegmentationClassAug/x.png", {})
    fold_list = FoldList("val", real.entries + [empty], real.classes + [[]], real.pools, real.dropped)
    episodes = EpisodeDataset(source=source, fold_list=fold_list, shot=1, training=False, seed=1,
                              transform=val_transform(size=65, mean=[0, 0, 0], std=[1, 1, 1]))
    assert episodes.skipped_queries == 1 and len(episodes.queries) == len(real.entries)
    assert all(episodes.episode(i)[0] != len(real.entries) for i in range(len(episodes)))
