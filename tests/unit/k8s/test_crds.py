"""The CRDs are generated from the intent models: every field shows up, the template validates, known-bad
resources do not, the schemas are structural, and the API server's own CRD schema accepts every document."""

from __future__ import annotations

import copy
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version
from pydantic import BaseModel, Field, ValidationError, create_model

from mesh.intent import Model, Route, RouteSpec
from reconciler.k8s.crds import (
    crd_documents,
    crds_by_kind,
    dump_yaml,
    plural,
    resource_problems,
    resource_schema,
    structural_problems,
    structural_schema,
)
from reconciler.k8s.gitsource import GITSOURCE_KIND, PATH_PATTERN, GitSource, GitSourceSpec
from reconciler.kinds import KINDS
from tests.fixtures.intents import TEMPLATE, rollout_yaml

ROOT = Path(__file__).resolve().parents[3]
CORPUS = ROOT / "tests" / "invalid"
ALL_KINDS = {**KINDS, GITSOURCE_KIND: GitSource}


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    return crd_documents()


@pytest.fixture(scope="module")
def schemas(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return crds_by_kind(docs)


def spec_of(schema: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = schema["properties"]["spec"]
    return spec


# --- generated, not hand-kept --------------------------------------------------------------------------------


def _models_in(annotation: Any) -> Iterator[tuple[tuple[str, ...], type[BaseModel]]]:
    """(schema path below the field, model) for every model a field's type holds: in lists, dicts, unions."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        yield from _models_in(typing.get_args(annotation)[0])
    elif origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            yield from _models_in(arg)
    elif origin in (list, tuple, set, frozenset):
        for arg in typing.get_args(annotation):
            if arg is not Ellipsis:
                yield from ((("items", *p), m) for p, m in _models_in(arg))
    elif origin is dict:
        yield from ((("additionalProperties", *p), m) for p, m in _models_in(typing.get_args(annotation)[1]))
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield (), annotation


def field_paths(model: type[BaseModel], seen: tuple[type[BaseModel], ...] = ()) -> Iterator[tuple[str, ...]]:
    """The schema path of every field of `model`, recursively, by alias (what the CRD must contain)."""
    for name, field in model.model_fields.items():
        here = ("properties", field.alias or name)
        yield here
        for below, sub in _models_in(field.annotation):
            if sub not in seen:
                yield from ((*here, *below, *p) for p in field_paths(sub, (*seen, model)))


def lookup(schema: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any] | None:
    node: Any = schema
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node if isinstance(node, dict) else None


@pytest.mark.parametrize("kind", sorted(ALL_KINDS))
def test_every_field_of_the_model_is_in_the_crd(kind: str, schemas: dict[str, dict[str, Any]]) -> None:
    spec_model = ALL_KINDS[kind].model_fields["spec"].annotation
    assert isinstance(spec_model, type) and issubclass(spec_model, BaseModel)
    paths = list(field_paths(spec_model))
    assert paths, "a spec without fields would make this test vacuous"
    missing = [".".join(p) for p in paths if lookup(spec_of(schemas[kind]), p) is None]
    assert missing == []
    assert set(schemas[kind]["properties"]) == {"apiVersion", "kind", "metadata", "spec", "status"}


def test_a_field_added_to_a_model_shows_up_in_its_crd() -> None:
    plus_spec = create_model("RouteSpecPlus", __base__=RouteSpec,
                             canary_header=(str | None, None), max_hops=(int, Field(default=3, ge=1, le=9)))
    plus = create_model("RoutePlus", __base__=Route, spec=(plus_spec, ...))
    spec = spec_of(resource_schema(plus))
    assert spec["properties"]["canaryHeader"] == {"type": "string", "nullable": True}
    assert spec["properties"]["maxHops"] == {"type": "integer", "minimum": 1, "maximum": 9, "default": 3}
    assert [p for p in field_paths(plus_spec) if lookup(spec, p) is None] == []
    plain = spec_of(resource_schema(Route))
    assert "canaryHeader" not in plain["properties"] and "maxHops" not in plain["properties"]
    assert structural_problems(resource_schema(plus)) == []


class Inner(Model):
    port: int = Field(ge=1, le=65535)
    label: str = "x"


class Node(Model):
    name: str
    children: list[Node] = Field(default_factory=list)


def convert(**fields: Any) -> dict[str, Any]:
    """The structural schema of one field `f` of a throwaway model (camelCase aliases, as the intent models)."""
    return structural_schema(create_model("M", __base__=Model, **fields))["properties"]["f"]


ANY = {"x-kubernetes-preserve-unknown-fields": True}


@pytest.mark.parametrize(("field", "expected"), [
    ((Literal["a", "b"], ...), {"type": "string", "enum": ["a", "b"]}),
    ((Literal["only"], ...), {"type": "string", "enum": ["only"]}),
    ((int, Field(ge=1, le=5)), {"type": "integer", "minimum": 1, "maximum": 5}),
    ((float, Field(gt=0, lt=1)), {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 1,
                                  "exclusiveMaximum": True}),
    ((str | None, None), {"type": "string", "nullable": True}),
    ((Literal["x", "y"] | None, None), {"type": "string", "enum": ["x", "y"], "nullable": True}),
    ((dict[str, int], ...), {"type": "object", "additionalProperties": {"type": "integer"}}),
    ((dict[str, Any], ...), {"type": "object", **ANY}),
    ((Any, ...), ANY),
    ((int | str, ...), {"x-kubernetes-int-or-string": True}),
    ((str | int | float, ...), ANY),
    ((list[str], Field(min_length=2, max_length=4)), {"type": "array", "minItems": 2, "maxItems": 4,
                                                      "items": {"type": "string"}}),
    ((set[str], ...), {"type": "array", "items": {"type": "string"}}),  # Kubernetes forbids uniqueItems
    ((tuple[int, int], ...), {"type": "array", "minItems": 2, "maxItems": 2, "items": {"type": "integer"}}),
    ((list[Inner], Field(min_length=1)), {"type": "array", "minItems": 1, "items": {
        "type": "object", "required": ["port"], "properties": {
            "port": {"type": "integer", "minimum": 1, "maximum": 65535},
            "label": {"type": "string", "default": "x"}}}}),
    ((Inner | None, None), {"type": "object", "nullable": True, "required": ["port"], "properties": {
        "port": {"type": "integer", "minimum": 1, "maximum": 65535}, "label": {"type": "string", "default": "x"}}}),
    ((str, Field(pattern=r"^[a-z]+$")), {"type": "string", "pattern": r"^[a-z]+$"}),
    # look-ahead (a model with regex_engine="python-re" may have one): not RE2, so left to the model
    ((str, Field(json_schema_extra={"pattern": r"^(?!admin)[a-z]+$"})), {"type": "string"}),
    ((int, Field(default=0, ge=1)), {"type": "integer", "minimum": 1}),  # a default Kubernetes would refuse
    ((str, Field(default="a", max_length=3)), {"type": "string", "maxLength": 3, "default": "a"}),
])
def test_converter(field: tuple[Any, Any], expected: dict[str, Any]) -> None:
    got = convert(f=field)
    got.pop("description", None)
    assert _ordered(got) == _ordered(expected)


def _ordered(node: Any) -> Any:
    """Compare schemas regardless of key order (the converter's order is for readers, not for the test)."""
    if isinstance(node, dict):
        return {k: _ordered(v) for k, v in sorted(node.items())}
    if isinstance(node, list):
        return [_ordered(v) for v in node]
    return node


def test_converter_carries_required_and_drops_json_schema_only_keys() -> None:
    schema = structural_schema(create_model("M", __base__=Model, must=(int, ...), may=(int, 1)))
    assert schema["required"] == ["must"]
    flat = yaml.safe_dump(schema)
    for key in ("$ref", "$defs", "title", "anyOf", "const", "additionalProperties: false"):
        assert key not in flat


def test_recursive_models_are_cut_and_left_open() -> None:
    schema = structural_schema(Node)
    assert schema["properties"]["name"] == {"type": "string"}
    assert schema["properties"]["children"]["items"] == {"type": "object", **ANY}  # Node inside Node: cut
    assert structural_problems(schema) == []
    holder = structural_schema(create_model("Holder", __base__=Model, root=(Node, ...)))
    assert holder["properties"]["root"]["properties"]["children"]["items"] == {"type": "object", **ANY}


def test_before_validators_and_alias_choices_never_make_the_crd_stricter(
        schemas: dict[str, dict[str, Any]]) -> None:
    """Istio's wrapped forms and `responseCode` are accepted by the model, so the API server must accept them."""
    route = yaml.safe_load("""
apiVersion: lockgate.io/v1alpha1
kind: Route
metadata: {name: api, namespace: shop}
spec:
  service: api
  http:
    - match: [{uri: {prefix: /old}}]
      redirect: {uri: /new, responseCode: 302}
    - match: [{uri: {prefix: /teapot}}]
      directResponse: {status: 418, body: {string: short and stout}}
    - route: [{version: v1}]
      mirror: {version: v2, percentage: {value: 10}}
      fault: {abort: {percentage: 5, httpStatus: 503}}
""")
    Route.model_validate(route)
    assert resource_problems(route, schemas) == []


# --- resources against their CRD -----------------------------------------------------------------------------


def template_resources() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(TEMPLATE.glob("*.yaml")):
        out += [(f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc)
                for doc in yaml.safe_load_all(path.read_text()) if doc]
    return out


def test_the_template_holds_several_kinds() -> None:
    assert {doc["kind"] for _, doc in template_resources()} >= {"Mesh", "Service", "Route", "Workload"}


@pytest.mark.parametrize(("where", "doc"), template_resources(), ids=[w for w, _ in template_resources()])
def test_template_resources_validate(where: str, doc: dict[str, Any], schemas: dict[str, dict[str, Any]]) -> None:
    assert resource_problems(doc, schemas) == []


GOOD_ROLLOUTS = {
    "defaults": rollout_yaml(),
    "steps and metrics": rollout_yaml(steps=[5, 50, 100], interval="1m", metrics=[
        {"name": "ok", "builtin": "request-success-rate", "min": 99},
        {"name": "p99", "query": "histogram_quantile(0.99, x)", "max": 0.5, "noData": "fail"},
        {"name": "vs-stable", "builtin": "request-duration-p99", "compare": {"maxIncrease": "20%"}}]),
    "ab with a match": rollout_yaml(strategy="ab", iterations=3, match=[{"headers": {"x-canary": {"exact": "1"}}}]),
    "hooks and sinks": rollout_yaml(webhooks=[{"name": "gate", "type": "confirm-promotion", "url": "http://h/x"}],
                                    notifications=[{"name": "chat", "type": "slack", "url": "https://h/y"}],
                                    writeBack="off", paused=True),
    "no canary": rollout_yaml(canary=None),
}


@pytest.mark.parametrize("name", sorted(GOOD_ROLLOUTS))
def test_rollouts_the_model_accepts_validate(name: str, schemas: dict[str, dict[str, Any]]) -> None:
    doc = yaml.safe_load(GOOD_ROLLOUTS[name])
    KINDS["Rollout"].model_validate(doc)
    assert resource_problems(doc, schemas) == []


def _template_doc(kind: str, name: str) -> dict[str, Any]:
    found = next(d for _, d in template_resources() if d["kind"] == kind and d["metadata"]["name"] == name)
    return copy.deepcopy(found)


def _bad() -> dict[str, tuple[dict[str, Any], str]]:
    """Known-bad resources: (document, the field path the CRD must blame)."""
    weight = _template_doc("Route", "reviews")
    weight["spec"]["http"][0]["route"][0]["weight"] = 150
    strategy = yaml.safe_load(rollout_yaml(strategy="linear"))
    no_stable = yaml.safe_load(rollout_yaml())
    del no_stable["spec"]["stable"]
    no_ports = _template_doc("Service", "reviews")
    del no_ports["spec"]["ports"]
    typo = yaml.safe_load(rollout_yaml(stepz=[10, 100]))
    port_text = _template_doc("Service", "reviews")
    port_text["spec"]["ports"][0]["port"] = "http"
    replicas_text = _template_doc("Workload", next(d["metadata"]["name"] for _, d in template_resources()
                                                    if d["kind"] == "Workload"))
    replicas_text["spec"]["replicas"] = "two"
    no_clusters = _template_doc("Mesh", "mesh")
    no_clusters["spec"]["clusters"] = []
    git_abs = {"apiVersion": "lockgate.io/v1alpha1", "kind": "GitSource",
               "metadata": {"name": "intent", "namespace": "lockgate-system"},
               "spec": {"url": "https://git.example/intent.git", "path": "/etc"}}
    git_write = copy.deepcopy(git_abs)
    git_write["spec"] = {"url": "https://git.example/intent.git", "writeBack": "push"}
    return {
        "weight 150": (weight, "spec.http.0.route.0.weight"),
        "unknown strategy": (strategy, "spec.strategy"),
        "missing stable": (no_stable, "spec"),
        "missing ports": (no_ports, "spec"),
        "unknown field": (typo, "spec"),
        "port as text": (port_text, "spec.ports.0.port"),
        "replicas as text": (replicas_text, "spec.replicas"),
        "no clusters": (no_clusters, "spec.clusters"),
        "absolute git path": (git_abs, "spec.path"),
        "unknown writeBack": (git_write, "spec.writeBack"),
    }


@pytest.mark.parametrize("name", sorted(_bad()))
def test_known_bad_resources_do_not_validate(name: str, schemas: dict[str, dict[str, Any]]) -> None:
    doc, blamed = _bad()[name]
    with pytest.raises(ValidationError):
        ALL_KINDS[doc["kind"]].model_validate(doc)  # the model refuses it too: the case is really bad
    problems = resource_problems(doc, schemas)
    assert problems and all(p.startswith(f"{blamed}: ") for p in problems), problems


CAUGHT_BY_SCHEMA = {
    "direct-response-status-99.yaml", "fault-abort-status-600.yaml", "fault-delay-missing-percentage.yaml",
    "fault-field-typo.yaml", "method-lowercase.yaml", "policy-lb-unknown-simple.yaml",
    "policy-max-connections-zero.yaml", "policy-max-ejection-101.yaml", "policy-pool-field-typo.yaml",
    "retries-attempts-11.yaml", "service-field-typo.yaml", "service-version-uppercase.yaml",
}
"""Defects of tests/invalid/ a schema can express (bounds, enums, patterns, required and unknown fields)."""
YAML_LEVEL = {"alias-bomb.yaml", "alias-cycle.yaml", "deep-nesting.yaml"}
"""Refused before there is a resource at all."""


def _expected_path(text: str) -> str:
    """`# expect: f.yaml:17: spec.http[0].fault.abrot: ...` -> `spec.http.0.fault.abrot`."""
    where = text.splitlines()[0].split(": ")[2]
    return where.replace("[", ".").replace("]", "")


@pytest.mark.parametrize("name", sorted(p.name for p in CORPUS.glob("*.yaml") if p.name not in YAML_LEVEL))
def test_invalid_corpus(name: str, schemas: dict[str, dict[str, Any]]) -> None:
    """A defect a schema can express is refused by the CRD, at the field the loader blames; every other document
    of the file (and every defect only the validator sees) passes, so the CRD is never stricter than the model."""
    text = (CORPUS / name).read_text()
    failing = {i: p for i, doc in enumerate(yaml.safe_load_all(text)) if (p := resource_problems(doc, schemas))}
    if name not in CAUGHT_BY_SCHEMA:
        assert failing == {}
        return
    assert len(failing) == 1, failing
    [problems] = failing.values()
    expected = _expected_path(text)
    for problem in problems:
        path, message = problem.split(": ", 1)
        assert expected == path or (expected.startswith(path + ".") and expected.rsplit(".", 1)[1] in message), \
            (expected, problem)


def test_corpus_tables_name_real_files() -> None:
    names = {p.name for p in CORPUS.glob("*.yaml")}
    assert names >= CAUGHT_BY_SCHEMA | YAML_LEVEL


# --- GitSource -----------------------------------------------------------------------------------------------


def test_gitsource_defaults() -> None:
    src = GitSource.model_validate({"apiVersion": "lockgate.io/v1alpha1", "kind": "GitSource",
                                    "metadata": {"name": "intent", "namespace": "lockgate-system"},
                                    "spec": {"url": "git@github.com:acme/mesh.git"}})
    assert (src.spec.branch, src.spec.path, src.spec.interval, src.spec.secret_ref, src.spec.suspend,
            src.spec.write_back) == (None, ".", "30s", None, False, "commit")
    assert GITSOURCE_KIND == "GitSource" and GITSOURCE_KIND not in KINDS


@pytest.mark.parametrize(("path", "ok"), [
    (".", True), ("mesh", True), ("envs/prod/", True), ("./mesh", True), (".config", True), ("..hidden", True),
    ("a/.../b", True), ("/etc", False), ("..", False), ("mesh/../..", False), ("a//b", False), ("", False),
])
def test_gitsource_path_model_and_crd_agree(path: str, ok: bool, schemas: dict[str, dict[str, Any]]) -> None:
    try:
        GitSourceSpec.model_validate({"url": "https://git.example/r.git", "path": path})
        model_ok = True
    except ValidationError:
        model_ok = False
    doc = {"apiVersion": "lockgate.io/v1alpha1", "kind": "GitSource", "metadata": {"name": "intent"},
           "spec": {"url": "https://git.example/r.git", "path": path}}
    assert (model_ok, resource_problems(doc, schemas) == []) == (ok, ok)
    assert spec_of(schemas["GitSource"])["properties"]["path"]["pattern"] == PATH_PATTERN


@pytest.mark.parametrize(("spec", "ok"), [
    ({"url": "https://git.example/r.git", "branch": "main", "interval": "5m", "secretRef": {"name": "git-creds"},
      "suspend": True, "writeBack": "off"}, True),
    ({"url": "ssh://git@git.example/r.git", "branch": "release/1.2"}, True),
    ({"url": "file:///srv/git/r.git", "interval": "1.5s"}, True),
    ({"url": "not a url"}, False),
    ({"url": "https://git.example/r.git", "interval": "0s"}, False),
    ({"url": "https://git.example/r.git", "interval": "soon"}, False),
    ({"url": "https://git.example/r.git", "branch": "has space"}, False),
    ({"url": "https://git.example/r.git", "secretRef": {"name": "Git_Creds"}}, False),
    ({"url": "https://git.example/r.git", "secretRef": {"name": "c", "key": "x"}}, False),
    ({"branch": "main"}, False),
])
def test_gitsource_spec(spec: dict[str, Any], ok: bool) -> None:
    try:
        GitSourceSpec.model_validate(spec)
        assert ok
    except ValidationError:
        assert not ok


def test_gitsource_fields_are_described(schemas: dict[str, dict[str, Any]]) -> None:
    props = spec_of(schemas["GitSource"])["properties"]
    assert all(node.get("description") for node in props.values()), [k for k, v in props.items()
                                                                      if not v.get("description")]
    assert props["interval"]["default"] == "30s" and props["writeBack"]["enum"] == ["commit", "off"]


# --- the CRD documents ---------------------------------------------------------------------------------------


def test_one_crd_per_kind_in_a_stable_order(docs: list[dict[str, Any]]) -> None:
    kinds = [d["spec"]["names"]["kind"] for d in docs]
    assert kinds == sorted(ALL_KINDS)
    assert crd_documents() == docs
    for doc in docs:
        spec = doc["spec"]
        assert doc["metadata"]["name"] == f"{spec['names']['plural']}.lockgate.io"
        assert spec["group"] == "lockgate.io" and spec["names"]["categories"] == ["lockgate"]
        assert spec["scope"] == ("Cluster" if spec["names"]["kind"] == "Mesh" else "Namespaced")
        [version] = spec["versions"]
        assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
        assert version["subresources"] == {"status": {}}
        status = version["schema"]["openAPIV3Schema"]["properties"]["status"]
        cond = status["properties"]["conditions"]["items"]["properties"]
        assert cond["status"]["enum"] == ["True", "False", "Unknown"]
        assert version["schema"]["openAPIV3Schema"]["required"] == ["spec"]


@pytest.mark.parametrize(("kind", "expected"), [
    ("Mesh", "meshes"), ("AuthorizationPolicy", "authorizationpolicies"), ("TrafficPolicy", "trafficpolicies"),
    ("PeerAuthentication", "peerauthentications"), ("Service", "services"), ("GitSource", "gitsources"),
    ("Gateway", "gateways"), ("Proxy", "proxies"), ("Box", "boxes"), ("Match", "matches"),
])
def test_plural(kind: str, expected: str) -> None:
    assert plural(kind) == expected


def test_printer_columns(docs: list[dict[str, Any]]) -> None:
    columns = {d["spec"]["names"]["kind"]: {c["name"]: c for c in d["spec"]["versions"][0]["additionalPrinterColumns"]}
               for d in docs}
    for kind, cols in columns.items():
        assert cols["Ready"]["jsonPath"] == '.status.conditions[?(@.type=="Ready")].status'
        assert cols["Age"] == {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
        expected = {"Ready", "Age", *(["Revision"] if kind in ("Mesh", "GitSource") else []),
                    *(["Canary", "Weight", "Phase"] if kind == "Rollout" else []),
                    *(["Hosts"] if kind == "Route" else [])}
        assert set(cols) == expected
    assert columns["Rollout"]["Weight"]["type"] == "integer"
    assert columns["Rollout"]["Canary"]["jsonPath"] == ".spec.canary"
    assert columns["Route"]["Hosts"]["jsonPath"] == ".spec.hosts"
    assert columns["GitSource"]["Revision"]["jsonPath"] == ".status.appliedRevision"


# --- structural, and accepted by Kubernetes' own schema ------------------------------------------------------


def test_every_crd_schema_is_structural(docs: list[dict[str, Any]]) -> None:
    for doc in docs:
        assert structural_problems(doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]) == [], \
            doc["metadata"]["name"]


OBJ = {"type": "object"}


@pytest.mark.parametrize(("schema", "problem"), [
    ({"type": "object", "properties": {"a": {"description": "no type"}}}, "properties.a: type is required"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/A"}}}, "properties.a: $ref is not allowed"),
    ({"type": "object", "$defs": {}}, "$defs is not allowed"),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": {"type": "string"}},
     "mutually exclusive"),
    ({"type": "object", "properties": {"a": {"nullable": True, **ANY}}}, "nullable needs a type"),
    ({"type": "object", "properties": {"a": {"type": "object", "additionalProperties": False}}},
     "additionalProperties: false"),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "anyOf": [{"type": "object"}]},
     "type is not allowed inside"),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "anyOf": [{"properties": {"b": OBJ}}]},
     "are named in allOf/anyOf/oneOf/not"),
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "(?!x)"}}}, "not valid RE2"),
    ({"type": "object", "properties": {"a": {"type": "number", "exclusiveMinimum": 0}}}, "must be a boolean"),
    ({"type": "object", "properties": {"a": {"type": "integer", "minimum": 1, "default": 0}}},
     "default 0 does not validate"),
    ({"type": "object", "properties": {"a": {"type": "array"}}}, "an array needs items"),
    ({"type": "object", "properties": {"a": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}}},
     "uniqueItems"),
    ({"type": "object", "properties": {"a": {"type": "null"}}}, "type 'null' is not one of"),
    ({"type": "object", "properties": {"a": {"x-kubernetes-int-or-string": True, "type": "string"}}},
     "must not have a type"),
    ({"type": "string"}, "the root must be type: object"),
    ({"type": "object", "properties": {"metadata": {"type": "object", "properties": {"labels": OBJ}}}},
     "only metadata.name and metadata.generateName"),
])
def test_structural_problems_finds_non_structural_schemas(schema: dict[str, Any], problem: str) -> None:
    problems = structural_problems(schema)
    assert any(problem in p for p in problems), problems


