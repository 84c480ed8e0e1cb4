"""The Hugging Face Hub as a source of inputs and a place to publish to, through huggingface_hub: its cache, its
token (HF_TOKEN or `hf auth login`), its endpoint (HF_ENDPOINT), its offline mode (HF_HUB_OFFLINE) and its
progress bars.

An input that is not a local path and reads as a repo id is resolved to one commit first, then only the files a
merge reads are downloaded at that commit (config, generation config, card, tokenizer, processor, and the weights
transformers would load: the safetensors index and exactly the shards it names, pickles only where no safetensors
exist), so a branch that moves during the download cannot mix two commits. ``ID@REVISION`` pins one input;
where the hub cannot be reached the local cache answers, as transformers does.
"""

from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from safe_merge.errors import BadInput
from safe_merge.io.checkpoint import WEIGHT_STEMS

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
MODEL_FILES = ("config.json", "generation_config.json", "README.md")  # beside the weights and the tokenizer
ADAPTER_FILES = ("adapter_config.json", "README.md")
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # the first one the repo has
LOGIN_HINT = "log in with `hf auth login` (or set HF_TOKEN) with a token that can read it"


@dataclass(frozen=True)
class HubOrigin:
    """Where an input came from: enough to fetch exactly the same files again."""

    repo_id: str
    revision: str  # as asked (a branch, tag or commit)
    commit: str  # what it resolved to

    def report(self) -> dict:
        return {"repo_id": self.repo_id, "revision": self.revision, "commit": self.commit}


@dataclass(frozen=True)
class Resolved:
    path: Path
    origin: HubOrigin | None = None  # None for a local directory


def split_revision(name: str) -> tuple[str, str | None]:
    """``ID@REVISION`` -> (ID, REVISION); anything else -> (name, None). Repo ids cannot contain '@'."""
    repo_id, at, revision = str(name).partition("@")
    return (repo_id, revision) if at and REPO_ID.fullmatch(repo_id) and revision else (str(name), None)


def is_repo_id(name: str) -> bool:
    return REPO_ID.fullmatch(split_revision(name)[0]) is not None


def resolve(name: str | Path, what: str, revision: str | None = None) -> Resolved:
    """A local directory as it is, or a hub repo downloaded (only what a merge reads) at one commit. ``revision``
    applies when ``name`` carries none of its own."""
    path = Path(name)
    if path.is_dir():
        return Resolved(path)
    if path.exists():
        raise BadInput(f"the {what} must be a directory", path=path)
    repo_id, own = split_revision(str(name))
    asked = own or revision
    if asked is not None and (asked.startswith("/") or ".." in asked.split("/") or not asked.strip()):
        raise BadInput(f"revision {asked!r} is not a branch, tag or commit", path=name)
    if not REPO_ID.fullmatch(repo_id):
        raise BadInput("no such directory", path=name, hint=f"pass the {what}'s directory, or a hub repo id (org/name)")
    return _download(repo_id, asked or "main", what, explicit=asked is not None)


def _download(repo_id: str, revision: str, what: str, explicit: bool) -> Resolved:
    from huggingface_hub import HfApi, constants, snapshot_download

    where = f"{repo_id}@{revision}" if explicit else repo_id
    if constants.HF_HUB_OFFLINE:
        return _cached(repo_id, revision, what, where, "HF_HUB_OFFLINE=1 forbids downloading")
    api = HfApi()
    try:
        info = api.model_info(repo_id, revision=revision)
    except Exception as exc:
        _refuse_hub_error(exc, repo_id, revision, where, what, api.endpoint)
        return _cached(repo_id, revision, what, where, f"the hub at {api.endpoint} cannot be reached ({_short(exc)})")
    commit = info.sha
    present = {s.rfilename for s in info.siblings or []}
    try:
        files = _wanted(repo_id, commit, present, what)
        folder = snapshot_download(repo_id, revision=commit, allow_patterns=[glob.escape(f) for f in files])
    except Exception as exc:
        _refuse_hub_error(exc, repo_id, revision, where, what, api.endpoint)
        raise BadInput(
            f"the download of the {what} stopped: {_short(exc)}",
            path=where,
            hint="run the same command again: the files already downloaded are kept in the hub cache and only the "
            "rest is fetched",
        ) from exc
    _record_ref(repo_id, revision, commit)
    return Resolved(Path(folder), HubOrigin(repo_id, revision, commit))


