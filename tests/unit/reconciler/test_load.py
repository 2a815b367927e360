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



# --- a schema error hides nothing else ----------------------------------------------------------------
# An invalid document still takes part in the cross-resource checks, without the parts that failed, so
# its other errors show up in the same run; nothing its removals may have caused is reported.

REVIEWS = (TEMPLATE / "routes.yaml").read_text().split("---\n")[1]
"""The template's Route of `reviews`: one rule, v1 100 / v2 0 (its line numbers are those of the file)."""
ROLLOUT = """\
apiVersion: lockgate.io/v1alpha1
kind: Rollout
metadata: {name: reviews, namespace: shop}
spec:
  service: reviews
  stable: v1
  canary: v2
  steps: [10, 50, 100]
  analysis:
    failureThreshold: 2
    metrics:
      - {name: ok, builtin: request-success-rate, min: 0.99}
"""
PATTERN = "String should match pattern '^[a-z0-9]([-a-z0-9]*[a-z0-9])?$'"


def reviews_route(text: str, **more: str) -> dict[str, bytes]:
    """The template with routes.yaml holding just `text` (the Route of frontend moves to frontend.yaml)."""
    files = with_file("routes.yaml", text)
    files["frontend.yaml"] = (TEMPLATE / "routes.yaml").read_text().split("---\n")[0].encode()
    return files | {name: body.encode() for name, body in more.items()}


def test_a_schema_error_does_not_hide_a_reference_error() -> None:
    text = REVIEWS.replace("weight: 0", "wieght: 0").replace("version: v2", "version: v3")
    assert errors(reviews_route(text)) == [
        "routes.yaml:14: spec.http[0].route[1].version: service 'reviews' has no version 'v3' (declared: v1, v2)",
        "routes.yaml:15: spec.http[0].route[1].wieght: unknown field 'wieght' (did you mean 'weight'?)",
    ]  # and no `weights must sum to 100` from the weight taken out with the typo


def test_a_bad_field_in_one_rule_does_not_hide_a_bad_regex_in_another() -> None:
    rules = """\
    - name: beta
      timeout: 3 seconds
      match: [{uri: {prefix: /beta}}]
      route: [{version: v2}]
    - name: legacy
      match: [{uri: {regex: '(?=old)'}}]
      route: [{version: v1}]
"""
    errs = errors(reviews_route(REVIEWS.replace("  http:\n", "  http:\n" + rules)))
    assert [e.split(" (RE2")[0] for e in errs] == [
        "routes.yaml:11: spec.http[0].timeout: invalid duration '3 seconds': use a number and a unit, "
        "e.g. 250ms, 2s, 1m, 1h",
        "routes.yaml:15: spec.http[1].match[0].uri.regex: invalid regex '(?=old)'",
    ]


def test_a_rollout_schema_error_does_not_hide_its_rollout_checks() -> None:
    text = ROLLOUT.replace("failureThreshold: 2", "failureThreshold: 0").replace("canary: v2", "canary: v9") \
        .replace("[10, 50, 100]", "[10, 5, 100]")
    loaded = load(with_file("rollout.yaml", text))
    assert [str(p) for p in loaded.problems] == [
        "rollout.yaml:7: spec.canary: service 'reviews' has no version 'v9' (declared: v1, v2)",
        "rollout.yaml:8: spec.steps[1]: steps must increase: 10 then 5",
        "rollout.yaml:10: spec.analysis.failureThreshold: Input should be greater than or equal to 1",
    ]
    assert loaded.intent is None


def test_findings_of_a_partial_resource_name_the_documents_items_and_lines() -> None:
    """Items taken out shift the indexes of those after them; findings still name the document's."""
    text = REVIEWS.replace("version: v1", "version: V1").replace("version: v2", "version: v9") \
        + "    - match: [5, {uri: {regex: '(?=a)'}}]\n      route: [{version: v1}]\n"
    assert [e.split(" (RE2")[0] for e in errors(reviews_route(text))] == [
        f"routes.yaml:12: spec.http[0].route[0].version: {PATTERN}",
        "routes.yaml:14: spec.http[0].route[1].version: service 'reviews' has no version 'v9' (declared: v1, v2)",
        "routes.yaml:16: spec.http[1].match[0]: Input should be a valid dictionary or instance of HTTPMatch",
        "routes.yaml:16: spec.http[1].match[1].uri.regex: invalid regex '(?=a)'",
    ]


def test_a_schema_error_in_a_referenced_resource_leaves_the_references_to_it_intact() -> None:
    """A typo in a Service or in the Mesh used to make every reference to it dangle."""
    services = (TEMPLATE / "services.yaml").read_text().replace("[v1, v2]", "[v1, v2]\n  replica: 2")
    mesh = (TEMPLATE / "mesh.yaml").read_text().replace("    - name: east", "    - name: east\n      localty: eu/a")
    assert errors(with_file("services.yaml", services) | {"mesh.yaml": mesh.encode()}) == [
        "mesh.yaml:10: spec.clusters[0].localty: unknown field 'localty' (did you mean 'locality'?)",
        "services.yaml:21: spec.replica: unknown field 'replica'; allowed here: ports, versions",
    ]  # not `no Mesh resource`, not `unknown service 'reviews'` from every Route and Workload of reviews


