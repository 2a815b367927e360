"""`lockgate grafana`: the dashboard's shape (what Grafana needs to import it and what people look for),
the recording rules, the canary-weight gauge, and the command's output. That every query is PromQL a real
Prometheus accepts and answers is tests/integration/test_grafana.py."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from reconciler.cli.main import main
from reconciler.observe import WEIGHT_METRIC, dashboard, exposition, expressions, read_exposition, recording_rules
from reconciler.runtime.local.prometheus import DiscoveryServer
from reconciler.state import write_json
from rollouts.analysis import BUILTIN_QUERIES

_SAMPLE = re.compile(r'^(\w+)\{(.*)\} (\S+)$')


def _variables(board: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in board["templating"]["list"]}


def test_the_dashboard_is_json_grafana_imports_with_a_prometheus_datasource_variable() -> None:
    board = json.loads(json.dumps(dashboard()))  # plain JSON all the way down
    assert board["schemaVersion"] >= 36 and board["uid"] and board["title"]
    variables = _variables(board)
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("cluster", "namespace", "service"):
        var = variables[name]
        assert var["type"] == "query" and var["includeAll"] and var["multi"]
        assert var["query"]["query"].startswith("label_values(envoy_http_downstream_rq_total{")
        assert var["query"]["query"].endswith(f", {name})")
    for panel in board["panels"]:
        assert panel.get("datasource", {"uid": "${datasource}"})["uid"] == "${datasource}"
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}"


def test_panels_cover_traffic_by_version_the_canary_weight_and_a_row_per_cluster() -> None:
    panels = dashboard()["panels"]
    titles = [p["title"] for p in panels]
    for what in ("Request rate", "Success rate", "p99 latency"):
        panel = next(p for p in panels if p["title"] == f"{what} by service and version")
        assert re.search(r"sum by \(namespace, service, version(, le)?\)", panel["targets"][0]["expr"])
        assert f"{what} by service and version in $cluster" in titles
    weight = next(p for p in panels if p["title"] == "Rollout canary weight")
    assert WEIGHT_METRIC in weight["targets"][0]["expr"]
    row = next(p for p in panels if p["type"] == "row")
    assert row["repeat"] == "cluster"
    after = panels[panels.index(row) + 1:]
    assert after and all('cluster=~"$cluster"' in p["targets"][0]["expr"] for p in after)
    assert all("cluster" in p["targets"][0]["expr"].split("sum by (", 1)[1].split(")")[0] for p in after)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()  # no two panels overlap on the 24-column grid
    for p in panels:
        g = p["gridPos"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert g["x"] + g["w"] <= 24 and not mine & cells, p["title"]
        cells |= mine


def test_queries_read_what_the_rollout_analysis_reads() -> None:
    """The same metric names and labels as the built-in metrics, so the panels show what rollouts judge."""
    builtin = " ".join(BUILTIN_QUERIES.values())
    for where, expr in expressions():
        for metric in re.findall(r"\b(envoy_\w+)\{", expr):
            assert metric in builtin, (where, metric)
        if "envoy_" in expr:
            assert 'envoy_http_conn_manager_prefix="inbound"' in expr and 'kind="sidecar"' in expr, where
    assert 'envoy_response_code_class="5"' in BUILTIN_QUERIES["request-success-rate"]
    wheres = [w for w, _ in expressions()]
    assert len(wheres) == len(set(wheres)) >= 3 + 7 + 5


def test_recording_rules_are_a_rule_file_by_namespace_service_version_cluster() -> None:
    rules = yaml.safe_load(yaml.safe_dump(recording_rules()))
    records = {r["record"]: r["expr"] for g in rules["groups"] for r in g["rules"]}
    for name in ("lockgate:requests:rate1m", "lockgate:success:ratio_rate1m", "lockgate:latency_p99:1m"):
        assert name in records
    for name in ("lockgate:requests:rate1m", "lockgate:errors:rate1m", "lockgate:latency_p99:1m"):
        assert "sum by (cluster, namespace, service, version" in records[name]
    # a rule may only use recorded series defined before it in its group
    defined: set[str] = set()
    for r in rules["groups"][0]["rules"]:
        used = set(re.findall(r"lockgate:[\w:]+", r["expr"]))
        assert used <= defined, r["record"]
        defined.add(r["record"])


def test_the_weight_gauge_is_what_the_rollout_state_says() -> None:
    records: list[dict[str, Any]] = [
        {"namespace": "shop", "name": "reviews", "service": "reviews",
         "state": {"phase": "progressing", "stable": "v1", "canary": "v2", "weight": 25}},
        {"namespace": "shop", "name": "done", "service": "ratings",
         "state": {"phase": "promoted", "stable": "v3", "canary": "v3", "weight": 50}},
        {"namespace": 'we"ird\\', "name": "x", "service": None, "state": {"phase": "idle", "stable": "v1"}},
        {"namespace": "shop", "name": "broken", "state": "not a mapping"},
    ]
    text = exposition(records)
    lines = text.splitlines()
    assert lines[0].startswith(f"# HELP {WEIGHT_METRIC} ") and lines[1] == f"# TYPE {WEIGHT_METRIC} gauge"
    samples = [_SAMPLE.match(line) for line in lines[2:]]
    assert all(samples) and len(samples) == 3
    parsed = {m.group(2): float(m.group(3)) for m in samples if m}
    assert parsed['namespace="shop",rollout="reviews",service="reviews",canary="v2"'] == 25
    assert parsed['namespace="shop",rollout="done",service="ratings",canary="v3"'] == 0  # run over: the stable
    assert parsed['namespace="we\\"ird\\\\",rollout="x",service="",canary=""'] == 0
    assert 'cluster="east"}' in exposition(records[:1], cluster="east")
    assert text.endswith("\n")


def test_the_discovery_lists_and_serves_the_exporter(tmp_path: Path) -> None:
    write_json(tmp_path / "rollouts" / "shop.reviews.json",
               {"namespace": "shop", "name": "reviews", "service": "reviews",
                "state": {"phase": "progressing", "stable": "v1", "canary": "v2", "weight": 10}})
    (tmp_path / "rollouts" / "shop.torn.json").write_text("{")  # being replaced: skipped, not an error

    async def scenario() -> tuple[list[Any], str, str]:
        sd = DiscoveryServer(address="127.0.0.1", targets=list, exporter=lambda: read_exposition(tmp_path),
                             exporter_labels={"cluster": "east", "kind": "lockgate"})
        port = await sd.start()
        try:
            async with aiohttp.ClientSession(trust_env=False) as session:
                async with session.get(sd.url) as resp:
                    targets = await resp.json()
                async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
                    return targets, resp.content_type, await resp.text()
        finally:
            await sd.stop()

    targets, ctype, text = asyncio.run(scenario())
    assert targets == [{"targets": [targets[0]["targets"][0]],
                        "labels": {"__metrics_path__": "/metrics", "cluster": "east", "kind": "lockgate"}}]
    assert ctype == "text/plain"
    assert f'{WEIGHT_METRIC}{{namespace="shop",rollout="reviews",service="reviews",canary="v2"}} 10' in text
    assert "torn" not in text


def test_the_command_prints_or_writes_both(tmp_path: Path, capsys: Any) -> None:
    assert main(["grafana"]) == 0
    assert json.loads(capsys.readouterr().out) == dashboard()
    assert main(["grafana", "--rules"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == recording_rules()
    assert main(["grafana", "--out", str(tmp_path / "g")]) == 0
    assert json.loads((tmp_path / "g" / "lockgate-dashboard.json").read_text()) == dashboard()
    assert yaml.safe_load((tmp_path / "g" / "lockgate-rules.yaml").read_text()) == recording_rules()
    (tmp_path / "file").write_text("")
    assert main(["grafana", "--out", str(tmp_path / "file")]) == 1
    assert "lockgate grafana:" in capsys.readouterr().err
