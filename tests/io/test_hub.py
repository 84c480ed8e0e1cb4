"""Hub inputs and outputs through the real huggingface_hub client, against a hub-compatible server on loopback
(tests/hub_server.py) named by HF_ENDPOINT. Each test runs `safe-merge` as a user would, in a subprocess: the
client reads its endpoint, token and offline mode from the environment when it is imported."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from safe_merge.demo import build_adapter, build_base, build_tokenizer
from tests.helpers import small_pair
from tests.hub_server import TOKEN, Hub

pytestmark = pytest.mark.slow


def folder(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, dict[str, bytes]]:
    """A tiny Llama (licensed in its card, sharded with an index) and a LoRA adapter that names it as org/base."""
    root = tmp_path_factory.mktemp("tiny")
    base, adapter = root / "base", root / "adapter"
    base.mkdir()
    build_base(base, len(build_tokenizer(base)))
    build_adapter(base, adapter)
    pickled = base / "pytorch_model.bin"  # what older transformers releases save by default
    if pickled.is_file():
        save_file(torch.load(pickled, weights_only=True), base / "model.safetensors", metadata={"format": "pt"})
        pickled.unlink()
    files = folder(base)
    tensors = load_file(base / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, root / shard, metadata={"format": "pt"})
        files[shard] = (root / shard).read_bytes()
    del files["model.safetensors"]
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    files["model.safetensors.index.json"] = json.dumps({"metadata": {}, "weight_map": weight_map}).encode()
    files["README.md"] = b"---\nlicense: apache-2.0\n---\n# tiny base\n"
    files["preprocessor_config.json"] = b'{"feature_size": 8}'  # a processor travels with the model
    adapter_files = folder(adapter)
    config = json.loads(adapter_files["adapter_config.json"])
    adapter_files["adapter_config.json"] = json.dumps({**config, "base_model_name_or_path": "org/base"}).encode()
    return {"base": files, "adapter": adapter_files}


@pytest.fixture
def hub(tiny):
    with Hub() as server:
        server.add("org/base", tiny["base"])
        server.add("org/lora", tiny["adapter"])
        yield server


def safe_merge(hub: Hub, home: Path, *args: str, token: bool = True, offline: bool = False, xet: bool = False):
    """`safe-merge ARGS --json` as a user runs it against the loopback hub; (exit code, report or None, stderr).
    ``xet``: leave the client's Xet uploads on, as a user's are (the server must then take every file inline)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub.endpoint, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1")
    if not xet:
        env["HF_HUB_DISABLE_XET"] = "1"
    if token:
        env["HF_TOKEN"] = TOKEN
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    done = subprocess.run(
        [sys.executable, "-m", "safe_merge", *args, "--json"], capture_output=True, text=True, env=env, timeout=300
    )
    try:
        report = json.loads(done.stdout)
    except ValueError:
        report = None
    return done.returncode, report, done.stderr


def downloaded(hub: Hub, repo_id: str) -> set[str]:
    return {
        path.split("/", 5)[5] for method, path in hub.requests if method == "GET" and f"/{repo_id}/resolve/" in path
    }


def test_merge_downloads_base_and_adapter_and_pushes_the_verified_model_with_its_card(hub, tmp_path):
    out = tmp_path / "merged"
    code, report, err = safe_merge(
        hub, tmp_path / "home", "merge", "org/lora", "-o", str(out), "--push-to-hub", "org/merged"
    )
    assert code == 0, err[-3000:]
    assert report["base"]["hub"] == {
        "repo_id": "org/base",
        "revision": "main",
        "commit": hub.repos["org/base"].refs["main"],
    }
    assert report["adapters"][0]["hub"]["commit"] == hub.repos["org/lora"].refs["main"]
    assert report["push"]["status"] == "pushed" and report["push"]["commit"] == hub.repos["org/merged"].refs["main"]
    pushed = hub.files("org/merged")
    assert {name: pushed[name] for name in folder(out)} == folder(out)
    assert {"README.md", "preprocessor_config.json"} <= set(report["output"]["files"]) and set(pushed) == set(
        folder(out)
    ) | {".gitattributes"}
    card = pushed["README.md"].decode()
    assert card.startswith("---\nbase_model: org/base\nbase_model_relation: merge\nlibrary_name: transformers\n")
    assert (
        "license: apache-2.0" in card
        and "| merged weights | " in card
        and "| outputs vs. the unmerged PeftModel |" in card
    )
    commits = (hub.repos["org/base"].refs["main"], hub.repos["org/lora"].refs["main"])
    assert f"safe-merge merge org/base@{commits[0]} org/lora@{commits[1]} -o merged" in card
    assert not hub.repos["org/merged"].private
    code, checked, err = safe_merge(hub, tmp_path / "fresh-home", "verify", "org/lora", "org/merged")
    assert code == 0 and checked["status"] == "passed", err[-3000:]  # what the hub now serves, checked from the hub
    assert checked["hub"]["merged"]["commit"] == report["push"]["commit"]


