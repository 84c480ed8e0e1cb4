"""Build every output beside its target and move it into place only when it is complete and verified.

Every temporary thing safe-merge makes is a directory named ``.NAME.safe-merge-KIND-XXXX`` with a marker file
beside it, ``….owner`` (which process on which host made it; beside, so that the directory holds exactly what will
be published). A run killed with SIGKILL leaves both behind; the next run into the same parent recognises them by
name and marker and removes them (``sweep_stale``), and says so; except a staging directory with a journal
(io/journal.py), which the same command continues (``staged``).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
import shutil
import socket
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from safe_merge.errors import BadInput
from safe_merge.io.journal import Journal, journal_dir
from safe_merge.io.signals import deferred

OWNER = ".owner"  # the marker file's suffix
TAG = ".safe-merge-"
_published: list[str] = []  # what this process has published; the CLI says so if a signal comes afterwards


def published() -> list[str]:
    """Outputs published by this process since the last ``forget_published``."""
    return list(_published)


def forget_published() -> None:
    _published.clear()


def refuse_existing(out: Path, force: bool) -> None:
    """Refuse to overwrite an existing output (a directory or a file) unless forced."""
    if out.exists() and not force:
        raise BadInput("already exists", path=out, hint="choose another -o, or pass --force to replace it")


def check_target(out: Path, force: bool) -> None:
    """Refuse to overwrite an existing output unless forced; refuse a target that is not a directory."""
    refuse_existing(out, force)
    if out.exists() and not out.is_dir():
        raise BadInput("exists and is not a directory", path=out, hint="name a directory, or remove the file")


def make_temporary(parent: Path, name: str, kind: str) -> Path:
    """A marked temporary directory in ``parent``, private until published."""
    parent.mkdir(parents=True, exist_ok=True)
    owner = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "for": name})
    path = None
    try:
        with deferred():
            for _ in range(100):
                candidate = parent / f".{name}{TAG}{kind}-{secrets.token_hex(4)}"
                try:  # the marker first: even SIGKILL cannot leave the directory without it
                    fd = os.open(_marker(candidate), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                except FileExistsError:
                    continue
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    fh.write(owner + "\n")
                path = candidate
                path.mkdir(mode=0o700)
                break
            else:
                raise FileExistsError(f"no free temporary name in {parent}")
    except BaseException:  # a signal held while it was made: the caller never gets it, so remove it here
        if path is not None:
            remove(path)
        raise
    return path


def remove(path: Path) -> None:
    """Remove a temporary directory and its marker completely, even if a signal arrives meanwhile."""
    with deferred():
        shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(journal_dir(path), ignore_errors=True)
        _marker(path).unlink(missing_ok=True)


def _marker(path: Path) -> Path:
    return path.with_name(path.name + OWNER)


@contextlib.contextmanager
def temporary(parent: Path, name: str, kind: str = "scratch") -> Iterator[Path]:
    """A marked temporary directory that is gone when the block is left, however it is left."""
    made = _missing_parents(parent / name)
    path = make_temporary(parent, name, kind)
    try:
        yield path
    finally:
        with deferred():
            remove(path)
            _remove_empty(made)


@contextlib.contextmanager
def staged(
    out: Path,
    force: bool,
    side_files: Mapping[Path, str] | None = None,
    resume_key: str | None = None,
    notes: list[str] | None = None,
) -> Iterator[Path]:
    """Yield a staging directory next to ``out``; on normal exit it replaces ``out``, on any exit it is gone.

    ``side_files`` (path -> text, filled in by the caller before the block ends) are written completely before
    the publish and moved into place with it: a report never describes an output that was not published, and a
    report that cannot be written stops the publish. Raising anything leaves ``out`` as it was.

    ``resume_key`` (a writer that journals its shards, io/journal.py): an interrupted run's staging directory for
    ``out`` whose journal has this key is continued instead of a new one; one with another key is removed. A
    full disk then keeps the directory when some shards are complete (``kept`` on the exception says where), so
    the same command continues once there is room. ``notes`` gets a line for each directory continued or removed.
    """
    out = Path(os.path.abspath(out))
    check_target(out, force)
    made = _missing_parents(out)
    notes = notes if notes is not None else []
    stage = _interrupted(out, resume_key, notes)
    fresh = stage is None
    if fresh:
        stage = make_temporary(out.parent, out.name, "staging")
    keep = False
    try:
        if fresh and resume_key is not None:
            Journal(stage).start(resume_key)
        yield stage
        publish(stage, out, force, dict(side_files or {}))
    except BaseException as exc:
        done = len(Journal(stage).done()) if resume_key is not None and no_space(exc) else 0
        if done:
            keep = True
            exc.kept = (stage, done)  # read by whoever words the error
            _release(stage)
        raise
    finally:
        with deferred():
            if stage.exists() and not keep:
                remove(stage)
            if not out.exists() and not keep:
                _remove_empty(made)


def _interrupted(out: Path, key: str | None, notes: list[str]) -> Path | None:
    """The staging directory an interrupted run on this host left for ``out`` with a journal of ``key``, claimed
    for this run; the others it left for ``out`` with a journal are removed (not reused: other inputs)."""
    chosen = None
    host = socket.gethostname()
    pattern = glob.escape(str(out.parent / f".{out.name}{TAG}staging-")) + f"*{OWNER}"
    for marker in sorted(Path(p) for p in glob.glob(pattern)):
        entry = marker.with_name(marker.name.removesuffix(OWNER))
        try:
            owner = json.loads(marker.read_text(encoding="utf-8"))
            pid, machine = int(owner["pid"]), str(owner["host"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        busy = _alive(pid) and not owner.get("released")
        if machine != host or busy or not entry.is_dir() or not journal_dir(entry).is_dir():
            continue
        journal = Journal(entry)
        if chosen is None and key is not None and journal.key() == key:
            chosen = entry
            continue
        remove(entry)
        notes.append(
            f"removed {entry}: an interrupted merge into {out.name} made from other inputs, options or versions "
            "(its journal does not match this command), not continued"
        )
    if chosen is not None:
        claim = json.dumps({"pid": os.getpid(), "host": host, "started": time.time(), "for": out.name})
        tmp = _marker(chosen).with_name(_marker(chosen).name + ".tmp")
        tmp.write_text(claim + "\n", encoding="utf-8")
        os.replace(tmp, _marker(chosen))
        notes.append(
            f"continued the interrupted merge in {chosen}: {len(Journal(chosen).done())} shard(s) were already "
            "complete and checked (journal beside it)"
        )
    return chosen


def _release(stage: Path) -> None:
    """Mark a staging directory kept for a later run as no longer this process's (which may live on: the API)."""
    marker = _marker(stage)
    owner = json.loads(marker.read_text(encoding="utf-8"))
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(json.dumps({**owner, "released": True}) + "\n", encoding="utf-8")
    os.replace(tmp, marker)


