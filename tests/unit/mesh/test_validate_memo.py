"""validate keeps the findings of a resource's own checks while it and what they read are the same objects
(mesh.validate `_OwnChecks`): what it reports must be exactly what a first validation of the same resources
reports, whatever was kept, moved or replaced."""

from __future__ import annotations

from collections.abc import Sequence

from mesh.intent import ResourceBase, Route, Service
from mesh.validate import Finding, _OwnChecks, validate
from reconciler.load import load

MESH = b"""apiVersion: lockgate.io/v1alpha1
kind: Mesh
metadata: {name: mesh}
spec: {trustDomain: example.org, clusters: [{name: east}]}
"""


def service(name: str, versions: str) -> bytes:
    return (f"apiVersion: lockgate.io/v1alpha1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\n"
            f"spec: {{ports: [{{name: http, port: 80}}], versions: [{versions}]}}\n").encode()


def route(name: str, weights: tuple[int, int]) -> bytes:
    return (f"apiVersion: lockgate.io/v1alpha1\nkind: Route\nmetadata: {{name: {name}, namespace: shop}}\n"
            f"spec:\n  service: {name}\n  http:\n    - route: [{{version: v1, weight: {weights[0]}}},"
            f" {{version: v2, weight: {weights[1]}}}]\n").encode()


def resources(files: dict[str, bytes]) -> list[ResourceBase]:
    loaded = load(files)
    return list(loaded.resources)


def cold(rs: Sequence[ResourceBase]) -> list[Finding]:
    """What validate reports with nothing kept."""
    _OwnChecks.last = {}
    return validate(rs)


def test_kept_findings_follow_their_resource_and_what_it_reads() -> None:
    files = {"mesh.yaml": MESH, "a.yaml": service("a", "v1, v1, v2") + b"---\n" + route("a", (50, 40)),
             "b.yaml": service("b", "v1, v2") + b"---\n" + route("b", (50, 50))}
    first = resources(files)
    assert sorted(f.message for f in cold(first)) == [
        "duplicate version 'v1'", "weights must sum to 100, got 50 + 40 = 90"]

    # Moved: the same objects at other positions report at their new indexes.
    validate(first)
    moved = list(reversed(first))
    found = validate(moved)
    assert found == cold(moved)
    a = [k for k, r in enumerate(moved) if r.metadata.name == "a"]
    assert sorted(f.index for f in found) == a

    # b's Service loses v2: its unchanged Route must be checked again (it reads the Service).
    b_service = next(r for r in resources({**files, "b.yaml": service("b", "v1") + b"---\n" + route("b", (50, 50))})
                     if isinstance(r, Service) and r.metadata.name == "b")
    validate(first)
    replaced = [b_service if isinstance(r, Service) and r.metadata.name == "b" else r for r in first]
    assert any(isinstance(r, Route) and r.metadata.name == "b" for r in replaced)
    found = validate(replaced)
    assert found == cold(replaced)
    assert "service 'b' has no version 'v2' (declared: v1)" in [f.message for f in found]

    # Fixed: a's Route replaced by a valid one, its finding goes; a's Service keeps its own.
    fixed = resources({**files, "a.yaml": service("a", "v1, v1, v2") + b"---\n" + route("a", (60, 40))})
    validate(first)
    assert [f.message for f in validate(fixed)] == ["duplicate version 'v1'"] == [f.message for f in cold(fixed)]


def test_the_memo_holds_only_what_the_last_call_used() -> None:
    files = {"mesh.yaml": MESH, **{f"s{k}.yaml": service(f"s{k}", "v1, v2") + b"---\n" + route(f"s{k}", (50, 50))
                                   for k in range(5)}}
    rs = resources(files)
    validate(rs)
    assert len(_OwnChecks.last) == 10
    validate(rs[:3])  # the Mesh, s0's Service and Route
    assert len(_OwnChecks.last) == 2
