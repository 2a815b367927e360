"""CustomResourceDefinitions generated from the intent models, so the CRDs can never drift from the loader.

pydantic gives a JSON Schema (draft 2020-12, `$ref`s, `anyOf` for optionals); Kubernetes wants a *structural*
OpenAPI v3.0 schema (every node typed, no `$ref`, `nullable`, boolean `exclusiveMinimum`, no `additionalProperties:
false`). `structural_schema` converts one into the other. The CRD is never stricter than the model: what it cannot
express exactly it leaves open (the operator still validates every resource with the model and reports errors in
`status`), so a resource the loader accepts is never refused by the API server.

Also here, for tests and `lockgate k8s crds --check`: `structural_problems` (the rules the API server applies to a
CRD's schema) and `resource_problems` (a resource checked against its CRD with jsonschema, Kubernetes' `nullable`
and strict field validation emulated).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from typing import Any

import jsonschema  # type: ignore[import-untyped]  # no stubs pinned (types-jsonschema)
import re2
import yaml
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from mesh.intent import API_VERSION, ResourceBase
from reconciler.k8s.gitsource import GITSOURCE_KIND, GitSource
from reconciler.kinds import KINDS

Schema = dict[str, Any]

GROUP, VERSION = API_VERSION.split("/")
CATEGORY = "lockgate"
CLUSTER_SCOPED = frozenset({"Mesh"})
"""Mesh is one per mesh (the loader takes the first; nothing reads its namespace): a namespace would only
suggest there could be one per namespace."""
SHORT_NAMES = {"Mesh": "lgmesh", "Service": "lgsvc", "Workload": "lgwl", "Route": "lgroute",
               "TrafficPolicy": "lgtp", "PeerAuthentication": "lgpa", "AuthorizationPolicy": "lgap",
               "RateLimit": "lgrl", "Rollout": "lgro", "ExternalService": "lgext", GITSOURCE_KIND: "lggs"}
"""`kubectl get services` means the core kind, and Istio's plurals (peerauthentications, ...) clash too: a
prefix no one else uses keeps short names unambiguous; `kubectl get lockgate` lists them all (the category)."""
MAX_DEPTH = 32
"""Inlining stops here (recursive models): deeper values are left open (x-kubernetes-preserve-unknown-fields)."""

ANY: Schema = {"x-kubernetes-preserve-unknown-fields": True}
"""Any value at all: Kubernetes' only structural way to say "a number or an object" (the model decides)."""
_FORMATS = frozenset({"date", "date-time", "datetime", "duration", "uuid", "email", "hostname", "ipv4", "ipv6",
                      "cidr", "mac", "uri", "byte", "password", "int32", "int64", "float", "double"})
"""Formats the API server knows; others (pydantic's `path`, `regex`, ...) are dropped."""
_KEPT = ("description", "minimum", "maximum", "multipleOf", "minLength", "maxLength", "minItems", "maxItems",
         "minProperties", "maxProperties")
_JUNCTORS = ("allOf", "anyOf", "oneOf", "not")


def plural(kind: str) -> str:
    """Kubernetes' resource name for a kind: lower case, English plural (meshes, authorizationpolicies)."""
    word = kind.lower()
    if word.endswith(("s", "sh", "ch", "x", "z")):
        return word + "es"
    if word.endswith("y") and word[-2:-1] not in tuple("aeiou"):
        return word[:-1] + "ies"
    return word + "s"


# --- pydantic JSON Schema -> structural OpenAPI --------------------------------------------------------------


