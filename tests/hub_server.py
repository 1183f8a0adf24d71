"""A stand-in for the Hugging Face Hub on 127.0.0.1, serving checkpoint folders the way huggingface_hub asks for them.

What huggingface_hub 2.4 requests, and what is answered here:
* `GET /api/models/<repo>[/revision/<rev>]?blobs=true` (`HfApi.model_info`): JSON with `sha` (the commit) and
  `siblings` (every file with `size`, `blobId` and, for weight files, `lfs`);
* `GET /api/models/<repo>/tree/<rev>[/<path>]` (`list_repo_tree`, used by `snapshot_download`): the file list;
* `HEAD /<repo>/resolve/<rev>/<path>` (`get_hf_file_metadata`): headers `X-Repo-Commit`, `ETag` (the git blob sha1,
  or the sha256 for LFS files, which also get `X-Linked-Etag`/`X-Linked-Size`), `Content-Length`;
* `GET` of the same URL (`http_get`), honouring `Range: bytes=N-` with 206 and `Content-Range` to resume.
No `X-Xet-*` headers are sent, so huggingface_hub downloads over plain HTTP even with hf_xet installed.
Errors carry `X-Error-Code` (RepoNotFound, RevisionNotFound, EntryNotFound) as the Hub's do.

Every request is logged; faults can be injected per file: a connection dropped part-way, a transfer held until the
test releases it, a file the listing names but the server does not have.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".bin", ".safetensors")


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # decoded URL path
    range: str | None
    authorization: str | None


class HubFile:
    """A file of a published commit, read from disk when asked for (so multi-GB checkpoints can be served)."""

    def __init__(self, path: Path, lfs: bool) -> None:
        self.path = path
        self.lfs = lfs
        self.size = path.stat().st_size

    @functools.cached_property
    def sha256(self) -> str:
        digest = hashlib.sha256()
        with open(self.path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
        return digest.hexdigest()

    @functools.cached_property
    def git_sha1(self) -> str:
        """The git blob id: of the file itself, or of its LFS pointer file for weights."""
        if self.lfs:
            data = f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {self.size}\n".encode()
        else:
            data = self.path.read_bytes()
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.git_sha1

    def chunks(self, start: int, end: int) -> Iterator[bytes]:
        with open(self.path, "rb") as f:
            f.seek(start)
            left = end - start
            while left > 0 and (block := f.read(min(left, 1 << 20))):
                left -= len(block)
                yield block


@dataclass
class Fault:
    after: int  # bytes sent before the fault
    kind: str  # "drop": close the connection; "hold": wait for `release`, then close
    times: int = 1
    reached: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    wait_for_heads: int = 0  # "hold" only: also release once this many HEAD requests for the file have arrived


class FakeHub:
    """Repositories (folders published at commits, branches pointing at them) behind an HTTP server."""

    def __init__(self) -> None:
        self.commits: dict[str, dict[str, dict[str, HubFile]]] = {}  # repo -> commit -> path -> file
        self.branches: dict[str, dict[str, str]] = {}  # repo -> branch -> commit
        self.requests: list[Request] = []
        self.faults: dict[str, Fault] = {}  # path in repo -> fault on its next GET
        self.hidden: set[str] = set()  # listed, but 404 on resolve
        self.lock = threading.Condition()
        self.server: ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None

    # -- content ----------------------------------------------------------------------------------------------

    def publish(self, repo_id: str, folder: Path, branch: str = "main") -> str:
        """Publish every file under `folder` as one commit of `repo_id`, and point `branch` at it."""
        files = {
            p.relative_to(folder).as_posix(): HubFile(p, p.name.endswith(LFS_SUFFIXES))
            for p in sorted(folder.rglob("*"))
            if p.is_file()
        }
        digest = hashlib.sha1()
        for path, f in files.items():
            digest.update(f"{path}\0{f.sha256}\n".encode())
        commit = digest.hexdigest()
        self.commits.setdefault(repo_id, {})[commit] = files
        self.branches.setdefault(repo_id, {})[branch] = commit
        return commit

    # -- the server -------------------------------------------------------------------------------------------

    def start(self) -> FakeHub:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        for fault in self.faults.values():
            self.release(fault)
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    @property
    def endpoint(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    # -- faults and the log -----------------------------------------------------------------------------------

    def drop_once(self, path: str, after: int) -> Fault:
        fault = Fault(after, "drop")
        self.faults[path] = fault
        return fault

    def hold(self, path: str, after: int, wait_for_heads: int = 0) -> Fault:
        fault = Fault(after, "hold", wait_for_heads=wait_for_heads)
        self.faults[path] = fault
        return fault

    def release(self, fault: Fault) -> None:
        with self.lock:
            fault.release.set()
            self.lock.notify_all()

    def log(self, method: str | None = None, file: str | None = None) -> list[Request]:
        """Logged requests, optionally of one method, or for one repo file (path ending)."""
        with self.lock:
            found = list(self.requests)
        if method is not None:
            found = [r for r in found if r.method == method]
        if file is not None:
            found = [r for r in found if "/resolve/" in r.path and r.path.endswith("/" + file)]
        return found

    def fetched(self) -> list[str]:
        """Repo files fetched with GET, in order (without repo and revision)."""
        return [r.path.split("/resolve/", 1)[1].split("/", 1)[1] for r in self.log("GET") if "/resolve/" in r.path]

    def clear_log(self) -> None:
        with self.lock:
            self.requests.clear()

    # -- answering --------------------------------------------------------------------------------------------

    def resolve_commit(self, repo_id: str, revision: str) -> str | None:
        if revision in self.commits.get(repo_id, {}):
            return revision
        return self.branches.get(repo_id, {}).get(revision)

    def listing(self, repo_id: str, commit: str) -> dict[str, object]:
        siblings = []
        for path, f in self.commits[repo_id][commit].items():
            entry: dict[str, object] = {"rfilename": path, "size": f.size, "blobId": f.git_sha1}
            if f.lfs:
                entry["lfs"] = {"size": f.size, "sha256": f.sha256, "pointerSize": 134}
            siblings.append(entry)
        return {"_id": commit[:24], "id": repo_id, "modelId": repo_id, "sha": commit, "private": False,
                "tags": [], "siblings": siblings}  # fmt: skip

    def tree(self, repo_id: str, commit: str, prefix: str) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        for path, f in self.commits[repo_id][commit].items():
            if prefix and not path.startswith(prefix.rstrip("/") + "/"):
                continue
            entry: dict[str, object] = {"type": "file", "oid": f.git_sha1, "size": f.size, "path": path}
            if f.lfs:
                entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": 134}
            out.append(entry)
        return out


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # one request per connection: nothing lingers after `stop`

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_HEAD(self) -> None:
            self.answer(body=False)

        def do_GET(self) -> None:
            self.answer(body=True)

        # -- routing ----------------------------------------------------------------------------------------

        def answer(self, body: bool) -> None:
            url = urlsplit(self.path)
            raw = [unquote(p) for p in url.path.split("/")[1:]]
            request = Request(
                self.command, "/" + "/".join(raw), self.headers.get("Range"), self.headers.get("Authorization")
            )
            with hub.lock:
                hub.requests.append(request)
                hub.lock.notify_all()
            if raw[:1] == ["api"] and len(raw) >= 4 and raw[1] == "models":
                self.api(raw[2] + "/" + raw[3], raw[4:], parse_qs(url.query))
            elif len(raw) >= 5 and raw[2] == "resolve":
                self.resolve(raw[0] + "/" + raw[1], raw[3], "/".join(raw[4:]), body)
            else:
                self.error(404, "RepoNotFound")

        def api(self, repo_id: str, rest: list[str], query: dict[str, list[str]]) -> None:
            if repo_id not in hub.commits:
                return self.error(404, "RepoNotFound")
            if rest[:1] == ["tree"] and len(rest) >= 2:
                commit = hub.resolve_commit(repo_id, rest[1])
                if commit is None:
                    return self.error(404, "RevisionNotFound")
                return self.json(hub.tree(repo_id, commit, "/".join(rest[2:])))
            revision = rest[1] if rest[:1] == ["revision"] and len(rest) >= 2 else "main"
            commit = hub.resolve_commit(repo_id, revision)
            if commit is None:
                return self.error(404, "RevisionNotFound")
            self.json(hub.listing(repo_id, commit))

        def resolve(self, repo_id: str, revision: str, path: str, body: bool) -> None:
            if repo_id not in hub.commits:
                return self.error(404, "RepoNotFound")
            commit = hub.resolve_commit(repo_id, revision)
            if commit is None:
                return self.error(404, "RevisionNotFound")
            f = hub.commits[repo_id][commit].get(path)
            if f is None or path in hub.hidden:
                return self.error(404, "EntryNotFound", commit)
            size = f.size
            start = 0
            rng = self.headers.get("Range")
            if body and rng and rng.startswith("bytes="):
                start = int(rng.removeprefix("bytes=").split("-", 1)[0] or 0)
            if start >= size > 0:
                return self.error(416, "RangeNotSatisfiable", commit)
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", f'"{f.etag}"')
            if f.lfs:
                self.send_header("X-Linked-Etag", f'"{f.etag}"')
                self.send_header("X-Linked-Size", str(size))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
            self.end_headers()
            if not body:
                return
            fault = hub.faults.get(path) if start == 0 else None
            if fault is not None and fault.times > 0:
                fault.times -= 1
                self.send(f, 0, fault.after)
                self.wfile.flush()
                fault.reached.set()
                if fault.kind == "hold":
                    self.wait(fault, path)
                    if fault.wait_for_heads:  # held for others to catch up, not to be cut off: finish
                        self.send(f, fault.after, size)
                        return
                with contextlib.suppress(OSError):  # already gone if the client was killed
                    self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.send(f, start, size)

        def send(self, f: HubFile, start: int, end: int) -> None:
            try:
                for block in f.chunks(start, end):
                    self.wfile.write(block)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client went away (killed, or it stopped reading)

        def wait(self, fault: Fault, path: str) -> None:
            def heads() -> int:
                return sum(1 for r in hub.requests if r.method == "HEAD" and r.path.endswith("/" + path))

            with hub.lock:
                hub.lock.wait_for(
                    lambda: fault.release.is_set() or (fault.wait_for_heads and heads() >= fault.wait_for_heads),
                    timeout=120,
                )

        # -- answers ----------------------------------------------------------------------------------------

        def json(self, data: object) -> None:
            payload = json.dumps(data).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        def error(self, status: int, code: str, commit: str | None = None) -> None:
            payload = json.dumps({"error": code}).encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", code)
            if commit:
                self.send_header("X-Repo-Commit", commit)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

    return Handler
