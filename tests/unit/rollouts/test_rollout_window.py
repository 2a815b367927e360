"""A partial window is never judged: after a Prometheus restart, or for a canary sidecar Prometheus has
just found, `rate()`/`increase()` would extrapolate a few seconds to the whole interval. Table tests of
the window check on raw sample times, then `observe` + `advance` with fake providers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from rollouts.advance import RolloutState, advance
from rollouts.analysis import HISTORY_S, check_window, observe
from rollouts.intent import RolloutSpec
from rollouts.provider import NoValuesFound, PartialWindow, ProviderError, Samples

T = 10_000.0
W = 10.0
NEW = "Prometheus restarted or the target is new"


def every(first: float, last: float, step: float = 1.0) -> tuple[float, ...]:
    """Sample times from `first` to `last` (both relative to T, in seconds), one per `step`."""
    n = round((last - first) / step)
    return tuple(T + first + i * step for i in range(n + 1))


def window(series: Mapping[str, Sequence[float]], seconds: float = W + HISTORY_S,
           since: float | None = None) -> Samples:
    return Samples(at=T, seconds=seconds, series={k: tuple(v) for k, v in series.items()}, since=since)


FULL = every(-40.3, -0.3)
WINDOWS: list[tuple[str, dict[str, tuple[float, ...]], float | None, str]] = [
    # (case, series, expected covered seconds or None for a full window, expected cause)
    ("full: a sample every second for longer than the window", {"a": FULL}, None, ""),
    ("full: one missed scrape is no gap", {"a": tuple(t for t in FULL if t != T - 5.3)}, None, ""),
    ("full: the newest sample late (not yet written)", {"a": every(-40.3, -1.6)}, None, ""),
    ("partial: a new target, first sample 3.1 s ago", {"a": every(-3.1, -0.1)}, 4.2, NEW),
    ("partial: Prometheus restarted, samples resumed 3.1 s ago",
     {"a": every(-40, -12) + every(-3.1, -0.1)}, 4.2, NEW),
    ("partial: restarted with its data kept: a hole inside the window",
     {"a": every(-40, -8) + every(-2.1, -0.1)}, 3.1 + 3.2, NEW),
    ("partial: restarted, no sample since", {"a": every(-40.5, -6.5)}, 5.5,
     "no sample in the last 6.5 s: Prometheus restarted or is not scraping the target"),
    ("partial: one sample only (no interval to go by)", {"a": (T - 0.4,)}, 0.4, NEW),
    ("partial: the least covered replica counts", {"old": FULL, "new": every(-3.1, -0.1)}, 4.2, NEW),
    ("full: a removed replica's old samples are left out", {"gone": every(-40, -20), "a": FULL}, None, ""),
]


@pytest.mark.parametrize(("case", "series", "covered", "why"), WINDOWS, ids=[w[0] for w in WINDOWS])
def test_the_window_is_full_only_when_every_current_series_covers_it(
    case: str, series: dict[str, tuple[float, ...]], covered: float | None, why: str
) -> None:
    if covered is None:
        check_window(window(series), window_s=W)
        return
    with pytest.raises(PartialWindow) as info:
        check_window(window(series), window_s=W)
    assert info.value.covered_s == pytest.approx(covered, abs=1e-6), case
    assert info.value.why == why
    assert info.value.fraction == pytest.approx(covered / W, abs=1e-6)


RESTARTS: list[tuple[str, tuple[float, ...], float, float | None, str]] = [
    # (case, samples, Prometheus's start relative to T, covered or None for full, cause)
    ("restarted 0.5 s ago, its data kept: its last sample is recent but nothing comes after it",
     every(-40.8, -0.8), -0.5, 9.5, "Prometheus restarted 0.5 s ago"),
    ("restarted 6 s ago, scraping again for 3 s", every(-40.3, -6.3) + every(-3.0, 0.0), -6.0, 4 + 3 + 1.1,
     "Prometheus restarted 6.0 s ago"),
    ("restarted 15 s ago, scraping again for 9.5 s", every(-40.3, -15.3) + every(-9.5, -0.5), -15.0, None, ""),
    ("started long ago", FULL, -3600.0, None, ""),
]


@pytest.mark.parametrize(("case", "samples", "since", "covered", "why"), RESTARTS, ids=[r[0] for r in RESTARTS])
def test_samples_from_before_a_restart_vouch_for_nothing_after_it(
    case: str, samples: tuple[float, ...], since: float, covered: float | None, why: str
) -> None:
    w = window({"a": samples}, since=T + since)
    if covered is None:
        check_window(w, window_s=W)
        return
    with pytest.raises(PartialWindow) as info:
        check_window(w, window_s=W)
    assert (info.value.covered_s, info.value.why) == (pytest.approx(covered, abs=1e-6), why), case


def test_no_series_at_all_is_plain_no_values_not_a_partial_window() -> None:
    with pytest.raises(NoValuesFound) as info:
        check_window(window({}), window_s=W)
    assert not isinstance(info.value, PartialWindow)


def test_the_scrape_interval_is_learnt_from_the_samples() -> None:
    """A Prometheus scraping every 15 s (`--prometheus-url`): 60 s of samples is a full minute."""
    check_window(window({"a": every(-200, -5, step=15)}, seconds=90), window_s=60)
    with pytest.raises(PartialWindow) as info:  # ...and 40 s of them is not
        check_window(window({"a": every(-40, -10, step=15)}, seconds=90), window_s=60)
    assert info.value.covered_s == pytest.approx(40 + 16.5)


def test_the_message_reads_as_a_reason() -> None:
    exc = PartialWindow(covered_s=4.26, window_s=10, why=NEW)
    assert str(exc) == f"only 4.2 s of 10 s of data ({NEW})"
    assert isinstance(exc, NoValuesFound)


# --- observe + advance with fake providers ------------------------------------------------------------


class FakePrometheus:
    """Answers the window query from `series` (cut to the asked range) and every metric with fixed values."""

    def __init__(self, series: Mapping[str, Sequence[float]], *, success: float = 100.0, requests: float = 300.0,
                 latency: float = 20.0, down: bool = False) -> None:
        self.series = {k: tuple(v) for k, v in series.items()}
        self.values = {"success": success, "requests": requests, "latency": latency}
        self.down = down
        self.selectors: list[tuple[str, float]] = []
        self.queries: list[str] = []

    def samples(self, selector: str, *, seconds: float) -> Samples:
        self.selectors.append((selector, seconds))
        if self.down:
            raise ProviderError("connection refused")
        kept = {k: tuple(t for t in ts if T - seconds < t <= T) for k, ts in self.series.items()}
        return Samples(at=T, seconds=seconds, series={k: ts for k, ts in kept.items() if ts})

    def query(self, promql: str) -> float:
        self.queries.append(promql)
        if not self.series:
            raise NoValuesFound(f"no values found for {promql}")
        if "histogram_quantile" in promql:
            return self.values["latency"]
        return self.values["success"] if promql.startswith("100 * (1 -") else self.values["requests"]

    def is_online(self) -> bool:
        return True


def spec(**analysis: Any) -> RolloutSpec:
    return RolloutSpec.model_validate({
        "service": "reviews", "stable": "v1", "canary": "v2", "steps": [10, 50, 100], "interval": f"{W:g}s",
        "analysis": {"failureThreshold": 2, "minRequests": 50, "noData": "hold", "metrics": [
            {"name": "success", "builtin": "request-success-rate", "min": 99},
            {"name": "latency", "builtin": "request-duration-p99", "max": 500}], **analysis}})


def running() -> RolloutState:
    return RolloutState(phase="progressing", stable="v1", canary="v2", observed_canary="v2", canary_revision="a" * 40,
                        step=0, weight=10, started_at=T - 60, next_analysis_at=T)


def analyse(s: RolloutSpec, providers: Mapping[str, FakePrometheus]) -> Any:
    obs = observe(spec=s, namespace="shop", canary="v2", providers=providers)
    return obs, advance(s, running(), obs, now=T)


def test_a_full_window_is_judged_and_steps() -> None:
    prom = FakePrometheus({"east/shop/reviews-v2-0": FULL})
    obs, d = analyse(spec(), {"east": prom})
    assert obs.partial == {}
    assert d.action == "step" and d.state.weight == 50
    selector, seconds = prom.selectors[0]
    assert seconds == W + HISTORY_S  # one extra query per cluster, with history to learn the interval from
    assert selector.startswith("envoy_http_downstream_rq_total{") and 'version="v2"' in selector
    assert 'cluster="east"' in selector and 'envoy_http_conn_manager_prefix="inbound"' in selector


def test_a_partial_window_holds_with_the_reason_even_though_the_values_pass() -> None:
    prom = FakePrometheus({"east/shop/reviews-v2-0": every(-40, -12) + every(-3.1, -0.1)})  # restarted
    obs, d = analyse(spec(), {"east": prom})
    assert obs.partial["east"].covered == pytest.approx(4.2)
    assert obs.values["success"]["east"] == 100.0  # what the few seconds said: shown, not judged
    assert d.action == "hold" and d.state.step == 0 and d.state.weight == 10 and d.state.failed_checks == 0
    assert [(c.metric, c.result, c.effective) for c in d.checks] == [
        ("requests", "no-data", "hold"), ("success", "no-data", "hold"), ("latency", "no-data", "hold")]
    assert d.checks[1].detail == f"success: only 4.2 s of 10 s of data ({NEW}) (noData: hold)"
    assert d.checks[1].value == 100.0
    assert "holding: requests: only 4.2 s of 10 s of data" in d.reasons[0]


def test_a_partial_window_that_would_fail_is_not_a_failed_check() -> None:
    prom = FakePrometheus({"east/shop/reviews-v2-0": every(-4.1, -0.1)}, success=50.0)  # a new sidecar, 4 s old
    _, d = analyse(spec(), {"east": prom})
    assert d.action == "hold" and d.state.failed_checks == 0
    assert all(c.result == "no-data" for c in d.checks)


@pytest.mark.parametrize(("policy", "action", "failed"),
                         [("hold", "hold", 0), ("fail", "hold", 1), ("pass", "step", 0)])
def test_a_partial_window_follows_the_no_data_policy(policy: str, action: str, failed: int) -> None:
    s = spec(noData=policy)
    prom = FakePrometheus({"east/shop/reviews-v2-0": every(-3.1, -0.1)})
    _, d = analyse(s, {"east": prom})
    assert (d.action, d.state.failed_checks) == (action, failed)
    assert {c.effective for c in d.checks} == {policy}


def test_a_metric_s_own_no_data_policy_applies_to_a_partial_window() -> None:
    s = spec(metrics=[{"name": "success", "builtin": "request-success-rate", "min": 99, "noData": "fail"},
                      {"name": "latency", "builtin": "request-duration-p99", "max": 500, "noData": "pass"}])
    _, d = analyse(s, {"east": FakePrometheus({"east/shop/reviews-v2-0": every(-3.1, -0.1)})})
    assert {c.metric: c.effective for c in d.checks} == {"requests": "hold", "success": "fail", "latency": "pass"}
    assert d.action == "hold" and d.state.failed_checks == 1


def test_no_data_at_all_stays_no_values_found() -> None:
    prom = FakePrometheus({})
    obs, d = analyse(spec(), {"east": prom})
    assert obs.partial == {} and obs.requests == {"east": None}
    assert d.action == "hold"
    assert "requests no values < minRequests 50" in d.reasons[0] and "of data" not in d.reasons[0]


def test_one_cluster_partial_the_other_judged() -> None:
    east = FakePrometheus({"east/shop/reviews-v2-0": every(-3.1, -0.1)})
    west = FakePrometheus({"west/shop/reviews-v2-0": FULL})
    obs, d = analyse(spec(), {"east": east, "west": west})
    assert set(obs.partial) == {"east"}
    by = {(c.metric, c.cluster): c for c in d.checks}
    assert by["success", "east"].result == "no-data" and by["success", "west"].result == "pass"
    assert by["success", "east"].detail.startswith("success@east: only 4.2 s of 10 s of data")
    assert d.action == "hold"


def test_the_window_query_failing_is_offline() -> None:
    obs, d = analyse(spec(), {"east": FakePrometheus({"a": FULL}, down=True)})
    assert obs.online is False and "connection refused" in obs.errors["window"]
    assert d.action == "hold" and "offline" in d.reasons[0]
