"""Delta ADS bookkeeping by part: a stream compares only the parts render replaced (`_DeltaType.basis`,
`part_diff`), and what it sends is still exactly what differs from what the proxy holds. No network."""

from __future__ import annotations

import gc
import random
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from mesh.xds.cache import SnapshotCache
from mesh.xds.server import DeltaResponse
from mesh.xds.snapshot import CLUSTER, ENDPOINT, LISTENER, ResourceSet, Snapshot, part_diff
from tests.unit.mesh.test_ads_delta_protocol import NODE, FakeDeltaEnvoy, names
from tests.unit.mesh.test_ads_protocol import cluster, endpoints


def clusters(count: int, *, prefix: str = "c", timeout: Mapping[str, int] | None = None) -> list[dict[str, Any]]:
    """`count` EDS clusters `<prefix>0000`...; `timeout` gives some of them another connect_timeout."""
    out = []
    for i in range(count):
        name = f"{prefix}{i:04d}"
        out.append(dict(cluster(name), connect_timeout=f"{(timeout or {}).get(name, 1)}s"))
    return out


def cds(*parts: ResourceSet | Iterable[dict[str, Any]], revision: str = "r") -> Snapshot:
    return Snapshot.compose(clusters=[p if isinstance(p, ResourceSet) else ResourceSet(p) for p in parts],
                            revision=revision)


def held_after_connect(cache: SnapshotCache) -> FakeDeltaEnvoy:
    envoy = FakeDeltaEnvoy(cache)
    (first,) = envoy.request(CLUSTER)
    assert envoy.ack(first) == []
    return envoy


def only(responses: Sequence[DeltaResponse]) -> DeltaResponse:
    (response,) = responses
    return response


def test_a_part_replaced_by_an_equal_new_object_sends_nothing() -> None:
    cache = SnapshotCache()
    big, small = ResourceSet(clusters(1000)), ResourceSet(clusters(3, prefix="own"))
    cache.set(NODE, cds(big, small, revision="r1"))
    envoy = held_after_connect(cache)
    assert len(envoy.held[CLUSTER]) == 1003
    # Equal content in new objects (the dicts too): the type's version is the same, nothing goes out, and
    # the proxy counts as converged at the new revision.
    cache.set(NODE, cds(clusters(1000), clusters(3, prefix="own"), revision="r2"))
    assert envoy.stream.pending() == []
    assert cache.status()[NODE].acked_revision == "r2"
    # The big part replaced by an equal copy while the small one changes: only the small one's change.
    cache.set(NODE, cds(clusters(1000), clusters(3, prefix="own", timeout={"own0001": 5}), revision="r3"))
    response = only(envoy.stream.pending())
    assert (names(response), response.removed_resources) == (["own0001"], [])
    envoy.ack(response)
    assert cache.status()[NODE].acked_revision == "r3"


def test_one_changed_resource_in_a_thousand_resource_part_sends_exactly_that_one() -> None:
    cache = SnapshotCache()
    cache.set(NODE, Snapshot.compose(clusters=[ResourceSet(clusters(1000))], endpoints=[ResourceSet(
        [endpoints(f"c{i:04d}", 9000) for i in range(1000)], key="cluster_name")], revision="r1"))
    envoy = held_after_connect(cache)
    eds = only(envoy.request(ENDPOINT, [f"c{i:04d}" for i in range(1000)]))
    assert len(names(eds)) == 1000
    envoy.ack(eds)
    cache.set(NODE, Snapshot.compose(
        clusters=[ResourceSet(clusters(1000, timeout={"c0500": 7}))],
        endpoints=[ResourceSet([endpoints(f"c{i:04d}", 9001 if i == 17 else 9000) for i in range(1000)],
                               key="cluster_name")], revision="r2"))
    got = {r.type_url: r for r in envoy.stream.pending()}
    assert (names(got[CLUSTER]), got[CLUSTER].removed_resources) == (["c0500"], [])
    assert (names(got[ENDPOINT]), got[ENDPOINT].removed_resources) == (["c0017"], [])
    assert got[CLUSTER].resources[0].version == cache.get(NODE).digests[CLUSTER]["c0500"]  # type: ignore[union-attr]


def test_a_removed_part_sends_its_names_as_removed() -> None:
    cache = SnapshotCache()
    big = ResourceSet(clusters(1000))
    cache.set(NODE, cds(big, clusters(3, prefix="ext"), revision="r1"))
    envoy = held_after_connect(cache)
    cache.set(NODE, cds(big, revision="r2"))
    response = only(envoy.stream.pending())
    assert (names(response), response.removed_resources) == ([], ["ext0000", "ext0001", "ext0002"])
    envoy.ack(response)
    assert sorted(envoy.held[CLUSTER]) == sorted(big)
    assert cache.status()[NODE].acked_revision == "r2"


