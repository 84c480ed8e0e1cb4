"""`safe-merge env`: the installed versions, what the history table knows about them, and what is known broken
or declared incompatible there, with the release that fixes it. The first thing to run after an upgrade, and
what a bug report should carry."""

from __future__ import annotations

import platform
import sys

from packaging.version import Version

from safe_merge.compat import pairs
from safe_merge.compat.history import History

PACKAGES = (
    "safe-merge",
    "torch",
    "peft",
    "transformers",
    "safetensors",
    "huggingface_hub",
    "accelerate",
    "tokenizers",
    "bitsandbytes",
    "torchao",
    "hqq",
)


def environment() -> dict:
    """The environment report; status ``ok`` when nothing needs attention, else ``attention`` (exit 0 either
    way: nothing is wrong with a merge until one runs)."""
    versions = {"python": platform.python_version(), **{p: pairs.installed_version(p) for p in PACKAGES}}
    history = History.load()
    peft = versions["peft"]
    imports = _import_peft() if peft else "PEFT is not installed: pip install peft"
    known = {"oldest": history.oldest, "newest": history.newest}
    bugs: list[dict] = []
    if peft:
        release = pairs.release(peft)
        known["installed_peft_known"] = Version(history.oldest) <= release <= Version(history.newest)
        known["config_keys"] = len(history.keys_in(release))
        bugs = history.bugs_in(release)
    attention = []
    if imports != "ok":
        attention.append(f"peft does not import here: {imports}")
    if peft and not known["installed_peft_known"]:
        attention.append(
            f"PEFT {peft} is outside the releases safe-merge's history table knows ({history.oldest} to "
            f"{history.newest}): a config key it adds is unknown to inspect and migrate, which then refuse it"
        )
    declared = pairs.report()
    attention += [d["message"] for d in declared]
    attention += [f"known bug in PEFT {peft}: {b['name']} (fixed in {b['fixed_in']}): {b['note']}" for b in bugs]
    pair = pairs.pair_bugs()
    attention += [pairs.pair_bug_message(b) for b in pair]
    return {
        "status": "attention" if attention else "ok",
        "versions": versions,
        "executable": sys.executable,
        "peft_imports": imports,
        "history": known,
        "declarations": declared,
        "known_bugs": bugs,
        "pair_bugs": pair,
        "attention": attention,
        "exit_code": 0,
    }


def _import_peft() -> str:
    """ "ok", or the first line of the error PEFT raises on import (e.g. a transformers without a class it uses)."""
    try:
        import peft  # noqa: F401
    except Exception as exc:
        return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"
    return "ok"
