"""SotW ADS protocol: what a stream answers, ignores and records, with real DiscoveryRequest protos.

No network: a `FakeEnvoy` plays the proxy's side of one stream against `_StreamState` and the cache.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import json_format

from mesh.envoy import bootstrap, envoy_argv
from mesh.xds import wire as xds
from mesh.xds.cache import ProxyStatus, SnapshotCache
from mesh.xds.server import EMPTY, _StreamState
from mesh.xds.snapshot import CLUSTER, ENDPOINT, HCM, LISTENER, ROUTE, SECRET, Snapshot

NODE = "sidecar~reviews-v1"
ADS = {"ads": {}, "resource_api_version": "V3"}
ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
}


def listener(route_name: str, port: int = 15001) -> dict[str, Any]:
    hcm = {
        "@type": HCM,
        "stat_prefix": "outbound",
        "rds": {"route_config_name": route_name, "config_source": ADS},
        "http_filters": [ROUTER],
    }
    return {
        "name": f"outbound-{port}",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                        "typed_config": hcm}]}],
    }  # fmt: skip


def route(name: str, weights: dict[str, int]) -> dict[str, Any]:
    return {
        "name": name,
        "virtual_hosts": [{
            "name": "all", "domains": ["*"],
            "routes": [{"match": {"prefix": "/"}, "route": {"weighted_clusters": {
                "clusters": [{"name": c, "weight": w} for c, w in weights.items()]}}}],
        }],
    }  # fmt: skip


def cluster(name: str) -> dict[str, Any]:
    return {"name": name, "type": "EDS", "connect_timeout": "1s", "eds_cluster_config": {"eds_config": ADS}}


def endpoints(name: str, port: int) -> dict[str, Any]:
    address = {"socket_address": {"address": "127.0.0.1", "port_value": port}}
    return {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}]}


def snap(v1: int = 100, v2: int = 0, *, revision: str = "rev1", v2_port: int = 9002) -> Snapshot:
    return Snapshot.of(
        listeners=[listener("web")],
        routes=[route("web", {"v1": v1, "v2": v2})],
        clusters=[cluster("v1"), cluster("v2")],
        endpoints=[endpoints("v1", 9001), endpoints("v2", v2_port)],
        revision=revision,
    )


def two_routes(revision: str = "rev1") -> Snapshot:
    return Snapshot.of(
        listeners=[listener("web", 15001), listener("api", 15002)],
        routes=[route("web", {"v1": 100}), route("api", {"v1": 100})],
        clusters=[cluster("v1")],
        endpoints=[endpoints("v1", 9001)],
        revision=revision,
    )


class FakeEnvoy:
    """The proxy side of one ADS stream: builds requests the way Envoy does (SotW, node on first only)."""

    def __init__(self, cache: SnapshotCache, node_id: str = NODE) -> None:
        self.wakes = 0
        self.stream = _StreamState(cache, wake=self._woken)
        self.node_id = node_id
        self.first = True
        self.accepted: dict[str, str] = {}

    def _woken(self) -> None:
        self.wakes += 1

    def request(
        self, type_url: str, names: Sequence[str] = (), *, version: str = "", nonce: str = "",
        error: str | None = None,
    ) -> list[Any]:  # fmt: skip
        req = discovery_pb2.DiscoveryRequest(
            type_url=type_url, resource_names=names, version_info=version, response_nonce=nonce
        )
        if self.first:
            req.node.CopyFrom(base_pb2.Node(id=self.node_id, cluster="test"))
            self.first = False
        if error is not None:
            req.error_detail.code = 3
            req.error_detail.message = error
        return self.stream.on_request(req)

    def ack(self, response: Any, names: Sequence[str] = ()) -> list[Any]:
        self.accepted[response.type_url] = response.version_info
        return self.request(response.type_url, names, version=response.version_info, nonce=response.nonce)

    def nack(self, response: Any, message: str, names: Sequence[str] = ()) -> list[Any]:
        return self.request(
            response.type_url, names, version=self.accepted.get(response.type_url, ""),
            nonce=response.nonce, error=message,
        )  # fmt: skip

    def subscribe_all(self) -> None:
        """Initial requests for LDS, CDS, EDS, RDS, each answered and ACKed."""
        for type_url, names in ((CLUSTER, []), (ENDPOINT, ["v1", "v2"]), (LISTENER, []), (ROUTE, ["web"])):
            (response,) = self.request(type_url, names)
            assert self.ack(response, names) == []


def names_of(response: Any) -> list[str]:
    out = []
    for packed in response.resources:
        if response.type_url == ROUTE:
            msg = route_pb2.RouteConfiguration()
            packed.Unpack(msg)
            out.append(msg.name)
        else:
            out.append(packed.type_url)
    return out


def status(cache: SnapshotCache) -> ProxyStatus:
    return cache.status()[NODE]


# --- answering -----------------------------------------------------------------------------------------


def test_first_request_is_answered_with_the_type_version_and_a_fresh_nonce() -> None:
    cache = SnapshotCache()
    s = snap()
    cache.set(NODE, s)
    envoy = FakeEnvoy(cache)
    (response,) = envoy.request(CLUSTER)
    assert response.type_url == CLUSTER
    assert response.version_info == s.version(CLUSTER)
    assert len(response.resources) == 2
    assert response.nonce == "1"
    assert status(cache).connected


def test_ack_is_not_answered_and_is_recorded() -> None:
    cache = SnapshotCache()
    s = snap()
    cache.set(NODE, s)
    envoy = FakeEnvoy(cache)
    (response,) = envoy.request(CLUSTER)
    assert envoy.ack(response) == []
    assert status(cache).acked == {CLUSTER: s.version(CLUSTER)}
    assert envoy.stream.pending() == []


def test_named_types_send_only_the_requested_names_and_answer_an_ack_whose_names_changed() -> None:
    cache = SnapshotCache()
    s = two_routes()
    cache.set(NODE, s)
    envoy = FakeEnvoy(cache)
    (response,) = envoy.request(ROUTE, ["web"])
    assert names_of(response) == ["web"]
    assert envoy.ack(response, ["web"]) == []
    # The second listener arrives: Envoy ACKs with the full, larger set of names.
    (response,) = envoy.ack(response, ["api", "web"])
    assert names_of(response) == ["api", "web"]
    assert response.version_info == s.version(ROUTE)
    assert envoy.ack(response, ["api", "web"]) == []
    # A name the snapshot does not hold is simply not sent.
    (response,) = envoy.ack(response, ["web", "ghost"])
    assert names_of(response) == ["web"]


def test_named_type_with_no_names_is_an_unsubscribe_not_a_request() -> None:
    cache = SnapshotCache()
    cache.set(NODE, snap())
    envoy = FakeEnvoy(cache)
    (response,) = envoy.request(ROUTE, ["web"])
    assert envoy.ack(response, []) == []
    cache.set(NODE, snap(0, 100))
    assert envoy.wakes == 0 and envoy.stream.pending() == []


def test_stale_nonce_is_ignored() -> None:
    cache = SnapshotCache()
    first = snap()
    cache.set(NODE, first)
    envoy = FakeEnvoy(cache)
    (old,) = envoy.request(ROUTE, ["web"])
    cache.set(NODE, snap(0, 100))
    (new,) = envoy.stream.pending()
    assert new.nonce != old.nonce
    # Envoy's ACK (and even a NACK) of the superseded response changes nothing and gets no answer.
    assert envoy.ack(old, ["web"]) == []
    assert envoy.nack(old, "too late", ["web"]) == []
    assert status(cache).acked == {}
    assert status(cache).nack is None
    assert envoy.ack(new, ["web"]) == []
    assert status(cache).acked == {ROUTE: new.version_info}


def test_nack_is_recorded_not_answered_and_the_old_version_stays_acked() -> None:
    cache = SnapshotCache()
    good = snap(revision="good")
    cache.set(NODE, good)
    envoy = FakeEnvoy(cache)
    envoy.subscribe_all()
    assert status(cache).acked_version == good.version_all

    bad = snap(0, 100, revision="bad")
    cache.set(NODE, bad)
    (pushed,) = envoy.stream.pending()
    assert pushed.type_url == ROUTE
    message = "Proto constraint validation failed: invalid regex"
    assert envoy.nack(pushed, message, ["web"]) == []
    st = status(cache)
    assert (st.nack, st.nack_type) == (message, ROUTE)
    assert st.acked[ROUTE] == good.version(ROUTE)
    assert (st.acked_version, st.acked_revision) == (good.version_all, "good")
    # Nothing wakes the stream to resend the rejected version.
    assert envoy.stream.pending() == []

    fixed = snap(50, 50, revision="fixed")
    cache.set(NODE, fixed)
    assert status(cache).nack is None  # the NACK was about a snapshot that is no longer current
    (pushed,) = envoy.stream.pending()
    assert envoy.ack(pushed, ["web"]) == []
    st = status(cache)
    assert (st.acked_version, st.acked_revision, st.nack) == (fixed.version_all, "fixed", None)


def test_nack_clears_once_the_type_acks_at_the_current_version() -> None:
    cache = SnapshotCache()
    cache.set(NODE, snap())
    envoy = FakeEnvoy(cache)
    (response,) = envoy.request(ROUTE, ["web"])
    envoy.nack(response, "bad route", ["web"])
    assert status(cache).nack == "bad route"
    # Envoy re-subscribes on a new stream and accepts the same version this time.
    again = FakeEnvoy(cache)
    (response,) = again.request(ROUTE, ["web"])
    again.ack(response, ["web"])
    assert status(cache).nack is None


def test_snapshot_change_pushes_only_changed_types_in_make_before_break_order() -> None:
    cache = SnapshotCache()
    cache.set(NODE, snap())
    envoy = FakeEnvoy(cache)
    envoy.subscribe_all()
    # Same resources, new Git revision: every version is equal, so the stream is not even woken.
    cache.set(NODE, snap(revision="rev2"))
    assert envoy.wakes == 0
    # New weights and a new endpoint port: routes and endpoints change, clusters and listeners do not.
    changed = Snapshot.of(
        listeners=[listener("web")],
        routes=[route("web", {"v1": 0, "v2": 100})],
        clusters=[cluster("v1"), cluster("v2")],
        endpoints=[endpoints("v1", 9001), endpoints("v2", 9999)],
        secrets=[{"name": "default", "tls_certificate": {}}],  # not subscribed: never sent
    )
    cache.set(NODE, changed)
    assert envoy.wakes == 1
    pushed = envoy.stream.pending()
    assert [r.type_url for r in pushed] == [ENDPOINT, ROUTE]
    assert [r.version_info for r in pushed] == [changed.version(ENDPOINT), changed.version(ROUTE)]
    assert len({r.nonce for r in pushed}) == 2
    # With clusters changing too, the order is make-before-break: clusters, endpoints, ..., routes.
    renamed = Snapshot.of(
        listeners=[listener("web")],
        routes=[route("web", {"v1": 100, "v3": 0})],
        clusters=[cluster("v1"), cluster("v3")],
        endpoints=[endpoints("v1", 9001), endpoints("v3", 9003)],
    )
    cache.set(NODE, renamed)
    cds, eds = envoy.stream.pending()
    assert [cds.type_url, eds.type_url] == [CLUSTER, ENDPOINT]
    # The routes that name v3 go once the proxy has the cluster (Envoy ACKs CDS when it has warmed).
    assert [r.type_url for r in envoy.ack(cds)] == [ROUTE]


def cluster_names(response: Any) -> list[str]:
    out = []
    for packed in response.resources:
        msg = cluster_pb2.Cluster()
        packed.Unpack(msg)
        out.append(msg.name)
    return sorted(out)


def test_a_dropped_cluster_stays_in_cds_until_the_routes_that_named_it_are_acked() -> None:
    """Make-before-break for removals: SotW CDS is the whole set, so a cluster the routes Envoy serves
    still name is carried (under a version that is not the snapshot's) until the new routes are ACKed."""
    cache = SnapshotCache()
    cache.set(NODE, snap(50, 50))
    envoy = FakeEnvoy(cache)
    envoy.subscribe_all()
    only_v1 = Snapshot.of(listeners=[listener("web")], routes=[route("web", {"v1": 100})],
                          clusters=[cluster("v1")], endpoints=[endpoints("v1", 9001)], revision="rev2")
    cache.set(NODE, only_v1)
    pushed = {r.type_url: r for r in envoy.stream.pending()}
    assert list(pushed) == [CLUSTER, ENDPOINT]
    assert cluster_names(pushed[CLUSTER]) == ["v1", "v2"]
    assert pushed[CLUSTER].version_info != only_v1.version(CLUSTER)
    envoy.ack(pushed[ENDPOINT], ["v1", "v2"])
    # Its ACK brings the routes, not CDS again (those are still out), and nothing is converged yet.
    (routes,) = envoy.ack(pushed[CLUSTER])
    assert routes.type_url == ROUTE and status(cache).acked_revision == "rev1"
    (final,) = envoy.ack(routes, ["web"])
    assert final.type_url == CLUSTER and cluster_names(final) == ["v1"]
    assert final.version_info == only_v1.version(CLUSTER)
    envoy.ack(final)
    assert status(cache).acked_revision == "rev2"


def test_a_nacked_route_update_keeps_the_dropped_cluster_in_cds() -> None:
    cache = SnapshotCache()
    cache.set(NODE, snap(50, 50))
    envoy = FakeEnvoy(cache)
    envoy.subscribe_all()
    cache.set(NODE, Snapshot.of(listeners=[listener("web")], routes=[route("web", {"v1": 100})],
                                clusters=[cluster("v1")], endpoints=[endpoints("v1", 9001)], revision="bad"))
    pushed = {r.type_url: r for r in envoy.stream.pending()}
    (routes,) = envoy.ack(pushed[CLUSTER])
    envoy.nack(routes, "invalid route", ["web"])
    assert [r.type_url for r in envoy.stream.pending()] in ([], [ENDPOINT])  # no CDS without v2
    assert cluster_names(pushed[CLUSTER]) == ["v1", "v2"] and envoy.accepted[CLUSTER] == pushed[CLUSTER].version_info


def test_a_nacked_cluster_update_does_not_hold_the_routes_back() -> None:
    """The proxy keeps its old clusters after a NACK; other routes' changes must still reach it."""
    cache = SnapshotCache()
    cache.set(NODE, snap(50, 50))
    envoy = FakeEnvoy(cache)
    envoy.subscribe_all()
    cache.set(NODE, Snapshot.of(listeners=[listener("web")], routes=[route("web", {"v1": 100, "v2": 0})],
                                clusters=[{**cluster("v1"), "lb_policy": "LEAST_REQUEST"}, cluster("v2")],
                                endpoints=[endpoints("v1", 9001), endpoints("v2", 9002)], revision="bad"))
    (cds,) = envoy.stream.pending()  # the routes wait for the proxy's answer
    assert cds.type_url == CLUSTER
    assert [r.type_url for r in envoy.nack(cds, "invalid lb_policy")] == [ROUTE]


def lb_change(*, v2_port: int = 9002) -> Snapshot:
    """`snap()` with cluster v1's definition changed (load balancing policy) and the same endpoints."""
    return Snapshot.of(
        listeners=[listener("web")],
        routes=[route("web", {"v1": 100, "v2": 0})],
        clusters=[{**cluster("v1"), "lb_policy": "LEAST_REQUEST"}, cluster("v2")],
        endpoints=[endpoints("v1", 9001), endpoints("v2", v2_port)],
    )


def connected(cache: SnapshotCache) -> tuple[FakeEnvoy, Any, Any]:
    """A proxy that has ACKed CDS and EDS of `snap()`; returns it with the CDS and EDS responses."""
    cache.set(NODE, snap())
    envoy = FakeEnvoy(cache)
    (cds,) = envoy.request(CLUSTER)
    assert envoy.ack(cds) == []
    (eds,) = envoy.request(ENDPOINT, ["v1", "v2"])
    assert envoy.ack(eds, ["v1", "v2"]) == []
    return envoy, cds, eds


def test_eds_request_repeating_its_ack_after_a_cds_update_is_answered_once() -> None:
    """Envoy keeps an updated cluster warming until an EDS response arrives for it, even if its endpoints did
    not change, and asks with exactly the request it ACKed the last EDS response with; unanswered, it waits
    out initial_fetch_timeout (15 s)."""
    cache = SnapshotCache()
    envoy, _, eds = connected(cache)
    assert envoy.ack(eds, ["v1", "v2"]) == []  # the same request with no CDS response since: a plain ACK
    changed = lb_change()
    assert changed.version(ENDPOINT) == eds.version_info
    cache.set(NODE, changed)
    (cds,) = envoy.stream.pending()
    assert cds.type_url == CLUSTER  # endpoints unchanged: nothing to push for EDS

    (again,) = envoy.ack(eds, ["v2", "v1"])  # Envoy's re-request for the warming cluster
    assert (again.type_url, again.version_info, len(again.resources)) == (ENDPOINT, eds.version_info, 2)
    assert int(again.nonce) > int(cds.nonce)
    assert envoy.ack(cds) == []
    assert envoy.ack(again, ["v1", "v2"]) == []  # the answer's own ACK is a plain ACK again
    assert envoy.ack(eds, ["v1", "v2"]) == []  # and a late repeat of the re-request is stale
    assert envoy.stream.pending() == []
    st = status(cache)
    assert st.acked == {CLUSTER: changed.version(CLUSTER), ENDPOINT: changed.version(ENDPOINT)}


def test_eds_already_sent_after_the_cds_update_is_not_sent_again() -> None:
    cache = SnapshotCache()
    envoy, _, old = connected(cache)
    cache.set(NODE, lb_change(v2_port=9999))  # cluster and endpoints change: both go out, CDS first
    cds, eds = envoy.stream.pending()
    assert (cds.type_url, eds.type_url) == (CLUSTER, ENDPOINT)
    # Envoy's re-request after the CDS update still carries the EDS nonce it has processed: stale.
    assert envoy.ack(old, ["v1", "v2"]) == []
    assert envoy.ack(cds) == []
    assert envoy.ack(eds, ["v1", "v2"]) == []


def test_a_nack_after_a_cds_update_and_an_rds_ack_after_an_lds_update_are_not_answered() -> None:
    """Only EDS holds a resource warming: Envoy finishes warming an updated listener with the routes it has."""
    cache = SnapshotCache()
    envoy, _, eds = connected(cache)
    (rds,) = envoy.request(ROUTE, ["web"])
    assert envoy.ack(rds, ["web"]) == []
    (lds,) = envoy.request(LISTENER)
    assert envoy.ack(lds) == []
    cache.set(NODE, lb_change())
    (cds,) = envoy.stream.pending()
    assert envoy.nack(eds, "rejected", ["v1", "v2"]) == []  # a rejected version is never resent
    assert envoy.ack(cds) == []
    moved = Snapshot.of(
        listeners=[listener("web", port=15009)],
        routes=[route("web", {"v1": 100, "v2": 0})],
        clusters=[{**cluster("v1"), "lb_policy": "LEAST_REQUEST"}, cluster("v2")],
        endpoints=[endpoints("v1", 9001), endpoints("v2", 9002)],
    )
    cache.set(NODE, moved)
    (lds,) = envoy.stream.pending()
    assert lds.type_url == LISTENER
    assert envoy.ack(rds, ["web"]) == []


def test_secrets_come_first_when_subscribed() -> None:
    cache = SnapshotCache()
    envoy = FakeEnvoy(cache)
    envoy.request(LISTENER)
    envoy.request(SECRET, ["default"])
    cache.set(NODE, Snapshot.of(listeners=[listener("web")], secrets=[{"name": "default"}]))
    assert [r.type_url for r in envoy.stream.pending()] == [SECRET, LISTENER]


def test_unknown_node_gets_an_empty_answer_then_the_snapshot_when_it_arrives() -> None:
    cache = SnapshotCache()
    envoy = FakeEnvoy(cache)
    (cds,) = envoy.request(CLUSTER)
    assert envoy.ack(cds) == []
    (lds,) = envoy.request(LISTENER)  # as Envoy does: listeners once its clusters are initialised
    assert (len(cds.resources), len(lds.resources)) == (0, 0)
    assert cds.version_info == EMPTY.version(CLUSTER)
    assert envoy.ack(lds) == []
    assert envoy.wakes == 0
    s = snap()
    cache.set(NODE, s)
    assert envoy.wakes == 1
    (cds,) = envoy.stream.pending()
    assert (cds.type_url, len(cds.resources)) == (CLUSTER, 2)
    assert [(r.type_url, len(r.resources)) for r in envoy.ack(cds)] == [(LISTENER, 1)]  # after the clusters


def test_a_reconnecting_proxy_reports_what_it_holds() -> None:
    cache = SnapshotCache()
    s = snap()
    cache.set(NODE, s)
    envoy = FakeEnvoy(cache)
    # After a control-plane restart Envoy's first request carries the version it runs, and no nonce.
    (response,) = envoy.request(CLUSTER, version=s.version(CLUSTER))
    assert status(cache).acked == {CLUSTER: s.version(CLUSTER)}
    assert response.version_info == s.version(CLUSTER)  # still answered: this stream has sent nothing


def test_first_request_must_name_the_node() -> None:
    envoy = FakeEnvoy(SnapshotCache(), node_id="")
    with pytest.raises(ValueError, match=r"node\.id"):
        envoy.request(CLUSTER)


def test_only_streams_of_the_node_whose_version_differs_are_woken() -> None:
    cache = SnapshotCache()
    cache.set(NODE, snap())
    cache.set("other", snap())
    mine, theirs = FakeEnvoy(cache), FakeEnvoy(cache, node_id="other")
    mine.subscribe_all()
    theirs.subscribe_all()
    cache.set(NODE, snap(0, 100))
    assert (mine.wakes, theirs.wakes) == (1, 0)


# --- convergence and status ----------------------------------------------------------------------------


def test_acked_version_converges_only_after_every_type_acks() -> None:
    cache = SnapshotCache()
    seen: list[ProxyStatus] = []
    unsubscribe = cache.subscribe(seen.append)
    first = snap(revision="rev1")
    cache.set(NODE, first)
    envoy = FakeEnvoy(cache)
    for t, names in ((CLUSTER, []), (ENDPOINT, ["v1", "v2"]), (LISTENER, [])):
        (response,) = envoy.request(t, names)
        envoy.ack(response, names)
        assert status(cache).acked_version is None
    (rds,) = envoy.request(ROUTE, ["web"])
    assert status(cache).acked_version is None
    envoy.ack(rds, ["web"])
    st = status(cache)
    assert (st.acked_version, st.acked_revision) == (first.version_all, "rev1")
    assert seen[-1] == st

    second = snap(0, 100, revision="rev2")
    cache.set(NODE, second)
    assert status(cache).acked_revision == "rev1"  # the previous converged value is kept meanwhile
    (pushed,) = envoy.stream.pending()
    envoy.ack(pushed, ["web"])
    assert (status(cache).acked_version, status(cache).acked_revision) == (second.version_all, "rev2")

    # A new revision with identical resources converges at once: nothing needs to be sent.
    cache.set(NODE, snap(0, 100, revision="rev3"))
    assert status(cache).acked_revision == "rev3"
    unsubscribe()
    envoy.stream.close()
    assert not status(cache).connected
    assert seen[-1].connected  # unsubscribed before the disconnect


def test_wait_converged() -> None:
    async def scenario() -> tuple[bool, bool]:
        cache = SnapshotCache()
        s = snap()
        cache.set(NODE, s)
        envoy = FakeEnvoy(cache)
        early = await cache.wait_converged(NODE, s.version_all, timeout=0.01)

        async def proxy() -> None:
            await asyncio.sleep(0.01)
            envoy.subscribe_all()

        task = asyncio.create_task(proxy())
        done = await cache.wait_converged(NODE, s.version_all, timeout=2)
        await task
        return early, done

    assert asyncio.run(scenario()) == (False, True)


def test_clear_forgets_the_snapshot_and_status() -> None:
    cache = SnapshotCache()
    cache.set(NODE, snap())
    assert cache.nodes() == [NODE] and cache.get(NODE) is not None
    cache.clear(NODE)
    assert cache.nodes() == [] and cache.get(NODE) is None


def test_set_threadsafe_needs_a_loop() -> None:
    with pytest.raises(RuntimeError, match="event loop"):
        SnapshotCache().set_threadsafe(NODE, snap())


# --- packing and bootstrap -----------------------------------------------------------------------------


def test_to_any_is_memoised_and_check_names_the_bad_resource() -> None:
    r = route("web", {"v1": 100})
    assert xds.to_any_bytes(ROUTE, r) is xds.to_any_bytes(ROUTE, dict(r))  # converted once, by content
    assert xds.to_any(ROUTE, r) == xds.to_any(ROUTE, dict(r))
    bad = {"name": "web", "virtual_hosts": [{"name": "all", "domians": ["*"]}]}
    with pytest.raises(ValueError, match=r"RouteConfiguration 'web'.*domians"):
        xds.check(ROUTE, bad)
    with pytest.raises(ValueError, match="unknown resource type"):
        xds.check("type.googleapis.com/envoy.config.nothing.v3.Nothing", {})
    for t, resources in snap().resources.items():
        for resource in resources.values():
            xds.check(t, resource)


def test_bootstrap_parses_as_envoy_bootstrap() -> None:
    config = bootstrap(node_id=NODE, cluster="c1", xds_host="127.0.0.1", xds_port=18000,
                       admin_host="127.0.0.1", admin_port=19000)  # fmt: skip
    msg = json_format.ParseDict(config, bootstrap_pb2.Bootstrap())
    assert msg.dynamic_resources.ads_config.set_node_on_first_message_only
    assert msg.static_resources.clusters[0].typed_extension_protocol_options
    argv = envoy_argv(config_path=Path("/tmp/x.json"))
    assert "--disable-hot-restart" in argv and argv[argv.index("--concurrency") + 1] == "1"


def test_response_wire_bytes_are_what_protobuf_would_send() -> None:
    from envoy.service.discovery.v3 import discovery_pb2

    from mesh.xds.server import Response

    big = "x" * 300  # long enough for a multi-byte varint length
    snap = Snapshot.of(clusters=[{"name": f"c{i}-{big}", "type": "STATIC", "connect_timeout": "1s"} for i in range(3)])
    body = tuple(xds.field_bytes(2, xds.to_any_bytes(CLUSTER, r)) for r in snap.items(CLUSTER).values())
    ours = Response(type_url=CLUSTER, version_info=snap.version(CLUSTER), nonce="7", body=body)  # in chunks
    theirs = discovery_pb2.DiscoveryResponse(version_info=snap.version(CLUSTER), type_url=CLUSTER, nonce="7")
    theirs.resources.extend(xds.to_any(CLUSTER, r) for r in snap.items(CLUSTER).values())
    assert discovery_pb2.DiscoveryResponse.FromString(ours.SerializeToString()) == theirs


def test_route_config_assembled_from_virtual_hosts_equals_protobufs_own() -> None:
    r = route("web", {"v1": 60, "v2": 40})
    other = {"name": "other", "domains": ["other"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "v1"}}]}
    r = {**r, "virtual_hosts": [*r["virtual_hosts"], other]}
    ours = xds.to_any(ROUTE, r)
    msg = route_pb2.RouteConfiguration()
    json_format.ParseDict(r, msg)
    assert route_pb2.RouteConfiguration.FromString(ours.value) == msg
    with pytest.raises(ValueError, match=r"virtual host 'other'.*domians"):
        xds.to_any(ROUTE, {"name": "x", "virtual_hosts": [{"name": "other", "domians": ["*"]}]})


