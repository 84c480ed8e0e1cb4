"""Sessions: tests (the suite on the current pair), demo, lint. Versions come from matrix/matrix.toml."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nox
import nox.command
import tomllib

ROOT = Path(__file__).parent
MATRIX = tomllib.loads((ROOT / "matrix" / "matrix.toml").read_text())

nox.options.default_venv_backend = "uv" if shutil.which("uv") else "virtualenv"
nox.options.sessions = ["lint", "tests", "crosscheck"]
nox.options.reuse_existing_virtualenvs = True


def torch_version() -> str:
    return os.environ.get("TORCH_VERSION") or MATRIX["torch"]["version"]


def find_links() -> list[str]:
    """uv does not read pip's settings: hand pip's local find-links (where the CPU torch lives) on to it."""
    links = os.environ.get("PIP_FIND_LINKS", "").split()
    return [arg for link in links for arg in ("--find-links", link)]


def install_project(
    session: nox.Session, peft: str, transformers: str, extras: str = "test", extra: list[str] | None = None
) -> None:
    """torch first and pinned (a constraint keeps every later install from replacing it), then the project."""
    constraints = Path(session.create_tmp()) / "constraints.txt"
    pins = [f"torch=={torch_version()}", f"peft=={peft}", f"transformers=={transformers}", *(extra or [])]
    constraints.write_text("\n".join(pins) + "\n")
    session.install(*find_links(), f"torch=={torch_version()}")
    session.install(*find_links(), "-c", str(constraints), "-e", f".[{extras}]")


@nox.session
def tests(session: nox.Session) -> None:
    """The whole suite on the current PEFT × transformers pair, with the `ci` hypothesis profile."""
    pair = MATRIX["current"]
    install_project(session, pair["peft"], pair["transformers"])
    session.run(
        "python",
        "-c",
        "import peft, transformers, torch; "
        "print('peft', peft.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)",
    )
    env = {"HYPOTHESIS_PROFILE": os.environ.get("HYPOTHESIS_PROFILE", "ci"), "HF_HUB_OFFLINE": "1"}
    session.run("pytest", "-p", "no:cacheprovider", *(session.posargs or ["tests"]), env=env)


@nox.session
def demo(session: nox.Session) -> None:
    """`safe-merge demo`: the whole pipeline on a tiny model it builds itself, offline."""
    pair = MATRIX["current"]
    install_project(session, pair["peft"], pair["transformers"], extras="test")
    session.run("safe-merge", "demo", *session.posargs, env={"HF_HUB_OFFLINE": "1"})


FIXTURE_CELLS = MATRIX.get("fixtures", [])


def _cell_params() -> list:
    """Every cell of matrix.toml, known-bad pairs included (they skip with their reason), tagged by tier."""
    out = []
    for cell in MATRIX.get("cells", []):
        out.append(nox.param(cell["peft"], cell["transformers"], tags=cell["tiers"]))
    for cell in MATRIX.get("known_bad", []):
        out.append(nox.param(cell["peft"], cell["transformers"], tags=[*cell["tiers"], "known-bad"]))
    return out


def _cell(peft: str, transformers: str) -> dict:
    for section in ("cells", "known_bad"):
        for cell in MATRIX.get(section, []):
            if (cell["peft"], cell["transformers"]) == (peft, transformers):
                return cell
    raise KeyError((peft, transformers))


@nox.session
@nox.parametrize("peft, transformers", _cell_params())
def matrix(session: nox.Session, peft: str, transformers: str) -> None:
    """The whole suite with one PEFT × transformers pair. A known-bad pair skips, saying why; a pair that fails
    to import fails, saying so."""
    cell = _cell(peft, transformers)
    if "reason" in cell:
        session.skip(f"known-bad pair: peft {peft} with transformers {transformers}: {cell['reason']}")
    install_project(session, peft, transformers, extra=cell.get("extra", []))
    try:
        session.run("python", "-c", "import peft, transformers, safe_merge.merger.pipeline", silent=True)
    except nox.command.CommandFailed:
        session.error(
            f"peft {peft} does not import with transformers {transformers}; if that is expected, list the pair "
            "under [[known_bad]] in matrix/matrix.toml with the reason"
        )
    env = {"HYPOTHESIS_PROFILE": os.environ.get("HYPOTHESIS_PROFILE", "matrix"), "HF_HUB_OFFLINE": "1"}
    session.run("pytest", "-p", "no:cacheprovider", "-q", *(session.posargs or ["tests"]), env=env)


def install_release(session: nox.Session, cell: dict, *more: str) -> None:
    """One real PEFT release on its transformers, torch pinned, without the project (it may predate it)."""
    constraints = Path(session.create_tmp()) / "constraints.txt"
    constraints.write_text(f"torch=={torch_version()}\n")
    session.install(*find_links(), f"torch=={torch_version()}")
    session.install(
        *find_links(),
        "-c",
        str(constraints),
        f"peft=={cell['peft']}",
        f"transformers=={cell['transformers']}",
        "safetensors",
        *more,
        *cell.get("extra", []),
    )


@nox.session
@nox.parametrize("cell", [nox.param(c, id=f"peft={c['peft']},transformers={c['transformers']}") for c in FIXTURE_CELLS])
def fixtures(session: nox.Session, cell: dict) -> None:
    """Regenerate tests/fixtures/peft-<release>/ with that real release (one venv per release)."""
    install_release(session, cell)
    out = ROOT / "tests" / "fixtures" / f"peft-{cell['peft']}"
    session.run("python", str(ROOT / "tests" / "fixtures" / "produce.py"), str(out), env={"HF_HUB_OFFLINE": "1"})


OLDER_CELLS = [c for c in FIXTURE_CELLS if c["peft"] != MATRIX["current"]["peft"]]


@nox.session
@nox.parametrize("cell", [nox.param(c, id=f"peft={c['peft']},transformers={c['transformers']}") for c in OLDER_CELLS])
def crosscheck(session: nox.Session, cell: dict) -> None:
    """Migrate the newest release's fixtures down to an older real release and load them there: each must give
    its producer's logits, or be refused where the history table says so."""
    install_release(session, cell, "packaging")
    newest = ROOT / "tests" / "fixtures" / f"peft-{MATRIX['current']['peft']}"
    session.run(
        "python",
        str(ROOT / "tests" / "fixtures" / "crosscheck.py"),
        str(newest),
        env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
    )


