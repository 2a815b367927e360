"""The Grafana dashboard and the Prometheus recording rules of a lockgate mesh (`lockgate grafana`).

Pure: each function returns the JSON/YAML-ready dict. Every query reads the same series the rollout
analysis reads (`rollouts.analysis`): Envoy's own stats of each sidecar's *inbound* listener, which count
what each version actually served, labelled by lockgate's service discovery with cluster, namespace,
service and version. The dashboard's queries are written out in full rather than on top of the recording
rules, so it works against any Prometheus that scrapes the mesh, lockgate's own included (which loads no
rules); the rules are for a long-lived Prometheus where cheap, long-range panels matter.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from reconciler.observe.exporter import WEIGHT_METRIC

SCHEMA_VERSION = 39
"""Grafana 10.4 / 11's dashboard schema; older Grafanas migrate down poorly, newer ones migrate up."""
UID = "lockgate-mesh"
_INBOUND = 'envoy_http_conn_manager_prefix="inbound",kind="sidecar"'
"""What a sidecar served on its inbound listener: the rollout analysis's selector, without the canary."""
_FILTER = 'cluster=~"$cluster",namespace=~"$namespace",service=~"$service"'
_DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RULE_LABELS = "cluster, namespace, service, version"
"""What every recording rule keeps: one series per version of a service in a cluster."""
WINDOW = "1m"


def _requests(sel: str, window: str) -> str:
    return f"rate(envoy_http_downstream_rq_total{{{sel}}}[{window}])"


def _errors(sel: str, window: str) -> str:
    return f'rate(envoy_http_downstream_rq_xx{{{sel},envoy_response_code_class="5"}}[{window}])'


def request_rate(*, by: str, sel: str, window: str) -> str:
    """Requests per second served."""
    return f"sum by ({by}) ({_requests(sel, window)})"


def success_ratio(*, by: str, sel: str, window: str) -> str:
    """1 - 5xx / all, as `request-success-rate` computes it (0-1 here, a percent there). A version that
    answered no 5xx has no 5xx series at all: `or ... * 0` makes that a ratio of 1, not a gap."""
    requests = f"sum by ({by}) ({_requests(sel, window)})"
    return f"1 - ((sum by ({by}) ({_errors(sel, window)}) or {requests} * 0) / {requests})"


def latency_p99(*, by: str, sel: str, window: str) -> str:
    """p99 of the time each request took on the inbound side, in milliseconds (Envoy's rq_time unit)."""
    return (f"histogram_quantile(0.99, sum by ({by}, le) "
            f"(rate(envoy_http_downstream_rq_time_bucket{{{sel}}}[{window}])))")


def recording_rules() -> dict[str, Any]:
    """Prometheus rule file (`groups:`): the three series per version of a service, over one minute."""
    by, sel = RULE_LABELS, _INBOUND
    return {"groups": [{"name": "lockgate", "rules": [
        {"record": "lockgate:requests:rate1m", "expr": request_rate(by=by, sel=sel, window=WINDOW)},
        {"record": "lockgate:errors:rate1m",
         "expr": f"sum by ({by}) ({_errors(sel, WINDOW)})"},
        {"record": "lockgate:success:ratio_rate1m",
         "expr": "1 - ((lockgate:errors:rate1m or lockgate:requests:rate1m * 0) / lockgate:requests:rate1m)"},
        {"record": "lockgate:latency_p99:1m", "expr": latency_p99(by=by, sel=sel, window=WINDOW)},
        {"record": "lockgate:rollout_canary_weight:max",
         "expr": f"max by (cluster, namespace, rollout, service, canary) ({WEIGHT_METRIC})"},
    ]}]}


def _target(expr: str, legend: str, ref: str) -> dict[str, Any]:
    return {"refId": ref, "datasource": _DATASOURCE, "expr": expr, "legendFormat": legend, "range": True}


def _timeseries(*, pid: int, title: str, description: str, targets: list[dict[str, Any]], unit: str,
                grid: tuple[int, int, int, int], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    x, y, w, h = grid
    defaults: dict[str, Any] = {"unit": unit, "custom": {"lineWidth": 1, "fillOpacity": 10, "showPoints": "never"}}
    defaults |= extra or {}
    return {"id": pid, "type": "timeseries", "title": title, "description": description, "datasource": _DATASOURCE,
            "gridPos": {"x": x, "y": y, "w": w, "h": h}, "targets": targets,
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]},
                        "tooltip": {"mode": "multi", "sort": "desc"}}}


