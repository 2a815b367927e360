"""`compare` metrics around the statistics: validation with file:line, the queries `observe` makes for the
canary and the stable (same cluster, same instants, scrape step), `advance` on the verdicts, and the
numbers in the reasons and the write-back commit."""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from typing import Any

import pytest

from reconciler.load import load
from rollouts.advance import CompareData, Observations, RolloutState, advance, judge
from rollouts.analysis import COMPARE_QUERIES, ERRORS_QUERY, observe
from rollouts.intent import RolloutSpec
from rollouts.provider import NoValuesFound, ProviderError, Samples
from rollouts.writeback import commit_message
from tests.fixtures.intents import with_rollout

T = 10_000.0
W = 6.0
ROLLOUT = """\
apiVersion: lockgate.io/v1alpha1
kind: Rollout
metadata:
  name: reviews
  namespace: shop
spec:
  service: reviews
  stable: v1
  canary: v2
  interval: 6s
  analysis:
    metrics:
      - name: latency-vs-stable
        builtin: request-duration-p99
        compare: {baseline: stable, maxIncrease: 20%, confidence: 0.98}
"""


def files(rollout: str) -> dict[str, bytes]:
    return with_rollout(rollout)


def test_a_compare_metric_loads() -> None:
    loaded = load(files(ROLLOUT))
    assert loaded.ok, loaded.problems


@pytest.mark.parametrize(("old", "new", "problem"), [
    ("baseline: stable", "baseline: primary",
     "rollout.yaml:15: spec.analysis.metrics[0].compare.baseline: unknown baseline 'primary' (known: stable)"),
    ("maxIncrease: 20%", "maxIncrease: 20",
     "rollout.yaml:15: spec.analysis.metrics[0].compare.maxIncrease: maxIncrease 20 is not a percentage such as "
     "20% (0% or more)"),
    ("maxIncrease: 20%", "maxIncrease: -5%",
     "rollout.yaml:15: spec.analysis.metrics[0].compare.maxIncrease: maxIncrease '-5%' is not a percentage such as "
     "20% (0% or more)"),
    ("maxIncrease: 20%", "maxIncrease: twenty%",
     "rollout.yaml:15: spec.analysis.metrics[0].compare.maxIncrease: maxIncrease 'twenty%' is not a percentage "
     "such as 20% (0% or more)"),
    ("confidence: 0.98", "confidence: 1",
     "rollout.yaml:15: spec.analysis.metrics[0].compare.confidence: confidence 1 is not between 0.5 and 1 "
     "(exclusive), e.g. 0.98"),
    ("confidence: 0.98", "confidence: 0.5",
     "rollout.yaml:15: spec.analysis.metrics[0].compare.confidence: confidence 0.5 is not between 0.5 and 1 "
     "(exclusive), e.g. 0.98"),
    ("confidence: 0.98", "confidence: 0.98, minIncrease: -1",
     "rollout.yaml:15: spec.analysis.metrics[0].compare.minIncrease: minIncrease -1 is not a finite amount of 0 "
     "or more, in the metric's unit (e.g. 2 for 2 ms)"),
    ("confidence: 0.98", "confidence: 0.98, minIncrease: .inf",
     "rollout.yaml:15: spec.analysis.metrics[0].compare.minIncrease: minIncrease inf is not a finite amount of 0 "
     "or more, in the metric's unit (e.g. 2 for 2 ms)"),
    ("builtin: request-duration-p99", "query: 'sum(rate(x[1m]))'",
     "rollout.yaml:14: spec.analysis.metrics[0].query: a compared query must select `{{ version }}`: otherwise "
     "canary and stable read the same series"),
])
def test_compare_errors_point_at_file_and_line(old: str, new: str, problem: str) -> None:
    assert old in ROLLOUT
    assert [str(p) for p in load(files(ROLLOUT.replace(old, new))).problems] == [problem]


def test_a_compared_query_with_version_loads() -> None:
    text = ROLLOUT.replace("builtin: request-duration-p99", "query: 'avg(my_latency{version=\"{{ version }}\"})'")
    assert load(files(text)).ok


# --- judge -----------------------------------------------------------------------------------------

R = random.Random(7)
STABLE = tuple(3.0 + R.gauss(0, 0.2) for _ in range(6))
SAME = tuple(v + 0.01 * (-1) ** i for i, v in enumerate(reversed(STABLE)))  # the stable's, give or take
SLOW = tuple(v + 4.0 for v in SAME)


