"""A tiny local Hugging Face Hub for tests: the real ``huggingface_hub`` download path, no network.

Contract (checked against huggingface_hub 2.4.0, model repos only):

* ``GET /api/models/{repo_id}/revision/{rev}`` -> JSON ``{"id", "sha", "siblings": [{"rfilename"}], ...}``
  (``HfApi.repo_info``, the first call of ``snapshot_download`` when ``revision`` is not a commit sha).
* ``GET /api/models/{repo_id}/tree/{rev}?recursive=True`` -> JSON list of ``{"type": "file", "path", "size",
  "oid"}``, one page (no ``Link`` header). ``snapshot_download`` lists the tree at the resolved sha and caches
  it as ``models--org--name/trees/<sha>.json``; it is what the offline completeness check reads.
* ``HEAD`` and ``GET /{repo_id}/resolve/{rev}/{filename}`` -> 200 with ``X-Repo-Commit`` (required, else
  ``FileMetadataError``), ``ETag`` (required; the blob name in the cache, here the file's git blob sha1) and
  ``Content-Length``. No ``X-Xet-Hash`` header and no ``xetHash`` in the tree, so ``hf_xet`` (installed) is
  never used. ``Range: bytes=N-`` / ``bytes=N-M`` -> 206 with ``Content-Range``; past the end -> 416.
* Errors: 404 with ``X-Error-Code`` ``RepoNotFound`` (-> ``RepositoryNotFoundError``), ``RevisionNotFound``
  (-> ``RevisionNotFoundError``) or ``EntryNotFound`` (-> ``RemoteEntryNotFoundError``, with ``X-Repo-Commit``
  so the client caches the miss under ``.no_exist``); a JSON ``{"error": ...}`` body.
* ``GET /api/agent-harnesses``: best-effort telemetry that ``build_hf_headers`` fetches once per process from
  ``constants.ENDPOINT``; answered 404 so nothing is written to the user's ``HF_HOME``. Anything else: 404.

Pointing the client at the server in-process: ``HF_ENDPOINT`` is read once at import, so either pass
``endpoint=hub.url`` to ``snapshot_download`` / ``hf_hub_download`` (both forward it to every call), or use
``with hub.patched():`` (or ``FakeHub.patch(monkeypatch, url)``), which sets ``constants.ENDPOINT`` *and*
``constants.HUGGINGFACE_CO_URL_TEMPLATE`` (``hf_hub_url`` builds file urls from the template, not ENDPOINT).
Offline in-process: ``monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)`` (read at call
time by ``is_offline_mode``; the http session then refuses every request).

Fault injection: a name in ``drop_once`` has its first full GET cut off (headers with the full
``Content-Length``, half the body, then the connection is closed). huggingface_hub 2.4.0's ``http_get``
catches the ``RemoteProtocolError``, sleeps 1 s and retries in the same call (up to 5 times) with
``Range: bytes=<kept>-``, where <kept> counts only the whole ``constants.DOWNLOAD_CHUNK_SIZE`` (10 MiB) chunks
already written: a cut file under 10 MiB is re-fetched in full (a plain second GET, no Range); patch the chunk
size down to see a real 206 resume.
``requests`` logs ``(method, path)`` of every request (path without the query string); ``ranges`` logs
``(path, Range header)`` of every GET that asked for a range.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

from huggingface_hub import constants

_REPO = r"(?P<repo>[^/]+(?:/[^/]+)?)"
_INFO_RE = re.compile(rf"^/api/models/{_REPO}/revision/(?P<rev>[^/]+)$")
_TREE_RE = re.compile(rf"^/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/.*)?$")
_RESOLVE_RE = re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


def git_blob_sha1(data: bytes) -> str:
    """The git object id of ``data`` (what the Hub sends as ETag / tree ``oid`` for non-LFS files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """In-memory model repos served over HTTP on 127.0.0.1 (see the module docstring)."""

    def __init__(self) -> None:
        self._repos: dict[str, dict[str, tuple[str, dict[str, bytes]]]] = {}  # repo -> rev -> (sha, files)
        self._lock = threading.Lock()
        self.drop_once: set[str] = set()
        self.requests: list[tuple[str, str]] = []
        self.ranges: list[tuple[str, str]] = []
        self._server: ThreadingHTTPServer | None = None
        self.url = ""

    def add_repo(self, repo_id: str, files: dict[str, bytes], revision: str = "main") -> str:
        """Publish ``files`` as ``revision`` of ``repo_id``; returns the commit sha (a hash of the contents)."""
        h = hashlib.sha1(f"{repo_id}\0{revision}".encode())
        for name in sorted(files):
            h.update(f"\0{name}\0{git_blob_sha1(files[name])}".encode())
        sha = h.hexdigest()
        self._repos.setdefault(repo_id, {})[revision] = (sha, dict(files))
        return sha

    def resolve(self, repo_id: str, revision: str) -> tuple[str, dict[str, bytes]] | None:
        """``(sha, files)`` of a branch/tag name or a commit sha; None when unknown."""
        revs = self._repos.get(repo_id, {})
        if revision in revs:
            return revs[revision]
        return next((v for v in revs.values() if v[0] == revision), None)

    def start(self) -> str:
        handler = type("_Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._server.block_on_close = False
        threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @contextlib.contextmanager
    def patched(self):
        """Point huggingface_hub's module-level endpoint at this server for the block."""
        saved = constants.ENDPOINT, constants.HUGGINGFACE_CO_URL_TEMPLATE
        constants.ENDPOINT = self.url
        constants.HUGGINGFACE_CO_URL_TEMPLATE = self.url + "/{repo_id}/resolve/{revision}/{filename}"
        try:
            yield self
        finally:
            constants.ENDPOINT, constants.HUGGINGFACE_CO_URL_TEMPLATE = saved

    @staticmethod
    def patch(monkeypatch, url: str) -> None:
        """The same as :meth:`patched`, undone by pytest's ``monkeypatch`` at teardown."""
        monkeypatch.setattr(constants, "ENDPOINT", url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")

    def _log(self, method: str, path: str, rng: str | None) -> None:
        with self._lock:
            self.requests.append((method, path))
            if rng and method == "GET":
                self.ranges.append((path, rng))

    def _take_drop(self, filename: str) -> bool:
        with self._lock:
            if filename in self.drop_once:
                self.drop_once.discard(filename)
                return True
            return False


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the Hub; every response carries a Content-Length
    timeout = 30  # idle keep-alive connections end on their own
    hub: FakeHub

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._route(body=True)

    def do_HEAD(self) -> None:
        self._route(body=False)

    def _route(self, body: bool) -> None:
        path = urlsplit(self.path).path
        self.hub._log(self.command, path, self.headers.get("Range"))
        for regex, fn in ((_INFO_RE, self._info), (_TREE_RE, self._tree), (_RESOLVE_RE, self._resolve)):
            m = regex.match(path)
            if m:
                found = self.hub.resolve(unquote(m["repo"]), unquote(m["rev"]))
                if unquote(m["repo"]) not in self.hub._repos:
                    return self._error("RepoNotFound", "Repository not found", body)
                if found is None:
                    return self._error("RevisionNotFound", "Invalid rev id: " + unquote(m["rev"]), body)
                return fn(m, *found, body=body)
        self._send(404, {"Content-Type": "application/json"}, b'{"error": "Not Found"}', body)

    def _info(self, m: re.Match, sha: str, files: dict[str, bytes], body: bool) -> None:
        info = {"id": unquote(m["repo"]), "modelId": unquote(m["repo"]), "sha": sha, "private": False,
                "siblings": [{"rfilename": name} for name in sorted(files)]}
        self._json(info, body)

    def _tree(self, m: re.Match, sha: str, files: dict[str, bytes], body: bool) -> None:
        tree = [{"type": "file", "path": name, "size": len(data), "oid": git_blob_sha1(data)}
                for name, data in sorted(files.items())]
        self._json(tree, body)

    def _resolve(self, m: re.Match, sha: str, files: dict[str, bytes], body: bool) -> None:
        filename = unquote(m["file"])
        if filename not in files:
            return self._error("EntryNotFound", f"{filename} does not exist on {sha}", body, {"X-Repo-Commit": sha})
        data = files[filename]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_sha1(data)}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        rng = self.headers.get("Range")
        if rng:
            m_rng = _RANGE_RE.match(rng.strip())
            start, end = (m_rng[1], m_rng[2]) if m_rng else ("", "")
            if not m_rng or (not start and not end):
                return self._send(400, {}, b"bad range", body)
            first = int(start) if start else max(len(data) - int(end), 0)
            last = min(int(end), len(data) - 1) if start and end else len(data) - 1
            if first >= len(data) or first > last:
                return self._send(416, {"Content-Range": f"bytes */{len(data)}"}, b"", body)
            headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
            return self._send(206, headers, data[first:last + 1], body)
        if body and self.hub._take_drop(filename):
            return self._send_cut(headers, data)
        self._send(200, headers, data, body)

    def _send_cut(self, headers: dict[str, str], data: bytes) -> None:
        """Full headers, half the body, then close: the client sees a short read."""
        self.send_response(200)
        for key, value in {**headers, "Content-Length": str(len(data))}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        self.close_connection = True

    def _error(self, code: str, message: str, body: bool, extra: dict[str, str] | None = None) -> None:
        headers = {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json",
                   **(extra or {})}
        self._send(404, headers, json.dumps({"error": message}).encode(), body)

    def _json(self, obj: object, body: bool) -> None:
        self._send(200, {"Content-Type": "application/json"}, json.dumps(obj).encode(), body)

    def _send(self, status: int, headers: dict[str, str], data: bytes, body: bool) -> None:
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(data))}.items():
            self.send_header(key, value)
        self.end_headers()
        if body:
            self.wfile.write(data)