def test_piecewise_serialisation_parses_to_what_protobuf_builds_for_every_golden_resource() -> None:
    """Field-by-field and per-virtual-host assembly must mean exactly what ParseDict of the whole means."""
    import json as _json

    golden = Path(__file__).parent / "golden"
    types = {"listeners": LISTENER, "routes": ROUTE, "clusters": CLUSTER, "endpoints": ENDPOINT}
    checked = 0
    for case in golden.glob("*/xds.json"):
        for snap_json in _json.loads(case.read_text()).values():
            for short, resources in snap_json.items():
                if short not in types:
                    continue
                for r in resources:
                    want = xds.message_class(types[short])()
                    json_format.ParseDict(r, want)
                    got = xds.message_class(types[short]).FromString(xds.to_any(types[short], r).value)
                    assert got == want, (case.parent.name, short, r.get("name"))
                    checked += 1
    assert checked > 100


def test_a_reconnecting_proxy_is_not_answered_empty_before_its_snapshot_exists() -> None:
    """After a control-plane restart the new cache is empty; a proxy that reconnects holding a config must
    keep serving it until its real snapshot arrives, not be told there are no listeners."""
    from mesh.xds.server import _StreamState

    cache = SnapshotCache()
    state = _StreamState(cache)
    req = discovery_pb2.DiscoveryRequest(type_url=CLUSTER, version_info="abc123")
    req.node.id = NODE
    assert state.on_request(req) == []  # holds its config: nothing sent yet
    s = snap()
    cache.set(NODE, s)
    [response] = state.pending()
    assert response.type_url == CLUSTER and response.version_info == s.version(CLUSTER)
    # A fresh proxy (no version) still gets an empty answer at once, so it starts without a 30 s wait.
    fresh = _StreamState(SnapshotCache())
    req2 = discovery_pb2.DiscoveryRequest(type_url=CLUSTER)
    req2.node.id = NODE
    assert [len(r.resources) for r in fresh.on_request(req2)] == [0]