def test_only_the_files_a_merge_reads_are_downloaded(hub, tiny, tmp_path):
    extra = {
        "pytorch_model.bin": b"pickled twin of the weights",
        "consolidated.safetensors": b"a second copy the index does not name",
        "original/model.safetensors": b"a subfolder's copy",
        "notes.txt": b"not read by a merge",
    }
    hub.add("org/base", {**tiny["base"], **extra})
    code, report, err = safe_merge(
        hub, tmp_path / "home", "merge", "org/base", "org/lora", "-o", str(tmp_path / "o"), "--plan"
    )
    assert code == 0, err[-3000:]
    assert downloaded(hub, "org/base") == set(tiny["base"])  # config, card, tokenizer, processor, index, shards
    assert downloaded(hub, "org/lora") == set(tiny["adapter"])
    assert not (tmp_path / "o").exists()


def test_a_base_with_only_pickled_weights_downloads_the_pickle_and_merges(hub, tiny, tmp_path):
    shards = json.loads(tiny["base"]["model.safetensors.index.json"])["weight_map"].values()
    tensors = {k: v for shard in sorted(set(shards)) for k, v in load_bytes(tiny["base"][shard]).items()}
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    keep = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")
    hub.add("org/pickled", {**{k: tiny["base"][k] for k in keep}, "pytorch_model.bin": buffer.getvalue()})
    code, report, err = safe_merge(
        hub, tmp_path / "home", "merge", "org/pickled", "org/lora", "-o", str(tmp_path / "o")
    )
    assert code == 0 and report["status"] == "passed", err[-3000:]
    assert downloaded(hub, "org/pickled") == {*keep, "pytorch_model.bin"}


def test_a_revision_pins_each_input_to_its_commit(hub, tiny, tmp_path):
    first = hub.repos["org/lora"].refs["main"]
    hub.repos["org/lora"].refs["v1"] = first
    second = hub.add("org/lora", doubled(tiny["adapter"]))
    home, out = tmp_path / "home", str(tmp_path / "o")
    for args, commit in (((), second), (("--revision", "v1"), first)):
        code, report, err = safe_merge(hub, home, "merge", "org/base", "org/lora", "-o", out, "--plan", *args)
        assert code == 0 and report["adapters"][0]["hub"]["commit"] == commit, err[-2000:]
    code, report, err = safe_merge(hub, home, "merge", "org/base@main", f"org/lora@{first}", "-o", out, "--plan")
    assert report["adapters"][0]["hub"] == {"repo_id": "org/lora", "revision": first, "commit": first}, err[-2000:]
    code, report, err = safe_merge(hub, home, "merge", "org/base", "org/lora", "-o", out, "--plan", "--revision", "v9")
    assert code == 2 and "has no revision 'v9'" in err and report["status"] == "error"


def test_offline_mode_reads_the_cache_and_names_what_it_lacks(hub, tmp_path):
    home, out = tmp_path / "home", str(tmp_path / "o")
    code, online, err = safe_merge(hub, home, "merge", "org/base", "org/lora", "-o", out, "--plan")
    assert code == 0, err[-2000:]
    code, offline, err = safe_merge(hub, home, "merge", "org/base", "org/lora", "-o", out, "--plan", offline=True)
    assert code == 0 and offline["base"]["hub"]["commit"] == online["base"]["hub"]["commit"], err[-2000:]
    hub.add("org/other", {"adapter_config.json": b"{}"})
    code, _, err = safe_merge(hub, home, "merge", "org/base", "org/other", "-o", out, "--plan", offline=True)
    assert code == 2 and "HF_HUB_OFFLINE=1 forbids downloading" in err and "hf download org/other" in err


def test_a_missing_repo_is_refused_before_any_work_naming_it(hub, tmp_path):
    code, report, err = safe_merge(hub, tmp_path / "home", "merge", "org/base", "org/nope", "-o", str(tmp_path / "o"))
    assert code == 2 and report["status"] == "error"
    assert "no adapter repo 'org/nope'" in err and "hf auth login" in err
    assert not (tmp_path / "o").exists() and downloaded(hub, "org/base") == set()


def test_an_interrupted_download_fails_cleanly_and_the_rerun_completes(hub, tmp_path):
    hub.broken_downloads.add("model-00002-of-00002.safetensors")
    home, out = tmp_path / "home", tmp_path / "o"
    code, _, err = safe_merge(hub, home, "merge", "org/base", "org/lora", "-o", str(out))
    assert code == 2 and "the download of the base model stopped" in err and "run the same command again" in err
    assert not out.exists()
    hub.broken_downloads.clear()
    before = len(hub.requests)
    code, report, err = safe_merge(hub, home, "merge", "org/base", "org/lora", "-o", str(out))
    assert code == 0 and report["status"] == "passed", err[-3000:]
    fetched_again = {p.rsplit("/", 1)[1] for m, p in hub.requests[before:] if m == "GET" and "/resolve/" in p}
    assert (
        "model-00002-of-00002.safetensors" in fetched_again and "model-00001-of-00002.safetensors" not in fetched_again
    )


