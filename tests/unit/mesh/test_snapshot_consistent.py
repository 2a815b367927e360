"""Snapshot.consistent over shared parts: its name sets are memoised by the parts' identities, and the
answer is still each snapshot's own, for parts checked before, new parts, and parts that died."""

from __future__ import annotations

import gc

import pytest

from mesh.xds.snapshot import InconsistentSnapshot, ResourceSet, Snapshot
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
    for i in range(50):  # parts die and new ones are made, ids come back
        names = (f"r{i}", f"s{i}")
        snap = Snapshot.compose(listeners=[ResourceSet([listener(names[0], 1), listener(names[1], 2)])],
                                routes=parts(*names))
        snap.consistent()
        wrong = Snapshot.compose(listeners=[ResourceSet([listener(names[0], 1)])], routes=parts(*names))
        with pytest.raises(InconsistentSnapshot, match="unreferenced"):
            wrong.consistent()
        del snap, wrong
        gc.collect()


def test_a_name_in_two_parts_is_still_found() -> None:
    snap = Snapshot.compose(listeners=[ResourceSet([listener("a", 1)])], routes=parts("a", "a"))
    with pytest.raises(InconsistentSnapshot, match="appears in two parts"):
        snap.consistent()
