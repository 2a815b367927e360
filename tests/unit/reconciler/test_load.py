"""Loading and validation: every error is `path:line: message`, all of them at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.load import load, read_worktree

TEMPLATE = Path(__file__).resolve().parents[3] / "repo-template"


def template() -> dict[str, bytes]:
    return read_worktree(TEMPLATE)


def with_file(name: str, text: str, base: dict[str, bytes] | None = None) -> dict[str, bytes]:
    files = dict(template() if base is None else base)
    files[name] = text.encode()
    return files


def errors(files: dict[str, bytes]) -> list[str]:
    return [str(p) for p in load(files).problems]


def test_template_is_valid() -> None:
    loaded = load(template())
    assert loaded.ok, loaded.problems
    assert loaded.intent is not None
    assert set(loaded.intent.services) == {("shop", "frontend"), ("shop", "reviews")}
    assert loaded.intent.routes[("shop", "reviews")].spec.http[0].route[0].weight == 100


def test_hidden_and_non_yaml_files_are_ignored() -> None:
    files = with_file(".github/ci.yaml", "not: [valid")
    files["README.md"] = b"# hello"
    assert load(files).ok


ROUTE = """\
apiVersion: lockgate.io/v1alpha1
kind: Route
metadata:
  name: extra
  namespace: shop
spec:
  service: reviews
  http:
    - route:
        - version: v1
          weight: 60
        - version: v2
          weight: 30
"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a: [1, 2\n", "bad.yaml:2: YAML syntax error"),
        ("apiVersion: lockgate.io/v1alpha1\nkind: Gateway\nmetadata: {name: x}\nspec: {}\n",
         "bad.yaml:2: kind: unknown kind 'Gateway'"),
        ("apiVersion: v1\nkind: Service\n", "bad.yaml:1: apiVersion: expected 'lockgate.io/v1alpha1'"),
        ("- 1\n- 2\n", "bad.yaml:1: expected a resource"),
        ("apiVersion: lockgate.io/v1alpha1\nkind: Service\nmetadata:\n  name: x\n  namespace: shop\nspec:\n"
         "  ports: [{name: http, port: 80}]\n  versions: [v1]\n  replicas: 3\n",
         "bad.yaml:9: spec.replicas: unknown field 'replicas'"),
        ("apiVersion: lockgate.io/v1alpha1\nkind: Service\nmetadata:\n  name: x\n  namespace: shop\nspec:\n"
         "  ports: [{name: http, port: 99999}]\n  versions: [v1]\n",
         "bad.yaml:7: spec.ports[0].port: Input should be less than or equal to 65535"),
        ("apiVersion: lockgate.io/v1alpha1\nkind: Service\nmetadata:\n  name: Bad_Name\n  namespace: shop\n"
         "spec:\n  ports: [{name: http, port: 80}]\n  versions: [v1]\n",
         "bad.yaml:4: metadata.name: String should match pattern"),
        ("apiVersion: lockgate.io/v1alpha1\nkind: Service\nmetadata:\n  name: x\n  namespace: shop\nspec:\n"
         "  versions: [v1]\n",
         "bad.yaml:6: spec.ports: required field is missing"),
        ("apiVersion: lockgate.io/v1alpha1\nkind: Service\nmetadata:\n  name: x\n  name: y\n  namespace: shop\n"
         "spec:\n  ports: [{name: http, port: 80}]\n  versions: [v1]\n",
         "bad.yaml:5: metadata.name: duplicate key 'name'"),
        (ROUTE, "routes.yaml:21: spec.service: service 'reviews' already has Route 'extra'; merge"),
        (ROUTE, "bad.yaml:9: spec.http[0].route: weights must sum to 100, got 60 + 30 = 90"),
        (ROUTE.replace("weight: 60", "weigth: 60"),
         "bad.yaml:11: spec.http[0].route[0].weigth: unknown field 'weigth' (did you mean 'weight'?)"),
        (ROUTE.replace("version: v2", "version: v3").replace("60", "70"),
         "bad.yaml:12: spec.http[0].route[1].version: service 'reviews' has no version 'v3'"),
        (ROUTE.replace("service: reviews", "service: ratings"),
         "bad.yaml:7: spec.service: unknown service 'ratings' (services in namespace 'shop': frontend, reviews)"),
        (ROUTE.replace("    - route:", "    - timeout: 3 seconds\n      route:"),
         "bad.yaml:9: spec.http[0].timeout: invalid duration '3 seconds'"),
        (ROUTE.replace("    - route:", "    - match: [{uri: {regex: '(?=x)'}}]\n      route:"),
         "bad.yaml:9: spec.http[0].match[0].uri.regex: invalid regex '(?=x)' (RE2 syntax"),
        (ROUTE.replace("    - route:", "    - match: [{uri: {exact: /a, prefix: /b}}]\n      route:"),
         "bad.yaml:9: spec.http[0].match[0].uri: give exactly one of exact, prefix, regex"),
    ],
)
def test_invalid_file_reports_path_and_line(text: str, expected: str) -> None:
    errs = errors(with_file("bad.yaml", text))
    assert any(e.startswith(expected) for e in errs), errs


def test_all_errors_of_a_commit_at_once_and_in_order() -> None:
    files = with_file("bad.yaml", ROUTE.replace("version: v2", "version: v9"))
    problems = load(files).problems
    errs = [str(p) for p in problems]
    assert [(p.path, p.line) for p in problems] == sorted((p.path, p.line) for p in problems)
    assert len(errs) >= 3  # conflict, weights, unknown version
    assert load(files).intent is None


def test_workload_references_are_checked() -> None:
    text = (TEMPLATE / "workloads.yaml").read_text().replace("clusters: [east]", "clusters: [west]", 1)
    errs = errors(with_file("workloads.yaml", text))
    assert errs == ["workloads.yaml:11: spec.clusters[0]: unknown cluster 'west' (Mesh clusters: east)"]


def test_missing_mesh_is_reported() -> None:
    files = template()
    del files["mesh.yaml"]
    errs = errors(files)
    assert any("no Mesh resource" in e for e in errs)
    assert all(":" in e.split(" ")[0] for e in errs)


def test_duplicate_resource_names_point_at_the_second() -> None:
    svc = (TEMPLATE / "services.yaml").read_text().split("---")[0]
    errs = errors(with_file("zz-more.yaml", svc))
    assert any(e.startswith("zz-more.yaml:5: metadata.name: duplicate Service shop/frontend") for e in errs), errs