class _CRDJsonSchema(GenerateJsonSchema):
    """pydantic's generator, adjusted where the plain JSON Schema would make the CRD stricter than the model."""

    def function_before_schema(self, schema: core_schema.BeforeValidatorFunctionSchema) -> JsonSchemaValue:
        # A before-validator takes other shapes than the type it produces (Istio's `percentage: {value: 10}`
        # for a number): without a declared input type, any value may be valid.
        if self.mode == "validation" and not schema.get("json_schema_input_schema"):
            return dict(ANY)
        return super().function_before_schema(schema)

    def model_fields_schema(self, schema: core_schema.ModelFieldsSchema) -> JsonSchemaValue:
        # AliasChoices: the schema names only the first choice; the others (`responseCode` for `redirectCode`)
        # are accepted by the model, so they are properties too (and none of them is required on its own).
        json_schema = super().model_fields_schema(schema)
        target = self.resolve_ref_schema(json_schema)
        props: dict[str, Any] = target.get("properties", {})
        for field in schema["fields"].values():
            choices = [p[0] for p in field.get("validation_alias") or [] if isinstance(p, list) and len(p) == 1
                       and isinstance(p[0], str)] if isinstance(field.get("validation_alias"), list) else []
            primary = next((c for c in choices if c in props), None)
            if primary is None:
                continue
            for other in choices:
                props.setdefault(other, copy.deepcopy(props[primary]))
            if len(choices) > 1 and primary in target.get("required", []):
                target["required"] = [r for r in target["required"] if r != primary]
        return json_schema


def model_schema(model: type[BaseModel]) -> Schema:
    """The JSON Schema of `model` as the CRD converter reads it (validation mode, field names by alias)."""
    return model.model_json_schema(by_alias=True, mode="validation", schema_generator=_CRDJsonSchema)


def structural_schema(model: type[BaseModel]) -> Schema:
    """`model` as a Kubernetes structural schema: the `openAPIV3Schema` of a CRD whose objects are `model`."""
    json_schema = model_schema(model)
    return _convert(json_schema, defs=json_schema.get("$defs", {}), seen=(), depth=0)


def _resolve(node: Schema, defs: Schema, seen: tuple[str, ...]) -> tuple[Schema, tuple[str, ...]] | None:
    """Inline a `$ref` (and pydantic's `allOf: [$ref]` wrapper), keeping the referring node's own keys.

    None when the reference is already being inlined above: a recursive model, cut here."""
    ref = node.get("$ref")
    if ref is None and isinstance(node.get("allOf"), list) and len(node["allOf"]) == 1 and "$ref" in node["allOf"][0]:
        ref = node["allOf"][0]["$ref"]
        node = {k: v for k, v in node.items() if k != "allOf"}
    if ref is None:
        return node, seen
    name = ref.rsplit("/", 1)[-1]
    if name in seen:
        return None
    own = {k: v for k, v in node.items() if k != "$ref"}
    return {**copy.deepcopy(defs[name]), **own}, (*seen, name)


def _convert(node: Schema, *, defs: Schema, seen: tuple[str, ...], depth: int) -> Schema:
    resolved = _resolve(node, defs, seen)
    if resolved is None or depth > MAX_DEPTH:
        # Recursion (or absurd depth): Kubernetes schemas cannot refer to themselves, so below this point the
        # value is kept as given and only the model checks it.
        target = defs.get(str(node.get("$ref", "")).rsplit("/", 1)[-1], {})
        cut: Schema = {"type": "object"} if target.get("type") == "object" else {}
        return {**cut, **ANY}
    node, seen = resolved
    if "anyOf" in node or "oneOf" in node:
        return _convert_union(node, defs=defs, seen=seen, depth=depth)
    if "const" in node:
        node = {**{k: v for k, v in node.items() if k != "const"}, "enum": [node["const"]]}
    kind = node.get("type")
    out: Schema = {}
    if isinstance(kind, list):  # ["string", "null"]: another spelling of a nullable union
        return _convert_union({**{k: v for k, v in node.items() if k != "type"},
                               "anyOf": [{"type": t} for t in kind]}, defs=defs, seen=seen, depth=depth)
    if kind is None or kind == "null":
        out = dict(ANY)
    else:
        out["type"] = kind
    out.update({k: node[k] for k in _KEPT if k in node})
    for exclusive, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(exclusive), int | float) and not isinstance(node.get(exclusive), bool):
            out[bound] = node[exclusive]
            out[exclusive] = True  # OpenAPI 3.0: a flag on minimum/maximum, not a number of its own
    if "enum" in node:
        out["enum"] = [v for v in node["enum"] if v is not None]
    if isinstance(node.get("pattern"), str) and _re2_ok(node["pattern"]):
        out["pattern"] = node["pattern"]  # one RE2 cannot read (look-around, back-references) is left to the model
    if node.get("format") in _FORMATS:
        out["format"] = node["format"]
    if kind == "object":
        props = node.get("properties", {})
        if props:
            out["properties"] = {name: _convert(sub, defs=defs, seen=seen, depth=depth + 1)
                                 for name, sub in props.items()}
            required = [r for r in node.get("required", []) if r in props]
            if required:
                out["required"] = required
        extra = node.get("additionalProperties")
        if isinstance(extra, dict) and extra:
            if props:  # Kubernetes forbids properties next to additionalProperties: keep the rest as given
                out.update(ANY)
            else:
                out["additionalProperties"] = _convert(extra, defs=defs, seen=seen, depth=depth + 1)
        elif extra is True or extra == {} or (extra is None and not props):
            out.update(ANY)  # a free-form mapping (dict[str, Any], bare dict)
    if kind == "array":
        items = node.get("items")
        prefix = node.get("prefixItems")
        if isinstance(items, dict):
            out["items"] = _convert(items, defs=defs, seen=seen, depth=depth + 1)
        elif isinstance(prefix, list) and prefix:  # a tuple: one item schema if all positions agree
            converted = [_convert(p, defs=defs, seen=seen, depth=depth + 1) for p in prefix]
            out["items"] = converted[0] if all(c == converted[0] for c in converted) else dict(ANY)
        else:
            out["items"] = dict(ANY)
    if "default" in node and node["default"] is not None and _default_ok(out, node["default"]):
        out["default"] = copy.deepcopy(node["default"])
    return out


