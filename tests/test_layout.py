"""The rooms of safe_merge/ and their order: a module imports from its own room or rooms below it, never above
(CONTRIBUTING.md: errors < io < compat < quant < verifier < merger < the top-level modules < cli)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "safe_merge"
ORDER = ("errors", "io", "compat", "quant", "verifier", "merger", "top", "cli")
TOP_LEVEL = {
    "api": "top",
    "report": "top",
    "fingerprints": "top",
    "demo": "top",
    "doctor": "top",
    "cli": "cli",
    "__main__": "cli",
}


def room(module: str) -> str | None:
    """The room of a dotted module name inside safe_merge (None outside it, or for the package itself)."""
    parts = module.split(".")
    if parts[0] != "safe_merge" or len(parts) == 1:
        return None
    return TOP_LEVEL.get(parts[1], parts[1])


def imported(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) for every import, `from safe_merge import x` counted as importing safe_merge.x."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "safe_merge":
                out += [(node.lineno, f"safe_merge.{alias.name}") for alias in node.names]
            else:
                out.append((node.lineno, node.module))
    return out


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py")


def test_every_module_belongs_to_a_known_room():
    unknown = {room("safe_merge." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts)) for p in modules()}
    assert unknown <= set(ORDER), unknown - set(ORDER)


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_from_a_room_above_its_own(path):
    own = room("safe_merge." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts))
    above = [
        f"line {line}: {module} ({room(module)})"
        for line, module in imported(ast.parse(path.read_text(encoding="utf-8")))
        if room(module) is not None and ORDER.index(room(module)) > ORDER.index(own)
    ]
    assert not above, f"{path.relative_to(PACKAGE)} ({own}) imports from above: {above}"


def test_the_backend_choice_is_made_in_one_place():
    """Only the registry names the backends' classes; the pipeline asks it and never branches on the answer."""
    naming = sorted(
        str(p.relative_to(PACKAGE))
        for p in modules()
        if "StreamBackend" in p.read_text(encoding="utf-8") and "backends" not in p.parts
    )
    assert naming == []
    pipeline = (PACKAGE / "merger" / "pipeline.py").read_text(encoding="utf-8")
    assert '== "stream"' not in pipeline and '== "peft"' not in pipeline
