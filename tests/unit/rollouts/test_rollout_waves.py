"""Table tests of the pure core for waves across clusters: two waves passed in turn, a failure in either
wave rolls every cluster back at once, bake, manual approval (command and `spec.approve`), pause across
a wave boundary, a restart mid-wave; and the edges: per-cluster overlay and render, validation with
file:line, the write-back, the status rows."""

from __future__ import annotations

import json
from typing import Any, Literal

import pytest

from reconciler.load import load
from reconciler.pipeline import ephemeral_certificates, render_planned
from reconciler.rollout.commands import format_summary, summary
from rollouts.advance import (
    Decision,
    Observations,
    RolloutState,
    advance,
    analysis_due,
    destinations,
    gate_for,
    judged_clusters,
)
from rollouts.intent import RolloutSpec
from rollouts.routing import overlay
from rollouts.writeback import commit_message, edit_rollout
from tests.fixtures.intents import rollout_yaml, with_clusters
from tests.fixtures.routes import ingress_vhost

T0 = 1_000.0
REV = "a" * 40
CLUSTERS = ("east", "west", "central")
TWO_WAVES = [{"clusters": ["east"]}, {"clusters": ["west", "central"]}]


def spec(waves: list[dict[str, Any]] | None = None, **kw: Any) -> RolloutSpec:
    base: dict[str, Any] = {
        "service": "reviews", "stable": "v1", "canary": "v2", "steps": [20, 100], "interval": "10s",
        "analysis": {"failureThreshold": 1, "minRequests": 50, "metrics": [
            {"name": "success", "builtin": "request-success-rate", "min": 99}]},
        "waves": TWO_WAVES if waves is None else waves,
    }
    return RolloutSpec.model_validate({**base, **kw})


def obs(**success: float) -> Observations:
    """Every cluster served 100 canary requests at 100% success, but for the rates given."""
    rates: dict[str, float | None] = {c: 100.0 for c in CLUSTERS}
    rates.update(success)
    return Observations(requests={c: 100.0 for c in CLUSTERS}, values={"success": rates})


def share(s: RolloutSpec, st: RolloutState) -> dict[str, int]:
    """The canary's weight in each cluster's default rule."""
    out = {}
    for c in CLUSTERS:
        dests = destinations(s, st, cluster=c)
        out[c] = sum(d.weight for d in dests if d.version == st.canary and d.version != st.stable)
    return out


def analyse(s: RolloutSpec, st: RolloutState, observations: Observations, **kw: Any) -> Decision:
    """One analysis, when it is due."""
    assert st.next_analysis_at is not None and analysis_due(s, st, now=st.next_analysis_at), st
    return advance(s, st, observations, now=st.next_analysis_at, **kw)


def judged(d: Decision) -> set[str]:
    return {c.cluster for c in d.checks}


def started(s: RolloutSpec) -> RolloutState:
    d = advance(s, None, None, now=T0, revision=REV)
    assert d.action == "start", d
    return d.state


# --- passing, failing ----------------------------------------------------------------------------------


def test_a_healthy_canary_passes_wave_by_wave_judged_only_where_it_runs() -> None:
    s = spec()
    st = started(s)
    assert (st.wave, st.step, st.weights) == (0, 0, {"east": 20})
    assert share(s, st) == {"east": 20, "west": 0, "central": 0}

    d = analyse(s, st, obs(west=10.0))  # west is bad, but not judged while wave 0 runs
    assert d.action == "step" and judged(d) == {"east"}, d
    assert share(s, d.state) == {"east": 100, "west": 0, "central": 0}

    d = analyse(s, d.state, obs(west=10.0))
    assert d.action == "wave" and d.state.wave == 1 and d.state.phase == "progressing", d
    assert share(s, d.state) == {"east": 100, "west": 20, "central": 20}
    assert "waves[0] (east) passed" in " ".join(d.reasons)

    d = analyse(s, d.state, obs(east=10.0))  # now east is not judged: it passed
    assert d.action == "step" and judged(d) == {"west", "central"}, d
    assert share(s, d.state) == {"east": 100, "west": 100, "central": 100}

    d = analyse(s, d.state, obs())
    assert d.action == "promote" and d.state.phase == "promoted" and d.state.stable == "v2", d
    assert all(destinations(s, d.state, cluster=c)[0].version == "v2" for c in CLUSTERS)