def _convert_union(node: Schema, *, defs: Schema, seen: tuple[str, ...], depth: int) -> Schema:
    """`X | None` -> X with `nullable`; `int | str` -> int-or-string; any other union -> left open."""
    branches: list[Schema] = node.get("anyOf") or node.get("oneOf") or []
    rest = [b for b in branches if b.get("type") != "null"]
    nullable = len(rest) < len(branches)
    outer = {k: v for k, v in node.items() if k not in ("anyOf", "oneOf", "discriminator")}
    if len(rest) == 1:
        out = _convert({**rest[0], **outer}, defs=defs, seen=seen, depth=depth)
    else:
        converted = [_convert(b, defs=defs, seen=seen, depth=depth) for b in rest]
        types = {c.get("type") for c in converted}
        out = {k: outer[k] for k in ("description",) if k in outer}
        if types == {"integer", "string"} and len(converted) == 2:
            out["x-kubernetes-int-or-string"] = True
        elif len(types) == 1 and None not in types:
            out["type"] = types.pop()  # one type, several shapes: the shared type, the details to the model
            if out["type"] == "object":
                out.update(ANY)
        else:
            out.update(ANY)
        if "default" in outer and outer["default"] is not None and _default_ok(out, outer["default"]):
            out["default"] = copy.deepcopy(outer["default"])
    if nullable and "type" in out:
        out["nullable"] = True  # only next to a type: an untyped node takes null anyway
    return out


def _re2_ok(pattern: str) -> bool:
    """Whether the API server (Go's regexp, RE2 syntax) can compile `pattern`."""
    try:
        re2.compile(pattern)
    except Exception:  # re2.error; the wrapper has no precise exception type
        return False
    return True


def _default_ok(node: Schema, value: Any) -> bool:
    """Kubernetes refuses a CRD whose default does not validate against its own node (a structural default)."""
    return not list(jsonschema.Draft202012Validator(json_schema(node)).iter_errors(value))


# --- the CRDs ------------------------------------------------------------------------------------------------


def _conditions() -> Schema:
    """metav1.Condition, the shape `kubectl wait --for=condition=Ready` and every controller understands."""
    return {
        "type": "array",
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"],
        "items": {
            "type": "object",
            "required": ["type", "status"],
            "properties": {
                "type": {"type": "string", "maxLength": 316},
                "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
                "reason": {"type": "string", "maxLength": 1024},
                "message": {"type": "string", "maxLength": 32768},
                "lastTransitionTime": {"type": "string", "format": "date-time"},
                "observedGeneration": {"type": "integer", "format": "int64", "minimum": 0},
            },
        },
    }


