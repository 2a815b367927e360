"""Snapshot.consistent over shared parts: its name sets are memoised by the parts' identities, and the
answer is still each snapshot's own, for parts checked before, new parts, and parts that died."""

from __future__ import annotations

import gc

import pytest

from mesh.xds.snapshot import ROUTE, InconsistentSnapshot, ResourceSet, Snapshot
from tests.unit.mesh.test_ads_protocol import listener, route


def parts(*route_names: str) -> list[ResourceSet]:
    return [ResourceSet([route(n, {"v1": 100})]) for n in route_names]


def test_the_same_route_parts_in_many_snapshots_are_judged_by_each_snapshots_listeners() -> None:
    shared = parts("a", "b")
    good = Snapshot.compose(listeners=[ResourceSet([listener("a", 1), listener("b", 2)])], routes=shared)
    good.consistent()
    missing = Snapshot.compose(listeners=[ResourceSet([listener("a", 1), listener("c", 2)])], routes=shared)
    with pytest.raises(InconsistentSnapshot, match=r"missing route configuration\(s\) \['c'\].*unreferenced.*'b'"):
        missing.consistent()
    good.consistent()  # asked again, after the other: still fine


def test_new_parts_after_old_ones_died_are_not_mistaken_for_them() -> None:
    seen: set[int] = set()
    reused = 0
    for i in range(50):  # parts die and new ones are made, ids come back
        names = (f"r{i}", f"s{i}")
        shared = parts(*names)
        reused += len({id(p) for p in shared} & seen)
        seen |= {id(p) for p in shared}
        snap = Snapshot.compose(listeners=[ResourceSet([listener(names[0], 1), listener(names[1], 2)])],
                                routes=shared)
        snap.consistent()
        wrong = Snapshot.compose(listeners=[ResourceSet([listener(names[0], 1)])], routes=parts(*names))
        with pytest.raises(InconsistentSnapshot, match="unreferenced"):
            wrong.consistent()
        del snap, wrong, shared
        # The youngest generation is enough to free them (a full collection walks the whole suite's heap:
        # 50 of them took 89 s late in a full run).
        gc.collect(0)
    assert reused > 0  # the case under test happened: a new part got a dead one's id


def test_a_name_in_two_parts_is_still_found() -> None:
    snap = Snapshot.compose(listeners=[ResourceSet([listener("a", 1)])], routes=parts("a", "a"))
    with pytest.raises(InconsistentSnapshot, match="appears in two parts"):
        snap.consistent()


def reference(snap: Snapshot) -> str | None:
    """What consistent() must say, by plain set algebra over the whole snapshot (no memo, no split)."""
    from mesh.xds.snapshot import CLUSTER, ENDPOINT, LISTENER, PUSH_ORDER, ROUTE, SCOPED_ROUTE, SECRET

    def refs(types: tuple[str, ...], which: int) -> set[str]:
        return {n for t in types for p in snap.parts[t] for n in p.refs()[which]}

    problems = []
    names = {t: {n for p in snap.parts[t] for n in p} for t in PUSH_ORDER}
    for t in PUSH_ORDER:
        if len(snap.parts[t]) > 1 and sum(len(p) for p in snap.parts[t]) != len(names[t]):
            problems.append(f"a {t.rsplit('.', 1)[-1]} name appears in two parts")
    for kind, want, have in (("route configuration", refs((LISTENER, SCOPED_ROUTE), 0), names[ROUTE]),
                             ("endpoint set", refs((CLUSTER,), 1), names[ENDPOINT])):
        if missing := sorted(want - have):
            problems.append(f"missing {kind}(s) {missing}")
        if extra := sorted(have - want):
            problems.append(f"unreferenced {kind}(s) {extra}")
    if missing := sorted(refs(tuple(t for t in PUSH_ORDER if t != SECRET), 2) - names[SECRET]):
        problems.append(f"missing secret(s) {missing}")
    return "; ".join(problems) or None


