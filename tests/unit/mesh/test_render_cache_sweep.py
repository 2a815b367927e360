"""The render cache holds what the mesh has now, not everything it ever had (`context.Swept`).

Before, a commit that added a service left the last render's reach (and with it a set of every cluster,
every endpoint and its scopes) in the cache for as long as the reconciler ran: 0.4 MB per such commit at
1000 services. A render of every service now drops what it did not use; a render of the changed services
only drops nothing, and what a later one-route render reuses keeps its identity."""

from __future__ import annotations

from typing import Any

import pytest

import mesh.render.build as build
import mesh.render.routes as routes
from mesh.intent import Intent
from mesh.render import RenderCache, render
from mesh.render.context import Swept
from mesh.xds.snapshot import SCOPED_ROUTE, Snapshot
from reconciler.load import load
from reconciler.pipeline import planned_topology

HEAD = "apiVersion: lockgate.io/v1alpha1\n"
MEMOS = ("routes", "clusters", "vhosts", "configs", "sets")


def intent(services: int, *, weights: dict[int, int] | None = None, hosts: dict[int, str] | None = None) -> Intent:
    """`services` services in 3 namespaces, each with a Route (weights v1/v2, a host) and a Workload."""
    weights, hosts = weights or {}, hosts or {}
    files = {"mesh.yaml": (HEAD + "kind: Mesh\nmetadata: {name: m}\n"
                           "spec: {trustDomain: example.org, clusters: [{name: east}]}\n").encode()}
    for i in range(services):
        ns, w = f"ns{i % 3}", weights.get(i, 0)
        files[f"{ns}/s{i}.yaml"] = "---\n".join(HEAD + d for d in (
            f"kind: Service\nmetadata: {{name: s{i}, namespace: {ns}}}\n"
            "spec: {ports: [{name: http, port: 80}], versions: [v1, v2]}\n",
            f"kind: Route\nmetadata: {{name: s{i}, namespace: {ns}}}\nspec:\n  service: s{i}\n"
            f"  hosts: [{hosts.get(i, f's{i}.example.com')}]\n  http:\n"
            f"    - name: default\n      route: [{{version: v1, weight: {100 - w}}}, {{version: v2, weight: {w}}}]\n",
            f"kind: Workload\nmetadata: {{name: s{i}-v1, namespace: {ns}}}\n"
            f"spec: {{service: s{i}, version: v1, replicas: 1, clusters: [east], command: [app]}}\n",
        )).encode()
    loaded = load(files)
    assert loaded.intent is not None, loaded.problems[:3]
    return loaded.intent


def rendered(it: Intent, cache: RenderCache, revision: str) -> dict[str, Snapshot]:
    return render(intent=it, topology=planned_topology(it, "east"), revision=revision, cache=cache)


def keys(cache: RenderCache) -> dict[str, set[Any]]:
    return {name: set(getattr(cache, name)) for name in MEMOS}


@pytest.fixture(autouse=True)
def small_buckets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(routes, "BUCKET_SIZE", 2)  # several buckets per namespace: some kept, some rebuilt
    monkeypatch.setattr(build, "DIRTY_SHARE", 2)


def test_swept_forgets_only_what_was_not_used_since_track() -> None:
    memo: Swept[str, tuple[int]] = Swept()
    memo["a"], memo["b"], memo["c"] = (1,), (2,), (3,)
    assert memo.sweep(drop=True) == 0  # never tracked: nothing is known to be unused
    memo.track()
    assert memo.get("a") == (1,)
    assert memo.get("zz") is None
    memo["d"] = (4,)
    assert memo.sweep(drop=True) == 2
    assert set(memo) == {"a", "d"}
    assert not memo.tracking
    memo.track()
    assert memo.sweep(drop=False) == 0 and set(memo) == {"a", "d"}


def test_a_mesh_that_grows_one_service_per_commit_keeps_a_cache_the_size_of_a_fresh_one() -> None:
    """Each commit adds a service to a namespace: a new reach, new scopes for that namespace's bucket."""
    cache = RenderCache()
    for n in range(12, 20):
        rendered(intent(n), cache, f"r{n}")
    fresh = RenderCache()
    rendered(intent(19), fresh, "r19")
    assert keys(cache) == keys(fresh)
    assert len(cache.sets) == len(fresh.sets)


def test_a_mesh_that_loses_services_forgets_their_routes_clusters_and_virtual_hosts() -> None:
    cache = RenderCache()
    rendered(intent(15), cache, "a")
    rendered(intent(9), cache, "b")
    fresh = RenderCache()
    rendered(intent(9), fresh, "b")
    assert keys(cache) == keys(fresh)
    assert not any(key[:2] == ("ns0", "s12") for key in [*cache.routes, *cache.clusters, *cache.vhosts])


def test_a_changed_host_leaves_no_virtual_host_of_the_old_one_behind() -> None:
    cache = RenderCache()
    rendered(intent(9), cache, "a")
    rendered(intent(9, hosts={4: "moved.example.com"}), cache, "b")
    fresh = RenderCache()
    rendered(intent(9, hosts={4: "moved.example.com"}), fresh, "b")
    assert keys(cache) == keys(fresh)
    assert not any("s4.example.com" in key for key in cache.vhosts)


def test_a_render_of_the_changed_services_only_sweeps_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    cache = RenderCache()
    rendered(intent(12), cache, "a")
    before = keys(cache)
    answers: list[Any] = []
    real = build.changed_services

    def recorded(*args: Any, **kwargs: Any) -> Any:
        answers.append(real(*args, **kwargs))
        return answers[-1]

    monkeypatch.setattr(build, "changed_services", recorded)
    rendered(intent(12, weights={5: 30}), cache, "b")
    assert answers == [frozenset({("ns2", "s5")})]
    assert keys(cache) == before
    assert not cache.configs.tracking and not cache.sets.tracking


def test_after_a_sweeping_render_a_one_route_commit_keeps_every_untouched_scope_object() -> None:
    """The scopes of a bucket a full render takes whole (`routes._keep`) are kept in the cache too: a later
    commit that rebuilds that bucket reuses them, so the scope sets stay the same objects and a proxy's
    snapshot changes in its route configurations only. Swept away, they would be made afresh (equal, but
    new objects: new digests to take and a part the delta server diffs again)."""
    cache = RenderCache()
    rendered(intent(12), cache, "a")
    grown = rendered(intent(13), cache, "b")  # s12 lands in ns0: a full render, which sweeps
    after = rendered(intent(13, weights={4: 20}), cache, "c")  # s4 is in ns1: a bucket the full render kept
    for node, snap in after.items():
        old, new = grown[node].parts.get(SCOPED_ROUTE, ()), snap.parts.get(SCOPED_ROUTE, ())
        assert len(old) == len(new)
        assert all(a is b for a, b in zip(old, new, strict=True)), node