def test_a_failed_push_keeps_the_output_and_the_push_command_retries_it(hub, tmp_path):
    hub.refuse_commits = True
    home, out = tmp_path / "home", tmp_path / "o"
    args = (
        "merge",
        "org/lora",
        "-o",
        str(out),
        "--push-to-hub",
        "org/m",
        "--private",
        "--report",
        str(tmp_path / "r.json"),
    )
    code, report, err = safe_merge(hub, home, *args)
    assert json.loads((tmp_path / "r.json").read_text())["push"]["status"] == "failed"  # the --report copy says so too
    assert code == 4 and report["status"] == "passed" and report["push"]["status"] == "failed", err[-3000:]
    assert report["push"]["retry"] == f"safe-merge push {out} org/m --private" and "PUSH FAILED" in err
    written = folder(out)
    assert any(name.endswith(".safetensors") for name in written) and "README.md" in written
    hub.refuse_commits = False
    code, pushed, err = safe_merge(hub, home, *report["push"]["retry"].split()[1:])
    assert code == 0 and pushed["status"] == "pushed" and f"pushed    {hub.endpoint}/org/m" in err, err[-3000:]
    assert (
        pushed["push"]["commit"] == hub.repos["org/m"].refs["main"]
        and hub.repos["org/m"].private
        and {k: v for k, v in hub.files("org/m").items() if k in written} == written
    )


def test_push_takes_the_clients_default_upload_path_too(tmp_path, cli):
    """With hf_xet installed, huggingface_hub 1.x and 2.x upload a folder through their pipelined uploader; a server
    that takes every file inline lets that path run here."""
    base, adapter = small_pair(tmp_path / "inputs")
    assert cli("merge", base, adapter, "-o", tmp_path / "out")[0] == 0
    with Hub(lfs=False) as inline:
        code, pushed, err = safe_merge(inline, tmp_path / "home", "push", str(tmp_path / "out"), "org/m", xet=True)
        assert code == 0 and pushed["status"] == "pushed", err[-3000:]
        assert {k: v for k, v in inline.files("org/m").items() if k != ".gitattributes"} == folder(tmp_path / "out")


def test_a_push_without_a_token_is_refused_before_anything_is_downloaded(hub, tmp_path):
    out = tmp_path / "o"
    code, report, err = safe_merge(
        hub, tmp_path / "home", "merge", "org/lora", "-o", str(out), "--push-to-hub", "org/m", token=False
    )
    assert code == 2 and "refused by rule: push-possible" in err and "hf auth login" in err
    assert downloaded(hub, "org/lora") == set() and not out.exists() and "org/m" not in hub.repos


def test_check_fetches_the_commit_a_fingerprint_recorded_after_the_branch_moved(hub, tiny, tmp_path):
    home, fingerprint = tmp_path / "home", tmp_path / "fp" / "lora.fp.json"
    code, _, err = safe_merge(hub, home, "fingerprint", "org/base", "org/lora", "-o", str(fingerprint))
    assert code == 0, err[-3000:]
    recorded = json.loads(fingerprint.read_text())
    assert recorded["adapter"]["hub"]["commit"] == hub.repos["org/lora"].refs["main"]
    hub.add("org/lora", doubled(tiny["adapter"]))  # main moves on
    moved = tmp_path / "elsewhere" / "lora.fp.json"  # the relative paths no longer lead to the cache
    moved.parent.mkdir()
    fingerprint.rename(moved)
    code, report, err = safe_merge(hub, tmp_path / "fresh-home", "check", str(moved))
    assert code == 0 and report["status"] == "passed", err[-3000:]


def load_bytes(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(data)


def doubled(adapter: dict[str, bytes]) -> dict[str, bytes]:
    """The adapter's files with every tensor doubled (safetensors, or the pickle older PEFT releases save)."""
    from safetensors.torch import save

    out = dict(adapter)
    if "adapter_model.safetensors" in out:
        out["adapter_model.safetensors"] = save(
            {k: v * 2 for k, v in load_bytes(out["adapter_model.safetensors"]).items()}
        )
    else:
        tensors = torch.load(io.BytesIO(out["adapter_model.bin"]), weights_only=True)
        buffer = io.BytesIO()
        torch.save({k: v * 2 for k, v in tensors.items()}, buffer)
        out["adapter_model.bin"] = buffer.getvalue()
    return out
