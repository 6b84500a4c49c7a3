"""The evaluation feature cache (util/feature_cache.py) and the benchmark command (util/bench.py).

A tiny SAM-RSP with random weights (its last bias calibrated so that about a third of the
pixels are foreground: with the random head alone every pixel would be background and the
IoUs would not notice anything) is saved as our checkpoint and tested with util.engine.test.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, tiny_toy_overrides
from util.config import load_config

CONFIG = ROOT / "config" / "toy" / "toy.yaml"
SEEDS, EPISODES = [1, 2, 3], 30
# results.json keys that describe the run rather than its numbers
RUN_KEYS = {"output_dir", "weights", "encoder_calls", "cache_hits", "cache_counts"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a busy 2-core machine two OpenMP threads make these tiny models
    ~15x slower (threads spin at every barrier while the other core runs something else)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _overrides(toy_root, work: Path, *extra) -> list[str]:
    return tiny_toy_overrides(toy_root, work / "data_cache", None, **{
        "train.stage": "sam_rsp", "eval.seeds": SEEDS, "eval.episodes": EPISODES}) + list(extra)


def _calibrated_model(cfg):
    """A random tiny SAM-RSP whose final bias puts ~1/3 of the pixels in the foreground."""
    from model import build_model
    from util.dataset import build_episodes, collate
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    episodes = build_episodes(cfg, "val", seed=0, num_episodes=6)
    batch = collate([episodes[i] for i in range(6)])
    with torch.no_grad():
        logits = model(batch["query_img"], batch["support_imgs"], batch["support_masks"])["logits"]
        margin = (logits[:, 1] - logits[:, 0]).flatten().quantile(0.66)
        model.decoder.cls[-1].bias[1] -= margin
    return model


@pytest.fixture(scope="module")
def weights(toy_root, tmp_path_factory) -> tuple[Path, Path]:
    """(work directory, checkpoint) of the calibrated tiny SAM-RSP, saved in our format."""
    from util.checkpoint import checkpoint_payload, save_checkpoint
    work = tmp_path_factory.mktemp("cache")
    cfg = load_config(CONFIG, _overrides(toy_root, work))
    model = _calibrated_model(cfg)
    path = save_checkpoint(checkpoint_payload(model, stage="sam_rsp"), work / "tiny_sam_rsp.pth")
    return work, path


def run_test(toy_root, weights, out: Path, *extra) -> dict:
    from util.engine import test
    work, path = weights
    cfg = load_config(CONFIG, _overrides(toy_root, work, f"weights={path}", f"output_dir={out}", *extra))
    test(cfg, progress=False)
    return json.loads((out / "results.json").read_text())


def numbers(results: dict) -> dict:
    return {k: v for k, v in results.items() if k not in RUN_KEYS}


def distinct_queries(toy_root, work: Path, *extra) -> int:
    """Distinct query images over every seed of the protocol."""
    from util.dataset import build_episodes
    cfg = load_config(CONFIG, _overrides(toy_root, work, *extra))
    images = set()
    for seed in SEEDS:
        episodes = build_episodes(cfg, "val", seed=seed, num_episodes=EPISODES)
        images |= {episodes.fold_list.entries[episodes.episode(i)[0]].image for i in range(EPISODES)}
    return len(images)


# ---------------------------------------------------------------------------------------------
# Cached == uncached
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("order", ["sequential", "shuffled"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_cached_results_equal_uncached(toy_root, weights, tmp_path, order, batch_size):
    common = [f"eval.query_order={order}", f"eval.batch_size={batch_size}"]
    plain = run_test(toy_root, weights, tmp_path / "plain", "eval.cache=none", *common)
    cached = run_test(toy_root, weights, tmp_path / "cached", "eval.cache=memory", "eval.cache_bam_features=true",
                      *common)
    assert numbers(cached) == numbers(plain)
    assert plain["miou_mean"] > 0 and 0.1 < plain["fbiou_mean"] < 0.9   # the calibrated model predicts both classes
    assert plain["encoder_calls"] == len(SEEDS) * EPISODES and plain["cache_hits"] == 0
    distinct = distinct_queries(toy_root, weights[0], *common)
    assert distinct < len(SEEDS) * EPISODES           # the protocol does repeat queries
    assert cached["encoder_calls"] == distinct
    assert cached["cache_hits"] == len(SEEDS) * EPISODES - distinct
    counts = cached["cache_counts"]
    assert counts["bam_feature_calls"] == distinct and counts["not_admitted"] == 0


def test_cached_embedding_is_the_encoder_output(toy_root, weights):
    """The tensors handed to the model are bit-identical to a direct computation (batch 1)."""
    from model import build_model
    from util.checkpoint import load_weights
    from util.dataset import build_episodes, collate
    from util.feature_cache import CachedEpisodeRunner, FeatureCache
    work, path = weights
    cfg = load_config(CONFIG, _overrides(toy_root, work))
    model = build_model(cfg).eval()
    load_weights(model, path)
    episodes = build_episodes(cfg, "val", seed=1, num_episodes=4)
    runner = CachedEpisodeRunner(torch.device("cpu"), cache=FeatureCache(max_bytes=1 << 30), transform={})
    with torch.no_grad():
        for i in (0, 1, 0):
            batch = collate([episodes[i]])
            out = runner(model, batch)
            direct = model(batch["query_img"], batch["support_imgs"], batch["support_masks"])
            assert torch.equal(out["logits"], direct["logits"])
            assert torch.equal(out["prompt_logits"], direct["prompt_logits"])
    assert runner.stats["encoder_calls"] == 2 and runner.stats["cache_hits"] == 1


# ---------------------------------------------------------------------------------------------
# Memory policy
# ---------------------------------------------------------------------------------------------

def _fake_fetch(runner, ids, calls):
    def compute(x):
        calls.append(len(x))
        return {"embedding": torch.zeros(len(x), 256)}          # 1 KiB per image
    return runner.fetch("sam", image_ids=ids, digests=ids, inputs=torch.zeros(len(ids), 3, 2, 2), compute=compute,
                        counters=("encoder_calls", "cache_hits"))


def test_memory_bound_keeps_the_first_entries():
    """Sequential order cycles through the list: with room for 4 of 10 images, keeping the first
    entries hits 4 per later cycle (LRU would hit none)."""
    from util.feature_cache import CachedEpisodeRunner, FeatureCache
    runner = CachedEpisodeRunner(torch.device("cpu"), cache=FeatureCache(max_bytes=4 * 1024), transform={})
    calls = []
    for episode in range(30):
        _fake_fetch(runner, [f"img{episode % 10}"], calls)
    assert runner.stats["encoder_calls"] == 10 + 6 + 6 and runner.stats["cache_hits"] == 8
    assert sorted(k[1] for k in runner.cache.memory) == ["img0", "img1", "img2", "img3"]
    assert runner.cache.bytes_used <= 4 * 1024 and runner.stats["not_admitted"] == 18


def test_a_batch_computes_its_misses_once():
    from util.feature_cache import CachedEpisodeRunner, FeatureCache
    runner = CachedEpisodeRunner(torch.device("cpu"), cache=FeatureCache(max_bytes=1 << 20), transform={})
    calls = []
    _fake_fetch(runner, ["a", "b"], calls)
    out = _fake_fetch(runner, ["b", "c", "c", "a"], calls)
    assert calls == [2, 1] and out["embedding"].shape == (4, 256)
    assert runner.stats["encoder_calls"] == 3 and runner.stats["cache_hits"] == 2


def test_bam_features_never_crowd_out_sam_embeddings():
    """With the query list announced, BAM entries are admitted only beside the room the SAM
    embeddings of the whole list need."""
    from util.feature_cache import FeatureCache
    cache = FeatureCache(max_bytes=14 * 1024)
    cache.expected_images = 10
    sam, bam = {"embedding": torch.zeros(256)}, {"layer4": torch.zeros(256)}
    for i in range(10):
        cache.admit("sam", ("sam", str(i), ""), sam)
        cache.admit("bam", ("bam", str(i), ""), bam)
    assert cache.entries_by_part["sam"] == 10 and cache.entries_by_part["bam"] == 4
    assert cache.bytes_used <= 14 * 1024


# ---------------------------------------------------------------------------------------------
# Disk store: reuse, corruption, staleness, float16
# ---------------------------------------------------------------------------------------------

def _entry_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.fc"))


def test_disk_cache_is_reused_and_corrupt_entries_are_recomputed(toy_root, weights, tmp_path):
    store = tmp_path / "features"
    plain = run_test(toy_root, weights, tmp_path / "plain", "eval.cache=none")
    first = run_test(toy_root, weights, tmp_path / "first", f"eval.cache_dir={store}")
    distinct = first["encoder_calls"]
    files = _entry_files(store)
    assert first["cache_counts"]["disk_writes"] == distinct == len(files)
    assert not list(store.rglob("*.tmp"))                       # atomic writes leave no temporaries

    second = run_test(toy_root, weights, tmp_path / "second", f"eval.cache_dir={store}")
    assert second["encoder_calls"] == 0 and second["cache_counts"]["disk_hits"] == distinct
    assert numbers(second) == numbers(first) == numbers(plain)

    # truncated, garbage, one flipped payload byte (checksum), a header that is not JSON
    damaged = files[:4]
    damaged[0].write_bytes(damaged[0].read_bytes()[:-100])
    damaged[1].write_bytes(os.urandom(2000))
    data = bytearray(damaged[2].read_bytes())
    data[-7] ^= 0xFF
    damaged[2].write_bytes(bytes(data))
    data = bytearray(damaged[3].read_bytes())
    data[20:30] = b"\x00" * 10
    damaged[3].write_bytes(bytes(data))
    third = run_test(toy_root, weights, tmp_path / "third", f"eval.cache_dir={store}")
    counts = third["cache_counts"]
    assert counts["disk_rejected"] == 4 and third["encoder_calls"] == 4 and counts["disk_writes"] == 4
    assert numbers(third) == numbers(plain)
    fourth = run_test(toy_root, weights, tmp_path / "fourth", f"eval.cache_dir={store}")
    assert fourth["encoder_calls"] == 0 and fourth["cache_counts"]["disk_rejected"] == 0   # rewritten


@pytest.mark.parametrize("stale", ["weights", "transform", "digest", "dtype", "shape"])
def test_stale_disk_entry_is_detected_and_recomputed(toy_root, weights, tmp_path, stale):
    """An entry written for other weights / another transform / another input / another dtype
    or shape sits where the cache looks: it is rejected, recomputed and overwritten."""
    from model import build_model
    from util.checkpoint import load_weights
    from util.dataset import build_episodes, collate
    from util.feature_cache import CachedEpisodeRunner, FeatureCache, read_entry, read_header, write_entry
    work, path = weights
    cfg = load_config(CONFIG, _overrides(toy_root, work))
    model = build_model(cfg).eval()
    load_weights(model, path)
    batch = collate([build_episodes(cfg, "val", seed=1, num_episodes=1)[0]])
    transform = {"val_size": 65, "mean": [1.0], "std": [2.0]}
    messages = []

    def fresh_runner():
        cache = FeatureCache(max_bytes=1 << 30, disk_dir=tmp_path, log=messages.append)
        return CachedEpisodeRunner(torch.device("cpu"), cache=cache, transform=transform)

    with torch.no_grad():
        direct = model(batch["query_img"], batch["support_imgs"], batch["support_masks"])["logits"]
        expected = model.embed_query(batch["query_img"])[0]
        fresh_runner()(model, batch)
        (file,) = _entry_files(tmp_path)
        key = read_header(file)["key"]
        assert torch.equal(read_entry(file, key=key, dtype=torch.float32)["embedding"], expected)
        poison = torch.full_like(expected, 7.0)
        if stale == "weights":
            write_entry(file, key={**key, "weights_sha256": "0" * 64}, entry={"embedding": poison})
        elif stale == "transform":
            write_entry(file, key={**key, "transform": {**transform, "val_size": 473}}, entry={"embedding": poison})
        elif stale == "digest":
            write_entry(file, key={**key, "input_digest": "f" * 32}, entry={"embedding": poison})
        elif stale == "dtype":
            write_entry(file, key=key, entry={"embedding": poison.half()})
        else:
            write_entry(file, key=key, entry={"embedding": poison[:, :4]})
        runner = fresh_runner()
        out = runner(model, batch)["logits"]
    assert runner.stats["disk_rejected"] == 1 and runner.stats["encoder_calls"] == 1 and runner.stats["cache_hits"] == 0
    assert torch.equal(out, direct)
    assert any("recomputing" in m for m in messages)
    assert torch.equal(read_entry(file, key=key, dtype=torch.float32)["embedding"], expected)   # overwritten


def test_float16_cache_stays_close_and_replaces_float32_entries(toy_root, weights, tmp_path):
    store = tmp_path / "features"
    exact = run_test(toy_root, weights, tmp_path / "f32", f"eval.cache_dir={store}")
    half = run_test(toy_root, weights, tmp_path / "f16", f"eval.cache_dir={store}", "eval.cache_dtype=float16")
    distinct = exact["encoder_calls"]
    # every float32 entry is rejected (dtype) and rewritten in float16
    assert half["cache_counts"]["disk_rejected"] == distinct and half["encoder_calls"] == distinct
    again = run_test(toy_root, weights, tmp_path / "f16b", f"eval.cache_dir={store}", "eval.cache_dtype=float16")
    assert again["encoder_calls"] == 0 and numbers(again) == numbers(half)   # hits give the same numbers as misses
    diff = abs(half["miou_mean"] - exact["miou_mean"])
    fb_diff = abs(half["fbiou_mean"] - exact["fbiou_mean"])
    print(f"float16 cache: mIoU {100 * half['miou_mean']:.4f} vs float32 {100 * exact['miou_mean']:.4f} "
          f"(|diff| {100 * diff:.4f} points), FB-IoU |diff| {100 * fb_diff:.4f} points")
    assert diff < 0.005 and fb_diff < 0.005           # half a point


# ---------------------------------------------------------------------------------------------
# Attention implementations, frozen-encoder settings
# ---------------------------------------------------------------------------------------------

def test_sdpa_and_reference_sam_rsp_agree(toy_root, tmp_path):
    """The whole tiny SAM-RSP (encoder and decoder blocks) with either attention."""
    from model import build_model, set_attention
    from util.dataset import build_episodes, collate
    cfg = load_config(CONFIG, _overrides(toy_root, tmp_path))
    model = _calibrated_model(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "rel_pos" in name:                       # zero-initialised: make the bias matter
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    batch = collate([build_episodes(cfg, "val", seed=1, num_episodes=3)[i] for i in range(3)])
    with torch.no_grad():
        sdpa = model(batch["query_img"], batch["support_imgs"], batch["support_masks"])["logits"]
        reference = set_attention(model, "reference")(batch["query_img"], batch["support_imgs"],
                                                     batch["support_masks"])["logits"]
    assert (sdpa - reference).abs().max().item() <= 1e-4


def test_amp_is_a_logged_no_op_on_cpu(toy_root, tmp_path):
    from model import build_model
    from util.feature_cache import prepare_frozen_encoders
    cfg = load_config(CONFIG, _overrides(toy_root, tmp_path))
    model = build_model(cfg).eval()
    messages = []
    prepare_frozen_encoders(model, device=torch.device("cpu"), amp=True, compile=False, log=messages.append)
    assert model.frozen_amp_dtype is None and any("does nothing on cpu" in m for m in messages)


# ---------------------------------------------------------------------------------------------
# The benchmark command
# ---------------------------------------------------------------------------------------------

def test_bench_command_on_the_toy(toy_root, tmp_path):
    overrides = [f"data.root={toy_root}", f"data.cache_dir={tmp_path / 'data_cache'}", "data.num_workers=0",
                 "eval.seeds=[1,2]", "eval.episodes=20"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "util.bench", str(CONFIG), *overrides, "--episodes", "2",
                             "--steps", "2", "--warmup", "1", "--compare", "--json", str(tmp_path / "bench.json")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    for row in ("RANDOM weights", "eval episode", "SAM encoder call", "train step", "peak memory, eval",
                "peak memory, train", "encoder calls", "wall time", "checkpoint"):
        assert row in out, (row, out)
    report = json.loads((tmp_path / "bench.json").read_text())
    ours, reference = report["ours"], report["reference"]
    assert ours["protocol"]["measured"] and ours["protocol"]["cached"]["encoder_calls"] < 40
    assert reference["protocol"]["uncached"]["encoder_calls"] == 40
    assert ours["checkpoint"]["weights_only_mb"] > 0 and ours["eval"]["episode_s"]["median"] > 0
