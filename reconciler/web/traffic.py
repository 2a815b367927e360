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
EDGE_QUERY = ('sum by (__name__, kind, service, version, envoy_cluster_name) '
              f'(rate({{__name__=~"envoy_cluster_.*upstream_rq_total",envoy_cluster_name=~"outbound[|].+"}}[{WINDOW}]))')
EDGE_ERRORS_QUERY = ('sum by (__name__, kind, service, version, envoy_cluster_name) '
                     f'(rate({{__name__=~"envoy_cluster_.*upstream_rq_5xx",envoy_cluster_name=~"outbound[|].+"}}'
                     f'[{WINDOW}]))')
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
    return sorted((e | {"rps": round(e["rps"], 3), "errorRps": round(e["errorRps"], 3)} for e in out.values()),
                  key=lambda e: (-e["rps"], e["from"], e["to"], e["version"] or ""))


async def _query(session: ClientSession, url: str, promql: str) -> list[dict[str, Any]]:
    async with session.get(f"{url.rstrip('/')}/api/v1/query", params={"query": promql}) as resp:
        body = await resp.json(content_type=None)
    if not isinstance(body, dict) or body.get("status") != "success":
        raise ValueError(f"Prometheus answered {str(body)[:200]}")
    result = body.get("data", {}).get("result", [])
    return result if isinstance(result, list) else []


async def traffic(session: ClientSession, urls: dict[str, str]) -> dict[str, Any]:
    """`{"window": "1m", "clusters": [{"name", "prometheus", "edges", "error"}]}` for every cluster with a
    Prometheus; the clusters are asked at once."""

    async def one(name: str, url: str) -> dict[str, Any]:
        try:
            totals, errors = await asyncio.gather(_query(session, url, EDGE_QUERY), _query(session, url,
                                                                                          EDGE_ERRORS_QUERY))
        except (ClientError, TimeoutError, ValueError) as exc:
            return {"name": name, "prometheus": url, "edges": [], "error": str(exc) or type(exc).__name__}
        return {"name": name, "prometheus": url, "edges": edges(totals, errors, cluster=name), "error": None}

    clusters = await asyncio.gather(*(one(n, u) for n, u in sorted(urls.items())))
    return {"window": WINDOW, "clusters": list(clusters)}