def no_space(exc: BaseException | None) -> bool:
    """ENOSPC or EDQUOT, from the OS or wrapped by a library (safetensors reports it as a string)."""
    import errno

    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def publish(stage: Path, out: Path, force: bool, side_files: dict[Path, str] | None = None) -> None:
    """Rename the finished staging dir to ``out`` (with the umask's permissions); an old ``out`` (with --force)
    is removed only afterwards. Side files are staged first and renamed right after."""
    _as_the_umask_gives(stage)
    side_files = {Path(os.path.abspath(path)): text for path, text in (side_files or {}).items()}
    made = {path: _missing_parents(path) for path in side_files if out not in path.parents}
    pending: list[tuple[Path | None, Path]] = []
    try:
        for path, text in side_files.items():
            pending.append(_stage_side_file(path, text, out, stage))
        with deferred():
            old = None
            if out.exists():
                check_target(out, force)
                old = make_temporary(out.parent, out.name, "old")
                os.replace(out, old / out.name)
            try:
                os.replace(stage, out)
            except BaseException:
                if old is not None:
                    os.replace(old / out.name, out)
                    remove(old)
                raise
            _marker(stage).unlink(missing_ok=True)
            shutil.rmtree(journal_dir(stage), ignore_errors=True)
            _published.append(str(out))
            for tmp, final in pending:
                if tmp is not None:
                    os.replace(tmp / final.name, final)
                    _published.append(str(final))
            if old is not None:
                remove(old)
    finally:
        with deferred():
            for tmp, _ in pending:
                if tmp is not None:
                    remove(tmp)
            for path, parents in made.items():
                if not path.exists():
                    _remove_empty(parents)