def test_a_failure_in_the_first_wave_rolls_back_every_cluster() -> None:
    s = spec()
    d = analyse(s, started(s), obs(east=50.0))
    assert d.action == "rollback" and d.state.phase == "rolled-back", d
    assert share(s, d.state) == {"east": 0, "west": 0, "central": 0}
    why = " ".join(d.reasons)
    assert "analysis failed (1/1) in waves[0] (east): success@east 50 < min 99" in why, why
    assert "fleet abort in waves[0] (east): every cluster back to 100% v1 at once (the canary had 20% in east)" in why


def test_a_failure_in_wave_two_rolls_back_the_wave_already_at_100_percent() -> None:
    s = spec()
    st = analyse(s, analyse(s, started(s), obs()).state, obs()).state
    assert st.wave == 1 and share(s, st) == {"east": 100, "west": 20, "central": 20}
    d = analyse(s, st, obs(central=62.5))
    assert d.action == "rollback" and d.outcome == "rolled-back", d
    assert share(s, d.state) == {"east": 0, "west": 0, "central": 0}  # east included: it had 100%
    assert [(x.version, x.weight) for x in destinations(s, d.state, cluster="east")] == [("v1", 100)]
    why = " ".join(d.reasons)
    assert "in waves[1] (west, central): success@central 62.50 < min 99" in why, why
    assert "(the canary had 20% in central, 100% in east, 20% in west)" in why, why

    msg = commit_message(namespace="shop", name="reviews", decision=d, stable_before="v1",
                         wave="waves[1] (west, central)")
    subject = msg.splitlines()[0]
    assert subject == ("rollout shop/reviews: roll back v2 in every cluster (100% to v1) in waves[1] (west, central), "
                       "failed at central"), subject
    assert "success@central: 62.5 (min 99) -> fail" in msg and "Lockgate-Wave: waves[1] (west, central)" in msg


def test_below_the_threshold_a_failure_holds_in_the_wave() -> None:
    s = spec(analysis={"failureThreshold": 2, "minRequests": 50,
                       "metrics": [{"name": "success", "builtin": "request-success-rate", "min": 99}]})
    st = analyse(s, analyse(s, started(s), obs()).state, obs()).state
    d = analyse(s, st, obs(west=90.0))
    assert d.action == "hold" and d.state.wave == 1 and d.state.failed_checks == 1, d
    assert share(s, d.state) == {"east": 100, "west": 20, "central": 20}


# --- bake ----------------------------------------------------------------------------------------------


def test_the_next_wave_bakes_while_the_passed_one_is_still_judged() -> None:
    s = spec(waves=[{"clusters": ["east"]}, {"clusters": ["west"], "bake": "30s"}])
    st = analyse(s, started(s), obs()).state
    d = analyse(s, st, obs())
    t_pass = d.at
    assert d.action == "wave" and d.state.wave == 1 and d.state.bake_until == t_pass + 30, d
    assert share(s, d.state) == {"east": 100, "west": 0, "central": 0}
    assert "waves[1] (west) bakes 30s before it starts" in " ".join(d.reasons)

    d = analyse(s, d.state, obs(west=10.0))  # the soak: east judged at 100%, west (not started) not
    assert d.action == "wait" and judged(d) == {"east"} and d.state.bake_until == t_pass + 30, d
    d = advance(s, d.state, None, now=t_pass + 29.9)
    assert d.action == "wait" and share(s, d.state)["west"] == 0, d

    d = advance(s, d.state, None, now=t_pass + 30)
    assert d.action == "wave" and d.state.bake_until is None and d.state.step == 0, d
    assert share(s, d.state) == {"east": 100, "west": 20, "central": 0}
    assert d.state.next_analysis_at == t_pass + 40  # a full interval of the new wave before its first analysis
    assert judged(analyse(s, d.state, obs())) == {"west"}


def test_a_failure_while_baking_rolls_back_every_cluster() -> None:
    s = spec(waves=[{"clusters": ["east"]}, {"clusters": ["west"], "bake": "30s"}])
    st = analyse(s, analyse(s, started(s), obs()).state, obs()).state
    d = analyse(s, st, obs(east=80.0))
    assert d.action == "rollback" and share(s, d.state) == {"east": 0, "west": 0, "central": 0}, d
    assert "fleet abort in waves[0] (east)" in " ".join(d.reasons)


# --- approval ------------------------------------------------------------------------------------------

GATED: list[dict[str, Any]] = [{"clusters": ["east"]}, {"clusters": ["west"], "approval": "manual", "name": "west"}]


def _waiting(s: RolloutSpec) -> RolloutState:
    d = analyse(s, analyse(s, started(s), obs()).state, obs())
    assert d.action == "wave" and d.state.waiting_for_approval and d.state.wave == 1, d
    assert "waves[1] west (west) waits for approval: `lockgate rollout approve` or `spec.approve: west`" \
        in " ".join(d.reasons)
    return d.state


