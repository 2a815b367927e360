"""Delta ADS protocol: per-resource versions, subscriptions, removals, ACK/NACK and reconnects, with real
DeltaDiscoveryRequest protos against `_DeltaStreamState` and the cache. No network."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from mesh.xds.cache import SnapshotCache
from mesh.xds.server import DeltaResponse, _DeltaStreamState
from mesh.xds.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE, Snapshot
from tests.unit.mesh.test_ads_protocol import cluster, endpoints, listener, route

NODE = "sidecar~reviews-v1"


def snap(*, weights: Mapping[str, int] | None = None, clusters: Sequence[str] = ("v1", "v2"),
         revision: str = "r1", port: int = 9001, api: int = 100) -> Snapshot:  # fmt: skip
    """Listener -> route `web` -> the given EDS clusters; `port` moves v1's endpoint, `api` changes the
    other route."""
    w = dict(weights or {c: 100 // len(clusters) for c in clusters})
    return Snapshot.of(
        listeners=[listener("web")],
        routes=[route("web", w), route("api", {clusters[0]: api})],
        clusters=[cluster(c) for c in clusters],
        endpoints=[endpoints(c, port if c == "v1" else 9100 + i) for i, c in enumerate(clusters)],
        revision=revision,
    )


class FakeDeltaEnvoy:
    """The proxy side of one delta ADS stream (node on the first request only), tracking what it holds."""

    def __init__(self, cache: SnapshotCache, node_id: str = NODE) -> None:
        self.wakes = 0
        self.stream = _DeltaStreamState(cache, wake=self._woken)
        self.node_id = node_id
        self.first = True
        self.held: dict[str, dict[str, str]] = {}
        """Type -> name -> version, as Envoy keeps it (applied on ACK only)."""

    def _woken(self) -> None:
        self.wakes += 1

    def request(self, type_url: str, subscribe: Sequence[str] = (), unsubscribe: Sequence[str] = (), *,
                nonce: str = "", error: str | None = None,
                initial: Mapping[str, str] | None = None) -> list[DeltaResponse]:  # fmt: skip
        req = discovery_pb2.DeltaDiscoveryRequest(
            type_url=type_url, resource_names_subscribe=subscribe, resource_names_unsubscribe=unsubscribe,
            response_nonce=nonce, initial_resource_versions=dict(initial or {}))
        if self.first:
            req.node.CopyFrom(base_pb2.Node(id=self.node_id, cluster="test"))
            self.first = False
        if error is not None:
            req.error_detail.code = 3
            req.error_detail.message = error
        return self.stream.on_request(req)

    def ack(self, response: DeltaResponse) -> list[DeltaResponse]:
        held = self.held.setdefault(response.type_url, {})
        for r in response.resources:
            held[r.name] = r.version
        for name in response.removed_resources:
            held.pop(name, None)
        return self.request(response.type_url, nonce=response.nonce)

    def nack(self, response: DeltaResponse, message: str) -> list[DeltaResponse]:
        return self.request(response.type_url, nonce=response.nonce, error=message)

    def connect(self) -> None:
        """CDS and LDS by wildcard, EDS and RDS by name, each answered and ACKed."""
        for type_url, names in ((CLUSTER, []), (ENDPOINT, ["v1", "v2"]), (LISTENER, []), (ROUTE, ["web"])):
            (response,) = self.request(type_url, names)
            assert self.ack(response) == []


def holding_three(cache: SnapshotCache) -> FakeDeltaEnvoy:
    """A proxy that subscribed to and ACKed `snap()` with clusters v1, v2 and v3."""
    cache.set(NODE, snap(clusters=("v1", "v2", "v3")))
    envoy = FakeDeltaEnvoy(cache)
    for type_url, subscribe in ((CLUSTER, []), (ENDPOINT, ["v1", "v2", "v3"]), (LISTENER, []), (ROUTE, ["web"])):
        envoy.ack(envoy.request(type_url, subscribe)[0])
    return envoy


def names(response: DeltaResponse) -> list[str]:
    return [r.name for r in response.resources]


def by_type(responses: Sequence[DeltaResponse]) -> dict[str, DeltaResponse]:
    return {r.type_url: r for r in responses}


def test_wildcard_type_sends_every_resource_with_its_content_digest_as_version() -> None:
    cache = SnapshotCache()
    s = snap()
    cache.set(NODE, s)
    (response,) = FakeDeltaEnvoy(cache).request(CLUSTER)
    assert (response.type_url, response.system_version_info) == (CLUSTER, s.version(CLUSTER))
    assert {r.name: r.version for r in response.resources} == dict(s.digests[CLUSTER])
    first = response.resources[0]
    unpacked = cluster_pb2.Cluster()
    first.resource.Unpack(unpacked)
    assert unpacked.name == first.name == "v1"


def test_named_type_sends_only_subscribed_names_and_a_later_subscribe_sends_only_the_new_one() -> None:
    cache = SnapshotCache()
    cache.set(NODE, snap())
    envoy = FakeDeltaEnvoy(cache)
    (response,) = envoy.request(ENDPOINT, ["v1"])
    assert names(response) == ["v1"]
    assert envoy.ack(response) == []
    (more,) = envoy.request(ENDPOINT, ["v2"])
    assert names(more) == ["v2"]


def test_unsubscribed_resources_are_no_longer_sent() -> None:
    cache = SnapshotCache()
    cache.set(NODE, snap())
    envoy = FakeDeltaEnvoy(cache)
    envoy.connect()
    assert envoy.request(ROUTE, unsubscribe=["web"]) == []
    assert envoy.request(ROUTE, ["api"])[0].resources[0].name == "api"
    # `web` changes: not sent, it is no longer wanted.
    cache.set(NODE, snap(weights={"v1": 10, "v2": 90}, revision="r2"))
    assert ROUTE not in by_type(envoy.stream.pending())


def test_a_change_sends_only_the_changed_resources_and_unchanged_types_are_not_answered() -> None:
    cache = SnapshotCache()
    cache.set(NODE, snap())
    envoy = FakeDeltaEnvoy(cache)
    envoy.connect()
    changed = snap(port=9555, revision="r2")  # v1's endpoint moves; nothing else changes
    cache.set(NODE, changed)
    assert envoy.wakes == 1
    (response,) = envoy.stream.pending()
    assert (response.type_url, names(response), response.removed_resources) == (ENDPOINT, ["v1"], [])
    assert envoy.ack(response) == []
    st = cache.status()[NODE]
    assert (st.acked_revision, st.acked_version) == ("r2", changed.version_all)


def test_a_removed_cluster_goes_only_after_the_routes_that_named_it_are_acked() -> None:
    cache = SnapshotCache()
    envoy = holding_three(cache)
    cache.set(NODE, snap(clusters=("v1", "v2"), revision="r2"))
    got = by_type(envoy.stream.pending())
    # Make-before-break: the routes go first; v3 stays while the routes Envoy serves may still name it.
    assert list(got) == [ROUTE] and names(got[ROUTE]) == ["web"]  # its weights changed (three ways -> two)
    assert cache.status()[NODE].acked_revision == "r1"
    removal = by_type(envoy.ack(got[ROUTE]))
    assert list(removal) == [CLUSTER, ENDPOINT]
    assert removal[CLUSTER].removed_resources == ["v3"] and names(removal[CLUSTER]) == []
    assert removal[ENDPOINT].removed_resources == ["v3"]
    assert cache.status()[NODE].acked_revision == "r1"  # converged only once the removal is ACKed too
    for response in removal.values():
        assert envoy.ack(response) == []
    assert "v3" not in envoy.held[CLUSTER] and "v3" not in envoy.held[ENDPOINT]
    assert cache.status()[NODE].acked_revision == "r2"


def test_a_nacked_route_update_keeps_the_clusters_the_old_routes_name() -> None:
    cache = SnapshotCache()
    envoy = holding_three(cache)
    cache.set(NODE, snap(clusters=("v1", "v2"), revision="bad"))
    (routes,) = envoy.stream.pending()
    assert envoy.nack(routes, "invalid route") == []  # the old routes serve, so v3 must stay
    assert "v3" in envoy.held[CLUSTER] and envoy.stream.pending() == []
    cache.set(NODE, snap(weights={"v1": 40, "v2": 60}, clusters=("v1", "v2"), revision="fixed"))
    (fixed,) = envoy.stream.pending()
    removal = by_type(envoy.ack(fixed))
    assert removal[CLUSTER].removed_resources == ["v3"]
    for response in removal.values():
        envoy.ack(response)
    assert cache.status()[NODE].acked_revision == "fixed"


def test_a_cluster_dropped_and_back_before_the_routes_ack_is_never_removed() -> None:
    cache = SnapshotCache()
    envoy = holding_three(cache)
    cache.set(NODE, snap(clusters=("v1", "v2"), revision="r2"))
    (routes,) = envoy.stream.pending()
    cache.set(NODE, snap(weights={"v1": 50, "v2": 25, "v3": 25}, clusters=("v1", "v2", "v3"), revision="r3"))
    queue = [routes, *envoy.stream.pending()]
    while queue:  # ACK everything, and what each ACK brings, in order
        response = queue.pop(0)
        assert "v3" not in response.removed_resources
        queue.extend(envoy.ack(response))
    assert "v3" in envoy.held[CLUSTER]
    assert cache.status()[NODE].acked_revision == "r3"


def test_routes_wait_for_the_clusters_answer_and_a_nack_does_not_hold_them() -> None:
    cache = SnapshotCache()
    envoy = holding_three(cache)
    cache.set(NODE, snap(weights={"v1": 50, "v4": 50}, clusters=("v1", "v4"), revision="r2"))
    got = by_type(envoy.stream.pending())
    assert list(got) == [CLUSTER] and names(got[CLUSTER]) == ["v4"]  # v4 first, then the routes
    (routes,) = envoy.nack(got[CLUSTER], "invalid cluster")  # answered: the old clusters serve
    assert routes.type_url == ROUTE and names(routes) == ["web"]  # (the subscribed one)


def test_ack_is_recorded_per_type_and_convergence_waits_for_every_type() -> None:
    cache = SnapshotCache()
    s = snap()
    cache.set(NODE, s)
    envoy = FakeDeltaEnvoy(cache)
    (cds,) = envoy.request(CLUSTER)
    envoy.ack(cds)
    st = cache.status()[NODE]
    assert st.acked[CLUSTER] == s.version(CLUSTER) and st.acked_revision is None
    envoy.ack(envoy.request(ENDPOINT, ["v1", "v2"])[0])
    envoy.ack(envoy.request(LISTENER)[0])
    assert cache.status()[NODE].acked_revision is None
    envoy.ack(envoy.request(ROUTE, ["web"])[0])
    assert cache.status()[NODE].acked_revision == "r1"


def test_nack_is_recorded_with_the_resources_it_carried_and_not_resent() -> None:
    cache = SnapshotCache()
    cache.set(NODE, snap())
    envoy = FakeDeltaEnvoy(cache)
    envoy.connect()
    envoy.ack(envoy.request(ROUTE, ["api"])[0])
    bad = snap(weights={"v1": 30, "v2": 70}, revision="bad")
    cache.set(NODE, bad)
    (response,) = envoy.stream.pending()
    assert envoy.nack(response, "invalid route") == []
    st = cache.status()[NODE]
    assert (st.nack, st.nack_type, st.nack_resources) == ("invalid route", ROUTE, ("web",))
    assert st.acked_revision == "r1"  # the old config keeps serving, and that is what status says
    assert st.acked[ROUTE] != bad.version(ROUTE)
    assert envoy.stream.pending() == []  # not resent
    # A change to the other route, ACKed, does not make the refused one count as held.
    cache.set(NODE, snap(weights={"v1": 30, "v2": 70}, api=50, revision="bad2"))
    (other,) = envoy.stream.pending()
    assert names(other) == ["api"]
    envoy.ack(other)
    assert cache.status()[NODE].acked_revision == "r1"
    # The fix is sent, ACKed, and clears the NACK.
    fixed = snap(weights={"v1": 40, "v2": 60}, api=50, revision="fixed")
    cache.set(NODE, fixed)
    (again,) = envoy.stream.pending()
    assert names(again) == ["web"]
    envoy.ack(again)
    st = cache.status()[NODE]
    assert (st.nack, st.acked_revision) == (None, "fixed")


def test_stale_nonce_records_nothing() -> None:
    cache = SnapshotCache()
    cache.set(NODE, snap())
    envoy = FakeDeltaEnvoy(cache)
    envoy.connect()
    cache.set(NODE, snap(weights={"v1": 1, "v2": 99}, revision="r2"))
    (old,) = envoy.stream.pending()
    cache.set(NODE, snap(weights={"v1": 2, "v2": 98}, revision="r3"))
    (new,) = envoy.stream.pending()
    assert envoy.nack(old, "late complaint") == []
    assert cache.status()[NODE].nack is None
    envoy.ack(new)
    assert cache.status()[NODE].acked_revision == "r3"


def test_subscribing_again_to_a_held_name_sends_it_again() -> None:
    """Envoy re-subscribes an EDS cluster it is warming after a CDS update and waits for an answer."""
    cache = SnapshotCache()
    cache.set(NODE, snap())
    envoy = FakeDeltaEnvoy(cache)
    envoy.connect()
    (response,) = envoy.request(ENDPOINT, ["v1"])
    assert names(response) == ["v1"]


def test_reconnect_with_initial_resource_versions_sends_only_what_differs() -> None:
    cache = SnapshotCache()
    first = holding_three(cache)
    first.stream.close()
    # The control plane moves on while the proxy is away: v3 goes, v1's endpoint moves.
    new = snap(clusters=("v1", "v2"), port=9777, revision="r2")
    cache.set(NODE, new)
    back = FakeDeltaEnvoy(cache)
    held = first.held
    (cds,) = back.request(CLUSTER, initial=held[CLUSTER])
    # Answered (a first reconciliation), but v3 stays until the routes it held are replaced.
    assert (names(cds), cds.removed_resources) == ([], [])
    (eds,) = back.request(ENDPOINT, ["v1", "v2"], initial={n: v for n, v in held[ENDPOINT].items() if n != "v3"})
    assert (names(eds), eds.removed_resources) == (["v1"], [])
    assert back.request(LISTENER, initial=held[LISTENER]) == []  # routing waits for the clusters' ACK
    (lds,) = back.ack(cds)
    assert names(lds) == [] and lds.removed_resources == []  # answered (an ACK to measure), nothing in it
    (rds,) = back.request(ROUTE, ["web"], initial=held[ROUTE])
    assert names(rds) == ["web"]  # its weights changed with the clusters
    for response in (eds, lds):
        assert back.ack(response) == []
    (removal,) = back.ack(rds)
    assert (removal.type_url, names(removal), removal.removed_resources) == (CLUSTER, [], ["v3"])
    assert cache.status()[NODE].acked_revision != "r2"  # converged once the removal is ACKed too
    back.ack(removal)
    assert cache.status()[NODE].acked_revision == "r2"


def test_a_reconnecting_proxy_is_not_answered_empty_before_its_snapshot_exists() -> None:
    cache = SnapshotCache()
    envoy = FakeDeltaEnvoy(cache)
    assert envoy.request(CLUSTER, initial={"v1": "abc"}) == []
    cache.set(NODE, snap())
    (response,) = envoy.stream.pending()
    assert sorted(names(response)) == ["v1", "v2"]


def test_unknown_node_gets_an_empty_answer_then_its_snapshot() -> None:
    cache = SnapshotCache()
    envoy = FakeDeltaEnvoy(cache)
    (empty,) = envoy.request(LISTENER)
    assert (names(empty), empty.removed_resources) == ([], [])
    envoy.ack(empty)
    cache.set(NODE, snap())
    (response,) = envoy.stream.pending()
    assert names(response) == ["outbound-15001"]


def test_delta_response_wire_bytes_parse_as_protobufs_own_message() -> None:
    cache = SnapshotCache()
    cache.set(NODE, snap(clusters=("v1", "v2", "v3")))
    envoy = FakeDeltaEnvoy(cache)
    envoy.ack(envoy.request(CLUSTER)[0])
    cache.set(NODE, snap(clusters=("v1", "v2"), port=9001, revision="r2"))
    (response,) = envoy.stream.pending()
    parsed: Any = discovery_pb2.DeltaDiscoveryResponse.FromString(response.SerializeToString())
    assert (parsed.type_url, parsed.nonce, parsed.system_version_info) == (
        CLUSTER, response.nonce, response.system_version_info)
    assert list(parsed.removed_resources) == ["v3"]
