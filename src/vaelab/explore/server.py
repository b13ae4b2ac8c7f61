"""The explorer's HTTP server: one page and a small JSON API, nothing else.

    GET  /             the page (data inlined)
    GET  /api/info     the same data as JSON
    POST /api/decode   {"z": [[D numbers], ...]}  -> {"images": [base64 of 784 uint8, ...]}
    POST /api/encode   {"image": [784 numbers in [0, 1]]} -> mu, std, point, ellipse, reconstruction

For a conditional model both POSTs also carry "class": the index of the class to decode as (and
encode given); it is required there and refused for an unconditional model, so that nothing
asked for is silently ignored.

Any other path is a 404 (no files are served from disk, so there is nothing to list or traverse);
a malformed request is a 4xx whose JSON body is {"error": "one line"}. Bound to a loopback
address, it also refuses requests whose Host header names another host, so a web page elsewhere
cannot reach it through DNS rebinding.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import math
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import torch

from ..errors import ConfigError, VaelabError
from ..reading import _json_name, parse_json
from .page import render_page
from .space import LatentSpace, b64

MAX_BODY = 4 * 1024 * 1024  # an image is ~10 kB of JSON; MAX_DECODE codes of 128 dims ~2.5 MB
MAX_DECODE = 1024  # codes per decode request: a manifold grid of 32 x 32
MAX_ABS_Z = 1e4  # codes lie within a few units of 0; farther is a client bug, and float32 overflows at 3e38


class RequestError(VaelabError):
    """A request the API refuses: answered with `status` and the message as one line."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = status


def _numbers(values, n: int, where: str) -> list[float]:
    if not isinstance(values, list) or len(values) != n:
        got = f"a list of {len(values)}" if isinstance(values, list) else _json_name(type(values))
        raise RequestError(f"{where}: expected a list of {n} numbers, got {got}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise RequestError(f"{where}: {json.dumps(v)[:40]} is not a number")
        if not math.isfinite(v):  # parse_json refuses NaN and Infinity; this is 1e999 and the like
            raise RequestError(f"{where}: non-finite number")
    return values


def parse_decode(body: dict, latent_dim: int) -> torch.Tensor:
    """{"z": [[D numbers], ...]} -> (B, D) float64."""
    rows = body.get("z")
    if not isinstance(rows, list) or not rows:
        raise RequestError('decode: expected {"z": [[...], ...]}, a list of latent points')
    if len(rows) > MAX_DECODE:
        raise RequestError(f"decode: at most {MAX_DECODE} points per request, got {len(rows)}")
    z = torch.tensor([_numbers(r, latent_dim, f"decode: z[{i}]") for i, r in enumerate(rows)], dtype=torch.float64)
    if float(z.abs().max()) > MAX_ABS_Z:
        raise RequestError(f"decode: a coordinate beyond +-{MAX_ABS_Z:g}, far outside the latent space")
    return z


def parse_class(body: dict, space: LatentSpace, where: str) -> int | None:
    """The "class" field: an index into the classes for a conditional model, absent otherwise."""
    if not space.conditional:
        if "class" in body:
            raise RequestError(f'{where}: "class" given, but {space.model.name} is unconditional: it takes no class')
        return None
    n = len(space.classes)
    if "class" not in body:
        raise RequestError(f'{where}: {space.model.name} is conditional: pass "class", an index in 0..{n - 1}')
    label = body["class"]
    if isinstance(label, bool) or not isinstance(label, int):
        raise RequestError(f'{where}: "class" must be an index in 0..{n - 1}, got {json.dumps(label)[:40]}')
    if not 0 <= label < n:
        raise RequestError(f'{where}: "class" {label} out of range: {space.dataset} has classes 0..{n - 1}')
    return label


def parse_encode(body: dict) -> torch.Tensor:
    """{"image": [784 numbers in [0, 1]]} -> (784,) float32."""
    x = torch.tensor(_numbers(body.get("image"), 784, "encode: image"), dtype=torch.float32)
    if float(x.min()) < 0 or float(x.max()) > 1:
        raise RequestError("encode: pixel values lie in [0, 1]")
    return x


class ExploreServer(ThreadingHTTPServer):
    """One daemon thread per connection, each kept so that `server_close` ends and waits for
    them: a handler thread still running when the interpreter exits can drop the last
    reference to the model, and a tensor freed during finalization aborts the process
    ("terminate called without an active exception") instead of exiting 0 after Ctrl-C."""

    daemon_threads = True  # a connection left open must not hold up Ctrl-C

    def __init__(self, space: LatentSpace, host: str, port: int):
        self.space = space
        self._connections: list[tuple[threading.Thread, socket.socket]] = []
        self._connections_lock = threading.Lock()
        self.page = render_page(space.page_data()).encode("utf-8")
        self.info = json.dumps(space.page_data()).encode("utf-8")
        if ":" in host:  # an IPv6 address such as ::1 (the base class listens on IPv4 only)
            self.address_family = socket.AF_INET6
        try:
            super().__init__((host, port), Handler)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ConfigError(f"{host}:{port}: already in use; pass another --port (0: any free one)") from None
            raise ConfigError(f"{host}:{port}: cannot listen ({e.strerror or e})") from None
        self.port = self.server_address[1]
        self.allowed_hosts = _allowed_hosts(host, self.port)

    def process_request(self, request, client_address):
        thread = threading.Thread(target=self.process_request_thread, args=(request, client_address),
                                  daemon=self.daemon_threads)
        with self._connections_lock:
            self._connections = [(t, c) for t, c in self._connections if t.is_alive()]
            self._connections.append((thread, request))
        thread.start()

    def server_close(self):
        super().server_close()
        with self._connections_lock:
            connections, self._connections = self._connections, []
        grace = time.monotonic() + 2  # answers being sent are finished
        for thread, _ in connections:
            thread.join(timeout=max(0.0, grace - time.monotonic()))
        for thread, connection in connections:
            if thread.is_alive():
                try:
                    connection.shutdown(socket.SHUT_RDWR)  # a connection left open ends at once
                except OSError:
                    pass  # closed meanwhile by its handler
        for thread, _ in connections:
            thread.join(timeout=30)

    def handle_error(self, request, client_address):
        # A client that went away (a closed tab, a fetch the page cancelled) is no error; anything
        # else has been answered as a 500 by the handler already.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)

    @property
    def url(self) -> str:
        host = self.server_address[0]
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}/"