def test_manual_approval_holds_until_the_command() -> None:
    s = spec(waves=GATED)
    st = _waiting(s)
    for _ in range(3):  # however many intervals pass: the soak goes on, west gets nothing
        d = analyse(s, st, obs())
        assert d.action == "wait" and judged(d) == {"east"} and d.state.waiting_for_approval, d
        st = d.state
        assert share(s, st) == {"east": 100, "west": 0, "central": 0}
    d = advance(s, st, None, now=T0 + 100, command="approve")
    assert d.action == "approve" and not d.state.waiting_for_approval, d
    assert share(s, d.state) == {"east": 100, "west": 20, "central": 0}
    assert d.reasons[0] == "waves[1] west (west) approved by command"


@pytest.mark.parametrize("approve", [1, "west"])
def test_manual_approval_from_git(approve: int | str) -> None:
    s = spec(waves=GATED)
    st = _waiting(s)
    d = advance(spec(waves=GATED, approve=approve), st, None, now=T0 + 100)
    assert d.action == "approve" and share(s, d.state)["west"] == 20, d
    assert f"spec.approve: {approve}" in d.reasons[0]


def test_an_approval_in_git_before_the_gate_lets_the_wave_start_at_once() -> None:
    s = spec(waves=GATED, approve="west")
    d = analyse(s, analyse(s, started(s), obs()).state, obs())
    assert d.action == "wave" and not d.state.waiting_for_approval and share(s, d.state)["west"] == 20, d


def test_approve_with_nothing_waiting_or_paused_is_ignored() -> None:
    s = spec(waves=GATED)
    st = started(s)
    d = advance(s, st, None, now=T0 + 1, command="approve")
    assert d.action == "none" and d.state == st and "no wave waits for approval" in d.reasons[0]
    waiting = _waiting(s)
    paused = advance(s, waiting, None, now=T0 + 50, command="pause").state
    d = advance(s, paused, None, now=T0 + 51, command="approve")
    assert d.action == "none" and d.state.waiting_for_approval, d


def test_a_first_wave_with_approval_moves_no_traffic_until_approved() -> None:
    s = spec(waves=[{"clusters": ["east"], "approval": "manual"}, {"clusters": ["west"]}])
    st = started(s)
    assert st.waiting_for_approval and share(s, st) == {"east": 0, "west": 0, "central": 0}
    assert judged_clusters(s, st) == [] and not analysis_due(s, st, now=T0 + 100)
    d = advance(s, st, None, now=T0 + 100, command="approve")
    assert d.action == "approve" and share(s, d.state) == {"east": 20, "west": 0, "central": 0}


# --- commands, pause, restart --------------------------------------------------------------------------


def test_promote_skips_the_rest_of_the_current_wave_only() -> None:
    s = spec(steps=[10, 20, 50, 100])
    d = advance(s, started(s), None, now=T0 + 1, command="promote")
    assert d.action == "wave" and d.state.phase == "progressing" and d.state.wave == 1, d
    assert share(s, d.state) == {"east": 100, "west": 10, "central": 10}
    assert "the remaining steps of waves[0] (east) skipped" in d.reasons[0]
    d = advance(s, d.state, None, now=T0 + 2, command="promote")
    assert d.action == "promote" and d.state.phase == "promoted" and d.state.stable == "v2", d


def test_abort_returns_every_cluster_to_the_stable() -> None:
    s = spec()
    st = analyse(s, analyse(s, started(s), obs()).state, obs()).state
    d = advance(s, st, None, now=T0 + 25, command="abort")
    assert d.action == "rollback" and share(s, d.state) == {"east": 0, "west": 0, "central": 0}, d
    assert "aborted by command" in d.reasons[0] and "fleet abort in waves[1] (west, central)" in " ".join(d.reasons)


