"""A hub-compatible server on loopback, for the real huggingface_hub client (HF_ENDPOINT pointing at it).

It speaks the part of the Hub's HTTP API a download and an upload use, as the client releases in the matrix call it
(0.36, 1.x, 2.x): repo info and file trees, resolve (HEAD and ranged GET), repo creation, whoami, pre-upload modes,
the LFS batch API with the basic transfer, and commits (NDJSON). Repositories live in memory as commits of whole
file sets; branches move, commit hashes stay. Xet storage is not served: a client that has hf_xet must run with
HF_HUB_DISABLE_XET=1 for LFS uploads, or the server is made with ``lfs=False`` and takes every file inline
(downloads never offer Xet, so every client falls back to plain HTTP).

Faults for the tests: ``broken_downloads`` names files whose GETs stop halfway through the body;
``refuse_commits`` answers commits 403.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

TOKEN = "hf_loopback_write_token"
USER = "tester"
LFS_SUFFIXES = (".safetensors", ".bin")  # stored as LFS objects, as the Hub stores large binary files


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    private: bool = False
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit hash -> the whole file set
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit hash

    def commit(self, files: dict[str, bytes], ref: str = "main") -> str:
        sha = secrets.token_hex(20)
        self.commits[sha] = dict(files)
        self.refs[ref] = sha
        return sha

    def resolve(self, revision: str) -> str | None:
        revision = unquote(revision)
        if revision in self.refs:
            return self.refs[revision]
        return revision if revision in self.commits else None


class Hub:
    """The server's state and its lifetime: ``with Hub() as hub: hub.endpoint``."""

    def __init__(self, lfs: bool = True) -> None:
        self.lfs_uploads = lfs  # False: every file is uploaded inline ("regular"), which a client with Xet can do too
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}  # sha256 -> content, uploaded through the batch API
        self.broken_downloads: set[str] = set()  # file paths whose GET bodies stop halfway
        self.refuse_commits = False  # commits answered 403, as for a token without write access to the repo
        self.requests: list[tuple[str, str]] = []  # (method, path) as received, for the tests to read
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Hub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add(self, repo_id: str, files: dict[str, bytes], ref: str = "main", private: bool = False) -> str:
        """Commit ``files`` (the whole file set) to ``repo_id`` at ``ref``, creating the repo; the commit hash."""
        with self.lock:
            repo = self.repos.setdefault(repo_id, Repo(private=private))
            return repo.commit(files, ref)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo.commits[repo.resolve(revision)]


def _card_data(files: dict[str, bytes]) -> dict | None:
    text = files.get("README.md", b"").decode("utf-8", "replace")
    match = re.match(r"^---\s*\n(.*?)\n---\s*\n", text, re.S)
    return yaml.safe_load(match.group(1)) if match else None


