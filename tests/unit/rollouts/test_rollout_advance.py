"""Table tests of the pure decision core: every strategy, thresholds, minRequests, no-data policies,
pause (Git and command), manual promote and abort, and the run-start rules that make restarts safe."""

from __future__ import annotations

from typing import Any

import pytest

from rollouts.advance import Observations, RolloutState, advance, analysis_due, destinations, judge
from rollouts.intent import RolloutSpec

T0 = 1_000.0
REV = "a" * 40


def spec(**kw: Any) -> RolloutSpec:
    base: dict[str, Any] = {
        "service": "reviews", "stable": "v1", "canary": "v2", "steps": [10, 50, 100], "interval": "10s",
        "analysis": {"failureThreshold": 2, "minRequests": 50, "noData": "hold", "metrics": [
            {"name": "success", "builtin": "request-success-rate", "min": 99},
            {"name": "latency", "builtin": "request-duration-p99", "max": 500},
        ]},
    }
    analysis = {**base["analysis"], **kw.pop("analysis", {})}
    return RolloutSpec.model_validate({**base, **kw, "analysis": analysis})


def obs(requests: float | None = 100, success: float | None = 100.0, latency: float | None = 20.0,
        online: bool = True) -> Observations:
    return Observations(online=online, requests={"east": requests},
                        values={"success": {"east": success}, "latency": {"east": latency}})


def running(s: RolloutSpec, **kw: Any) -> RolloutState:
    """A run in progress whose analysis is due at T0."""
    base: dict[str, Any] = {"phase": "progressing", "stable": "v1", "canary": "v2", "observed_canary": "v2",
                            "canary_revision": REV, "step": 0, "weight": s.steps[0] if s.strategy == "canary" else 0,
                            "started_at": T0 - 10, "next_analysis_at": T0}
    return RolloutState(**{**base, **kw})


# --- starting, and not restarting ------------------------------------------------------------------


def test_a_new_canary_starts_a_run_at_the_first_step() -> None:
    d = advance(spec(), None, None, now=T0, revision=REV)
    assert d.action == "start"
    assert (d.state.phase, d.state.step, d.state.weight, d.state.canary_revision) == ("progressing", 0, 10, REV)
    assert d.state.next_analysis_at == T0 + 10
    assert [(x.version, x.weight) for x in destinations(spec(), d.state)] == [("v1", 90), ("v2", 10)]


@pytest.mark.parametrize("canary", [None, "v1"])
def test_no_canary_or_canary_equal_to_stable_is_no_run(canary: str | None) -> None:
    s = spec(canary=canary)
    d = advance(s, None, None, now=T0)
    assert d.action == "none" and d.state.phase == "idle"
    assert [(x.version, x.weight) for x in destinations(s, d.state)] == [("v1", 100)]


def test_a_restart_with_persisted_state_resumes_at_the_same_step() -> None:
    s = spec()
    st = running(s, step=1, weight=50, next_analysis_at=T0 + 5)
    d = advance(s, st, None, now=T0, revision="b" * 40)  # same spec.canary, a new revision
    assert d.action == "wait" and d.state == st


def test_write_back_commits_do_not_start_a_run() -> None:
    promoted = RolloutState(phase="promoted", stable="v2", canary="v2", observed_canary="v2", finished_at=T0 - 1)
    d = advance(spec(stable="v2", canary=None), promoted, None, now=T0)  # promotion written back
    assert d.action == "none" and d.state.phase == "promoted" and d.state.stable == "v2"
    rolled = RolloutState(phase="rolled-back", stable="v1", canary="v2", observed_canary="v2", finished_at=T0 - 1)
    d = advance(spec(canary="v1"), rolled, None, now=T0)  # rollback written back: canary = stable
    assert d.action == "none" and d.state.phase == "rolled-back" and d.state.finished_at == T0 - 1
    d = advance(spec(canary="v2"), d.state, None, now=T0 + 1, revision=REV)  # a human tries v2 again
    assert d.action == "start"


def test_without_write_back_a_finished_run_stays_finished() -> None:
    promoted = RolloutState(phase="promoted", stable="v2", canary="v2", observed_canary="v2")
    d = advance(spec(write_back="off"), promoted, None, now=T0)
    assert d.action == "none" and d.state == promoted
    assert [(x.version, x.weight) for x in destinations(spec(), promoted)] == [("v2", 100)]


def test_a_new_canary_mid_run_restarts_with_it() -> None:
    s = spec(canary="v3")
    d = advance(s, running(s, step=2, weight=100), None, now=T0, revision=REV)
    assert d.action == "start" and d.state.canary == "v3" and d.state.weight == 10


def test_canary_removed_in_git_mid_run_ends_it() -> None:
    s = spec()
    d = advance(spec(canary=None), running(s, step=1, weight=50), None, now=T0)
    assert d.action == "reset" and d.state.phase == "idle"
    assert [(x.version, x.weight) for x in destinations(s, d.state)] == [("v1", 100)]


