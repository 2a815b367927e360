"""Ask Envoy itself whether it would accept what a revision renders to (`envoy --mode validate`).

Our own validation catches what it knows about; Envoy knows everything. Each distinct proxy shape of
each cluster is rendered through the one pipeline `up` serves from (security, other clusters and rollout
weights included) against the planned topology, and validated by the real binary. When Envoy
refuses, the culprit is narrowed down resource by resource (cluster, then route rule, then listener)
so the error can point at the file and line of the intent that produced it.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh.envoy import static_bootstrap, validate_config
from mesh.intent import Intent
from mesh.render import Extension
from mesh.xds.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE, SCOPED_ROUTE, SECRET, Snapshot
from reconciler.pipeline import RolloutStates, ephemeral_certificates, planned_topologies, render_planned


@dataclass(frozen=True)
class Rejection:
    proxy: str
    kind: str
    """cluster | route | listener | config"""
    name: str
    message: str


def _parts(snap: Snapshot) -> dict[str, list[Any]]:
    return {key: [dict(r) for r in snap.items(t).values()] for key, t in
            (("listeners", LISTENER), ("routes", ROUTE), ("clusters", CLUSTER), ("endpoints", ENDPOINT),
             ("secrets", SECRET), ("scoped_routes", SCOPED_ROUTE))}


async def check_with_envoy(intent: Intent, *, states: RolloutStates | None = None,
                           extra: Sequence[Extension] = (), concurrency: int = 4) -> list[Rejection]:
    """Every rejection Envoy would make for this intent, one per culprit resource."""
    topologies = planned_topologies(intent)
    # Rendering makes keys (the in-memory authority): off the event loop, like any heavy work.
    certs = ephemeral_certificates(list(topologies))
    rendered = await asyncio.to_thread(render_planned, intent, states=states or {}, certs=certs, extra=extra)
    sem = asyncio.Semaphore(concurrency)
    with tempfile.TemporaryDirectory(prefix="lockgate-check-") as tmp:
        workdir = Path(tmp)

        async def valid(config: dict[str, Any]) -> str | None:
            async with sem:
                return await validate_config(config, workdir=workdir)

        jobs = []
        for name, topo in topologies.items():
            snaps = rendered[name].snapshots
            seen: set[tuple[str, str]] = set()
            for node, snap in snaps.items():
                sc = next((s for s in topo.sidecars if s.node_id == node), None)
                shape = (sc.namespace, sc.workload) if sc else ("", node)
                if shape not in seen:  # replicas of one workload render alike
                    seen.add(shape)
                    jobs.append(_check_proxy(node, snap, valid))
        found = [r for rs in await asyncio.gather(*jobs) for r in rs]
    unique: dict[tuple[str, str, str], Rejection] = {}
    for r in found:
        unique.setdefault((r.kind, r.name, r.message), r)
    return list(unique.values())


async def _check_proxy(node: str, snap: Snapshot, valid: Any) -> list[Rejection]:
    parts = _parts(snap)
    message = await valid(static_bootstrap(**parts))
    if message is None:
        return []
    # Narrow down: clusters alone, then each route entry, then listeners.
    out: list[Rejection] = []
    bad_clusters = await asyncio.gather(*(
        valid(static_bootstrap(clusters=[c], endpoints=parts["endpoints"], secrets=parts["secrets"]))
        for c in parts["clusters"]))
    for cluster, msg in zip(parts["clusters"], bad_clusters, strict=True):
        if msg is not None:
            out.append(Rejection(node, "cluster", cluster["name"], msg))
    if out:
        return out
    for rc in parts["routes"]:
        for vh in rc.get("virtual_hosts", []):
            results = await asyncio.gather(*(
                valid(_one_route(rc["name"], vh, entry, parts)) for entry in vh.get("routes", [])))
            for entry, msg in zip(vh.get("routes", []), results, strict=True):
                if msg is not None:
                    out.append(Rejection(node, "route", f"{rc['name']} > {vh['name']} > {entry.get('name', '')}",
                                         msg))
    if out:
        return out
    for listener in parts["listeners"]:
        msg = await valid(static_bootstrap(listeners=[listener], routes=parts["routes"], clusters=parts["clusters"],
                                           endpoints=parts["endpoints"], secrets=parts["secrets"],
                                           scoped_routes=parts["scoped_routes"]))
        if msg is not None:
            out.append(Rejection(node, "listener", listener["name"], msg))
    return out or [Rejection(node, "config", node, message)]


def _one_route(name: str, vhost: dict[str, Any], entry: dict[str, Any], parts: dict[str, list[Any]]
               ) -> dict[str, Any]:
    """A bootstrap with one listener whose route config holds just one route entry."""
    hcm_type = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
    holder = next((x for x in parts["listeners"] if _route_name(x) == name
                   or (name.startswith("outbound|") and x["name"] == "outbound")), None)  # scoped: per service
    filters = _http_filters(holder) if holder else [
        {"name": "envoy.filters.http.router",
         "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]
    listener = {
        "name": "check",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 1}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
            "@type": hcm_type, "stat_prefix": "check", "http_filters": filters,
            "rds": {"route_config_name": name, "config_source": {"ads": {}, "resource_api_version": "V3"}}}}]}],
    }
    route = {"name": name, "virtual_hosts": [{**vhost, "routes": [entry]}]}
    return static_bootstrap(listeners=[listener], routes=[route], clusters=parts["clusters"],
                            endpoints=parts["endpoints"], secrets=parts["secrets"])


def _hcm(listener: dict[str, Any]) -> dict[str, Any] | None:
    for chain in listener.get("filter_chains", []):
        for f in chain.get("filters", []):
            cfg = f.get("typed_config", {})
            if "HttpConnectionManager" in cfg.get("@type", ""):
                return dict(cfg)
    return None


def _route_name(listener: dict[str, Any]) -> str | None:
    hcm = _hcm(listener)
    return hcm.get("rds", {}).get("route_config_name") if hcm else None


def _http_filters(listener: dict[str, Any]) -> list[Any]:
    hcm = _hcm(listener)
    return list(hcm.get("http_filters", [])) if hcm else []


def locate(rejections: Sequence[Rejection], loaded: Any) -> list[Any]:
    """Rejections as `path:line: message` Problems, pointing at the intent that rendered the culprit.

    The same culprit seen on several proxies (every sidecar routes alike) is reported once."""
    from reconciler.load import Problem

    grouped: dict[tuple[str, int, str], list[str]] = {}
    for r in rejections:
        path, line = ".", 0
        resource, loc = _culprit(r, loaded.resources)
        if resource is not None:
            path, line = loaded.where(resource, loc)
        what = r.name.split(" > ", 1)[1] if r.kind == "route" and " > " in r.name else r.name
        grouped.setdefault((path, line, f"Envoy would reject {r.kind} {what!r}: {r.message}"), []).append(r.proxy)
    return [Problem(path, line, f"{msg} (on {', '.join(sorted(proxies)[:2])}{', ...' if len(proxies) > 2 else ''})")
            for (path, line, msg), proxies in sorted(grouped.items())]


def _culprit(r: Rejection, resources: Sequence[Any]) -> tuple[Any, tuple[str | int, ...]]:
    def find(kind: str, ns: str, svc: str) -> Any:
        return next((x for x in resources if x.key[0] == kind and x.metadata.namespace == ns
                     and getattr(x.spec, "service", x.metadata.name) == svc), None)

    if r.kind == "cluster" and r.name.startswith("outbound|"):
        svc, _, ns = r.name.split("|")[1].partition(".")
        hit = find("TrafficPolicy", ns, svc)
        return (hit, ("spec",)) if hit is not None else (find("Service", ns, svc), ("spec",))
    if r.kind == "cluster" and r.name.startswith("outbound_ext|"):  # mesh.render.egress.cluster_name
        host = r.name.split("|", 2)[2]
        hit = next((x for x in resources if x.key[0] == "ExternalService" and host in x.spec.hosts), None)
        return hit, ("spec",) if hit is not None else ()
    if r.kind == "route":
        _, vhost, entry = [*r.name.split(" > "), "", ""][:3]
        svc, _, ns = vhost.partition(".")
        route = find("Route", ns, svc)
        if route is None:
            return find("Service", ns, svc), ()
        for i, rule in enumerate(route.spec.http):
            name = rule.name or f"rule-{i}"
            if entry == name or entry.rsplit("-", 1)[0] == name:
                return route, ("spec", "http", i)
        return route, ("spec", "http")
    return None, ()