def _allowed_hosts(host: str, port: int) -> set[str] | None:
    """Host headers accepted when bound to loopback (None: any, the user chose to expose it)."""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        return None
    names = {"127.0.0.1", "localhost", "[::1]", f"[{host}]" if ":" in host else host}
    return names | {f"{name}:{port}" for name in names}  # a client may leave the port out


class Handler(BaseHTTPRequestHandler):
    server: ExploreServer
    server_version = "vaelab-explore"
    sys_version = ""
    # A request line too garbled to name its version is answered with a status line all the same
    # (the base class would answer it as HTTP/0.9: the body alone).
    default_request_version = "HTTP/1.0"

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass  # a line per mouse move would bury the URL the command printed

    def send_error(self, code, message=None, explain=None):
        # The base class answers its own refusals (a garbled request line, a header too long) in
        # HTML; ours are one JSON line like every other error.
        self._json({"error": message or HTTPStatus(code).phrase}, code)

    def _json(self, obj, status=HTTPStatus.OK) -> None:
        self._send(json.dumps(obj).encode("utf-8"), "application/json", status)

    def _send(self, body: bytes, content_type: str, status=HTTPStatus.OK) -> None:
        self.send_response(status)
        self.send_header("Content-Type", f"{content_type}; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        # The page loads nothing from anywhere: its script and style are inline, images data: URLs.
        self.send_header("Content-Security-Policy", "default-src 'none'; script-src 'unsafe-inline'; "
                         "style-src 'unsafe-inline'; img-src data:; connect-src 'self'; base-uri 'none'; "
                         "form-action 'none'; frame-ancestors 'none'")
        if status >= 400:
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _answer(self, route) -> None:
        try:
            self._check_host()
            route()
        except RequestError as e:
            self._json({"error": str(e)}, e.status)
        except ConnectionError:  # the client went away mid-answer: no one to tell
            self.close_connection = True
        except Exception as e:  # a bug, not the client's fault: still one line, and the server lives on
            self._json({"error": f"internal error: {type(e).__name__}: {e}".splitlines()[0]},
                       HTTPStatus.INTERNAL_SERVER_ERROR)

    def _check_host(self) -> None:
        allowed = self.server.allowed_hosts
        host = self.headers.get("Host", "")
        if allowed is not None and host not in allowed:
            raise RequestError(f"Host {host[:60]!r} refused: this server answers only to "
                               f"127.0.0.1:{self.server.port}", HTTPStatus.FORBIDDEN)

    def _path(self) -> str:
        return urlsplit(self.path).path

    def _not_found(self) -> None:
        raise RequestError(f"{self._path()[:80]}: not found (this server has / and /api/info, "
                           f"/api/decode, /api/encode)", HTTPStatus.NOT_FOUND)

    def do_GET(self):
        self._answer(self._get)

    def _get(self) -> None:
        path = self._path()
        if path in ("/", "/index.html"):
            self._send(self.server.page, "text/html")
        elif path == "/api/info":
            self._send(self.server.info, "application/json")
        else:
            self._not_found()

    def do_POST(self):
        self._answer(self._post)

    def _post(self) -> None:
        path = self._path()
        if path not in ("/api/decode", "/api/encode"):
            self._not_found()
        body = self._body()
        space = self.server.space
        where = path.removeprefix("/api/")
        if path == "/api/decode":
            z = parse_decode(body, space.latent_dim)
            images = space.decode(z, parse_class(body, space, where))
            self._json({"images": [b64(row.tobytes()) for row in images]})
        else:
            image = parse_encode(body)
            self._json(space.encode(image, parse_class(body, space, where)))

    def _body(self) -> dict:
        # JSON only: a cross-site form or text/plain POST (which needs no CORS preflight) is refused
        # before any work, so another web page cannot make this server decode on its behalf.
        kind = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise RequestError(f"a POST body must be Content-Type: application/json, got {kind[:40] or 'none'!r}",
                               HTTPStatus.UNSUPPORTED_MEDIA_TYPE)
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError("a POST needs a Content-Length", HTTPStatus.LENGTH_REQUIRED)
        if not length.isdigit():
            raise RequestError(f"Content-Length {length[:20]!r} is not a number")
        if int(length) > MAX_BODY:
            raise RequestError(f"body of {length} bytes; at most {MAX_BODY}", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        body = parse_json(self.rfile.read(int(length)), "request body", error=RequestError, max_depth=4)
        if not isinstance(body, dict):
            raise RequestError("request body: expected a JSON object")
        return body

    def _refuse_method(self):
        self._answer(self._method_not_allowed)

    def _method_not_allowed(self) -> None:
        raise RequestError(f"{self.command} not allowed: GET the page, POST to the API",
                           HTTPStatus.METHOD_NOT_ALLOWED)

    do_HEAD = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse_method


def make_server(space: LatentSpace, host: str = "127.0.0.1", port: int = 0) -> ExploreServer:
    """A server for `space` listening on host:port (0: a free port); `serve_forever` runs it."""
    return ExploreServer(space, host, port)
