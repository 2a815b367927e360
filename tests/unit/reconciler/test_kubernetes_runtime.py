"""The Kubernetes runtime's pure parts: which pods are proxies, where they are reached, who a token is,
and the GitSource's conditions. Attacks first: a token may only ever name the pod it was bound to."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from reconciler.runtime.base import Bind
from reconciler.runtime.kubernetes.conditions import gitsource_status
from reconciler.runtime.kubernetes.objects import PodEntry, pod_entry, slice_entries, topology
from reconciler.runtime.kubernetes.runtime import (
    KubernetesRuntime,
    ReviewedToken,
    ServiceAccountAuthenticator,
    parse_review,
)


def pod(name: str, *, service: str = "reviews", version: str = "v1", ip: str | None = "10.0.0.2",
        sa: str = "reviews", injected: bool = True, env: dict[str, str] | None = None,
        labels: dict[str, str] | None = None, deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": "shop",
                            "labels": labels if labels is not None else {"app": service, "version": version}}
    if injected:
        meta["labels"]["lockgate.io/injected"] = "true"
    if deleting:
        meta["deletionTimestamp"] = "2026-12-01T00:00:00Z"
    containers: list[dict[str, Any]] = [{"name": "app", "ports": [{"containerPort": 9080}]}]
    if injected:
        containers.append({"name": "lockgate-proxy", "env": [{"name": k, "value": v} for k, v in (env or {}).items()]})
    return {"metadata": meta, "spec": {"serviceAccountName": sa, "containers": containers},
            "status": {"podIP": ip} if ip else {}}


def a_slice(*endpoints: tuple[str, str, bool], port: int = 9080) -> dict[str, Any]:
    return {"metadata": {"name": "reviews-1", "namespace": "shop"}, "ports": [{"port": port}],
            "endpoints": [{"addresses": [a], "conditions": {"ready": r},
                           "targetRef": {"kind": "Pod", "name": p, "namespace": "shop"}} for p, a, r in endpoints]}


def entry(body: dict[str, Any]) -> PodEntry:
    e = pod_entry(body)
    assert e is not None
    return e


def test_only_injected_pods_that_name_a_service_and_version_are_proxies() -> None:
    assert pod_entry(pod("a", injected=False)) is None
    assert pod_entry(pod("a", labels={"app": "reviews"})) is None  # no version
    istio = entry(pod("a"))
    ours = entry(pod("b", labels={"lockgate.io/service": "reviews", "lockgate.io/version": "v2", "app": "x"}))
    assert (istio.service, istio.version) == ("reviews", "v1") and (ours.service, ours.version) == ("reviews", "v2")
    gw = pod_entry(pod("gw", labels={"lockgate.io/gateway": "ingress"}))
    assert gw is not None and gw.gateway == "ingress"


def test_ports_and_outbound_address_come_from_the_injected_env_and_bad_values_fall_back() -> None:
    e = entry(pod("a", env={"LOCKGATE_INBOUND_PORT": "16006", "LOCKGATE_OUTBOUND_PORT": "99999",
                            "LOCKGATE_OUTBOUND_ADDRESS": "10.0.0.2"}))
    assert (e.inbound_port, e.outbound_port, e.outbound_address) == (16006, 15001, "10.0.0.2")
    assert entry(pod("b")).outbound_address == "127.0.0.1"  # the default: no other pod can use it


def test_topology_reaches_pods_through_their_slice_entry_and_only_ready_ones_get_traffic() -> None:
    pods = [entry(pod("a", ip="10.0.0.2")), entry(pod("b", ip="10.0.0.3")), entry(pod("c", ip=None)),
            entry(pod("d", ip="10.0.0.5", deleting=True))]
    eps = slice_entries(a_slice(("a", "10.0.0.2", True), ("b", "10.0.0.3", False), ("d", "10.0.0.5", True),
                                ("ghost", "10.0.0.9", True)))
    topo = topology("east", pods, eps)
    assert [s.node_id for s in topo.sidecars] == ["east/shop/a", "east/shop/b", "east/shop/d"]  # c: no IP yet
    assert topo.ready == {"east/shop/a"}  # b unready, d terminating, ghost is no pod of ours
    a = topo.sidecars[0]
    assert (a.address, a.inbound_port, a.app_port, a.service_account) == ("10.0.0.2", 15006, 9080, "reviews")


class Reviews:
    """TokenReview as a test double: token -> who, counting calls; `fail` makes the API unreachable."""

    def __init__(self, table: dict[str, ReviewedToken]) -> None:
        self.table, self.calls, self.fail = table, 0, False

    async def __call__(self, token: str) -> ReviewedToken | None:
        self.calls += 1
        if self.fail:
            raise OSError("connection refused")
        return self.table.get(token)


def auth(reviews: Reviews, pods: list[PodEntry]) -> ServiceAccountAuthenticator:
    by_key = {(p.namespace, p.name): p for p in pods}
    return ServiceAccountAuthenticator(cluster="east", review=reviews, pods=lambda: by_key)


def test_a_token_names_its_own_pod_and_nothing_else() -> None:
    reviews = Reviews({
        "good": ReviewedToken("shop", "reviews", "a"),
        "other-sa": ReviewedToken("shop", "ratings", "a"),  # a ratings token claiming reviews' pod
        "unbound": ReviewedToken("shop", "reviews", None),  # legacy token: no pod
        "gone": ReviewedToken("shop", "reviews", "deleted-pod"),
    })
    a = auth(reviews, [entry(pod("a"))])
    assert asyncio.run(a.node_for("good")) == "east/shop/a"
    for token in ("other-sa", "unbound", "gone", "unknown"):
        assert asyncio.run(a.node_for(token)) is None, token


def test_an_unreachable_api_server_refuses_the_stream_and_a_cached_yes_never_outlives_the_pod() -> None:
    reviews = Reviews({"good": ReviewedToken("shop", "reviews", "a")})
    pods = {("shop", "a"): entry(pod("a"))}
    a = ServiceAccountAuthenticator(cluster="east", review=reviews, pods=lambda: pods)
    assert asyncio.run(a.node_for("good")) == "east/shop/a"
    reviews.fail = True
    assert asyncio.run(a.node_for("good")) == "east/shop/a"  # a reconnect burst costs no review
    assert reviews.calls == 1
    pods.clear()  # the pod is deleted: its token is nobody, cache or not
    assert asyncio.run(a.node_for("good")) is None
    assert asyncio.run(a.node_for("new")) is None  # the API is down: refused, not crashed


@pytest.mark.parametrize(("status", "expected"), [
    ({"authenticated": True, "audiences": ["lockgate"], "user": {
        "username": "system:serviceaccount:shop:reviews",
        "extra": {"authentication.kubernetes.io/pod-name": ["a"]}}}, ReviewedToken("shop", "reviews", "a")),
    ({"authenticated": False}, None),
    ({"authenticated": True, "audiences": ["kubernetes"], "user": {
        "username": "system:serviceaccount:shop:reviews"}}, None),  # minted for another audience
    ({"authenticated": True, "user": {"username": "alice"}}, None),  # a person, not a workload
    ({"authenticated": True, "user": {"username": "system:serviceaccount::x"}}, None),
])
def test_parse_review(status: dict[str, Any], expected: ReviewedToken | None) -> None:
    assert parse_review(status) == expected


def test_the_runtime_serves_only_its_own_cluster_and_tells_the_loop_only_on_change() -> None:
    rt = KubernetesRuntime(cluster="east", xds=Bind("127.0.0.1", 0), review=Reviews({}))
    calls: list[int] = []
    rt.on_change(lambda: calls.append(1))
    assert rt.serves("east") and not rt.serves("west")
    pods = [entry(pod("a"))]
    eps = slice_entries(a_slice(("a", "10.0.0.2", True)))
    rt.sync(pods, eps)
    rt.sync(pods, eps)  # the same: nothing to re-render
    assert len(calls) == 1 and rt.topology("east").ready == {"east/shop/a"}
    rt.sync(pods, slice_entries(a_slice(("a", "10.0.0.2", False))))
    assert len(calls) == 2 and rt.topology("east").ready == frozenset()
    assert rt.topology("west").sidecars == ()


def loop_status(*, applied: str | None, head: str | None, failed: str | None = None,
                errors: list[str] | None = None, acked: str | None = None, nack: str | None = None) -> dict[str, Any]:
    return {"revision": {"applied": applied, "head": head, "failed": failed, "lastError": errors or []},
            "clusters": [{"proxies": [{"id": "east/shop/a", "connected": True, "ackedRevision": acked,
                                       "nack": nack}]}],
            "source": {"lastError": None}}


def conditions(st: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in st["conditions"]}


def test_conditions_follow_the_loop() -> None:
    ok = gitsource_status(loop_status(applied="a" * 40, head="a" * 40, acked="a" * 40), generation=3)
    assert conditions(ok) == {"Ready": ("True", "Converged"), "Reconciling": ("False", "Converged"),
                              "Stalled": ("False", "Converged")}
    assert ok["appliedRevision"] == "a" * 40 and ok["observedGeneration"] == 3 and ok["proxies"]["converged"] == 1
    going = gitsource_status(loop_status(applied="b" * 40, head="b" * 40, acked="a" * 40), generation=3)
    assert conditions(going)["Reconciling"] == ("True", "Progressing") and conditions(going)["Ready"][0] == "True"
    bad = gitsource_status(loop_status(applied="a" * 40, head="c" * 40, failed="c" * 40, acked="a" * 40,
                                       errors=["routes.yaml:25: weights must sum to 100"]), generation=4,
                           previous=ok["conditions"])
    stalled = next(c for c in bad["conditions"] if c["type"] == "Stalled")
    assert conditions(bad)["Ready"] == ("False", "InvalidRevision") and stalled["status"] == "True"
    assert "routes.yaml:25:" in stalled["message"] and "still serving aaaaaaaaaaaa" in stalled["message"]
    nacked = gitsource_status(loop_status(applied="a" * 40, head="a" * 40, nack="bad listener"), generation=4)
    assert conditions(nacked)["Stalled"] == ("True", "ProxyRejected")
    spec = gitsource_status(None, generation=1, problem="invalid spec: url")
    assert conditions(spec)["Stalled"] == ("True", "InvalidSpec")


def test_a_condition_keeps_its_transition_time_while_its_status_holds() -> None:
    from datetime import UTC, datetime

    first = gitsource_status(loop_status(applied="a" * 40, head="a" * 40, acked="a" * 40), generation=1,
                             now=datetime(2026, 1, 1, tzinfo=UTC))
    later = gitsource_status(loop_status(applied="a" * 40, head="a" * 40, acked="a" * 40), generation=1,
                             previous=first["conditions"], now=datetime(2026, 1, 2, tzinfo=UTC))
    assert [c["lastTransitionTime"] for c in later["conditions"]] == ["2026-01-01T00:00:00Z"] * 3
