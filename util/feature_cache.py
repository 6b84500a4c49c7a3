"""Never run a frozen encoder twice on the same query image during a test run.

The test protocol (5 seeds x 1000 episodes) queries each image of the val list many times
(a PASCAL fold has 336-592 images; ``eval.query_order=sequential`` cycles through the list),
and the val transform is deterministic, so the work of the FROZEN encoders on a query image is
the same in every episode. :class:`CachedEpisodeRunner` computes it once per test run -- across
all seeds -- and reuses it:

* part ``sam``: the SAM image embedding of the query (``SAMRSP.embed_query``),
  out_chans x g x g = 256 x 64 x 64 float32 = 4 MiB per image at full size. This is the
  expensive part (ViT-L at 1024: tens of seconds per image on a CPU, most of an episode).
* part ``bam``: BAM's query backbone features (``BAM.extract_query_features``: layer2 + layer3
  + layer4 at 60 x 60 = 512 + 1024 + 2048 channels = 51.6 MB per image at full size with
  ResNet-50, 13x the bytes of an embedding for a fraction of its compute: one ResNet pass).
  Optional (``eval.cache_bam_features``, off by default), in memory only, and only while the
  SAM embeddings of every image of the query list still fit beside them.
* not cached: support features. They depend on the (image, class) pair, repeat less often
  and cost 51.6 MB each; BAM already encodes all B*K supports in one backbone call.

Everything the cache keeps (memory and disk, every part) is stored in ``eval.cache_dtype``.

Memory: a byte bound (``eval.cache_mb``). Eviction policy: NONE -- once the bound is reached
new entries are not admitted ("keep the first entries"). With sequential queries the
episodes cycle through the list; LRU with a bound smaller than the list would evict every
entry just before it is needed again (0 hits), while keeping the first entries hits on all
of them in every later cycle. With shuffled queries every policy is equivalent on average.

Disk (``eval.cache_dir``, optional; SAM embeddings only): one file per image,
``<cache_dir>/sam-<weights sha256[:16]>/<image id>-<input digest[:16]>.fc`` (float32: results
identical to the uncached run; float16: half the bytes, results within rounding -- measured on
the trained toy model: mIoU 32.9110 -> 32.9162, see tests/test_cache.py). A file is
``MAGIC | header length (8 bytes LE) | JSON header | raw tensor bytes``; the header repeats the
full key (image id, digest of the exact input tensor -- it covers val_size, mean/std and
every other detail of the transform --, the transform settings, sha256 of the frozen weights,
the compute settings: attention implementation, autocast dtype, torch.compile, device type),
the stored dtype and shape and the sha256 of the payload. A file whose magic, header, key,
dtype, shape, size (truncation) or checksum does not match is never used: it is counted in
``disk_rejected``, recomputed and overwritten. Files are written atomically (temporary file in
the same directory + ``os.replace``), so concurrent processes never read a partial file.

Every value handed to the model is the stored value (rounded to ``cache_dtype``) whether it
was a hit or a miss, so results do not depend on what the cache held. In float32 it is
bit-identical to what an uncached run computes: in eval mode the frozen encoders process the
images of a batch one at a time (:func:`model.common.one_image_at_a_time`), so an image's
features do not depend on the batch it came in (CPU/GPU kernels are not batch-invariant, ~1e-6)
and cached and uncached tests give identical results at any ``eval.batch_size``.

The misses of a batch go to the encoder in one call; the counters (``encoder_calls``,
``cache_hits``, ...) end up in the test log and results.json.
"""
from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from model.attention import SDPAAttention
from model.sam_rsp import SAMRSP
from util.atomic import write_atomic
from util.config import ConfigError, resolve_path
from util.evaluation import EpisodeRunner, episode_inputs

MAGIC = b"SAMRSPFC"
FORMAT = 1
MIB = 1 << 20
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
Entry = Dict[str, torch.Tensor]           # one image's tensors of one part (no batch dimension)


# ---------------------------------------------------------------------------------------------
# Digests
# ---------------------------------------------------------------------------------------------

