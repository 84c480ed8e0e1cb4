"""The Python API: the functions the CLI calls, returning the report `--json` prints."""

from __future__ import annotations

import subprocess
import sys

import pytest

import safe_merge
from safe_merge.cli import EXAMPLES, build_parser
from tests.helpers import materialize
from tests.release import INSTALLED
from tests.strategies import TINY, Case


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    case = Case(
        "llama", TINY["one_layer"], False, {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}, "float32", seed=3
    )
    return materialize(case, tmp_path_factory.mktemp("api"))


def test_the_package_exports_one_function_per_command_and_the_errors():
    commands = {"merge", "verify", "inspect", "migrate", "fingerprint", "check"}
    assert commands <= set(safe_merge.__all__)
    assert all(callable(getattr(safe_merge, name)) for name in safe_merge.__all__)


def test_importing_the_package_does_not_import_torch_or_transformers():
    code = "import sys, safe_merge; print(sorted({'torch', 'transformers', 'peft'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_every_command_has_an_example_in_its_help_and_in_the_overview():
    parser = build_parser()
    subcommands = next(a for a in parser._actions if a.dest == "command").choices
    assert set(subcommands) == set(EXAMPLES)
    overview = parser.format_help()
    for name, sub in subcommands.items():
        assert EXAMPLES[name] and all(example in sub.format_help() for example in EXAMPLES[name])
        assert EXAMPLES[name][0] in overview


def test_merge_returns_the_report_the_cli_prints(pair, tmp_path, cli):
    base, adapter = pair
    from_api = safe_merge.merge(base, adapter, tmp_path / "api")
    code, from_cli, _ = cli("merge", base, adapter, "-o", tmp_path / "cli", "--json")
    assert from_api["status"] == from_cli["status"] == "passed" and from_api["exit_code"] == code == 0
    assert set(from_api) == set(from_cli)
    assert from_api["ledger"] == from_cli["ledger"] and from_api["backend"] == from_cli["backend"]
    assert (tmp_path / "api" / "config.json").is_file()


def test_verify_and_inspect_return_reports_with_exit_codes(pair, tmp_path):
    base, adapter = pair
    assert safe_merge.merge(base, [adapter], tmp_path / "out", backend="peft")["backend"] == "peft"
    verified = safe_merge.verify(base, adapter, tmp_path / "out")
    assert verified["status"] == "passed" and verified["exit_code"] == 0
    inspected = safe_merge.inspect(adapter, target=INSTALLED)
    assert inspected["target"] == INSTALLED and inspected["exit_code"] == 0


def test_a_refusal_raises_with_its_exit_code_and_rule_and_writes_nothing(pair, tmp_path):
    base, adapter = pair
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(safe_merge.BadInput) as raised:
        safe_merge.merge(base, adapter, out)
    assert raised.value.exit_code == 2 and raised.value.rule == "output-path"
    assert "refused by rule: output-path" in str(raised.value)
    assert list(out.iterdir()) == []


def test_an_option_outside_its_choices_is_refused_before_any_input_is_read(tmp_path):
    with pytest.raises(safe_merge.BadInput, match="--backend 'fast' is not one of auto, stream, peft"):
        safe_merge.merge(tmp_path / "no-base", tmp_path / "no-adapter", tmp_path / "out", backend="fast")
    with pytest.raises(safe_merge.BadInput, match="--max-shard-size"):
        safe_merge.merge(tmp_path / "no-base", tmp_path / "no-adapter", tmp_path / "out", max_shard_size="big")