# --- analysis: the table ------------------------------------------------------------------------------

CASES: list[tuple[str, dict[str, Any], Observations, str, dict[str, Any]]] = [
    # id, spec overrides, observations, expected action, expected state fields
    ("pass-steps", {}, obs(), "step", {"step": 1, "weight": 50, "failed_checks": 0}),
    ("below-min", {}, obs(success=98.9), "hold", {"step": 0, "failed_checks": 1}),
    ("above-max", {}, obs(latency=501), "hold", {"step": 0, "failed_checks": 1}),
    ("at-bounds-pass", {}, obs(success=99, latency=500), "step", {"step": 1}),
    ("too-few-requests-hold", {}, obs(requests=49), "hold", {"step": 0, "failed_checks": 0}),
    ("too-few-requests-fail", {"analysis": {"noData": "fail"}}, obs(requests=49), "hold", {"failed_checks": 1}),
    ("too-few-requests-pass", {"analysis": {"noData": "pass"}}, obs(requests=49), "step", {"step": 1}),
    ("no-values-hold", {}, obs(success=None), "hold", {"step": 0, "failed_checks": 0}),
    ("no-values-fail", {"analysis": {"noData": "fail"}}, obs(success=None), "hold", {"failed_checks": 1}),
    ("no-values-pass", {"analysis": {"noData": "pass"}}, obs(latency=None), "step", {"step": 1}),
    ("nan-is-no-values", {}, obs(success=float("nan")), "hold", {"failed_checks": 0}),
    ("requests-no-values", {}, obs(requests=None), "hold", {"failed_checks": 0}),
    ("offline-holds", {}, obs(online=False), "hold", {"step": 0, "failed_checks": 0}),
    ("threshold-1-rolls-back", {"analysis": {"failureThreshold": 1}}, obs(success=50), "rollback",
     {"phase": "rolled-back", "weight": 0, "failed_checks": 1}),
]


