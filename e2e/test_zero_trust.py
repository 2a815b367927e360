"""Zero trust at the control plane and at the proxies, through `lockgate up`: no Envoy admin answers on any
TCP port the mesh's Envoys listen on, Prometheus still scrapes every proxy (through each one's stats
listener), and a client holding a real proxy's token but claiming another proxy gets no secret and changes
no status, while the real proxies keep following commits."""

from __future__ import annotations

import http.client
import json
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from e2e.harness import Client, Up, ads_attempt, commit_file, git, lockgate, running, split, wait_for
from mesh.envoy import admin_request

pytestmark = pytest.mark.e2e

ADMIN_MARKERS = (b"command_line_options", b"admin commands are", b"hot_restart_version", b"LIVE")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Up, Path]]:
    tmp = tmp_path_factory.mktemp("zerotrust")
    repo = tmp / "repo"
    lockgate("init", str(repo))
    with running(repo=repo, state_dir=tmp / "state") as up:
        up.wait_converged(git(repo, "rev-parse", "HEAD"))
        yield up, repo


def proxies(st: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for c in st["clusters"] for p in c["proxies"]]


def listening(pid: int) -> set[tuple[str, int]]:
    return {(c.laddr.ip, c.laddr.port) for c in psutil.Process(pid).net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN}


def http_answer(address: tuple[str, int], method: str, path: str) -> bytes:
    """Status line and body of a plaintext request, or b"" if the port does not speak plain HTTP."""
    conn = http.client.HTTPConnection(*address, timeout=3)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return f"{resp.status} ".encode() + resp.read()
    except (OSError, http.client.HTTPException):
        return b""  # an mTLS port, or the east-west gateway's TLS passthrough
    finally:
        conn.close()


def tuple_of(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host, int(port)


def token_of(up: Up, node_id: str) -> str:
    """A proxy's credential, read where only it (and its owner) can: its bootstrap."""
    path = up.state_dir / "envoy" / f"{node_id.replace('/', '_')}.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    config = json.loads(path.read_text())
    return str(config["dynamic_resources"]["ads_config"]["grpc_services"][0]["initial_metadata"][0]["value"])


def test_status_names_each_admin_socket_and_stats_listener(mesh: tuple[Up, Path]) -> None:
    up, _ = mesh
    for p in proxies(up.status()):
        socket = Path(p["adminSocket"])
        assert p["admin"] == f"unix:{socket}"
        assert stat.S_ISSOCK(socket.stat().st_mode) and stat.S_IMODE(socket.stat().st_mode) == 0o600
        assert stat.S_IMODE(socket.parent.stat().st_mode) == 0o700
        assert admin_request(p["admin"], "/ready")[0] == 200  # admin is there, for whoever may open the socket
        assert p["stats"].startswith("127.0.") and tuple_of(p["stats"]) in listening(p["pid"])


def test_no_envoy_admin_answers_on_any_tcp_port_of_the_mesh(mesh: tuple[Up, Path]) -> None:
    up, _ = mesh
    st = up.status()
    envoys = {p["id"]: p["pid"] for p in proxies(st)}
    assert len(envoys) == 6 and all(envoys.values())  # ingress, east-west, 4 sidecars
    ports = {addr: node for node, pid in envoys.items() for addr in listening(pid)}
    assert len(ports) >= 6 * 2  # every Envoy: its stats listener and at least one from xDS
    spoke_http = set()
    for addr, node in sorted(ports.items()):
        for path in ("/server_info", "/help", "/ready", "/config_dump", "/stats"):
            answer = http_answer(addr, "GET", path)
            assert not any(m in answer for m in ADMIN_MARKERS), (node, addr, path, answer[:200])
            if answer:
                spoke_http.add(addr)
        http_answer(addr, "POST", "/quitquitquit")
        http_answer(addr, "POST", "/healthcheck/fail")
    stats = {tuple_of(p["stats"]) for p in proxies(st)}
    assert stats <= spoke_http  # the probe reached HTTP listeners (each stats listener: a 404), not just closed ports
    time.sleep(0.5)
    after = up.status()
    assert {p["id"]: (p["pid"], p["restarts"], p["state"]) for p in proxies(after)} == {
        node: (pid, 0, "running") for node, pid in envoys.items()}
    for p in proxies(after):
        assert admin_request(p["admin"], "/ready")[1] == b"LIVE\n", p["id"]  # not draining (healthcheck/fail)
    client = Client(up.ingress())
    assert split(client, "shop.example.com", 20) == {"v1": 20}
    client.close()


def test_prometheus_scrapes_every_proxy_through_its_stats_listener(mesh: tuple[Up, Path]) -> None:
    up, _ = mesh
    st = up.status()
    (cluster,) = st["clusters"]
    want = {p["id"]: f"http://{p['stats']}/stats/prometheus" for p in cluster["proxies"]}

    def all_up() -> dict[str, str] | None:
        conn = http.client.HTTPConnection(*tuple_of(cluster["prometheus"]["url"].removeprefix("http://")), timeout=5)
        try:
            conn.request("GET", "/api/v1/targets?state=active")
            targets = json.loads(conn.getresponse().read())["data"]["activeTargets"]
        finally:
            conn.close()
        seen = {t["labels"]["node"]: t["scrapeUrl"] for t in targets
                if t["health"] == "up" and t["labels"].get("kind") != "lockgate"}  # not lockgate's own /metrics
        return seen if seen == want else None

    wait_for("Prometheus scraping every proxy's stats listener", all_up, timeout=40, interval=0.5)


def test_a_stolen_token_claims_no_other_proxy_and_the_mesh_keeps_converging(mesh: tuple[Up, Path]) -> None:
    up, repo = mesh
    st = up.status()
    (cluster,) = st["clusters"]
    plane = cluster["controlPlane"]
    nodes = [p["id"] for p in cluster["proxies"]]
    thief = next(n for n in nodes if "/reviews-v2-" in n)  # a compromised sidecar: it has its own token
    victim = next(n for n in nodes if "/frontend-" in n)
    stolen = token_of(up, thief)

    def acked(status: dict[str, Any]) -> dict[str, Any]:
        return {p["id"]: (p["ackedVersion"], p["ackedRevision"], p["nack"], p["connected"]) for p in proxies(status)}

    before = acked(st)
    assert ads_attempt(plane, node_id=victim, token=stolen) == ("PERMISSION_DENIED", [])
    assert ads_attempt(plane, node_id=f"{cluster['name']}/ingress", token=stolen) == ("PERMISSION_DENIED", [])
    assert ads_attempt(plane, node_id=victim, token=None) == ("UNAUTHENTICATED", [])
    assert ads_attempt(plane, node_id=victim, token=stolen[::-1]) == ("UNAUTHENTICATED", [])
    assert ads_attempt(plane, node_id="east/shop/made-up-0", token=stolen) == ("PERMISSION_DENIED", [])
    after = up.status()
    assert acked(after) == before
    assert [p["id"] for p in proxies(after)] == nodes  # no node appeared for a claimed id

    # The real proxies keep following commits.
    routes = (repo / "routes.yaml").read_text().replace("weight: 100\n        - version: v2\n          weight: 0",
                                                        "weight: 0\n        - version: v2\n          weight: 100")
    up.wait_converged(commit_file(repo, "routes.yaml", routes, "all to v2"), timeout=15)
    client = Client(up.ingress())
    assert split(client, "shop.example.com", 20) == {"v2": 20}
    client.close()
