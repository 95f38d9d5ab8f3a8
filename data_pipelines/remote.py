"""Inputs at scale: shard lists through fsspec (local, ``file://``, ``s3://``, ``gs://``...) and
img2dataset's parquet files, read in place.

img2dataset writes, per shard ``NNNNN``: with ``--output_format webdataset`` a ``NNNNN.tar``
(``jpg``, ``txt``, ``json`` per sample) plus ``NNNNN.parquet`` metadata (``key``, ``url``,
``caption``, ``status``, ... one row per url, downloaded or not); with ``--output_format parquet``
only ``NNNNN.parquet``, the image bytes in a ``jpg`` column. Both are read here without copying:
tars stream through ``fsspec.open``, parquet row groups through pyarrow, a few hundred rows at a time.
Object stores need their fsspec driver (``s3fs``, ``gcsfs``) and credentials in the environment.
"""

from __future__ import annotations

import os
from typing import Iterator

SHARD_SUFFIXES = (".tar", ".parquet")
META_COLUMNS = ("key", "caption", "url", "status")


def is_url(spec: str) -> bool:
    return "://" in spec


def expand_inputs(spec: str) -> list[str]:
    """Input shards for ``spec`` (a .tar / .parquet, a folder of them, a glob, a brace pattern), sorted.

    A parquet beside a tar of the same stem is that tar's metadata, not an input of its own.
    Raises FileNotFoundError naming the spec when nothing matches.
    """
    import fsspec
    from webdataset.shardlists import expand_urls

    found: list[str] = []
    for pattern in (expand_urls(spec) if "{" in spec else [spec]):
        fs, path = fsspec.core.url_to_fs(pattern)
        if any(ch in path for ch in "*?["):
            paths = sorted(fs.glob(path))
        elif fs.isdir(path):
            paths = sorted(p for p in fs.ls(path, detail=False) if p.endswith(SHARD_SUFFIXES))
        else:
            paths = [path] if fs.exists(path) else []
        found.extend(fs.unstrip_protocol(p) if is_url(pattern) else p for p in paths if p.endswith(SHARD_SUFFIXES))
    tars = {u[: -len(".tar")] for u in found if u.endswith(".tar")}
    found = [u for u in found if not (u.endswith(".parquet") and u[: -len(".parquet")] in tars)]
    if not found:
        raise FileNotFoundError(f"no input shards (.tar or img2dataset .parquet) found for {spec!r}: pass a folder, "
                                "a glob or a brace pattern such as s3://bucket/laion/{00000..00099}.tar")
    return found


def open_binary(url: str):
    """A readable binary file object for a local path or an fsspec url (close it, or use ``with``)."""
    import fsspec

    return fsspec.open(url, "rb").open()


def exists(url: str) -> bool:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)


def require_pyarrow(what: str) -> None:
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        from accord_face.config import ConfigError

        raise ConfigError(f"{what} is parquet, which needs pyarrow: pip install -e '.[parquet]'") from None


def _rows(url: str, columns: tuple[str, ...], batch_rows: int = 256) -> Iterator[dict]:
    import pyarrow.parquet as pq

    with open_binary(url) as fh:
        pf = pq.ParquetFile(fh)
        present = [c for c in columns if c in pf.schema_arrow.names]
        for batch in pf.iter_batches(batch_size=batch_rows, columns=present):
            yield from batch.to_pylist()


def parquet_metadata(tar_url: str) -> dict[str, dict]:
    """``key -> {"caption", "url"}`` from the img2dataset parquet beside ``tar_url`` ({} when there is none
    or pyarrow is missing: the tar's own txt / json still give captions)."""
    meta_url = tar_url[: -len(".tar")] + ".parquet"
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return {}
    if not tar_url.endswith(".tar") or not exists(meta_url):
        return {}
    out = {}
    for row in _rows(meta_url, META_COLUMNS):
        if row.get("key") is not None and row.get("status", "success") == "success":
            out[str(row["key"])] = {"caption": row.get("caption"), "url": row.get("url")}
    return out


def iter_parquet_rows(url: str) -> Iterator[dict]:
    """Rows of an img2dataset ``--output_format parquet`` shard: ``key``, ``jpg`` (bytes or None),
    ``caption`` (``txt`` column, else ``caption``), ``url``, ``person_id`` when present."""
    for row in _rows(url, ("key", "jpg", "txt", "caption", "url", "status", "person_id")):
        caption = row.get("txt") or row.get("caption")
        yield {"key": str(row.get("key")), "jpg": row.get("jpg"), "caption": str(caption) if caption else None,
               "url": row.get("url"), "person_id": row.get("person_id")}


def shard_name(url: str) -> str:
    return os.path.basename(url.rstrip("/"))