def _columns(kind: str) -> list[Schema]:
    own: dict[str, list[Schema]] = {
        "Mesh": [{"name": "Revision", "type": "string", "jsonPath": ".status.appliedRevision"}],
        GITSOURCE_KIND: [{"name": "Revision", "type": "string", "jsonPath": ".status.appliedRevision"}],
        "Rollout": [{"name": "Canary", "type": "string", "jsonPath": ".spec.canary"},
                    {"name": "Weight", "type": "integer", "jsonPath": ".status.weight"},
                    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"}],
        "Route": [{"name": "Hosts", "type": "string", "jsonPath": ".spec.hosts"}],
    }
    return [*own.get(kind, []),
            {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}]


def resource_schema(model: type[ResourceBase]) -> Schema:
    """The `openAPIV3Schema` of one kind: the model's spec, Kubernetes' envelope, and a status for the operator."""
    converted = structural_schema(model)
    props = converted.get("properties", {})
    metadata: Schema = {"type": "object"}
    name = props.get("metadata", {}).get("properties", {}).get("name")
    if name:  # only name and generateName may be restricted in metadata; the model wants a DNS label
        metadata["properties"] = {"name": {k: v for k, v in name.items() if k in ("type", "maxLength", "pattern")}}
    out: Schema = {
        "type": "object",
        "description": props.get("spec", {}).get("description") or (model.__doc__ or "").strip().split("\n")[0],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": metadata,
            "spec": props["spec"],
            "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                       "properties": {"conditions": _conditions()}},
        },
    }
    if not out["description"]:
        del out["description"]
    if "spec" in converted.get("required", []):
        out["required"] = ["spec"]
    return out


def crd_document(kind: str, model: type[ResourceBase]) -> Schema:
    """One CustomResourceDefinition (apiextensions.k8s.io/v1) for `kind`, its schema generated from `model`."""
    name = plural(kind)
    names: Schema = {"kind": kind, "listKind": f"{kind}List", "plural": name, "singular": kind.lower(),
                     "categories": [CATEGORY]}
    if kind in SHORT_NAMES:
        names["shortNames"] = [SHORT_NAMES[kind]]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{name}.{GROUP}", "labels": {"app.kubernetes.io/part-of": "lockgate"}},
        "spec": {
            "group": GROUP,
            "names": names,
            "scope": "Cluster" if kind in CLUSTER_SCOPED else "Namespaced",
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "schema": {"openAPIV3Schema": resource_schema(model)},
                "subresources": {"status": {}},
                "additionalPrinterColumns": _columns(kind),
            }],
        },
    }


def crd_kinds() -> dict[str, type[ResourceBase]]:
    """Every kind with a CRD: the intent kinds and GitSource, sorted by name (a stable order to print and diff)."""
    kinds: dict[str, type[ResourceBase]] = {**KINDS, GITSOURCE_KIND: GitSource}
    return {k: kinds[k] for k in sorted(kinds)}


def crd_documents() -> list[Schema]:
    """The CRDs `lockgate k8s crds` prints: one per kind of `crd_kinds()`."""
    return [crd_document(kind, model) for kind, model in crd_kinds().items()]


# --- checks --------------------------------------------------------------------------------------------------


def _children(node: Schema, path: str) -> Iterator[tuple[str, Any]]:
    for name, sub in (node.get("properties") or {}).items():
        yield f"{path}.properties.{name}", sub
    if isinstance(node.get("additionalProperties"), dict):
        yield f"{path}.additionalProperties", node["additionalProperties"]
    if isinstance(node.get("items"), dict):
        yield f"{path}.items", node["items"]


def _junctor_nodes(node: Schema, path: str) -> Iterator[tuple[str, Schema]]:
    """Every schema inside allOf/anyOf/oneOf/not, however deep (they may nest properties themselves)."""
    for j in _JUNCTORS:
        subs = node.get(j)
        for i, sub in enumerate(subs if isinstance(subs, list) else [subs] if isinstance(subs, dict) else []):
            if isinstance(sub, dict):
                yield f"{path}.{j}[{i}]", sub
                yield from _junctor_nodes(sub, f"{path}.{j}[{i}]")
                for child_path, child in _children(sub, f"{path}.{j}[{i}]"):
                    if isinstance(child, dict):
                        yield child_path, child
                        yield from _junctor_nodes(child, child_path)


