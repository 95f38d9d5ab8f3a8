"""Atomic, resumable shard output: tar files committed through an append-only journal.

``OUTDIR/.journal.jsonl`` is the source of truth. Its first line holds the settings;
every later line commits either a finished shard together with the inputs it
holds, or a batch of skipped inputs. A shard is written as ``.<name>.tmp``,
fsynced, renamed to its final name, and only then journalled. On restart:

- inputs named in the journal are done (kept or skipped) and are not redone;
- a final-named tar that the journal does not list (killed between rename and
  journal append) and every ``*.tmp`` are deleted, then rewritten;
- a torn last journal line (killed mid-write) is ignored.

So a kill at any point never duplicates a sample and never leaves a partial
shard under a final name.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable

JOURNAL = ".journal.jsonl"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp name + rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def input_id(source: str) -> int:
    """A compact stable id of an input source (first 8 bytes of its sha1)."""
    return int.from_bytes(hashlib.sha1(source.encode("utf-8")).digest()[:8], "big")


class SettingsMismatch(ValueError):
    pass


class ShardJournal:
    """Writes ``<prefix>-%06d.tar`` shards of ``shard_size`` samples, resumably."""

    def __init__(self, outdir: str | os.PathLike, prefix: str, shard_size: int, settings: dict[str, Any],
                 journal: str = JOURNAL):
        """``journal``: the journal's path relative to ``outdir`` (one per partition under Ray:
        several journals then share ``outdir``, each cleaning only its own ``prefix``)."""
        self.outdir = Path(outdir)
        self.outdir.mkdir(parents=True, exist_ok=True)
        self.prefix, self.shard_size, self.settings = prefix, shard_size, settings
        self.path = self.outdir / journal
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.complete = False  # a {"complete": true} line: every input of this journal's job is done
        self.shards: list[dict] = []  # committed: {"name", "samples", "sha256"}
        self.done: set[int] = set()  # input_id() of every committed input (8-byte ints: memory stays small)
        self.skip_counts: collections.Counter = collections.Counter()  # reason -> count
        self._load()
        self._clean()
        self._writer = None  # a webdataset.TarWriter on the open .tmp shard
        self._tmp: Path | None = None
        self._pending_inputs: list[str] = []
        self._pending_skips: list[dict] = []
        self._count = 0

    # -- restart -------------------------------------------------------------
    def _load(self) -> None:
        if not self.path.exists():
            foreign = sorted(self.outdir.glob(f"{self.prefix}-*.tar"))
            if foreign:  # never delete shards that this journal did not write
                raise SettingsMismatch(f"{self.outdir} already holds {foreign[0].name} (and maybe more) but no "
                                       f"{self.path.name}: choose an empty --output folder or another --prefix")
            self._append({"settings": self.settings})
            return
        good = 0  # bytes of complete records; a torn tail (killed mid-write) is cut off
        newline_missing = False
        with open(self.path, "rb") as fh:
            for n, raw in enumerate(fh):
                try:
                    rec = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    break
                if n == 0:
                    self._check_settings(rec)
                else:
                    if rec.get("complete"):
                        self.complete = True
                    if rec.get("shard"):
                        self.shards.append(rec["shard"])
                    self.done.update(input_id(s) for s in rec.get("inputs", []))
                    self.skip_counts.update(s["reason"] for s in rec.get("skipped", []))
                good += len(raw)
                newline_missing = not raw.endswith(b"\n")
        if good == 0:
            raise SettingsMismatch(f"{self.path} is not a shard journal; choose an empty --output folder")
        if good < self.path.stat().st_size:
            os.truncate(self.path, good)
        if newline_missing:
            with open(self.path, "ab") as fh:
                fh.write(b"\n")

    def _check_settings(self, rec: dict) -> None:
        if not isinstance(rec, dict) or "settings" not in rec:
            raise SettingsMismatch(f"{self.path} is not a shard journal; choose an empty --output folder")
        old, new = rec["settings"], self.settings
        if old != new:
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise SettingsMismatch(f"{self.outdir} was started with different settings ({', '.join(diff)}); "
                                   "rerun with the same options to resume, or use a new --output folder")

    def _clean(self) -> None:
        committed = {s["name"] for s in self.shards}
        pattern = re.compile(rf"^{re.escape(self.prefix)}-\d{{6}}\.tar$")
        own_tmp = re.compile(rf"^\.{re.escape(self.prefix)}-\d{{6}}\.tar\.tmp$")
        any_tmp = self.path.name == JOURNAL  # the only journal in its folder: every temp file is stale
        for entry in self.outdir.iterdir():
            stale_final = pattern.match(entry.name) and entry.name not in committed
            stale_tmp = own_tmp.match(entry.name) or (any_tmp and entry.name.startswith(".")
                                                      and entry.name.endswith(".tmp") and entry.is_file())
            if stale_final or stale_tmp:
                entry.unlink()

    def _append(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    # -- writing -------------------------------------------------------------
    def add_sample(self, source: str, sample: dict) -> None:
        if self._writer is None:
            name = f"{self.prefix}-{len(self.shards):06d}.tar"
            self._tmp = self.outdir / f".{name}.tmp"
            import webdataset as wds  # imported here: it pulls in torch, which workers do not need

            self._writer = wds.TarWriter(str(self._tmp))
            self._name = name
        self._writer.write(sample)
        self._pending_inputs.append(source)
        self._count += 1
        if self._count >= self.shard_size:
            self.commit_shard()

    def add_skip(self, source: str, reason: str, detail: str = "") -> None:
        self._pending_skips.append({"source": source, "reason": reason, "detail": detail})
        if len(self._pending_skips) >= 256:  # skips need no shard: commit them in batches
            self._commit_skips()

    def _commit_skips(self) -> None:
        if self._pending_skips:
            skips, self._pending_skips = self._pending_skips, []
            self._append({"shard": None, "inputs": [s["source"] for s in skips], "skipped": skips})
            self.skip_counts.update(s["reason"] for s in skips)

    def commit_shard(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        with open(self._tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        final = self.outdir / self._name
        info = {"name": self._name, "samples": self._count, "sha256": file_sha256(self._tmp)}
        os.replace(self._tmp, final)
        _fsync_dir(self.outdir)
        self._append({"shard": info, "inputs": self._pending_inputs, "skipped": []})
        self.shards.append(info)
        self._writer, self._tmp, self._pending_inputs, self._count = None, None, [], 0

    def finish(self) -> None:
        """Commit the last (short) shard and any pending skips."""
        self.commit_shard()
        self._commit_skips()

    def mark_complete(self) -> None:
        """``finish``, then journal that every input is done (a rerun skips this journal's job)."""
        self.finish()
        if not self.complete:
            self._append({"complete": True})
            self.complete = True

    def write_skipped_report(self, path: Path | None = None) -> Path:
        """``skipped.jsonl`` streamed from the journal (never held in memory)."""
        path = path or self.outdir / "skipped.jsonl"
        tmp = path.with_name(f".{path.name}.tmp")
        with open(self.path, encoding="utf-8") as src, open(tmp, "w", encoding="utf-8") as dst:
            next(src)  # settings
            for line in src:
                for skip in json.loads(line).get("skipped", []):
                    dst.write(json.dumps(skip) + "\n")
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, path)
        return path

    @property
    def num_skipped(self) -> int:
        return sum(self.skip_counts.values())

    @staticmethod
    def iter_pending(items: Iterable, done: set[int]) -> Iterable:
        return (item for item in items if input_id(item.source) not in done)
