"""Episodes: shapes and values for 1 and 5 shots, purity in (seed, index), worker/batch independence."""
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tests.conftest import data_overrides, small_voc_images, write_voc_tree
from util.config import load_config
from util.dataset import build_base_dataset, build_episodes, build_source, collate


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("episodes")
    images = small_voc_images(num_per_class=7)
    ids = sorted(images)
    return write_voc_tree(tmp / "voc", images, ids, ids), tmp / "cache"


def config(tree, *extra):
    root, cache = tree
    return load_config(None, data_overrides(root, cache) + list(extra))


@pytest.mark.parametrize("shot", [1, 5])
@pytest.mark.parametrize("mode", ["train", "val"])
def test_sample_shapes_and_values(tree, shot, mode):
    cfg = config(tree, f"data.shot={shot}")
    episodes = build_episodes(cfg, mode, num_episodes=6)
    fold = episodes.source.fold
    for i in range(len(episodes)):
        s = episodes[i]
        assert s["query_img"].shape == (3, 65, 65) and s["query_img"].dtype == torch.float32
        assert s["query_mask"].shape == (65, 65) and s["query_mask"].dtype == torch.long
        assert s["support_imgs"].shape == (shot, 3, 65, 65) and s["support_masks"].shape == (shot, 65, 65)
        assert set(s["query_mask"].unique().tolist()) <= {0, 1, 255}
        assert set(s["support_masks"].unique().tolist()) <= {0, 1, 255}
        for k in range(shot):   # every support shows its class (the pools require >= min pixels)
            assert (s["support_masks"][k] == 1).any()
        class_id = int(s["class_id"])
        if mode == "train":
            assert class_id in fold.base and int(s["class_base_channel"]) == fold.base_channel(class_id)
            assert s["query_base_label"].shape == (65, 65)
            assert set(s["query_base_label"].unique().tolist()) <= set(range(16)) | {255}
        else:
            assert class_id in fold.novel
            h, w = s["query_ori_size"].tolist()
            assert (h, w) == (60, 80) and s["query_label_ori"].shape == (80, 80)
            assert torch.all(s["query_label_ori"][60:] == 255)
            assert isinstance(s["image_id"], str)


def test_supports_are_distinct_and_exclude_the_query(tree):
    episodes = build_episodes(config(tree, "data.shot=5"), "val", num_episodes=50)
    for i in range(50):
        query, class_id, supports = episodes.episode(i)
        assert len(set(supports)) == 5 and query not in supports
        assert all(i in episodes.fold_list.pools[class_id] for i in supports)


def test_episode_is_a_pure_function_of_seed_and_index(tree):
    cfg = config(tree, "data.shot=2")
    a = build_episodes(cfg, "val", seed=7, num_episodes=20)
    b = build_episodes(cfg, "val", seed=7, num_episodes=20)
    for i in (13, 0, 19, 5):   # any order of access
        sa, sb = a[i], b[i]
        assert all(torch.equal(sa[k], sb[k]) for k in sa if isinstance(sa[k], torch.Tensor))
    c = build_episodes(cfg, "val", seed=8, num_episodes=20)
    assert [a.episode(i) for i in range(20)] != [c.episode(i) for i in range(20)]


def test_sequential_order_cycles_the_list_and_shuffled_permutes(tree):
    cfg = config(tree)
    seq = build_episodes(cfg, "val", num_episodes=40)
    n = len(seq.queries)
    assert [seq.episode(i)[0] for i in range(n + 3)] == seq.queries + seq.queries[:3]
    shuf = build_episodes(cfg, "val", num_episodes=n, query_order="shuffled")
    order = [shuf.episode(i)[0] for i in range(n)]
    assert sorted(order) == sorted(seq.queries) and order != seq.queries


def test_training_episodes_change_with_the_epoch(tree):
    train = build_episodes(config(tree), "train")
    first = [train.episode(i) for i in range(10)]
    train.set_epoch(1)
    assert [train.episode(i) for i in range(10)] != first
    train.set_epoch(0)
    assert [train.episode(i) for i in range(10)] == first


def _loader_batches(dataset, workers, batch_size):
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate, shuffle=False)
    samples = []
    for batch in loader:
        for j in range(len(batch["episode"])):
            samples.append({k: (v[j] if isinstance(v, torch.Tensor) else v[j]) for k, v in batch.items()})
    return samples


@pytest.mark.parametrize("mode", ["train", "val"])
def test_identical_for_any_worker_count_and_batch_size(tree, mode):
    cfg = config(tree, "data.shot=2")
    episodes = build_episodes(cfg, mode, num_episodes=8)
    reference = _loader_batches(episodes, 0, 1)
    for workers, batch_size in ((2, 3), (0, 4)):
        other = _loader_batches(episodes, workers, batch_size)
        assert len(other) == len(reference)
        for r, o in zip(reference, other):
            for key in ("query_img", "query_mask", "support_imgs", "support_masks", "class_id", "episode"):
                assert torch.equal(r[key], o[key]), (key, workers, batch_size)
            if mode == "val":
                side = r["query_label_ori"].shape[-1]
                assert torch.equal(r["query_label_ori"][:side, :side], o["query_label_ori"][:side, :side])


def test_collate_pads_original_labels_with_ignore():
    a = {"query_label_ori": torch.zeros(3, 3, dtype=torch.long), "image_id": "a", "x": torch.ones(2)}
    b = {"query_label_ori": torch.ones(5, 5, dtype=torch.long), "image_id": "b", "x": torch.ones(2)}
    out = collate([a, b])
    assert out["query_label_ori"].shape == (2, 5, 5) and out["image_id"] == ["a", "b"]
    assert torch.all(out["query_label_ori"][0, 3:] == 255) and torch.all(out["query_label_ori"][0, :3, :3] == 0)


def test_base_dataset_labels_are_base_channels(tree):
    cfg = config(tree, "train.base.crop_size=49", "train.base.val_size=49")
    train = build_base_dataset(cfg, "train")
    fold = train.source.fold
    assert len(train) == len(train.source.entries("train"))      # the full list, no filtering
    seen = set()
    for i in range(len(train)):
        s = train[i]
        assert s["image"].shape == (3, 49, 49)
        seen |= set(s["label"].unique().tolist())
    assert seen <= set(range(fold.num_base_channels)) | {255} and len(seen - {0, 255}) > 5
    # a novel-class image is all background (and ignore) in base labels
    novel_index = next(i for i, e in enumerate(train.entries) if set(e.class_pixels) <= set(fold.novel))
    assert set(train[novel_index]["label"].unique().tolist()) <= {0, 255}
    val = build_base_dataset(cfg, "val")
    s = val[0]
    assert s["image"].shape == (3, 49, 49) and s["label_ori"].shape == (80, 80)


def test_lists_are_printed_and_cached(tree, capsys):
    cfg = config(tree)
    source = build_source(cfg)
    source.fold_list("val")
    out = capsys.readouterr().out
    assert "pascal fold 0 val list:" in out and "WARNING" not in out    # min_class_pixels != 2048: not compared
    assert (tree[1] / "pascal" / "fold0_val.txt").is_file()
