"""The web view of a running `lockgate up`: Mesh, Rollout and History pages, and the Git webhook receiver.

Read-only by construction: every route answers GET only (anything else is 405), except `POST /hooks/git`,
which exists only with a webhook secret and does one thing: make the source fetch now. Static files are
read once at start from `static/` into memory and served by name from that list, so no request path ever
reaches the file system. Every response carries `Content-Security-Policy: default-src 'self'` and
`X-Content-Type-Options: nosniff`; bound to loopback (the default), requests must name a loopback host
(a page elsewhere cannot rebind its name to 127.0.0.1 and read the view).

The page updates over server-sent events (`GET /events`): the reconciler calls `on_status` each time it
writes status (its debounced writer), and each connected page gets the newest status at once, never a
backlog. Nothing here blocks the event loop: Git reads go through the reconciler's Git worker (the
`history` callable the composition root hands in), the decisions file is read on a thread, Prometheus is
asked with aiohttp and a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import socket
import threading
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import ClientSession, ClientTimeout, web

from reconciler.loop import Reconciler
from reconciler.rollout.commands import DECISIONS_FILE, ROLLOUTS_DIR
from reconciler.web.hooks import MAX_BODY, verify
from reconciler.web.traffic import traffic

log = logging.getLogger("lockgate.web")

STATIC = Path(__file__).resolve().parent / "static"
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png", ".txt": "text/plain"}
HOOK_PATH = "/hooks/git"
MAX_CLIENTS = 32
"""Open event streams at once; more get 503 (each holds a connection and a little memory)."""
KEEPALIVE_S = 15.0
"""A comment on an idle event stream this often, so proxies and browsers keep it open."""
DECISIONS_KEPT = 2000
"""Decisions held in memory for the timeline (the file itself only grows)."""
HISTORY_MAX = 500

History = Callable[[int], Awaitable[list[dict[str, Any]]]]
"""`lockgate history --json`'s events, newest first, at most this many: the composition root's reader."""

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
}


class WebError(Exception):
    """The view cannot listen where it was asked to (the address is taken, or not this machine's)."""


def static_files(root: Path = STATIC) -> dict[str, tuple[bytes, str]]:
    """name -> (content, content type) for every regular file directly in `root` (no links, no folders)."""
    out = {}
    for path in sorted(root.iterdir()):
        if path.is_symlink() or not path.is_file() or path.suffix not in _TYPES:
            continue
        out[path.name] = (path.read_bytes(), _TYPES[path.suffix])
    return out


def parse_listen(text: str) -> tuple[str, int] | None:
    """`host:port` (`[::1]:0` for IPv6; port 0 = any free port) -> (host, port); "off" -> None."""
    if text.strip().lower() == "off":
        return None
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{text!r}: give host:port (e.g. 127.0.0.1:0, [::1]:8080) or off")
    return host.strip("[]"), int(port)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class DecisionTail:
    """The rollout decisions file, read incrementally (only what was appended since the last read)."""

    path: Path
    kept: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=DECISIONS_KEPT))
    _offset: int = 0
    _partial: bytes = b""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def read_new(self) -> bool:
        """Blocking (a thread; two at once read one after the other): True if any decision was added."""
        with self._lock:
            return self._read_new()

    def _read_new(self) -> bool:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return False
        if size < self._offset:  # replaced or truncated: start over
            self._offset, self._partial = 0, b""
            self.kept.clear()
        if size == self._offset:
            return False
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read(size - self._offset)
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        added = False
        for line in lines:
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict):
                    self.kept.append(entry)
                    added = True
        return added


def timeline(status: dict[str, Any], decisions: deque[dict[str, Any]] | list[dict[str, Any]], *,
             recent: int = 30) -> list[dict[str, Any]]:
    """The decisions the page shows: every one of each rollout's current run (its timeline), and the
    last `recent` others, oldest first."""
    runs = {(f"{r['namespace']}/{r['name']}", r.get("canaryRevision")) for r in status.get("rollouts", [])
            if r.get("canaryRevision")}
    items = list(decisions)
    current = [i for i, d in enumerate(items) if (d.get("rollout"), d.get("canaryRevision")) in runs]
    others = [i for i in range(len(items)) if (items[i].get("rollout"), items[i].get("canaryRevision")) not in runs]
    keep = sorted(set(current[-500:]) | set(others[-recent:]))
    return [items[i] for i in keep]


