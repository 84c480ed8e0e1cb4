"""A staging directory's journal: which output shards are complete, so that a merge stopped midway (SIGKILL,
power loss, a full disk) continues with the missing shards only, and ends with the bytes an uninterrupted run
writes.

It lives beside the staging directory (``<stage>.journal/``: the staging directory holds exactly what will be
published). ``inputs.json`` holds a key over what the merge is made from: the base's shard files (names, sizes,
modification times and headers), the adapter's files (their bytes), the options that shape the output and the
versions of safe-merge, torch, PEFT and transformers. One ``<shard>.json`` per complete shard, written after the
shard is on disk (fsync), holds its size and modification time and the tensors checked in it. A journal whose key
differs from the command's (other inputs, options or versions) is never reused; a shard whose size or time
changed since it was recorded is written again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

from safe_merge.io.checkpoint import shard_files
from safe_merge.io.tensorfile import read_header

SUFFIX = ".journal"
INPUTS = "inputs.json"


def journal_dir(stage: Path) -> Path:
    return stage.with_name(stage.name + SUFFIX)


def merge_key(base_dir: Path, adapter_dir: Path, options: dict) -> str:
    """What a merge is made from, as one hash (the base's shards by their headers, sizes and times: reading
    gigabytes to decide whether to resume would cost what resuming saves)."""
    from safe_merge.io import loading

    digest = hashlib.sha256(json.dumps({"options": options, "versions": loading.versions()}, sort_keys=True).encode())
    for shard in shard_files(base_dir):
        info = shard.stat()
        digest.update(f"{shard.name}:{info.st_size}:{info.st_mtime_ns}".encode())
        if shard.suffix == ".safetensors":
            digest.update(json.dumps(read_header(shard)[0], sort_keys=True).encode())
    for path in sorted(p for p in Path(adapter_dir).rglob("*") if p.is_file()):
        digest.update(path.relative_to(adapter_dir).as_posix().encode())
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(2**20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _write_atomically(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, default=_plain)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    descriptor = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _plain(value):
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not journaled")


class Journal:
    def __init__(self, stage: Path):
        self.stage = Path(stage)
        self.dir = journal_dir(self.stage)

    def start(self, key: str) -> None:
        self.dir.mkdir(exist_ok=True)
        _write_atomically(self.dir / INPUTS, {"key": key})

    def key(self) -> str | None:
        try:
            return json.loads((self.dir / INPUTS).read_text(encoding="utf-8")).get("key")
        except (OSError, ValueError, AttributeError):
            return None

    @property
    def active(self) -> bool:
        return (self.dir / INPUTS).is_file()

    def record(self, file_name: str, payload: dict) -> None:
        """``file_name`` in the staging directory is complete: made durable, then recorded with ``payload``."""
        path = self.stage / file_name
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
        info = path.stat()
        _write_atomically(
            self.dir / f"{file_name}.json", {**payload, "bytes": info.st_size, "mtime_ns": info.st_mtime_ns}
        )

    def done(self) -> dict[str, dict]:
        """The shards recorded complete and still as recorded, by file name."""
        out = {}
        for record in sorted(self.dir.glob("*.json")) if self.dir.is_dir() else []:
            if record.name == INPUTS:
                continue
            name = record.name.removesuffix(".json")
            try:
                payload = json.loads(record.read_text(encoding="utf-8"))
                info = (self.stage / name).stat()
            except (OSError, ValueError):
                continue
            if (info.st_size, info.st_mtime_ns) == (payload.get("bytes"), payload.get("mtime_ns")):
                out[name] = payload
        return out