def spec(**metric: Any) -> RolloutSpec:
    m = {"name": "latency", "builtin": "request-duration-p99",
         "compare": {"baseline": "stable", "maxIncrease": "20%", "confidence": 0.98}, **metric}
    return RolloutSpec.model_validate({
        "service": "reviews", "stable": "v1", "canary": "v2", "steps": [10, 50, 100], "interval": f"{W:g}s",
        "analysis": {"failureThreshold": 1, "minRequests": 20, "noData": "hold", "metrics": [m]}})


def running() -> RolloutState:
    return RolloutState(phase="progressing", stable="v1", canary="v2", observed_canary="v2", canary_revision="a" * 40,
                        step=2, weight=100, started_at=T - 60, next_analysis_at=T)


def obs(data: CompareData | None, *, name: str = "latency", value: float | None = None) -> Observations:
    return Observations(requests={"east": 300.0}, compared={name: {"east": data}} if data else {},
                        values={name: {"east": value}})


def test_a_slower_canary_fails_and_rolls_back_with_the_numbers() -> None:
    d = advance(spec(), running(), obs(CompareData(canary=SLOW, baseline=STABLE)), now=T)
    assert d.action == "rollback"
    check = d.checks[-1]
    assert (check.metric, check.result, check.effective) == ("latency", "fail", "fail")
    n = check.comparison
    assert n is not None and n.test == "mann-whitney" and (n.n_canary, n.n_baseline) == (6, 6)
    assert n.statistic == 36.0 and n.p_value == pytest.approx(1 / 924)  # every canary sample above: 1/C(12, 6)
    assert n.effect == pytest.approx(4.0, abs=0.5) and n.relative is not None and n.relative > 1
    reason = d.reasons[0]
    assert reason.startswith("analysis failed (1/1): latency vs stable: significantly higher, +")
    assert reason.endswith("[Mann-Whitney U=36 p=0.00108, Hodges-Lehmann +3.997 (+135%), n=6 vs 6 stable]"), reason

    message = commit_message(namespace="shop", name="reviews", decision=d, stable_before="v1")
    assert ("  latency@east: vs stable: Mann-Whitney U=36 p=0.00108 Hodges-Lehmann +3.997 (+135%) n=6 vs 6; "
            "significantly higher, +135% > +20% -> fail\n") in message, message


def test_an_identical_canary_passes_and_promotes() -> None:
    d = advance(spec(), running(), obs(CompareData(canary=SAME, baseline=STABLE)), now=T)
    assert d.action == "promote", d.reasons
    assert d.checks[-1].result == "pass" and d.checks[-1].comparison is not None
    assert "not significantly higher (p " in d.reasons[0]


def test_min_increase_in_the_spec_is_the_floor_a_shift_must_clear() -> None:
    def action(floor: float) -> str:  # SLOW is about +4 (ms) over the stable
        compare = {"baseline": "stable", "maxIncrease": "20%", "confidence": 0.98, "minIncrease": floor}
        return advance(spec(compare=compare), running(), obs(CompareData(canary=SLOW, baseline=STABLE)), now=T).action

    assert (action(0), action(3), action(5)) == ("rollback", "rollback", "promote")
    d = advance(spec(compare={"baseline": "stable", "maxIncrease": "20%", "minIncrease": 5}), running(),
                obs(CompareData(canary=SLOW, baseline=STABLE)), now=T)
    assert "<= minIncrease 5" in d.reasons[0], d.reasons


@pytest.mark.parametrize(("policy", "action"), [("hold", "hold"), ("fail", "rollback"), ("pass", "promote")])
def test_inconclusive_follows_the_no_data_policy(policy: str, action: str) -> None:
    few = CompareData(canary=SLOW[:3], baseline=STABLE[:3])  # 1/20: never significant at 0.98
    d = advance(spec(noData=policy), running(), obs(few), now=T)
    assert d.action == action
    c = d.checks[-1]
    assert (c.result, c.effective) == ("inconclusive", policy)
    assert c.detail == (f"latency vs stable: inconclusive, too few samples for 0.98 confidence "
                        f"[n=3 vs 3 stable] (noData: {policy})")


