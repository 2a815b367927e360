"""Fixtures for one real part at a time: an in-process ADS server on a background event loop, tiny HTTP
backends, and Envoy subprocesses that are always stopped by PID, even when a test fails. Each Envoy's admin
listens on a Unix socket (as in the runtime); its stats listener is the only TCP port it opens itself."""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import json
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import pytest

from mesh.envoy import admin_address, admin_request, bootstrap, envoy_argv, wait_ready
from mesh.xds.cache import ProxyStatus, SnapshotCache
from mesh.xds.server import AdsServer, Authenticator
from mesh.xds.snapshot import Snapshot

LOOPBACK = "127.0.0.1"
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


class ControlPlane:
    """A SnapshotCache and AdsServer living on their own event loop thread, driven from the test thread."""

    def __init__(self, *, authenticator: Authenticator | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="ads-loop", daemon=True)
        self._thread.start()
        self.authenticator = authenticator
        self.cache = SnapshotCache()
        self.server = AdsServer(self.cache, host=LOOPBACK, authenticator=authenticator)
        self.port = self.run(self.server.start())

    def restart(self, *, down: float = 0.0) -> float:
        """Play a control-plane restart: stop the server, wait `down` seconds, serve a new, empty cache on
        the same port (as a restarted lockgate does). Returns the monotonic time the new one listened."""
        self.run(self.server.stop(0))
        time.sleep(down)
        self.cache = SnapshotCache()
        self.server = AdsServer(self.cache, host=LOOPBACK, port=self.port, authenticator=self.authenticator)
        self.run(self.server.start())
        return time.monotonic()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        async def _call() -> T:
            return fn()

        return self.run(_call())

    def set(self, node_id: str, snapshot: Snapshot) -> None:
        self.cache.set_threadsafe(node_id, snapshot).result(5)

    def status(self, node_id: str) -> ProxyStatus:
        return self.call(lambda: self.cache.status()[node_id])

    def wait_converged(self, node_id: str, snapshot: Snapshot, timeout: float = 10) -> bool:
        return self.run(self.cache.wait_converged(node_id, snapshot.version_all, timeout=timeout))

    def close(self) -> None:
        try:
            self.run(self.server.stop(0.1))
        finally:
            pending: concurrent.futures.Future[None] = asyncio.run_coroutine_threadsafe(
                _cancel_all(), self.loop
            )
            pending.result(5)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
            self.loop.close()


async def _cancel_all() -> None:
    me = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not me]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@pytest.fixture
def control_plane() -> Iterator[ControlPlane]:
    cp = ControlPlane()
    try:
        yield cp
    finally:
        cp.close()


class _NamedHandler(BaseHTTPRequestHandler):
    disable_nagle_algorithm = True  # otherwise ~40 ms per request behind Envoy (Nagle + delayed ACK)
    protocol_version = "HTTP/1.1"
    name = "?"

    def do_GET(self) -> None:
        body = self.name.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def backend() -> Iterator[Callable[[str], int]]:
    """Start HTTP servers on 127.0.0.1 that answer every GET with their name; returns the port."""
    servers: list[ThreadingHTTPServer] = []

    def start(name: str) -> int:
        handler = type(f"Handler_{name}", (_NamedHandler,), {"name": name})
        server = ThreadingHTTPServer((LOOPBACK, 0), handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return int(server.server_address[1])

    try:
        yield start
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


@dataclass
class EnvoyProcess:
    node_id: str
    admin_socket: Path
    stats_port: int
    """The read-only stats listener (`GET /stats/prometheus` only) on 127.0.0.1."""
    proc: subprocess.Popen[bytes]
    log_path: Path
    token: str | None = None
    """The xDS credential in its bootstrap, if it was given one."""

    def admin(self, path: str) -> str:
        """GET `path` from this Envoy's admin, through its Unix socket."""
        return admin_request(admin_address(self.admin_socket), path)[1].decode()

    def stats_get(self, path: str, method: str = "GET") -> tuple[int, bytes]:
        """A request to the stats listener over TCP, as Prometheus (or anyone on the host) would send it."""
        conn = http.client.HTTPConnection(LOOPBACK, self.stats_port, timeout=5)
        try:
            conn.request(method, path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def stats(self, contains: str = "") -> dict[str, int]:
        """Counters and gauges from `/stats`, optionally only those whose name contains `contains`."""
        out: dict[str, int] = {}
        for line in self.admin("/stats").splitlines():
            name, sep, value = line.rpartition(": ")
            if sep and contains in name and value.strip().isdigit():
                out[name] = int(value)
        return out


@pytest.fixture
def envoy(tmp_path: Path) -> Iterator[Callable[..., EnvoyProcess]]:
    """Start real Envoys (own temp dir, free ports, one worker); each is stopped by PID at teardown."""
    started: list[EnvoyProcess] = []

    def start(*, node_id: str, xds_port: int, ready_timeout: float = 10, token: str | None = None) -> EnvoyProcess:
        work = tmp_path / node_id.replace("~", "_").replace("/", "_")
        work.mkdir()
        admin_socket, stats_port = work / "admin.sock", free_port()
        assert len(str(admin_socket)) <= 107, f"Unix socket path too long: {admin_socket}"
        config = bootstrap(node_id=node_id, cluster="test", xds_host=LOOPBACK, xds_port=xds_port,
                           admin_socket=admin_socket, stats_host=LOOPBACK, stats_port=stats_port,
                           xds_token=token)  # fmt: skip
        config_path = work / "envoy.json"
        config_path.write_text(json.dumps(config, indent=2))
        log_path = work / "envoy.log"
        argv = envoy_argv(config_path=config_path, log_level="info", log_path=log_path)
        proc = subprocess.Popen(argv, cwd=work, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        env = EnvoyProcess(node_id=node_id, admin_socket=admin_socket, stats_port=stats_port, proc=proc,
                           log_path=log_path, token=token)
        started.append(env)
        asyncio.run(wait_ready(admin_socket, timeout=ready_timeout))
        return env

    try:
        yield start
    finally:
        for env in started:
            if env.proc.poll() is None:
                env.proc.terminate()
                try:
                    env.proc.wait(5)
                except subprocess.TimeoutExpired:
                    env.proc.kill()
                    env.proc.wait(5)
            if env.log_path.exists():  # shown by pytest only when the test failed
                tail = env.log_path.read_text(errors="replace").splitlines()[-40:]
                print(f"--- envoy {env.node_id} (pid {env.proc.pid}) log tail ---", *tail, sep="\n")


@pytest.fixture
def tokens() -> Any:
    """The local runtime's per-proxy tokens (digests only), empty: a test issues what it needs."""
    from reconciler.runtime.local.runtime import ProxyTokens

    return ProxyTokens()


@pytest.fixture
def authed_plane(tokens: Any) -> Iterator[ControlPlane]:
    """A control plane that serves only streams carrying a token of cluster east's proxies."""
    from reconciler.runtime.local.runtime import ClusterAuthenticator

    cp = ControlPlane(authenticator=ClusterAuthenticator(tokens, "east"))
    try:
        yield cp
    finally:
        cp.close()
