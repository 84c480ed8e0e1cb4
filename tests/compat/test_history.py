"""The history table against the installed PEFT and its released source, and the drop rules it encodes."""

from __future__ import annotations

import dataclasses
import json
import zipfile
from pathlib import Path

import peft
import pytest
from packaging.version import Version

from safe_merge.compat.derive import derive, differences, fields_by_release
from safe_merge.compat.history import Entry, History

INSTALLED = Version(peft.__version__).base_version
HISTORY = History.load()


def _installed_wheel(tmp_path: Path) -> Path:
    """The installed PEFT's source packed as a wheel-named zip, so the derivation reads real released code."""
    root = Path(peft.__file__).parent
    wheel = tmp_path / f"peft-{INSTALLED}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path in root.rglob("*.py"):
            zf.write(path, f"peft/{path.relative_to(root)}")
    return wheel


def _saved_config(tmp_path: Path, **kwargs) -> dict:
    """An adapter_config.json as the installed PEFT writes it, with ``kwargs`` set on top (as a newer release
    would write them, where the installed one lacks them)."""
    peft.LoraConfig(target_modules=["q_proj"]).save_pretrained(str(tmp_path))
    return {**json.loads((tmp_path / "adapter_config.json").read_text()), **kwargs}


def test_table_lists_exactly_the_installed_lora_config_fields():
    """In the `latest` tier this is what notices a PEFT release adding a config key: it names the key."""
    fields = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    unknown = sorted(fields - set(HISTORY.entries))
    assert not unknown, (
        f"peft {INSTALLED}'s LoraConfig has keys history.json has no row for: {', '.join(unknown)} "
        "(run `nox -s history`, which diffs every released wheel, and add the rows it names)"
    )
    assert HISTORY.keys_in(INSTALLED) == fields


def test_derivation_reads_released_source_like_python_does(tmp_path):
    by_release = fields_by_release(_installed_wheel(tmp_path).parent)
    assert set(by_release[Version(INSTALLED)]) == {f.name for f in dataclasses.fields(peft.LoraConfig)}
    assert derive(by_release)["fan_in_fan_out"]["default"] is False
    assert differences(by_release, HISTORY) == []


def test_check_names_a_key_whose_first_release_is_wrong(tmp_path):
    by_release = fields_by_release(_installed_wheel(tmp_path).parent)
    wrong = dict(HISTORY.entries)
    wrong["fan_in_fan_out"] = dataclasses.replace(wrong["fan_in_fan_out"], first="99.0.0")
    found = differences(by_release, History(wrong))
    assert found == [f"{INSTALLED}: the wheel has 'fan_in_fan_out', history.json says the release lacks it"]


@pytest.mark.parametrize("target", ["0.3.0", "0.4.0", "0.6.0", "0.7.1", "0.10.0", "0.13.2", "0.17.1"])
def test_a_default_adapter_config_moves_to_every_release_by_stripping_only(tmp_path, target):
    config = _saved_config(tmp_path)
    actions = {v.key: v.action for v in HISTORY.assess(config, target)}
    assert "refuse" not in actions.values() and "unknown" not in actions.values(), actions
    assert {k for k, a in actions.items() if a == "keep"} <= HISTORY.keys_in(target)


def test_dora_is_refused_below_its_first_release_with_key_value_and_release(tmp_path):
    config = _saved_config(tmp_path, use_dora=True)
    refused = [v for v in HISTORY.assess(config, "0.7.1") if v.action == "refuse"]
    assert [(v.key, v.value, v.first) for v in refused] == [("use_dora", True, "0.9.0")]
    assert all(v.action != "refuse" for v in HISTORY.assess(config, "0.9.0"))


def test_rslora_is_refused_where_it_would_change_the_scale(tmp_path):
    config = _saved_config(tmp_path, use_rslora=True)
    assert {v.key for v in HISTORY.assess(config, "0.7.1") if v.action == "refuse"} == {"use_rslora"}


def test_a_key_that_matters_only_with_another_follows_that_key():
    loftq = HISTORY.entries["loftq_config"]
    assert loftq.harmless_to_drop({"loftq_config": {"loftq_bits": 4}, "init_lora_weights": True})
    assert not loftq.harmless_to_drop({"loftq_config": {"loftq_bits": 4}, "init_lora_weights": "loftq"})
    group = HISTORY.entries["qalora_group_size"]
    assert group.harmless_to_drop({"qalora_group_size": 32, "use_qalora": False})
    assert not group.harmless_to_drop({"qalora_group_size": 32, "use_qalora": True})


def test_neutral_values_compare_as_json_not_as_python():
    entry = Entry("flag", "0.1.0", False, "neutral", "test", neutral=[False])
    assert entry.harmless_to_drop({"flag": False})
    assert not entry.harmless_to_drop({"flag": 0})


def test_a_key_the_table_does_not_know_is_reported_as_unknown():
    verdicts = {v.key: v.action for v in HISTORY.assess({"peft_type": "LORA", "shiny_new_knob": 1}, INSTALLED)}
    assert verdicts == {"peft_type": "keep", "shiny_new_knob": "unknown"}


def test_removed_keys_are_only_present_before_their_removal():
    assert HISTORY.entries["enable_lora"].present_in("0.2.0")
    assert not HISTORY.entries["enable_lora"].present_in("0.3.0")


def test_a_bug_window_covers_its_first_release_and_stops_at_the_fix():
    history = History.load()
    assert history.affected("svd_combination_scale_twice", "0.9.0")
    assert history.affected("svd_combination_scale_twice", "0.20.0")
    assert not history.affected("svd_combination_scale_twice", "0.21.0")
    assert not history.affected("svd_combination_scale_twice", "0.8.2")
