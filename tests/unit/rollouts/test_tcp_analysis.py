"""A TCP canary's analysis: the built-in success rate counts connections to the app (failed: refused, or
closed by the app first) instead of HTTP requests, picked by the service's protocol; request-duration-p99
has no TCP series and is refused at validation with file:line (and never answered with HTTP numbers)."""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from mesh.intent import PROTOCOLS, Protocol
from reconciler.load import load
from rollouts.advance import CompareData, RolloutState, advance
from rollouts.analysis import (
    BUILTIN_QUERIES,
    CONNECTION_ERRORS_QUERY,
    CONNECTIONS_QUERY,
    ERRORS_QUERY,
    HTTP_QUERIES,
    REQUESTS_QUERY,
    TCP_QUERIES,
    TCP_WINDOW_SELECTOR,
    WINDOW_SELECTOR,
    observe,
    queries_for,
    render_query,
)
from rollouts.intent import BUILTINS, RolloutSpec
from rollouts.provider import NoValuesFound, Samples
from rollouts.validate import CONNECTIONS_ONLY

T = 10_000.0
VARS = {"service": "echo", "version": "v2", "namespace": "shop", "cluster": "east", "interval": "10000ms"}
_INCREASE = re.compile(r"sum\(increase\((\w+)\{([^}]*)\}\[(\w+)\]\)\)")
_OPS: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _arithmetic(node: ast.AST) -> float:
    """+ - * / on numbers only: what is left of a query once every counter is replaced by its value."""
    if isinstance(node, ast.Expression):
        return _arithmetic(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        return float(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_arithmetic(node.left), _arithmetic(node.right))
    raise AssertionError(f"not plain arithmetic: {ast.dump(node)}")


class CounterProm:
    """A Prometheus that knows each version's counter increases over the window, on the sidecars' `inbound|app`
    cluster only: it evaluates the sums of increases a query is made of (so the query's own arithmetic is
    what is tested) and records every query and selector it was asked."""

    def __init__(self, increases: Mapping[str, Mapping[str, float]]) -> None:
        self.increases = increases
        """version -> counter name -> increase over the window."""
        self.asked: list[str] = []

    def _value(self, promql: str) -> float:
        self.asked.append(promql)

        def counter(m: re.Match[str]) -> str:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
            assert labels.pop("envoy_cluster_name") == "inbound|app", promql
            version = labels.pop("version")
            assert labels == {"kind": "sidecar", "service": "echo", "namespace": "shop", "cluster": "east"}, promql
            if m.group(1) not in self.increases.get(version, {}):
                raise NoValuesFound(f"no {m.group(1)} for {version}")
            return repr(self.increases[version][m.group(1)])

        value = _arithmetic(ast.parse(_INCREASE.sub(counter, promql), mode="eval"))
        return value

    def query(self, promql: str) -> float:
        return self._value(promql)

    def query_range(self, promql: str, *, start: float, end: float, step: float) -> list[float]:
        return [self._value(promql)]

    def samples(self, selector: str, *, seconds: float) -> Samples:
        self.asked.append(selector)
        return Samples(at=T, seconds=seconds, series={"sidecar": tuple(T - 40 + i for i in range(41))})

    def is_online(self) -> bool:
        return True


def counters(*, total: float, destroy_local: float = 0, connect_fail: float = 0,
             connect_timeout: float = 0, destroy_remote: float = 0) -> dict[str, float]:
    return {"envoy_cluster_upstream_cx_total": total, "envoy_cluster_upstream_cx_destroy_local": destroy_local,
            "envoy_cluster_upstream_cx_destroy_remote": destroy_remote,
            "envoy_cluster_upstream_cx_connect_fail": connect_fail,
            "envoy_cluster_upstream_cx_connect_timeout": connect_timeout}


def spec(*metrics: dict[str, object], min_requests: int = 50) -> RolloutSpec:
    return RolloutSpec.model_validate({
        "service": "echo", "stable": "v1", "canary": "v2", "steps": [10, 50, 100], "interval": "10s",
        "analysis": {"failureThreshold": 1, "minRequests": min_requests, "noData": "hold",
                     "metrics": list(metrics) or [{"name": "ok", "builtin": "request-success-rate", "min": 90}]}})


def running() -> RolloutState:
    return RolloutState(phase="progressing", stable="v1", canary="v2", observed_canary="v2", step=0, weight=10,
                        started_at=T - 60, next_analysis_at=T)


# --- the query builder ---------------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_the_protocol_picks_what_the_builtins_count(protocol: Protocol) -> None:
    queries = queries_for(protocol)
    if protocol in ("TCP", "TLS"):  # carried as opaque connections: tcp_proxy, no HTTP connection manager
        assert queries is TCP_QUERIES
        assert set(queries.builtins) == {"request-success-rate"} and queries.compare == {}
    else:
        assert queries is HTTP_QUERIES
        assert (queries.requests, queries.errors, queries.window) == (REQUESTS_QUERY, ERRORS_QUERY, WINDOW_SELECTOR)
        assert set(queries.builtins) == set(BUILTINS)


def test_tcp_queries_read_the_canarys_inbound_app_cluster_and_no_http_series() -> None:
    for template in (*TCP_QUERIES.builtins.values(), TCP_QUERIES.requests, TCP_QUERIES.errors, TCP_QUERIES.window):
        promql = render_query(template, VARS)
        assert "envoy_http_" not in promql and "{{" not in promql
        selectors = re.findall(r"\{([^}]*)\}", promql)
        assert selectors and all(s.startswith('envoy_cluster_name="inbound|app",kind="sidecar",service="echo",'
                                              'version="v2",namespace="shop",cluster="east"') for s in selectors)
    assert render_query(TCP_WINDOW_SELECTOR, VARS).startswith("envoy_cluster_upstream_cx_total{")
    for template in (*HTTP_QUERIES.builtins.values(), HTTP_QUERIES.requests, HTTP_QUERIES.window):
        assert "upstream_cx" not in template  # HTTP is still judged on requests


@pytest.mark.parametrize(("increases", "rate"), [
    (counters(total=200, destroy_remote=200), 100.0),  # every client closed first: all well
    (counters(total=200, destroy_local=100, destroy_remote=100), 50.0),  # the app closed half of them first
    (counters(total=40, connect_fail=40, destroy_remote=40), 0.0),  # refused: a connect failure, counted once
    (counters(total=40, connect_fail=40, connect_timeout=40, destroy_local=40), 0.0),  # timed out: also once
    (counters(total=200, destroy_local=90, connect_fail=10, connect_timeout=4, destroy_remote=100), 52.0),
])
def test_the_tcp_success_rate_counts_each_failed_connection_once(increases: dict[str, float], rate: float) -> None:
    prom = CounterProm({"v2": increases})
    promql = render_query(TCP_QUERIES.builtins["request-success-rate"], VARS)
    assert prom.query(promql) == pytest.approx(rate)
    assert prom.query(render_query(CONNECTION_ERRORS_QUERY, VARS)) == pytest.approx(
        increases["envoy_cluster_upstream_cx_total"] * (1 - rate / 100))
    assert prom.query(render_query(CONNECTIONS_QUERY, VARS)) == increases["envoy_cluster_upstream_cx_total"]


# --- observe and advance on a TCP canary ------------------------------------------------------------------

def test_observe_a_tcp_canary_judges_its_connections() -> None:
    prom = CounterProm({"v2": counters(total=200, destroy_local=100, destroy_remote=100)})
    o = observe(spec=spec(), namespace="shop", canary="v2", providers={"east": prom}, protocol="TCP",
                now=lambda: T)
    assert o.online and o.errors == {} and o.partial == {}
    assert o.requests == {"east": 200.0} and o.values["ok"]["east"] == pytest.approx(50.0)
    assert prom.asked[0] == render_query(TCP_WINDOW_SELECTOR, VARS)  # the window of the TCP series
    assert not any("envoy_http_" in q for q in prom.asked)
    d = advance(spec(), running(), o, now=T)
    assert d.action == "rollback" and "50" in d.reasons[0], d.reasons

    healthy = CounterProm({"v2": counters(total=200, destroy_remote=200)})
    o = observe(spec=spec(), namespace="shop", canary="v2", providers={"east": healthy}, protocol="TCP",
                now=lambda: T)
    assert o.values["ok"]["east"] == 100.0
    assert advance(spec(), running(), o, now=T).action == "step"


def test_min_requests_counts_connections() -> None:
    prom = CounterProm({"v2": counters(total=30, destroy_remote=30)})
    o = observe(spec=spec(), namespace="shop", canary="v2", providers={"east": prom}, protocol="TCP", now=lambda: T)
    assert o.requests == {"east": 30.0}
    d = advance(spec(), running(), o, now=T)
    assert d.action == "hold" and all(c.result == "no-data" for c in d.checks), d.reasons


def test_the_http_queries_see_nothing_of_a_tcp_canary() -> None:
    """What a TCP canary's analysis was before: the HTTP series do not exist on its sidecars."""
    prom = CounterProm({"v2": counters(total=200, destroy_local=100)})

    class HttpLess(CounterProm):
        def query(self, promql: str) -> float:
            if "envoy_http_" in promql:
                raise NoValuesFound("no such series")
            return super().query(promql)

    http = HttpLess(prom.increases)
    o = observe(spec=spec(), namespace="shop", canary="v2", providers={"east": http}, now=lambda: T)
    assert o.requests == {"east": None} and o.values["ok"]["east"] is None


def test_compare_counts_canary_and_stable_connections_alike() -> None:
    prom = CounterProm({"v2": counters(total=200, destroy_local=100, destroy_remote=100),
                        "v1": counters(total=400, destroy_local=2, connect_fail=2, destroy_remote=396)})
    s = spec({"name": "errors", "builtin": "request-success-rate",
              "compare": {"baseline": "stable", "maxIncrease": "20%"}})
    o = observe(spec=s, namespace="shop", canary="v2", stable="v1", providers={"east": prom}, protocol="TCP",
                now=lambda: T)
    assert o.errors == {}
    assert o.compared["errors"]["east"] == CompareData(counts=(100.0, 200.0, 4.0, 400.0))
    d = advance(s, running(), o, now=T)
    assert d.action == "rollback" and d.checks[-1].comparison is not None, d.reasons


def test_a_duration_builtin_on_tcp_is_an_error_never_http_numbers() -> None:
    """Validation refuses it; if a spec gets here anyway, the metric is an error and no data (so it holds)."""
    prom = CounterProm({"v2": counters(total=200, destroy_remote=200)})
    s = spec({"name": "ok", "builtin": "request-success-rate", "min": 90},
             {"name": "p99", "builtin": "request-duration-p99", "max": 100},
             {"name": "p99-vs", "builtin": "request-duration-p99",
              "compare": {"baseline": "stable", "maxIncrease": "20%"}})
    o = observe(spec=s, namespace="shop", canary="v2", stable="v1", providers={"east": prom}, protocol="TCP",
                now=lambda: T)
    assert o.errors == {"p99": "built-in request-duration-p99 has no series for a TCP service",
                        "p99-vs": "built-in request-duration-p99 has no series for a TCP service"}
    assert o.values["p99"] == {"east": None} and o.compared["p99-vs"] == {}
    assert o.values["ok"]["east"] == 100.0
    assert not any("rq_time" in q for q in prom.asked)
    d = advance(s, running(), o, now=T)
    assert d.action == "hold" and "p99: built-in request-duration-p99 has no series" in " ".join(d.reasons)


# --- validation ------------------------------------------------------------------------------------------

MESH = """\
apiVersion: lockgate.io/v1alpha1
kind: Mesh
metadata: {name: mesh}
spec: {trustDomain: example.org, clusters: [{name: east}]}
---
apiVersion: lockgate.io/v1alpha1
kind: Service
metadata: {name: echo, namespace: shop}
spec: {ports: [{name: PORT, port: 9000}], versions: [v1, v2]}
"""
ROLLOUT = """\
apiVersion: lockgate.io/v1alpha1
kind: Rollout
metadata: {name: echo, namespace: shop}
spec:
  service: echo
  stable: v1
  canary: v2
  analysis:
    metrics:
      - name: ok
        builtin: request-success-rate
        min: 99
      - name: latency
        builtin: request-duration-p99
        max: 50
"""


def problems(port: str, rollout: str = ROLLOUT) -> list[str]:
    return [str(p) for p in load({"mesh.yaml": MESH.replace("PORT", port).encode(),
                                  "rollout.yaml": rollout.encode()}).problems]


def test_request_duration_on_a_tcp_service_is_refused_with_file_and_line() -> None:
    assert problems("tcp-echo") == [
        "rollout.yaml:14: spec.analysis.metrics[1].builtin: builtin 'request-duration-p99' has no series for TCP "
        "service 'echo': its sidecars time no requests (tcp_proxy), and a connection's length is how long its "
        "client kept it open, not how fast the app answered; judge it on request-success-rate (its connection "
        "failures) or a query of your own"]


def test_a_compared_request_duration_on_a_tcp_service_is_refused_too() -> None:
    compared = ROLLOUT.replace("        max: 50\n", "        compare: {baseline: stable, maxIncrease: 20%}\n")
    assert [p.split(": ", 2)[:2] for p in problems("tcp-echo", compared)] == [
        ["rollout.yaml:14", "spec.analysis.metrics[1].builtin"]]


def test_the_same_rollout_on_an_http_service_loads_and_tcp_without_duration_loads() -> None:
    assert problems("http") == [] and problems("grpc") == []
    only_success = ROLLOUT.split("      - name: latency")[0]
    assert problems("tcp-echo", only_success) == []


def test_validation_refuses_exactly_the_builtins_the_tcp_queries_lack() -> None:
    assert {b for b in BUILTINS if b not in TCP_QUERIES.builtins} == set(CONNECTIONS_ONLY)
    assert set(BUILTIN_QUERIES) == set(BUILTINS)


def test_the_controller_judges_a_tcp_service_by_its_connections(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The rollout controller reads the service's protocol from the intent and hands it to observe(): a TCP
    canary is queried with the connection series (before, every canary was asked HTTP questions)."""
    import asyncio

    import reconciler.rollout.controller as controller
    from reconciler.rollout.controller import RolloutController
    from reconciler.source.git import Pygit2Source, init_repo
    from rollouts.advance import Observations
    from tests.fixtures.intents import TEMPLATE, rollout_yaml
    from tests.fixtures.runtime import FakeRuntime

    mesh = """\
apiVersion: lockgate.io/v1alpha1
kind: Mesh
metadata: {name: mesh}
spec: {trustDomain: example.org, clusters: [{name: east}]}
---
apiVersion: lockgate.io/v1alpha1
kind: Service
metadata: {name: echo, namespace: shop}
spec: {ports: [{name: tcp-echo, port: 9000}], versions: [v1, v2]}
---
"""
    loaded = load({"mesh.yaml": (mesh + rollout_yaml(name="echo", service="echo", interval="500ms",
                                                     writeBack="off")).encode()})
    assert loaded.ok and loaded.intent is not None, [str(p) for p in loaded.problems]
    repo = tmp_path / "repo"
    init_repo(repo, template=TEMPLATE)
    source = Pygit2Source.open(str(repo))
    seen: list[str] = []

    def observe(**kw: Any) -> Observations:
        seen.append(kw["protocol"])
        return Observations()

    monkeypatch.setattr(controller, "observe", observe)

    async def main() -> None:
        ctl = RolloutController(state_dir=tmp_path / "state", source=source, runtime=FakeRuntime(),
                                on_change=lambda: None)
        ctl.on_revision(loaded.intent, source.head() or "")
        for _ in range(100):  # the first analysis is due an interval after the start
            await ctl.tick()
            if seen:
                return
            await asyncio.sleep(0.05)

    asyncio.run(main())
    assert seen and set(seen) == {"TCP"}
