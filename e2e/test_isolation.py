"""`lockgate up --isolate-clusters`: each cluster in a network namespace of its own, joined by a bridge.

Acceptance (e) of issue 12: a cross-cluster call works through the other cluster's east-west gateway, and a
direct connection from one cluster to another cluster's sidecar does not. Every request to a namespace's
address is sent from inside a namespace (a socket made there), never from the root namespace.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import socket
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from e2e.harness import Up, alive, commit_file, envoy_stats, git, lockgate, running, wait_for
from e2e.test_multicluster import MESH, V1, V2, WORKLOADS
from reconciler.runtime.local.netns import (
    HOST_ADDRESS,
    IsolatedNetwork,
    NetworkError,
    connect_in,
    namespaces_of,
    network_tag,
)

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (CAP_NET_ADMIN)")]


class NamespacedConnection(http.client.HTTPConnection):
    """An HTTP connection opened from inside a network namespace: a client running in that cluster."""

    def __init__(self, namespace: Path, host: str, port: int, timeout: float = 5.0) -> None:
        super().__init__(host, port, timeout=timeout)
        self.namespace = namespace

    def connect(self) -> None:
        self.sock = connect_in(self.namespace, (self.host, self.port), timeout=self.timeout or 5.0)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def get_in(namespace: Path, address: tuple[str, int], host: str, path: str = "/") -> tuple[int, Any]:
    conn = NamespacedConnection(namespace, *address)
    try:
        conn.request("GET", path, headers={"Host": host})
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    try:
        return resp.status, json.loads(body)
    except ValueError:
        return resp.status, body.decode(errors="replace")


def answered_by(namespace: Path, ingress: tuple[str, int], n: int) -> Counter[str]:
    """Which reviews (version@cluster) answered frontend's calls, asked from inside `namespace`."""
    seen: Counter[str] = Counter()
    for _ in range(n):
        status, body = get_in(namespace, ingress, "shop.example.com")
        if status != 200:
            seen[f"HTTP {status}"] += 1
            continue
        up = body["upstreams"][0]["body"]
        seen[f"{up['version']}@{up['cluster']}"] += 1
    return seen


def address(text: str) -> tuple[str, int]:
    host, port = text.rsplit(":", 1)
    return host, int(port)


def refused(namespace: Path, to: tuple[str, int]) -> bool:
    try:
        connect_in(namespace, to, timeout=2.0).close()
    except ConnectionRefusedError:
        return True
    return False


@contextlib.contextmanager
def stale_namespace(name: str) -> Iterator[None]:
    """A namespace as a crashed run would leave it (removed here too, should lockgate not)."""
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        yield
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