@pytest.mark.parametrize(("field", "line"), [("name: [reviews]", 4), ("namespace: [shop]", 5)])
def test_an_identity_error_gives_no_partial_resource(field: str, line: int) -> None:
    """A partial resource without its own name or namespace would be another resource (a Route in
    `default`: `unknown service 'reviews'`); the Rollout shows partial resources are in use."""
    key = field.split(":")[0]
    route = REVIEWS.replace(f"  {key}: {'reviews' if key == 'name' else 'shop'}\n", f"  {field}\n", 1) \
        .replace("version: v2", "version: v3")
    rollout = ROLLOUT.replace("canary: v2", "canary: v9").replace("failureThreshold: 2", "failureTreshold: 2")
    assert errors(reviews_route(route, **{"rollout.yaml": rollout})) == [
        "rollout.yaml:7: spec.canary: service 'reviews' has no version 'v9' (declared: v1, v2)",
        "rollout.yaml:10: spec.analysis.failureTreshold: unknown field 'failureTreshold' "
        "(did you mean 'failureThreshold'?)",
        f"routes.yaml:{line}: metadata.{key}: Input should be a valid string",
    ]  # the Route's own `no version 'v3'` is not reported either: it has no partial resource


RULE = "      route:\n        - version: v1\n          weight: 100\n        - version: v2\n          weight: 0\n"


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        pytest.param(RULE.replace("100", "90").replace("v2\n          weight: 0", "V2\n          weight: 10"),
                     f"routes.yaml:14: spec.http[0].route[1].version: {PATTERN}",
                     id="destination-goes:no-weights-sum-to-90"),
        pytest.param(RULE.replace("weight: 0", "weight: none"),
                     "routes.yaml:15: spec.http[0].route[1].weight: Input should be a valid integer, unable to parse "
                     "string as an integer", id="weight-goes:no-weights-sum-to-200"),
        pytest.param("      redirect: {code: 302}\n",
                     "routes.yaml:11: spec.http[0].redirect.code: unknown field 'code'; allowed here: uri, authority, "
                     "redirectCode", id="redirect-goes:no-rule-without-destinations"),
    ],
)
def test_a_removed_part_causes_no_error_of_its_own(rule: str, expected: str) -> None:
    """Just the schema error and the bad host (which shows the partial resource was checked): nothing
    at, around or beside the part taken out."""
    text = REVIEWS.replace(RULE, rule).replace("[reviews.example.com]", "['reviews example']")
    assert errors(reviews_route(text)) == [
        "routes.yaml:8: spec.hosts[0]: invalid host 'reviews example': use a DNS name, optionally *.prefixed or :port",
        expected,
    ]


def test_a_rule_that_lost_its_match_is_not_taken_for_the_default_rule() -> None:
    """With its match list gone the first rule would look like the default one of a service a Rollout
    governs, and the real default rule (no `route`: the Rollout owns it) would need destinations."""
    text = REVIEWS.replace("[reviews.example.com]", "['reviews example']").replace(
        "    - name: default\n      route:\n        - version: v1\n          weight: 100\n"
        "        - version: v2\n          weight: 0\n",
        "    - match: {headers: {x-beta: {exact: '1'}}}\n      route: [{version: v2}]\n    - name: default\n")
    assert errors(reviews_route(text, **{"rollout.yaml": ROLLOUT})) == [
        "routes.yaml:8: spec.hosts[0]: invalid host 'reviews example': use a DNS name, optionally *.prefixed or :port",
        "routes.yaml:10: spec.http[0].match: Input should be a valid list",
    ]


# --- what a revision may hold (the limits themselves: tests/unit/reconciler/test_hostile_*.py) -----------


def test_a_syntax_error_names_the_character_libyaml_leaves_out() -> None:
    errs = errors(with_file("tabs.yaml", "spec:\n\tports: []\n"))
    assert errs == ["tabs.yaml:2: YAML syntax error: while scanning for the next token found character '\\t' that "
                    "cannot start any token"]


def test_a_document_that_moved_reports_its_new_lines() -> None:
    text = ROUTE.replace("weight: 30", "weight: 40").replace("weight: 60", "wieght: 60")
    before = [(p.path, p.line, p.message) for p in load(with_file("bad.yaml", text)).problems]
    after = [(p.path, p.line, p.message) for p in load(with_file("bad.yaml", "# one\n# two\n" + text)).problems]
    assert ("bad.yaml", 11, "spec.http[0].route[0].wieght: unknown field 'wieght' (did you mean 'weight'?)") in before
    assert after == [(path, line + 2 if path == "bad.yaml" else line, message) for path, line, message in before]


def test_where_points_into_the_document_after_it_moved() -> None:
    first = load(template())
    files = template()
    files["routes.yaml"] = b"# one more line\n" + files["routes.yaml"]
    second = load(files)
    assert second.ok and first.ok
    old = next(r for r in first.resources if r.key == ("Route", "shop", "reviews"))
    new = next(r for r in second.resources if r.key == ("Route", "shop", "reviews"))
    assert old is new  # the same content: the very same model
    assert second.where(new, ("spec", "http", 0, "route", 1)) == ("routes.yaml", first.where(old, (
        "spec", "http", 0, "route", 1))[1] + 1)


def test_the_caches_hold_about_two_revisions() -> None:
    from reconciler import load as loader

    for i in range(200):
        files = template()
        files["routes.yaml"] = files["routes.yaml"].replace(b"shop.example.com", f"shop{i}.example.com".encode())
        assert load(files).ok
    assert len(loader._files._data) < 200 and len(loader._models._data) < 200
