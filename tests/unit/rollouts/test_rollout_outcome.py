"""A run's outcome survives its own write-back commit (the `rollout status --json` contract: phase
promoted | rolled-back and finishedAt until the next run), and request counts read as whole numbers."""

from __future__ import annotations

from typing import Any

import pytest

from reconciler.rollout.commands import format_summary, summary
from rollouts.advance import REQUESTS, Decision, Observations, advance, destinations, format_requests
from rollouts.intent import RolloutSpec
from rollouts.writeback import commit_message, format_check

T0 = 1_000.0
REV = "a" * 40


def spec(**kw: Any) -> RolloutSpec:
    base: dict[str, Any] = {"service": "reviews", "stable": "v1", "canary": "v2", "steps": [50, 100],
                            "interval": "10s", "analysis": {"failureThreshold": 1, "minRequests": 50, "metrics": [
                                {"name": "success", "builtin": "request-success-rate", "min": 99}]}}
    return RolloutSpec.model_validate({**base, **kw})


def obs(requests: float | None = 100.0, success: float = 100.0) -> Observations:
    return Observations(requests={"east": requests}, values={"success": {"east": success}})


def record(s: RolloutSpec, d: Decision, last: Decision) -> dict[str, Any]:
    """What the controller persists: the spec, the state, the last decision that acted."""
    return {"namespace": "shop", "name": "reviews", "spec": s.model_dump(mode="json", by_alias=True),
            "state": d.state.model_dump(mode="json", by_alias=True),
            "lastDecision": last.model_dump(mode="json", by_alias=True)}


def run_to_the_end(s: RolloutSpec, success: float) -> Decision:
    d = advance(s, None, None, now=T0, revision=REV)
    now = T0
    while d.state.phase == "progressing":
        now += 10
        d = advance(s, d.state, obs(success=success), now=now)
    return d


@pytest.mark.parametrize(("success", "phase", "written_back", "stable"), [
    (100.0, "promoted", {"stable": "v2", "canary": None}, "v2"),  # promotion: stable v2, canary removed
    (50.0, "rolled-back", {"canary": "v1"}, "v1"),  # rollback: canary set back to the stable
])
def test_the_outcome_stays_through_the_write_back_commit(success: float, phase: str, written_back: dict[str, Any],
                                                         stable: str) -> None:
    s = spec()
    end = run_to_the_end(s, success)
    assert end.state.phase == phase and end.state.finished_at is not None
    after = spec(**written_back)  # the revision lockgate committed
    d = advance(after, end.state, None, now=end.at + 1, revision="b" * 40)
    assert d.action == "none"
    assert (d.state.phase, d.state.finished_at, d.state.stable) == (phase, end.at, stable)
    assert [(x.version, x.weight) for x in destinations(after, d.state)] == [(stable, 100)]
    again = advance(after, d.state, None, now=end.at + 2)  # later ticks: still the outcome
    assert again.state == d.state
    out = summary(after.model_dump(mode="json", by_alias=True), record(after, again, end), namespace="shop",
                  name="reviews", now=end.at + 3)
    assert (out["phase"], out["finishedAt"], out["stable"], out["canary"]) == (phase, end.at, stable, "v2")
    assert out["startedAt"] == T0 and out["step"] is None and out["lastDecision"]["action"] == end.action
    assert f": {phase}" in format_summary(out).splitlines()[0]


def test_the_next_run_starts_progressing_without_the_old_finished_at() -> None:
    end = run_to_the_end(spec(), 100.0)
    settled = advance(spec(stable="v2", canary=None), end.state, None, now=end.at + 1).state
    d = advance(spec(stable="v2", canary="v3"), settled, None, now=end.at + 5, revision="c" * 40)
    assert d.action == "start"
    assert (d.state.phase, d.state.started_at, d.state.finished_at) == ("progressing", end.at + 5, None)


def test_after_the_outcome_a_stable_changed_in_git_is_followed() -> None:
    """Keeping the phase must not freeze the traffic: with no canary in Git, Git's stable rules."""
    end = run_to_the_end(spec(), 100.0)
    settled = advance(spec(stable="v2", canary=None), end.state, None, now=end.at + 1).state
    d = advance(spec(stable="v3", canary=None), settled, None, now=end.at + 2)
    assert (d.state.stable, d.state.phase) == ("v3", "promoted")
    assert [(x.version, x.weight) for x in destinations(spec(stable="v3", canary=None), d.state)] == [("v3", 100)]


def test_without_write_back_the_promoted_stable_is_kept_over_git() -> None:
    s = spec(write_back="off")
    end = run_to_the_end(s, 100.0)
    d = advance(s, end.state, None, now=end.at + 1)  # Git still says stable v1, canary v2
    assert (d.state.phase, d.state.stable) == ("promoted", "v2")


# --- request counts -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "shown"), [(52.5, "53"), (53.5, "54"), (52.4, "52"), (12345.4, "12345"),
                                            (0.0, "0"), (None, "no values"), (float("nan"), "no values")])
def test_request_counts_are_whole_numbers_rounded_half_up(raw: float | None, shown: str) -> None:
    assert format_requests(raw) == shown


def test_reasons_checks_and_the_commit_message_show_whole_request_counts() -> None:
    s = spec(steps=[100])
    d = advance(s, advance(s, None, None, now=T0, revision=REV).state, obs(requests=52.5), now=T0 + 10)
    assert d.action == "promote"
    assert "requests 53 >= 50" in d.reasons[0]
    req = next(c for c in d.checks if c.metric == REQUESTS)
    assert req.value == 52.5 and req.requests == 52.5  # the raw count stays in the record
    assert format_check(req) == "requests@east: 53 (min 50) -> pass"
    msg = commit_message(namespace="shop", name="reviews", decision=d, stable_before="v1")
    assert "requests@east: 53 (min 50) -> pass" in msg and "52.5" not in msg
    out = summary(s.model_dump(mode="json", by_alias=True), record(s, d, d), namespace="shop", name="reviews")
    assert "52.5" not in format_summary(out) and "requests@east: 53" in format_summary(out)


def test_min_requests_compares_the_raw_count_and_the_display_never_contradicts_it() -> None:
    s = spec()
    start = advance(s, None, None, now=T0, revision=REV).state
    d = advance(s, start, obs(requests=49.6), now=T0 + 10)  # rounds to 50, but fewer than 50 were counted
    assert d.action == "hold" and d.state.step == 0
    assert "requests 49 < minRequests 50" in d.reasons[0]
    req = next(c for c in d.checks if c.metric == REQUESTS)
    assert req.value == 49.6 and format_check(req).startswith("requests@east: 49 (min 50) -> no-data")
    assert advance(s, start, obs(requests=50.0), now=T0 + 10).action == "step"