class WebView:
    """The aiohttp application around one reconciler; `start` binds it, `close` ends every stream."""

    def __init__(self, rec: Reconciler, *, history: History | None = None, webhook_secret: bytes | None = None,
                 static: dict[str, tuple[bytes, str]] | None = None) -> None:
        self.rec = rec
        self.history = history
        self.webhook_secret = webhook_secret
        self.static = static if static is not None else static_files()
        self.decisions = DecisionTail(rec.config.state_dir / ROLLOUTS_DIR / DECISIONS_FILE)
        self.hooks = {"accepted": 0, "rejected": 0}
        self._payload = b""
        self._version = 0
        self._status: dict[str, Any] | None = None
        self._clients: set[asyncio.Event] = set()
        self._closing = asyncio.Event()
        self._refreshing: asyncio.Task[None] | None = None
        self._again = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._runner: web.AppRunner | None = None
        self._session: ClientSession | None = None
        self._loopback = True
        self.url: str | None = None
        self.app = self._make_app()

    # --- the application ----------------------------------------------------------------------------

    def _make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard], client_max_size=MAX_BODY)
        app.router.add_get("/", self._index, allow_head=False)
        app.router.add_get("/static/{name}", self._static, allow_head=False)
        app.router.add_get("/api/status", self._api_status, allow_head=False)
        app.router.add_get("/api/history", self._api_history, allow_head=False)
        app.router.add_get("/api/traffic", self._api_traffic, allow_head=False)
        app.router.add_get("/api/timeline", self._api_timeline, allow_head=False)
        app.router.add_get("/events", self._events, allow_head=False)
        app.router.add_post(HOOK_PATH, self._hook)
        app.on_response_prepare.append(self._headers)
        app.on_shutdown.append(self._on_shutdown)
        return app

    @web.middleware
    async def _guard(self, request: web.Request,
                     handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        """GET only (and POST to the hook); on loopback, only requests that name a loopback host."""
        if request.path == HOOK_PATH:
            if request.method != "POST":
                raise web.HTTPMethodNotAllowed(request.method, ["POST"])
        elif request.method != "GET":
            raise web.HTTPMethodNotAllowed(request.method, ["GET"])
        elif self._loopback and not _is_loopback((request.url.host or "").strip("[]")):
            raise web.HTTPMisdirectedRequest(text="this view answers only to a loopback host name\n")
        return await handler(request)

    async def _headers(self, request: web.Request, response: web.StreamResponse) -> None:
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        if request.path.startswith(("/api/", "/events", HOOK_PATH)):
            response.headers.setdefault("Cache-Control", "no-store")

    async def _index(self, request: web.Request) -> web.Response:
        return self._file("index.html")

    async def _static(self, request: web.Request) -> web.Response:
        return self._file(request.match_info["name"])

    def _file(self, name: str) -> web.Response:
        found = self.static.get(name)  # a name from the list read at start: never a path on disk
        if found is None:
            raise web.HTTPNotFound()
        body, ctype = found
        return web.Response(body=body, headers={"Content-Type": ctype, "Cache-Control": "no-cache"})

    # --- JSON: the same contracts as the CLI's --json ------------------------------------------------

    def status(self) -> dict[str, Any]:
        """`lockgate status --json`, live (`running` is true: this is the running lockgate)."""
        status = self.rec.status()
        status["lockgate"]["running"] = True
        return status

    async def _api_status(self, request: web.Request) -> web.Response:
        return _json(self.status())

    async def _api_history(self, request: web.Request) -> web.Response:
        if self.history is None:
            raise web.HTTPNotFound(text="no history here\n")
        try:
            limit = max(1, min(HISTORY_MAX, int(request.query.get("limit", "50"))))
        except ValueError:
            raise web.HTTPBadRequest(text="limit must be a number\n") from None
        try:
            events = await self.history(limit)
        except Exception as exc:  # a Git error: the page says so, the view goes on
            log.warning("reading history failed: %s", exc)
            return _json({"error": str(exc)}, status=503)
        return _json(events)

    async def _api_timeline(self, request: web.Request) -> web.Response:
        """The decisions the Rollout page draws (each rollout's current run and the latest others)."""
        await asyncio.to_thread(self.decisions.read_new)
        return _json(timeline(self.rec.status(), self.decisions.kept))

    async def _api_traffic(self, request: web.Request) -> web.Response:
        """Requests per second per edge and per service version, from each cluster's Prometheus."""
        urls = {c["name"]: c["prometheus"]["url"] for c in self.rec.status()["clusters"]
                if (c.get("prometheus") or {}).get("url")}
        if self._session is None:
            self._session = ClientSession(timeout=ClientTimeout(total=2.0), trust_env=False)
        return _json(await traffic(self._session, urls))

    # --- server-sent events -----------------------------------------------------------------------------

    def on_status(self, status: dict[str, Any]) -> None:
        """The reconciler wrote status: rebuild the event (decisions read on a thread) and wake every page."""
        self._status = status
        if not self._clients:
            return
        if self._refreshing is not None and not self._refreshing.done():
            self._again = True
            return
        self._refreshing = asyncio.get_running_loop().create_task(self._refresh(), name="web view refresh")

    async def _refresh(self) -> None:
        while True:
            self._again = False
            try:
                await asyncio.to_thread(self.decisions.read_new)
            except OSError as exc:
                log.warning("reading %s failed: %s", self.decisions.path, exc)
            status = self._status if self._status is not None else self.status()
            status = {**status, "lockgate": {**status["lockgate"], "running": True}}
            self._payload = _event("status", {"status": status,
                                              "decisions": timeline(status, self.decisions.kept)})
            self._version += 1
            for wake in self._clients:
                wake.set()
            if not self._again:
                return

    async def _watch_rollouts(self) -> None:
        """A decision that moves no weight (a hold) makes no status write: while a page is open, ask for one
        when the controller's records change (in memory, every half second), so the page shows every hold."""
        seen: tuple[Any, ...] = ()
        while True:
            await asyncio.sleep(0.5)
            stamp = tuple(sorted((k, r.get("updatedAt")) for k, r in self.rec.rollouts.records.items()))
            if stamp != seen:
                seen = stamp
                if self._clients:
                    self.rec.write_status()

    async def _events(self, request: web.Request) -> web.StreamResponse:
        if len(self._clients) >= MAX_CLIENTS:
            raise web.HTTPServiceUnavailable(text="too many open event streams\n")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        wake = asyncio.Event()
        self._clients.add(wake)
        sent = -1
        try:
            if self._version == 0 or self._status is None:
                self.on_status(self.status())  # the first page of a quiet mesh gets a status too
            await resp.write(b"retry: 2000\n\n")
            while not self._closing.is_set():
                wake.clear()  # before looking, so a push meanwhile wakes the next wait
                if self._payload and self._version != sent:
                    sent = self._version
                    await resp.write(self._payload)
                    continue
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(KEEPALIVE_S):
                        await _first(wake.wait(), self._closing.wait())
                if not wake.is_set() and not self._closing.is_set():
                    await resp.write(b": keep-alive\n\n")
        except (ConnectionResetError, ConnectionError):
            pass
        finally:
            self._clients.discard(wake)
        return resp

    # --- the Git webhook ----------------------------------------------------------------------------

    async def _hook(self, request: web.Request) -> web.Response:
        if self.webhook_secret is None:
            raise web.HTTPNotFound(text="webhooks are off: start lockgate up with --webhook-secret FILE\n")
        if request.content_length is not None and request.content_length > MAX_BODY:
            raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY, actual_size=request.content_length)
        chunks, size = [], 0
        while chunk := await request.content.read(64 * 1024):
            size += len(chunk)
            if size > MAX_BODY:
                raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY, actual_size=size)
            chunks.append(chunk)
        verdict = verify(request.headers.items(), b"".join(chunks), self.webhook_secret)
        peer = request.remote or "?"
        if not verdict.ok:
            self.hooks["rejected"] += 1
            log.warning("webhook from %s refused: %s", peer, verdict.reason)
            return _json({"error": "unauthorized"}, status=401)
        self.hooks["accepted"] += 1
        event = request.headers.get("X-GitHub-Event") or request.headers.get("X-Gitlab-Event") or "push"
        log.info("webhook (%s, %s) from %s: fetching now", verdict.provider, event, peer)
        self.rec.wake()
        return _json({"accepted": True, "provider": verdict.provider, "fetching": True}, status=202)

    # --- lifecycle ----------------------------------------------------------------------------------

    async def start(self, host: str, port: int) -> str:
        """Listen on host:port (0: any free port); the view's URL, also set as the reconciler's dashboard."""
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                                 flags=socket.AI_PASSIVE)
            family, _, _, _, addr = infos[0]
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            raise WebError(f"cannot listen on {host}:{port}: {exc}") from None
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(128)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise WebError(f"cannot listen on {host}:{port}: {exc}") from None
        bound_host, bound_port = sock.getsockname()[:2]
        self._loopback = _is_loopback(bound_host)
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        self._runner = runner
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        self.url = f"http://{shown}:{bound_port}/"
        self.rec.dashboard = self.url
        self.rec.status_listeners.append(self.on_status)
        self._spawn(self._watch_rollouts(), "web view: rollout records")
        return self.url

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _on_shutdown(self, app: web.Application) -> None:
        self._closing.set()

    async def close(self) -> None:
        self._closing.set()
        with contextlib.suppress(ValueError):
            self.rec.status_listeners.remove(self.on_status)
        for task in list(self._tasks) + ([self._refreshing] if self._refreshing else []):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None


def _json(value: Any, *, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(value), status=status, content_type="application/json")


def _event(kind: str, value: Any) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(value, separators=(',', ':'))}\n\n".encode()


async def _first(*aws: Awaitable[Any]) -> None:
    """Until the first of `aws` is done; the others are cancelled."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()


def started_line(url: str, *, webhooks: bool) -> str:
    """What `lockgate up` prints once the view listens."""
    hook = f"; webhooks: POST {url.rstrip('/')}{HOOK_PATH}" if webhooks else ""
    return f"lockgate: web view {url}{hook}"


__all__ = ["HOOK_PATH", "DecisionTail", "WebError", "WebView", "parse_listen", "started_line", "static_files",
           "timeline"]