def test_a_name_moving_between_replaced_parts_is_sent_only_if_its_content_changed() -> None:
    cache = SnapshotCache()
    a, b = clusters(4, prefix="a"), clusters(4, prefix="b")
    cache.set(NODE, cds(a, b, revision="r1"))
    envoy = held_after_connect(cache)
    # a0003 moves to the second part unchanged, and b0000 moves to the first with new content.
    moved = dict(b[0], connect_timeout="9s")
    cache.set(NODE, cds([*a[:3], moved], [a[3], *b[1:]], revision="r2"))
    response = only(envoy.stream.pending())
    assert (names(response), response.removed_resources) == (["b0000"], [])
    envoy.ack(response)
    assert envoy.held[CLUSTER] == dict(cache.get(NODE).digests[CLUSTER])  # type: ignore[union-attr]


def test_reconnect_with_a_version_map_then_later_changes_compare_by_part() -> None:
    cache = SnapshotCache()
    old = cds(clusters(1000), revision="r1")
    reported = {n: d for n, d in old.digests[CLUSTER].items() if n != "c0002"}  # c0002: never received
    reported["gone"] = "abc"  # held from an older configuration, no longer in the snapshot
    cache.set(NODE, cds(clusters(1000, timeout={"c0001": 3}), revision="r2"))
    envoy = FakeDeltaEnvoy(cache)
    envoy.held[CLUSTER] = dict(reported)
    response = only(envoy.request(CLUSTER, initial=reported))
    assert (names(response), response.removed_resources) == (["c0001", "c0002"], [])
    envoy.ack(response)
    # "gone" waits for the listeners (and routes) it held to be replaced: it may still be named by them.
    removal = only(envoy.ack(only(envoy.request(LISTENER, initial={}))))
    assert (names(removal), removal.removed_resources) == ([], ["gone"])
    envoy.ack(removal)
    assert envoy.held[CLUSTER] == dict(cache.get(NODE).digests[CLUSTER])  # type: ignore[union-attr]
    cache.set(NODE, cds(clusters(1000, timeout={"c0001": 3, "c0999": 4}), revision="r3"))
    assert names(only(envoy.stream.pending())) == ["c0999"]


def test_subscribing_to_a_name_of_an_unchanged_part_sends_it_and_nothing_else() -> None:
    cache = SnapshotCache()
    eps = ResourceSet([endpoints(f"e{i}", 9000 + i) for i in range(10)], key="cluster_name")
    cache.set(NODE, Snapshot.compose(endpoints=[eps], revision="r1"))
    envoy = FakeDeltaEnvoy(cache)
    envoy.ack(only(envoy.request(ENDPOINT, ["e1", "e2"])))
    assert names(only(envoy.request(ENDPOINT, ["e5"]))) == ["e5"]
    # Unsubscribed, then changed: not sent, and not named as removed when it goes.
    assert envoy.request(ENDPOINT, unsubscribe=["e2"]) == []
    cache.set(NODE, Snapshot.compose(endpoints=[ResourceSet(
        [endpoints(f"e{i}", 9100 + i) for i in range(10) if i != 2], key="cluster_name")], revision="r2"))
    response = only(envoy.stream.pending())
    assert (names(response), response.removed_resources) == (["e1", "e5"], [])


def test_part_diff_is_computed_once_per_pair_and_holds_the_older_part_weakly() -> None:
    old, new = ResourceSet(clusters(5)), ResourceSet(clusters(6, timeout={"c0000": 2}))
    diff = part_diff(old, new)
    assert part_diff(old, new) is diff  # shared by every stream that moves from `old` to `new`
    assert (sorted(diff.changed), sorted(diff.added), sorted(diff.removed)) == (["c0000", "c0005"], ["c0005"], [])
    assert dict(diff.changed) == {n: new.digests[n] for n in ("c0000", "c0005")}
    assert sorted(part_diff(new, old).removed) == ["c0005"]
    ref = weakref.ref(old)
    del old, diff
    gc.collect()
    assert ref() is None  # `new` does not keep the generation before it alive


