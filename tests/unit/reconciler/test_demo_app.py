"""The demo app over real sockets on 127.0.0.1: identity, injection, mesh calls via a proxy, keep-alive."""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from reconciler.demo.app import (
    DemoConfig,
    DemoServer,
    GrpcDemo,
    TcpEchoServer,
    add_arguments,
    config_from_args,
    make_server,
    run,
)

REPO = Path(__file__).resolve().parents[3]

Response = tuple[int, dict[str, Any], http.client.HTTPMessage]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lockgate demo-app")
    add_arguments(parser)
    return parser.parse_args(argv)


@contextmanager
def serving(server: socketserver.BaseServer) -> Iterator[None]:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
        assert not thread.is_alive()


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as s:
        yield s


@pytest.fixture
def start(stack: ExitStack) -> Callable[..., DemoServer]:
    """Start a demo app on a free port; it is shut down when the test ends, pass or fail."""

    def _start(config: DemoConfig | None = None, **fields: Any) -> DemoServer:
        server = make_server(config or DemoConfig(port=0, **fields))
        stack.enter_context(serving(server))
        return server

    return _start


def send(conn: http.client.HTTPConnection, method: str = "GET", path: str = "/", **kw: Any) -> Response:
    conn.request(method, path, **kw)
    response = conn.getresponse()
    data = response.read()
    return response.status, (json.loads(data) if data else {}), response.headers


def fetch(port: int, method: str = "GET", path: str = "/", **kw: Any) -> Response:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        return send(conn, method, path, **kw)
    finally:
        conn.close()


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------------ test upstream/proxy


class RecordingProxy(ThreadingHTTPServer):
    """A stand-in sidecar: records what the app sends it and forwards everything to one backend port."""

    daemon_threads = True

    def __init__(self, backend_port: int) -> None:
        self.backend_port = backend_port
        self.lock = threading.Lock()
        self.seen: list[tuple[int, str, dict[str, str]]] = []  # (connection no., request line, headers)
        self.connections = 0
        self.closed = threading.Semaphore(0)
        super().__init__(("127.0.0.1", 0), ProxyHandler)


class ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: RecordingProxy

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.connections += 1
            self.number = self.server.connections

    def finish(self) -> None:
        super().finish()
        self.server.closed.release()

    def do_GET(self) -> None:
        headers = {k.lower(): v for k, v in self.headers.items()}
        with self.server.lock:
            self.server.seen.append((self.number, self.requestline, headers))
        url = urlsplit(self.path)
        backend = http.client.HTTPConnection("127.0.0.1", self.server.backend_port, timeout=5)
        try:
            forward = {k: v for k, v in headers.items() if k not in ("host", "connection")}
            backend.request("GET", url.path + (f"?{url.query}" if url.query else ""), headers=forward)
            response = backend.getresponse()
            body = response.read()
        finally:
            backend.close()
        self.send_response(response.status)
        self.send_header("content-type", response.getheader("content-type", "text/plain"))
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class ClosingUpstream(socketserver.ThreadingTCPServer):
    """Answers one request per connection, then closes without `Connection: close`, like an idle timeout."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        self.connections = 0
        super().__init__(("127.0.0.1", 0), ClosingHandler)


class ClosingHandler(socketserver.StreamRequestHandler):
    server: ClosingUpstream

    def handle(self) -> None:
        self.server.connections += 1
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass
        body = b'{"one": "shot"}'
        head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body)
        self.wfile.write(head + body)


# ---------------------------------------------------------------------------------------- identity


IDENTITY_ENV = {
    "LOCKGATE_SERVICE": "reviews",
    "LOCKGATE_VERSION": "v2",
    "LOCKGATE_CLUSTER": "east",
    "LOCKGATE_NAMESPACE": "shop",
    "LOCKGATE_INSTANCE": "reviews-7",
}


def test_identity_comes_from_env(start: Callable[..., DemoServer]) -> None:
    config = config_from_args(parse(["--port", "0"]), IDENTITY_ENV)
    server = start(config)

    status, body, headers = fetch(server.port, "POST", "/a/b?c=1", body=b"ignored")

    assert status == 200
    assert body == {
        "service": "reviews", "version": "v2", "cluster": "east", "namespace": "shop",
        "instance": "reviews-7", "path": "/a/b?c=1", "method": "POST", "forwardedFor": None,
    }
    assert headers["content-type"] == "application/json"
    assert headers["x-lockgate-version"] == "v2"
    assert headers["x-lockgate-service"] == "reviews"
    assert headers["content-length"] is not None


def test_flags_override_env_and_defaults_apply() -> None:
    env = {**IDENTITY_ENV, "HOST": "0.0.0.0", "PORT": "9000", "FAIL_RATE": "0.5", "LATENCY_MS": "20",
           "UPSTREAMS": "http://a:1/x, http://b/y", "HTTP_PROXY": "http://127.0.0.1:15001"}
    flags = parse(["--service", "ratings", "--port", "0", "--fail-rate", "0", "--call", "http://c/z"])
    config = config_from_args(flags, env)
    assert (config.service, config.version, config.host, config.port) == ("ratings", "v2", "0.0.0.0", 0)
    assert (config.fail_rate, config.latency_ms) == (0.0, 20)
    assert config.upstreams == ("http://c/z",)  # --call replaces UPSTREAMS rather than adding to it
    assert config.http_proxy == "http://127.0.0.1:15001"
    assert config_from_args(parse([]), env).upstreams == ("http://a:1/x", "http://b/y")

    defaults = config_from_args(parse([]), {})
    assert (defaults.host, defaults.port) == ("127.0.0.1", 8080)
    assert (defaults.service, defaults.version) == ("demo", "v1")
    assert (defaults.cluster, defaults.namespace) == ("local", "default")
    assert defaults.instance == f"{socket.gethostname()}-{os.getpid()}"
    assert (defaults.fail_rate, defaults.latency_ms) == (0, 0)
    assert (defaults.upstreams, defaults.http_proxy) == ((), None)


def test_verbose_works_as_subcommand_flag_and_as_global_flag() -> None:
    parser = argparse.ArgumentParser(prog="lockgate")
    parser.add_argument("-v", "--verbose", action="store_true")
    add_arguments(parser.add_subparsers(dest="command").add_parser("demo-app"))
    assert config_from_args(parser.parse_args(["-v", "demo-app"]), {}).verbose
    assert config_from_args(parser.parse_args(["demo-app", "--verbose"]), {}).verbose
    assert not config_from_args(parser.parse_args(["demo-app"]), {}).verbose
    assert not config_from_args(parse([]), {}).verbose


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--fail-rate", "1.5"], "argument --fail-rate: fail rate must be between 0 and 1"),
        (["--fail-rate", "lots"], "argument --fail-rate: expected a number between 0 and 1"),
        (["--latency-ms", "-5"], "argument --latency-ms: latency must be between 0 and 60000"),
        (["--port", "70000"], "argument --port: port must be between 0 and 65535"),
        (["--upstream-timeout", "0"], "argument --upstream-timeout: upstream timeout must be > 0"),
        (["--call", "https://reviews/"], "argument --call: upstream 'https://reviews/': only http://"),
    ],
)
def test_bad_flags_are_argparse_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_env_values_name_the_variable(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValueError, match=r"FAIL_RATE='2': fail rate must be between 0 and 1"):
        config_from_args(parse([]), {"FAIL_RATE": "2"})
    with pytest.raises(ValueError, match=r"UPSTREAMS='ftp://x': .*only http://"):
        config_from_args(parse([]), {"UPSTREAMS": "ftp://x"})
    with pytest.raises(ValueError, match="HTTP_PROXY"):
        config_from_args(parse([]), {"HTTP_PROXY": "https://proxy:1"})
    with pytest.raises(ValueError, match="latency"):
        DemoConfig(latency_ms=-1)

    monkeypatch.setenv("LATENCY_MS", "soon")  # run() reads the real environment
    assert run(parse(["--port", "0"])) == 2
    assert "LATENCY_MS='soon': expected a whole number of milliseconds" in capsys.readouterr().err


# --------------------------------------------------------------------------------------- injection


def test_fail_rate_one_and_zero(start: Callable[..., DemoServer]) -> None:
    always = start(fail_rate=1.0, service="flaky")
    never = start(fail_rate=0.0)

    status, body, headers = fetch(always.port)
    assert status == 500
    assert body["error"] == "injected failure"
    assert body["service"] == "flaky"
    assert headers["x-lockgate-service"] == "flaky"
    assert fetch(never.port)[0] == 200
    # Health checks must not be failed or delayed by injection, or Envoy would eject the host.
    assert fetch(always.port, path="/healthz")[:2] == (200, {"ok": True})


def test_fail_rate_is_a_fraction(start: Callable[..., DemoServer]) -> None:
    server = start(fail_rate=0.3)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        statuses = [send(conn)[0] for _ in range(400)]
    finally:
        conn.close()
    assert set(statuses) <= {200, 500}
    # Expected 120 failures, sd ~9.2: +-6 sd keeps this from ever flaking while catching 0%/100%/inverted.
    assert 65 <= statuses.count(500) <= 175


def test_latency_is_added(start: Callable[..., DemoServer]) -> None:
    server = start(latency_ms=150)
    began = time.monotonic()
    assert fetch(server.port)[0] == 200
    assert time.monotonic() - began >= 0.15
    began = time.monotonic()
    assert fetch(server.port, path="/healthz")[0] == 200
    assert time.monotonic() - began < 0.15


# ------------------------------------------------------------------------------------ mesh calls


def test_call_goes_through_the_proxy_in_absolute_form(
    start: Callable[..., DemoServer], stack: ExitStack
) -> None:
    reviews = start(service="reviews", version="v3")
    proxy = RecordingProxy(reviews.port)
    stack.enter_context(serving(proxy))
    # reviews.shop does not resolve: the request can only succeed by going through the proxy.
    front = start(service="productpage", upstreams=("http://reviews.shop:9080/reviews?page=2",),
                  http_proxy=f"http://127.0.0.1:{proxy.server_port}")

    headers = {"x-user": "jason", "x-request-id": "rid-1", "cookie": "session=abc",
               "x-envoy-attempt-count": "1", "x-forwarded-for": "10.0.0.1", "authorization": "Bearer t"}
    conn = http.client.HTTPConnection("127.0.0.1", front.port, timeout=10)
    try:
        status, body, _ = send(conn, headers=headers)
        second = send(conn, headers=headers)[0]
    finally:
        conn.close()

    assert status == 200 and second == 200
    assert body["service"] == "productpage"
    [upstream] = body["upstreams"]
    assert upstream["url"] == "http://reviews.shop:9080/reviews?page=2"
    assert upstream["status"] == 200
    assert upstream["body"]["service"] == "reviews"
    assert upstream["body"]["version"] == "v3"
    assert upstream["body"]["path"] == "/reviews?page=2"

    (number, line, seen), (number2, _, _) = proxy.seen
    assert line == "GET http://reviews.shop:9080/reviews?page=2 HTTP/1.1"
    assert seen["host"] == "reviews.shop:9080"
    assert (seen["x-user"], seen["x-request-id"], seen["cookie"]) == ("jason", "rid-1", "session=abc")
    assert "x-envoy-attempt-count" not in seen
    assert "x-forwarded-for" not in seen
    assert "authorization" not in seen
    # One persistent connection to the sidecar for both requests; closed when the caller's connection ends.
    assert number == number2 == 1 and proxy.connections == 1
    assert proxy.closed.acquire(timeout=5)


def test_failing_upstream_propagates_as_502(start: Callable[..., DemoServer], stack: ExitStack) -> None:
    broken = start(service="ratings", fail_rate=1.0)
    proxy = RecordingProxy(broken.port)
    stack.enter_context(serving(proxy))
    front = start(upstreams=("http://ratings.shop:9080/",), http_proxy=f"127.0.0.1:{proxy.server_port}")

    status, body, _ = fetch(front.port)

    assert status == 502
    assert body["error"] == "upstream http://ratings.shop:9080/ returned 500"
    assert body["upstreams"][0]["status"] == 500
    assert body["upstreams"][0]["body"]["error"] == "injected failure"


def test_unreachable_upstream_is_a_502_naming_it(start: Callable[..., DemoServer]) -> None:
    url = f"http://127.0.0.1:{free_port()}/details"
    ok = start(service="details")
    front = start(upstreams=(f"http://127.0.0.1:{ok.port}/", url), upstream_timeout=2.0)

    status, body, _ = fetch(front.port)

    assert status == 502
    assert body["error"].startswith(f"upstream {url} unreachable: ConnectionRefusedError")
    good, bad = body["upstreams"]
    assert (good["status"], good["body"]["service"]) == (200, "details")
    assert (bad["url"], bad["status"], bad["body"]) == (url, None, None)


def test_stale_upstream_connection_is_retried_once(
    start: Callable[..., DemoServer], stack: ExitStack
) -> None:
    upstream = ClosingUpstream()
    stack.enter_context(serving(upstream))
    front = start(upstreams=(f"http://127.0.0.1:{upstream.server_address[1]}/",))

    conn = http.client.HTTPConnection("127.0.0.1", front.port, timeout=10)
    try:
        results = [send(conn) for _ in range(3)]
    finally:
        conn.close()

    for status, body, _ in results:
        assert status == 200, body
        assert body["upstreams"][0]["body"] == {"one": "shot"}
    assert upstream.connections == 3


# ---------------------------------------------------------------------------------- HTTP behaviour


def test_keep_alive_across_methods_and_bodies(start: Callable[..., DemoServer]) -> None:
    server = start()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        assert send(conn)[0] == 200
        sock = conn.sock
        json_header = {"content-type": "application/json"}
        assert send(conn, "POST", "/orders", body=b'{"n": 1}', headers=json_header)[0] == 200
        assert send(conn, "PUT", "/chunked", body=iter([b"ab", b"cd"]), encode_chunked=True)[0] == 200
        status, body, _ = send(conn, "PURGE", "/cache")
        assert (status, body["method"]) == (200, "PURGE")
        conn.request("HEAD", "/")
        head = conn.getresponse()
        assert (head.status, head.read()) == (200, b"")
        assert int(head.headers["content-length"]) > 0
        assert send(conn)[0] == 200
        assert conn.sock is sock  # every request above used the same TCP connection
    finally:
        conn.close()


def test_quiet_unless_verbose(start: Callable[..., DemoServer], capsys: pytest.CaptureFixture[str]) -> None:
    quiet = start()
    assert fetch(quiet.port, path="/q")[0] == 200
    assert capsys.readouterr().err == ""

    loud = start(verbose=True)
    assert fetch(loud.port, path="/loud")[0] == 200
    assert '"GET /loud HTTP/1.1" 200' in capsys.readouterr().err


def test_close_drains_in_flight_and_wakes_idle_connections() -> None:
    server = make_server(DemoConfig(port=0, latency_ms=300))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    idle = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    in_flight: list[int] = []
    try:
        assert send(idle, path="/healthz")[0] == 200  # now an idle keep-alive connection, as Envoy keeps
        client = threading.Thread(target=lambda: in_flight.append(fetch(server.port)[0]))
        client.start()
        time.sleep(0.1)  # the request is inside its 300 ms latency
        began = time.monotonic()
        server.shutdown()
        server.server_close()
        assert time.monotonic() - began < 2  # not blocked by the idle connection
        client.join(5)
        assert in_flight == [200]
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", server.port), timeout=2).close()
    finally:
        idle.close()
        thread.join(5)
    assert not thread.is_alive()


def test_run_serves_until_sigterm() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PORT": "0", "LOCKGATE_SERVICE": "web"}
    with subprocess.Popen(
        [sys.executable, "-m", "reconciler.demo.app", "--version", "v9"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as proc:
        try:
            assert proc.stderr is not None
            banner = proc.stderr.readline()
            assert "web v9 listening on http://127.0.0.1:" in banner, banner
            port = int(banner.rsplit(":", 1)[1])
            idle = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                status, body, _ = send(idle)
                assert (status, body["service"], body["version"]) == (200, "web", "v9")
                proc.send_signal(signal.SIGTERM)  # with a keep-alive connection still open
                began = time.monotonic()
                _, rest = proc.communicate(timeout=10)
                assert time.monotonic() - began < 3  # the idle connection does not hold up the exit
            finally:
                idle.close()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0
    assert rest == ""  # no per-request log lines, no traceback


# ---------------------------------------------------------------------------------------- gRPC, TCP


@pytest.fixture
def grpc_app(stack: ExitStack) -> Callable[..., GrpcDemo]:
    """A gRPC demo app on a free port, stopped when the test ends."""

    def _start(**fields: Any) -> GrpcDemo:
        server = GrpcDemo(DemoConfig(port=0, mode="grpc", **fields))
        server.start()
        stack.callback(server.stop)
        return server

    return _start


def grpc_call(port: int, method: str, *, timeout: float = 5.0) -> tuple[Any, dict[str, Any]]:
    """(status code, JSON answer or {}) of one unary call with raw bytes, as a generic client makes it."""
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(method)
        try:
            return grpc.StatusCode.OK, json.loads(call(b"hello", timeout=timeout))
        except grpc.RpcError as exc:
            return exc.code(), {"details": exc.details()}


def test_grpc_answers_any_method_with_its_identity(grpc_app: Callable[..., GrpcDemo]) -> None:
    import grpc

    server = grpc_app(service="reviews", version="v2", instance="reviews-v2-0")
    for method in ("/shop.Reviews/Get", "/other.Svc/List"):
        code, body = grpc_call(server.port, method)
        assert code == grpc.StatusCode.OK
        assert body["service"] == "reviews" and body["version"] == "v2" and body["instance"] == "reviews-v2-0"
        assert body["method"] == method


def test_grpc_fail_rate_answers_unavailable(grpc_app: Callable[..., GrpcDemo]) -> None:
    import grpc

    always = grpc_app(version="bad", fail_rate=1.0)
    code, body = grpc_call(always.port, "/shop.Reviews/Get")
    assert code == grpc.StatusCode.UNAVAILABLE and "injected failure (bad)" in body["details"]
    half = grpc_app(fail_rate=0.5)
    codes = [grpc_call(half.port, "/shop.Reviews/Get")[0] for _ in range(200)]
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}
    assert 60 <= codes.count(grpc.StatusCode.UNAVAILABLE) <= 140  # 100 expected, sd ~7


def tcp_lines(port: int, lines: list[bytes]) -> list[bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        f = s.makefile("rwb")
        out = []
        for line in lines:
            f.write(line)
            f.flush()
            out.append(f.readline())
        return out


def test_tcp_echo_prefixes_every_line_with_version_and_instance(stack: ExitStack) -> None:
    server = TcpEchoServer(DemoConfig(port=0, mode="tcp-echo", version="v2", instance="db-v2-0"))
    stack.enter_context(serving(server))
    assert tcp_lines(server.port, [b"one\n", b"two\n"]) == [b"v2/db-v2-0 one\n", b"v2/db-v2-0 two\n"]


def test_tcp_echo_fail_rate_closes_connections_unanswered(stack: ExitStack) -> None:
    server = TcpEchoServer(DemoConfig(port=0, mode="tcp-echo", fail_rate=1.0))
    stack.enter_context(serving(server))
    assert tcp_lines(server.port, [b"one\n"]) == [b""]


def test_modes_from_flags_and_env() -> None:
    assert config_from_args(parse(["--grpc"]), {}).mode == "grpc"
    assert config_from_args(parse(["--tcp-echo"]), {}).mode == "tcp-echo"
    assert config_from_args(parse([]), {"DEMO_MODE": "tcp-echo"}).mode == "tcp-echo"
    assert config_from_args(parse(["--grpc"]), {"DEMO_MODE": "tcp-echo"}).mode == "grpc"
    assert config_from_args(parse([]), {}).mode == "http"
    with pytest.raises(SystemExit):
        parse(["--grpc", "--tcp-echo"])
    with pytest.raises(ValueError, match="DEMO_MODE='udp'"):
        config_from_args(parse([]), {"DEMO_MODE": "udp"})
    with pytest.raises(ValueError, match="--call is for the HTTP mode only"):
        config_from_args(parse(["--grpc", "--call", "http://x:1/"]), {})


def test_run_grpc_serves_until_sigterm() -> None:
    import grpc

    env = {**os.environ, "PYTHONPATH": str(REPO), "PORT": "0", "LOCKGATE_SERVICE": "reviews"}
    with subprocess.Popen(
        [sys.executable, "-m", "reconciler.demo.app", "--grpc", "--version", "v3"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as proc:
        try:
            assert proc.stderr is not None
            banner = proc.stderr.readline()
            assert "reviews v3 serving gRPC on 127.0.0.1:" in banner, banner
            code, body = grpc_call(int(banner.rsplit(":", 1)[1]), "/shop.Reviews/Get")
            assert code == grpc.StatusCode.OK and body["version"] == "v3"
            proc.send_signal(signal.SIGTERM)
            _, rest = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0
    assert rest == ""