def _traffic_panels(*, first_id: int, y: int, by: str, legend: str, where: str) -> list[dict[str, Any]]:
    """Request rate, success rate and p99 by version, side by side."""
    sel, window = f"{_INBOUND},{_FILTER}", "$__rate_interval"
    return [
        _timeseries(pid=first_id, title=f"Request rate by service and version{where}",
                    description="Requests per second each version served (its sidecars' inbound listener).",
                    targets=[_target(request_rate(by=by, sel=sel, window=window), legend, "A")],
                    unit="reqps", grid=(0, y, 8, 8)),
        _timeseries(pid=first_id + 1, title=f"Success rate by service and version{where}",
                    description="1 - 5xx / requests, as the rollout analysis's request-success-rate.",
                    targets=[_target(success_ratio(by=by, sel=sel, window=window), legend, "A")],
                    unit="percentunit", grid=(8, y, 8, 8), extra={"min": 0, "max": 1}),
        _timeseries(pid=first_id + 2, title=f"p99 latency by service and version{where}",
                    description="99th percentile of the inbound request time, as request-duration-p99.",
                    targets=[_target(latency_p99(by=by, sel=sel, window=window), legend, "A")],
                    unit="ms", grid=(16, y, 8, 8)),
    ]


def _variable(name: str, label: str, selector: str) -> dict[str, Any]:
    query = f"label_values({selector}, {name})"
    return {"type": "query", "name": name, "label": label, "datasource": _DATASOURCE,
            "query": {"query": query, "refId": f"{name}-values", "qryType": 1}, "definition": query,
            "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*",
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "options": [], "sort": 1,
            "hide": 0, "regex": ""}


def dashboard() -> dict[str, Any]:
    """The dashboard: traffic by service and version, each rollout's canary weight over time, and one row
    per cluster (repeated over the `cluster` variable)."""
    overall = "namespace, service, version"
    legend = "{{namespace}}/{{service}} {{version}}"
    panels = _traffic_panels(first_id=1, y=0, by=overall, legend=legend, where="")
    weight = f'max by (namespace, rollout, service, canary) ({WEIGHT_METRIC}{{{_FILTER}}})'
    panels.append(_timeseries(
        pid=4, title="Rollout canary weight", unit="percent", grid=(0, 8, 24, 7),
        description="The share of the default rule's traffic each rollout's canary gets, as lockgate decided "
                    "it (lockgate_rollout_canary_weight; 0 between runs).",
        targets=[_target(weight, "{{namespace}}/{{rollout}} -> {{canary}}", "A")],
        extra={"min": 0, "max": 100, "custom": {"lineWidth": 2, "fillOpacity": 20, "showPoints": "never",
                                                "lineInterpolation": "stepAfter"}}))
    panels.append({"id": 5, "type": "row", "title": "Cluster $cluster", "repeat": "cluster", "collapsed": False,
                   "gridPos": {"x": 0, "y": 15, "w": 24, "h": 1}, "panels": []})
    panels += _traffic_panels(first_id=6, y=16, by=f"cluster, {overall}", legend=legend, where=" in $cluster")
    inbound = f"envoy_http_downstream_rq_total{{{_INBOUND}}}"
    return {
        "uid": UID, "title": "lockgate mesh", "tags": ["lockgate", "envoy"], "schemaVersion": SCHEMA_VERSION,
        "version": 1, "editable": True, "graphTooltip": 1, "timezone": "browser", "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"}, "fiscalYearStartMonth": 0, "liveNow": False, "links": [],
        "annotations": {"list": [{"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                                  "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                                  "name": "Annotations & Alerts", "type": "dashboard"}]},
        "templating": {"list": [
            {"type": "datasource", "name": "datasource", "label": "Prometheus", "query": "prometheus",
             "current": {}, "hide": 0, "refresh": 1, "regex": "", "options": [], "includeAll": False,
             "multi": False},
            _variable("cluster", "Cluster", inbound),
            _variable("namespace", "Namespace", f'envoy_http_downstream_rq_total{{{_INBOUND},cluster=~"$cluster"}}'),
            _variable("service", "Service", f'envoy_http_downstream_rq_total{{{_INBOUND},cluster=~"$cluster",'
                                            'namespace=~"$namespace"}'),
        ]},
        "panels": panels,
    }


def expressions(board: dict[str, Any] | None = None, rules: dict[str, Any] | None = None) -> Iterator[tuple[str, str]]:
    """(where, PromQL) of every query the dashboard and the rules hold, Grafana variables left in; for a
    variable, the series selector inside its `label_values(...)`. What the tests run through Prometheus."""
    board = dashboard() if board is None else board
    rules = recording_rules() if rules is None else rules
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"]
            yield f"variable {var['name']}", query[len("label_values("):query.rindex(",")]
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            yield f"panel {panel['id']} {panel['title']!r}", target["expr"]
    for group in rules["groups"]:
        for rule in group["rules"]:
            yield f"rule {rule['record']}", rule["expr"]