def test_cross_cluster_only_through_the_east_west_gateway(tmp_path: Path) -> None:
    repo, state = tmp_path / "repo", tmp_path / "state"
    lockgate("init", str(repo))
    (repo / "mesh.yaml").write_text(MESH)
    (repo / "workloads.yaml").write_text(WORKLOADS)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "two clusters")
    routes = (repo / "routes.yaml").read_text()
    tag = network_tag(state)
    net = IsolatedNetwork(tag=tag)

    # A crashed run: lockgate killed, its data plane left serving in its namespaces.
    crashed = Up(repo=repo, state_dir=state, extra=("--isolate-clusters", "--prometheus-url", "http://127.0.0.1:9"))
    try:
        crashed.wait_converged(git(repo, "rev-parse", "HEAD"), timeout=90)
        left = alive(crashed.child_pids)
        crashed.proc.kill()
        crashed.proc.wait()
        crashed.forget()
        assert alive(left) == left and f"lockgate-{tag}-east" in namespaces_of(tag)
    except BaseException:
        crashed.stop()
        raise

    with stale_namespace(f"lockgate-{tag}-crashed"), \
            running(repo=repo, state_dir=state, extra=("--isolate-clusters",)) as up:
        up.child_pids |= left
        # The crashed run's status says converged at this revision too: wait for this lockgate's own.
        wait_for("the new lockgate's status", lambda: up.status()["lockgate"]["pid"] == up.proc.pid, timeout=60)
        st = up.wait_converged(git(repo, "rev-parse", "HEAD"), timeout=90)
        # The next start stopped what the crashed one left (its network was rebuilt: nothing to adopt).
        assert not alive(left), alive(left)
        # A namespace per cluster and the hub; what a crashed run on this state dir left is gone.
        assert sorted(namespaces_of(tag)) == [f"lockgate-{tag}", f"lockgate-{tag}-east", f"lockgate-{tag}-west"]
        east_ns, west_ns = net.path("east"), net.path("west")
        east, west = (next(c for c in st["clusters"] if c["name"] == n) for n in ("east", "west"))
        assert address(east["ingress"])[0] == "10.77.1.1" and address(west["ingress"])[0] == "10.77.2.1"

        # v1 runs in both clusters: east's own instance answers a client inside east.
        assert answered_by(east_ns, address(east["ingress"]), 20) == {"v1@east": 20}

        # v2 runs only in west: east's sidecars reach it through west's east-west gateway...
        up.wait_converged(commit_file(repo, "routes.yaml", routes.replace(V1, V2), "reviews: all to v2"), timeout=30)
        assert answered_by(east_ns, address(east["ingress"]), 20) == {"v2@west": 20}
        st = up.status()
        west = next(c for c in st["clusters"] if c["name"] == "west")
        gateway = next(p for p in west["proxies"] if p["kind"] == "eastwest")
        passed = envoy_stats(gateway["admin"], "eastwest_reviews.shop_v2.downstream_cx_total")
        assert sum(passed.values()) >= 1, passed

        # ...and nothing else: west's v2 sidecar, where the gateway hands the connection on, refuses a
        # direct connection from east (its address is west's own loopback), at either address of west.
        v2 = next(w for w in st["workloads"] if w["id"] == "west/shop/reviews-v2-west-0")
        sidecar = address(v2["endpoint"])
        assert refused(east_ns, sidecar)
        assert refused(east_ns, ("10.77.2.1", sidecar[1]))
        assert not refused(west_ns, sidecar)  # the control: inside west it is there
        # What the bridge offers instead: west's east-west gateway, and lockgate's control planes.
        assert address(west["eastwest"])[0] == "10.77.2.1"
        connect_in(east_ns, address(west["eastwest"]), timeout=2.0).close()
        assert address(west["controlPlane"])[0] == HOST_ADDRESS

        # Prometheus runs inside each cluster's namespace and scrapes its proxies there.
        prom = address(west["prometheus"]["url"].removeprefix("http://"))
        assert prom[0] == "10.77.2.1"

        def scraped() -> bool:
            """Every proxy of west (2 gateways, 2 sidecars) scraped and up."""
            status, body = get_in(west_ns, prom, prom[0], '/api/v1/query?query=sum(up{kind!="lockgate"})')
            return status == 200 and float(body["data"]["result"][0]["value"][1]) == 4

        wait_for("west's Prometheus scraping its proxies", scraped, timeout=45, interval=0.5)

    # Stopped: every namespace and link this state dir's network had is gone.
    assert net.leftovers() == []


def test_setup_removes_leftovers_and_refuses_without_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    net = IsolatedNetwork.for_state_dir(tmp_path / "state")
    with stale_namespace(f"{net.hub}-old"):
        net.setup()
        try:
            assert net.add_cluster("east", index=0) == "10.77.1.1"
            assert sorted(net.leftovers()) == sorted([net.hub, f"{net.hub}-east", f"link {net.host_link}"])
        finally:
            net.teardown()
        assert net.leftovers() == []
    # The subnet held by someone else (another state dir's isolated lockgate): refused, naming the holder.
    subprocess.run(["ip", "link", "add", "lgtestdummy", "type", "veth", "peer", "name", "lgtestdummy2"], check=True,
                   timeout=10)
    try:
        subprocess.run(["ip", "addr", "add", "10.77.99.1/16", "dev", "lgtestdummy"], check=True, timeout=10)
        with pytest.raises(NetworkError, match=re.escape("lgtestdummy 10.77.99.1/16")):
            net.setup()
        assert net.leftovers() == []
    finally:
        subprocess.run(["ip", "link", "del", "lgtestdummy"], capture_output=True, timeout=10)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(NetworkError, match="needs root"):
        net.setup()
    assert net.leftovers() == []
