"""Build an output directory beside its target and move it into place only when it is complete and verified."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from safe_merge.errors import BadInput


def refuse_existing(out: Path, force: bool) -> None:
    """Refuse to overwrite an existing output (a directory or a file) unless forced."""
    if out.exists() and not force:
        raise BadInput("already exists", path=out, hint="choose another -o, or pass --force to replace it")


def check_target(out: Path, force: bool) -> None:
    """Refuse to overwrite an existing output unless forced; refuse a target that is not a directory."""
    refuse_existing(out, force)
    if out.exists() and not out.is_dir():
        raise BadInput("exists and is not a directory", path=out)


@contextlib.contextmanager
def staged(out: Path, force: bool) -> Iterator[Path]:
    """Yield a staging directory next to ``out``; on normal exit it replaces ``out``, on any exit it is gone.

    Callers publish by leaving the block; raising anything (including KeyboardInterrupt) leaves ``out`` as it was.
    """
    out = Path(out)
    check_target(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        yield stage
        publish(stage, out, force)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def publish(stage: Path, out: Path, force: bool) -> None:
    """Rename the finished staging dir to ``out``; an old ``out`` (with --force) is removed only afterwards."""
    old = None
    if out.exists():
        check_target(out, force)
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
    try:
        os.replace(stage, out)
    except BaseException:
        if old is not None:
            os.replace(old / out.name, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
