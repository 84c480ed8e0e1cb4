"""safe-merge's sessions. Versions (torch, the current PEFT × transformers pair, the matrix cells, the fixture
releases) come from matrix/matrix.toml; `python3 -m nox -l` lists them all.

- lint: ruff check and ruff format --check.
- tests: the whole suite on the current pair, with the quantization libraries and Ray (`ci` hypothesis profile).
- crosscheck(cell): the newest release's fixtures migrated down and loaded by each older real PEFT release.
- matrix(peft, transformers): the whole suite in one cell; `-t smoke` (in CI) or `-t full` picks a tier.
- demo: `safe-merge demo`, offline.
- bench: the stream backend against the PEFT path on 1.1B- and 4.4B-parameter models (figures, not a test).
- quant-formats: the stored quantization formats × policies table (figures, not a test).
- bench-verify: `safe-merge verify` beside deltalint on 160M and 1.1B models (figures, not a test).
- latest(pair): the whole suite on the newest PEFT and transformers on the index, each also beside the other's
  pinned current release (`-t latest`; resolved at run time, printed; LATEST_PRE=1 takes pre-releases too).
- regress: `safe-merge check` of a fingerprint in every cell of a tier, as a table.
- fixtures(cell): regenerate tests/fixtures/peft-<release>/ with that real release.
- history: re-derive history.json's first releases from every PEFT wheel on the index (downloads; not in CI).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import nox
import nox.command
import nox.project

ROOT = Path(__file__).parent
MATRIX = nox.project.load_toml(ROOT / "matrix" / "matrix.toml")  # nox reads toml on any Python (tomllib is 3.11+)

nox.options.default_venv_backend = "uv|virtualenv"
nox.options.sessions = ["lint", "tests", "crosscheck"]
nox.options.reuse_existing_virtualenvs = True
# the suite starts many interpreters (pytest workers, the safe-merge processes tests run): where the environment
# says not to write bytecode, each of them compiled torch, transformers and PEFT again (measured here: 15.8 s to
# import them without bytecode, 6.7 s with it); the environments are nox's own, so the first import writes it
WRITE_BYTECODE: dict[str, str | None] = {"PYTHONDONTWRITEBYTECODE": None}
IMPORT_PROBE = "import peft, transformers, safe_merge.merger.pipeline"  # a pair that cannot work fails here


def torch_version() -> str:
    """TORCH_VERSION, else the torch of the environment running nox (its local label dropped), else the pin in
    matrix.toml (a CPU build on these machines' find-links)."""
    if os.environ.get("TORCH_VERSION"):
        return os.environ["TORCH_VERSION"]
    try:
        return importlib.metadata.version("torch").split("+")[0]
    except importlib.metadata.PackageNotFoundError:
        return MATRIX["torch"]["version"]


def find_links() -> list[str]:
    """uv does not read pip's settings: hand pip's local find-links (where the CPU torch lives) on to it."""
    links = os.environ.get("PIP_FIND_LINKS", "").split()
    return [arg for link in links for arg in ("--find-links", link)]


def write_constraints(path: Path, peft: str, transformers: str, extra: list[str] | None = None) -> Path:
    """One cell's pins: torch, PEFT, transformers and what an old transformers needs beside them."""
    pins = [f"torch=={torch_version()}", f"peft=={peft}", f"transformers=={transformers}", *(extra or [])]
    path.parent.mkdir(parents=True, exist_ok=True)  # regress may build a cell before any nox venv exists
    path.write_text("\n".join(pins) + "\n")
    return path


def install(
    pip: Callable[..., object],
    cell: dict,
    constraints: Path,
    *,
    extras: str | None = "test",
    more: Sequence[str] = (),
) -> None:
    """The one way an environment is filled: torch first and pinned (the constraints keep every later install
    from replacing it), then the project with the cell's PEFT and transformers (``extras``), or with ``extras``
    None the cell's releases alone (a real old release, which may predate the project). ``pip`` runs an install
    with the given arguments in the target environment."""
    extra = cell.get("extra", [])
    write_constraints(constraints, cell["peft"], cell["transformers"], extra)
    pip(*find_links(), f"torch=={torch_version()}")
    if extras is None:
        releases = [f"peft=={cell['peft']}", f"transformers=={cell['transformers']}", "safetensors"]
        pip(*find_links(), "-c", str(constraints), *releases, *more, *extra)
    else:
        pip(*find_links(), "-c", str(constraints), "-e", f"{ROOT}[{extras}]")


def install_project(session: nox.Session, cell: dict, extras: str = "test") -> None:
    install(session.install, cell, Path(session.create_tmp()) / "constraints.txt", extras=extras)


@nox.session
def tests(session: nox.Session) -> None:
    """The whole suite on the current PEFT × transformers pair, with the `ci` hypothesis profile, and the
    quantization libraries (the `quant` extra) so the quantized-base tests run too."""
    install_project(session, MATRIX["current"], extras="test,quant,ray")
    session.run(
        "python",
        "-c",
        "import peft, transformers, torch; "
        "print('peft', peft.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)",
    )
    env = {"HYPOTHESIS_PROFILE": os.environ.get("HYPOTHESIS_PROFILE", "ci"), "HF_HUB_OFFLINE": "1"}
    env["OMP_NUM_THREADS"] = "1"  # one pytest worker per core (as in matrix below); the figures table gathers them
    env.update(WRITE_BYTECODE)
    args = ["-p", "no:cacheprovider", "-n", "auto", "--dist", "worksteal"]  # worksteal: no idle core at the tail
    session.run("pytest", *args, *(session.posargs or ["tests"]), env=env)


@nox.session
def demo(session: nox.Session) -> None:
    """`safe-merge demo`: the whole pipeline on a tiny model it builds itself, offline."""
    install_project(session, MATRIX["current"])
    session.run("safe-merge", "demo", *session.posargs, env={"HF_HUB_OFFLINE": "1"})


@nox.session
def breadth(session: nox.Session) -> None:
    """The whole breadth table (tests/breadth/table.toml): every architecture × feature row merged with both
    backends, verified and compared with the unmerged PeftModel; prints the table with its counts. `-- NAME...`
    runs the named rows."""
    install_project(session, MATRIX["current"])
    env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    session.run("python", "-m", "tests.breadth.run", *session.posargs, env=env)


@nox.session
def bench(session: nox.Session) -> None:
    """The stream backend against the PEFT path on a TinyLlama-shaped 1.1B model and one 4x its size (built once,
    cached in .nox/bench-models): wall seconds, peak RSS, bit-identity; workers, Ray, resume. `-- --skip-large`
    skips the 4x model."""
    install_project(session, MATRIX["current"], extras="test,ray")
    cache = ROOT / ".nox" / "bench-models"
    session.run("python", "bench/stream.py", str(cache), *session.posargs, env={"HF_HUB_OFFLINE": "1"})


@nox.session(name="quant-formats")
def quant_formats(session: nox.Session) -> None:
    """The stored quantization formats × policies table of docs/quantized.md (tiny models; figures, not a test)."""
    install_project(session, MATRIX["current"], extras="test,quant")
    session.run("python", "bench/quant_formats.py", env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})