def test_random_part_histories_keep_the_proxy_exactly_in_sync_with_minimal_responses() -> None:
    """Parts kept, copied, edited, split, merged, dropped and added at random, names moving between them,
    subscriptions changing:
    after every push the proxy holds exactly the wanted resources, and each response carried only names
    whose content differed from what it held (and removals only of names it held)."""
    rng = random.Random(15)
    cache = SnapshotCache()
    universe = [f"n{i:03d}" for i in range(60)]
    content = {n: 1 for n in universe}

    def make(group: Sequence[str]) -> tuple[ResourceSet, ResourceSet]:
        return (ResourceSet(dict(cluster(n), connect_timeout=f"{content[n]}s") for n in group),
                ResourceSet([endpoints(n, 9000 + content[n]) for n in group], key="cluster_name"))

    groups = [universe[0:20], universe[20:40], universe[40:50]]
    parts = [make(g) for g in groups]
    subscribed = set(rng.sample(universe, 25))

    def publish(revision: str) -> Snapshot:
        s = Snapshot.compose(clusters=[p[0] for p in parts], endpoints=[p[1] for p in parts], revision=revision)
        cache.set(NODE, s)
        return s

    s = publish("r0")
    envoy = FakeDeltaEnvoy(cache)
    envoy.ack(only(envoy.request(CLUSTER)))
    envoy.ack(only(envoy.request(ENDPOINT, sorted(subscribed))))
    for step in range(1, 300):
        action = rng.choice(["edit", "copy", "move", "drop", "add", "split", "merge", "subscribe", "unsubscribe",
                             "keep"])
        if action == "edit" and groups:
            i = rng.randrange(len(groups))
            for n in rng.sample(groups[i], min(2, len(groups[i]))):
                content[n] += 1
            parts[i] = make(groups[i])
        elif action == "copy" and groups:
            i = rng.randrange(len(groups))
            parts[i] = make(groups[i])
        elif action == "move" and len(groups) > 1 and groups[0]:
            name = groups[0].pop(rng.randrange(len(groups[0])))
            groups[1].append(name)
            content[name] += rng.randrange(2)
            parts[0], parts[1] = make(groups[0]), make(groups[1])
        elif action == "drop" and groups:
            i = rng.randrange(len(groups))
            del groups[i], parts[i]
        elif action == "add":
            used = {n for g in groups for n in g}
            fresh = [n for n in universe if n not in used][:rng.randrange(1, 8)]
            groups.insert(rng.randrange(len(groups) + 1), fresh)
            parts.insert(groups.index(fresh), make(fresh))
        elif action == "split" and groups and len(groups[0]) > 1:
            cut = rng.randrange(1, len(groups[0]))
            groups[0:1] = [groups[0][:cut], groups[0][cut:]]
            parts[0:1] = [make(groups[0]), make(groups[1])]
        elif action == "merge" and len(groups) > 1:
            groups[0:2] = [groups[0] + groups[1]]
            parts[0:2] = [make(groups[0])]
        elif action == "subscribe":
            more = set(rng.sample(universe, 3)) - subscribed
            subscribed |= more
            for r in envoy.request(ENDPOINT, sorted(more)):
                check_and_ack(envoy, r, s)
        elif action == "unsubscribe" and subscribed:
            less = set(rng.sample(sorted(subscribed), min(3, len(subscribed))))
            subscribed -= less
            for n in less:  # Envoy drops what it unsubscribes from
                envoy.held.get(ENDPOINT, {}).pop(n, None)
            for r in envoy.request(ENDPOINT, unsubscribe=sorted(less)):
                check_and_ack(envoy, r, s)
        s = publish(f"r{step}")
        for r in envoy.stream.pending():
            check_and_ack(envoy, r, s)
        want = {CLUSTER: dict(s.digests[CLUSTER]),
                ENDPOINT: {n: d for n, d in s.digests[ENDPOINT].items() if n in subscribed}}
        assert {t: envoy.held.get(t, {}) for t in want} == want, (step, action)
        assert cache.status()[NODE].acked_revision == f"r{step}", (step, action)


def check_and_ack(envoy: FakeDeltaEnvoy, response: DeltaResponse, snapshot: Snapshot) -> None:
    held = envoy.held.get(response.type_url, {})
    new = snapshot.digests[response.type_url]
    for r in response.resources:
        assert held.get(r.name) != new[r.name], f"{r.name} resent unchanged"
    assert set(response.removed_resources) <= set(held), "removed a name the proxy does not hold"
    assert envoy.ack(response) == []


def test_a_sotw_nack_names_exactly_the_resources_that_differ_from_the_accepted_version() -> None:
    cache = SnapshotCache()
    big = ResourceSet(clusters(1000))
    a, b = clusters(4, prefix="a"), clusters(4, prefix="b")
    accepted = cds(big, a, b, revision="r1")
    cache.set(NODE, accepted)
    cache.applied(NODE, CLUSTER, accepted.version(CLUSTER))
    # big kept; a0001 changed, a0003 moved to the other part unchanged, b0000 removed, x0000 added.
    bad = cds(big, [a[0], dict(a[1], connect_timeout="8s"), a[2]], [a[3], *b[1:], *clusters(1, prefix="x")],
              revision="r2")
    cache.set(NODE, bad)
    cache.rejected(NODE, CLUSTER, version=bad.version(CLUSTER), message="bad cluster")
    st = cache.status()[NODE]
    assert (st.nack, st.nack_resources) == ("bad cluster", ("a0001", "x0000"))
    old, new = accepted.digests[CLUSTER], bad.digests[CLUSTER]
    assert st.nack_resources == tuple(sorted(n for n in new if old.get(n) != new[n]))
