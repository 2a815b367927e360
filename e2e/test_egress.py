"""Traffic leaving the mesh through a real sidecar, sent as its app would (the sidecar's outbound listener is the
app's HTTP_PROXY): an "external" HTTPS server this test starts on 127.0.0.1, with a certificate from a CA the
test makes, declared as the ExternalService `api.external.test` with TLS originated by the sidecar.

One `lockgate up` for the module. Under REGISTRY_ONLY (the default) an undeclared destination is refused with a
502 naming the policy, CONNECT included, and counted in the sidecar's stats; the declared one is reached over
plain HTTP from the app's side while the server sees TLS with SNI api.external.test; an ExternalService's
timeout cuts off a server that accepts and never answers; then a commit switches the Mesh to ALLOW_ANY and the
undeclared loopback destination gets through.
"""

from __future__ import annotations

import datetime as dt
import http.client
import http.server
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from e2e.harness import Up, alive, commit_file, envoy_stats, git, lockgate, proxy_admin, wait_for

pytestmark = pytest.mark.e2e

API, SLOW = "api.external.test", "slow.external.test"


def certificates(tmp: Path) -> tuple[str, Path, Path]:
    """(the CA's PEM, the server's certificate file, its key file): a CA made here, a leaf for API signed by it."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "egress test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, API)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(API)]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = tmp / "server.pem", tmp / "server.key"
    cert_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return ca.public_bytes(serialization.Encoding.PEM).decode(), cert_path, key_path


class Answer(http.server.BaseHTTPRequestHandler):
    """Answers every GET with what it saw: the server's name, the Host header, the path."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        server: Server = self.server  # type: ignore[assignment]
        server.requests.append((self.headers.get("Host", ""), self.path))
        body = f"{server.label} host={self.headers.get('Host')} path={self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    """An HTTP server on 127.0.0.1 (an ephemeral port); with `tls` it speaks only TLS, recording each
    handshake's SNI (None: the client sent none) and each failed handshake."""

    daemon_threads = True

    def __init__(self, label: str, tls: ssl.SSLContext | None = None) -> None:
        super().__init__(("127.0.0.1", 0), Answer)
        self.label, self.tls = label, tls
        self.requests: list[tuple[str, str]] = []
        self.sni: list[str | None] = []
        self.refused_plain = 0
        if tls is not None:
            tls.sni_callback = lambda _sock, name, _ctx: self.sni.append(name)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.tls is None:
            super().finish_request(request, client_address)
            return
        try:
            wrapped = self.tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            self.refused_plain += 1
            return
        try:
            super().finish_request(wrapped, client_address)
        finally:
            wrapped.close()  # the server closes the raw socket it accepted, not this wrapper

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class Silent:
    """Accepts connections and never answers (what a hung external service looks like)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for c in self.held:
            c.close()


def mesh_yaml(mode: str) -> str:
    return f"""\
apiVersion: lockgate.io/v1alpha1
kind: Mesh
metadata: {{name: mesh}}
spec:
  trustDomain: example.org
  clusters: [{{name: east}}]
  outboundTrafficPolicy: {{mode: {mode}}}
"""


def app_yaml(*, ca: str, api_port: int, slow_port: int) -> str:
    pem = "".join(f"      {line}\n" for line in ca.strip().splitlines())
    return f"""\
apiVersion: lockgate.io/v1alpha1
kind: Service
metadata: {{name: app, namespace: shop}}
spec: {{ports: [{{name: http, port: 8080}}], versions: [v1]}}
---
apiVersion: lockgate.io/v1alpha1
kind: Workload
metadata: {{name: app-v1, namespace: shop}}
spec: {{service: app, version: v1, clusters: [east], command: [lockgate, demo-app]}}
---
apiVersion: lockgate.io/v1alpha1
kind: ExternalService
metadata: {{name: api, namespace: shop}}
spec:
  hosts: [{API}]
  ports: [{{name: https, number: 443, protocol: HTTPS}}]
  endpoints: [{{address: 127.0.0.1, port: {api_port}}}]
  tls:
    mode: originate
    caCertificates: |
{pem}---
apiVersion: lockgate.io/v1alpha1
kind: ExternalService
metadata: {{name: slow, namespace: shop}}
spec:
  hosts: [{SLOW}]
  ports: [{{name: http, number: 80}}]
  endpoints: [{{address: 127.0.0.1, port: {slow_port}}}]
  timeout: 500ms
  retries: {{attempts: 0}}