@nox.session(name="bench-verify")
def bench_verify(session: nox.Session) -> None:
    """`safe-merge verify` beside deltalint (a peer that checks weights only; installed here from PyPI) on a 160M
    and the 1.1B bfloat16 Llama (cached in .nox/bench-models): wall seconds, peak RSS, the ratio, and the exact
    tier's counts. `-- --skip-large` skips the 1.1B model."""
    install_project(session, MATRIX["current"])
    constraints = Path(session.create_tmp()) / "constraints.txt"
    session.install(*find_links(), "-c", str(constraints), "deltalint")
    cache = ROOT / ".nox" / "bench-models"
    args = [str(cache), "--deltalint", "python", *session.posargs]
    session.run("python", "bench/verify.py", *args, env={"HF_HUB_OFFLINE": "1"})


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
    install_project(session, cell)
    try:
        session.run("python", "-c", IMPORT_PROBE, silent=True, env=WRITE_BYTECODE)
    except nox.command.CommandFailed:
        session.error(
            f"peft {peft} does not import with transformers {transformers}; if that is expected, list the pair "
            "under [[known_bad]] in matrix/matrix.toml with the reason"
        )
    judge_pair(session, peft, transformers)
    run_suite(session, cell)


def judge_pair(session: nox.Session, peft: str, transformers: str) -> None:
    """What the installed PEFT and transformers declare about each other (`safe-merge env`). A requirement one of
    them declares unmet skips the cell: pip was overruled, the pair is not one anybody installs. transformers'
    MIN_PEFT_VERSION gates only its own adapter API, which safe-merge does not call: the suite runs, and the
    declaration is printed (and reported by safe-merge at run time)."""
    doctor = ["python", "-m", "safe_merge", "env", "--json"]
    report = json.loads(session.run(*doctor, silent=True, stderr=None, env=WRITE_BYTECODE))
    declared = report["declarations"]
    for item in declared:
        session.log(f"declared: {item['message']}")
    unmet = [d for d in declared if not d["safe_merge_unaffected"]]
    if unmet:
        session.skip(f"peft {peft} with transformers {transformers} declared invalid: {unmet[0]['message']}")


