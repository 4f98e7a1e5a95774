"""The local web server of ``diffusereg watch``: the page, a small JSON API and a server-sent-event
stream of the :class:`~diffusereg.watch.session.WatchSession`; Python's standard library only.

| method | path | what it does |
|---|---|---|
| GET | `/` | the page (`page.html`, `page.js`, `page.css`) |
| GET | `/events` | server-sent events: the session snapshot after every change |
| GET | `/download` | the last registration's outputs as a zip |
| PUT | `/api/upload?name=FILE` | body: an image file's bytes; answers `{"upload": number}` |
| POST | `/api/load` | `{"phantom": true}`, or upload numbers `{"fixed": n, "moving": n}` (+ labels) |
| POST | `/api/register` | `{"steps": K, "seed": S, "samples": N, "guidance": [SPEC]}` |
| POST | `/api/stop` | stop after the current step, keeping its result |
| POST | `/api/guidance` | `{"guidance": [SPEC]}`: these guides from the next step on |
| POST | `/api/slice` | `{"slice": k}`: the slice the pictures show |

`SPEC` is a `--guidance` string (`smoothness=0.05`, `organ=3:1`). Errors answer
`{"error": message}` with status 400 (bad request), 403 (refused) or 404.

Nothing the page needs comes from elsewhere: the three files are in the package, pictures are
data URLs, and a Content-Security-Policy forbids the browser any other origin. Bound to a
loopback address (the default), the server also refuses requests whose ``Host`` is not a
loopback name (DNS rebinding), and any state-changing request from another origin.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from diffusereg.guidance import GuidanceSpec
from diffusereg.registration import RegistrationError
from diffusereg.watch.session import WatchSession

__all__ = ["MAX_UPLOAD_BYTES", "WatchServer", "is_loopback"]

MAX_UPLOAD_BYTES = 2 << 30
"""Largest accepted upload (2 GiB)."""

MAX_JSON_BYTES = 1 << 20
"""Largest accepted JSON request body (1 MiB)."""

KEEP_ALIVE_SECONDS = 15.0
"""How often an idle event stream sends a comment, so a vanished browser is noticed."""

_STATIC = {"/": ("page.html", "text/html"), "/page.js": ("page.js", "text/javascript"),
           "/page.css": ("page.css", "text/css")}
_CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                            "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'")
_LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (``127.0.0.0/8``, ``::1``)."""
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class WatchServer(ThreadingHTTPServer):
    """Serve a :class:`WatchSession` on ``host:port`` (port 0: a free one), each request in a thread.

    :meth:`serve_forever` answers requests until :meth:`shutdown` (from another thread) or an
    exception such as ``KeyboardInterrupt``; then :meth:`close` closes the session and the socket.
    """

    daemon_threads = True

    def __init__(self, session: WatchSession, host: str = "127.0.0.1", port: int = 7860) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.session = session
        self.loopback = is_loopback(host)
        super().__init__((host.strip("[]"), port), _Handler)

    @property
    def url(self) -> str:
        """The page's address, e.g. ``http://127.0.0.1:7860/``."""
        host, port = self.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"

    def close(self) -> None:
        """Close the session (stopping a registration, ending the event streams) and the socket."""
        self.session.close()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    """One request to a :class:`WatchServer`."""

    server: WatchServer
    server_version = "diffusereg-watch"

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Requests are not logged (the event stream would flood the console); errors still are."""

    # ------------------------------------------------------------------ answers
    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", _CONTENT_SECURITY_POLICY)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _send_json(self, data: Any, status: int = HTTPStatus.OK) -> None:
        self._send(status, json.dumps(data).encode(), "application/json")

    def _refuse(self, status: int, message: str) -> None:
        self._send_json({"error": message}, status)

    def _allowed(self) -> bool:
        """Refuse (and answer) requests that another site could have made the browser send."""
        host = urlsplit(f"//{self.headers.get('Host', '')}").hostname or ""
        if self.server.loopback and not is_loopback(host):
            self._refuse(HTTPStatus.FORBIDDEN, f"host {host!r} refused: this server answers to 127.0.0.1 only")
            return False
        origin = self.headers.get("Origin")
        if self.command != "GET" and origin is not None and origin != f"http://{self.headers.get('Host')}":
            self._refuse(HTTPStatus.FORBIDDEN, f"requests from {origin} are refused")
            return False
        return True

    # ------------------------------------------------------------------ methods
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if not self._allowed():
            return
        path = urlsplit(self.path).path
        if path in _STATIC:
            name, content_type = _STATIC[path]
            body = resources.files("diffusereg.watch").joinpath(name).read_bytes()
            self._send(HTTPStatus.OK, body, f"{content_type}; charset=utf-8")
        elif path == "/events":
            self._stream_events()
        elif path == "/download":
            try:
                archive = self.server.session.download()
            except RegistrationError as error:
                self._refuse(HTTPStatus.BAD_REQUEST, str(error))
                return
            self._send(HTTPStatus.OK, archive, "application/zip",
                       {"Content-Disposition": 'attachment; filename="diffusereg-registration.zip"'})
        else:
            self._refuse(HTTPStatus.NOT_FOUND, f"no page {path}")

    def do_PUT(self) -> None:  # noqa: N802
        if not self._allowed():
            return
        url = urlsplit(self.path)
        if url.path != "/api/upload":
            self._refuse(HTTPStatus.NOT_FOUND, f"no upload at {url.path}")
            return
        length = int(self.headers.get("Content-Length") or -1)
        if not 0 < length <= MAX_UPLOAD_BYTES:
            self._refuse(HTTPStatus.BAD_REQUEST, f"an upload needs a Content-Length of 1 .. {MAX_UPLOAD_BYTES} bytes")
            return
        name = parse_qs(url.query).get("name", [""])[0]
        try:
            number = self.server.session.store_upload(name, self.rfile.read(length))
        except RegistrationError as error:
            self._refuse(HTTPStatus.BAD_REQUEST, str(error))
            return
        self._send_json({"upload": number})

    def do_POST(self) -> None:  # noqa: N802
        if not self._allowed():
            return
        if self.headers.get_content_type() != "application/json":
            self._refuse(HTTPStatus.BAD_REQUEST, "send JSON (Content-Type: application/json)")
            return
        action = _ACTIONS.get(urlsplit(self.path).path)
        if action is None:
            self._refuse(HTTPStatus.NOT_FOUND, f"no action {self.path}")
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_JSON_BYTES:
            self._refuse(HTTPStatus.BAD_REQUEST, f"a request body has at most {MAX_JSON_BYTES} bytes")
            return
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
            action(self.server.session, body)
        except KeyError as error:
            self._refuse(HTTPStatus.BAD_REQUEST, f"the request lacks {error}")
            return
        except (ValueError, TypeError) as error:  # bad JSON or values; image and registration errors
            self._refuse(HTTPStatus.BAD_REQUEST, " ".join(str(error).split()))
            return
        self._send_json({"ok": True})

    def _stream_events(self) -> None:
        """Send the session snapshot now and after every change, until the browser goes away."""
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        session, sent = self.server.session, -1
        try:
            while not session.closed:
                version = session.wait(sent, KEEP_ALIVE_SECONDS)
                if version == sent:
                    self.wfile.write(b": keep-alive\n\n")
                else:
                    snapshot = session.snapshot()
                    sent = snapshot["version"]
                    self.wfile.write(b"data: " + json.dumps(snapshot).encode() + b"\n\n")
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            return


def _guidance(body: dict[str, Any]) -> list[GuidanceSpec]:
    return [GuidanceSpec.parse(text) for text in body.get("guidance", [])]


def _load(session: WatchSession, body: dict[str, Any]) -> None:
    if body.get("phantom"):
        session.load_phantom()
    else:
        session.load_uploads(body["fixed"], body["moving"], body.get("fixed_labels"), body.get("moving_labels"))


def _register(session: WatchSession, body: dict[str, Any]) -> None:
    session.steer(_guidance(body))
    session.start(**{name: int(body[name]) for name in ("steps", "seed", "samples") if body.get(name) is not None})


_ACTIONS = {
    "/api/load": _load,
    "/api/register": _register,
    "/api/stop": lambda session, body: session.stop(),
    "/api/guidance": lambda session, body: session.steer(_guidance(body)),
    "/api/slice": lambda session, body: session.view(int(body["slice"])),
}