def test_consistent_says_what_plain_set_algebra_says_over_random_shared_parts() -> None:
    """Parts large and small (the split at `_SMALL`), shared between snapshots and not, with names
    missing, unreferenced, repeated across parts and secrets missing: the same verdict as the whole
    snapshot's sets give, word for word."""
    import random

    def cluster(name: str, secret: str | None) -> dict[str, object]:
        c: dict[str, object] = {"name": name, "type": "EDS", "eds_cluster_config": {"service_name": name}}
        if secret is not None:
            c["transport_socket"] = {"name": "tls", "typed_config": {"common_tls_context": {
                "tls_certificate_sds_secret_configs": [{"name": secret, "sds_config": {"ads": {}}}]}}}
        return c

    rng = random.Random(15)
    pool = [f"n{i}" for i in range(40)]
    chunks = [pool[0:1], pool[1:4], pool[4:13], pool[13:33], pool[32:34]]  # the last repeats a name of another
    shared_routes = [ResourceSet([route(n, {"v1": 100}) for n in chunk]) for chunk in chunks]
    shared_clusters = [ResourceSet([cluster(n, None) for n in chunk]) for chunk in (pool[:2], pool[2:14], pool[13:15])]
    seen: dict[bool, int] = {True: 0, False: 0}
    for _ in range(400):
        routes = rng.sample(shared_routes[:4] if rng.random() < 0.9 else shared_routes, rng.randint(1, 3))
        names = sorted({n for p in routes for n in p})
        dropped = rng.choice(names) if rng.random() < 0.1 else None
        refs = [n for n in names if n != dropped] + ([rng.choice(pool)] if rng.random() < 0.1 else [])
        cut = rng.randint(0, len(refs))  # listeners in one or two parts, small or large
        listeners = [ResourceSet([listener(n, i) for i, n in enumerate(part)]) for part in (refs[:cut], refs[cut:])]
        clusters = rng.sample(shared_clusters[:2] if rng.random() < 0.9 else shared_clusters, rng.randint(1, 2))
        own_secret = "s-own" if rng.random() < 0.5 else None
        clusters.append(ResourceSet([cluster(f"own{rng.randint(0, 3)}", own_secret)]))
        eds = sorted({n for p in clusters for n in p})
        lost = rng.choice(eds) if rng.random() < 0.1 else None
        endpoints = [ResourceSet([{"cluster_name": n, "endpoints": []} for n in eds if n != lost]
                                 + ([{"cluster_name": "stray", "endpoints": []}] if rng.random() < 0.05 else []),
                                 key="cluster_name")]
        secrets = [ResourceSet([{"name": "s-own"}])] if rng.random() < 0.9 else []
        snap = Snapshot.compose(listeners=listeners, routes=routes, clusters=clusters, endpoints=endpoints,
                                secrets=secrets)
        want = reference(snap)
        try:
            snap.consistent()
            got = None
        except InconsistentSnapshot as exc:
            got = str(exc)
        assert got == want
        seen[want is None] += 1
    assert seen[True] > 50 and seen[False] > 50, seen  # both verdicts were exercised


def test_secret_names_are_found_at_any_depth_in_dicts_lists_tuples_and_read_only_mappings() -> None:
    from types import MappingProxyType

    from mesh.xds.snapshot import _sds_names

    sds = {"ads": {}}
    resource = {"name": "c", "n": 3, "none": None, "transport_socket": {"typed_config": {"common_tls_context": {
        "tls_certificate_sds_secret_configs": [{"name": "cert", "sds_config": sds}],
        "combined_validation_context": ({"validation_context_sds_secret_config": MappingProxyType(
            {"name": "bundle", "sds_config": sds})},)}}},
        "other": [["x", 1.5, {"name": "not-a-secret"}]]}
    assert _sds_names(resource) == {"cert", "bundle"}
    assert _sds_names({"name": "plain"}) == set()


def test_a_verdict_is_carried_only_past_parts_with_the_same_names_and_references() -> None:
    """`Snapshot.compose(previous=)`: a checked snapshot's verdict holds for its successor only where each
    changed part names and refers to what the part it replaces did."""
    listeners = ResourceSet([listener("a", 1), listener("b", 2)])
    good = Snapshot.compose(listeners=[listeners], routes=parts("a", "b"))
    good.consistent()
    same_names = Snapshot.compose(listeners=[listeners], routes=[*parts("a"), ResourceSet([route("b", {"v2": 100})])],
                                  previous=good)
    assert same_names._checked  # carried: nothing it is judged by changed
    same_names.consistent()
    renamed = Snapshot.compose(listeners=[listeners], routes=parts("a", "c"), previous=good)
    with pytest.raises(InconsistentSnapshot, match=r"missing route configuration\(s\) \['b'\]"):
        renamed.consistent()
    rereferred = Snapshot.compose(listeners=[ResourceSet([listener("a", 1), listener("c", 2)])], routes=parts("a", "b"),
                                  previous=good)
    with pytest.raises(InconsistentSnapshot, match=r"missing route configuration\(s\) \['c'\]"):
        rereferred.consistent()
    unchecked = Snapshot.compose(listeners=[listeners], routes=parts("a", "b"))
    after = Snapshot.compose(listeners=[listeners], routes=unchecked.parts[ROUTE], previous=unchecked)
    assert not after._checked  # nothing to carry: the previous one was never checked