def run_suite(session: nox.Session, cell: dict, extra: Sequence[str] = ()) -> None:
    """The whole suite in a cell, with the `matrix` profile's draws seeded by the pair: reproducible in the cell,
    different from every other cell's."""
    env = {"HYPOTHESIS_PROFILE": os.environ.get("HYPOTHESIS_PROFILE", "matrix"), "HF_HUB_OFFLINE": "1"}
    seed = zlib.crc32(f"peft {cell['peft']} transformers {cell['transformers']}".encode())
    extra = [f"--hypothesis-seed={seed}", *extra]
    # one pytest worker per core, each torch single-threaded: tiny models gain nothing from intra-op threads, and
    # two workers with two threads each ran slower here than one process (71 s against 61 s; 42 s like this)
    env["OMP_NUM_THREADS"] = "1"
    env.update(WRITE_BYTECODE)
    # tests marked `process` (signals sent to real safe-merge processes) do not depend on the pair: the tests
    # session runs them once
    args = session.posargs or ["tests", "-m", "not process", *(f"--ignore={t}" for t in cell.get("skip_tests", []))]
    # worksteal: a worker that runs out of tests takes some of the other's (measured: 105 s -> 75 s a cell)
    session.run("pytest", "-p", "no:cacheprovider", "-q", "-n", "auto", "--dist", "worksteal", *args, *extra, env=env)


LATEST_PAIRS = {
    "newest": ("newest", "newest"),  # what a fresh `pip install -e .` of the project resolves to
    "newest-peft": ("newest", "current"),
    "newest-transformers": ("current", "newest"),
}


def index_versions(package: str, pre: bool = False) -> list[str]:
    """Every release of ``package`` on the index pip is configured for, newest first."""
    args = [sys.executable, "-m", "pip", "index", "versions", package, *(["--pre"] if pre else [])]
    listing = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    line = next(x for x in listing.splitlines() if x.startswith("Available versions:"))
    return [v.strip() for v in line.split(":", 1)[1].split(",")]


def resolve_latest(role: str, pre: bool = False) -> dict:
    """The pair a `latest` role stands for today: the newest release on the index, or matrix.toml's current one."""
    pick = {
        package: index_versions(package, pre)[0] if which == "newest" else MATRIX["current"][package]
        for package, which in zip(("peft", "transformers"), LATEST_PAIRS[role], strict=True)
    }
    return {**pick, "extra": []}