def _handler(hub: Hub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet: the tests read hub.requests instead
            pass

        # ---------------------------------------------------------------- plumbing

        def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
            self.send_response(status)
            headers = {"Content-Length": str(len(body)), **(headers or {})}
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _json(self, status: int, data, headers: dict | None = None) -> None:
            self._send(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})

        def _error(self, status: int, code: str | None, message: str, head: bool = False) -> None:
            headers = {"X-Error-Message": message, "Content-Type": "application/json"}
            if code:
                headers["X-Error-Code"] = code
            self._send(status, b"" if head else json.dumps({"error": message}).encode(), headers, head=head)

        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _authorized(self) -> bool:
            return self.headers.get("Authorization", "") == f"Bearer {TOKEN}"

        def _repo(self, repo_id: str, head: bool = False) -> Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is None or (repo.private and not self._authorized()):
                self._error(404 if repo is None else 401, "RepoNotFound", "Repository not found", head=head)
                return None
            return repo

        def _at(self, repo_id: str, revision: str, head: bool = False) -> tuple[Repo | None, str | None]:
            """The repo and the commit ``revision`` names, or (…, None) with the Hub's 404 already sent."""
            repo = self._repo(repo_id, head=head)
            if repo is None:
                return None, None
            sha = repo.resolve(revision)
            if sha is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head=head)
            return repo, sha

        # ---------------------------------------------------------------- routes

        def do_HEAD(self) -> None:
            self._route("HEAD")

        def do_GET(self) -> None:
            self._route("GET")

        def do_POST(self) -> None:
            self._route("POST")

        def do_PUT(self) -> None:
            self._route("PUT")

        def _route(self, method: str) -> None:
            url = urlsplit(self.path)
            path, query = unquote(url.path), parse_qs(url.query)
            hub.requests.append((method, path))
            routes = [
                ("GET", r"/api/whoami-v2", self.whoami),
                ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>.+))?", self.info),
                ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<sub>.*))?", self.tree),
                ("POST", r"/api/repos/create", self.create),
                ("POST", r"/api/validate-yaml", self.validate_yaml),
                ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>.+)", self.preupload),
                ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>.+)", self.commit),
                ("POST", r"/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch", self.lfs_batch),
                ("PUT", r"/__lfs/(?P<oid>[0-9a-f]{64})", self.lfs_put),
                ("GET", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self.resolve),
                ("HEAD", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self.resolve),
            ]
            for verb, pattern, handler in routes:
                match = re.fullmatch(pattern, path)
                if verb == method and match:
                    return handler(method=method, query=query, **match.groupdict())
            self._error(404, None, f"no route for {method} {path}", head=method == "HEAD")

        def whoami(self, **_) -> None:
            if not self._authorized():
                return self._error(401, None, "Invalid credentials in Authorization header")
            self._json(200, {"type": "user", "name": USER, "orgs": [{"name": "org"}], "auth": {"type": "access_token"}})

        def info(self, repo: str, rev: str | None, **_) -> None:
            found, sha = self._at(repo, rev or "main")
            if sha is None:
                return
            files = found.commits[sha]
            self._json(
                200,
                {
                    "id": repo,
                    "modelId": repo,
                    "sha": sha,
                    "private": found.private,
                    "siblings": [{"rfilename": name} for name in sorted(files)],
                    "cardData": _card_data(files),
                    "tags": [],
                },
            )

        def tree(self, repo: str, rev: str, sub: str | None, **_) -> None:
            found, sha = self._at(repo, rev)
            if sha is None:
                return
            prefix = f"{sub.strip('/')}/" if sub else ""
            files = sorted(found.commits[sha].items())
            self._json(200, [_entry(name, data) for name, data in files if name.startswith(prefix)])

        def resolve(self, method: str, repo: str, rev: str, file: str, **_) -> None:
            head = method == "HEAD"
            found, sha = self._at(repo, rev, head=head)
            if sha is None:
                return
            data = found.commits[sha].get(file)
            if data is None:
                return self._error(404, "EntryNotFound", f"{file} does not exist at {rev}", head=head)
            etag = hashlib.sha256(data).hexdigest() if file.endswith(LFS_SUFFIXES) else git_blob_id(data)
            headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
            if file.endswith(LFS_SUFFIXES):
                headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))})
            start = 0
            ranged = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
            if ranged and not head:
                start = int(ranged.group(1))
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            body = data[start:]
            if head or file not in hub.broken_downloads:
                return self._send(206 if start else 200, body, headers, head=head)
            self.send_response(206 if start else 200)  # the whole length promised, half of it sent, then hang up
            for key, value in {"Content-Length": str(len(body)), **headers}.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True

        def create(self, **_) -> None:
            if not self._authorized():
                return self._error(401, None, "You must be logged in to create a repository")
            payload = json.loads(self._body() or b"{}")
            name, organization = payload.get("name"), payload.get("organization")
            repo_id = f"{organization}/{name}" if organization else f"{USER}/{name}"
            private = payload.get("private") or payload.get("visibility") == "private"
            with hub.lock:
                if repo_id in hub.repos:  # the Hub answers 409 with the repo's url, which exist_ok clients read
                    url = f"{hub.endpoint}/{repo_id}"
                    return self._json(409, {"error": "You already created this model repo", "url": url})
                hub.repos[repo_id] = Repo(private=bool(private))
                hub.repos[repo_id].commit({".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"})
            self._json(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id, "id": repo_id})

        def validate_yaml(self, **_) -> None:
            """The card's metadata header, checked as the Hub checks it before a commit that carries README.md."""
            content = json.loads(self._body()).get("content", "")
            try:
                _card_data({"README.md": content.encode()})
            except yaml.YAMLError as exc:
                return self._json(400, {"error": f"invalid metadata: {exc}"})
            self._json(200, {"errors": [], "warnings": []})

        def preupload(self, repo: str, rev: str, **_) -> None:
            found, sha = self._at(repo, rev)
            if sha is None:
                return
            current = found.commits[sha]
            modes = []
            for item in json.loads(self._body())["files"]:
                lfs = hub.lfs_uploads and item["path"].endswith(LFS_SUFFIXES)
                old = current.get(item["path"])
                oid = None if old is None else (hashlib.sha256(old).hexdigest() if lfs else git_blob_id(old))
                modes.append(
                    {"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid}
                )
            self._json(200, {"files": modes, "commitOid": sha})

        def lfs_batch(self, repo: str, **_) -> None:
            if not self._authorized():
                return self._error(401, None, "Invalid credentials in Authorization header")
            objects = []
            for item in json.loads(self._body())["objects"]:
                entry = {"oid": item["oid"], "size": item["size"], "authenticated": True}
                if item["oid"] not in hub.lfs:
                    entry["actions"] = {"upload": {"href": f"{hub.endpoint}/__lfs/{item['oid']}"}}
                objects.append(entry)
            self._json(200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"})

        def lfs_put(self, oid: str, **_) -> None:
            data = self._body()
            if hashlib.sha256(data).hexdigest() != oid:
                return self._error(400, None, "the content does not hash to the object id")
            with hub.lock:
                hub.lfs[oid] = data
            self._send(200)

        def commit(self, repo: str, rev: str, **_) -> None:
            if not self._authorized():
                return self._error(401, None, "Invalid credentials in Authorization header")
            if hub.refuse_commits:
                self._body()
                return self._error(403, None, "You don't have the rights to create a commit on this repo")
            found, sha = self._at(repo, rev)
            if sha is None:
                return
            files = dict(found.commits[sha])
            raw = self._body()
            if self.headers.get("Content-Type", "").startswith("application/x-ndjson"):
                items = [json.loads(line) for line in raw.splitlines() if line.strip()]
            else:  # the single-JSON payload of older clients
                data = json.loads(raw)
                items = [{"key": "file", "value": v} for v in data.get("files", [])]
                items += [{"key": "lfsFile", "value": v} for v in data.get("lfsFiles", [])]
                items += [{"key": "deletedFile", "value": v} for v in data.get("deletedFiles", [])]
            for item in items:
                key, value = item["key"], item["value"]
                if key == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "lfsFile":
                    if value["oid"] not in hub.lfs:
                        return self._error(400, None, f"LFS object {value['oid']} was never uploaded")
                    files[value["path"]] = hub.lfs[value["oid"]]
                elif key == "deletedFile":
                    files.pop(value["path"], None)
            with hub.lock:
                new = found.commit(files, unquote(rev))
            url = f"{hub.endpoint}/{repo}/commit/{new}"
            self._json(200, {"commitUrl": url, "commitOid": new, "pullRequestUrl": None})

    return Handler


def _entry(name: str, data: bytes) -> dict:
    entry = {"type": "file", "path": name, "size": len(data), "oid": git_blob_id(data)}
    if name.endswith(LFS_SUFFIXES):
        entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
    return entry
