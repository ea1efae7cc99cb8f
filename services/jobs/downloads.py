"""Downloads of job artifacts from a local object store, served by the jobs service itself.

On S3 a download URL is a presigned GET of the bucket. A local folder has no such thing, so the jobs
service signs its own: `http(s)://<host>:<port>/v1/artifacts/<token>`, where the token names the object
key and when it expires, MACed with HMAC-SHA256 under a server key (TUNEFORGE_DOWNLOAD_KEY, else one
generated once in `<data_dir>/secrets/download.key`; several comma-separated keys rotate: the first
signs, any verifies). A token that does not verify, was edited, or has expired is refused with 403 and
one short line; nothing else is served: only keys under `jobs/`, only files inside the store's root
(symlinks resolved), and no filesystem path ever appears in a URL or an answer. `Range: bytes=N-` works,
so a client resumes an interrupted download.

The server is the standard library's threaded HTTP server on its own threads (one per connection, with a
socket timeout), so a slow download never holds the gRPC event loop; with the gRPC server's TLS settings
it serves HTTPS with the same certificate.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import quote

from services.kit import keyfiles
from services.kit.runtime import ListenError
from tuneforge_core.errors import InvalidArgument
from tuneforge_core.storage import LocalObjectStore

log = logging.getLogger(__name__)

KEY_FILE = "download.key"
PATH_PREFIX = "/v1/artifacts/"
# Only job outputs are ever served.
SERVED_PREFIX = "jobs/"
MIN_KEY_BYTES = 16
# Tokens we make are far shorter; longer ones are refused before any decoding.
MAX_TOKEN_CHARS = 2048
_MAC_CONTEXT = b"tuneforge.download.v1\x00"
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
CHUNK_BYTES = 1024 * 1024


class TokenRefused(Exception):
    """A download token that must not be honoured; the message is safe to show the caller."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class DownloadSigner:
    """Makes and checks download tokens: `<payload>.<mac>`, both unpadded base64url; the payload is
    {"k": object key, "x": expiry in Unix seconds} as JSON."""

    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys or any(len(k) < MIN_KEY_BYTES for k in keys):
            raise ValueError(f"TUNEFORGE_DOWNLOAD_KEY: each key must be at least {MIN_KEY_BYTES} characters")
        self.keys = list(keys)

    @classmethod
    def from_setting(cls, setting: str, data_dir: Any) -> DownloadSigner:
        """The keys of the setting (comma-separated), else the data dir's generated key."""
        if not setting.strip():
            setting = keyfiles.load_or_create_key(keyfiles.secret_file(data_dir, KEY_FILE),
                                                  lambda: secrets.token_urlsafe(32).encode())
        return cls([k.strip().encode() for k in setting.split(",") if k.strip()])

    @staticmethod
    def _mac(key: bytes, payload: str) -> bytes:
        return hmac.new(key, _MAC_CONTEXT + payload.encode(), hashlib.sha256).digest()

    def sign(self, object_key: str, expires_at: int) -> str:
        payload = _b64(json.dumps({"k": object_key, "x": int(expires_at)}, separators=(",", ":")).encode())
        return f"{payload}.{_b64(self._mac(self.keys[0], payload))}"

    def verify(self, token: str, now: float | None = None) -> str:
        """The object key the token names; TokenRefused when it is forged, edited or expired."""
        if len(token) > MAX_TOKEN_CHARS or token.count(".") != 1:
            raise TokenRefused("invalid download link")
        payload, mac = token.split(".")
        try:
            given = _unb64(mac)
        except (binascii.Error, ValueError):
            raise TokenRefused("invalid download link") from None
        if not any(hmac.compare_digest(self._mac(k, payload), given) for k in self.keys):
            raise TokenRefused("invalid download link")
        try:
            claims = json.loads(_unb64(payload))
            key, expires_at = claims["k"], claims["x"]
        except (binascii.Error, ValueError, KeyError, TypeError):
            raise TokenRefused("invalid download link") from None
        if not isinstance(key, str) or not isinstance(expires_at, int):
            raise TokenRefused("invalid download link")
        if (time.time() if now is None else now) >= expires_at:
            raise TokenRefused("download link expired: list the job's artifacts again for a fresh one")
        return key


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """The inclusive byte range one `Range: bytes=...` header asks of a `size`-byte file; None when the
    header is not one we honour (the whole file is sent); ValueError when it cannot be satisfied."""
    match = _RANGE.match(header.strip())
    if match is None:  # several ranges, other units: answer with the whole file, as RFC 9110 allows
        return None
    first, last = match.groups()
    if not first:
        if not last:
            return None
        length = int(last)
        if length == 0:
            raise ValueError("empty suffix range")
        return max(0, size - length), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or (last and int(last) < start):
        raise ValueError("range not satisfiable")
    return start, end