@nox.session
def history(session: nox.Session) -> None:
    """Re-derive each key's first release from every PEFT wheel on the index; fail on any difference from
    safe_merge/compat/history.json. Not part of CI: it downloads every release (about 15 MB, cached)."""
    session.install("packaging", "pip")  # uv venvs come without pip; its `index` and `download` are used here
    listing = session.run("python", "-m", "pip", "index", "versions", "peft", silent=True)
    line = next(x for x in listing.splitlines() if x.startswith("Available versions:"))
    versions = [v.strip() for v in line.split(":", 1)[1].split(",")]
    from packaging.version import Version

    wheels = Path(os.environ.get("PEFT_WHEEL_CACHE", ROOT / ".nox" / "peft-wheels"))
    wheels.mkdir(parents=True, exist_ok=True)
    for version in (v for v in versions if Version(v) >= Version("0.2.0")):
        if not list(wheels.glob(f"peft-{version}-*.whl")):
            session.run("python", "-m", "pip", "download", "-q", "--no-deps", f"peft=={version}", "-d", str(wheels))
    session.run("python", "-m", "safe_merge.compat.derive", str(wheels), "--check", env={"PYTHONPATH": str(ROOT)})


@nox.session(venv_backend="none")
def lint(session: nox.Session) -> None:
    """ruff lint and format check (uses the ruff on PATH, installing it into the running Python if missing)."""
    if not shutil.which("ruff"):
        session.run("python", "-m", "pip", "install", "-q", "ruff", external=True)
    session.run("ruff", "check", ".", external=True)
    session.run("ruff", "format", "--check", ".", external=True)
