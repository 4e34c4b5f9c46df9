"""A stand-in for the Hugging Face hub: a real HTTP server on 127.0.0.1 that answers the two kinds
of request huggingface_hub makes (repo info under /api/..., file bytes under
.../resolve/<rev>/<file>), serving repos from a local folder. Code under test must talk to it
through HF_ENDPOINT, exactly as it would talk to the hub."""
import hashlib
import http.server
import json
import os
import threading
from urllib.parse import unquote, urlparse

SHA = "0123456789abcdef0123456789abcdef01234567"
GATED = "gated"  # a repos value: the repository asks for a login and an accepted license


class _Handler(http.server.BaseHTTPRequestHandler):
    repos = {}  # ("model" | "dataset", "owner/name") -> local folder, or GATED (answers 401, as the hub does)
    requests = []

    def log_message(self, *args):
        pass

    def _repo_file(self, path):
        """'/datasets/o/n/resolve/main/a/b.jsonl' -> (folder, 'a/b.jsonl'); models have no '/models'
        prefix."""
        kind = "dataset" if path.startswith("/datasets/") else "model"
        rest = path.removeprefix("/datasets/").lstrip("/")
        repo, _, tail = rest.partition("/resolve/")
        filename = tail.partition("/")[2]
        return self.repos.get((kind, repo)), filename

    def _send(self, code, body=b"", headers=None, head=False):
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _answer(self, head):
        path = unquote(urlparse(self.path).path)
        type(self).requests.append((self.command, path))
        if any(folder == GATED and repo in path for (_, repo), folder in self.repos.items()):
            return self._send(401, b'{"error": "Access to this model is restricted"}',
                              {"X-Error-Code": "GatedRepo", "X-Error-Message": "gated"}, head)
        if path.startswith("/api/"):  # /api/models/o/n[/revision/main] -> info with the file list
            kind, _, rest = path.removeprefix("/api/").partition("/")
            repo = "/".join(rest.split("/")[:2])
            folder = self.repos.get((kind.rstrip("s"), repo))
            if folder is None:
                return self._send(404, b'{"error": "Repository not found"}',
                                  {"X-Error-Code": "RepoNotFound"}, head)
            files = sorted(os.path.relpath(os.path.join(d, f),
                                           folder) for d, _, fs in os.walk(folder) for f in fs)
            info = {"id": repo, "sha": SHA, "siblings": [{"rfilename": f} for f in files],
                    "private": False}
            return self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"},
                              head)
        folder, filename = self._repo_file(path)
        if folder is None or not os.path.isfile(os.path.join(folder, filename)):
            return self._send(404, b"not found", {"X-Error-Code": "EntryNotFound"}, head)
        body = open(os.path.join(folder, filename), "rb").read()
        etag = '"%s"' % hashlib.sha256(body).hexdigest()
        self._send(200, body, {"X-Repo-Commit": SHA, "ETag": etag}, head)

    def do_HEAD(self):
        self._answer(head=True)

    def do_GET(self):
        self._answer(head=False)


class StandInHub:
    """with StandInHub({("model", "tiny/gpt2"): folder}) as hub: ... hub.endpoint ..."""

    def __init__(self, repos):
        self.handler = type("Handler", (_Handler,), {"repos": dict(repos), "requests": []})
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self.handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    @property
    def requests(self):
        return self.handler.requests

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