"""


@dataclass
class Egress:
    repo: Path
    up: Up
    api: Server
    plain: Server
    silent: Silent
    status: dict[str, Any] = field(default_factory=dict)

    @property
    def proxy(self) -> tuple[str, int]:
        """The app's HTTP_PROXY: its sidecar's outbound listener."""
        [w] = self.status["workloads"]
        host, port = w["httpProxy"].removeprefix("http://").rsplit(":", 1)
        return host, int(port)

    def get(self, url: str, timeout: float = 10.0) -> tuple[int, dict[str, str], str]:
        """One GET through the sidecar in absolute form, as an app honouring HTTP_PROXY sends it."""
        conn = http.client.HTTPConnection(*self.proxy, timeout=timeout)
        try:
            conn.request("GET", url)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read().decode(errors="replace")
        finally:
            conn.close()

    def connect(self, authority: str) -> str:
        """`CONNECT authority` through the sidecar (what an app does for https:// through a proxy): the
        proxy's answer line when it refuses, "tunnel" when it opens one."""
        host, port = authority.rsplit(":", 1)
        conn = http.client.HTTPConnection(*self.proxy, timeout=10)
        conn.set_tunnel(host, int(port))
        try:
            conn.connect()
        except OSError as exc:
            return str(exc)
        finally:
            conn.close()
        return "tunnel"

    def stats(self, contains: str) -> dict[str, int]:
        return envoy_stats(proxy_admin(self.status, service="app"), contains)


@pytest.fixture(scope="module")
def egress(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Egress]:
    tmp = tmp_path_factory.mktemp("egress")
    ca, cert, key = certificates(tmp)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    api, plain, silent = Server("api", tls), Server("plain"), Silent()
    repo, state = tmp / "repo", tmp / "state"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "mesh.yaml").write_text(mesh_yaml("REGISTRY_ONLY"))
    (repo / "app.yaml").write_text(app_yaml(ca=ca, api_port=api.port, slow_port=silent.port))
    assert lockgate("validate", str(repo), check=False).stderr == ""  # Envoy itself accepts what it renders to
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "app, and the external services it calls")
    up = Up(repo=repo, state_dir=state)
    try:
        try:
            status = up.wait_converged(git(repo, "rev-parse", "HEAD"))
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n--- lockgate up log ---\n{up.log.read_text()[-4000:]}") from None
        assert all(p["nack"] is None for c in status["clusters"] for p in c["proxies"]), status
        yield Egress(repo=repo, up=up, api=api, plain=plain, silent=silent, status=status)
    finally:
        children = set(up.child_pids)
        up.stop()
        for s in (api, plain):
            s.close()
        silent.close()
        assert not alive(children), "processes left behind"


def test_registry_only_refuses_an_undeclared_destination_clearly_and_counts_it(egress: Egress) -> None:
    before = egress.stats("http.outbound.no_route").get("http.outbound.no_route", 0)
    undeclared = f"http://127.0.0.1:{egress.plain.port}/secret"
    answers = [egress.get(undeclared) for _ in range(5)]
    assert {status for status, _, _ in answers} == {502}, answers
    _, headers, body = answers[0]
    assert "REGISTRY_ONLY" in body and headers["x-lockgate-refused"] == "outboundTrafficPolicy=REGISTRY_ONLY"
    # CONNECT (an app's https:// through its proxy) to an undeclared destination is refused too.
    assert "502" in egress.connect(f"127.0.0.1:{egress.api.port}")
    assert egress.plain.requests == []  # nothing reached the server
    after = egress.stats("http.outbound.no_route")["http.outbound.no_route"]
    assert after - before == 6, (before, after)


def test_a_declared_external_service_is_reached_with_tls_originated_by_the_sidecar(egress: Egress) -> None:
    handshakes_before = len(egress.api.sni)
    status, _, body = egress.get(f"http://{API}/orders?id=7")
    assert status == 200, body
    assert body == f"api host={API} path=/orders?id=7\n"
    # The app spoke plain HTTP; the server, which speaks only TLS, saw a handshake naming api.external.test.
    assert egress.api.sni[handshakes_before:] == [API]
    stats = egress.stats(f"cluster.outbound_ext|443|{API}.ssl.")
    assert stats[f"cluster.outbound_ext|443|{API}.ssl.handshake"] >= 1
    # The server really speaks only TLS: plain HTTP straight to it gets no answer.
    refused = egress.api.refused_plain
    with pytest.raises((http.client.HTTPException, OSError)):
        conn = http.client.HTTPConnection("127.0.0.1", egress.api.port, timeout=5)
        try:
            conn.request("GET", "/")
            conn.getresponse().read()
        finally:
            conn.close()
    wait_for("the server noticing the plain connection", lambda: egress.api.refused_plain > refused, timeout=5)


def test_an_external_service_timeout_cuts_off_a_server_that_never_answers(egress: Egress) -> None:
    t0 = time.monotonic()
    status, _, _ = egress.get(f"http://{SLOW}/", timeout=20)
    took = time.monotonic() - t0
    print(f"timeout 500ms answered {status} after {took * 1000:.0f} ms")
    assert status == 504
    assert 0.4 <= took < 5.0, took  # 500ms asked; generous above (a loaded machine), never before it
    assert egress.silent.held, "the request reached the silent server"


def test_allow_any_lets_the_undeclared_destination_through(egress: Egress) -> None:
    revision = commit_file(egress.repo, "mesh.yaml", mesh_yaml("ALLOW_ANY"), "mesh: outboundTrafficPolicy ALLOW_ANY")
    egress.status = egress.up.wait_converged(revision)
    undeclared = f"http://127.0.0.1:{egress.plain.port}/open"
    status, _, body = egress.get(undeclared)
    assert (status, body) == (200, f"plain host=127.0.0.1:{egress.plain.port} path=/open\n")
    assert egress.plain.requests == [(f"127.0.0.1:{egress.plain.port}", "/open")]
    # CONNECT is tunnelled now too: the app's own TLS to the server, through the sidecar untouched.
    assert egress.connect(f"127.0.0.1:{egress.api.port}") == "tunnel"
    # Declared hosts keep their own handling under ALLOW_ANY: TLS is still originated for api.external.test.
    assert egress.get(f"http://{API}/still")[0] == 200
