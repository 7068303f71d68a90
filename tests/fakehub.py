"""A small fake Hugging Face Hub on loopback, enough for `huggingface_hub` downloads and `transformers` loading.

It speaks the parts of the Hub protocol that `hf_hub_download`, `get_hf_file_metadata` and `from_pretrained` use:

* ``HEAD|GET /{org}/{name}/resolve/{revision}/{path}`` with ``X-Repo-Commit``, ``ETag`` (git blob sha1) and
  ``Content-Length``. Large or binary (LFS-like) files answer ``302`` to a second server on another port (a different
  origin, as the real Hub's CDN), with ``X-Linked-Etag`` (sha256) and ``X-Linked-Size``.
* ``GET`` honours ``Range: bytes=a-b`` with ``206`` and ``Content-Range``.
* 404s carry ``X-Error-Code``: ``RepoNotFound``, ``RevisionNotFound`` or ``EntryNotFound``.
* ``/api/models/{repo}[/revision/{rev}]`` and ``/api/models/{repo}/tree/{rev}[/{path}]`` list files.
* Uploads as `HfApi.create_repo` / `upload_folder` make them: ``POST /api/repos/create``, ``/api/validate-yaml``,
  ``/api/models/{repo}/preupload/{rev}`` (every file "regular": its content comes inline) and
  ``/api/models/{repo}/commit/{rev}`` (NDJSON operations).

Every request is recorded in `FakeHub.requests` as ``[method, path, range header, body bytes sent]``.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

__all__ = ['FakeHub', 'publish_base_repo', 'save_tiny_clip']

_LFS_SUFFIXES = ('.safetensors', '.bin', '.pt', '.pth', '.ckpt', '.msgpack', '.onnx')
_LFS_MIN_SIZE = 1 << 20
_RESOLVE = re.compile(r'^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$')
_API = re.compile(r'^/api/models/(?P<repo>[^/]+/[^/]+)(?:/(?P<kind>revision|tree)/(?P<rev>[^/]+)(?:/(?P<path>.*))?)?$')
_UPLOAD = re.compile(r'^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<kind>preupload|commit)/(?P<rev>[^/]+)$')
_CDN = re.compile(r'^/cdn/(?P<sha>[0-9a-f]{64})/')
_RANGE = re.compile(r'^bytes=(\d*)-(\d*)$')


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()


class FakeHub:
    """Fake Hub: repos of files, branches pointing at commits, a CDN for large files, and a request log."""

    def __init__(self) -> None:
        self.branches: dict[str, dict[str, str]] = {}  # repo -> branch -> commit
        self.commits: dict[str, dict[str, bytes]] = {}  # commit -> path -> data
        self.repo_commits: dict[str, set[str]] = {}  # repo -> every commit it had (old commits stay reachable)
        self.blobs: dict[str, bytes] = {}  # sha256 -> data (what the CDN serves)
        self.requests: list[list[Any]] = []  # [method, path, range header, body bytes sent]
        self._truncate: dict[str, list[Any]] = {}  # path -> [n_bytes, times left, declare full length]
        self._lock = threading.Lock()
        self._servers: list[ThreadingHTTPServer] = []

    # ---- control -------------------------------------------------------------------------------------------------
    def start(self) -> FakeHub:
        """Start the Hub and its CDN on free loopback ports (daemon threads)."""
        handler = type('Handler', (_Handler,), {'hub': self})
        for _ in range(2):
            server = ThreadingHTTPServer(('127.0.0.1', 0), handler)
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, daemon=True).start()
            self._servers.append(server)
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers.clear()

    @property
    def url(self) -> str:
        return f'http://127.0.0.1:{self._servers[0].server_address[1]}'

    @property
    def cdn_url(self) -> str:
        return f'http://127.0.0.1:{self._servers[1].server_address[1]}'

    def add_file(self, repo_id: str, path_in_repo: str, data: bytes | str | Path, revision: str = 'main') -> str:
        """Commit one file to `revision` (a branch, created if new) and return the new commit hash."""
        if isinstance(data, (str, Path)):
            data = Path(data).read_bytes()
        with self._lock:
            branches = self.branches.setdefault(repo_id, {})
            parent = branches.get(revision) or branches.get('main') or ''
            files = dict(self.commits.get(parent, {}))
            files[path_in_repo] = data
            key = f'{repo_id}\0{revision}\0{parent}\0{path_in_repo}\0{hashlib.sha256(data).hexdigest()}'
            commit = hashlib.sha1(key.encode()).hexdigest()
            self.commits[commit] = files
            self.repo_commits.setdefault(repo_id, set()).add(commit)
            self.blobs[hashlib.sha256(data).hexdigest()] = data
            branches[revision] = commit
        return commit

    def add_folder(self, repo_id: str, folder: str | Path, prefix: str = '', revision: str = 'main') -> str:
        """Commit every file under `folder` (as `prefix/relative/path`) and return the last commit hash."""
        commit = ''
        for file in sorted(p for p in Path(folder).rglob('*') if p.is_file()):
            rel = file.relative_to(folder).as_posix()
            commit = self.add_file(repo_id, f'{prefix}/{rel}' if prefix else rel, file, revision=revision)
        return commit

    def create_repo(self, repo_id: str) -> bool:
        """Create an empty repo; False when it exists already."""
        with self._lock:
            if repo_id in self.branches:
                return False
            self.branches[repo_id] = {}
            self.repo_commits[repo_id] = set()
            return True

    def remove_repo(self, repo_id: str) -> None:
        """Delete a repo: every later request for it is a 404 RepoNotFound."""
        with self._lock:
            self.branches.pop(repo_id, None)
            self.repo_commits.pop(repo_id, None)

    def truncate_next(self, path_in_repo: str, n_bytes: int, *, times: int = 1, full_length: bool = True) -> None:
        """Send only `n_bytes` of the next `times` GETs of `path_in_repo`, then close the connection.

        With `full_length` the headers announce the whole body (a connection dropped mid-download: the client sees
        an incomplete body and may resume with a Range request); otherwise ``Content-Length`` is the truncated size
        (the body looks complete and only the size check against the metadata can catch it).
        """
        with self._lock:
            self._truncate[path_in_repo] = [n_bytes, times, full_length]

    def commit_of(self, repo_id: str, revision: str = 'main') -> str:
        return self.branches[repo_id][revision]

    def bytes_sent(self, fragment: str = '', method: str = 'GET') -> int:
        """Body bytes sent for requests whose path contains `fragment`."""
        return sum(n for m, p, _, n in list(self.requests) if m == method and fragment in unquote(p))

    # ---- lookup --------------------------------------------------------------------------------------------------
    def _lookup(self, repo_id: str, revision: str) -> tuple[str | None, str, dict[str, bytes]]:
        """(error code or None, commit, files) for a repo at a branch or at any commit it ever had."""
        branches = self.branches.get(repo_id)
        if branches is None:
            return 'RepoNotFound', '', {}
        commit = branches.get(revision, revision)
        if commit not in self.repo_commits.get(repo_id, ()):
            return 'RevisionNotFound', '', {}
        return None, commit, self.commits[commit]

    def _take_truncation(self, path: str) -> tuple[int, bool] | None:
        with self._lock:
            spec = self._truncate.get(path)
            if spec is None:
                return None
            spec[1] -= 1
            if spec[1] <= 0:
                del self._truncate[path]
            return spec[0], spec[2]


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = 'HTTP/1.1'

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (silence the default stderr log)
        pass

    def do_HEAD(self) -> None:  # noqa: N802
        self._handle(head=True)

    def do_GET(self) -> None:  # noqa: N802
        self._handle(head=False)

    def do_POST(self) -> None:  # noqa: N802
        path = urlsplit(self.path).path
        self._entry = [self.command, self.path, None, 0]
        self.hub.requests.append(self._entry)
        body = self.rfile.read(int(self.headers.get('Content-Length') or 0))
        if path == '/api/repos/create':
            req = json.loads(body)
            repo_id = f"{req['organization']}/{req['name']}" if req.get('organization') else req['name']
            if not self.hub.create_repo(repo_id):
                return self._error(409, None, {})
            return self._json({'url': f'{self.hub.url}/{repo_id}'})
        if path == '/api/validate-yaml':
            return self._json({'errors': [], 'warnings': []})
        m = _UPLOAD.match(path)
        if m is None:
            return self._error(404, None, {})
        repo_id, revision = unquote(m['repo']), unquote(m['rev'])
        if repo_id not in self.hub.branches:
            return self._error(404, 'RepoNotFound', {})
        if m['kind'] == 'preupload':
            files = json.loads(body)['files']
            return self._json({'files': [{'path': f['path'], 'uploadMode': 'regular', 'shouldIgnore': False}
                                         for f in files]})
        commit = ''
        for line in body.splitlines():
            item = json.loads(line)
            if item['key'] == 'file':
                value = item['value']
                commit = self.hub.add_file(repo_id, value['path'], base64.b64decode(value['content']), revision)
        return self._json({'commitUrl': f'{self.hub.url}/{repo_id}/commit/{commit}', 'commitOid': commit})

    def _json(self, payload: Any) -> None:
        self._body(json.dumps(payload).encode(), False, {'Content-Type': 'application/json'})

    # ---- routing -------------------------------------------------------------------------------------------------
    def _handle(self, head: bool) -> None:
        path = urlsplit(self.path).path
        # Logged before answering (and sizes before sending): the client may look at the log as soon as it has the
        # response.
        self._entry: list[Any] = [self.command, self.path, self.headers.get('Range'), 0]
        self.hub.requests.append(self._entry)
        if m := _CDN.match(path):
            data = self.hub.blobs.get(m['sha'])
            if data is None:
                self._error(404, 'EntryNotFound', {})
            else:
                self._body(data, head, {'ETag': f'"{m["sha"]}"'}, truncate_key=unquote(path.split('/', 3)[3]))
        elif m := _RESOLVE.match(path):
            self._resolve(unquote(m['repo']), unquote(m['rev']), unquote(m['path']), head)
        elif m := _API.match(path):
            self._api(unquote(m['repo']), m['kind'], unquote(m['rev'] or 'main'), unquote(m['path'] or ''), head)
        else:
            self._error(404, None, {})

    def _resolve(self, repo_id: str, revision: str, file: str, head: bool) -> None:
        hub = self.hub
        code, commit, files = hub._lookup(repo_id, revision)
        if code is not None:
            return self._error(404, code, {})
        headers = {'X-Repo-Commit': commit}
        if file not in files:
            return self._error(404, 'EntryNotFound', headers)
        data = files[file]
        if file.endswith(_LFS_SUFFIXES) or len(data) >= _LFS_MIN_SIZE:
            sha = hashlib.sha256(data).hexdigest()
            headers.update({'X-Linked-Etag': f'"{sha}"', 'X-Linked-Size': str(len(data)),
                            'ETag': f'"{_git_sha1(data)}"', 'Location': f'{hub.cdn_url}/cdn/{sha}/{quote(file)}',
                            'Content-Length': '0'})
            self.send_response(302)
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            return
        headers['ETag'] = f'"{_git_sha1(data)}"'
        self._body(data, head, headers, truncate_key=file)

    def _api(self, repo_id: str, kind: str | None, revision: str, prefix: str, head: bool) -> None:
        code, commit, files = self.hub._lookup(repo_id, revision)
        if code is not None:
            return self._error(404, code, {})
        if kind == 'tree':
            prefix = prefix.strip('/')
            entries = [{'type': 'file', 'path': p, 'size': len(d), 'oid': _git_sha1(d), **self._lfs(p, d)}
                       for p, d in sorted(files.items()) if not prefix or p.startswith(prefix + '/')]
            if prefix and not entries:
                return self._error(404, 'EntryNotFound', {'X-Repo-Commit': commit})
            payload: Any = entries
        else:
            payload = {'id': repo_id, 'modelId': repo_id, 'sha': commit, 'private': False, 'gated': False,
                       'siblings': [{'rfilename': p} for p in sorted(files)]}
        body = json.dumps(payload).encode()
        self._body(body, head, {'Content-Type': 'application/json', 'X-Repo-Commit': commit})

    @staticmethod
    def _lfs(path: str, data: bytes) -> dict[str, Any]:
        """The `lfs` field of a tree entry: LFS files are known by their sha256, as on the Hub."""
        if not (path.endswith(_LFS_SUFFIXES) or len(data) >= _LFS_MIN_SIZE):
            return {}
        return {'lfs': {'oid': hashlib.sha256(data).hexdigest(), 'size': len(data), 'pointerSize': 134}}

    # ---- responses -----------------------------------------------------------------------------------------------
    def _error(self, status: int, code: str | None, headers: dict[str, str]) -> None:
        body = json.dumps({'error': code or 'Not Found'}).encode()
        self.send_response(status)
        if code:
            self.send_header('X-Error-Code', code)
            self.send_header('X-Error-Message', code)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        if self.command != 'HEAD':
            self._entry[3] = len(body)
            self.wfile.write(body)

    def _body(self, data: bytes, head: bool, headers: dict[str, str], truncate_key: str | None = None) -> None:
        total = len(data)
        start, end, status = 0, total, 200
        rng = self.headers.get('Range')
        if rng and not head:
            m = _RANGE.match(rng.strip())
            if m is None:
                return self._error(416, None, {'Content-Range': f'bytes */{total}'})
            a, b = m.groups()
            if a == '':  # suffix range: the last b bytes
                start, end = max(total - int(b or 0), 0), total
            else:
                start, end = int(a), min(int(b) + 1, total) if b else total
            if start >= total or start >= end:
                return self._error(416, None, {'Content-Range': f'bytes */{total}'})
            status = 206
            headers = {**headers, 'Content-Range': f'bytes {start}-{end - 1}/{total}'}
        body = data[start:end]
        cut = self.hub._take_truncation(truncate_key) if truncate_key and not head else None
        length = len(body) if cut is None or cut[1] else min(cut[0], len(body))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header('Accept-Ranges', 'bytes')
        self.send_header('Content-Length', str(length))
        self.end_headers()
        if head:
            return
        if cut is not None:
            body = body[:cut[0]]
            self.close_connection = True
        self._entry[3] = len(body)
        self.wfile.write(body)


# ---- tiny Stable Diffusion base repos ----------------------------------------------------------------------------
def save_tiny_clip(folder: str | Path, hidden_size: int = 32, seed: int = 0) -> tuple[Path, Path]:
    """Save a tiny random CLIP text encoder and tokenizer as `folder/text_encoder` and `folder/tokenizer`."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    vocab = {'<|startoftext|>': 0, '<|endoftext|>': 1}
    for ch in 'abcdefghijklmnopqrstuvwxyz!':
        vocab[ch], vocab[f'{ch}</w>'] = len(vocab), len(vocab) + 1
    merges = ['c a', 'ca t</w>', 'd o', 'do g</w>']
    vocab.update({'ca': len(vocab), 'cat</w>': len(vocab) + 1, 'do': len(vocab) + 2, 'dog</w>': len(vocab) + 3})
    # The files of the real SD repos (no tokenizer.json): transformers builds the fast tokenizer from them.
    tok_dir = folder / 'tokenizer'
    tok_dir.mkdir(parents=True, exist_ok=True)
    (tok_dir / 'vocab.json').write_text(json.dumps(vocab))
    (tok_dir / 'merges.txt').write_text('#version: 0.2\n' + '\n'.join(merges) + '\n')
    special = {'bos_token': '<|startoftext|>', 'eos_token': '<|endoftext|>', 'pad_token': '<|endoftext|>',
               'unk_token': '<|endoftext|>'}
    (tok_dir / 'special_tokens_map.json').write_text(json.dumps(special))
    (tok_dir / 'tokenizer_config.json').write_text(json.dumps(
        {**special, 'model_max_length': 77, 'do_lower_case': True, 'tokenizer_class': 'CLIPTokenizer'}))

    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                            projection_dim=hidden_size, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(seed)
    CLIPTextModel(config).eval().save_pretrained(folder / 'text_encoder')
    return folder / 'text_encoder', tok_dir


def publish_base_repo(hub: FakeHub, repo_id: str, vae_state_dict: dict, cross_attention_dim: int = 32,
                      vae_config: dict | None = None, revision: str = 'main') -> None:
    """Publish a tiny Stable-Diffusion-layout base repo: text_encoder/, tokenizer/ and vae/ weights (and config)."""
    import tempfile

    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        save_tiny_clip(tmp, hidden_size=cross_attention_dim)
        vae_dir = Path(tmp) / 'vae'
        vae_dir.mkdir()
        weights = {k: v.contiguous() for k, v in vae_state_dict.items()}
        save_file(weights, vae_dir / 'diffusion_pytorch_model.safetensors')
        if vae_config is not None:
            (vae_dir / 'config.json').write_text(json.dumps({'_class_name': 'AutoencoderKL', **vae_config}))
        (Path(tmp) / 'model_index.json').write_text(json.dumps({'_class_name': 'StableDiffusionPipeline'}))
        hub.add_folder(repo_id, tmp, revision=revision)
