"""`lockgate plan`: what applying a revision would change in each cluster, in readable terms.

Both revisions go through the one pipeline `up` serves from (`reconciler.pipeline`: rollout overlay,
other clusters, certificates, security, render), against the topology their intent asks for, and the
per-proxy snapshots are compared resource by resource: an mTLS mode, an authorization rule or a rollout's
weights show up here exactly as they would be pushed. Route changes are described per rule
("v1 100% -> v1 50%, v2 50%"), not as proto dumps; identical changes on many proxies are listed once.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from mesh.intent import Intent
from mesh.render.routes import INGRESS_PREFIX, NO_TIMEOUT, OUTBOUND_PREFIX
from mesh.xds.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET, Snapshot
from reconciler.pipeline import Certificates, RolloutStates, ephemeral_certificates, render_planned

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


def plan(*, old: Intent | None, new: Intent, states: RolloutStates | None = None,
         certs: Certificates | None = None) -> list[ClusterPlan]:
    """Per cluster of either revision, the changes from `old` (None: nothing applied yet) to `new`.

    `states`: the rollouts' state (what `up` would overlay now). `certs`: one authority for both renders
    (default: an in-memory one), so a certificate differs only where a proxy's identity does."""
    names = [c.name for c in new.mesh.spec.clusters]
    if old is not None:
        names += [c.name for c in old.mesh.spec.clusters if c.name not in names]
    certs = certs if certs is not None else ephemeral_certificates(names)
    states = states or {}
    before = _snapshots(old, states, certs)
    after = _snapshots(new, states, certs)
    return [ClusterPlan(cluster=cluster, changes=tuple(_diff(before.get(cluster, {}), after.get(cluster, {}))))
            for cluster in names]


def _snapshots(intent: Intent | None, states: RolloutStates, certs: Certificates
               ) -> dict[str, Mapping[str, Snapshot]]:
    if intent is None:
        return {}
    rendered = render_planned(intent, states=states, certs=certs)
    for r in rendered.values():
        if r.error is not None:
            raise ValueError(f"cluster {r.cluster}: the rendered configuration is inconsistent: {r.error}")
    return {name: r.snapshots for name, r in rendered.items()}


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
            if type_url == ROUTE:
                a, b = _as_one_outbound(a), _as_one_outbound(b)
            if old is None or new is None:
                continue  # a whole proxy appearing or going is one line, not one per resource
            for change in _diff_resources(kind, a, b):
                grouped.setdefault(change, []).append(node)
    return [Change(op=op, kind=kind, name=name, detail=detail, proxies=tuple(nodes))
            for (op, kind, name, detail), nodes in grouped.items()]


def _as_one_outbound(resources: dict[str, Any]) -> dict[str, Any]:
    """Route configurations cut per destination (`outbound|svc.ns`) or per exposed host (`ingress|host`),
    render's scopes, read as the one `outbound` or `ingress` configuration they replace: a plan names the
    virtual host and rule that change (`outbound > reviews.shop > default`), whichever way render cut the
    routes. A virtual host under several hosts' configurations is read once."""
    for prefix, whole in ((OUTBOUND_PREFIX, "outbound"), (INGRESS_PREFIX, "ingress")):
        cut = sorted(n for n in resources if n.startswith(prefix))
        if not cut:
            continue
        vhosts: dict[str, Any] = {}
        for n in cut:
            for vh in resources[n]["virtual_hosts"]:
                vhosts.setdefault(vh["name"], vh)
        merged = {"name": whole, "virtual_hosts": list(vhosts.values())}
        resources = {**{n: r for n, r in resources.items() if n not in cut}, whole: merged}
    return resources


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
            # No timeout is every route's unless its rule sets one (render's default): not worth a word.
            if key not in ("cluster", "weighted_clusters") and (key, action[key]) != ("timeout", NO_TIMEOUT):
                parts.append(f"{key} {_compact(action[key])}")
    for key in ("redirect", "direct_response"):
        if key in entry:
            parts.append(f"{key} {_compact(entry[key])}")
    for name, cfg in sorted(entry.get("typed_per_filter_config", {}).items()):
        parts.append(_describe_filter(name, cfg))
    match = " & ".join(c for c in cond if c)
    return ("any request" if match in ("", "prefix /") else match), "; ".join(parts)


def describe_listener(listener: Mapping[str, Any]) -> str:
    """What a person changes in a listener, in words: its mTLS mode, authorization and rate limits."""
    chains = listener.get("filter_chains", [])
    tls = [c for c in chains if "transport_socket" in c]
    mode = "plaintext" if not tls else "mTLS STRICT" if len(tls) == len(chains) else "mTLS PERMISSIVE"
    parts = [mode]
    filters = [f for c in chains[:1] for nf in c.get("filters", [])
               for f in nf.get("typed_config", {}).get("http_filters", [])]
    for f in filters:
        cfg = f.get("typed_config", {})
        if ("rules" in cfg or "token_bucket" in cfg or "HTTPFault" in str(cfg.get("@type", ""))):
            parts.append(_describe_filter(str(f.get("name", "")), cfg))
    return ", ".join(parts)


def _describe_filter(name: str, cfg: Mapping[str, Any]) -> str:
    """An HTTP filter's configuration (in a listener, or per route) in words: authorization rules with
    their paths and principals, a rate limit's bucket, fault injection; else the filter's name."""
    kind = str(cfg.get("@type", "")).rsplit(".", 1)[-1]
    rbac = cfg.get("rbac", cfg) if kind in ("RBAC", "RBACPerRoute") else None
    if rbac is not None and "rules" in rbac:
        rules = rbac["rules"]
        policies = [f"{pol_name}: {_rbac_policy(pol)}" for pol_name, pol in sorted(rules.get("policies", {}).items())]
        return f"authorization {rules.get('action', 'ALLOW')} [" + "; ".join(policies) + "]"
    if kind == "LocalRateLimit" and "token_bucket" in cfg:
        bucket = cfg["token_bucket"]
        return (f"rate limit {bucket.get('tokens_per_fill')} per {bucket.get('fill_interval')}"
                f" (burst {bucket.get('max_tokens')})")
    if kind == "HTTPFault":
        return "fault " + _compact({k: v for k, v in cfg.items() if k != "@type"})
    return f"filter {name}"


def _rbac_policy(policy: Mapping[str, Any]) -> str:
    """`GET /reviews/* from spiffe://.../sa/frontend`: methods, paths and principals found in the policy."""
    found: dict[str, list[str]] = {"methods": [], "paths": [], "principals": []}

    def walk(node: Any) -> None:
        if isinstance(node, Mapping):
            if "url_path" in node:
                path = node["url_path"].get("path", {})
                found["paths"].append(path.get("exact") or f"{path.get('prefix', '')}*")
            elif node.get("header", {}).get("name") == ":method":
                found["methods"].append(node["header"].get("string_match", {}).get("exact", "?"))
            elif "authenticated" in node:
                name = node["authenticated"].get("principal_name", {})
                found["principals"].append(name.get("exact") or f"{name.get('prefix', '')}*")
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(policy.get("permissions", []))
    walk(policy.get("principals", []))
    to = " ".join([*found["methods"], *found["paths"]]) or "any request"
    who = ", ".join(found["principals"]) or "anyone"
    return f"{to} from {who}"


def _version(cluster: str) -> str:
    if cluster.startswith("inbound|"):
        return "the app"
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
    if kind == "secret":
        return "rotated"  # never the content: it holds a private key
    if kind == "listener" and (da := describe_listener(a)) != (db := describe_listener(b)):
        return f"{da}  ->  {db}"
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