def test_a_snapshot_is_serialised_where_it_is_built_and_serialise_ahead_redoes_only_what_was_dropped() -> None:
    """Building a snapshot (render's thread) serialises its resources, its digests being those of the
    bytes: an ADS stream finds them ready. serialise_ahead serialises what is missing, once per part."""
    from mesh.xds.server import forget_serialised, serialise_ahead

    unique = {"name": f"ahead-{id(object())}", "type": "STATIC", "connect_timeout": "7s"}  # new to the cache
    shared = Snapshot.of(listeners=[listener("web")], clusters=[cluster("v1"), unique])
    again = Snapshot.compose(clusters=shared.parts[CLUSTER], listeners=shared.parts[LISTENER])  # same parts
    d = shared.digests[CLUSTER][unique["name"]]
    assert d == hashlib.sha256(xds.to_any(CLUSTER, unique, content_digest=d).value).hexdigest()[:16]
    assert not xds.serialise_once(CLUSTER, unique, d)  # already there
    assert serialise_ahead([shared, again]) == 0
    forget_serialised()
    fresh = Snapshot.of(clusters=[cluster("v1"), unique])  # new parts, the same resources
    assert fresh.digests[CLUSTER][unique["name"]] == d  # equal content, equal digest
    assert serialise_ahead([fresh, fresh]) == 0  # bound again, so serialised again where it was built
    forget_serialised()
    assert serialise_ahead([fresh, fresh]) == 2  # dropped after it was built: redone, once for both
    assert serialise_ahead([fresh]) == 0
