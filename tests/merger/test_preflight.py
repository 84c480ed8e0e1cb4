"""The request, the preflight's ordered rules and the backend registry."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from safe_merge.errors import BadInput
from safe_merge.merger import backends
from safe_merge.merger.preflight import RULES, preflight
from safe_merge.merger.request import MergeRequest
from tests.helpers import small_pair
from tests.release import requires_release


def test_a_request_is_frozen_and_normalised_once():
    request = MergeRequest("base", ["a1", Path("a2")], "out")
    assert request.adapters == ("a1", "a2") and request.out == Path("out")
    assert request.combination is not None and request.combination.type == "cat"  # several adapters: cat
    assert request.combination.weights == (1.0, 1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.backend = "stream"


@pytest.mark.parametrize(
    "option, value", [("dtype", "float8"), ("backend", "gpu"), ("check_outputs", "sometimes"), ("quantized", "keep")]
)
def test_a_request_refuses_an_option_outside_its_choices(option, value):
    with pytest.raises(BadInput, match=repr(value)):
        MergeRequest("base", ["adapter"], "out", **{option: value})


def test_the_rules_have_unique_names_and_the_output_path_comes_before_any_input_is_read():
    names = [rule.name for rule in RULES]
    assert len(names) == len(set(names)) and names[:2] == ["push-possible", "output-path"]  # push-possible reads none
    assert all(rule.refuses for rule in RULES)


def test_both_rule_tables_in_the_docs_list_every_rule_in_order():
    root = Path(__file__).parents[2]
    for doc in (root / "docs" / "merging.md", root / "CONTRIBUTING.md"):
        listed = [line.split("`")[1] for line in doc.read_text().splitlines() if line.startswith("| `")]
        names = [rule.name for rule in RULES]
        assert [n for n in listed if n in names] == names, doc


def test_a_refusal_names_its_rule_and_earlier_rules_win(tmp_path):
    out = tmp_path / "out"
    out.mkdir()  # output-path refuses before the missing base and adapter are even looked at
    with pytest.raises(BadInput) as raised:
        preflight(MergeRequest(str(tmp_path / "no-base"), [str(tmp_path / "no-adapter")], out))
    assert raised.value.rule == "output-path"
    (tmp_path / "base").mkdir()
    with pytest.raises(BadInput) as raised:
        preflight(MergeRequest(str(tmp_path / "base"), [str(tmp_path / "no-adapter")], tmp_path / "new"))
    assert raised.value.rule == "adapters" and "no-adapter" in str(raised.value)


def test_the_registry_holds_each_backend_once_and_auto_offers_the_stream_backend_first():
    names = [cls.name for cls in backends.REGISTRY]
    assert names[0] == "stream" and set(names) == {"stream", "peft"}
    assert len(set(backends.REGISTRY)) == len(backends.REGISTRY)
    assert backends.names() == ("auto", "stream", "peft")  # what --backend accepts comes from the registry


def test_a_revision_for_the_hub_given_with_local_inputs_is_said_not_dropped(tmp_path, cli):
    base, adapter = small_pair(tmp_path / "inputs")
    args = ("merge", base, adapter, "-o", tmp_path / "out", "--plan", "--json")
    code, report, err = cli(*args, "--revision", "v1", "--base-revision", "v2")
    assert code == 0, err
    assert "--revision v1 is for hub adapters; every adapter is a local directory" in report["warnings"]
    assert "--base-revision v2 is for a hub base; the base is a local directory" in report["warnings"]
    assert not any("revision" in w for w in cli(*args)[1]["warnings"])


MERGE_AND_LIST_MODULES = """
import json, sys
from safe_merge import api
report = api.merge(sys.argv[1], sys.argv[2], sys.argv[3], backend="stream", check_outputs=sys.argv[4])
loaded = sorted({m.split(".")[0] for m in sys.modules if m.split(".")[0] in ("transformers", "peft")})
print(json.dumps({"exit": report["exit_code"], "loaded": loaded}))
"""


def _merge_in_a_fresh_process(base: Path, adapter: Path, out: Path, check_outputs: str) -> dict:
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, "-c", MERGE_AND_LIST_MODULES, str(base), str(adapter), str(out), check_outputs]
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@requires_release("stream_backend_matches")
def test_a_stream_merge_that_builds_no_model_never_imports_transformers_or_peft(tmp_path):
    base, adapter = small_pair(tmp_path / "inputs")
    without = _merge_in_a_fresh_process(base, adapter, tmp_path / "out", "never")
    assert without == {"exit": 0, "loaded": []}
    checked = _merge_in_a_fresh_process(base, adapter, tmp_path / "checked", "always")  # the output check builds
    assert checked["exit"] == 0 and checked["loaded"] == ["peft", "transformers"]


@requires_release("stream_backend_matches")
def test_a_config_transformers_cannot_read_is_refused_only_when_a_model_is_built_from_it(tmp_path, cli):
    import json

    base, adapter = small_pair(tmp_path / "inputs")
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "model_type": "released-after-this-transformers"}))
    code, _, err = cli("merge", base, adapter, "-o", tmp_path / "checked", "--backend", "stream")  # auto: it runs
    assert code == 2 and "base-readable" in err and "config.json" in err and not (tmp_path / "checked").exists()
    code, _, err = cli("merge", base, adapter, "-o", tmp_path / "peft", "--backend", "peft")
    assert code == 2 and "base-readable" in err and not (tmp_path / "peft").exists()
    # the stream backend reads the checkpoint and the config as data: a model type newer than the installed
    # transformers merges, every weight checked, and the config is the base's (dtype aside)
    code, report, err = cli("merge", base, adapter, "-o", tmp_path / "out", "--backend", "stream",
                            "--check-outputs", "never", "--json")  # fmt: skip
    assert code == 0, err
    assert report["verification"]["weights"]["tolerance_only"] == 0
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["model_type"] == "released-after-this-transformers"