@pytest.mark.parametrize(("overrides", "observations", "action", "expect"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_analysis(overrides: dict[str, Any], observations: Observations, action: str, expect: dict[str, Any]) -> None:
    s = spec(**overrides)
    d = advance(s, running(s), observations, now=T0)
    assert d.action == action, d.reasons
    for field, value in expect.items():
        assert getattr(d.state, field) == value, (field, d.state)
    if action != "rollback":
        assert d.state.next_analysis_at == T0 + 10  # the next analysis is one interval later
    assert d.reasons


def test_per_metric_no_data_policy_overrides_the_analysis_default() -> None:
    s = spec(analysis={"noData": "fail", "metrics": [
        {"name": "success", "builtin": "request-success-rate", "min": 99},
        {"name": "latency", "builtin": "request-duration-p99", "max": 500, "noData": "pass"}]})
    d = advance(s, running(s), obs(latency=None), now=T0)
    assert d.action == "step"
    assert {c.metric: (c.result, c.effective) for c in d.checks}["latency"] == ("no-data", "pass")


def test_failed_analyses_accumulate_to_the_threshold_then_roll_back() -> None:
    s = spec()
    d1 = advance(s, running(s, step=1, weight=50), obs(success=70), now=T0)
    assert d1.action == "hold" and d1.state.failed_checks == 1 and d1.state.weight == 50
    d2 = advance(s, d1.state, obs(success=70), now=T0 + 10)
    assert d2.action == "rollback" and d2.outcome == "rolled-back"
    assert [(x.version, x.weight) for x in destinations(s, d2.state)] == [("v1", 100)]
    fail = next(c for c in d2.checks if c.metric == "success")
    assert (fail.value, fail.min, fail.result) == (70, 99, "fail")
    assert any("70" in r and "99" in r for r in d2.reasons)  # the numbers behind the decision


def test_the_last_passed_step_promotes() -> None:
    s = spec()
    d = advance(s, running(s, step=2, weight=100), obs(), now=T0)
    assert d.action == "promote" and d.outcome == "promoted"
    assert (d.state.phase, d.state.stable) == ("promoted", "v2")
    assert [(x.version, x.weight) for x in destinations(s, d.state)] == [("v2", 100)]


def test_a_canary_walks_every_step_then_promotes() -> None:
    s = spec()
    d = advance(s, None, None, now=T0, revision=REV)
    weights, now = [d.state.weight], T0
    while d.state.phase == "progressing":
        now += 10
        d = advance(s, d.state, obs(), now=now)
        weights.append(d.state.weight)
    assert weights == [10, 50, 100, 0] and d.action == "promote"


def test_not_due_yet_waits_and_ignores_observations() -> None:
    s = spec()
    st = running(s, next_analysis_at=T0 + 3)
    assert not analysis_due(s, st, now=T0)
    d = advance(s, st, obs(success=0), now=T0)
    assert d.action == "wait" and d.state == st


@pytest.mark.parametrize("strategy", ["ab", "bluegreen", "mirror"])
def test_full_exposure_strategies_promote_after_iterations(strategy: str) -> None:
    extra = {"match": [{"headers": {"x-canary": {"exact": "yes"}}}]} if strategy != "mirror" else {}
    s = spec(strategy=strategy, iterations=3, **extra)
    d = advance(s, None, None, now=T0, revision=REV)
    assert d.action == "start" and d.state.weight == 0
    assert [(x.version, x.weight) for x in destinations(s, d.state)] == [("v1", 100)]  # default rule: stable
    actions = []
    for i in range(1, 4):
        d = advance(s, d.state, obs(), now=T0 + 10 * i)
        actions.append(d.action)
    assert actions == ["step", "step", "promote"] and d.state.iteration == 3


@pytest.mark.parametrize("strategy", ["ab", "bluegreen", "mirror"])
def test_full_exposure_strategies_roll_back_on_failures(strategy: str) -> None:
    s = spec(strategy=strategy, match=[{"headers": {"x-canary": {"exact": "yes"}}}] if strategy != "mirror" else [])
    d = advance(s, running(s, failed_checks=1), obs(success=10), now=T0)
    assert d.action == "rollback"


# --- pause, commands ------------------------------------------------------------------------------------


def test_pause_in_git_holds_and_resume_restarts_the_countdown() -> None:
    s = spec(paused=True)
    d = advance(s, running(s), obs(), now=T0)
    assert d.action == "pause" and d.state.next_analysis_at is None and d.state.step == 0
    assert not analysis_due(s, d.state, now=T0 + 100)
    d = advance(s, d.state, obs(), now=T0 + 100)
    assert d.action == "wait" and d.state.step == 0
    d = advance(spec(paused=False), d.state, None, now=T0 + 200)
    assert d.action == "resume" and d.state.next_analysis_at == T0 + 210


def test_a_run_started_paused_in_git_waits() -> None:
    d = advance(spec(paused=True), None, None, now=T0, revision=REV)
    assert d.action == "start" and d.state.next_analysis_at is None


def test_pause_and_resume_commands() -> None:
    s = spec()
    d = advance(s, running(s), None, now=T0, command="pause")
    assert d.action == "pause" and d.state.paused
    d = advance(s, d.state, obs(), now=T0 + 50)
    assert d.action == "wait" and d.state.step == 0
    d = advance(s, d.state, None, now=T0 + 60, command="resume")
    assert d.action == "resume" and not d.state.paused and d.state.next_analysis_at == T0 + 70


def test_resume_command_does_not_override_a_pause_in_git() -> None:
    s = spec(paused=True)
    d = advance(s, running(s, paused=True, next_analysis_at=None), None, now=T0, command="resume")
    assert not d.state.paused and d.state.next_analysis_at is None


@pytest.mark.parametrize(("command", "action", "phase", "stable"),
                         [("promote", "promote", "promoted", "v2"), ("abort", "rollback", "rolled-back", "v1")])
def test_manual_promote_and_abort_act_at_once(command: Any, action: str, phase: str, stable: str) -> None:
    s = spec()
    d = advance(s, running(s, next_analysis_at=T0 + 9), None, now=T0, command=command)
    assert (d.action, d.state.phase, d.state.stable) == (action, phase, stable)
    assert any("by command" in r for r in d.reasons)


def test_manual_promote_works_while_paused() -> None:
    s = spec(paused=True)
    d = advance(s, running(s, next_analysis_at=None), None, now=T0, command="promote")
    assert d.action == "promote"


def test_commands_without_a_run_change_nothing() -> None:
    idle = RolloutState(stable="v1", observed_canary=None)
    d = advance(spec(canary=None), idle, None, now=T0, command="promote")
    assert d.action == "none" and d.state == idle and "no run" in d.reasons[0]


# --- judging --------------------------------------------------------------------------------------------


def test_judging_covers_every_cluster_and_any_failing_cluster_fails() -> None:
    s = spec()
    o = Observations(requests={"east": 100, "west": 100},
                     values={"success": {"east": 100, "west": 90}, "latency": {"east": 1, "west": 1}})
    checks = judge(s, o)
    assert {(c.metric, c.cluster, c.result) for c in checks} == {
        ("requests", "east", "pass"), ("requests", "west", "pass"), ("success", "east", "pass"),
        ("success", "west", "fail"), ("latency", "east", "pass"), ("latency", "west", "pass")}


def test_no_metrics_means_progress_on_enough_requests_only() -> None:
    s = spec(analysis={"metrics": []})
    assert advance(s, running(s), obs(requests=60), now=T0).action == "step"
    assert advance(s, running(s), obs(requests=10), now=T0).action == "hold"
