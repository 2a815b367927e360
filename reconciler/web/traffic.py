"""Traffic per edge of the mesh, from each cluster's Prometheus, for the web view's Mesh page.

An edge is a caller (the ingress, or a service version's sidecars) to a destination service version, as
the caller's Envoy counts its upstream requests. Envoy's default tag extraction cuts a cluster name at
its first dot, so `outbound|reviews.shop|v1` reaches Prometheus as `envoy_cluster_name="outbound|reviews"`
with the rest (`shop|v1`, sanitised to `shop_v1`) inside the metric's name: `destination` puts the two
halves back together. Pure but for `traffic`, which asks Prometheus (aiohttp, bounded by the session's
timeout) and never raises: an unreachable Prometheus is an `error` on its cluster.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from aiohttp import ClientError, ClientSession

WINDOW = "1m"
NAMES_MATCH = '{__name__=~"envoy_cluster_.*upstream_rq_(total|5xx)",envoy_cluster_name=~"outbound[|].+"}'
"""The series whose names (one per namespace and version, see above) are asked for first."""
MAX_NAMES = 200


def edge_query(name: str) -> str:
    """Requests per second of one of those names, per caller and destination (rate() drops the name, so one
    query per name)."""
    return (f'sum by (kind, service, version, envoy_cluster_name) '
            f'(rate({name}{{envoy_cluster_name=~"outbound[|].+"}}[{WINDOW}]))')


_NAME = re.compile(r"^envoy_cluster_(?:(?P<rest>.+)_)?upstream_rq_(?:total|5xx)$")


def destination(metric: dict[str, str]) -> tuple[str, str | None] | None:
    """(`service.namespace`, version or None) of an upstream-requests series; None if it is not one of ours."""
    cluster = metric.get("envoy_cluster_name", "")
    found = _NAME.match(metric.get("__name__", ""))
    if not cluster.startswith("outbound|") or found is None:
        return None
    head = cluster.removeprefix("outbound|")
    rest = found.group("rest")
    if "." in head or "|" in head:  # whole (a tag extractor that kept the name): outbound|svc.ns[|version]
        name, _, version = head.partition("|")
        return name, version or None
    if rest is None:
        return None
    namespace, _, version = rest.partition("_")  # namespace_version; names never hold an underscore
    return f"{head}.{namespace}", version or None


def edges(totals: list[dict[str, Any]], errors: list[dict[str, Any]], *, cluster: str) -> list[dict[str, Any]]:
    """Prometheus vector results -> edges, each `{cluster, from, to, version, rps, errorRps}`, busiest first."""
    out: dict[tuple[str, str, str | None], dict[str, Any]] = {}

    def key(metric: dict[str, str]) -> tuple[str, str, str | None] | None:
        dest = destination(metric)
        if dest is None:
            return None
        kind = metric.get("kind", "sidecar")
        source = kind if kind != "sidecar" else f"{metric.get('service', '?')} {metric.get('version', '')}".strip()
        return source, dest[0], dest[1]

    for series, field in ((totals, "rps"), (errors, "errorRps")):
        for item in series:
            k = key(item.get("metric", {}))
            if k is None:
                continue
            try:
                value = float(item["value"][1])
            except (KeyError, IndexError, TypeError, ValueError):
                continue
            edge = out.setdefault(k, {"cluster": cluster, "from": k[0], "to": k[1], "version": k[2],
                                      "rps": 0.0, "errorRps": 0.0})
            edge[field] += value
    busy = (e | {"rps": round(e["rps"], 3), "errorRps": round(e["errorRps"], 3)} for e in out.values()
            if e["rps"] > 0 or e["errorRps"] > 0)  # every sidecar has a cluster per destination: most are idle
    return sorted(busy, key=lambda e: (-e["rps"], e["from"], e["to"], e["version"] or ""))


async def _get(session: ClientSession, url: str, params: dict[str, str]) -> Any:
    async with session.get(url, params=params) as resp:
        body = await resp.json(content_type=None)
    if not isinstance(body, dict) or body.get("status") != "success":
        raise ValueError(f"Prometheus answered {str(body)[:200]}")
    return body.get("data")


async def _series(session: ClientSession, url: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every edge series of one Prometheus, named again: (totals, 5xx)."""
    base = url.rstrip("/")
    names = await _get(session, f"{base}/api/v1/label/__name__/values", {"match[]": NAMES_MATCH})
    names = [n for n in names if isinstance(n, str) and _NAME.match(n)][:MAX_NAMES] if isinstance(names, list) else []

    async def one(name: str) -> list[dict[str, Any]]:
        data = await _get(session, f"{base}/api/v1/query", {"query": edge_query(name)})
        result = data.get("result", []) if isinstance(data, dict) else []
        return [{**r, "metric": {**r.get("metric", {}), "__name__": name}} for r in result if isinstance(r, dict)]

    results = await asyncio.gather(*(one(n) for n in names))
    totals = [r for name, rs in zip(names, results, strict=True) if name.endswith("_total") for r in rs]
    errors = [r for name, rs in zip(names, results, strict=True) if name.endswith("_5xx") for r in rs]
    return totals, errors


async def traffic(session: ClientSession, urls: dict[str, str]) -> dict[str, Any]:
    """`{"window": "1m", "clusters": [{"name", "prometheus", "edges", "error"}]}` for every cluster with a
    Prometheus; the clusters are asked at once."""

    async def one(name: str, url: str) -> dict[str, Any]:
        try:
            totals, errors = await _series(session, url)
        except (ClientError, TimeoutError, ValueError) as exc:
            return {"name": name, "prometheus": url, "edges": [], "error": str(exc) or type(exc).__name__}
        return {"name": name, "prometheus": url, "edges": edges(totals, errors, cluster=name), "error": None}

    clusters = await asyncio.gather(*(one(n, u) for n, u in sorted(urls.items())))
    return {"window": WINDOW, "clusters": list(clusters)}
