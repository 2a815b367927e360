"""Semantic checks across resources: references, weights, conflicts, regexes Envoy would reject.

Pure: takes parsed resources, returns findings that point at a resource and a field path. The caller
(the reconciler's loader) turns each path into `file:line`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import re2

from mesh.intent import Mesh, ResourceBase, Route, Service, StringMatch, Workload

Loc = tuple[str | int, ...]
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
_HOST = re.compile(r"^(\*|(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*)(:\d{1,5})?$")


@dataclass(frozen=True)
class Finding:
    index: int
    """Position of the resource in the list given to `validate`."""
    loc: Loc
    """Field path inside the resource, as in the YAML (camelCase names, list indexes)."""
    message: str
    warning: bool = False
    """A warning is reported but does not make the revision invalid."""


def validate(resources: Sequence[ResourceBase]) -> list[Finding]:
    """Every cross-resource problem of the mesh kinds at once, in resource order. Other kinds are
    only checked for duplicate names here; their own layer validates the rest."""
    out: list[Finding] = []
    seen: dict[tuple[str, str, str], int] = {}
    for i, r in enumerate(resources):
        if r.key in seen:
            out.append(Finding(i, ("metadata", "name"),
                               f"duplicate {r.key[0]} {r.metadata.namespace}/{r.metadata.name} "
                               f"(first defined as resource #{seen[r.key] + 1}); rename or remove one"))
        else:
            seen[r.key] = i

    meshes = [i for i, r in enumerate(resources) if isinstance(r, Mesh)]
    if not meshes:
        out.append(Finding(-1, (), "no Mesh resource: add one (kind: Mesh) naming the trust domain and clusters"))
    for i in meshes[1:]:
        out.append(Finding(i, ("kind",), "only one Mesh resource is allowed; merge it with the first one"))
    cluster_names: set[str] = set()
    if meshes:
        mesh = resources[meshes[0]]
        assert isinstance(mesh, Mesh)
        for j, c in enumerate(mesh.spec.clusters):
            if c.name in cluster_names:
                out.append(Finding(meshes[0], ("spec", "clusters", j, "name"), f"duplicate cluster {c.name!r}"))
            cluster_names.add(c.name)

    services = {(r.metadata.namespace, r.metadata.name): r for r in resources if isinstance(r, Service)}
    governed = {key for r in resources if (key := r.governs()) is not None}
    for i, r in enumerate(resources):
        if isinstance(r, Service):
            out += _check_service(i, r)
        elif isinstance(r, Workload):
            out += _check_workload(i, r, services, cluster_names, bool(meshes))
        elif isinstance(r, Route):
            out += _check_route(i, r, services, governed=(r.metadata.namespace, r.spec.service) in governed)
    out += _check_route_conflicts(resources)
    return out


def _dupes(values: Sequence[object]) -> list[int]:
    seen: set[object] = set()
    dup = []
    for j, v in enumerate(values):
        if v in seen:
            dup.append(j)
        seen.add(v)
    return dup


def _check_service(i: int, s: Service) -> list[Finding]:
    out = [Finding(i, ("spec", "versions", j), f"duplicate version {s.spec.versions[j]!r}")
           for j in _dupes(s.spec.versions)]
    out += [Finding(i, ("spec", "ports", j, "name"), f"duplicate port name {s.spec.ports[j].name!r}")
            for j in _dupes([p.name for p in s.spec.ports])]
    out += [Finding(i, ("spec", "ports", j, "port"), f"duplicate port {s.spec.ports[j].port}")
            for j in _dupes([p.port for p in s.spec.ports])]
    return out


def _unknown_service(ns: str, name: str, services: dict[tuple[str, str], Service]) -> str:
    known = sorted(n for (sns, n) in services if sns == ns)
    hint = f"services in namespace {ns!r}: {', '.join(known)}" if known else f"no Service in namespace {ns!r}"
    return f"unknown service {name!r} ({hint})"


def _check_workload(
    i: int, w: Workload, services: dict[tuple[str, str], Service], clusters: set[str], have_mesh: bool
) -> list[Finding]:
    out = []
    ns = w.metadata.namespace
    svc = services.get((ns, w.spec.service))
    if svc is None:
        out.append(Finding(i, ("spec", "service"), _unknown_service(ns, w.spec.service, services)))
    elif w.spec.version not in svc.spec.versions:
        out.append(Finding(i, ("spec", "version"),
                           f"service {w.spec.service!r} has no version {w.spec.version!r} "
                           f"(declared: {', '.join(svc.spec.versions)})"))
    if have_mesh:
        for j, c in enumerate(w.spec.clusters):
            if c not in clusters:
                out.append(Finding(i, ("spec", "clusters", j),
                                   f"unknown cluster {c!r} (Mesh clusters: {', '.join(sorted(clusters))})"))
    return out


def _check_regex(pattern: str) -> str | None:
    try:
        re2.compile(pattern)
    except Exception as exc:  # re2.error carries RE2's own message, sometimes as bytes
        reason = exc.args[0] if exc.args else exc
        if isinstance(reason, bytes):
            reason = reason.decode(errors="replace")
        return f"invalid regex {pattern!r} (RE2 syntax, as Envoy uses): {reason}"
    return None


def _check_string_match(m: StringMatch, loc: Loc, i: int) -> list[Finding]:
    if m.regex is not None and (msg := _check_regex(m.regex)):
        return [Finding(i, (*loc, "regex"), msg)]
    return []


def _check_route(i: int, r: Route, services: dict[tuple[str, str], Service], *, governed: bool) -> list[Finding]:
    out: list[Finding] = []
    ns = r.metadata.namespace
    svc = services.get((ns, r.spec.service))
    if svc is None:
        out.append(Finding(i, ("spec", "service"), _unknown_service(ns, r.spec.service, services)))
    for j, host in enumerate(r.spec.hosts):
        if not _HOST.match(host):
            out.append(Finding(i, ("spec", "hosts", j),
                               f"invalid host {host!r}: use a DNS name, optionally *.prefixed or :port"))
    for j in _dupes([rule.name for rule in r.spec.http if rule.name is not None]):
        named = [k for k, rule in enumerate(r.spec.http) if rule.name is not None]
        out.append(Finding(i, ("spec", "http", named[j], "name"), "duplicate rule name"))
    default = next((k for k, rule in enumerate(r.spec.http) if not rule.match), None)
    for k, rule in enumerate(r.spec.http):
        base: Loc = ("spec", "http", k)
        total = sum(d.weight for d in rule.route)
        if governed and k == default:
            if rule.route:
                out.append(Finding(i, (*base, "route"), "a Rollout owns this rule's weights; the weights "
                                   "written here are ignored (leave `route` out)", warning=True))
        elif not rule.route:
            out.append(Finding(i, (*base, "route"), "at least one destination is required (only the default "
                               "rule of a service governed by a Rollout may leave `route` out)"))
        elif total != 100:
            weights = " + ".join(str(d.weight) for d in rule.route)
            out.append(Finding(i, (*base, "route"), f"weights must sum to 100, got {weights} = {total}"))
        for j in _dupes([d.version for d in rule.route]):
            out.append(Finding(i, (*base, "route", j, "version"), "version listed twice in one rule"))
        if svc is not None:
            for j, d in enumerate(rule.route):
                if d.version not in svc.spec.versions:
                    out.append(Finding(i, (*base, "route", j, "version"),
                                       f"service {r.spec.service!r} has no version {d.version!r} "
                                       f"(declared: {', '.join(svc.spec.versions)})"))
        for j, m in enumerate(rule.match):
            if m.uri is not None:
                out += _check_string_match(m.uri, (*base, "match", j, "uri"), i)
            for name, hm in m.headers.items():
                if not _HEADER_NAME.match(name):
                    out.append(Finding(i, (*base, "match", j, "headers", name), f"invalid header name {name!r}"))
                out += _check_string_match(hm, (*base, "match", j, "headers", name), i)
    return out


def _check_route_conflicts(resources: Sequence[ResourceBase]) -> list[Finding]:
    """One Route per service, one owner per ingress host: otherwise which rule wins is ambiguous."""
    out: list[Finding] = []
    owner: dict[tuple[str, str], Route] = {}
    host_owner: dict[str, Route] = {}
    for i, r in enumerate(resources):
        if not isinstance(r, Route):
            continue
        key = (r.metadata.namespace, r.spec.service)
        if (first := owner.get(key)) is not None and first.key != r.key:
            out.append(Finding(i, ("spec", "service"),
                               f"service {key[1]!r} already has Route {first.metadata.name!r}; "
                               "merge the rules into one Route"))
        owner.setdefault(key, r)
        for j, host in enumerate(r.spec.hosts):
            if (prev := host_owner.get(host)) is not None and prev.key != r.key:
                out.append(Finding(i, ("spec", "hosts", j),
                                   f"host {host!r} is already exposed by Route "
                                   f"{prev.metadata.namespace}/{prev.metadata.name}"))
            host_owner.setdefault(host, r)
    return out