def test_a_canary_that_looks_slower_but_is_not_yet_shown_so_is_never_stepped_up() -> None:
    # Four canary scrapes against five stable ones, one above them all: +131%, p 12/126 (as in the e2e).
    lean = CompareData(canary=SLOW[:4], baseline=(*STABLE[:4], SLOW[4] + 1))
    at_first_step = running().model_copy(update={"step": 0, "weight": 10})
    d = advance(spec(), at_first_step, obs(lean), now=T)
    assert d.action == "hold", d.reasons
    c = d.checks[-1]
    assert (c.result, c.effective) == ("inconclusive", "hold")
    assert c.comparison is not None and c.comparison.p_value == pytest.approx(12 / 126)
    assert "+131% > +20% but not yet significant (p 0.0952 >= 0.02)" in c.detail, c.detail
    assert "Mann-Whitney U=16" in c.detail, c.detail


def test_no_compared_data_and_too_few_requests_are_no_data() -> None:
    d = advance(spec(), running(), obs(None), now=T)
    assert d.action == "hold" and d.checks[-1].result == "no-data"
    idle = Observations(requests={"east": 3.0}, compared={"latency": {"east": CompareData(canary=SLOW,
                                                                                         baseline=STABLE)}})
    d = advance(spec(), running(), idle, now=T)
    assert d.action == "hold" and d.checks[-1].detail == "latency: no data (too few requests) (noData: hold)"


def test_bounds_and_compare_are_two_checks() -> None:
    s = spec(max=500)
    checks = judge(s, obs(CompareData(canary=SLOW, baseline=STABLE), value=7.0))
    assert [(c.metric, c.result) for c in checks] == [("requests", "pass"), ("latency vs stable", "fail"),
                                                        ("latency", "pass")]
    assert checks[1].detail.startswith("latency vs stable: significantly higher"), checks[1].detail


def test_error_counts_are_compared_with_fisher() -> None:
    s = spec(builtin="request-success-rate")
    worse = CompareData(counts=(9.0, 1000.0, 4.0, 4000.0))  # 0.9% vs 0.1%
    d = advance(s, running(), obs(worse), now=T)
    assert d.action == "rollback"
    assert "Fisher errors 9/1000 vs 4/4000 stable, p=" in d.reasons[0] and "error rate +800%" in d.reasons[0]
    few = CompareData(counts=(1.0, 1000.0, 0.0, 5.0))  # the stable hardly served anything
    d = advance(s, running(), obs(few), now=T)
    assert d.action == "hold" and "stable requests 5 < minRequests 20" in d.reasons[0]


# --- observe ---------------------------------------------------------------------------------------


class RangeProm:
    """Answers the window query with a sample a second, and range queries from per-version series."""

    def __init__(self, series: dict[str, Sequence[float]], *, counts: dict[str, tuple[float, float]] | None = None,
                 fail: bool = False) -> None:
        self.series = series
        self.counts = counts or {}
        self.fail = fail
        self.ranges: list[tuple[str, float, float, float]] = []

    def samples(self, selector: str, *, seconds: float) -> Samples:
        return Samples(at=T, seconds=seconds, series={"a": tuple(T - 40 + i for i in range(41))})

    def query(self, promql: str) -> float:
        return 300.0

    def query_range(self, promql: str, *, start: float, end: float, step: float) -> list[float]:
        self.ranges.append((promql, start, end, step))
        if self.fail:
            raise ProviderError("query failed: bad_data")
        version = re.search(r'version="(\w+)"', promql)
        assert version is not None
        v = version.group(1)
        if "envoy_response_code_class" in promql or "rq_total" in promql:
            if v not in self.counts:
                raise NoValuesFound("none")
            value = self.counts[v][0 if "envoy_response_code_class" in promql else 1]
            if math.isnan(value):
                raise NoValuesFound("no such series")
            return [value]
        if v not in self.series:
            raise NoValuesFound("none")
        n = round((end - start) / step) + 1
        return [x for x in self.series[v][:n] if not math.isnan(x)]

    def is_online(self) -> bool:
        return True


