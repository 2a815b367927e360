"""The ADS server driving one real Envoy over incremental (delta) xDS (`api_type: DELTA_GRPC`): a route
change applies, a removed cluster goes away, and a NACKed route leaves the old config serving."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from test_ads_envoy import flips_under_load, free_port, sample, snapshot, wait_for

from mesh.envoy import admin_address, admin_request, bootstrap, envoy_argv, wait_ready
from mesh.xds.server import _DeltaStreamState
from mesh.xds.snapshot import CLUSTER, ROUTE

if TYPE_CHECKING:
    from conftest import ControlPlane

pytestmark = pytest.mark.integration

LOOPBACK = "127.0.0.1"
NODE = "sidecar~web"


@pytest.fixture
def delta_envoy(tmp_path: Path, control_plane: ControlPlane) -> Iterator[Callable[[str], Path]]:
    """Start Envoy on delta ADS against `control_plane`; returns its admin socket. Stopped by PID."""
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(node_id: str) -> Path:
        admin_socket = tmp_path / "admin.sock"
        config = bootstrap(node_id=node_id, cluster="test", xds_host=LOOPBACK, xds_port=control_plane.port,
                           admin_socket=admin_socket, delta=True)
        assert config["dynamic_resources"]["ads_config"]["api_type"] == "DELTA_GRPC"
        path = tmp_path / "envoy.json"
        path.write_text(json.dumps(config))
        log = tmp_path / "envoy.log"
        proc = subprocess.Popen(envoy_argv(config_path=path, log_level="info", log_path=log), cwd=tmp_path,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append((proc, log))
        asyncio.run(wait_ready(admin_socket, timeout=10))
        return admin_socket

    try:
        yield start
    finally:
        for proc, log in procs:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            if log.exists():
                print("--- envoy log tail ---", *log.read_text(errors="replace").splitlines()[-40:], sep="\n")


def admin(socket: Path, path: str) -> Any:
    return json.loads(admin_request(admin_address(socket), path)[1].decode())


def active_clusters(socket: Path) -> set[str]:
    dump = admin(socket, "/config_dump?resource=dynamic_active_clusters")
    return {c["cluster"]["name"] for c in dump.get("configs", [])}


def streams(cp: ControlPlane) -> list[object]:
    return cp.call(lambda: list(cp.cache._nodes[NODE].watches))


def test_delta_route_change_cluster_removal_and_nack(
    control_plane: ControlPlane, backend: Callable[[str], int], delta_envoy: Callable[[str], Path],
) -> None:
    cp = control_plane
    ports = {"v1": backend("v1"), "v2": backend("v2"), "v3": backend("v3")}
    socket = delta_envoy(NODE)
    assert [type(s) for s in streams(cp)] == [_DeltaStreamState]
    listen = free_port()

    first = snapshot(listen=listen, ports=ports, weights={"v1": 100, "v2": 0, "v3": 0}, revision="r1")
    cp.set(NODE, first)
    assert cp.wait_converged(NODE, first), cp.status(NODE)
    wait_for(listen, "200:v1")
    assert active_clusters(socket) == {"v1", "v2", "v3"}

    # A route change: only the route configuration is sent; it serves within a second.
    second = snapshot(listen=listen, ports=ports, weights={"v1": 0, "v2": 100, "v3": 0}, revision="r2")
    changed = time.monotonic()
    cp.set(NODE, second)
    took = wait_for(listen, "200:v2")
    assert took < 1.0, f"route change took {took:.3f}s"
    assert cp.wait_converged(NODE, second)
    print(f"delta route change visible after {took * 1000:.1f} ms, converged after "
          f"{(time.monotonic() - changed) * 1000:.1f} ms")
    assert cp.status(NODE).acked_revision == "r2"

    # A cluster removal: v3 goes from Envoy (removed_resources), the others stay.
    third = snapshot(listen=listen, ports={"v1": ports["v1"], "v2": ports["v2"]},
                     weights={"v1": 0, "v2": 100}, revision="r3")
    assert second.version(CLUSTER) != third.version(CLUSTER)
    cp.set(NODE, third)
    assert cp.wait_converged(NODE, third)
    deadline = time.monotonic() + 5
    while (active := active_clusters(socket)) != {"v1", "v2"} and time.monotonic() < deadline:
        time.sleep(0.01)
    assert active == {"v1", "v2"}
    assert sample(listen) == Counter({"200:v2": 20})

    # A NACK: Envoy refuses the bad route, keeps serving the old one, and the status says so.
    bad = snapshot(listen=listen, ports={"v1": ports["v1"], "v2": ports["v2"]},
                   weights={"v1": 100, "v2": 0}, revision="bad", bad_regex=True)
    cp.set(NODE, bad)
    deadline = time.monotonic() + 5
    while (st := cp.status(NODE)).nack is None and time.monotonic() < deadline:
        time.sleep(0.01)
    print(f"delta NACK message: {st.nack!r}")
    assert (st.nack_type, st.nack_resources) == (ROUTE, ("web",))
    assert st.nack and "missing )" in st.nack
    assert (st.acked_version, st.acked_revision) == (third.version_all, "r3")
    assert not cp.run(cp.cache.wait_converged(NODE, bad.version_all, timeout=0.3))
    assert sample(listen) == Counter({"200:v2": 20})

    fixed = snapshot(listen=listen, ports={"v1": ports["v1"], "v2": ports["v2"]},
                     weights={"v1": 100, "v2": 0}, revision="fixed")
    cp.set(NODE, fixed)
    assert cp.wait_converged(NODE, fixed)
    assert cp.status(NODE).nack is None
    wait_for(listen, "200:v1")


def test_delta_route_moving_off_a_removed_cluster_loses_no_request(
    control_plane: ControlPlane, backend: Callable[[str], int], delta_envoy: Callable[[str], Path],
) -> None:
    ports = {"v1": backend("v1"), "v2": backend("v2")}
    delta_envoy(NODE)
    seen = flips_under_load(control_plane, free_port(), ports)
    print(f"delta, 12 flips under load: {dict(seen)}")
    assert set(seen) <= {"200:v1", "200:v2"}, seen
    assert seen["200:v1"] > 0 and seen["200:v2"] > 0
