"""Input enumeration: a folder tree of photos, or existing WebDataset shards (img2dataset layout).

Both yield ``InputItem`` lazily in a deterministic order, so a rerun sees the same
sequence and can skip what a previous run finished (the item ``source`` is the id).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .images import IMAGE_MEMBERS, Skip

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


@dataclass
class InputItem:
    source: str  # stable id: relative path, or "<shard>:<key>"
    path: str | None = None  # a file to read (folder input)
    data: bytes | None = None  # the image bytes (shard input)
    caption: str | None = None
    skip: Skip | None = None  # already known to be bad (e.g. unreadable shard)
    person_id: str | None = None  # identity label (FaceID-Portrait groups): folder per person or metadata
    url: str | None = None  # where the photo was downloaded from (img2dataset json / parquet), kept in the json

    @property
    def key(self) -> str:
        """Output sample key: no dots, stable for this source."""
        return hashlib.sha1(self.source.encode("utf-8")).hexdigest()[:20]


def _read_caption(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip() or None
    except OSError:
        return None


def _load_metadata(folder: Path, captions: dict[str, str], persons: dict[str, str] | None = None) -> None:
    """``metadata.jsonl`` lines {"file_name", "caption"[, "person_id"]} (relative to ``folder``) into
    ``captions`` (and ``persons``)."""
    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        return
    with meta.open(encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                name, caption = row["file_name"], row.get("caption") or row.get("text")
            except (json.JSONDecodeError, KeyError, TypeError):
                log.warning("%s:%d: not a {'file_name', 'caption'} JSON line; ignored", meta, lineno)
                continue
            if caption:
                captions[os.path.normpath(str(folder / name))] = str(caption)
            if persons is not None and row.get("person_id") not in (None, ""):
                persons[os.path.normpath(str(folder / name))] = str(row["person_id"])


def iter_folder(root: str | os.PathLike, exclude: str | os.PathLike | None = None,
                person_from: str = "metadata") -> Iterator[InputItem]:
    """Every file with an image extension under ``root`` (sorted walk; hidden entries skipped).

    ``person_from``: ``metadata`` = the ``person_id`` field of ``metadata.jsonl`` (none without one),
    ``folder`` = the photo's folder relative to ``root`` (one folder per person; photos directly in
    ``root`` get none), ``none``.
    """
    if person_from not in ("metadata", "folder", "none"):
        raise ValueError(f"person_from must be metadata, folder or none, got {person_from!r}")
    root = Path(root)
    exclude_abs = os.path.abspath(exclude) if exclude else None
    captions: dict[str, str] = {}
    persons: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and os.path.abspath(os.path.join(dirpath, d)) != exclude_abs)
        folder = Path(dirpath)
        _load_metadata(folder, captions, persons)
        for name in sorted(filenames):
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            path = folder / name
            caption = _read_caption(path.with_suffix(".txt"))
            if caption is None:
                caption = captions.get(os.path.normpath(str(path)))
            person = None
            if person_from == "metadata":
                person = persons.get(os.path.normpath(str(path)))
            elif person_from == "folder" and folder != root:
                person = folder.relative_to(root).as_posix()
            yield InputItem(source=path.relative_to(root).as_posix(), path=str(path), caption=caption,
                            person_id=person)


def iter_shards(urls: list[str]) -> Iterator[InputItem]:
    """Samples of existing shards (local paths or fsspec urls): tars (the first image member: jpg, png,
    webp...; ``txt``, else the caption of img2dataset's parquet beside the tar, else the json's), or
    img2dataset parquet shards (``jpg`` column)."""
    from . import remote

    for url in urls:
        name = remote.shard_name(url)
        if url.endswith(".parquet"):
            yield from _iter_parquet_shard(url, name)
            continue
        try:
            side = remote.parquet_metadata(url)
        except Exception as err:  # noqa: BLE001 - a broken metadata file must not hide the images
            log.warning("%s: parquet metadata unreadable (%s); using the tar's own captions", url, err)
            side = {}
        try:
            with remote.open_binary(url) as fh, tarfile.open(fileobj=fh, mode="r|*") as tar:
                group: dict[str, bytes] = {}
                current = None
                for member in tar:
                    if not member.isreg():
                        continue
                    base = os.path.basename(member.name)
                    stem, _, ext = base.partition(".")
                    key = os.path.join(os.path.dirname(member.name), stem)
                    if key != current and current is not None:
                        yield _with_side(_shard_item(name, current, group), side.get(current))
                        group = {}
                    current = key
                    group[ext.lower()] = tar.extractfile(member).read()
                if current is not None:
                    yield _with_side(_shard_item(name, current, group), side.get(current))
        except (tarfile.TarError, OSError, EOFError) as err:
            yield InputItem(source=f"{name}:<unreadable>", skip=Skip("unreadable_shard", f"{url}: {err}"))


def _with_side(item: InputItem, side: dict | None) -> InputItem:
    """Fill a tar sample's missing caption / url from img2dataset's parquet metadata row."""
    if side:
        item.caption = item.caption or (str(side["caption"]).strip() if side.get("caption") else None)
        item.url = item.url or side.get("url")
    return item


def _iter_parquet_shard(url: str, name: str) -> Iterator[InputItem]:
    from . import remote

    try:
        for row in remote.iter_parquet_rows(url):
            source = f"{name}:{row['key']}"
            if not row["jpg"]:
                yield InputItem(source=source, skip=Skip("no_image_member", "parquet row without jpg bytes "
                                                                           "(not downloaded)"))
                continue
            person = row.get("person_id")
            yield InputItem(source=source, data=bytes(row["jpg"]), caption=row["caption"], url=row["url"],
                            person_id=str(person) if person not in (None, "") else None)
    except Exception as err:  # noqa: BLE001 - pyarrow raises its own errors on a corrupt file
        yield InputItem(source=f"{name}:<unreadable>", skip=Skip("unreadable_shard", f"{url}: {err}"))


def _shard_item(shard: str, key: str, group: dict[str, bytes]) -> InputItem:
    source = f"{shard}:{key}"
    image = next((group[e] for e in IMAGE_MEMBERS if e in group), None)
    if image is None:
        return InputItem(source=source, skip=Skip("no_image_member", f"members: {sorted(group)}"))
    caption = group.get("txt", b"").decode("utf-8", errors="replace").strip() or None
    meta: dict = {}
    if "json" in group:
        try:
            meta = json.loads(group["json"])
            meta = meta if isinstance(meta, dict) else {}
        except json.JSONDecodeError:
            meta = {}
    if caption is None:
        caption = meta.get("caption") or None
    person = meta.get("person_id")
    return InputItem(source=source, data=image, caption=caption,
                     person_id=str(person) if person not in (None, "") else None,
                     url=str(meta["url"]) if meta.get("url") else None)


def tag_person(sample: dict, person_id: str | None) -> dict:
    """Record the identity label in a processed sample's json member (in place; no label: unchanged)."""
    if person_id is not None and isinstance(sample, dict) and "json" in sample:
        meta = json.loads(sample["json"])
        meta["person_id"] = person_id
        sample["json"] = json.dumps(meta).encode("utf-8")
    return sample


def tag_url(sample: dict, url: str | None) -> dict:
    """Record the download url in a processed sample's json member (in place; no url: unchanged)."""
    if url is not None and isinstance(sample, dict) and "json" in sample:
        meta = json.loads(sample["json"])
        meta["url"] = url
        sample["json"] = json.dumps(meta).encode("utf-8")
    return sample


def is_shard_input(spec: str) -> bool:
    """True for a .tar / .parquet path, an fsspec url, a glob / brace pattern, or a folder holding
    *.tar or *.parquet and no photos."""
    if spec.endswith((".tar", ".parquet")) or "://" in spec or any(ch in spec for ch in "*?[{"):
        return True
    path = Path(spec)
    if path.is_dir():
        names = [p.suffix.lower() for p in path.iterdir() if p.is_file()]
        return bool({".tar", ".parquet"} & set(names)) and not any(n in IMAGE_EXTENSIONS for n in names)
    return False
