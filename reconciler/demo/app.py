"""The demo workload `lockgate up` runs behind each sample service's sidecar (`lockgate demo-app`).

Every answer says who produced it (service, version, cluster, instance), so routing rules, canary splits and
failover are visible from a single `curl`. Injected failures and latency give rollout analysis and outlier
detection something real to react to, and `--call` makes one request cross several mesh hops through the
sidecar, so a failure deep in the call graph shows up at the edge. Stdlib only: it must start instantly
and run wherever Python runs.

Two other modes for services that are not HTTP/1.1: `--grpc` answers every gRPC method (any service, any
method, bytes in and out: no protoc step) with the same identity as JSON, failing `--fail-rate` of the calls
with UNAVAILABLE; it needs grpcio, imported only in that mode. `--tcp-echo` answers every line a connection
sends with the line prefixed by `version/instance`, and closes `--fail-rate` of the connections unanswered.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import signal
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

T = TypeVar("T")

MAX_LATENCY_MS = 60_000
MAX_UPSTREAM_TIMEOUT_S = 300.0
# How long server_close() waits for in-flight requests; idle keep-alive connections are woken at once.
DRAIN_TIMEOUT_S = 5.0
_FORWARD_EXACT = frozenset({"cookie", "x-request-id"})
# The sidecar owns these: forwarding them would make the next hop trust our caller's routing/peer claims.
_FORWARD_EXCLUDED_PREFIXES = ("x-envoy-", "x-forwarded-")
_MAX_LINE = 65_537
MODES = ("http", "grpc", "tcp-echo")


def _default_instance() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


# --------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Endpoint:
    """A parsed http:// URL, parsed once at startup so a bad `--call` fails the process, not every request."""

    host: str
    port: int
    netloc: str  # Host header value, as written in the URL (minus any userinfo)
    target: str  # origin-form request target: path + query
    absolute: str  # absolute-form request target, for requests sent to an HTTP proxy


def parse_http_url(url: str, *, what: str = "upstream") -> Endpoint:
    """Split an http:// URL; https is refused because the sidecar, not the app, originates mesh TLS."""
    parts = urlsplit(url.strip())
    if parts.scheme != "http":
        raise ValueError(f"{what} {url!r}: only http:// URLs are supported (the sidecar originates TLS)")
    if not parts.hostname:
        raise ValueError(f"{what} {url!r}: missing host")
    try:
        port = parts.port or 80
    except ValueError as exc:
        raise ValueError(f"{what} {url!r}: {exc}") from None
    netloc = parts.netloc.rpartition("@")[2]
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Endpoint(parts.hostname, port, netloc, target, f"http://{netloc}{target}")


def parse_proxy(text: str) -> Endpoint:
    """HTTP_PROXY as sidecars set it: `http://127.0.0.1:15001` or bare `127.0.0.1:15001`."""
    return parse_http_url(text if "://" in text else f"http://{text}", what="HTTP_PROXY")


def _check_port(value: int) -> int:
    if not 0 <= value <= 65535:
        raise ValueError(f"port must be between 0 and 65535, got {value}")
    return value


def _check_fail_rate(value: float) -> float:
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"fail rate must be between 0 and 1, got {value}")
    return value


def _check_latency_ms(value: int) -> int:
    if not 0 <= value <= MAX_LATENCY_MS:
        raise ValueError(f"latency must be between 0 and {MAX_LATENCY_MS} ms, got {value}")
    return value


def _check_timeout(value: float) -> float:
    if not 0.0 < value <= MAX_UPSTREAM_TIMEOUT_S:  # also rejects NaN
        raise ValueError(f"upstream timeout must be > 0 and <= {MAX_UPSTREAM_TIMEOUT_S:g} s, got {value}")
    return value


def _check_upstream(url: str) -> str:
    parse_http_url(url)
    return url


def _check_mode(value: str) -> str:
    if value not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {value!r}")
    return value