def _wanted(repo_id: str, commit: str, present: set[str], what: str) -> list[str]:
    """The files of the repo a merge reads, by name: nothing in subfolders, never two kinds of weights."""
    from huggingface_hub import hf_hub_download

    from safe_merge.io.model_dir import PROCESSOR_FILES, TOKENIZER_FILES

    if what == "adapter":
        weights = [next((f for f in ADAPTER_WEIGHTS if f in present), ADAPTER_WEIGHTS[0])]
        return [f for f in (*ADAPTER_FILES, *TOKENIZER_FILES, *PROCESSOR_FILES) if f in present] + weights
    weights: list[str] = []
    for stem in WEIGHT_STEMS:  # transformers' order: the safetensors index, the single file, then the pickles
        index = f"{stem}.index.json"
        if index in present:
            local = hf_hub_download(repo_id, index, revision=commit)
            weight_map = json.loads(Path(local).read_text(encoding="utf-8")).get("weight_map") or {}
            weights = [index, *sorted(set(weight_map.values()))]
            break
        if stem in present:
            weights = [stem]
            break
    return [f for f in (*MODEL_FILES, *TOKENIZER_FILES, *PROCESSOR_FILES) if f in present] + weights


def _cached(repo_id: str, revision: str, what: str, where: str, why: str) -> Resolved:
    """The hub cache's snapshot at ``revision`` (a commit, or the commit huggingface_hub recorded for a branch or
    tag), or a refusal saying why nothing could be fetched. A snapshot missing files is refused by the checks that
    read them, naming the file."""
    from huggingface_hub import constants

    storage = _storage(repo_id)
    ref = storage / "refs" / revision
    commit = ref.read_text(encoding="utf-8").strip() if ref.is_file() else revision
    folder = storage / "snapshots" / commit
    if not folder.is_dir() or not any(folder.iterdir()):
        raise BadInput(
            f"not a local directory, and the {what} is not in the hub cache ({constants.HF_HUB_CACHE}): {why}",
            path=where,
            hint=f"download it once where the hub can be reached (`hf download {repo_id}`), or pass a local directory",
        )
    return Resolved(folder, HubOrigin(repo_id, revision, commit))


def _record_ref(repo_id: str, revision: str, commit: str) -> None:
    """Note in the cache which commit a branch or tag named, as huggingface_hub does, so that offline runs find it."""
    if revision == commit:
        return
    ref = _storage(repo_id) / "refs" / revision
    try:
        ref.parent.mkdir(parents=True, exist_ok=True)
        partial = ref.with_name(f".{ref.name}.{os.getpid()}.partial")
        partial.write_text(commit, encoding="utf-8")
        os.replace(partial, ref)
    except OSError:
        pass  # a read-only cache: the next online run resolves the branch again


def _storage(repo_id: str) -> Path:
    """The repo's folder in the hub cache (huggingface_hub's documented layout: refs/, snapshots/, blobs/)."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")


def _refuse_hub_error(exc: Exception, repo_id: str, revision: str, where: str, what: str, endpoint: str) -> None:
    """The hub answered, and the answer is no: say which (a connection failure returns, for the cache to answer)."""
    from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(exc, GatedRepoError):
        raise BadInput(
            f"the {what} is a gated repo on {endpoint} and this token has no access",
            path=where,
            hint=f"accept its conditions on the repo's page, then {LOGIN_HINT}",
        ) from exc
    if isinstance(exc, RevisionNotFoundError):
        raise BadInput(
            f"the repo has no revision {revision!r} on {endpoint}",
            path=where,
            hint="name an existing branch, tag or commit (ID@REVISION, --revision or --base-revision)",
        ) from exc
    if isinstance(exc, RepositoryNotFoundError):
        raise BadInput(
            f"not a local directory, and no {what} repo {repo_id!r} on {endpoint} (or it is private)",
            path=where,
            hint=f"check the path or the repo id; for a private repo, {LOGIN_HINT}",
        ) from exc
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status in (401, 403):
        raise BadInput(f"the hub refused access to the {what} ({status})", path=where, hint=LOGIN_HINT) from exc


def _short(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]


def check_push(repo_id: str) -> None:
    """Before any work: a repo id, a hub that can be reached, and a token it accepts."""
    from huggingface_hub import HfApi, constants

    if not is_repo_id(repo_id) or "@" in repo_id:
        raise BadInput(f"--push-to-hub {repo_id!r} is not a repo id", hint="name it as org/name or user/name")
    if constants.HF_HUB_OFFLINE:
        raise BadInput("--push-to-hub needs the hub, and HF_HUB_OFFLINE=1 is set", hint="unset HF_HUB_OFFLINE")
    api = HfApi()
    try:
        api.whoami()
    except Exception as exc:
        raise BadInput(
            f"--push-to-hub: the hub at {api.endpoint} does not accept this token ({_short(exc)})",
            hint="log in with `hf auth login` (or set HF_TOKEN) with a token that can write to the repo",
        ) from exc


def push(folder: Path, repo_id: str, private: bool, message: str) -> dict:
    """Upload a published directory as one commit (huggingface_hub's folder upload: large files go by LFS or Xet;
    a rerun uploads only what changed). The repo is created when missing."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=message)
    oid = getattr(commit, "oid", None)
    return {
        "status": "pushed",
        "repo_id": repo_id,
        "commit": oid,
        "url": f"{api.endpoint}/{repo_id}",
        "private": private,
    }


def retry_command(folder: Path, repo_id: str, private: bool) -> str:
    return f"safe-merge push {folder} {repo_id}" + (" --private" if private else "")
