"""The one rule every writing command obeys before any work: an output is never an input, never inside one, never
above one (symlinks resolved), and never replaces anything without --force.

merge, migrate, fingerprint, demo and `--report` all call ``check_output``; nothing else decides where a command
may write.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from safe_merge.errors import BadInput
from safe_merge.io.staging import check_target, refuse_existing


def input_places(inputs: Mapping[str, Path]) -> list[tuple[str, Path, bool]]:
    """Each input's real path, and the real directories its symlinked files live in (a hub cache snapshot links
    to its blobs), each with whether writing inside it is refused too (for the input itself: yes; for a directory
    that merely holds a linked file: no, only replacing it or what holds it would destroy the input)."""
    places: list[tuple[str, Path, bool]] = []
    for label, path in inputs.items():
        real = Path(path).resolve()
        places.append((label, real, True))
        if real.is_dir():
            for entry in real.iterdir():
                if entry.is_symlink():
                    target = entry.resolve()
                    places += [(label, target, True), (label, target.parent, False)]
    return _unique(places)


def check_output(
    out: Path, inputs: Mapping[str, Path], *, force: bool, kind: str = "directory", option: str = "-o"
) -> Path:
    """Refuse ``out`` if it is, holds, or lies inside an input, or exists and ``force`` is not set; the absolute
    path to write. ``kind`` is "directory" or "file": what the command writes there."""
    out = Path(os.path.abspath(out))
    real = out.resolve()
    for label, place, whole in input_places(inputs):
        if real == place:
            raise BadInput(
                f"{option} is the {label} (an input): writing it would destroy the input",
                path=out,
                hint=f"choose a {option} path outside every input",
            )
        if whole and place in real.parents:
            raise BadInput(
                f"{option} is inside the {label} ({place}): inputs are never written to",
                path=out,
                hint=f"choose a {option} path outside every input",
            )
        if real in place.parents:
            raise BadInput(
                f"{option} holds the {label} ({place}): replacing it would delete the input",
                path=out,
                hint=f"choose a {option} path outside every input",
            )
    for above in out.parents:
        if above.exists():
            if not above.is_dir():
                raise BadInput(f"{option} lies under {above}, which is a file", path=out, hint="name a directory path")
            break
    if kind == "directory":
        check_target(out, force)
    else:
        refuse_existing(out, force)
        if out.is_dir():
            raise BadInput("is a directory, not a file", path=out, hint="name a file to write")
    return out


def check_report(report: Path, out: Path, inputs: Mapping[str, Path], force: bool) -> Path:
    """The --report file obeys the same rule, and does not overlap OUT (inside OUT is fine: it is published
    with it)."""
    report = check_output(report, inputs, force=force, kind="file", option="--report")
    real, real_out = report.resolve(), out.resolve()
    if real == real_out or real in real_out.parents:
        raise BadInput(f"--report overlaps -o ({out})", path=report, hint="give the report a path of its own")
    return report


def _unique(places: list[tuple[str, Path, bool]]) -> list[tuple[str, Path, bool]]:
    seen: dict[Path, tuple[str, bool]] = {}
    for label, place, whole in places:
        if place not in seen or whole:
            seen[place] = (label, whole or seen.get(place, ("", False))[1])
    return [(label, place, whole) for place, (label, whole) in seen.items()]