def _field_names(node: Schema) -> tuple[set[str], bool]:
    """Property names a node (or its junctors) speaks of, and whether it speaks of items."""
    names = set((node.get("properties") or {}).keys())
    items = "items" in node
    for _, sub in _junctor_nodes(node, ""):
        names |= set((sub.get("properties") or {}).keys())
        items = items or "items" in sub
    return names, items


def structural_problems(schema: Schema, *, path: str = "openAPIV3Schema") -> list[str]:
    """What the API server would refuse in a CRD's `openAPIV3Schema` (structural schema rules, v1 validation).

    Each problem names the node, `openAPIV3Schema.properties.spec...`. Empty: the schema is structural."""
    problems: list[str] = []
    _check(schema, path, problems, root=True)
    return problems


def _check(node: Any, path: str, problems: list[str], *, root: bool = False) -> None:
    if not isinstance(node, dict):
        problems.append(f"{path}: a schema must be an object, got {type(node).__name__}")
        return
    for key in ("$ref", "definitions", "$defs", "$schema", "id", "$id", "patternProperties", "dependencies",
                "additionalItems", "const", "prefixItems", "propertyNames", "discriminator"):
        if key in node:
            problems.append(f"{path}: {key} is not allowed")
    preserve = node.get("x-kubernetes-preserve-unknown-fields")
    int_or_string = node.get("x-kubernetes-int-or-string")
    kind = node.get("type")
    if preserve is not None and preserve is not True:
        problems.append(f"{path}: x-kubernetes-preserve-unknown-fields must be true or absent")
    if int_or_string is not None and int_or_string is not True:
        problems.append(f"{path}: x-kubernetes-int-or-string must be true or absent")
    if kind is None and not preserve and not int_or_string:
        problems.append(f"{path}: type is required (unless x-kubernetes-preserve-unknown-fields or "
                        "x-kubernetes-int-or-string)")
    if kind is not None and kind not in ("object", "array", "string", "integer", "number", "boolean"):
        problems.append(f"{path}: type {kind!r} is not one of object, array, string, integer, number, boolean")
    if int_or_string and kind is not None:
        problems.append(f"{path}: x-kubernetes-int-or-string must not have a type")
    if root and kind != "object":
        problems.append(f"{path}: the root must be type: object")
    if "nullable" in node and kind is None:
        problems.append(f"{path}: nullable needs a type")
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{path}: properties and additionalProperties are mutually exclusive")
    if node.get("additionalProperties") is False:
        problems.append(f"{path}: additionalProperties: false is not allowed (unknown fields are pruned)")
    if node.get("uniqueItems") is True:
        problems.append(f"{path}: uniqueItems: true is not allowed")
    if "items" in node and not isinstance(node["items"], dict):
        problems.append(f"{path}: items must be one schema")
    if kind == "array" and "items" not in node:
        problems.append(f"{path}: an array needs items")
    for flag in ("exclusiveMinimum", "exclusiveMaximum"):
        if flag in node and not isinstance(node[flag], bool):
            problems.append(f"{path}: {flag} must be a boolean next to minimum/maximum (OpenAPI 3.0)")
    if "pattern" in node and not (isinstance(node["pattern"], str) and _re2_ok(node["pattern"])):
        problems.append(f"{path}: pattern {node['pattern']!r} is not valid RE2")
    # Junctors may only restrict values of fields that the node itself declares, and never set these:
    names, items = _field_names(node)
    own = set((node.get("properties") or {}).keys())
    for sub_path, sub in _junctor_nodes(node, path):
        for key in ("type", "description", "default", "additionalProperties", "nullable"):
            if key in sub and not _int_or_string_junctor(node, sub):
                problems.append(f"{sub_path}: {key} is not allowed inside allOf/anyOf/oneOf/not")
    if names - own and node.get("type") == "object":
        problems.append(f"{path}: fields {sorted(names - own)} are named in allOf/anyOf/oneOf/not, not in properties")
    if items and "items" not in node:
        problems.append(f"{path}: items are restricted in allOf/anyOf/oneOf/not but not declared")
    if "default" in node and kind is not None:
        errors = list(jsonschema.Draft202012Validator(json_schema(node)).iter_errors(node["default"]))
        if errors:
            problems.append(f"{path}: default {node['default']!r} does not validate: {errors[0].message}")
    if path.endswith("openAPIV3Schema.properties.metadata"):
        extra = set((node.get("properties") or {}).keys()) - {"name", "generateName"}
        if extra or set(node) - {"type", "properties", "description"}:
            problems.append(f"{path}: only metadata.name and metadata.generateName may be restricted")
    for child_path, child in _children(node, path):
        _check(child, child_path, problems)


