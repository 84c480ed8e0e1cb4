"""Inspecting adapters: the origin range from the key set, features in use, and verdicts for a target."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
from packaging.version import Version

from safe_merge.cli import main
from safe_merge.compat.adapter_files import load_adapter
from safe_merge.compat.history import NEVER_WRITTEN, History
from safe_merge.compat.inspect import infer_origin, inspect_adapter
from tests.helpers import save_model
from tests.release import requires
from tests.strategies import TINY, Case, build_base

INSTALLED = Version(peft.__version__).base_version
HISTORY = History.load()
# the adapter under inspection is written by the installed release with DoRA and rsLoRA; older cells inspect the
# real releases' fixtures instead (test_fixtures.py)
pytestmark = requires("use_dora", "use_rslora")
SIZES = TINY["one_layer"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """An adapter saved by the installed PEFT with DoRA, rsLoRA and a saved head."""
    root = tmp_path_factory.mktemp("inspect")
    case = Case("llama", SIZES, False, {}, "float32", seed=1)
    config = peft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], use_dora=True, use_rslora=True, modules_to_save=["lm_head"]
    )
    save_model(peft.get_peft_model(build_base(case), config), root)
    return root


def _as_written_by(adapter_dir: Path, release: str, dest: Path) -> Path:
    """The same adapter with exactly the keys ``release`` writes (what its save_pretrained would have produced)."""
    dest.mkdir()
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    keep = HISTORY.keys_in(release) - NEVER_WRITTEN
    (dest / "adapter_config.json").write_text(json.dumps({k: v for k, v in config.items() if k in keep}))
    (dest / "adapter_model.safetensors").write_bytes((adapter_dir / "adapter_model.safetensors").read_bytes())
    return dest


def test_origin_of_a_fresh_adapter_contains_the_installed_release(saved):
    origin = infer_origin(load_adapter(saved), HISTORY)
    assert origin.consistent and origin.contains(INSTALLED)
    writes_version = "peft_version" in HISTORY.keys_in(INSTALLED)
    assert origin.peft_version == (peft.__version__ if writes_version else None)


@pytest.mark.parametrize(
    ("writer", "lowest", "below"),
    [("0.13.2", "0.10.0", "0.14.0"), ("0.7.1", "0.7.0", "0.8.0"), ("0.9.0", "0.9.0", "0.10.0")],
)
def test_origin_range_is_the_releases_that_write_the_same_key_set(saved, tmp_path, writer, lowest, below):
    if Version(writer) > Version(INSTALLED):
        pytest.skip(f"the installed {INSTALLED} writes fewer keys than {writer}: its adapter cannot pose as one")
    origin = infer_origin(load_adapter(_as_written_by(saved, writer, tmp_path / "old")), HISTORY)
    assert (origin.lowest, origin.below, origin.consistent) == (lowest, below, True)
    assert origin.contains(writer)


def test_an_edited_config_is_reported_as_written_by_no_release(saved, tmp_path):
    edited = _as_written_by(saved, "0.13.2", tmp_path / "edited")
    config = json.loads((edited / "adapter_config.json").read_text())
    config["lora_bias"] = False  # a 0.14 key on a 0.13 key set
    del config["use_dora"]  # and a 0.9 key missing
    (edited / "adapter_config.json").write_text(json.dumps(config))
    origin = infer_origin(load_adapter(edited), HISTORY)
    assert not origin.consistent and "no release" in origin.describe()


def test_inspect_lists_features_and_refusals_for_an_old_target(saved):
    report = inspect_adapter(saved, "0.7.1").report()
    assert report["status"] == "refused"
    assert {"DoRA", "rsLoRA", "modules_to_save"} <= set(report["features"])
    assert {(r["key"], r["value"], r["first"]) for r in report["keys"]["refuse"]} == {
        ("use_dora", True, "0.9.0"),
        ("use_rslora", True, "0.8.0"),
    }
    stripped = {r["key"] for r in report["keys"]["strip"]}
    assert "use_dora" not in stripped
    assert ("peft_version" in stripped) == ("peft_version" in HISTORY.keys_in(INSTALLED))  # written from 0.18.0


def test_inspect_for_the_installed_release_loads_as_is(saved):
    assert inspect_adapter(saved, INSTALLED).report()["status"] == "loads"


def test_inspect_command_prints_json_and_exits_zero(saved, capsys):
    assert main(["inspect", str(saved), "--target", "0.7.1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["status"] == "refused" and report["target"] == "0.7.1"
    assert "base_model.model.lm_head.weight" in report["tensors"]


def test_inspect_rejects_a_target_that_is_not_a_release(saved, capsys):
    assert main(["inspect", str(saved), "--target", "latest"]) == 2
    assert "not a release number" in capsys.readouterr().err
