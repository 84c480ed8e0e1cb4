"""Re-derive, from released PEFT wheels, which adapter-config keys each release writes.

The history table (history.json) is maintained by hand, because its neutral-value rules need judgement; its
"first release" column must agree with the wheels. This module reads each wheel as a zip, parses the source
with ``ast`` (nothing from a wheel is imported or run), and collects the dataclass fields of LoraConfig and its
PeftConfig bases, with their defaults where they are literals.

    python -m safe_merge.compat.derive WHEEL_DIR          # print the derived first release of every key
    python -m safe_merge.compat.derive WHEEL_DIR --check  # exit 1 on any difference from history.json
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from packaging.version import Version

CONFIG_CLASSES = ("PeftConfigMixin", "PeftConfig", "LoraConfig")
_MISSING = object()  # a field without a default


@dataclass(frozen=True)
class Field:
    name: str
    default: object  # a Python literal, or a string "<expr>" when the default is not a literal


def _default(value: ast.expr | None) -> object:
    """The default of one dataclass field: the literal, {} / [] for dict / list factories, else the source."""
    if value is None:
        return _MISSING
    if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "field":
        for kw in value.keywords:
            if kw.arg == "default":
                return _default(kw.value)
            if kw.arg == "default_factory":
                factory = ast.unparse(kw.value)
                return {"dict": {}, "list": []}.get(factory, f"<{factory}()>")
        return _MISSING
    try:
        return ast.literal_eval(value)
    except (ValueError, TypeError, SyntaxError):
        return f"<{ast.unparse(value)}>"


def class_fields(source: str) -> dict[str, tuple[list[str], list[Field]]]:
    """For each config class defined in ``source``: its base names and its own annotated fields, in order."""
    out = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name in CONFIG_CLASSES:
            bases = [ast.unparse(b).split(".")[-1] for b in node.bases]
            fields = [
                Field(stmt.target.id, _default(stmt.value))
                for stmt in node.body
                if isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and "ClassVar" not in ast.unparse(stmt.annotation)
            ]
            out[node.name] = (bases, fields)
    return out


def wheel_fields(wheel: Path) -> dict[str, Field]:
    """Every field a LoraConfig of this wheel has, base classes first (later definitions win)."""
    classes: dict[str, tuple[list[str], list[Field]]] = {}
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if name.startswith("peft/") and name.endswith(".py"):
                source = zf.read(name).decode("utf-8", errors="replace")
                if any(f"class {c}" in source for c in CONFIG_CLASSES):
                    classes.update(class_fields(source))
    if "LoraConfig" not in classes:
        raise ValueError(f"{wheel.name}: no LoraConfig class found")

    def collect(cls: str, seen: set[str]) -> dict[str, Field]:
        if cls not in classes or cls in seen:
            return {}
        seen.add(cls)
        bases, own = classes[cls]
        fields: dict[str, Field] = {}
        for base in bases:
            fields.update(collect(base, seen))
        fields.update({f.name: f for f in own})
        return fields

    return collect("LoraConfig", set())


def release_of(wheel: Path) -> Version:
    match = re.match(r"peft-([^-]+)-", wheel.name)
    if not match:
        raise ValueError(f"not a PEFT wheel name: {wheel.name}")
    return Version(match.group(1))


def fields_by_release(wheel_dir: Path) -> dict[Version, dict[str, Field]]:
    """Each wheel's LoraConfig fields, keyed by release, oldest first."""
    wheels = sorted(Path(wheel_dir).glob("peft-*.whl"), key=release_of)
    return {release_of(w): wheel_fields(w) for w in wheels}


def derive(by_release: dict[Version, dict[str, Field]]) -> dict[str, dict]:
    """key → first and last release (of the wheels given) whose LoraConfig has it, and its first default."""
    table: dict[str, dict] = {}
    for release, fields in by_release.items():
        for name, fld in fields.items():
            row = table.setdefault(name, {"first": str(release), "default": fld.default})
            row["last"] = str(release)
    return table


def differences(by_release: dict[Version, dict[str, Field]], history) -> list[str]:
    """Every release where the table's key set is not exactly the wheel's LoraConfig fields."""
    out = []
    for release, fields in by_release.items():
        table_keys = history.keys_in(release)
        for key in sorted(set(fields) - table_keys):
            out.append(f"{release}: the wheel has {key!r}, history.json says the release lacks it")
        for key in sorted(table_keys - set(fields)):
            out.append(f"{release}: history.json says {key!r} is there, the wheel lacks it")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel_dir", type=Path)
    parser.add_argument("--check", action="store_true", help="compare with history.json; exit 1 on a difference")
    args = parser.parse_args(argv)
    by_release = fields_by_release(args.wheel_dir)
    if not by_release:
        print(f"no peft-*.whl in {args.wheel_dir}", file=sys.stderr)
        return 2
    derived = derive(by_release)
    if not args.check:
        for key, row in sorted(derived.items(), key=lambda kv: (Version(kv[1]["first"]), kv[0])):
            print(f"{key:28s} first {row['first']:8s} last {row['last']:8s} default {row['default']!r}")
        return 0
    from safe_merge.compat.history import History

    problems = differences(by_release, History.load())
    for line in problems:
        print(line)
    verdict = "no differences" if not problems else f"{len(problems)} differences"
    print(f"{len(derived)} keys, {len(by_release)} releases ({min(by_release)} to {max(by_release)}): {verdict}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
