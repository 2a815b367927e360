"""Intent.of_kind is memoised on the resources tuple: the same answer as a scan, for every intent, its
copies, and intents with other resources; the list it returns is the caller's own."""

from __future__ import annotations

from mesh.intent import Intent, Route, Service
from reconciler.load import load


def intent(services: int, *, extra_route: bool = False) -> Intent:
    files = {"mesh.yaml": b"apiVersion: lockgate.io/v1alpha1\nkind: Mesh\nmetadata: {name: m}\n"
                          b"spec: {trustDomain: t.local, clusters: [{name: c1}]}\n"}
    for i in range(services):
        doc = (f"apiVersion: lockgate.io/v1alpha1\nkind: Service\nmetadata: {{name: s{i}, namespace: ns}}\n"
               "spec: {ports: [{name: http, port: 80}], versions: [v1]}\n")
        if extra_route or i == 0:
            doc += (f"---\napiVersion: lockgate.io/v1alpha1\nkind: Route\nmetadata: {{name: s{i}, namespace: ns}}\n"
                    f"spec:\n  service: s{i}\n  http:\n    - route: [{{version: v1}}]\n")
        files[f"ns/s{i}.yaml"] = doc.encode()
    loaded = load(files)
    assert loaded.intent is not None, loaded.problems
    return loaded.intent


def test_of_kind_answers_as_a_scan_for_intents_copies_and_others() -> None:
    a, b = intent(3), intent(4, extra_route=True)
    for it in (a, b, a.model_copy(update={"routes": {}}), a):
        for kind in (Service, Route):
            assert it.of_kind(kind) == [r for r in it.resources if isinstance(r, kind)]
    assert len(a.of_kind(Route)) == 1 and len(b.of_kind(Route)) == 4


def test_the_list_of_kind_returns_is_the_callers_own() -> None:
    a = intent(2)
    got = a.of_kind(Service)
    got.clear()
    assert len(a.of_kind(Service)) == 2