def test_a_pause_holds_the_run_across_a_wave_boundary() -> None:
    s = spec(waves=[{"clusters": ["east"]}, {"clusters": ["west"], "bake": "30s"}])
    st = analyse(s, analyse(s, started(s), obs()).state, obs()).state
    t_pass = st.bake_until
    assert t_pass is not None
    paused = advance(s, st, None, now=t_pass - 20, command="pause").state
    d = advance(s, paused, None, now=t_pass + 60)  # the bake ended while paused: west does not start
    assert d.state.wave == 1 and d.state.bake_until == t_pass and share(s, d.state)["west"] == 0, d
    assert not analysis_due(s, d.state, now=t_pass + 60)
    d = advance(s, d.state, None, now=t_pass + 61, command="resume")
    assert d.action == "resume" and share(s, d.state)["west"] == 0, d
    d = advance(s, d.state, None, now=t_pass + 61.2)
    assert d.action == "wave" and share(s, d.state)["west"] == 20, d

    # paused in Git at a wave's last step: the analysis that would end the wave does not happen
    st = analyse(s, started(s), obs()).state
    held = spec(waves=[{"clusters": ["east"]}, {"clusters": ["west"], "bake": "30s"}], paused=True)
    d = advance(held, st, obs(), now=(st.next_analysis_at or 0) + 100)
    assert d.action == "pause" and d.state.wave == 0 and share(s, d.state)["east"] == 100, d


def test_a_restart_mid_wave_resumes_in_that_wave_at_that_step() -> None:
    s = spec(steps=[20, 50, 100])
    st = analyse(s, analyse(s, analyse(s, started(s), obs()).state, obs()).state, obs()).state
    assert (st.wave, st.step) == (1, 0)
    st = analyse(s, st, obs()).state
    assert (st.wave, st.step, st.weights) == (1, 1, {"east": 100, "west": 50, "central": 50})

    # what the state file holds, read back by a new process
    back = RolloutState.model_validate(json.loads(json.dumps(st.model_dump(mode="json", by_alias=True))))
    assert back == st
    d = advance(s, back, None, now=(st.next_analysis_at or 0) - 1, revision="b" * 40)
    assert d.action == "wait" and d.state == st
    d = analyse(s, back, obs())
    assert d.action == "step" and (d.state.wave, d.state.step) == (1, 2) and judged(d) == {"west", "central"}, d


def test_gates_with_waves_a_wave_end_is_a_traffic_increase_the_last_a_promotion() -> None:
    s = spec()
    st = analyse(s, started(s), obs()).state
    assert st.step == 1 and gate_for(s, st) == "confirm-traffic-increase"
    st = analyse(s, analyse(s, st, obs()).state, obs()).state
    assert (st.wave, st.step) == (1, 1) and gate_for(s, st) == "confirm-promotion"


def test_without_waves_every_cluster_has_the_one_weight() -> None:
    s = spec(waves=[])
    st = started(s)
    assert st.weights is None and share(s, st) == {"east": 20, "west": 20, "central": 20}
    assert judged_clusters(s, st) is None


# --- the edges: overlay and render per cluster, validation, write-back, status --------------------------

WAVES_ROLLOUT = rollout_yaml(steps=[20, 100], interval="2s", metrics=[
    {"name": "ok", "builtin": "request-success-rate", "min": 99}], waves=[
    {"clusters": ["east"]}, {"name": "rest", "clusters": ["west"], "bake": "10s", "approval": "manual"}])


def test_render_gives_each_cluster_its_own_weights() -> None:
    loaded = load(with_clusters(["east", "west"], rollout=WAVES_ROLLOUT))
    assert loaded.intent is not None, loaded.problems
    st = RolloutState(phase="progressing", stable="v1", canary="v2", observed_canary="v2", weight=20,
                      weights={"east": 20})
    states = {("shop", "reviews"): st}
    for cluster, want in (("east", [("v1", 80), ("v2", 20)]), ("west", [("v1", 100)])):
        shaped = overlay(loaded.intent, states, cluster=cluster)
        rule = shaped.routes[("shop", "reviews")].spec.http[0]
        assert [(d.version, d.weight) for d in rule.route] == want, cluster
    rendered = render_planned(loaded.intent, states=states, certs=ephemeral_certificates(["east", "west"]))
    seen = {}
    for cluster in ("east", "west"):
        snaps = rendered[cluster].snapshots
        ingress = next(s for node, s in snaps.items() if node.endswith("ingress"))
        vhost = ingress_vhost(ingress, "reviews.shop")
        action = vhost["routes"][0]["route"]
        seen[cluster] = ([(c["name"], c["weight"]) for c in action["weighted_clusters"]["clusters"]]
                         if "weighted_clusters" in action else [(action["cluster"], 100)])
    assert seen == {"east": [("outbound|reviews.shop|v1", 80), ("outbound|reviews.shop|v2", 20)],
                    "west": [("outbound|reviews.shop|v1", 100)]}, seen


