"""Training-side reader for the face shards written by ``data_pipelines``.

One sample per face image (see README "Preparing shards"):
``jpg`` training image, ``txt`` caption, ``<recognizer>.npy`` normalised
identity embedding (``sface.npy`` 128-d, ``arcface.npy`` 512-d), ``json`` metadata.

``build_dataset`` returns a WebDataset pipeline (a torch ``IterableDataset``):

    shard list (deterministic order in (seed, epoch); or resampled)
      -> split by node (rank) -> split by worker
      -> tar members -> samples          (bad or empty shard: counted, logged with shard, skipped)
      -> shuffle buffer (raw bytes: shuffle before decode, deterministic)
      -> skip the first N samples        (resume)
      -> decode, resize / centre-crop, optional flip -> dict of tensors

Ranks see disjoint shards; a resumed run passes ``skip`` = samples this rank
already consumed in the epoch, and ``set_epoch`` changes the order per epoch.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import random
import re
import zlib
from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image

log = logging.getLogger(__name__)

__all__ = ["list_shards", "read_manifest", "build_dataset", "collate", "pixels_to_unit_range", "ShardDataset", "ReadStats",
           "decode_sample", "SampleError", "SKIP_KINDS", "MANIFEST_NAME"]

MANIFEST_NAME = "manifest.json"
_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")


# ---------------------------------------------------------------- shard lists
def list_shards(spec: str | os.PathLike | list[str]) -> list[str]:
    """Resolve a shard spec to a list of tar paths.

    ``spec``: a directory (its ``*.tar``, sorted), a glob (``out/*.tar``), a brace
    pattern (``out/faces-{000000..000009}.tar``), a comma-free list of any of these.
    Raises FileNotFoundError naming the spec when nothing matches.
    """
    if isinstance(spec, (list, tuple)):
        out: list[str] = []
        for item in spec:
            out.extend(list_shards(item))
        if not out:
            raise FileNotFoundError(f"no shards found for {spec!r}")
        return out
    text = os.fspath(spec)
    if os.path.isdir(text):
        found = sorted(glob.glob(os.path.join(text, "*.tar")))
    elif _BRACE.search(text):
        found = [p for p in wds.shardlists.expand_urls(text) if os.path.exists(p) or "://" in p]
    elif any(ch in text for ch in "*?["):
        found = sorted(glob.glob(text))
    else:
        found = [text] if os.path.isfile(text) else []
    if not found:
        raise FileNotFoundError(
            f"no shards found for {text!r}: pass a folder holding *.tar, a glob or a brace pattern "
            "such as out/faces-{000000..000009}.tar (write shards with scripts/prepare_shards.py)")
    return found


def read_manifest(shards_dir: str | os.PathLike) -> dict | None:
    """``shards_dir/manifest.json`` as a dict, or None when there is none (a tar path: its folder)."""
    folder = Path(shards_dir)
    if folder.is_file() or folder.suffix == ".tar":
        folder = folder.parent
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); rerun scripts/prepare_shards.py to rewrite it") from None


# ---------------------------------------------------------------- stages
@dataclass
class ReadStats:
    """Counts of what the reader skipped (per process: each DataLoader worker has its own).

    ``kinds``: ``bad_shard`` (unreadable, truncated, vanished), ``empty_shard``, ``bad_sample``
    (missing member, undecodable image or embedding, wrong size, NaN). Every skip is logged with its
    shard and key. Decoded samples carry the counts since the previous sample (``__skipped__``), so
    counts made inside DataLoader workers reach the training loop through the batches.
    """

    errors: int = 0
    bad_shards: set = dc_field(default_factory=set)
    messages: list = dc_field(default_factory=list)
    kinds: dict = dc_field(default_factory=lambda: {k: 0 for k in SKIP_KINDS})
    reported: dict = dc_field(default_factory=lambda: {k: 0 for k in SKIP_KINDS})

    def record(self, kind: str, url: str | None, key: str | None, exn: Exception | str) -> None:
        self.kinds[kind] += 1
        if kind != "empty_shard":
            self.errors += 1
        if kind != "bad_sample" and url:
            self.bad_shards.add(url)
        detail = exn if isinstance(exn, str) else " ".join(str(exn).split())[:300] if isinstance(exn, SampleError) \
            else f"{type(exn).__name__}: {' '.join(str(exn).split())[:300]}"
        msg = f"shard {url} key {key}: {detail}" if key else f"shard {url}: {detail}"
        if len(self.messages) < 100:
            self.messages.append(msg)
        log.warning("skipping unreadable shard data (%s, %d skipped so far): %s", kind, sum(self.kinds.values()),
                    msg)

    def handler(self, exn: Exception) -> bool:
        """wds handler: count and warn, never stop (a corrupt shard or sample is skipped)."""
        urls = [a for a in getattr(exn, "args", ()) if isinstance(a, str) and a.endswith(".tar")]
        url, key = getattr(exn, "url", None) or (urls[0] if urls else None), getattr(exn, "key", None)
        self.record("bad_sample" if key else "bad_shard", url, key, exn)
        return True

    def take_unreported(self) -> dict:
        """Counts since the last call (what the next decoded sample carries)."""
        delta = {k: self.kinds[k] - self.reported[k] for k in SKIP_KINDS}
        self.reported = dict(self.kinds)
        return delta


SKIP_KINDS = ("bad_shard", "empty_shard", "bad_sample")


class SampleError(ValueError):
    """A sample that cannot be used; carries its shard (``url``) and ``key`` for the log."""

    def __init__(self, url: str | None, key: str | None, message: str):
        super().__init__(message)
        self.url, self.key = url, key


def _mix(*parts: int) -> int:
    """A stable 63-bit seed from integers (python's hash of ints is stable, of str is not)."""
    seed = 0
    for p in parts:
        seed = (seed * 1_000_003 + int(p)) & 0x7FFF_FFFF_FFFF_FFFF
    return seed


class _State:
    def __init__(self, seed: int, epoch: int):
        self.seed, self.epoch = seed, epoch


def _shard_source(urls: list[str], state: _State, resampled: bool) -> Callable[[], Iterator[dict]]:
    def source() -> Iterator[dict]:
        if resampled:
            # Every rank/worker draws its own endless stream (no node split needed).
            rank, world, worker, nworkers = wds.utils.pytorch_worker_info()
            rng = random.Random(_mix(state.seed, state.epoch, rank, worker, 17))
            while True:
                yield {"url": rng.choice(urls)}
        order = list(urls)
        # Same permutation on every rank (seed, epoch only), then ranks take disjoint slices.
        random.Random(_mix(state.seed, state.epoch)).shuffle(order)
        for url in order:
            yield {"url": url}
    return source


def _shuffle(bufsize: int, state: _State) -> Callable[[Iterable[dict]], Iterator[dict]]:
    def stage(src: Iterable[dict]) -> Iterator[dict]:
        if bufsize <= 1:
            yield from src
            return
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        rng = random.Random(_mix(state.seed, state.epoch, rank, worker, 29))
        buf: list[dict] = []
        for sample in src:
            buf.append(sample)
            if len(buf) >= bufsize:
                i = rng.randrange(len(buf))
                buf[i], buf[-1] = buf[-1], buf[i]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf
    return stage


def _skip(n: int, batch_size: int | None, stats: ReadStats | None = None) -> Callable[[Iterable[dict]], Iterator[dict]]:
    def stage(src: Iterable[dict]) -> Iterator[dict]:
        _, _, worker, nworkers = wds.utils.pytorch_worker_info()
        # With W DataLoader workers the rank's stream interleaves the W worker streams
        # batch by batch (worker w makes batches w, w+W, ...): each worker drops its share.
        unit = batch_size or 1
        units = n // unit
        mine = (units // nworkers + (1 if worker < units % nworkers else 0)) * unit
        if worker == units % nworkers:
            mine += n % unit  # a partial unit (skip not a multiple of batch_size) goes to the next worker
        for i, sample in enumerate(src):
            if i >= mine:
                yield sample
            elif stats is not None and i == mine - 1:
                stats.take_unreported()  # skips in the replayed part were counted before the resume
    return stage


def _read_shards(stats: ReadStats) -> Callable[[Iterable[dict]], Iterator[dict]]:
    """{"url"} -> raw samples, one shard at a time: an unreadable, truncated or vanished shard is
    recorded once (with the last good key) and the next shard read; an empty shard is recorded."""
    def stage(src: Iterable[dict]) -> Iterator[dict]:
        from webdataset.tariterators import group_by_keys, tar_file_iterator

        def files(stream, url):
            for f in tar_file_iterator(stream):
                f["__url__"] = url
                yield f

        for item in src:
            url, count, key = item["url"], 0, None
            try:
                with open(url, "rb") as stream:
                    for sample in group_by_keys(files(stream, url)):
                        count, key = count + 1, sample["__key__"]
                        yield sample
            except Exception as exn:  # noqa: BLE001  (any read error of one shard: skip that shard)
                what = f"after key {key} ({count} samples read)" if key else "before the first sample"
                stats.record("bad_shard", url, None, f"{type(exn).__name__}: {' '.join(str(exn).split())[:200]} "
                             f"({what})")
                continue
            if count == 0:
                stats.record("empty_shard", url, None, "no samples in this shard")
    return stage


def _find_embedding_key(sample: dict) -> str:
    keys = [k for k in sample if k.endswith(".npy")]
    if len(keys) != 1:
        raise SampleError(sample.get("__url__"), sample.get("__key__"),
                          f"expected one *.npy embedding member, found {keys}; pass embedding_key=")
    return keys[0]


# Members that only an unpickler could read: refused, never decoded.
PICKLE_MEMBERS = ("pyd", "pickle", "pkl", "pth", "pt", "ckpt")


def load_image(data: bytes, resolution: int, flip: bool = False, as_uint8: bool = False) -> torch.Tensor:
    """JPEG bytes -> (3, R, R) float tensor in [-1, 1] (shorter side resized to R, centre crop).

    ``as_uint8``: the (3, R, R) uint8 pixels instead; ``pixels_to_unit_range`` gives the float
    tensor from them bit for bit (a quarter of the bytes through DataLoader worker IPC)."""
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        w, h = im.size
        scale = resolution / min(w, h)
        if (w, h) != (resolution, resolution):
            im = im.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))),
                           Image.Resampling.BICUBIC)
            left, top = (im.width - resolution) // 2, (im.height - resolution) // 2
            im = im.crop((left, top, left + resolution, top + resolution))
        if flip:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        arr = np.asarray(im, dtype=np.uint8)  # (R, R, 3)
    tensor = torch.from_numpy(arr.copy()).permute(2, 0, 1)  # (3, R, R) uint8
    return tensor if as_uint8 else pixels_to_unit_range(tensor)


def pixels_to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (any shape) -> float32 in [-1, 1]: p / 127.5 - 1; float input is returned as it is."""
    return pixels.float() / 127.5 - 1.0 if pixels.dtype == torch.uint8 else pixels


def _image_member(sample: dict) -> bytes:
    for ext in ("jpg", "jpeg", "png", "webp"):
        if ext in sample:
            return sample[ext]
    raise SampleError(sample.get("__url__"), sample.get("__key__"), "no image member (jpg/png/webp)")


def decode_sample(sample: dict, *, resolution: int, embedding_key: str | None = None,
                  flip: bool = False, embedding_dim: int | None = None, pixels_uint8: bool = False) -> dict:
    """Raw shard sample (bytes per member) -> training dict, with explicit decoders only.

    ``pixels_uint8``: ``pixel_values`` stay uint8 (3, R, R); ``pixels_to_unit_range`` converts them.

    Raises SampleError (naming shard and key) for a missing member, an image or ``.npy`` that does
    not decode (pickled ``.npy`` arrays are refused: ``allow_pickle=False``), an embedding that is not
    finite or not ``embedding_dim`` long, and any pickle-type member (``PICKLE_MEMBERS``).
    """
    url, skey = sample.get("__url__"), sample.get("__key__")
    pickled = [k for k in sample if k.rsplit(".", 1)[-1].lower() in PICKLE_MEMBERS]
    if pickled:
        raise SampleError(url, skey, f"pickle members {pickled} are refused (shards hold jpg/png, txt, json, npy)")
    key = embedding_key or _find_embedding_key(sample)
    if key not in sample:
        raise SampleError(url, skey, f"no '{key}' member (members: "
                                     f"{sorted(k for k in sample if not k.startswith('__'))})")
    try:
        emb = np.load(io.BytesIO(sample[key]), allow_pickle=False).astype(np.float32).reshape(-1)  # (D,)
    except (ValueError, OSError, EOFError) as err:
        raise SampleError(url, skey, f"'{key}' is not a plain .npy array ({' '.join(str(err).split())[:120]})") \
            from None
    if embedding_dim is not None and emb.shape[0] != embedding_dim:
        raise SampleError(url, skey, f"'{key}' has {emb.shape[0]} values, expected {embedding_dim}")
    if not np.isfinite(emb).all():
        raise SampleError(url, skey, f"'{key}' holds NaN or inf")
    try:
        meta = json.loads(sample["json"]) if "json" in sample else {}
        caption = sample["txt"].decode("utf-8") if "txt" in sample else ""
    except (ValueError, UnicodeDecodeError) as err:
        raise SampleError(url, skey, f"json/txt member does not decode ({err})") from None
    try:
        pixels = load_image(_image_member(sample), resolution, flip, as_uint8=pixels_uint8)  # (3, R, R)
    except SampleError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise SampleError(url, skey, f"image does not decode ({type(err).__name__}: {str(err)[:120]})") from None
    return {
        "__key__": sample["__key__"],
        "pixel_values": pixels,
        "caption": caption,
        "face_embedding": torch.from_numpy(emb),  # (D,)
        "meta": meta,
    }


class ShardDataset(wds.DataPipeline):
    """A ``wds.DataPipeline`` with ``set_epoch`` and read ``stats`` (errors, bad shards)."""

    def __init__(self, *stages: Any, state: _State, stats: ReadStats, urls: list[str]):
        super().__init__(*stages)
        self._state, self.stats, self.urls = state, stats, urls

    def set_epoch(self, epoch: int) -> None:
        """Reorder shards and shuffle for ``epoch`` (call before iterating each epoch)."""
        self._state.epoch = int(epoch)

    @property
    def epoch(self) -> int:
        return self._state.epoch


def build_dataset(shards: str | list[str], *, resolution: int, embedding_key: str | None = None,
                  shuffle_buffer: int = 256, seed: int = 0, epoch: int = 0, split_by_node: bool = True,
                  split_by_worker: bool = True, resampled: bool = False, random_flip: bool = False,
                  skip: int = 0, skip_batch_size: int | None = None,
                  embedding_dim: int | None = None, face_crop_size: int | None = None,
                  pixels_uint8: bool = False) -> ShardDataset:
    """WebDataset pipeline yielding ``{"__key__", "pixel_values" (3,R,R) in [-1,1], "caption",
    "face_embedding" (D,), "meta"}``; see the module docstring for the stage order.

    ``face_crop_size`` S (FaceID-Plus): also ``"face_pixels"`` (3, S, S) uint8, the aligned face crop
    computed from the stored image and the json landmarks (``family.clip_image.face_crop_from_sample``).

    ``embedding_key`` None: the manifest's ``embedding_key`` (next to the first shard), else
    the single ``*.npy`` member of each sample.

    ``skip``: samples of this rank's stream already consumed (resume). With a DataLoader of
    W > 1 workers pass ``skip_batch_size`` = its batch size: workers hand out whole batches in
    turn, so the skip is split across workers batch by batch. The remaining samples are then
    exactly the ones not yet seen; their interleaving restarts at worker 0.

    ``embedding_dim``: samples whose embedding has another length are skipped (and counted).

    ``pixels_uint8``: ``pixel_values`` as uint8 (3, R, R), converted to [-1, 1] on the training device
    (``pixels_to_unit_range``; the trainer does this): 4x fewer bytes from DataLoader workers.
    Skipped shards and samples are counted in ``ds.stats`` and logged with shard and key.
    """
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    urls = list_shards(shards)
    if embedding_key is None:
        manifest = read_manifest(Path(urls[0]).parent)
        if manifest is not None:
            embedding_key = manifest.get("embedding_key")
    state, stats = _State(seed, epoch), ReadStats()
    rank, world, _, _ = wds.utils.pytorch_worker_info()
    if split_by_node and not resampled and world > len(urls):
        log.warning("%d shards for %d ranks: rank %d may get none; write more, smaller shards "
                    "(--shard-size) or use resampled=True", len(urls), world, rank)

    stages: list[Any] = [_shard_source(urls, state, resampled)]
    if split_by_node and not resampled:
        stages.append(wds.split_by_node)
    if split_by_worker and not resampled:
        stages.append(wds.split_by_worker)
    stages.append(_read_shards(stats))
    stages.append(_shuffle(shuffle_buffer, state))
    if skip > 0:
        stages.append(_skip(skip, skip_batch_size, stats))

    def decode(sample: dict) -> dict:
        flip = False
        if random_flip:
            digest = zlib.crc32(sample["__key__"].encode())  # stable across processes, unlike hash(str)
            flip = random.Random(_mix(state.seed, state.epoch, digest)).random() < 0.5
        out = decode_sample(sample, resolution=resolution, embedding_key=embedding_key, flip=flip,
                            embedding_dim=embedding_dim, pixels_uint8=pixels_uint8)
        if face_crop_size:
            from .family.clip_image import face_crop_from_sample
            out["face_pixels"] = face_crop_from_sample(_image_member(sample), out["meta"], face_crop_size)
        out["__skipped__"] = stats.take_unreported()
        return out

    stages.append(wds.map(decode, handler=stats.handler))
    return ShardDataset(*stages, state=state, stats=stats, urls=urls)


def collate(samples: list[dict]) -> dict:
    """Batch decoded samples: tensors stacked (B, ...), captions / keys / meta as lists."""
    if not samples:
        raise ValueError("collate got an empty batch")
    return {
        "__key__": [s["__key__"] for s in samples],
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),  # (B, 3, R, R)
        "caption": [s["caption"] for s in samples],
        "face_embedding": torch.stack([s["face_embedding"] for s in samples]),  # (B, D)
        "meta": [s["meta"] for s in samples],
        **({"face_pixels": torch.stack([s["face_pixels"] for s in samples])}   # (B, 3, S, S) uint8
           if "face_pixels" in samples[0] else {}),
        "__skipped__": {k: sum(s.get("__skipped__", {}).get(k, 0) for s in samples) for k in SKIP_KINDS},
    }
