"""every_service_identity gives, from one pass over the Workloads, what service_identities gives asked one
service and version at a time (what render asked 3000 times per render at 1000 services)."""

from __future__ import annotations

from policies.identity import every_service_identity, service_identities
from reconciler.load import load

MESH = """apiVersion: lockgate.io/v1alpha1
kind: Mesh
metadata: {name: mesh}
spec: {trustDomain: example.org, clusters: [{name: east}]}
"""


def doc(kind: str, name: str, ns: str, spec: str) -> str:
    return (f"---\napiVersion: lockgate.io/v1alpha1\nkind: {kind}\n"
            f"metadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n")


def workload(name: str, ns: str, service: str, version: str, account: str | None = None) -> str:
    sa = f", serviceAccount: {account}" if account else ""
    spec = f"{{service: {service}, version: {version}, clusters: [east], command: [app]{sa}}}"
    return doc("Workload", name, ns, spec)


def test_one_pass_equals_asking_each_service_and_version() -> None:
    text = MESH + "".join([
        doc("Service", "reviews", "shop", "{ports: [{name: http, port: 80}], versions: [v1, v2, v3]}"),
        doc("Service", "reviews", "other", "{ports: [{name: http, port: 80}], versions: [v1]}"),
        doc("Service", "lonely", "shop", "{ports: [{name: http, port: 80}], versions: [v1]}"),
        workload("reviews-v1", "shop", "reviews", "v1"),
        workload("reviews-v1-b", "shop", "reviews", "v1", "reviewer"),
        workload("reviews-v2", "shop", "reviews", "v2", "zeta"),
        workload("reviews-o", "other", "reviews", "v1", "elsewhere"),
    ])
    loaded = load({"mesh.yaml": text.encode()})
    assert loaded.intent is not None, loaded.problems
    intent = loaded.intent
    every = every_service_identity(intent)
    asked = {(ns, svc, v): service_identities(intent, ns, svc, v)
             for (ns, svc), s in intent.services.items() for v in (None, *s.spec.versions)}
    assert every == asked
    sa = "spiffe://example.org/ns/shop/sa/"
    assert every[("shop", "reviews", None)] == [sa + "reviewer", sa + "reviews", sa + "zeta"]
    assert every[("shop", "reviews", "v3")] == [sa + "reviews"]  # no Workload: the service's name
    assert every[("other", "reviews", None)] == ["spiffe://example.org/ns/other/sa/elsewhere"]
    assert every[("shop", "lonely", "v1")] == [sa + "lonely"]


def test_the_expected_identities_are_kept_while_services_and_workloads_are_the_same_objects() -> None:
    from policies.render import _expected_sans

    base = MESH + doc("Service", "reviews", "shop", "{ports: [{name: http, port: 80}], versions: [v1]}")
    first = load({"mesh.yaml": base.encode(), "w.yaml": workload("reviews-v1", "shop", "reviews", "v1").encode()})
    route = doc("Route", "reviews", "shop", "{service: reviews, http: [{route: [{version: v1}]}]}")
    again = load({"mesh.yaml": base.encode(), "w.yaml": workload("reviews-v1", "shop", "reviews", "v1").encode(),
                  "r.yaml": route.encode()})
    moved = load({"mesh.yaml": base.encode(),
                  "w.yaml": workload("reviews-v1", "shop", "reviews", "v1", "moved").encode()})
    assert first.intent is not None and again.intent is not None and moved.intent is not None
    kept = _expected_sans(first.intent)
    assert _expected_sans(again.intent)[0] is kept[0]  # a Route commit: the same Services and Workloads
    changed = _expected_sans(moved.intent)
    assert changed[0] is not kept[0] and changed[1] != kept[1]
    assert changed[0]["outbound|reviews.shop|v1"] == ["spiffe://example.org/ns/shop/sa/moved"]
    assert kept[0]["outbound|reviews.shop|v1"] == ["spiffe://example.org/ns/shop/sa/reviews"]
