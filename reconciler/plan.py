"""`lockgate plan`: what applying a revision would change in each cluster, in readable terms.

Pure: both revisions are rendered against the topology their intent asks for (`planned_topology`), and
the per-proxy snapshots are compared resource by resource. Route changes are described per rule
("v1 100% -> v1 50%, v2 50%"), not as proto dumps; identical changes on many proxies are listed once.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from mesh.intent import Intent
from mesh.render import Extension, render
from mesh.topology import planned_topology
from mesh.xds.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET, Snapshot

Op = Literal["add", "remove", "change"]
_KIND = {LISTENER: "listener", ROUTE: "route", CLUSTER: "cluster", ENDPOINT: "endpoints", SECRET: "secret"}


@dataclass(frozen=True)
class Change:
    op: Op
    kind: str
    """route | cluster | endpoints | listener | secret | proxy"""
    name: str
    detail: str = ""
    proxies: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"op": self.op, "kind": self.kind, "name": self.name, "detail": self.detail,
                "proxies": list(self.proxies)}


@dataclass(frozen=True)
class ClusterPlan:
    cluster: str
    changes: tuple[Change, ...] = field(default_factory=tuple)


def plan(*, old: Intent | None, new: Intent, extensions: Sequence[Extension] = ()) -> list[ClusterPlan]:
    """Per cluster of either revision, the changes from `old` (None: nothing applied yet) to `new`."""
    names = [c.name for c in new.mesh.spec.clusters]
    if old is not None:
        names += [c.name for c in old.mesh.spec.clusters if c.name not in names]
    out = []
    for cluster in names:
        before = _render(old, cluster, extensions)
        after = _render(new, cluster, extensions)
        out.append(ClusterPlan(cluster=cluster, changes=tuple(_diff(before, after))))
    return out


def _render(intent: Intent | None, cluster: str, extensions: Sequence[Extension]) -> dict[str, Snapshot]:
    if intent is None or cluster not in {c.name for c in intent.mesh.spec.clusters}:
        return {}
    return render(intent=intent, topology=planned_topology(intent, cluster), extensions=extensions)


def _diff(before: Mapping[str, Snapshot], after: Mapping[str, Snapshot]) -> list[Change]:
    grouped: dict[tuple[Op, str, str, str], list[str]] = {}
    for node in sorted(set(before) | set(after)):
        if node not in before:
            grouped.setdefault(("add", "proxy", node, "new proxy"), []).append(node)
        elif node not in after:
            grouped.setdefault(("remove", "proxy", node, "proxy removed"), []).append(node)
        old, new = before.get(node), after.get(node)
        for type_url, kind in _KIND.items():
            a = dict(old.items(type_url)) if old else {}
            b = dict(new.items(type_url)) if new else {}
            if old is None or new is None:
                continue  # a whole proxy appearing or going is one line, not one per resource
            for change in _diff_resources(kind, a, b):
                grouped.setdefault(change, []).append(node)
    return [Change(op=op, kind=kind, name=name, detail=detail, proxies=tuple(nodes))
            for (op, kind, name, detail), nodes in grouped.items()]


def _diff_resources(kind: str, a: Mapping[str, Any], b: Mapping[str, Any]) -> list[tuple[Op, str, str, str]]:
    out: list[tuple[Op, str, str, str]] = []
    for name in sorted(set(a) | set(b)):
        if name not in a:
            out.append(("add", kind, name, _summary(kind, b[name])))
        elif name not in b:
            out.append(("remove", kind, name, _summary(kind, a[name])))
        elif a[name] != b[name]:
            if kind == "route":
                out += _diff_route_config(name, a[name], b[name])
            else:
                out.append(("change", kind, name, _changed_detail(kind, a[name], b[name])))
    return out


def _diff_route_config(name: str, a: Mapping[str, Any], b: Mapping[str, Any]) -> list[tuple[Op, str, str, str]]:
    """Per virtual host and per route entry: which rule changed, and how."""
    out: list[tuple[Op, str, str, str]] = []
    va = {v["name"]: v for v in a.get("virtual_hosts", [])}
    vb = {v["name"]: v for v in b.get("virtual_hosts", [])}
    for vh in sorted(set(va) | set(vb)):
        where = f"{name} > {vh}"
        if vh not in va:
            out.append(("add", "route", where, "hosts " + ", ".join(vb[vh]["domains"])))
            continue
        if vh not in vb:
            out.append(("remove", "route", where, "hosts " + ", ".join(va[vh]["domains"])))
            continue
        if va[vh] == vb[vh]:
            continue
        ra = {r.get("name", str(i)): r for i, r in enumerate(va[vh]["routes"])}
        rb = {r.get("name", str(i)): r for i, r in enumerate(vb[vh]["routes"])}
        for rule in list(dict.fromkeys([*ra, *rb])):
            if rule not in ra:
                out.append(("add", "route", f"{where} > {rule}", describe_route(rb[rule])))
            elif rule not in rb:
                out.append(("remove", "route", f"{where} > {rule}", describe_route(ra[rule])))
            elif ra[rule] != rb[rule]:
                (ma, aa), (mb, ab) = _route_parts(ra[rule]), _route_parts(rb[rule])
                detail = f"{aa}  ->  {ab}" if ma == mb else f"{ma}: {aa}  ->  {mb}: {ab}"
                out.append(("change", "route", f"{where} > {rule}", detail))
        if [r.get("name") for r in va[vh]["routes"]] != [r.get("name") for r in vb[vh]["routes"]] and \
                set(ra) == set(rb):
            out.append(("change", "route", where, "rule order changed"))
        if va[vh]["domains"] != vb[vh]["domains"]:
            out.append(("change", "route", where, "hosts " + ", ".join(vb[vh]["domains"])))
    return out


def describe_route(entry: Mapping[str, Any]) -> str:
    """One route entry in words: match, then where it sends traffic and with which options."""
    match, action = _route_parts(entry)
    return f"{match}: {action}"


def _route_parts(entry: Mapping[str, Any]) -> tuple[str, str]:
    m = entry.get("match", {})
    cond = [f"path {m['path']}" if "path" in m else f"prefix {m['prefix']}" if "prefix" in m
            else f"regex {m['safe_regex']['regex']}" if "safe_regex" in m else ""]
    cond += [f"header {h['name']}" for h in m.get("headers", [])]
    cond += [f"query {q['name']}" for q in m.get("query_parameters", [])]
    parts: list[str] = []
    if "route" in entry:
        action = entry["route"]
        if "weighted_clusters" in action:
            parts.append(", ".join(f"{_version(c['name'])} {c['weight']}%"
                                   for c in action["weighted_clusters"]["clusters"]))
        elif "cluster" in action:
            parts.append(f"{_version(action['cluster'])} 100%")
        for key in sorted(action):
            if key not in ("cluster", "weighted_clusters"):
                parts.append(f"{key} {_compact(action[key])}")
    for key in ("redirect", "direct_response"):
        if key in entry:
            parts.append(f"{key} {_compact(entry[key])}")
    if "typed_per_filter_config" in entry:
        parts.append("filters " + ", ".join(sorted(entry["typed_per_filter_config"])))
    match = " & ".join(c for c in cond if c)
    return ("any request" if match in ("", "prefix /") else match), "; ".join(parts)


def _version(cluster: str) -> str:
    pieces = cluster.split("|")
    return pieces[2] if len(pieces) > 2 else "all versions"


def _compact(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _summary(kind: str, res: Mapping[str, Any]) -> str:
    if kind == "endpoints":
        return f"{_endpoint_count(res)} instance(s)"
    if kind == "route":
        return f"{len(res.get('virtual_hosts', []))} virtual host(s)"
    return ""


def _endpoint_count(res: Mapping[str, Any]) -> int:
    return sum(len(group.get("lb_endpoints", [])) for group in res.get("endpoints", []))


def _changed_detail(kind: str, a: Mapping[str, Any], b: Mapping[str, Any]) -> str:
    if kind == "endpoints":
        return f"{_endpoint_count(a)} -> {_endpoint_count(b)} instance(s)"
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return "changed: " + ", ".join(keys)


def render_text(plans: Sequence[ClusterPlan], *, old: str | None, new: str) -> str:
    """The plan as a terminal reader wants it: one line per change, proxies summarised."""
    lines = [f"plan {old[:12] if old else '(nothing applied)'} -> {new[:12]}"]
    for p in plans:
        if not p.changes:
            lines.append(f"cluster {p.cluster}: no changes")
            continue
        lines.append(f"cluster {p.cluster}: {len(p.changes)} change(s)")
        for c in p.changes:
            sign = {"add": "+", "remove": "-", "change": "~"}[c.op]
            who = _who(c.proxies)
            detail = f": {c.detail}" if c.detail else ""
            lines.append(f"  {sign} {c.kind} {c.name}{detail}   [{who}]")
    return "\n".join(lines)


def _who(proxies: Sequence[str]) -> str:
    if len(proxies) <= 2:
        return ", ".join(proxies)
    return f"{len(proxies)} proxies: {proxies[0]}, ..."


def to_json(plans: Sequence[ClusterPlan], *, old: str | None, new: str) -> dict[str, Any]:
    return {"from": old, "to": new,
            "clusters": [{"name": p.cluster, "changes": [c.to_json() for c in p.changes]} for p in plans]}