def safe_filename(key: str) -> str:
    """The key's last part, fit for a Content-Disposition header."""
    name = PurePosixPath(key).name
    return re.sub(r'[^A-Za-z0-9._+-]', "_", name) or "download"


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "TuneForge"
    sys_version = ""
    timeout = 60  # a client that stops reading or sending is dropped

    def setup(self) -> None:
        super().setup()
        if isinstance(self.request, ssl.SSLSocket):
            self.request.do_handshake()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("download %s: " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        self._serve(body=True)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def _refuse(self, status: HTTPStatus, text: str, headers: dict[str, str] | None = None) -> None:
        data = (text + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _serve(self, body: bool) -> None:
        path = self.path.split("?", 1)[0]
        if not path.startswith(PATH_PREFIX):
            return self._refuse(HTTPStatus.NOT_FOUND, "not found")
        try:
            key = self.server.signer.verify(path[len(PATH_PREFIX):])
        except TokenRefused as exc:
            return self._refuse(HTTPStatus.FORBIDDEN, str(exc))
        try:
            if not key.startswith(SERVED_PREFIX):
                raise InvalidArgument("not a job output")
            file = self.server.store.local_path(key)
            handle = file.open("rb")
        except (InvalidArgument, OSError):
            return self._refuse(HTTPStatus.NOT_FOUND, "no such file: it may have been deleted")
        with handle:
            size = os.fstat(handle.fileno()).st_size
            try:
                header = self.headers.get("Range")
                wanted = parse_range(header, size) if header else None
            except ValueError:
                return self._refuse(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, "range not satisfiable",
                                    {"Content-Range": f"bytes */{size}"})
            start, end = wanted if wanted is not None else (0, size - 1)
            self.send_response(HTTPStatus.PARTIAL_CONTENT if wanted is not None else HTTPStatus.OK)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(max(0, end - start + 1)))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Cache-Control", "private, no-store")
            self.send_header("Content-Disposition", f'attachment; filename="{safe_filename(key)}"')
            if wanted is not None:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.end_headers()
            if not body:
                return None
            handle.seek(start)
            left = end - start + 1
            try:
                while left > 0:
                    block = handle.read(min(CHUNK_BYTES, left))
                    if not block:
                        break
                    self.wfile.write(block)
                    left -= len(block)
            except (BrokenPipeError, ConnectionResetError, TimeoutError, ssl.SSLError):
                self.close_connection = True
        return None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], store: LocalObjectStore, signer: DownloadSigner,
                 family: socket.AddressFamily) -> None:
        self.address_family = family
        self.store = store
        self.signer = signer
        super().__init__(address, _Handler)


class DownloadServer:
    """The HTTP(S) server of a local store's downloads, on threads of its own."""

    def __init__(self, store: LocalObjectStore, signer: DownloadSigner, host: str, port: int, *,
                 ssl_context: ssl.SSLContext | None = None, fallback_to_free_port: bool = False) -> None:
        self.store, self.signer, self.host = store, signer, host
        self.ssl_context = ssl_context
        bind_host = host.strip("[]")
        family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
        try:
            self._httpd = _Server((bind_host, port), store, signer, family)
        except OSError as exc:
            if not fallback_to_free_port or port == 0:
                raise ListenError(f"cannot serve downloads on {host}:{port}: {exc.strerror or exc} "
                                  "(TUNEFORGE_DOWNLOAD_PORT)") from None
            log.warning("download port %s:%d is taken (%s); serving downloads on a free port instead "
                        "(set TUNEFORGE_DOWNLOAD_PORT to choose one)", host, port, exc.strerror or exc)
            self._httpd = _Server((bind_host, 0), store, signer, family)
        if ssl_context is not None:
            self._httpd.socket = ssl_context.wrap_socket(self._httpd.socket, server_side=True,
                                                         do_handshake_on_connect=False)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_context is not None else "http"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="artifact-downloads", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(5)
        self._httpd.server_close()


def server_ssl_context(cert_file: str, key_file: str) -> ssl.SSLContext | None:
    """The gRPC server's certificate for the download server too, or None without TLS."""
    if not (cert_file and key_file):
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    return context


def advertised_host(host: str) -> str:
    """The host to put in URLs for a server bound to `host`: a wildcard address is no place to connect
    to, so the machine's name stands in (set TUNEFORGE_DOWNLOAD_BASE_URL where that is wrong)."""
    bare = host.strip("[]")
    if bare in ("", "0.0.0.0", "::"):
        return socket.gethostname()
    return f"[{bare}]" if ":" in bare else bare


def download_url(base_url: str, token: str) -> str:
    return f"{base_url.rstrip('/')}{PATH_PREFIX}{quote(token, safe='.-_')}"
