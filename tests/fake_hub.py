"""A stand-in for the Hugging Face Hub's servers, for tests (imported as `fake_hub`; pytest puts tests/ on sys.path).

The Hub's servers cannot run here, so `FakeHub` serves folders on disk as model repos over HTTP with the endpoints
`huggingface_hub` calls to download a file and to list a folder. Point a process at it with `HF_ENDPOINT`
(`FakeHub.environment`): everything from `huggingface_hub` up (transformers' `cached_file`, `from_pretrained`) runs
as it does against the Hub, downloads and cache included.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"
"""The one commit every served repo is at."""


class FakeHub:
    """Serves `root/<owner>/<name>/...` as the repo `<owner>/<name>` at revision "main" (commit `COMMIT`).

    Use as a context manager; `requests` records the (method, path) of every request.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.requests: list[tuple[str, str]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def environment(self, cache: str | os.PathLike) -> dict[str, str]:
        """Environment variables that send a process's Hub calls here, with its cache in `cache`."""
        environment = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
        return {
            **environment,
            "HF_ENDPOINT": self.endpoint,
            "HF_HOME": str(cache),
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_XET": "1",
        }

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:  # noqa: N802 (the library's name)
                self._serve(body=False)

            def do_GET(self) -> None:  # noqa: N802
                self._serve(body=True)

            def _serve(self, body: bool) -> None:
                path = unquote(urlsplit(self.path).path)
                hub.requests.append((self.command, path))
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "models"] and len(parts) >= 4:
                    repo = hub.root / parts[2] / parts[3]
                    if not repo.is_dir():
                        return self._error(404, "RepoNotFound")
                    rest = parts[4:]
                    if rest[:1] == ["tree"] and len(rest) >= 2:
                        return self._tree(repo, "/".join(rest[2:]), body)
                    if not rest or rest[:1] == ["revision"]:
                        return self._info(repo, f"{parts[2]}/{parts[3]}", body)
                    return self._error(404, "EntryNotFound")
                if len(parts) >= 5 and parts[2] == "resolve":
                    repo = hub.root / parts[0] / parts[1]
                    if not repo.is_dir():
                        return self._error(404, "RepoNotFound")
                    file = repo / "/".join(parts[4:])
                    if not file.is_file():
                        return self._error(404, "EntryNotFound")
                    data = file.read_bytes()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.send_header("X-Repo-Commit", COMMIT)
                    self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
                    self.end_headers()
                    if body:
                        self.wfile.write(data)
                    return None
                return self._error(404, "RepoNotFound")

            def _tree(self, repo: Path, folder: str, body: bool) -> None:
                directory = repo / folder
                if not directory.is_dir():
                    return self._error(404, "EntryNotFound")
                entries = []
                for entry in sorted(directory.iterdir()):
                    relative = entry.relative_to(repo).as_posix()
                    if entry.is_dir():
                        entries.append({"type": "directory", "path": relative, "oid": COMMIT})
                    else:
                        data = entry.read_bytes()
                        oid = hashlib.sha1(data).hexdigest()
                        entries.append({"type": "file", "path": relative, "oid": oid, "size": len(data)})
                return self._json(entries, body)

            def _info(self, repo: Path, repo_id: str, body: bool) -> None:
                files = sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file())
                info = {
                    "id": repo_id,
                    "modelId": repo_id,
                    "sha": COMMIT,
                    "private": False,
                    "siblings": [{"rfilename": name} for name in files],
                }
                return self._json(info, body)

            def _json(self, value: object, body: bool) -> None:
                data = json.dumps(value).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("X-Repo-Commit", COMMIT)
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def _error(self, status: int, code: str) -> None:
                data = json.dumps({"error": code}).encode()
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                if (
                    code == "EntryNotFound"
                ):  # as the Hub: the client records the file as missing at this commit
                    self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

        return Handler