def _int_or_string_junctor(parent: Schema, sub: Schema) -> bool:
    """The one exception: `x-kubernetes-int-or-string` with `anyOf: [{type: integer}, {type: string}]`."""
    return bool(parent.get("x-kubernetes-int-or-string")) and set(sub) <= {"type"} and \
        sub.get("type") in ("integer", "string")


# --- validating resources ------------------------------------------------------------------------------------


def json_schema(schema: Schema, *, strict: bool = True) -> Schema:
    """A Kubernetes structural schema as JSON Schema 2020-12, to check resources with jsonschema the way the API
    server would: `nullable` allows null, OpenAPI 3.0's boolean `exclusiveMinimum` becomes a number, int-or-string
    takes either, and (strict, as `kubectl apply`'s default field validation) unknown fields are errors."""
    out = _to_json_schema(schema, strict=strict)
    if isinstance(out.get("properties"), dict) and "metadata" in out["properties"]:
        meta = out["properties"]["metadata"]
        meta.pop("additionalProperties", None)  # the API server owns metadata (labels, annotations, uid, ...)
    return out


def _to_json_schema(node: Schema, *, strict: bool) -> Schema:
    out: Schema = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {n: _to_json_schema(s, strict=strict) for n, s in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = _to_json_schema(value, strict=strict)
        elif key in _JUNCTORS:
            out[key] = ([_to_json_schema(s, strict=strict) for s in value] if isinstance(value, list)
                        else _to_json_schema(value, strict=strict))
        elif key.startswith("x-kubernetes-") or key in ("nullable", "exclusiveMinimum", "exclusiveMaximum",
                                                          "format"):
            continue
        else:
            out[key] = copy.deepcopy(value)
    for flag, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if node.get(flag) is True and bound in out:
            out[flag] = out.pop(bound)
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if node.get("nullable") and "type" in out:
        out["type"] = [*(out["type"] if isinstance(out["type"], list) else [out["type"]]), "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    if (strict and node.get("type") == "object" and not node.get("x-kubernetes-preserve-unknown-fields")
            and "additionalProperties" not in node):
        out["additionalProperties"] = False  # what the API server prunes, strict field validation refuses
    return out


def crds_by_kind(docs: Iterable[Schema]) -> dict[str, Schema]:
    """kind -> its CRD's openAPIV3Schema (of the storage version)."""
    out: dict[str, Schema] = {}
    for doc in docs:
        version = next(v for v in doc["spec"]["versions"] if v.get("storage"))
        out[doc["spec"]["names"]["kind"]] = version["schema"]["openAPIV3Schema"]
    return out


def resource_problems(resource: Any, schemas: dict[str, Schema]) -> list[str]:
    """Why the API server would refuse `resource` (one parsed YAML document) under these CRD schemas: one
    `path: message` per error, none when it would be accepted."""
    if not isinstance(resource, dict):
        return [f"<root>: a resource is a mapping, got {type(resource).__name__}"]
    if resource.get("apiVersion") != API_VERSION:
        return [f"apiVersion: expected {API_VERSION}, got {resource.get('apiVersion')!r}"]
    schema = schemas.get(str(resource.get("kind")))
    if schema is None:
        return [f"kind: no CRD for kind {resource.get('kind')!r}"]
    validator = jsonschema.Draft202012Validator(json_schema(schema))
    errors = sorted(validator.iter_errors(resource), key=lambda e: [str(p) for p in e.absolute_path])
    return [f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}" for e in errors]


# --- printing ------------------------------------------------------------------------------------------------


class _Dumper(yaml.SafeDumper):
    """Block style, keys in insertion order, and no `&id001` anchors for values that happen to be shared."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump_yaml(docs: Iterable[Any]) -> str:
    """Documents as multi-document YAML (`---` before each), for `lockgate k8s crds` and friends."""
    return yaml.dump_all(list(docs), Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                         explicit_start=True, allow_unicode=True, width=120)
