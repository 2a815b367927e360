"""`lockgate import istio`: Bookinfo-style Istio YAML (written for these tests in Istio's format) in, lockgate
intent out. Golden files (`UPDATE_GOLDEN=1` rewrites them) pin the output and its comments; the rest checks
behaviour: the output is valid intent with the Istio semantics (splits, header routes, policies), every
value says where it came from, whatever has no equivalent is a warning at the right line, and errors are
`file:line` with nothing written."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh.intent import Route, TrafficPolicy
from policies.intent import AuthorizationPolicy, PeerAuthentication
from reconciler.cli.main import main
from reconciler.importers import import_istio
from reconciler.importers.yamlout import Comment, Noted, Val, emit, plain
from reconciler.load import load

HERE = Path(__file__).parent
INPUTS = HERE / "istio"
GOLDEN = HERE / "golden"
REPO_TEMPLATE = HERE.parents[2] / "repo-template"
WORKLOADS = """
apiVersion: lockgate.io/v1alpha1
kind: Workload
metadata: {name: productpage-v1}
spec: {service: productpage, version: v1, clusters: [east], command: [lockgate, demo-app]}
---
apiVersion: lockgate.io/v1alpha1
kind: Workload
metadata: {name: reviews-v1}
spec: {service: reviews, version: v1, clusters: [east], command: [lockgate, demo-app]}
"""


def sources(name: str) -> dict[str, bytes]:
    """Paths as a user in tests/unit/importers/istio would give them."""
    return {str(p.relative_to(INPUTS)): p.read_bytes() for p in sorted((INPUTS / name).glob("*.yaml"))}


def imported(name: str) -> Any:
    return import_istio(sources(name), trust_domain="example.org")


@pytest.mark.parametrize("name", ["bookinfo", "lossy"])
def test_golden(name: str) -> None:
    result = imported(name)
    assert result.errors == []
    messages = "".join(f"{m}\n" for m in [*result.warnings, *result.notes])
    expected = {**result.files, "messages.txt": messages}
    folder = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.iterdir():
            old.unlink()
        for file, text in expected.items():
            (folder / file).write_text(text)
    assert {p.name: p.read_text() for p in folder.iterdir()} == expected


def _intent(files: dict[str, str], workloads: str = WORKLOADS) -> Any:
    tree = {name: text.encode() for name, text in files.items()}
    tree["mesh.yaml"] = (REPO_TEMPLATE / "mesh.yaml").read_bytes()
    if workloads:
        tree["workloads.yaml"] = workloads.encode()
    return load(tree)


def test_the_bookinfo_import_is_valid_intent_with_istios_semantics() -> None:
    result = imported("bookinfo")
    loaded = _intent(result.files)
    assert loaded.problems == [] and loaded.ok, loaded.problems
    routes = {r.spec.service: r for r in loaded.intent.of_kind(Route)}
    reviews = routes["reviews"].spec
    jason, split = reviews.http
    assert jason.match[0].headers["end-user"].exact == "jason"
    assert [(d.version, d.weight) for d in jason.route] == [("v2", 100)]
    assert not split.match and [(d.version, d.weight) for d in split.route] == [("v1", 50), ("v3", 50)]
    assert split.retries is not None and split.retries.attempts == 3 and "503" in split.retries.retry_on
    assert set(reviews.hosts) == {"reviews", "reviews.example.com"}  # bound to the gateway and the mesh
    page = routes["productpage"].spec
    assert page.hosts == ["bookinfo.example.com"]
    assert [m.uri.exact or m.uri.prefix for m in page.http[0].match if m.uri] == [
        "/productpage", "/static/", "/api/v1/products"]
    assert routes["ratings"].spec.hosts == []  # mesh only: not exposed at the ingress
    fault = routes["ratings"].spec.http[0].fault
    assert fault is not None and fault.delay is not None and fault.delay.fixed_delay == "2s"
    assert fault.delay.percentage == 100
    services = loaded.intent.services
    assert services[("default", "reviews")].spec.versions == ["v1", "v2", "v3"]
    assert [p.port for p in services[("default", "reviews")].spec.ports] == [9080]
    (policy,) = loaded.intent.of_kind(TrafficPolicy)
    od = policy.spec.outlier_detection
    assert od is not None and (od.consecutive_5xx_errors, od.interval, od.base_ejection_time) == (5, "10s", "30s")
    assert policy.spec.settings("v3").connection_pool is not None
    (peer,) = loaded.intent.of_kind(PeerAuthentication)
    assert peer.spec.mtls.mode == "STRICT" and peer.spec.selector is None
    (authz,) = loaded.intent.of_kind(AuthorizationPolicy)
    assert authz.spec.selector is not None and authz.spec.selector.service == "ratings"
    assert authz.spec.rules[0].from_[0].principals == ["example.org/ns/default/sa/bookinfo-reviews"]
    assert authz.spec.rules[0].to[0].methods == ["GET"]


def test_every_value_says_where_it_came_from() -> None:
    for name in ("bookinfo", "lossy"):
        for file, text in imported(name).files.items():
            for n, line in enumerate(text.splitlines(), 1):
                body = line.split("  #", 1)[0].strip()
                if body.startswith("#") or body in ("---", "") or body.endswith(":") or \
                        body.startswith("apiVersion:"):
                    continue
                assert "  # " in line, f"{name}/{file}:{n}: {line}"
            comments = re.findall(r"# from (\S+):(\d+) ", text)
            assert comments
            for path, line_no in comments:  # each comment names a real line of a real input file
                lines = (INPUTS / path).read_text().splitlines()
                assert 1 <= int(line_no) <= len(lines) and lines[int(line_no) - 1].strip(), (path, line_no)


def test_a_comment_points_at_the_value_it_names() -> None:
    text = imported("bookinfo").files["routes.yaml"]
    reviews = (INPUTS / "bookinfo" / "reviews.yaml").read_text().splitlines()
    for line in text.splitlines():
        m = re.search(r"weight: (\d+)  # from bookinfo/reviews.yaml:(\d+) \S+ reviews http\[1\]\.route\[\d\]\.weight",
                      line)
        if m:
            assert reviews[int(m.group(2)) - 1].strip() == f"weight: {m.group(1)}"
    m = re.search(r"exact: jason  # from bookinfo/reviews.yaml:(\d+) ", text)
    assert m and reviews[int(m.group(1)) - 1].strip() == "exact: jason"


def test_what_has_no_equivalent_is_a_warning_at_its_line() -> None:
    result = imported("lossy")
    lines = (INPUTS / "lossy" / "lossy.yaml").read_text().splitlines()
    for field in ("exportTo", "sourceLabels", "corsPolicy", "retryRemoteLocalities", "portLevelSettings",
                  "consecutiveGatewayErrors", "portLevelMtls", "notPaths", "track"):
        hits = [w for w in result.warnings if f".{field}:" in w.message or f" {field}:" in w.message]
        assert hits, field
        for w in hits:
            assert w.path == "lossy/lossy.yaml" and field in lines[w.line - 1], (field, w)
    names = ("tcp[0]", "when[0]", "ServiceEntry", "apps/v1", "not-a-condition", "routes to ratings")
    by_field = {name: [w for w in result.warnings if name in w.message] for name in names}
    assert all(by_field.values()), by_field
    assert lines[by_field["tcp[0]"][0].line - 1].strip().startswith("- route:")
    assert "key:" in lines[by_field["when[0]"][0].line - 1]
    assert all(str(w).startswith(f"lossy/lossy.yaml:{w.line}: warning: ") for w in result.warnings)


def test_lossy_conversions_fail_closed_and_keep_what_maps() -> None:
    loaded = _intent(imported("lossy").files, workloads="")
    assert loaded.ok, loaded.problems
    (route,) = loaded.intent.of_kind(Route)
    (canary,) = route.spec.http  # the rule to another service is not imported
    assert [(d.version, d.weight) for d in canary.route] == [("v1", 90), ("v2", 10)]
    assert canary.mirror is not None and (canary.mirror.version, canary.mirror.percentage) == ("v2", 25)
    assert canary.retries is not None and canary.retries.retry_on == "5xx,reset"
    assert canary.match[0].uri is not None and canary.match[0].uri.prefix == "/details"  # sourceLabels dropped
    policies = {p.metadata.name: p.spec for p in loaded.intent.of_kind(AuthorizationPolicy)}
    allow = policies["details-allow"]
    assert len(allow.rules) == 1 and allow.rules[0].to[0].methods == ["GET"]  # the rule with `when` is gone
    deny = policies["details-deny"]
    assert deny.action == "DENY" and deny.rules[0].to[0].paths == ["/admin/*"]  # only notPaths is gone
    (policy,) = loaded.intent.of_kind(TrafficPolicy)
    assert policy.spec.load_balancer is None and policy.spec.outlier_detection is not None


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_exit_codes(tmp_path: Path, capsys: Any) -> None:
    clean = _write(tmp_path, "clean.yaml", """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
    - route:
        - destination: {host: reviews, subset: v1, port: {number: 9080}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets: [{name: v1, labels: {version: v1}}]
""")
    assert main(["import", "istio", str(clean), "--out", str(tmp_path / "a")]) == 0
    assert "warning" not in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["routes.yaml", "services.yaml"]
    lossy = [str(p) for p in sorted((INPUTS / "lossy").glob("*.yaml"))]
    assert main(["import", "istio", *lossy, "--out", str(tmp_path / "b")]) == 3
    err = capsys.readouterr().err
    assert f"{lossy[0]}:" in err and ": warning: " in err
    assert (tmp_path / "b" / "routes.yaml").exists()  # written: the loss is reported, not refused
    assert main(["import", "istio", *lossy, "--out", str(tmp_path / "c"), "--allow-loss"]) == 0
    assert ": warning: " in capsys.readouterr().err
    assert main(["import", "istio", str(clean), "--out", str(tmp_path / "a")]) == 1  # would overwrite
    assert "already exist" in capsys.readouterr().err
    assert main(["import", "istio", str(clean), "--out", str(tmp_path / "a"), "--force"]) == 0


@pytest.mark.parametrize(("text", "line", "message"), [
    ("kind: VirtualService\nspec: [\n", 3, "YAML syntax error"),
    ("- just\n- a list\n", 1, "not Istio YAML"),
    ("apiVersion: lockgate.io/v1alpha1\nkind: Route\nmetadata: {name: r}\n", 1, "lockgate intent already"),
    ("apiVersion: networking.istio.io/v2\nkind: VirtualService\nmetadata: {name: r}\n", 1, "this importer reads"),
    ("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\nspec:\n  hosts: [r]\n"
     "  http: 5\n", 6, "http: expected a list"),
    ("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\nspec:\n  http:\n"
     "    - route:\n        - destination: {host: r}\n          weight: lots\n", 8, "weight: expected a whole number"),
    ("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\nspec:\n  http:\n"
     "    - match:\n        - uri: {exact: /a, prefix: /b}\n      route: [{destination: {host: r}}]\n",
     7, "exactly one of exact, prefix, regex"),
    ("", 1, "no YAML documents"),
])
def test_errors_are_file_line_and_nothing_is_written(tmp_path: Path, capsys: Any, text: str, line: int,
                                                      message: str) -> None:
    path = _write(tmp_path, "in.yaml", text)
    assert main(["import", "istio", str(path), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert re.search(rf"^{re.escape(str(path))}:{line}: .*{re.escape(message)}", err, re.M), err
    assert "nothing written" in err and not (tmp_path / "out").exists()


def test_hostile_yaml_is_refused_as_lockgate_refuses_it(tmp_path: Path, capsys: Any) -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefg", "bcdefgh", strict=True))
    path = _write(tmp_path, "bomb.yaml", bomb)
    assert main(["import", "istio", str(path), "--out", str(tmp_path / "out")]) == 1
    assert re.search(rf"^{re.escape(str(path))}:\d+: .*YAML nodes", capsys.readouterr().err, re.M)
    missing = tmp_path / "missing.yaml"
    assert main(["import", "istio", str(missing), "--out", str(tmp_path / "out")]) == 1
    assert f"{missing}:0: cannot read" in capsys.readouterr().err


def test_weights_are_istios_defaults_and_scaled_when_they_do_not_sum_to_100() -> None:
    doc = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: r, namespace: shop}
spec:
  hosts: [r]
  http:
    - route:
        - {destination: {host: r, subset: a}, weight: 1}
        - {destination: {host: r, subset: b}, weight: 2}
    - route:
        - {destination: {host: r.shop.svc.cluster.local, subset: a}}
        - {destination: {host: r, subset: b}, weight: 100}
"""
    result = import_istio({"w.yaml": doc.encode()})
    assert result.errors == []
    route = yaml.safe_load(result.files["routes.yaml"])["spec"]["http"]
    assert route[0]["route"] == [{"version": "a", "weight": 33}, {"version": "b", "weight": 67}]
    assert route[1]["route"] == [{"version": "a", "weight": 0}, {"version": "b", "weight": 100}]  # missing: 0
    assert [w.line for w in result.warnings if "sum to 3" in w.message] == [7]
    assert any("subset 'a' of r is defined by no DestinationRule" in w.message for w in result.warnings)


def test_the_emitter_writes_yaml_that_loads_back_as_the_data() -> None:
    tree = {"a": Val("plain"), "b": Val("needs: quoting # really", "a note"), "c": Val("true"), "d": Val(True),
            "e": Val(1.5), "f": [Val("x"), {"g": Val("y", "n"), "h": []}], "i": Noted({"j": Val(" s ")}, "k"),
            "#": Comment("a line of its own"), "l": {}, "m": Val("*"), "n": Val("end-user"), "o": Val("")}
    text = emit([(["head"], tree)])
    assert text.startswith("# head\n") and "# a line of its own" in text
    assert yaml.safe_load(text) == plain(tree)