@nox.session
@nox.parametrize("pair", [nox.param(role, tags=["latest"]) for role in LATEST_PAIRS])
def latest(session: nox.Session, pair: str) -> None:
    """The whole suite (fixtures, crosscheck of stored adapters, fingerprints, the history table's keys) on a pair
    resolved from the index today. A pair the libraries declare invalid skips saying so; a failure names the new
    release and the first failing test."""
    pre = os.environ.get("LATEST_PRE") == "1"
    cell = resolve_latest(pair, pre)
    current = MATRIX["current"]
    new = [f"{p} {cell[p]}" for p in ("peft", "transformers") if cell[p] != current[p]]
    session.log(
        f"latest ({pair}): peft {cell['peft']} × transformers {cell['transformers']} "
        f"({'new since matrix.toml: ' + ', '.join(new) if new else 'the pinned current pair'})"
    )
    earlier = [r for r in list(LATEST_PAIRS)[: list(LATEST_PAIRS).index(pair)] if resolve_latest(r, pre) == cell]
    if earlier:
        session.skip(f"the same pair as latest(pair='{earlier[0]}')")
    install_project(session, cell)
    try:
        session.run("python", "-c", IMPORT_PROBE, silent=True, env=WRITE_BYTECODE)
    except nox.command.CommandFailed:
        session.error(f"peft {cell['peft']} does not import with transformers {cell['transformers']}")
    judge_pair(session, cell["peft"], cell["transformers"])
    junit = Path(session.create_tmp()) / "latest.xml"
    try:
        run_suite(session, cell, [f"--junitxml={junit}"])
    except nox.command.CommandFailed:
        first = _first_failure(junit)
        session.error(
            f"{', '.join(new) or 'the pinned pair'}: the suite fails with peft {cell['peft']} × transformers "
            f"{cell['transformers']}; first failing test: {first}"
        )


def _first_failure(junit: Path) -> str:
    import xml.etree.ElementTree as ElementTree

    if not junit.is_file():
        return "(pytest wrote no report)"
    for case in ElementTree.parse(junit).iter("testcase"):
        failed = case.find("failure") if case.find("failure") is not None else case.find("error")
        if failed is not None:
            message = (failed.get("message") or "").splitlines()[:1]
            return f"{case.get('classname')}::{case.get('name')} ({' '.join(message)[:300]})"
    return "(none recorded: pytest itself failed)"


def _cells(tier: str) -> list[dict]:
    """A tier's cells in matrix.toml order, known-bad pairs included (they carry a reason)."""
    return [c for section in ("cells", "known_bad") for c in MATRIX.get(section, []) if tier in c["tiers"]]


def _cell_python(session: nox.Session, cell: dict) -> Path:
    """The python of the cell's environment, shared with its matrix session (built here if missing): torch pinned,
    then the project with that PEFT and transformers."""
    name = f"matrix-peft-{cell['peft']}-transformers-{cell['transformers']}".replace(".", "-")
    env = ROOT / ".nox" / name
    python = env / "bin" / "python"
    probe = f"import peft, transformers, safe_merge; assert peft.__version__ == {cell['peft']!r}"
    if python.exists() and subprocess.run([python, "-c", probe], capture_output=True).returncode == 0:
        return python
    if shutil.which("uv"):
        session.run("uv", "venv", "-q", "--allow-existing", str(env), external=True)
        prefix = ["uv", "pip", "install", "-q", "--python", str(python)]
    else:
        session.run(sys.executable, "-m", "venv", str(env), external=True)
        prefix = [str(python), "-m", "pip", "install", "-q"]
    install(
        lambda *args: session.run(*prefix, *args, external=True),
        cell,
        env.parent / f"{name}.constraints.txt",
        extras="test",
    )
    return python


