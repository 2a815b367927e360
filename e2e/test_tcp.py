"""TCP through the mesh: demo apps in `--tcp-echo` mode behind sidecars, called as a workload calls them,
through its own sidecar's TCP listener for the destination (`LOCKGATE_TCP_ECHO_SHOP_9000`, read from the
caller app's environment), carried between the sidecars in mTLS.

One `lockgate up` for the module. Scenarios: an 80/20 split over 300 connections lands within 70-90%
(counted by the version each echo line is prefixed with); the mTLS is visible in Envoy's stats (TLS
handshakes on the echo sidecar's inbound listener and on the caller's upstream cluster); an
AuthorizationPolicy denying one caller's principal closes its new connections unanswered while another
caller still gets its echo.
"""

from __future__ import annotations

import socket
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from e2e.harness import Up, alive, commit_file, envoy_stats, git, lockgate, proxy_admin, wait_for

pytestmark = pytest.mark.e2e

MESH = """\
apiVersion: lockgate.io/v1alpha1
kind: Mesh
metadata: {name: mesh}
spec: {trustDomain: example.org, mtls: {mode: STRICT}, clusters: [{name: east}]}
---
apiVersion: lockgate.io/v1alpha1
kind: Service
metadata: {name: echo, namespace: shop}
spec: {ports: [{name: tcp-echo, port: 9000}], versions: [v1, v2]}
---
apiVersion: lockgate.io/v1alpha1
kind: Route
metadata: {name: echo, namespace: shop}
spec:
  service: echo
  http:
    - route: [{version: v1, weight: 80}, {version: v2, weight: 20}]
""" + "".join(f"""---
apiVersion: lockgate.io/v1alpha1
kind: Service
metadata: {{name: {caller}, namespace: shop}}
spec: {{ports: [{{name: http, port: 8080}}], versions: [v1]}}
---
apiVersion: lockgate.io/v1alpha1
kind: Workload
metadata: {{name: {caller}-v1, namespace: shop}}
spec: {{service: {caller}, version: v1, clusters: [east], command: [lockgate, demo-app]}}
""" for caller in ("alpha", "beta")) + "".join(f"""---
apiVersion: lockgate.io/v1alpha1
kind: Workload
metadata: {{name: echo-{v}, namespace: shop}}
spec: {{service: echo, version: {v}, clusters: [east], command: [lockgate, demo-app, --tcp-echo]}}
""" for v in ("v1", "v2"))
DENY_ALPHA = """\
apiVersion: lockgate.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-alpha, namespace: shop}
spec:
  selector: {service: echo}
  action: DENY
  rules: [{from: [{principals: [example.org/ns/shop/sa/alpha]}]}]
"""
ENV = "LOCKGATE_TCP_ECHO_SHOP_9000"


def echo(address: tuple[str, int], line: bytes = b"hello\n", timeout: float = 5.0) -> str | None:
    """One connection, one line: the version the echo prefixed it with (`v1/echo-v1-0 hello`), or None when
    the connection is closed (or reset) without an answer."""
    try:
        with socket.create_connection(address, timeout=timeout) as s:
            s.sendall(line)
            answer = s.makefile("rb").readline()
    except (ConnectionError, TimeoutError):
        return None
    return answer.split(b"/", 1)[0].decode() if answer.endswith(b" " + line) else None


def listener_of(up: Up, service: str) -> tuple[str, int]:
    """Where the caller's app was told to reach echo:9000 (its environment, as the app reads it)."""
    pid = next(w["pid"] for w in up.status()["workloads"] if w["service"] == service)
    env = dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item)
    host, port = env[ENV].rsplit(":", 1)
    return host, int(port)


@dataclass
class Mesh:
    repo: Path
    up: Up
    alpha: tuple[str, int]
    beta: tuple[str, int]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("tcp")
    repo, state = tmp / "repo", tmp / "state"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "mesh.yaml").write_text(MESH)
    assert lockgate("validate", str(repo), check=False).stderr == ""
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "TCP echo v1/v2, callers alpha and beta")
    up = Up(repo=repo, state_dir=state)
    try:
        try:
            status = up.wait_converged(git(repo, "rev-parse", "HEAD"))
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n--- lockgate up log ---\n{up.log.read_text()[-4000:]}") from None
        assert all(p["nack"] is None for c in status["clusters"] for p in c["proxies"]), status
        alpha, beta = listener_of(up, "alpha"), listener_of(up, "beta")
        wait_for("an echo through alpha's sidecar", lambda: echo(alpha))
        yield Mesh(repo=repo, up=up, alpha=alpha, beta=beta)
    finally:
        children = set(up.child_pids)
        up.stop()
        assert not alive(children), "processes left behind"


def test_an_80_20_tcp_split_lands_within_70_to_90_percent(mesh: Mesh) -> None:
    n = 300
    seen = Counter(echo(mesh.alpha) for _ in range(n))
    assert sum(seen.values()) == n and set(seen) == {"v1", "v2"}, seen
    assert 0.70 <= seen["v1"] / n <= 0.90, seen  # sd 2.3%: more than four either way


def test_the_mtls_between_the_sidecars_shows_in_envoy_stats(mesh: Mesh) -> None:
    assert echo(mesh.alpha) is not None
    status = mesh.up.status()
    server = envoy_stats(proxy_admin(status, service="echo", version="v1"), "ssl.handshake")
    inbound = next(w["endpoint"] for w in status["workloads"] if w["service"] == "echo" and w["version"] == "v1")
    downstream = {k: v for k, v in server.items() if k.startswith(f"listener.{inbound.replace(':', '_')}.")}
    assert downstream and all(v > 0 for v in downstream.values()), server  # the echo side terminated TLS
    client = envoy_stats(proxy_admin(status, service="alpha"), "ssl.handshake")
    assert client.get("cluster.outbound|echo.shop|v1.ssl.handshake", 0) > 0, client  # alpha's side originated it
    connections = envoy_stats(proxy_admin(status, service="alpha"), "tcp.outbound_tcp_echo_shop_9000.")
    assert connections.get("tcp.outbound_tcp_echo_shop_9000.downstream_cx_total", 0) > 0, connections


def test_denying_a_callers_principal_closes_its_new_connections_while_another_caller_works(mesh: Mesh) -> None:
    assert echo(mesh.alpha) is not None and echo(mesh.beta) is not None
    t0 = time.monotonic()
    revision = commit_file(mesh.repo, "deny.yaml", DENY_ALPHA, "echo: deny alpha")
    mesh.up.wait_converged(revision)
    wait_for("alpha's new connections refused", lambda: echo(mesh.alpha) is None, timeout=10)
    print(f"denied {time.monotonic() - t0:.2f}s after the commit")
    assert [echo(mesh.alpha) for _ in range(20)] == [None] * 20
    assert all(echo(mesh.beta) in ("v1", "v2") for _ in range(20))
    admin = proxy_admin(mesh.up.status(), service="echo", version="v1")
    denied = envoy_stats(admin, "lockgate_authz_deny.")
    assert denied.get("lockgate_authz_deny.rbac.denied", 0) > 0, denied  # the echo side's network RBAC closed them