@dataclass(frozen=True)
class DemoConfig:
    """Everything the demo app does, resolved from flags and env; validated here so tests and CLI agree."""

    host: str = "127.0.0.1"
    port: int = 8080
    service: str = "demo"
    version: str = "v1"
    cluster: str = "local"
    namespace: str = "default"
    instance: str = field(default_factory=_default_instance)
    fail_rate: float = 0.0
    latency_ms: int = 0
    upstreams: tuple[str, ...] = ()
    upstream_timeout: float = 5.0
    http_proxy: str | None = None
    verbose: bool = False
    mode: str = "http"
    """What the app speaks: http (the default), grpc or tcp-echo."""

    def __post_init__(self) -> None:
        _check_mode(self.mode)
        if self.mode != "http" and self.upstreams:
            raise ValueError(f"--call is for the HTTP mode only, not {self.mode}")
        _check_port(self.port)
        _check_fail_rate(self.fail_rate)
        _check_latency_ms(self.latency_ms)
        _check_timeout(self.upstream_timeout)
        for url in self.upstreams:
            _check_upstream(url)
        if self.http_proxy is not None:
            parse_proxy(self.http_proxy)


def _arg_type(convert: Callable[[str], T], check: Callable[[T], T], expected: str) -> Callable[[str], T]:
    """An argparse `type=` that turns bad input into a readable `argument --x: ...` error, not a traceback."""

    def parse(text: str) -> T:
        try:
            value = convert(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        try:
            return check(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = expected  # argparse names the type in some messages
    return parse


def _identity(text: str) -> str:
    return text


_PORT = _arg_type(int, _check_port, "a port number")
_FAIL_RATE = _arg_type(float, _check_fail_rate, "a number between 0 and 1")
_LATENCY_MS = _arg_type(int, _check_latency_ms, "a whole number of milliseconds")
_TIMEOUT = _arg_type(float, _check_timeout, "a number of seconds")
_UPSTREAM = _arg_type(_identity, _check_upstream, "an http:// URL")
_MODE = _arg_type(_identity, _check_mode, f"one of {', '.join(MODES)}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for `lockgate demo-app`; each overrides its environment variable, which overrides the default."""
    ident = parser.add_argument_group("identity (echoed in every answer)")
    ident.add_argument("--service", help="service name (env LOCKGATE_SERVICE, default demo)")
    ident.add_argument("--version", help="version label (env LOCKGATE_VERSION, default v1)")
    ident.add_argument("--cluster", help="cluster name (env LOCKGATE_CLUSTER, default local)")
    ident.add_argument("--namespace", help="namespace (env LOCKGATE_NAMESPACE, default default)")
    ident.add_argument("--instance", help="instance id (env LOCKGATE_INSTANCE, default <hostname>-<pid>)")
    parser.add_argument("--host", help="listen address (env HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=_PORT, help="listen port, 0 = any free port (env PORT, default 8080)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--grpc", dest="mode", action="store_const", const="grpc",
                      help="serve every gRPC method instead of HTTP/1.1 (needs grpcio; env DEMO_MODE=grpc)")
    mode.add_argument("--tcp-echo", dest="mode", action="store_const", const="tcp-echo",
                      help="echo every line, prefixed with version/instance (env DEMO_MODE=tcp-echo)")
    parser.add_argument(
        "--fail-rate", type=_FAIL_RATE, metavar="F",
        help="fraction of requests answered 500 (gRPC: UNAVAILABLE; TCP: connections closed), 0..1 "
        "(env FAIL_RATE, default 0)",
    )
    parser.add_argument(
        "--latency-ms", type=_LATENCY_MS, metavar="N",
        help=f"delay before answering, 0..{MAX_LATENCY_MS} (env LATENCY_MS, default 0)",
    )
    parser.add_argument(
        "--call", action="append", type=_UPSTREAM, metavar="URL",
        help="GET this URL through the sidecar (env HTTP_PROXY) on every request; repeatable "
        "(env UPSTREAMS, comma-separated)",
    )
    parser.add_argument(
        "--upstream-timeout", type=_TIMEOUT, metavar="SECONDS",
        help="connect/read timeout for --call requests (env UPSTREAM_TIMEOUT, default 5)",
    )
    # SUPPRESS: under `lockgate` a subcommand default would overwrite the global `-v/--verbose`.
    parser.add_argument(
        "--verbose", action="store_true", default=argparse.SUPPRESS, help="log every request to stderr"
    )


def _env_value(name: str, raw: str, parse: Callable[[str], T]) -> T:
    try:
        return parse(raw)
    except argparse.ArgumentTypeError as exc:
        raise ValueError(f"{name}={raw!r}: {exc}") from None


def _pick(flag: T | None, env: Mapping[str, str], name: str, parse: Callable[[str], T], default: T) -> T:
    if flag is not None:
        return flag
    raw = env.get(name, "").strip()
    return _env_value(name, raw, parse) if raw else default


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> DemoConfig:
    """Resolve flag > env > default. Raises ValueError naming the env variable when an env value is bad."""
    env = os.environ if environ is None else environ
    calls: list[str] | None = args.call
    if calls is None:
        raw_calls = (u.strip() for u in env.get("UPSTREAMS", "").split(","))
        calls = [_env_value("UPSTREAMS", u, _UPSTREAM) for u in raw_calls if u]
    proxy = (env.get("HTTP_PROXY") or env.get("http_proxy") or "").strip() or None
    return DemoConfig(
        host=_pick(args.host, env, "HOST", _identity, "127.0.0.1"),
        port=_pick(args.port, env, "PORT", _PORT, 8080),
        service=_pick(args.service, env, "LOCKGATE_SERVICE", _identity, "demo"),
        version=_pick(args.version, env, "LOCKGATE_VERSION", _identity, "v1"),
        cluster=_pick(args.cluster, env, "LOCKGATE_CLUSTER", _identity, "local"),
        namespace=_pick(args.namespace, env, "LOCKGATE_NAMESPACE", _identity, "default"),
        instance=_pick(args.instance, env, "LOCKGATE_INSTANCE", _identity, _default_instance()),
        fail_rate=_pick(args.fail_rate, env, "FAIL_RATE", _FAIL_RATE, 0.0),
        latency_ms=_pick(args.latency_ms, env, "LATENCY_MS", _LATENCY_MS, 0),
        upstreams=tuple(calls),
        upstream_timeout=_pick(args.upstream_timeout, env, "UPSTREAM_TIMEOUT", _TIMEOUT, 5.0),
        http_proxy=proxy,
        verbose=bool(getattr(args, "verbose", False)),
        mode=_pick(getattr(args, "mode", None), env, "DEMO_MODE", _MODE, "http"),
    )


# ------------------------------------------------------------------------------------------- upstreams


@dataclass(frozen=True)
class Upstream:
    url: str
    endpoint: Endpoint


class UpstreamClient:
    """GETs upstream URLs over one keep-alive connection per (handler thread, target).

    Reuse avoids a TCP handshake and a fresh sidecar connection per hop; thread-local because
    `http.client.HTTPConnection` is not thread-safe. The handler closes its thread's connections when its
    downstream connection ends, so nothing leaks when Envoy recycles connections.
    """

    def __init__(self, timeout: float, proxy: Endpoint | None) -> None:
        self.timeout = timeout
        self.proxy = proxy
        self._local = threading.local()

    def _connections(self) -> dict[tuple[str, int], http.client.HTTPConnection]:
        conns = getattr(self._local, "conns", None)
        if conns is None:
            conns = {}
            self._local.conns = conns
        return cast(dict[tuple[str, int], http.client.HTTPConnection], conns)

    def get(self, endpoint: Endpoint, headers: Iterable[tuple[str, str]]) -> tuple[int, str, bytes]:
        """(status, content-type, body). Through the proxy if set, in absolute form as proxies expect."""
        if self.proxy is not None:
            target, request_target = (self.proxy.host, self.proxy.port), endpoint.absolute
        else:
            target, request_target = (endpoint.host, endpoint.port), endpoint.target
        headers = list(headers)
        conns = self._connections()
        for attempt in (1, 2):
            conn = conns.get(target)
            if conn is None:
                conn = conns[target] = http.client.HTTPConnection(*target, timeout=self.timeout)
            reused = conn.sock is not None
            try:
                conn.putrequest("GET", request_target, skip_host=True)
                conn.putheader("Host", endpoint.netloc)
                for name, value in headers:
                    conn.putheader(name, value)
                conn.endheaders()
                response = conn.getresponse()
                body = response.read()
                return response.status, response.getheader("content-type", ""), body
            except (ConnectionError, http.client.BadStatusLine):
                conns.pop(target).close()
                # A kept-alive connection the peer already closed: retry once on a fresh one. A fresh
                # connection failing is a real outage and is reported, not retried.
                if reused and attempt == 1:
                    continue
                raise
            except BaseException:
                conns.pop(target).close()
                raise
        raise AssertionError("unreachable")

    def close_thread(self) -> None:
        """Close the calling thread's connections."""
        conns = self._connections()
        while conns:
            conns.popitem()[1].close()


def forwarded_headers(headers: Message) -> list[tuple[str, str]]:
    """Headers to propagate to upstreams: x-* (tracing, request id, routing flags) and cookie."""
    out = []
    for name, value in headers.items():
        lower = name.lower()
        if lower in _FORWARD_EXACT or (
            lower.startswith("x-") and not lower.startswith(_FORWARD_EXCLUDED_PREFIXES)
        ):
            out.append((name, value))
    return out


def _decode_body(data: bytes, content_type: str) -> Any:
    if "json" in content_type.lower():
        try:
            return json.loads(data)
        except ValueError:
            pass
    return data.decode("utf-8", "replace")


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------- server


class DemoHandler(BaseHTTPRequestHandler):
    """Answers every method on every path; see the module docstring for what the answer says."""

    protocol_version = "HTTP/1.1"  # keep-alive: Envoy pools connections to the app
    disable_nagle_algorithm = True  # otherwise ~40 ms Nagle/delayed-ACK stalls behind Envoy
    wbufsize = 64 * 1024  # headers and body leave in one write (flushed by handle_one_request)
    server_version = "lockgate-demo-app"
    sys_version = ""
    server: DemoServer

    def __getattr__(self, name: str) -> Callable[[], None]:
        # BaseHTTPRequestHandler dispatches to do_<METHOD> and answers 501 when absent; every method is ours.
        if name.startswith("do_"):
            return self._serve
        raise AttributeError(name)

    def _serve(self) -> None:
        self._drain_request_body()
        config = self.server.config
        if self.path.split("?", 1)[0] == "/healthz":
            self._respond(200, {"ok": True})
            return
        if config.latency_ms:
            time.sleep(config.latency_ms / 1000)
        payload: dict[str, Any] = {
            "service": config.service,
            "version": config.version,
            "cluster": config.cluster,
            "namespace": config.namespace,
            "instance": config.instance,
            "path": self.path,
            "method": self.command,
            "forwardedFor": self.headers.get("x-forwarded-for"),
        }
        # The failure is this service's own: fail before calling upstreams so the failing hop is unambiguous.
        if config.fail_rate and self.server.rng.random() < config.fail_rate:
            payload["error"] = "injected failure"
            self._respond(500, payload)
            return
        status = 200
        if self.server.upstreams:
            results, errors = self._call_upstreams()
            payload["upstreams"] = results
            if errors:
                payload["error"] = "; ".join(errors)
                status = 502
        self._respond(status, payload)

    def _call_upstreams(self) -> tuple[list[dict[str, Any]], list[str]]:
        headers = forwarded_headers(self.headers)
        results: list[dict[str, Any]] = []
        errors: list[str] = []
        for upstream in self.server.upstreams:
            try:
                status, content_type, data = self.server.client.get(upstream.endpoint, headers)
            except (OSError, http.client.HTTPException) as exc:
                message = f"upstream {upstream.url} unreachable: {_describe(exc)}"
                results.append({"url": upstream.url, "status": None, "body": None, "error": message})
                errors.append(message)
                continue
            results.append({"url": upstream.url, "status": status, "body": _decode_body(data, content_type)})
            if not 200 <= status < 300:
                errors.append(f"upstream {upstream.url} returned {status}")
        return results, errors

    def _respond(self, status: int, payload: Mapping[str, Any]) -> None:
        body = (json.dumps(payload) + "\n").encode()
        config = self.server.config
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.send_header("x-lockgate-service", config.service)
        self.send_header("x-lockgate-version", config.version)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _drain_request_body(self) -> None:
        """Read and drop the request body so the next request on this keep-alive connection parses cleanly."""
        try:
            if "chunked" in self.headers.get("transfer-encoding", "").lower():
                while True:
                    line = self.rfile.readline(_MAX_LINE)
                    if not line:
                        raise ValueError("truncated chunked body")
                    size = int(line.split(b";", 1)[0].strip(), 16)
                    if size == 0:
                        break
                    self._discard(size + 2)
                while self.rfile.readline(_MAX_LINE) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
            else:
                self._discard(int(self.headers.get("content-length", "0") or "0"))
        except ValueError:
            self.close_connection = True  # framing unknown: answer, then drop the connection

    def _discard(self, size: int) -> None:
        while size > 0:
            chunk = self.rfile.read(min(size, 65_536))
            if not chunk:
                raise ValueError("truncated body")
            size -= len(chunk)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        if self.server.config.verbose:
            super().log_request(code, size)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.client.close_thread()


class DemoServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that drains instead of hanging on close.

    The stock server_close() joins every handler thread, and a handler on an idle keep-alive connection
    (which Envoy holds open) never ends, so SIGTERM would hang. Here server_close() shuts the read side of
    open connections: idle handlers wake up and exit, in-flight requests still write their answer, and the
    wait is bounded by DRAIN_TIMEOUT_S.
    """

    daemon_threads = True
    block_on_close = False

    def __init__(self, config: DemoConfig) -> None:
        self.config = config
        self.upstreams = tuple(Upstream(url, parse_http_url(url)) for url in config.upstreams)
        proxy = parse_proxy(config.http_proxy) if config.http_proxy else None
        self.client = UpstreamClient(config.upstream_timeout, proxy)
        self.rng = random.Random()
        self._lock = threading.Lock()
        self._handlers: dict[socket.socket, threading.Thread] = {}
        if ":" in config.host:
            self.address_family = socket.AF_INET6
        super().__init__((config.host, config.port), DemoHandler)

    @property
    def port(self) -> int:
        """The bound port (differs from config.port when that is 0)."""
        return int(self.server_address[1])

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a reverse DNS lookup that can stall startup.
        socketserver.TCPServer.server_bind(self)
        self.server_name = str(self.server_address[0])
        self.server_port = self.port

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self.process_request_thread, args=(request, client_address), daemon=True,
            name=f"demo-app-{client_address[0]}:{client_address[1]}",
        )
        with self._lock:
            self._handlers[request] = thread
        thread.start()

    def shutdown_request(self, request: Any) -> None:
        with self._lock:
            self._handlers.pop(request, None)
        super().shutdown_request(request)

    def server_close(self) -> None:
        super().server_close()
        with self._lock:
            handlers = list(self._handlers.items())
        for sock, _ in handlers:
            with contextlib.suppress(OSError):  # already closed by its handler
                sock.shutdown(socket.SHUT_RD)
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        for _, thread in handlers:
            thread.join(max(0.0, deadline - time.monotonic()))

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exception(), (ConnectionError, TimeoutError)):
            return  # the client went away; not worth a traceback
        super().handle_error(request, client_address)


def make_server(config: DemoConfig) -> DemoServer:
    """Bind without serving yet: the caller owns serve_forever() and shutdown()/server_close()."""
    return DemoServer(config)


# ------------------------------------------------------------------------------------------ gRPC, TCP


def identity(config: DemoConfig) -> dict[str, Any]:
    """Who answers: what every mode's reply names."""
    return {"service": config.service, "version": config.version, "cluster": config.cluster,
            "namespace": config.namespace, "instance": config.instance}


class GrpcDemo:
    """A gRPC server answering every method of every service with `identity` (and the method) as JSON
    bytes. Generic handlers, so callers pick any `/pkg.Service/Method` and no generated code is needed."""

    def __init__(self, config: DemoConfig) -> None:
        from concurrent.futures import ThreadPoolExecutor

        import grpc  # only here: the HTTP and TCP modes stay stdlib-only and start at once

        self.config = config
        self.rng = random.Random()
        self._grpc = grpc
        self.server = grpc.server(ThreadPoolExecutor(max_workers=16, thread_name_prefix="demo-grpc"))
        demo = self

        class Every(grpc.GenericRpcHandler):  # type: ignore[misc]
            def service(self, details: Any) -> Any:
                method = str(details.method)
                return grpc.unary_unary_rpc_method_handler(lambda request, context: demo.answer(method, context))

        self.server.add_generic_rpc_handlers((Every(),))
        host = f"[{config.host}]" if ":" in config.host else config.host
        self.port = int(self.server.add_insecure_port(f"{host}:{config.port}"))
        if self.port == 0:
            raise OSError(f"cannot listen on {config.host}:{config.port}")

    def answer(self, method: str, context: Any) -> bytes:
        """One call: the identity as JSON, or UNAVAILABLE for `fail_rate` of the calls."""
        config = self.config
        if config.latency_ms:
            time.sleep(config.latency_ms / 1000)
        context.set_trailing_metadata((("x-lockgate-version", config.version),))
        if config.fail_rate and self.rng.random() < config.fail_rate:
            context.abort(self._grpc.StatusCode.UNAVAILABLE, f"injected failure ({config.version})")
        return (json.dumps({**identity(config), "method": method}) + "\n").encode()

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        """In-flight calls get DRAIN_TIMEOUT_S to finish; new ones are refused at once."""
        self.server.stop(DRAIN_TIMEOUT_S).wait(DRAIN_TIMEOUT_S + 1)


class _EchoHandler(socketserver.StreamRequestHandler):
    server: TcpEchoServer
    disable_nagle_algorithm = True

    def handle(self) -> None:
        config = self.server.config
        if config.fail_rate and self.server.rng.random() < config.fail_rate:
            return  # closed unanswered: what a TCP client counts as a failed connection
        prefix = f"{config.version}/{config.instance} ".encode()
        while line := self.rfile.readline(_MAX_LINE):
            if config.latency_ms:
                time.sleep(config.latency_ms / 1000)
            self.wfile.write(prefix + line if line.endswith(b"\n") else prefix + line + b"\n")


class TcpEchoServer(socketserver.ThreadingTCPServer):
    """Echoes lines, each prefixed with `version/instance`, so a TCP split is visible per connection."""

    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(self, config: DemoConfig) -> None:
        self.config = config
        self.rng = random.Random()
        if ":" in config.host:
            self.address_family = socket.AF_INET6
        super().__init__((config.host, config.port), _EchoHandler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exception(), (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT, then drain and return 0 (2 for a bad env value, 1 if it cannot bind)."""
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"lockgate demo-app: error: {exc}", file=sys.stderr)
        return 2
    if config.mode == "grpc":
        return _run_grpc(config)
    try:
        server: DemoServer | TcpEchoServer = TcpEchoServer(config) if config.mode == "tcp-echo" \
            else make_server(config)
    except OSError as exc:
        where = f"{config.host}:{config.port}"
        print(f"lockgate demo-app: error: cannot listen on {where}: {exc}", file=sys.stderr)
        return 1

    def on_signal(signum: int, frame: FrameType | None) -> None:
        # shutdown() blocks until serve_forever() returns, so it cannot run on serve_forever's own thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        where = f"http://{server.server_name}" if isinstance(server, DemoServer) else f"tcp://{config.host}"
        print(
            f"lockgate demo-app: {config.service} {config.version} listening on {where}:{server.port}",
            file=sys.stderr, flush=True,
        )
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        for sig, handler in previous.items():
            if handler is not None:
                signal.signal(sig, handler)
    return 0


def _run_grpc(config: DemoConfig) -> int:
    """`run` for the gRPC mode: serve until SIGTERM/SIGINT, then drain."""
    try:
        server = GrpcDemo(config)
    except ImportError:
        print("lockgate demo-app: error: --grpc needs grpcio (pip install grpcio)", file=sys.stderr)
        return 1
    except (OSError, RuntimeError) as exc:
        print(f"lockgate demo-app: error: cannot listen on {config.host}:{config.port}: {exc}", file=sys.stderr)
        return 1
    stop = threading.Event()
    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda _signum, _frame: stop.set())
    server.start()
    try:
        print(f"lockgate demo-app: {config.service} {config.version} serving gRPC on {config.host}:{server.port}",
              file=sys.stderr, flush=True)
        while not stop.wait(0.2):
            pass
    finally:
        server.stop()
        for sig, handler in previous.items():
            if handler is not None:
                signal.signal(sig, handler)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry (`python -m reconciler.demo.app`), for running the app without the lockgate CLI."""
    parser = argparse.ArgumentParser(prog="lockgate demo-app", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
