"""The local runtime's per-proxy xDS credentials: a fresh token in each bootstrap (0600, in a 0700 dir), only
digests kept, one cluster's control plane knowing only its own proxies, and a restarted lockgate still
knowing the Envoys it adopts (processes.json), but not the ones nobody adopted."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.xds.server import TOKEN_METADATA
from reconciler.runtime.local.runtime import PROCESSES_FILE, LocalRuntime, ProxyTokens, socket_dir
from reconciler.runtime.local.supervisor import Supervised

EAST_INGRESS, EAST_SIDECAR, WEST_INGRESS = "east/ingress", "east/shop/reviews-v1-0", "west/ingress"


def start(rt: LocalRuntime, node_id: str, *, address: str = "127.0.1.1") -> tuple[Supervised, str]:
    """What every (re)start of an Envoy does before its exec: write its bootstrap, with a new token.
    Returns the supervisor and the token as the Envoy would read it from its bootstrap."""
    cluster = node_id.split("/", 1)[0]
    sup = rt._envoy(node_id=node_id, cluster=cluster, address=address, xds_port=18000, stats_port=19000)
    sup.before_spawn(sup)
    return sup, token_in_bootstrap(rt, node_id)


def token_in_bootstrap(rt: LocalRuntime, node_id: str) -> str:
    path = rt.state_dir / "envoy" / f"{node_id.replace('/', '_')}.json"
    config = json.loads(path.read_text())
    (meta,) = config["dynamic_resources"]["ads_config"]["grpc_services"][0]["initial_metadata"]
    assert meta["key"] == TOKEN_METADATA
    return str(meta["value"])


def test_a_token_names_its_own_node_in_its_own_cluster_only(tmp_path: Path) -> None:
    rt = LocalRuntime(state_dir=tmp_path / "state")
    _, ingress = start(rt, EAST_INGRESS)
    _, sidecar = start(rt, EAST_SIDECAR)
    _, west = start(rt, WEST_INGRESS, address="127.0.2.1")
    east_auth, west_auth = rt.authenticator("east"), rt.authenticator("west")
    assert east_auth is not None and west_auth is not None
    assert east_auth.node_for(ingress) == EAST_INGRESS
    assert east_auth.node_for(sidecar) == EAST_SIDECAR
    assert west_auth.node_for(west) == WEST_INGRESS
    assert east_auth.node_for(west) is None  # another cluster's proxy is nobody here
    assert west_auth.node_for(ingress) is None
    for garbage in ("", "x", ingress[:-1], ingress + "x", ingress.upper(), "\u00e9" * 43):
        assert east_auth.node_for(garbage) is None, garbage
    assert len({ingress, sidecar, west}) == 3 and all(len(t) >= 43 for t in (ingress, sidecar, west))  # 32 bytes


def test_the_bootstrap_is_private_and_only_digests_are_kept(tmp_path: Path) -> None:
    rt = LocalRuntime(state_dir=tmp_path / "state")
    (rt.state_dir / "envoy").mkdir(parents=True, mode=0o755)  # an older lockgate's directory: tightened
    _, token = start(rt, EAST_SIDECAR)
    path = rt.state_dir / "envoy" / "east_shop_reviews-v1-0.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
    rt._save()
    recorded = (rt.state_dir / PROCESSES_FILE).read_text()
    assert token not in recorded
    assert json.loads(recorded)["tokens"].keys() == {EAST_SIDECAR}
    for where in rt.state_dir.rglob("*"):
        if where.is_file() and where != path:
            assert token not in where.read_text(errors="replace"), where


def test_a_restarted_envoy_gets_a_new_token_and_the_old_one_is_refused(tmp_path: Path) -> None:
    rt = LocalRuntime(state_dir=tmp_path / "state")
    sup, first = start(rt, EAST_SIDECAR)
    sup.before_spawn(sup)  # what the supervisor does before a restart
    second = token_in_bootstrap(rt, EAST_SIDECAR)
    auth = rt.authenticator("east")
    assert auth is not None
    assert first != second
    assert (auth.node_for(first), auth.node_for(second)) == (None, EAST_SIDECAR)


def test_a_restarted_lockgate_knows_the_tokens_of_what_it_adopts(tmp_path: Path) -> None:
    before = LocalRuntime(state_dir=tmp_path / "state")
    _, adopted = start(before, EAST_INGRESS)
    _, orphan = start(before, EAST_SIDECAR)
    before._save()  # what processes.json holds when lockgate is SIGKILLed

    after = LocalRuntime(state_dir=tmp_path / "state")
    auth = after.authenticator("east")
    assert auth is not None
    # Known before anything is adopted: the Envoys reconnect as soon as the new control plane listens.
    assert (auth.node_for(adopted), auth.node_for(orphan)) == (EAST_INGRESS, EAST_SIDECAR)
    ingress = after._envoy(node_id=EAST_INGRESS, cluster="east", address="127.0.1.1", xds_port=18000,
                           stats_port=19000)
    after._tokens.claim(EAST_INGRESS, ingress)  # what a successful adoption does
    after._stop_orphans()  # the sidecar was not adopted (it was not running, or not wanted): its token goes
    assert (auth.node_for(adopted), auth.node_for(orphan)) == (EAST_INGRESS, None)
    assert json.loads((after.state_dir / PROCESSES_FILE).read_text())["tokens"].keys() == {EAST_INGRESS}
    asyncio.run(after.close())
    assert auth.node_for(adopted) is None  # nothing runs after an explicit stop
    assert json.loads((after.state_dir / PROCESSES_FILE).read_text())["tokens"] == {}


def test_revoking_leaves_a_successor_with_the_same_node_id_alone(tmp_path: Path) -> None:
    rt = LocalRuntime(state_dir=tmp_path / "state")
    old, _ = start(rt, EAST_SIDECAR)
    _new, token = start(rt, EAST_SIDECAR)  # a successor started while the old one drains
    rt._tokens.revoke(EAST_SIDECAR, old)  # the drained one stops
    auth = rt.authenticator("east")
    assert auth is not None and auth.node_for(token) == EAST_SIDECAR


def test_recorded_digests_that_are_not_ours_are_ignored() -> None:
    tokens = ProxyTokens({"not a node": "00", EAST_INGRESS: "zz", "east/eastwest": 7, WEST_INGRESS: "ab" * 32})
    assert tokens.to_json() == {WEST_INGRESS: "ab" * 32}


def test_admin_sockets_live_in_a_private_dir_with_short_names(tmp_path: Path) -> None:
    rt = LocalRuntime(state_dir=tmp_path / "state")
    socket = rt._admin_socket(EAST_SIDECAR)
    assert socket.parent == (tmp_path / "state").resolve() / "run"
    assert stat.S_IMODE(socket.parent.stat().st_mode) == 0o700
    assert len(str(socket)) <= 107 and socket != rt._admin_socket(EAST_INGRESS)


@pytest.fixture
def runtime_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A short $XDG_RUNTIME_DIR (a pytest tmp_path is too long to hold socket paths itself), removed after."""
    short = Path(tempfile.mkdtemp(prefix="lgx-", dir="/tmp"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(short))
    try:
        yield short
    finally:
        shutil.rmtree(short)  # does not follow a symlink planted in it


def test_a_state_dir_too_deep_for_socket_paths_falls_back_to_the_runtime_dir(tmp_path: Path, runtime_dir: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60) / "state"
    socket = LocalRuntime(state_dir=deep)._admin_socket(EAST_SIDECAR)
    assert socket.parent.parent == runtime_dir and socket.parent.name.startswith("lockgate-")
    assert len(str(socket)) <= 107
    assert stat.S_IMODE(socket.parent.stat().st_mode) == 0o700
    assert LocalRuntime(state_dir=deep)._admin_socket(EAST_SIDECAR) == socket  # the same after a restart


def test_a_symlink_in_place_of_the_socket_dir_is_refused(tmp_path: Path, runtime_dir: Path) -> None:
    deep = tmp_path / ("d" * 120) / "state"
    chosen = socket_dir(deep)
    assert chosen.parent == runtime_dir
    chosen.rmdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, chosen)  # planted by someone who wants our sockets
    with pytest.raises(RuntimeError, match="not a directory of this user"):
        socket_dir(deep)
    assert list(elsewhere.iterdir()) == []


def test_without_a_runtime_dir_the_fallback_is_a_private_dir_under_tmp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    chosen = socket_dir(tmp_path / ("d" * 120) / "state")
    try:
        assert chosen.parent == Path("/tmp") and chosen.name.startswith(f"lockgate-{os.getuid()}-")
        assert stat.S_IMODE(chosen.stat().st_mode) == 0o700
    finally:
        chosen.rmdir()