def test_observe_queries_canary_and_stable_alike_at_the_scrape_step() -> None:
    prom = RangeProm({"v2": SLOW, "v1": STABLE})
    o = observe(spec=spec(), namespace="shop", canary="v2", stable="v1", providers={"east": prom}, now=lambda: T + 0.7)
    assert o.compared["latency"]["east"] == CompareData(canary=SLOW, baseline=STABLE)
    (q2, *span2), (q1, *span1) = prom.ranges
    assert span1 == span2 == [T - 5, T, 1.0]  # whole seconds, six points a scrape apart: the interval
    assert q2 == q1.replace('version="v1"', 'version="v2"') and 'version="v1"' in q1
    assert q1.startswith("histogram_quantile(0.99, sum by (le) (irate(envoy_http_downstream_rq_time_bucket{")
    assert "[3000ms]" in q1 and 'cluster="east"' in q1  # three scrapes: irate always has two samples
    assert COMPARE_QUERIES["request-duration-p99"].count("{{ interval }}") == 1
    assert "rq_time_bucket" not in " ".join(p for p, *_ in prom.ranges if "histogram" not in p)


def test_observe_counts_errors_for_the_success_rate() -> None:
    prom = RangeProm({}, counts={"v2": (9.0, 1000.0), "v1": (4.0, 4000.0)})
    s = spec(builtin="request-success-rate")
    o = observe(spec=s, namespace="shop", canary="v2", stable="v1", providers={"east": prom}, now=lambda: T)
    assert o.compared["latency"]["east"] == CompareData(counts=(9.0, 1000.0, 4.0, 4000.0))
    assert all(start == end == T for _, start, end, _ in prom.ranges)  # one instant for both versions
    assert any(q == ERRORS_QUERY.replace("{{ service }}", "reviews").replace("{{ version }}", "v1")
               .replace("{{ namespace }}", "shop").replace("{{ cluster }}", "east")
               .replace("{{ interval }}", "6000ms") for q, *_ in prom.ranges)


def test_observe_no_5xx_series_is_zero_errors_and_no_stable_is_no_data() -> None:
    s = spec(builtin="request-success-rate")
    prom = RangeProm({}, counts={"v2": (math.nan, 1000.0), "v1": (math.nan, 4000.0)})  # NaN: no 5xx series
    o = observe(spec=s, namespace="shop", canary="v2", stable="v1", providers={"east": prom}, now=lambda: T)
    assert o.compared["latency"]["east"].counts == (0.0, 1000.0, 0.0, 4000.0)
    gone = RangeProm({}, counts={"v2": (0.0, 1000.0)})
    o = observe(spec=s, namespace="shop", canary="v2", stable="v1", providers={"east": gone}, now=lambda: T)
    d = advance(s, running(), o, now=T)
    assert d.checks[-1].result == "inconclusive" and "no baseline requests" in d.checks[-1].detail


def test_observe_a_failing_range_query_is_reported_and_holds() -> None:
    o = observe(spec=spec(), namespace="shop", canary="v2", stable="v1", providers={"east": RangeProm({}, fail=True)},
                now=lambda: T)
    assert o.errors == {"latency": "query failed: bad_data"} and o.compared == {"latency": {}}
    d = advance(spec(), running(), o, now=T)
    assert d.action == "hold" and d.reasons[-1] == "latency: query failed: bad_data"


def test_an_infinite_increase_stays_valid_json() -> None:
    import json

    d = advance(spec(builtin="request-success-rate"), running(), obs(CompareData(counts=(30.0, 1000.0, 0.0, 4000.0))),
                now=T)
    assert d.action == "rollback" and "error rate +inf%" in d.reasons[0], d.reasons
    n = d.checks[-1].comparison
    assert n is not None and n.relative is None
    json.dumps(d.model_dump(mode="json", by_alias=True), allow_nan=False)  # no Infinity in status files


def test_a_step_learnt_slightly_off_still_gives_one_point_a_scrape() -> None:
    class Skewed(RangeProm):
        def samples(self, selector: str, *, seconds: float) -> Samples:
            return Samples(at=T, seconds=seconds, series={"a": tuple(T - 40 * 1.0003 + i * 1.0003 for i in range(41))})

    prom = Skewed({"v2": SLOW, "v1": STABLE})
    o = observe(spec=spec(), namespace="shop", canary="v2", stable="v1", providers={"east": prom}, now=lambda: T)
    _, start, end, step = prom.ranges[0]
    assert step == pytest.approx(1.0003) and round((end - start) / step) + 1 == 6
    assert len(o.compared["latency"]["east"].canary) == 6
