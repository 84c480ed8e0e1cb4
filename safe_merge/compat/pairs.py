"""What the installed PEFT and transformers declare about each other, read from their own metadata.

Two declarations matter, and pip enforces neither across releases:

- transformers' PEFT integration names the oldest PEFT its adapter API accepts (``MIN_PEFT_VERSION``). Below it,
  ``model.load_adapter``, ``add_adapter``, ``set_adapter``, ``active_adapters()`` and ``save_pretrained`` of a
  model carrying an adapter raise. transformers 5.24.0 asks for PEFT 0.22.0, which no index had when it shipped.
- Every requirement PEFT and transformers list in their metadata (Requires-Dist), against what is installed.

safe-merge loads adapters with ``PeftModel`` and merges with PEFT's own layers or its stream backend; it never
goes through transformers' adapter API. So a declaration that the pair conflicts there is reported (by ``env``,
``merge`` and ``check``) and the merge goes on; a requirement PEFT itself declares unmet is reported the same
way, naming what to install.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import json
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from safe_merge.compat.history import History

ADAPTER_API = (
    "its adapter API (load_adapter, add_adapter, set_adapter, active_adapters() and save_pretrained of a model "
    "carrying an adapter)"
)
DECLARERS = ("peft", "transformers")
PAIR_BUGS = Path(__file__).with_name("pair_bugs.json")


@dataclass(frozen=True)
class Declaration:
    """One requirement a library declares that the installed environment does not meet."""

    declared_by: str  # "transformers 5.24.0"
    requires: str  # "peft>=0.22.0"
    installed: str  # "peft 0.21.2", or "transformers (not installed)"
    scope: str  # what the declaration gates
    beyond_history: bool  # a PEFT newer than every release the history table knows (perhaps not released yet)
    safe_merge_unaffected: bool  # it gates only an API safe-merge does not call

    def message(self) -> str:
        newer = (
            f" (newer than every PEFT release safe-merge's history table knows, {History.load().newest}: perhaps "
            "not released yet)"
            if self.beyond_history
            else ""
        )
        said = f"{self.declared_by} requires {self.requires}{newer} for {self.scope}; installed: {self.installed}"
        if self.safe_merge_unaffected:
            return f"{said}. safe-merge does not call that API: merge, verify and check work on this pair"
        return f"{said}. Install a release that meets it (pip install '{self.requires}')"


def installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def min_peft_for_adapter_api() -> str | None:
    """The PEFT release the installed transformers' adapter API asks for (None: it names none, or transformers is
    missing). Read from the source of the module transformers itself checks against, not imported: importing it
    pulls in transformers' model-loading code, seconds and a hundred MiB a merge that builds no model never pays."""
    spec = importlib.util.find_spec("transformers")  # a top-level spec: transformers is not imported
    if spec is None or not spec.submodule_search_locations:
        return None
    source = Path(next(iter(spec.submodule_search_locations))) / "integrations" / "peft.py"
    try:
        tree = ast.parse(source.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):  # an old transformers without the integration
        return None
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if any(getattr(t, "id", None) == "MIN_PEFT_VERSION" for t in targets):
            value = node.value
            return value.value if isinstance(value, ast.Constant) and isinstance(value.value, str) else None
    return None


def adapter_api_declaration() -> Declaration | None:
    """transformers' MIN_PEFT_VERSION against the installed PEFT."""
    peft, transformers = installed_version("peft"), installed_version("transformers")
    needed = min_peft_for_adapter_api() if peft and transformers else None
    if needed is None or release(peft) >= release(needed):
        return None
    return Declaration(
        declared_by=f"transformers {transformers}",
        requires=f"peft>={needed}",
        installed=f"peft {peft}",
        scope=ADAPTER_API,
        beyond_history=release(needed) > release(History.load().newest),
        safe_merge_unaffected=True,
    )


def requirement_declarations(packages: tuple[str, ...] = DECLARERS) -> list[Declaration]:
    """Each package's own Requires-Dist (extras aside) that the installed versions do not meet."""
    out = []
    for package in packages:
        version = installed_version(package)
        for text in (importlib.metadata.requires(package) or []) if version else []:
            try:
                requirement = Requirement(text)
            except InvalidRequirement:
                continue
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue  # an extra's requirement, or one for another platform
            have = installed_version(requirement.name)
            if have is not None and requirement.specifier.contains(have, prereleases=True):
                continue
            out.append(
                Declaration(
                    declared_by=f"{package} {version}",
                    requires=str(requirement),
                    installed=f"{requirement.name} {have}" if have else f"{requirement.name} (not installed)",
                    scope="the package as a whole",
                    beyond_history=False,
                    safe_merge_unaffected=False,
                )
            )
    return out


def declarations() -> list[Declaration]:
    """Everything the installed PEFT and transformers declare unmet here, transformers' adapter API first."""
    api = adapter_api_declaration()
    return ([api] if api else []) + requirement_declarations()


def declared_warnings() -> list[str]:
    """The declarations as report warnings (empty on a pair the libraries declare sound)."""
    return [d.message() for d in declarations()]


def report() -> list[dict]:
    return [{**asdict(d), "message": d.message()} for d in declarations()]


@cache
def _pair_bug_table() -> dict[str, dict]:
    return json.loads(PAIR_BUGS.read_text(encoding="utf-8"))["bugs"]


def pair_bugs(peft: str | None = None, transformers: str | None = None) -> list[dict]:
    """The known bugs of a PEFT × transformers pair (default: the installed one), each with its name."""
    peft = peft or installed_version("peft")
    transformers = transformers or installed_version("transformers")
    if not peft or not transformers:
        return []
    return [
        {"name": name, **bug}
        for name, bug in _pair_bug_table().items()
        if SpecifierSet(bug["peft"]).contains(release(peft), prereleases=True)
        and SpecifierSet(bug["transformers"]).contains(release(transformers), prereleases=True)
    ]


def pair_bug_message(bug: dict) -> str:
    return (
        f"known bug of peft {installed_version('peft')} with transformers {installed_version('transformers')} "
        f"({bug['name']}, fixed in {bug['fixed_in']}): {bug['affects']}"
    )


def explain(error: str) -> dict | None:
    """The known pair bug an error message shows, on the installed pair (None: none does)."""
    return next((bug for bug in pair_bugs() if bug["symptom"] in error), None)


def release(text: str | None) -> Version:
    """A version as the tables name releases (no local or dev suffix); one that does not parse sorts first."""
    try:
        return Version(Version(str(text)).base_version)
    except InvalidVersion:
        return Version("0")
