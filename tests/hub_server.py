"""A local stand-in for the Hugging Face Hub: the HTTP subset `huggingface_hub` and `datasets` use
to push a dataset folder and load it back (``HF_HUB_DISABLE_XET=1``, so plain LFS).

Speaks, on 127.0.0.1:

- ``GET  /api/whoami-v2``                                  who the token belongs to
- ``GET  /api/agent-harnesses``                            (empty) registry huggingface_hub polls
- ``POST /api/repos/create``                               create a repo (409 if it exists)
- ``POST /api/validate-yaml``                              README front matter check
- ``POST /api/{type}s/{repo}/preupload/{rev}``             regular vs LFS per file
- ``POST /{prefix}{repo}.git/info/lfs/objects/batch``     LFS batch (basic transfer)
- ``PUT  /_lfs/{oid}`` + ``POST /_lfs/verify``             LFS upload and verify
- ``POST /api/{type}s/{repo}/commit/{rev}``                NDJSON commit (header, file, lfsFile,
                                                           deletedFile, deletedFolder)
- ``POST /api/{type}s/{repo}/branch/{name}``               create a branch
- ``GET  /api/{type}s/{repo}[/revision/{rev}]``            repo info (sha, siblings, cardData)
- ``GET  /api/{type}s/{repo}/refs``                        branches
- ``GET  /api/{type}s/{repo}/tree/{rev}[/{path}]``         listings (``recursive``, ``expand``)
- ``POST /api/{type}s/{repo}/paths-info/{rev}``            info for given paths (form or JSON)
- ``HEAD/GET /{prefix}{repo}/resolve/{rev}/{path}``        file content, with ETag, X-Repo-Commit,
                                                           Content-Length, Range requests

Storage: blobs by sha256 under ``root/blobs`` and the repo/commit state in ``root/state.json``.
Request headers are never stored; the server only records *that* a request was authorized.
Writes need ``Authorization: Bearer <token>`` (and, if the server was given one, that token).
Every request path is logged in ``self.log`` (paths only), unknown routes in ``self.unhandled``.

A repo whose name contains ``explode`` fails its commits with an error that echoes the request's
Authorization header, to test that a client scrubs the token from what it shows.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_SUFFIXES = (".parquet", ".arrow", ".png", ".jpg", ".jpeg", ".bin", ".safetensors", ".pt", ".gz", ".zip", ".zst")
GITATTRIBUTES = b"*.parquet filter=lfs diff=lfs merge=lfs -text\n*.arrow filter=lfs diff=lfs merge=lfs -text\n"
TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


class HubError(Exception):
    def __init__(self, status: int, message: str, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class HubState:
    """Repos, commits and blobs; persisted to ``root`` after every change."""

    def __init__(self, root: Path, user: str = "bard-tester"):
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.user = user
        self.lock = threading.RLock()
        self.repos: dict[str, dict[str, Any]] = {}  # "dataset:ns/name" -> repo
        p = self.root / "state.json"
        if p.exists():
            self.repos = json.loads(p.read_text())

    def save(self) -> None:
        tmp = self.root / "state.json.tmp"
        tmp.write_text(json.dumps(self.repos, indent=1, sort_keys=True))
        tmp.replace(self.root / "state.json")

    # blobs
    def put_blob(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        p = self.blobs / sha
        if not p.exists():
            tmp = self.blobs / f".{sha}.tmp"
            tmp.write_bytes(data)
            tmp.replace(p)
        return sha

    def has_blob(self, sha: str) -> bool:
        return (self.blobs / sha).exists()

    def blob(self, sha: str) -> bytes:
        return (self.blobs / sha).read_bytes()

    # repos
    @staticmethod
    def key(rtype: str, repo_id: str) -> str:
        return f"{rtype}:{repo_id}"

    def repo(self, rtype: str, repo_id: str) -> dict[str, Any]:
        r = self.repos.get(self.key(rtype, repo_id))
        if r is None:
            raise HubError(404, f"Repository Not Found for url: {rtype} {repo_id}", "RepoNotFound")
        return r

    def create(self, rtype: str, repo_id: str, private: bool) -> dict[str, Any]:
        with self.lock:
            k = self.key(rtype, repo_id)
            if k in self.repos:
                raise HubError(409, f"You already created this {rtype} repo", None)
            repo = {"id": repo_id, "type": rtype, "private": bool(private), "created": _now(),
                    "branches": {}, "commits": {}}
            self.repos[k] = repo
            self._commit(repo, "main", {".gitattributes": self._file_entry(GITATTRIBUTES, lfs=False)},
                         "initial commit", None)
            self.save()
            return repo

    def _file_entry(self, data: bytes, lfs: bool) -> dict[str, Any]:
        sha = self.put_blob(data)
        return {"sha256": sha, "size": len(data), "lfs": lfs,
                "oid": git_blob_oid(lfs_pointer(sha, len(data))) if lfs else git_blob_oid(data)}

    def _commit(self, repo: dict, branch: str, files: dict[str, Any], title: str, parent: Optional[str]) -> str:
        payload = json.dumps({"files": files, "parent": parent, "title": title, "t": _now(),
                              "n": len(repo["commits"])}, sort_keys=True)
        sha = hashlib.sha1(payload.encode()).hexdigest()
        repo["commits"][sha] = {"files": files, "parent": parent, "title": title, "date": _now()}
        repo["branches"][branch] = sha
        return sha

    def resolve_rev(self, repo: dict, rev: str) -> str:
        rev = unquote(rev or "main")
        if rev.startswith("refs/heads/"):
            rev = rev[len("refs/heads/"):]
        if rev in repo["branches"]:
            return repo["branches"][rev]
        if re.fullmatch(r"[0-9a-f]{40}", rev) and rev in repo["commits"]:
            return rev
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def files(self, repo: dict, rev: str) -> tuple[str, dict[str, Any]]:
        sha = self.resolve_rev(repo, rev)
        return sha, repo["commits"][sha]["files"]


def _dirs_of(paths) -> set[str]:
    out = set()
    for p in paths:
        parts = p.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            out.add("/".join(parts[:i]))
    return out


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "HubServer"

    def log_message(self, fmt, *args):  # quiet; paths go to server.log instead
        pass

    # -- plumbing ---------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                line = self.rfile.readline().strip()
                n = int(line.split(b";")[0], 16)
                if n == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(n))
                self.rfile.readline()
            return b"".join(chunks)
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, body: bytes = b"", ctype: str = "application/json",
              headers: Optional[dict[str, str]] = None, head: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head and body and self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any, headers: Optional[dict[str, str]] = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers=headers)

    def _token(self) -> Optional[str]:
        auth = self.headers.get("Authorization") or ""
        return auth[7:].strip() if auth.lower().startswith("bearer ") else None

    def _require_auth(self) -> None:
        tok = self._token()
        if not tok or (self.server.expected_token is not None and tok != self.server.expected_token):
            raise HubError(401, "Invalid credentials in Authorization header", None)
        self.server.authorized_requests += 1

    def _can_read(self, repo: dict) -> None:
        if repo.get("private"):
            try:
                self._require_auth()
            except HubError:
                raise HubError(404, "Repository Not Found", "RepoNotFound") from None

    def _base(self) -> str:
        return f"http://{self.headers.get('Host') or '%s:%d' % self.server.server_address[:2]}"

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        path = url.path
        qs = parse_qs(url.query, keep_blank_values=True)
        self.server.log.append(f"{method} {path}")
        try:
            body = self._body() if method in ("POST", "PUT") else b""
            if not self._route(method, path, qs, body):
                self.server.unhandled.append(f"{method} {self.path}")
                self._json(404, {"error": f"not implemented by the test hub: {method} {path}"})
        except HubError as e:
            headers = {"X-Error-Code": e.code} if e.code else {}
            headers["X-Error-Message"] = e.message
            self._json(e.status, {"error": e.message}, headers=headers)
        except Exception as e:  # noqa: BLE001
            self._json(500, {"error": f"{type(e).__name__}: {e}"})

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    # -- routes -----------------------------------------------------------------------------
    def _route(self, method: str, path: str, qs: dict, body: bytes) -> bool:
        st = self.server.state
        if path == "/api/whoami-v2" and method == "GET":
            self._require_auth()
            self._json(200, {"type": "user", "id": "1", "name": st.user, "fullname": "Bard Tester",
                             "email": None, "emailVerified": False, "isPro": False, "orgs": [],
                             "auth": {"type": "access_token",
                                      "accessToken": {"displayName": "test", "role": "write", "createdAt": _now()}}})
            return True
        if path == "/api/agent-harnesses" and method == "GET":
            self._json(200, {"standardEnvVars": [], "harnesses": {}})
            return True
        if path == "/api/repos/create" and method == "POST":
            self._require_auth()
            data = json.loads(body or b"{}")
            rtype = data.get("type") or "model"
            ns = data.get("organization") or st.user
            repo_id = f"{ns}/{data['name']}"
            private = data.get("private", False) or data.get("visibility") == "private"
            url = f"{self._base()}/{PREFIX[rtype]}{repo_id}"
            try:
                st.create(rtype, repo_id, private)
            except HubError as e:
                if e.status == 409:
                    self._json(409, {"error": e.message, "url": url})
                    return True
                raise
            self._json(200, {"url": url, "name": repo_id, "id": repo_id})
            return True
        if path == "/api/validate-yaml" and method == "POST":
            data = json.loads(body or b"{}")
            content = data.get("content", "")
            m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.S)
            try:
                meta = yaml.safe_load(m.group(1)) if m else {}
            except yaml.YAMLError as exc:
                self._json(400, {"errors": [{"message": f"invalid YAML: {exc}"}], "warnings": []})
                return True
            if m and not isinstance(meta, dict):
                self._json(400, {"errors": [{"message": "metadata must be a mapping"}], "warnings": []})
                return True
            self._json(200, {"errors": [], "warnings": []})
            return True
        if path.startswith("/_lfs/"):
            return self._lfs_object(method, path, body)
        m = re.match(r"^/(?:(datasets|spaces)/)?([^/]+/[^/]+?)\.git/info/lfs/objects/batch$", path)
        if m and method == "POST":
            return self._lfs_batch(TYPES.get(m.group(1) or "models", "model"), m.group(2), body)
        m = re.match(r"^/api/(models|datasets|spaces)/([^/]+/[^/]+)(/.*)?$", path)
        if m:
            return self._api_repo(method, TYPES[m.group(1)], m.group(2), m.group(3) or "", qs, body)
        m = re.match(r"^/(?:(datasets|spaces)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        if m and method in ("GET", "HEAD"):
            return self._resolve(method, TYPES.get(m.group(1) or "models", "model"), m.group(2),
                                 unquote(m.group(3)), unquote(m.group(4)))
        return False

    # LFS
    def _lfs_batch(self, rtype: str, repo_id: str, body: bytes) -> bool:
        self._require_auth()
        self.server.state.repo(rtype, repo_id)
        data = json.loads(body or b"{}")
        objects = []
        for obj in data.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if not self.server.state.has_blob(oid):
                entry["actions"] = {
                    "upload": {"href": f"{self._base()}/_lfs/{oid}", "header": {}},
                    "verify": {"href": f"{self._base()}/_lfs/verify", "header": {}},
                }
            objects.append(entry)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                   ctype="application/vnd.git-lfs+json")
        return True

    def _lfs_object(self, method: str, path: str, body: bytes) -> bool:
        st = self.server.state
        if path == "/_lfs/verify" and method == "POST":
            self._require_auth()
            data = json.loads(body or b"{}")
            if not st.has_blob(data.get("oid", "")) or len(st.blob(data["oid"])) != int(data.get("size", -1)):
                raise HubError(404, "object not found or wrong size", None)
            self._json(200, {"success": True})
            return True
        m = re.match(r"^/_lfs/([0-9a-f]{64})$", path)
        if m and method == "PUT":
            oid = m.group(1)
            if hashlib.sha256(body).hexdigest() != oid:
                raise HubError(400, "sha256 mismatch", None)
            st.put_blob(body)
            self._send(200, b"", headers={"ETag": f'"{oid}"'})
            return True
        return False

    # /api/{type}s/{repo}/...
    def _api_repo(self, method: str, rtype: str, repo_id: str, rest: str, qs: dict, body: bytes) -> bool:
        st = self.server.state
        if rest in ("", "/") or rest.startswith("/revision/"):
            if method != "GET":
                return False
            repo = st.repo(rtype, repo_id)
            self._can_read(repo)
            rev = unquote(rest[len("/revision/"):]) if rest.startswith("/revision/") else "main"
            sha, files = st.files(repo, rev)
            self._json(200, self._repo_info(repo, sha, files))
            return True
        if rest == "/refs" and method == "GET":
            repo = st.repo(rtype, repo_id)
            self._can_read(repo)
            self._json(200, {"branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": c}
                                          for b, c in sorted(repo["branches"].items())], "tags": [], "converts": []})
            return True
        m = re.match(r"^/preupload/([^/]+)$", rest)
        if m and method == "POST":
            self._require_auth()
            repo = st.repo(rtype, repo_id)
            st.resolve_rev(repo, m.group(1))
            data = json.loads(body or b"{}")
            out = []
            for f in data.get("files", []):
                sample = base64.b64decode(f.get("sample", ""))
                lfs = f["path"].lower().endswith(LFS_SUFFIXES) or b"\0" in sample or int(f.get("size", 0)) > 10_000_000
                out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                            "oid": None})
            self._json(200, {"files": out, "commitOid": st.resolve_rev(repo, m.group(1))})
            return True
        m = re.match(r"^/commit/([^/]+)$", rest)
        if m and method == "POST":
            return self._commit(rtype, repo_id, unquote(m.group(1)), qs, body)
        m = re.match(r"^/branch/(.+)$", rest)
        if m and method == "POST":
            self._require_auth()
            branch = unquote(m.group(1))
            with st.lock:
                repo = st.repo(rtype, repo_id)
                if branch in repo["branches"]:
                    raise HubError(409, f"Reference already exists: refs/heads/{branch}", None)
                data = json.loads(body or b"{}")
                repo["branches"][branch] = st.resolve_rev(repo, data.get("startingPoint") or "main")
                st.save()
            self._json(200, {})
            return True
        m = re.match(r"^/tree/([^/]+)(/.*)?$", rest)
        if m and method == "GET":
            repo = st.repo(rtype, repo_id)
            self._can_read(repo)
            sha, files = st.files(repo, m.group(1))
            sub = unquote((m.group(2) or "").lstrip("/")).strip("/")
            recursive = (qs.get("recursive", ["false"])[0].lower() in ("1", "true"))
            expand = (qs.get("expand", ["false"])[0].lower() in ("1", "true"))
            dirs = _dirs_of(files)
            if sub and sub not in dirs:
                if sub in files:
                    self._json(200, [self._entry(repo, sha, sub, files, expand)])
                    return True
                raise HubError(404, f"Entry not found: {sub}", "EntryNotFound")
            prefix = f"{sub}/" if sub else ""
            names = [p for p in sorted(set(files) | dirs) if p.startswith(prefix) and p != sub]
            if not recursive:
                names = [p for p in names if "/" not in p[len(prefix):]]
            self._json(200, [self._entry(repo, sha, p, files, expand) for p in names])
            return True
        m = re.match(r"^/paths-info/([^/]+)$", rest)
        if m and method == "POST":
            repo = st.repo(rtype, repo_id)
            self._can_read(repo)
            sha, files = st.files(repo, m.group(1))
            ctype = self.headers.get("Content-Type", "")
            if "json" in ctype:
                data = json.loads(body or b"{}")
                paths, expand = data.get("paths", []), bool(data.get("expand"))
            else:
                form = parse_qs(body.decode(), keep_blank_values=True)
                paths = form.get("paths", [])
                expand = form.get("expand", ["False"])[0].lower() in ("1", "true")
            dirs = _dirs_of(files)
            out = [self._entry(repo, sha, p.strip("/"), files, expand) for p in paths
                   if p.strip("/") in files or p.strip("/") in dirs]
            self._json(200, out)
            return True
        return False

    def _last_commit(self, repo: dict, sha: str) -> dict[str, Any]:
        c = repo["commits"][sha]
        return {"id": sha, "title": c["title"], "date": c["date"]}

    def _entry(self, repo: dict, sha: str, p: str, files: dict, expand: bool) -> dict[str, Any]:
        if p in files:
            f = files[p]
            e: dict[str, Any] = {"type": "file", "oid": f["oid"], "size": f["size"], "path": p}
            if f["lfs"]:
                e["lfs"] = {"oid": f["sha256"], "size": f["size"], "pointerSize": len(lfs_pointer(f["sha256"], f["size"]))}
        else:
            e = {"type": "directory", "oid": hashlib.sha1(f"{sha}:{p}".encode()).hexdigest(), "size": 0, "path": p}
        if expand:
            e["lastCommit"] = self._last_commit(repo, sha)
        return e

    def _repo_info(self, repo: dict, sha: str, files: dict) -> dict[str, Any]:
        card = None
        if "README.md" in files:
            text = self.server.state.blob(files["README.md"]["sha256"]).decode("utf-8", "replace")
            m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
            if m:
                try:
                    card = yaml.safe_load(m.group(1))
                except yaml.YAMLError:
                    card = None
        c = repo["commits"][sha]
        siblings = []
        for p, f in sorted(files.items()):
            s: dict[str, Any] = {"rfilename": p, "size": f["size"], "blobId": f["oid"]}
            if f["lfs"]:
                s["lfs"] = {"size": f["size"], "sha256": f["sha256"], "pointerSize": 134}
            siblings.append(s)
        ns = repo["id"].split("/")[0]
        return {"_id": hashlib.sha1(repo["id"].encode()).hexdigest()[:24], "id": repo["id"], "author": ns,
                "sha": sha, "lastModified": c["date"], "createdAt": repo["created"], "private": repo["private"],
                "gated": False, "disabled": False, "downloads": 0, "likes": 0, "tags": [],
                "cardData": card if isinstance(card, dict) else None, "siblings": siblings,
                "usedStorage": sum(f["size"] for f in files.values())}

    def _commit(self, rtype: str, repo_id: str, rev: str, qs: dict, body: bytes) -> bool:
        self._require_auth()
        st = self.server.state
        if "explode" in repo_id:
            # Echo the credentials, as a careless server might: the client must scrub them.
            raise HubError(400, f"commit rejected for request with Authorization: {self.headers.get('Authorization')}",
                           None)
        if qs.get("create_pr"):
            raise HubError(400, "pull requests are not supported by the test hub", None)
        lines = [json.loads(x) for x in body.decode().splitlines() if x.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "commit payload must start with a header line", None)
        header = lines[0]["value"]
        with st.lock:
            repo = st.repo(rtype, repo_id)
            branch = rev[len("refs/heads/"):] if rev.startswith("refs/heads/") else rev
            if branch not in repo["branches"]:
                raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            head = repo["branches"][branch]
            if header.get("parentCommit") and header["parentCommit"] != head:
                raise HubError(412, "A commit has happened since the parent commit", None)
            files = dict(repo["commits"][head]["files"])
            for op in lines[1:]:
                key, v = op.get("key"), op.get("value", {})
                p = v.get("path", "").strip("/")
                if key == "file":
                    data = base64.b64decode(v["content"]) if v.get("encoding") == "base64" else v["content"].encode()
                    files[p] = st._file_entry(data, lfs=False)
                elif key == "lfsFile":
                    oid = v["oid"]
                    if not st.has_blob(oid):
                        raise HubError(400, f"LFS object {oid} was not uploaded", None)
                    size = len(st.blob(oid))
                    files[p] = {"sha256": oid, "size": size, "lfs": True,
                                "oid": git_blob_oid(lfs_pointer(oid, size))}
                elif key == "deletedFile":
                    if p not in files:
                        raise HubError(404, f"A file with this name doesn't exist: {p}", "EntryNotFound")
                    del files[p]
                elif key == "deletedFolder":
                    for q in [q for q in files if q.startswith(p + "/")]:
                        del files[q]
                else:
                    raise HubError(400, f"unknown commit operation {key!r}", None)
            sha = st._commit(repo, branch, files, header.get("summary") or "commit", head)
            st.save()
        base = f"{self._base()}/{PREFIX[rtype]}{repo_id}"
        self._json(200, {"success": True, "commitOid": sha, "commitUrl": f"{base}/commit/{sha}",
                         "pullRequestUrl": None, "hookOutput": ""})
        return True

    def _resolve(self, method: str, rtype: str, repo_id: str, rev: str, p: str) -> bool:
        st = self.server.state
        repo = st.repo(rtype, repo_id)
        self._can_read(repo)
        sha, files = st.files(repo, rev)
        if p not in files:
            raise HubError(404, f"Entry not found: {p}", "EntryNotFound")
        f = files[p]
        data = st.blob(f["sha256"])
        etag = f["sha256"] if f["lfs"] else f["oid"]
        headers = {"ETag": f'"{etag}"', "X-Repo-Commit": sha, "Accept-Ranges": "bytes"}
        if f["lfs"]:
            headers["X-Linked-Etag"] = f'"{etag}"'
            headers["X-Linked-Size"] = str(f["size"])
        rng = self.headers.get("Range")
        head = method == "HEAD"
        if rng and not head:
            m = re.match(r"bytes=(\d*)-(\d*)$", rng.strip())
            if m:
                size = len(data)
                if m.group(1) == "":
                    start, end = max(0, size - int(m.group(2))), size - 1
                else:
                    start = int(m.group(1))
                    end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
                if start >= size and size > 0:
                    self._send(416, b"", headers={"Content-Range": f"bytes */{size}"})
                    return True
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
                self._send(206, data[start:end + 1], ctype="application/octet-stream", headers=headers)
                return True
        self._send(200, data, ctype="application/octet-stream", headers=headers, head=head)
        return True


class HubServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, root: str | Path, port: int = 0, expected_token: Optional[str] = None):
        super().__init__(("127.0.0.1", port), Handler)
        self.state = HubState(Path(root))
        self.expected_token = expected_token
        self.log: list[str] = []
        self.unhandled: list[str] = []
        self.authorized_requests = 0
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "HubServer":
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


def main(argv: Optional[list[str]] = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="a local Hub stand-in for tests")
    ap.add_argument("root")
    ap.add_argument("--port", type=int, default=0)
    a = ap.parse_args(argv)
    srv = HubServer(a.root, a.port)
    print(srv.url, flush=True)
    try:
        srv.serve_forever()
    finally:
        srv.server_close()


if __name__ == "__main__":
    main()
