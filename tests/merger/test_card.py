"""The model card merge writes into OUT: metadata the hub reads, the inputs, the verification table, and a command
that reproduces the merge bit for bit."""

from __future__ import annotations

import hashlib
import json
import shlex

import pytest
import yaml

from tests.helpers import small_pair


@pytest.fixture
def pair(tmp_path):
    return small_pair(tmp_path / "inputs")


def header(card: str) -> dict:
    return yaml.safe_load(card.split("---\n")[1])


def test_the_card_carries_the_metadata_the_verification_table_and_the_inputs(pair, tmp_path, cli):
    base, adapter = pair
    (base / "README.md").write_text("---\nlicense: llama3.1\nlanguage: en\n---\n# the base\n")
    code, report, err = cli("merge", base, adapter, "-o", tmp_path / "out", "--json")
    assert code == 0, err
    card = (tmp_path / "out" / "README.md").read_text()
    meta = header(card)
    assert meta["license"] == "llama3.1" and meta["library_name"] == "transformers"
    assert "safe-merge" in meta["tags"] and "base_model" not in meta  # a local base has no hub id to name
    weights = report["verification"]["weights"]
    ledger = report["ledger"]
    assert f"| adapter tensors (ledger) | {sum(ledger.values())}: {ledger['merged']} merged" in card
    assert f"| merged weights | {weights['checked_tensors']} checked: " in card
    assert "| outputs vs. the unmerged PeftModel | max abs difference" in card
    assert "exact merge, the outputs compared with the unmerged PeftModel's." in card
    assert "README.md" in report["output"]["files"]
    digest = hashlib.sha256((adapter / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert f"| adapter | local `{adapter.name}` | - | `{digest}` |" in card


def test_the_reproduce_command_writes_the_same_weights(pair, tmp_path, cli):
    base, adapter = pair
    first = tmp_path / "first"
    options = ("--dtype", "bfloat16", "--max-shard-size", "4KB", "--check-outputs", "never")
    code, report, err = cli("merge", base, adapter, "-o", first, *options, "--json")
    assert code == 0, err
    card = (first / "README.md").read_text()
    ran = report["verification"]["outputs"]["ran"]  # the PEFT backend (older PEFT releases) always compares
    assert ("the outputs compared" in card) == ran
    assert ("| outputs vs. the unmerged PeftModel | not run:" in card) != ran
    command = card.split("## Reproduce\n\n```\n")[1].split("\n```")[0]
    argv = shlex.split(command)
    assert argv[:2] == ["safe-merge", "merge"] and all(option in argv for option in options)
    argv[argv.index("-o") + 1] = str(tmp_path / "again")
    code, _, err = cli(*argv[1:])
    assert code == 0, err
    shards = sorted(p.name for p in first.glob("*.safetensors"))
    assert len(shards) > 1 and shards == sorted(p.name for p in (tmp_path / "again").glob("*.safetensors"))
    for name in (*shards, "config.json"):
        assert (first / name).read_bytes() == (tmp_path / "again" / name).read_bytes()


def test_no_card_writes_none_and_a_base_named_by_the_adapter_is_the_cards_base_model(pair, tmp_path, cli):
    base, adapter = pair
    code, _, err = cli("merge", base, adapter, "-o", tmp_path / "bare", "--no-card")
    assert code == 0 and not (tmp_path / "bare" / "README.md").exists(), err
    config = adapter / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "base_model_name_or_path": "acme/tiny-base"}))
    code, _, err = cli("merge", base, adapter, "-o", tmp_path / "out")
    assert code == 0, err
    meta = header((tmp_path / "out" / "README.md").read_text())
    assert meta["base_model"] == "acme/tiny-base" and meta["base_model_relation"] == "merge"


def test_a_merged_directory_with_its_card_verifies(pair, tmp_path, cli):
    base, adapter = pair
    assert cli("merge", base, adapter, "-o", tmp_path / "out")[0] == 0
    code, report, err = cli("verify", base, adapter, tmp_path / "out", "--json")
    assert code == 0 and report["status"] == "passed", err