def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor (CPU, contiguous), any dtype (bfloat16 included)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def tensor_digest(tensor: torch.Tensor) -> str:
    """blake2b-128 hex of a tensor's dtype, shape and bytes (the query image: 3xHxW float32)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    h.update(_tensor_bytes(tensor))
    return h.hexdigest()


def weights_sha256(modules: Mapping[str, nn.Module]) -> str:
    """sha256 over the state dicts of ``modules`` (name -> module): every tensor's name, dtype,
    shape and bytes, in sorted order. ViT-L (1.2 GB) takes a second or two; computed once."""
    h = hashlib.sha256()
    for prefix in sorted(modules):
        for name, value in sorted(modules[prefix].state_dict().items()):
            h.update(f"{prefix}.{name}|{value.dtype}|{tuple(value.shape)}|".encode())
            h.update(_tensor_bytes(value))
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Disk entries
# ---------------------------------------------------------------------------------------------

class CacheEntryError(ValueError):
    """A disk entry that must not be used (corrupt, truncated or written for another key)."""


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)[:100] or "_"


def write_entry(path: Path, *, key: Mapping, entry: Entry) -> None:
    """Write ``entry`` (name -> tensor, already in the storage dtype) atomically."""
    names = sorted(entry)
    blobs = [bytes(_tensor_bytes(entry[n])) for n in names]
    payload_hash = hashlib.sha256()
    for blob in blobs:
        payload_hash.update(blob)
    header = {"format": FORMAT, "key": dict(key), "payload_sha256": payload_hash.hexdigest(),
              "tensors": [{"name": n, "dtype": str(entry[n].dtype).replace("torch.", ""),
                           "shape": list(entry[n].shape), "nbytes": len(b)} for n, b in zip(names, blobs)]}
    header_bytes = json.dumps(header, sort_keys=True).encode()

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(MAGIC + struct.pack("<Q", len(header_bytes)) + header_bytes)
            for blob in blobs:
                f.write(blob)

    write_atomic(path, write)


def read_header(path: Path) -> Dict[str, object]:
    """The JSON header of a disk entry (for inspection; :func:`read_entry` verifies it)."""
    with open(path, "rb") as f:
        head = f.read(len(MAGIC) + 8)
        if len(head) < len(MAGIC) + 8 or head[:len(MAGIC)] != MAGIC:
            raise CacheEntryError("not a feature-cache file (bad magic or too short)")
        (header_len,) = struct.unpack("<Q", head[len(MAGIC):])
        return json.loads(f.read(header_len).decode())


def read_entry(path: Path, *, key: Mapping, dtype: torch.dtype,
               shapes: Optional[Mapping[str, Tuple[int, ...]]] = None) -> Entry:
    """Read and verify a disk entry; :class:`CacheEntryError` says why it cannot be used.

    Checks: magic, header, key (every field), dtype, shapes (when known), sizes (a truncated
    or padded file) and the payload's sha256.
    """
    data = path.read_bytes()
    head = len(MAGIC) + 8
    if len(data) < head or data[:len(MAGIC)] != MAGIC:
        raise CacheEntryError("not a feature-cache file (bad magic or too short)")
    (header_len,) = struct.unpack("<Q", data[len(MAGIC):head])
    if header_len > len(data) - head:
        raise CacheEntryError("truncated header")
    try:
        header = json.loads(data[head:head + header_len].decode())
        tensors = header["tensors"]
        stored_key, stored_hash = header["key"], header["payload_sha256"]
    except (ValueError, KeyError, TypeError) as err:
        raise CacheEntryError(f"unreadable header ({type(err).__name__})") from None
    if header.get("format") != FORMAT:
        raise CacheEntryError(f"format {header.get('format')!r}, expected {FORMAT}")
    if stored_key != dict(key):
        diff = sorted(k for k in set(stored_key) | set(key) if stored_key.get(k) != key.get(k))
        raise CacheEntryError(f"written for another key (differs in {', '.join(diff)})")
    payload = memoryview(data)[head + header_len:]
    expected_dtype = str(dtype).replace("torch.", "")
    entry: Entry = {}
    offset = 0
    for spec in tensors:
        if spec.get("dtype") != expected_dtype:
            raise CacheEntryError(f"dtype {spec.get('dtype')}, expected {expected_dtype}")
        shape = tuple(int(s) for s in spec["shape"])
        if shapes is not None and shapes.get(spec["name"]) != shape:
            raise CacheEntryError(f"{spec['name']}: shape {shape}, expected {shapes.get(spec['name'])}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * torch.tensor([], dtype=dtype).element_size()
        if spec.get("nbytes") != nbytes:
            raise CacheEntryError(f"{spec['name']}: {spec.get('nbytes')} bytes for shape {shape}")
        if offset + nbytes > len(payload):
            raise CacheEntryError("truncated payload")
        entry[spec["name"]] = torch.frombuffer(bytearray(payload[offset:offset + nbytes]), dtype=dtype).reshape(shape)
        offset += nbytes
    if offset != len(payload):
        raise CacheEntryError(f"{len(payload) - offset} unexpected trailing bytes")
    if shapes is not None and set(entry) != set(shapes):
        raise CacheEntryError(f"tensors {sorted(entry)}, expected {sorted(shapes)}")
    if hashlib.sha256(payload).hexdigest() != stored_hash:
        raise CacheEntryError("payload checksum mismatch")
    return entry


# ---------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------

#: encoder_calls / cache_hits: query images the main frozen encoder (SAM's; BAM's backbone for a
#: BAM model) computed / took from the cache (memory or disk); bam_feature_calls / _hits: the same
#: for BAM's query features inside SAM-RSP; disk_hits: hits read from disk; disk_rejected: disk
#: entries detected as stale or corrupt (then recomputed); not_admitted: entries computed while
#: the memory bound was reached.
COUNTERS = ("encoder_calls", "cache_hits", "disk_hits", "disk_writes", "disk_rejected", "disk_errors",
            "not_admitted", "bam_feature_calls", "bam_feature_hits")


class FeatureCache:
    """Per-image frozen-encoder outputs: a bounded in-memory store plus an optional disk store.

    Owned by one test run (no global state). Entries are dicts name -> tensor (one image, no
    batch dimension), kept on the CPU in ``storage_dtype``.

    Args:
        max_bytes: memory bound; entries that do not fit are not admitted (no eviction).
        storage_dtype: float32 (exact) or float16.
        disk_dir: root of the disk store (None = memory only).
        log: receives one line per rejected disk entry (the first ``log_limit`` of them).
    """

    def __init__(self, *, max_bytes: int, storage_dtype: torch.dtype = torch.float32,
                 disk_dir: Optional[Path] = None, log: Callable[[str], None] = print, log_limit: int = 5) -> None:
        if storage_dtype not in STORAGE_DTYPES.values():
            raise ValueError(f"cache dtype must be one of {list(STORAGE_DTYPES)}, got {storage_dtype}")
        self.max_bytes = int(max_bytes)
        self.storage_dtype = storage_dtype
        self.disk_dir = Path(disk_dir) if disk_dir else None
        self.log, self.log_limit = log, log_limit
        self.memory: Dict[Tuple[str, str, str], Entry] = {}
        self.bytes_used = 0
        self.bytes_by_part: Dict[str, int] = {}
        self.entries_by_part: Dict[str, int] = {}
        self.counts: Dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.expected_images: Optional[int] = None   # size of the query list: SAM embeddings still to come

    # -- memory -----------------------------------------------------------------------------
    @staticmethod
    def entry_bytes(entry: Entry) -> int:
        return sum(t.numel() * t.element_size() for t in entry.values())

    def _sam_reserve(self) -> int:
        """Bytes kept free for the SAM embeddings of list images not cached yet."""
        if self.expected_images is None or not self.entries_by_part.get("sam"):
            return 0
        per_image = self.bytes_by_part["sam"] // self.entries_by_part["sam"]
        return max(0, self.expected_images - self.entries_by_part["sam"]) * per_image

    def admit(self, part: str, key: Tuple[str, str, str], entry: Entry) -> bool:
        """Keep ``entry`` in memory if it fits (other parts only beside the SAM reserve)."""
        size = self.entry_bytes(entry)
        reserve = 0 if part == "sam" else self._sam_reserve()
        if self.bytes_used + size + reserve > self.max_bytes:
            self.counts["not_admitted"] += 1
            return False
        self.memory[key] = entry
        self.bytes_used += size
        self.bytes_by_part[part] = self.bytes_by_part.get(part, 0) + size
        self.entries_by_part[part] = self.entries_by_part.get(part, 0) + 1
        return True

    # -- disk -------------------------------------------------------------------------------
    def disk_path(self, part: str, weights_id: str, image_id: str, digest: str) -> Path:
        return self.disk_dir / f"{part}-{weights_id[:16]}" / f"{_safe_name(image_id)}-{digest[:16]}.fc"

    def disk_read(self, path: Path, key: Mapping, shapes: Optional[Mapping[str, Tuple[int, ...]]]) -> Optional[Entry]:
        """The verified entry at ``path``, or None (missing, or rejected and counted)."""
        if not path.is_file():
            return None
        try:
            return read_entry(path, key=key, dtype=self.storage_dtype, shapes=shapes)
        except (CacheEntryError, OSError) as err:
            self.counts["disk_rejected"] += 1
            if self.counts["disk_rejected"] <= self.log_limit:
                self.log(f"feature cache: ignoring {path} ({err}); recomputing it")
            return None

    def disk_write(self, path: Path, key: Mapping, entry: Entry) -> None:
        try:
            write_entry(path, key=key, entry=entry)
            self.counts["disk_writes"] += 1
        except OSError as err:   # a full or read-only disk must not stop the evaluation
            self.counts["disk_errors"] += 1
            if self.counts["disk_errors"] <= self.log_limit:
                self.log(f"feature cache: cannot write {path} ({err}); continuing without it")

    def summary(self) -> Dict[str, object]:
        return {**self.counts, "memory_entries": len(self.memory), "memory_mb": round(self.bytes_used / MIB, 1),
                "memory_mb_by_part": {k: round(v / MIB, 1) for k, v in self.bytes_by_part.items()}}


# ---------------------------------------------------------------------------------------------
# The runner
# ---------------------------------------------------------------------------------------------

def _attention_impl(module: nn.Module) -> str:
    kinds = {"sdpa" if isinstance(m, SDPAAttention) else "reference"
             for m in module.modules() if type(m).__name__ in ("Attention", "SDPAAttention")}
    return "+".join(sorted(kinds)) or "none"


class CachedEpisodeRunner(EpisodeRunner):
    """:class:`~util.evaluation.EpisodeRunner` that takes the frozen encoders' work on each
    query image from a :class:`FeatureCache` (module docstring).

    ``batch["image_id"]`` and the digest of the query tensor identify a query; the batch's
    misses go through the encoder in ONE batched call. Works with a ``SAMRSP`` (SAM embedding,
    and its generator's query features when ``cache_bam_features``) and with a ``BAM`` or an
    ``SCCAN`` tested on its own (their query backbone features); any other model runs uncached.

    Args:
        device: where the model runs.
        cache: the store (owned by this runner for one test run).
        transform: the val-transform settings written into disk keys (val_size, mean, std).
        cache_bam_features: also cache BAM's query backbone features (memory only).
        log: where the one-time notes go.
    """

    def __init__(self, device: torch.device, *, cache: FeatureCache, transform: Mapping,
                 cache_bam_features: bool = False, log: Callable[[str], None] = print) -> None:
        super().__init__(device)
        self.cache = cache
        self.stats = cache.counts      # encoder_calls, cache_hits, ... (FeatureCache.summary for all)
        self.transform = dict(transform)
        self.cache_bam_features = bool(cache_bam_features)
        self.log = log
        self._contexts: Dict[str, Dict[str, object]] = {}   # part -> disk key fields (weights hash, ...)

    def begin(self, dataset) -> None:
        """Reserve memory for the SAM embeddings of the whole query list (an upper bound of the
        distinct query images), so BAM features never crowd them out."""
        queries = getattr(dataset, "queries", None)
        if queries is not None:
            self.cache.expected_images = max(self.cache.expected_images or 0, len(queries))

    def _context(self, part: str, modules: Mapping[str, nn.Module], compute: Mapping[str, object]) -> Dict[str, object]:
        """The run-constant part of the disk key of ``part`` (weights hashed once)."""
        if part not in self._contexts:
            self._contexts[part] = {"part": part, "weights_sha256": weights_sha256(modules),
                                    "transform": self.transform, "compute": dict(compute)}
        return self._contexts[part]

    def fetch(self, part: str, *, image_ids: Sequence[str], digests: Sequence[str], inputs: torch.Tensor,
              compute: Callable[[torch.Tensor], Entry], counters: Tuple[str, str],
              disk: Optional[Tuple[Mapping[str, nn.Module], Mapping[str, object], Mapping[str, Tuple[int, ...]]]] = None
              ) -> Entry:
        """Batched entries of ``part`` for the batch's query images.

        inputs: B x 3 x H x W on the device; compute(images b x 3 x H x W) -> dict of b x ...
        tensors; counters: (miss counter, hit counter); disk: (frozen modules, compute settings,
        per-image shapes) to use the disk store, None for memory only.
        Returns dict name -> B x ... tensors (float32) on the device.
        """
        cache = self.cache
        dtype = cache.storage_dtype
        found: Dict[Tuple[str, str, str], Entry] = {}
        missing: List[int] = []
        pending = set()                     # keys of ``missing``: an image twice in a batch runs once
        disk_keys: Dict[int, Tuple[Path, Dict[str, object]]] = {}
        for i, (image_id, digest) in enumerate(zip(image_ids, digests)):
            key = (part, image_id, digest)
            if key in found or key in pending:
                continue
            if key in cache.memory:
                found[key] = cache.memory[key]
                cache.counts[counters[1]] += 1
                continue
            if disk is not None and cache.disk_dir is not None:
                context = self._context(part, disk[0], disk[1])
                disk_key = {**context, "image_id": image_id, "input_digest": digest}
                path = cache.disk_path(part, str(context["weights_sha256"]), image_id, digest)
                entry = cache.disk_read(path, disk_key, disk[2])
                if entry is not None:
                    found[key] = entry
                    cache.admit(part, key, entry)
                    cache.counts["disk_hits"] += 1
                    cache.counts[counters[1]] += 1
                    continue
                disk_keys[i] = (path, disk_key)
            missing.append(i)
            pending.add(key)
        if missing:
            computed = compute(inputs[missing])
            cache.counts[counters[0]] += len(missing)
            for j, i in enumerate(missing):
                key = (part, image_ids[i], digests[i])
                # a copy: a slice would keep the whole batch tensor alive in memory
                entry = {name: value[j].detach().to(device="cpu", dtype=dtype, copy=True)
                         for name, value in computed.items()}
                found[key] = entry
                cache.admit(part, key, entry)
                if i in disk_keys:
                    cache.disk_write(disk_keys[i][0], disk_keys[i][1], entry)
        names = next(iter(found.values())).keys()
        return {name: torch.stack([found[(part, image_id, digest)][name]
                                   for image_id, digest in zip(image_ids, digests)]).to(self.device, torch.float32)
                for name in names}

    def __call__(self, model: nn.Module, batch: Mapping) -> dict:
        query_img, support_imgs, support_masks = episode_inputs(batch, self.device)
        image_ids = [str(i) for i in batch["image_id"]]
        digests = [tensor_digest(img) for img in batch["query_img"]]   # CPU tensors from the loader
        device_type = self.device.type
        if isinstance(model, SAMRSP):
            compute_settings = {"attention": _attention_impl(model.image_encoder),
                                "autocast": str(model.frozen_amp_dtype), "device": device_type,
                                "compiled": bool(getattr(model.image_encoder, "_compiled_call_impl", None))}
            grid = model.grid_size
            shapes = {"embedding": (int(model.image_encoder.neck[0].out_channels), grid, grid)}
            embedding = self.fetch(
                "sam", image_ids=image_ids, digests=digests, inputs=query_img,
                compute=lambda x: {"embedding": model.embed_query(x)}, counters=("encoder_calls", "cache_hits"),
                disk=({"image_encoder": model.image_encoder}, compute_settings, shapes))["embedding"]
            query_feats = None
            if self.cache_bam_features:
                query_feats = self.fetch("bam", image_ids=image_ids, digests=digests, inputs=query_img,
                                         compute=lambda x: model.query_features(x),
                                         counters=("bam_feature_calls", "bam_feature_hits"))
            return model(query_img, support_imgs, support_masks, query_embedding=embedding, query_feats=query_feats)
        if hasattr(model, "extract_query_features"):
            # a prompt generator tested on its own (BAM, SCCAN): its frozen query backbone features
            query_feats = self.fetch(type(model).__name__.lower(), image_ids=image_ids, digests=digests, inputs=query_img,
                                     compute=model.extract_query_features, counters=("encoder_calls", "cache_hits"))
            return model(query_img, support_imgs, support_masks, query_feats=query_feats)
        return super().__call__(model, batch)


# ---------------------------------------------------------------------------------------------
# Set-up from the config
# ---------------------------------------------------------------------------------------------

def amp_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for the frozen encoders on ``device``: bfloat16 on CUDA (float16 on
    GPUs without bfloat16), None on other devices (CPU autocast is slower than float32 there)."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def prepare_frozen_encoders(model: nn.Module, *, device: torch.device, amp: bool, compile: bool,
                            log: Callable[[str], None] = print) -> None:
    """Speed settings of the frozen encoders of a ``SAMRSP`` (``eval.amp`` / ``train.amp``,
    ``eval.compile``); a no-op with a log line where they do not apply.

    amp: autocast SAM's encoder and BAM to bfloat16/float16 on CUDA (their outputs are cast
    back to float32; the decoder and the prototype stay float32). compile: ``torch.compile``
    the SAM image encoder in place (state-dict keys unchanged).
    """
    if not isinstance(model, SAMRSP):
        if amp or compile:
            log(f"note: amp/compile apply to SAM-RSP's frozen encoders; {type(model).__name__} runs as is")
        return
    if amp:
        dtype = amp_dtype(device)
        if dtype is None:
            log(f"note: amp=true does nothing on {device.type} (autocast of the frozen encoders is for CUDA)")
        else:
            log(f"frozen encoders autocast to {str(dtype).replace('torch.', '')}")
        model.frozen_amp_dtype = dtype
    if compile:
        model.image_encoder.compile()
        log("SAM image encoder compiled with torch.compile (the first call is slow)")


def build_runner(cfg: Mapping, *, device: torch.device, log: Callable[[str], None] = print) -> EpisodeRunner:
    """The runner of ``cfg.eval``: :class:`CachedEpisodeRunner` unless ``eval.cache`` is none."""
    ev, data = cfg["eval"], cfg["data"]
    if ev["cache"] == "none":
        if ev["cache_dir"]:
            log("note: eval.cache_dir is ignored with eval.cache=none")
        return EpisodeRunner(device)
    if ev["cache"] != "memory":
        raise ConfigError(f"eval.cache must be 'none' or 'memory', got {ev['cache']!r}")
    if ev["cache_dtype"] not in STORAGE_DTYPES:
        raise ConfigError(f"eval.cache_dtype must be one of {list(STORAGE_DTYPES)}, got {ev['cache_dtype']!r}")
    disk_dir = resolve_path(ev["cache_dir"], cfg) if ev["cache_dir"] else None
    cache = FeatureCache(max_bytes=int(ev["cache_mb"] * MIB), storage_dtype=STORAGE_DTYPES[ev["cache_dtype"]],
                         disk_dir=disk_dir, log=log)
    transform = {"val_size": data["val_size"], "mean": list(data["mean"]), "std": list(data["std"])}
    log(f"feature cache: memory bound {ev['cache_mb']} MB, {ev['cache_dtype']}"
        + (f", disk {disk_dir}" if disk_dir else ", no disk store")
        + ("" if ev["cache_bam_features"] else ", SAM embeddings only"))
    return CachedEpisodeRunner(device, cache=cache, transform=transform,
                               cache_bam_features=ev["cache_bam_features"], log=log)


def all_reduce_counts(counts: Mapping[str, int], device: torch.device) -> Dict[str, int]:
    """Integer counters summed over the processes of a torchrun job (unchanged in one process)."""
    import torch.distributed as dist
    names = sorted(k for k, v in counts.items() if isinstance(v, int))
    if not (dist.is_available() and dist.is_initialized()) or not names:
        return {k: counts[k] for k in names}
    values = torch.tensor([counts[k] for k in names], dtype=torch.int64, device=device)
    dist.all_reduce(values)
    return dict(zip(names, values.tolist()))