def test_waves_are_validated_with_file_and_line() -> None:
    bad = rollout_yaml(steps=[20, 100], approve="nope", waves=[
        {"clusters": ["east", "north"]}, {"clusters": ["east"], "approval": "manual"},
        {"clusters": ["central"], "bake": "soon"}])
    problems = sorted(str(p) for p in load(with_clusters(["east", "west", "central"], canary_in=["east", "west"],
                                                         rollout=bad)).problems)
    assert "rollout.yaml:23: spec.waves[2].bake: invalid duration 'soon': use a number and a unit, e.g. 250ms, 2s, " \
        "1m, 1h" in problems, problems
    bad = bad.replace("bake: soon", "bake: 5s")
    problems = sorted(str(p) for p in load(with_clusters(["east", "west", "central"], canary_in=["east", "west"],
                                                         rollout=bad)).problems)
    assert problems == [
        "rollout.yaml:13: spec.approve: approve 'nope' names no wave (an index from 0, or a name: 0, 1, 2)",
        "rollout.yaml:17: spec.waves[0].clusters[1]: unknown cluster 'north' (the Mesh has: central, east, west)",
        "rollout.yaml:19: spec.waves[1].clusters[0]: cluster 'east' is already in waves[0]; each cluster is in one "
        "wave",
        "rollout.yaml:22: spec.waves[2].clusters[0]: the canary 'v2' of 'reviews' does not run in cluster 'central': "
        "a wave there would judge nothing",
    ], problems
    warnings = [str(w) for w in load(with_clusters(["east", "west", "central"], canary_in=["east", "west"],
                                                   rollout=bad)).warnings]
    assert any("the canary runs in cluster 'west', which is in no wave" in w for w in warnings), warnings


def test_waves_need_the_canary_strategy() -> None:
    bad = rollout_yaml(strategy="mirror", waves=[{"clusters": ["east"]}])
    problems = [str(p) for p in load(with_clusters(["east"], rollout=bad)).problems]
    assert any("spec.waves: waves need strategy canary" in p for p in problems), problems


def test_the_write_back_removes_the_approval_with_the_canary() -> None:
    text = WAVES_ROLLOUT.replace("  canary: v2\n", "  canary: v2\n  approve: rest   # go\n")
    files = with_clusters(["east", "west"], rollout=text)
    assert load(files).ok, load(files).problems
    outcomes: tuple[Literal["promoted", "rolled-back"], ...] = ("promoted", "rolled-back")
    for outcome in outcomes:
        edited = edit_rollout(files, namespace="shop", name="reviews", outcome=outcome, canary="v2")
        assert edited is not None
        out = edited["rollout.yaml"].decode()
        assert "approve" not in out and "waves:" in out, out
        assert load({**files, **edited}).ok


def test_status_has_a_row_per_wave_and_cluster() -> None:
    s = spec(waves=[{"clusters": ["east"]}, {"clusters": ["west", "central"], "bake": "30s", "name": "rest"}])
    st = analyse(s, analyse(s, started(s), obs()).state, obs())
    record = {"spec": s.model_dump(mode="json", by_alias=True),
              "state": st.state.model_dump(mode="json", by_alias=True),
              "clusters": {"east": {"at": st.at, "checks": [c.model_dump(mode="json", by_alias=True)
                                                           for c in st.checks]}}}
    assert st.state.bake_until is not None
    out = summary(record["spec"], record, namespace="shop", name="reviews", now=st.state.bake_until - 12.5)
    assert out["wave"] == 1 and out["secondsToBake"] == 12.5 and out["weights"] == {"east": 100, "west": 0,
                                                                                     "central": 0}
    rows = [(w["index"], w["name"], w["state"], [(c["name"], c["weight"]) for c in w["clusters"]])
            for w in out["waves"]]
    assert rows == [(0, None, "passed", [("east", 100)]), (1, "rest", "baking", [("west", 0), ("central", 0)])]
    assert out["waves"][0]["clusters"][0]["checks"][0]["metric"] == "requests"
    text = format_summary(out)
    assert "waves[1] rest" in text and "baking 12.5s" in text and "[bake 30s]" in text, text
    assert "success@east: 100 (min 99) -> pass" in text and "west           0%  not judged yet" in text, text


def test_waves_removed_from_git_mid_run_give_the_one_weight_everywhere() -> None:
    s = spec()
    st = analyse(s, analyse(s, started(s), obs()).state, obs()).state
    assert st.weights == {"east": 100, "west": 20, "central": 20} and st.weight == 20
    flat = spec(waves=[])
    assert share(flat, st) == {"east": 20, "west": 20, "central": 20}
    d = analyse(flat, st, obs())
    assert d.action == "step" and share(flat, d.state) == {"east": 100, "west": 100, "central": 100}, d