def _stage_side_file(path: Path, text: str, out: Path, stage: Path) -> tuple[Path | None, Path]:
    """Write a side file completely before the publish: into the stage when it belongs inside ``out``, else into
    a temporary directory beside it."""
    if out in path.parents:
        inside = stage / path.relative_to(out)
        inside.parent.mkdir(parents=True, exist_ok=True)
        inside.write_text(text, encoding="utf-8")
        return None, path
    tmp = make_temporary(path.parent, path.name, "side")
    (tmp / path.name).write_text(text, encoding="utf-8")
    os.chmod(tmp / path.name, 0o666 & ~_umask())
    return tmp, path


def write_file(path: Path, text: str, force: bool) -> None:
    """Write one file atomically: the complete file appears, or nothing does (an old one is replaced only with
    ``force``)."""
    path = Path(os.path.abspath(path))
    refuse_existing(path, force)
    if path.is_dir():
        raise BadInput("is a directory, not a file", path=path, hint="name a file to write")
    made = _missing_parents(path)
    tmp = make_temporary(path.parent, path.name, "file")
    try:
        (tmp / path.name).write_text(text, encoding="utf-8")
        os.chmod(tmp / path.name, 0o666 & ~_umask())  # a file made by open() would have these
        with deferred():
            os.replace(tmp / path.name, path)
            _published.append(str(path))
    finally:
        with deferred():
            remove(tmp)
            if not path.exists():
                _remove_empty(made)


def sweep_stale(parent: Path, keep_for: str | None = None) -> list[str]:
    """Remove the temporary directories that interrupted runs on this host left in ``parent``; one line for each
    removed, and one for each left alone because another host may still be writing it. A journaled staging
    directory for ``keep_for`` is left to ``staged``, which continues it or removes it."""
    notes: list[str] = []
    if not parent.is_dir():
        return notes
    host = socket.gethostname()
    for marker in sorted(parent.glob(f".*{TAG}*{OWNER}")):
        entry = marker.with_name(marker.name.removesuffix(OWNER))
        if _killed_while_marking(marker, entry):
            marker.unlink(missing_ok=True)
            notes.append(f"removed {marker}: an empty marker left by a run killed as it made its temporary directory")
            continue
        try:
            owner = json.loads(marker.read_text(encoding="utf-8"))
            pid, machine = int(owner["pid"]), str(owner["host"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not ours, or not ours to judge
        if machine != host:
            notes.append(f"left alone: {entry} (made by a run on host {machine}, which may still be writing it)")
            continue
        if _alive(pid) and not owner.get("released"):
            continue  # a run in progress
        name = str(owner.get("for", ""))
        if keep_for is not None and name == keep_for and f"{TAG}staging-" in entry.name and journal_dir(entry).is_dir():
            continue  # perhaps continued by this run: staged() decides
        moved_aside, target = entry / name, parent / name
        if f"{TAG}old-" in entry.name and name and moved_aside.exists() and not target.exists():
            with deferred():  # killed between moving the old OUT aside and publishing the new one
                os.replace(moved_aside, target)
            notes.append(f"restored {target} from {entry}: a run replacing it was killed before it published")
        size = _size(entry) if entry.is_dir() and not entry.is_symlink() else 0
        remove(entry)
        notes.append(f"removed {entry}: left by an interrupted run (pid {pid}), {size / 2**20:.1f} MiB")
    return notes


MARKING_SECONDS = 2.0  # a live run writes its marker and makes its directory within microseconds of creating it


def _killed_while_marking(marker: Path, entry: Path) -> bool:
    """A marker still empty, with no directory beside it, seconds after it was made: its run was killed (SIGKILL
    cannot be deferred) between creating the marker and writing it."""
    try:
        info = marker.stat()
    except OSError:
        return False
    return info.st_size == 0 and not entry.exists() and time.time() - info.st_mtime > MARKING_SECONDS


def _missing_parents(path: Path) -> list[Path]:
    """The directories above ``path`` that do not exist yet (made by the command, removed if it fails)."""
    return [p for p in path.parents if not p.exists()]


def _remove_empty(directories: list[Path]) -> None:
    for directory in directories:  # innermost first
        try:
            directory.rmdir()
        except OSError:
            return


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _as_the_umask_gives(stage: Path) -> None:
    """The staging dir is private while it is built, and some writers make their files private too (safetensors
    under save_pretrained writes 0600): publish everything as mkdir and open would have made it."""
    mask = _umask()
    for path in stage.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)
    os.chmod(stage, 0o777 & ~mask)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