@nox.session(venv_backend="none")
def regress(session: nox.Session) -> None:
    """`nox -s regress -- FILE.json [--tier smoke|full] [--base B] [--adapter A]`: `safe-merge check` of a
    fingerprint in every cell of a tier, then a table (cell → verdict, largest output and weight-change diffs).
    Fails when the check fails in any cell; a cell whose release cannot load the adapter says so."""
    args = list(session.posargs)
    tier = "smoke"
    if "--tier" in args:
        at = args.index("--tier")
        tier = args[at + 1]
        del args[at : at + 2]
    if not args or not Path(args[0]).is_file():
        session.error("usage: nox -s regress -- FILE.json [--tier smoke|full] [--base B] [--adapter A]")
    fingerprint, rest = str(Path(args[0]).resolve()), args[1:]
    rows, failed = [], False
    for cell in _cells(tier):
        label = f"peft {cell['peft']} / transformers {cell['transformers']}"
        if "reason" in cell:
            rows.append((label, "known-bad", "", "", cell["reason"]))
            continue
        python = _cell_python(session, cell)
        started = time.monotonic()
        done = subprocess.run(
            [python, "-m", "safe_merge", "check", fingerprint, "--json", *rest],
            capture_output=True,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        seconds = f"{time.monotonic() - started:.1f} s"
        try:
            report = json.loads(done.stdout)
        except json.JSONDecodeError:
            report = {"status": "error", "error": done.stderr.strip().splitlines()[-1:] or ["no output"]}
        verdict = {0: "passed", 1: "FAILED", 3: "cannot load"}.get(done.returncode, f"error (exit {done.returncode})")
        failed |= done.returncode not in (0, 3)
        outputs = report.get("outputs") or {}
        worst = (report.get("deltas") or {}).get("worst") or {}
        diffs = f"out {outputs['max_abs']:.2g} / tol {outputs['tol']:.2g}" if outputs else ""
        if worst:
            diffs += f"; weights {worst['diff']:.2g} / tol {worst['tol']:.2g}"
        error = [x.strip() for x in str(report.get("error", "")).splitlines() if not x.strip().startswith("what to do")]
        why = "; ".join(report.get("problems", [])[:2]) or " ".join(error)
        rows.append((label, verdict, diffs, seconds, why[:300]))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    session.log(f"safe-merge check {fingerprint} across the {tier} tier:")
    for row in rows:
        session.log(
            "  "
            + "  ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True))
            + (f"  {row[4]}" if row[4] else "")
        )
    if failed:
        session.error("the fingerprint moved, or the check could not run, in at least one cell (table above)")


@nox.session
@nox.parametrize("cell", [nox.param(c, id=f"peft={c['peft']},transformers={c['transformers']}") for c in FIXTURE_CELLS])
def fixtures(session: nox.Session, cell: dict) -> None:
    """Regenerate tests/fixtures/peft-<release>/ with that real release (one venv per release)."""
    install(session.install, cell, Path(session.create_tmp()) / "constraints.txt", extras=None)
    out = ROOT / "tests" / "fixtures" / f"peft-{cell['peft']}"
    session.run("python", str(ROOT / "tests" / "fixtures" / "produce.py"), str(out), env={"HF_HUB_OFFLINE": "1"})


OLDER_CELLS = [c for c in FIXTURE_CELLS if c["peft"] != MATRIX["current"]["peft"]]


@nox.session
@nox.parametrize("cell", [nox.param(c, id=f"peft={c['peft']},transformers={c['transformers']}") for c in OLDER_CELLS])
def crosscheck(session: nox.Session, cell: dict) -> None:
    """Migrate the newest release's fixtures down to an older real release and load them there: each must give
    its producer's logits, or be refused where the history table says so."""
    install(session.install, cell, Path(session.create_tmp()) / "constraints.txt", extras=None, more=["packaging"])
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
    session.install("packaging", "pip")  # uv venvs come without pip; its `download` is used here
    versions = index_versions("peft")  # a release out since the last run is learned here: its wheel is diffed too
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
