"""`lockgate grafana` against the real thing: promtool (Debian's prometheus package ships it) parses the
recording rules and every dashboard query, and a real Prometheus scraping real Envoys (found through
lockgate's discovery, which also lists lockgate's own canary-weight gauge) answers each query; the
request-rate panel returns one series per service and version."""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from mesh.probe import wait_http
from reconciler.cli.main import main
from reconciler.observe import WEIGHT_METRIC, dashboard, expressions, read_exposition
from reconciler.observe.grafana import request_rate
from reconciler.runtime.local.prometheus import DiscoveryServer, LocalPrometheus
from reconciler.state import write_json
from tests.fixtures import waiting

if TYPE_CHECKING:
    from conftest import ControlPlane

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("prometheus") is None, reason="Debian package prometheus missing")]

LOOPBACK = "127.0.0.1"
_VAR = re.compile(r"\$\{?(\w+)\}?")
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy


def fill(expr: str, *, cluster: str = ".*") -> str:
    """What Grafana sends for "All": every template variable a regex matching anything, `$__rate_interval`
    a window of several scrapes."""
    values = {"__rate_interval": "1m", "cluster": cluster}
    return _VAR.sub(lambda m: values.get(m.group(1), ".*"), expr)


def promtool(rules: Path) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    assert tool is not None
    return subprocess.run([tool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) missing")
def test_promtool_accepts_the_rules_and_every_dashboard_query(tmp_path: Path) -> None:
    assert main(["grafana", "--out", str(tmp_path)]) == 0
    checked = promtool(tmp_path / "lockgate-rules.yaml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 5 rules found" in checked.stdout

    queries = [fill(expr) for where, expr in expressions() if where.startswith(("panel", "variable"))]
    as_rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{i}", "expr": q} for i, q in enumerate(queries)]}]}
    (tmp_path / "queries.yaml").write_text(yaml.safe_dump(as_rules))
    checked = promtool(tmp_path / "queries.yaml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(queries)} rules found" in checked.stdout

    broken = {"groups": [{"name": "x", "rules": [{"record": "x:y", "expr": queries[0][:-1]}]}]}
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(broken))
    assert promtool(tmp_path / "broken.yaml").returncode != 0  # the check can fail


def query(prom_url: str, expr: str) -> dict[str, Any]:
    url = f"{prom_url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    try:
        with _OPENER.open(url, timeout=5) as resp:
            answer: dict[str, Any] = json.loads(resp.read())
    except urllib.error.HTTPError as exc:  # 400 with a JSON error body: a query Prometheus refuses
        answer = json.loads(exc.read())
    return answer


wait_for = functools.partial(waiting.wait_for, timeout=40.0, interval=0.25)


def test_every_query_answers_from_a_prometheus_scraping_real_envoys(
    control_plane: ControlPlane, envoy: Any, backend: Any, tmp_path: Path
) -> None:
    from conftest import free_port
    from test_prometheus import inbound, send

    listens: dict[str, int] = {}
    targets = []
    for version in ("v1", "v2"):
        node = f"east~sidecar~shop~reviews-{version}-0"
        listens[version] = free_port()
        control_plane.set(node, inbound(listens[version], backend(version)))
        proc = envoy(node_id=node, xds_port=control_plane.port)
        targets.append({"targets": [f"{LOOPBACK}:{proc.stats_port}"], "labels": {
            "__metrics_path__": "/stats/prometheus", "cluster": "east", "node": node, "kind": "sidecar",
            "service": "reviews", "version": version, "namespace": "shop"}})
    state = tmp_path / "state"
    write_json(state / "rollouts" / "shop.reviews.json",
               {"namespace": "shop", "name": "reviews", "service": "reviews",
                "state": {"phase": "progressing", "stable": "v1", "canary": "v2", "weight": 30}})
    sd = DiscoveryServer(address=LOOPBACK, targets=lambda: targets, exporter=lambda: read_exposition(state),
                         exporter_labels={"cluster": "east", "kind": "lockgate"})
    control_plane.run(sd.start())
    prom = LocalPrometheus(cluster="east", address=LOOPBACK, port=free_port(), sd_url=sd.url, state_dir=tmp_path)
    control_plane.run(prom.start())
    try:
        control_plane.run(wait_http(f"{prom.url}/-/ready", timeout=30), timeout=40)
        for listen in listens.values():
            control_plane.run(wait_http(f"http://{LOOPBACK}:{listen}/", timeout=30, attempt_timeout=5), timeout=40)

        def versions_with_traffic() -> set[str]:
            send(listens["v1"], 20)
            send(listens["v2"], 10)
            rate = fill(next(e for w, e in expressions() if w.startswith("panel 1 ")))
            answer = query(prom.url, rate)
            return {s["metric"].get("version", "") for s in answer["data"]["result"] if float(s["value"][1]) > 0}

        wait_for("both versions' request rate", lambda: versions_with_traffic() == {"v1", "v2"})

        failures = []
        answered = {}
        for where, expr in expressions():
            answer = query(prom.url, fill(expr))
            if answer.get("status") != "success":
                failures.append((where, fill(expr), answer))
            answered[where] = answer
        assert failures == []
        assert query(prom.url, "sum(rate(")["status"] == "error"  # a query Prometheus refuses is seen as one

        series = answered["panel 1 'Request rate by service and version'"]["data"]["result"]
        assert {(s["metric"]["namespace"], s["metric"]["service"], s["metric"]["version"]) for s in series} == {
            ("shop", "reviews", "v1"), ("shop", "reviews", "v2")}
        per_cluster = query(prom.url, fill(next(e for w, e in expressions() if w.startswith("panel 6 ")),
                                           cluster="east"))["data"]["result"]
        assert {(s["metric"]["cluster"], s["metric"]["version"]) for s in per_cluster} == {
            ("east", "v1"), ("east", "v2")}
        success = answered["panel 2 'Success rate by service and version'"]["data"]["result"]
        assert {s["metric"]["version"]: float(s["value"][1]) for s in success} == {"v1": 1.0, "v2": 1.0}
        assert query(prom.url, fill(request_rate(by="version", sel='service="nope"', window="1m")))["data"][
            "result"] == []

        weight = wait_for("the canary weight scraped", lambda: query(
            prom.url, fill(dashboard()["panels"][3]["targets"][0]["expr"]))["data"]["result"])
        assert [(s["metric"], s["value"][1]) for s in weight] == [
            ({"namespace": "shop", "rollout": "reviews", "service": "reviews", "canary": "v2"}, "30")]
        raw = query(prom.url, WEIGHT_METRIC)["data"]["result"]
        assert raw[0]["metric"]["cluster"] == "east" and "exported_cluster" not in raw[0]["metric"]
    finally:
        control_plane.run(prom.stop())
        control_plane.run(sd.stop())