def test_structural_problems_accepts_int_or_string_junctors() -> None:
    schema = {"type": "object", "properties": {"port": {
        "x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]}}}
    assert structural_problems(schema) == []


def test_every_crd_passes_kubernetes_validate_strict(docs: list[dict[str, Any]]) -> None:
    version = latest_version()
    assert tuple(int(x) for x in version.split(".")[:2]) >= (1, 30)
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_kubernetes_validate_would_catch_a_broken_crd(docs: list[dict[str, Any]]) -> None:
    broken = copy.deepcopy(docs[0])
    broken["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["typo"] = "x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, latest_version(), strict=True)


# --- printing ------------------------------------------------------------------------------------------------


def test_dump_yaml_round_trips(docs: list[dict[str, Any]]) -> None:
    text = dump_yaml(docs)
    assert text.startswith("---\n") and text.count("\n---\n") == len(docs) - 1
    assert "&id" not in text and "*id" not in text and "{" not in text.split("openAPIV3Schema")[0]
    loaded = list(yaml.safe_load_all(text))
    assert loaded == docs
    assert list(loaded[0]) == ["apiVersion", "kind", "metadata", "spec"]


def test_dump_yaml_shares_nothing_even_when_values_are_shared() -> None:
    shared = {"a": 1}
    text = dump_yaml([{"x": shared, "y": shared}])
    assert "&" not in text and list(yaml.safe_load_all(text)) == [{"x": {"a": 1}, "y": {"a": 1}}]

