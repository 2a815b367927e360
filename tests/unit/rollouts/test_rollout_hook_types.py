"""Flagger's other hook types in the pure core: `confirm-rollout` and `pre-rollout` before any traffic
moves, `rollback` (a 2xx rolls back), `post-rollout` (once after the outcome, never changing it)."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from mesh.intent import Destination
from reconciler.load import load
from rollouts.advance import (
    HookAnswer,
    Observations,
    RolloutState,
    advance,
    analysis_due,
    destinations,
    gate_for,
    hooks_due,
    needs_metrics,
)
from rollouts.intent import RolloutSpec
from rollouts.routing import CANARY_RULE, overlay
from tests.fixtures.intents import rollout_yaml, with_rollout

T = 10_000.0
OK, NO = HookAnswer(ok=True, detail="HTTP 200"), HookAnswer(ok=False, detail="HTTP 403 not yet")
DOWN = HookAnswer(ok=False, detail="unreachable: ConnectionError")
CONFIRM = {"name": "approve", "type": "confirm-rollout"}
PRE = {"name": "warm", "type": "pre-rollout"}
POST = {"name": "report", "type": "post-rollout"}
BACK = {"name": "undo", "type": "rollback"}
LOAD = {"name": "load", "type": "rollout"}


def spec(*hooks: dict[str, Any], strategy: str = "canary", threshold: int = 2) -> RolloutSpec:
    return RolloutSpec.model_validate({
        "service": "reviews", "stable": "v1", "canary": "v2", "steps": [10, 50, 100], "interval": "10s",
        "strategy": strategy, "iterations": 2,
        **({"match": [{"headers": {"x-canary": {"exact": "yes"}}}]} if strategy == "ab" else {}),
        "analysis": {"failureThreshold": threshold, "minRequests": 20, "metrics": []},
        "webhooks": [{"url": "http://127.0.0.1:1/", **h} for h in hooks]})


def begin(s: RolloutSpec) -> RolloutState:
    """The state right after Git set the canary (the first advance of a new run)."""
    d = advance(s, RolloutState(stable="v1"), None, now=T, revision="abc")
    assert d.action == "start"
    return d.state


def hooks(**answers: HookAnswer) -> Observations:
    """What the controller passes before traffic moves (or after the run): hook answers, no metrics."""
    return Observations(hooks=answers)


def analysis(**answers: HookAnswer) -> Observations:
    return Observations(requests={"east": 300.0}, hooks=answers)


def at(step: int) -> RolloutState:
    return RolloutState(phase="progressing", stable="v1", canary="v2", observed_canary="v2", step=step,
                        weight=[10, 50, 100][step], started_at=T - 60, next_analysis_at=T)


# --- which hooks are due when ----------------------------------------------------------------------

ALL = (CONFIRM, PRE, LOAD, {"name": "up", "type": "confirm-traffic-increase"},
       {"name": "gate", "type": "confirm-promotion"}, POST, BACK)


@pytest.mark.parametrize(("state", "due", "gate"), [
    (RolloutState(phase="progressing", stable="v1", canary="v2", waiting_for="confirm-rollout"),
     ["approve", "undo"], "confirm-rollout"),
    (RolloutState(phase="progressing", stable="v1", canary="v2", waiting_for="pre-rollout"), ["warm", "undo"], None),
    (at(0), ["load", "up", "undo"], "confirm-traffic-increase"),
    (at(2), ["load", "gate", "undo"], "confirm-promotion"),
    (RolloutState(phase="promoted", stable="v2", canary="v2", post_rollout_due=True), ["report"], None),
    (RolloutState(phase="rolled-back", stable="v1", canary="v2", post_rollout_due=True), ["report"], None),
    (RolloutState(phase="promoted", stable="v2", canary="v2"), [], None),
    (RolloutState(stable="v1"), [], None),
])
def test_hooks_due_and_the_gate_per_phase(state: RolloutState, due: list[str], gate: str | None) -> None:
    s = spec(*ALL)
    assert hooks_due(s, state) == due
    assert gate_for(s, state) == gate


def test_without_pre_traffic_hooks_a_run_moves_traffic_at_once() -> None:
    st = begin(spec(LOAD, POST, BACK))
    assert st.waiting_for is None and st.weight == 10 and st.next_analysis_at == T + 10


# --- confirm-rollout -------------------------------------------------------------------------------


def test_confirm_rollout_gates_the_start_and_no_traffic_moves_until_it_answers_2xx() -> None:
    s = spec(CONFIRM)
    st = begin(s)
    assert (st.phase, st.waiting_for, st.weight) == ("progressing", "confirm-rollout", 0)
    assert st.next_analysis_at == T and analysis_due(s, st, now=T) and not needs_metrics(st)  # asked at once
    assert destinations(s, st) == [Destination(version="v1", weight=100)]
    for i in range(5):  # however long it says no: never a failed check, never a rollback, no traffic
        d = advance(s, st, hooks(approve=NO), now=T + 10 * i)
        assert d.action == "hold" and d.state.failed_checks == 0 and d.state.weight == 0, d
        assert d.reasons == ("waiting for confirm-rollout webhook: approve: HTTP 403 not yet",)
        assert d.state.next_analysis_at == T + 10 * i + 10
        st = d.state
    d = advance(s, st, hooks(), now=T + 50)  # not called (e.g. the controller restarted): closed
    assert d.action == "hold" and "approve: not called" in d.reasons[0]
    d = advance(s, d.state, hooks(approve=OK), now=T + 60)
    assert d.action == "step" and d.state.weight == 10 and d.state.waiting_for is None, d
    assert d.reasons == ("confirm-rollout webhook approve: HTTP 200", "step 1/3: 10% to v2")
    assert d.state.next_analysis_at == T + 70 and needs_metrics(d.state)
    assert hooks_due(s, d.state) == []  # never asked again in this run


def test_confirm_rollout_keeps_an_ab_rule_out_of_the_routes() -> None:
    s = spec(CONFIRM, strategy="ab")
    loaded = load(with_rollout(rollout_yaml(strategy="ab", match=[{"headers": {"x-canary": {"exact": "yes"}}}],
                                            webhooks=[{"url": "http://127.0.0.1:1/", **CONFIRM}])))
    assert loaded.intent is not None, loaded.problems
    st = begin(s)
    rules = overlay(loaded.intent, {("shop", "reviews"): st}).routes[("shop", "reviews")].spec.http
    assert CANARY_RULE not in [r.name for r in rules]
    d = advance(s, st, hooks(approve=OK), now=T + 1)
    assert d.action == "step" and d.reasons[-1] == "requests matching spec.match go to v2"
    rules = overlay(loaded.intent, {("shop", "reviews"): d.state}).routes[("shop", "reviews")].spec.http
    assert CANARY_RULE in [r.name for r in rules]


# --- pre-rollout -----------------------------------------------------------------------------------


def test_pre_rollout_is_called_once_and_then_traffic_moves() -> None:
    s = spec(PRE, LOAD)
    st = begin(s)
    assert st.waiting_for == "pre-rollout" and st.weight == 0 and hooks_due(s, st) == ["warm"]
    d = advance(s, st, hooks(warm=OK), now=T)
    assert d.action == "step" and d.state.weight == 10 and d.state.failed_checks == 0
    assert d.reasons == ("pre-rollout webhook warm: HTTP 200", "step 1/3: 10% to v2")
    assert "warm" not in hooks_due(s, d.state)


@pytest.mark.parametrize(("threshold", "answers", "actions"), [
    (2, [DOWN, DOWN], ["hold", "rollback"]),
    (3, [DOWN, NO, DOWN], ["hold", "hold", "rollback"]),
    (2, [DOWN, OK], ["hold", "step"]),
    (1, [NO], ["rollback"]),
])
def test_a_failing_pre_rollout_retries_each_interval_and_rolls_back_at_the_threshold(
        threshold: int, answers: list[HookAnswer], actions: list[str]) -> None:
    s = spec(PRE, threshold=threshold)
    st = begin(s)
    got = []
    for i, answer in enumerate(answers):
        d = advance(s, st, hooks(warm=answer), now=T + 10 * i)
        got.append(d.action)
        if d.action == "hold":
            assert d.state.weight == 0 and d.state.next_analysis_at == T + 10 * i + 10
            assert d.reasons == (f"pre-rollout webhook failed ({i + 1}/{threshold}): warm: {answer.detail}",)
        st = d.state
    assert got == actions
    if actions[-1] == "rollback":
        assert st.phase == "rolled-back" and st.stable == "v1" and st.failed_checks == threshold
        assert d.reasons[0].startswith(f"pre-rollout webhook failed ({threshold}/{threshold}): warm: ")
    else:
        assert st.weight == 10 and st.failed_checks == 1  # one failed check in this run, as Flagger counts


def test_confirm_rollout_then_pre_rollout_then_the_first_step() -> None:
    s = spec(PRE, CONFIRM)
    st = begin(s)
    assert st.waiting_for == "confirm-rollout" and hooks_due(s, st) == ["approve"]
    d = advance(s, st, hooks(approve=OK), now=T)
    assert d.action == "hold" and d.state.waiting_for == "pre-rollout" and d.state.weight == 0
    assert d.state.next_analysis_at == T  # the pre-rollout hooks are called at the next tick
    assert d.reasons == ("confirm-rollout webhook approve: HTTP 200",
                         "calling the pre-rollout webhooks before any traffic moves")
    d = advance(s, d.state, hooks(warm=OK), now=T + 0.2)
    assert d.action == "step" and d.state.weight == 10


# --- rollback --------------------------------------------------------------------------------------


@pytest.mark.parametrize("state", [at(0), at(2), RolloutState(phase="progressing", stable="v1", canary="v2",
                                                              observed_canary="v2", waiting_for="confirm-rollout",
                                                              next_analysis_at=T)])
def test_a_rollback_hook_answering_2xx_rolls_back_at_the_next_tick(state: RolloutState) -> None:
    s = spec(BACK, CONFIRM, LOAD)
    assert "undo" in hooks_due(s, state)
    d = advance(s, state, analysis(undo=HookAnswer(ok=True, detail="HTTP 200 roll it back"), load=OK, approve=OK),
                now=T)
    assert d.action == "rollback" and d.state.stable == "v1" and d.state.phase == "rolled-back"
    assert d.reasons[0] == "rollback webhook answered 2xx (a manual rollback): undo: HTTP 200 roll it back"


@pytest.mark.parametrize("answer", [HookAnswer(ok=False, detail="HTTP 404"), DOWN, None])
def test_a_rollback_hook_not_answering_2xx_changes_nothing(answer: HookAnswer | None) -> None:
    s = spec(BACK)
    d = advance(s, at(0), analysis(**({"undo": answer} if answer else {})), now=T)
    assert d.action == "step" and d.state.failed_checks == 0 and d.state.weight == 50


def test_a_rollback_hook_rolls_back_even_with_the_metrics_provider_offline() -> None:
    d = advance(spec(BACK), at(1), Observations(online=False, hooks={"undo": OK}), now=T)
    assert d.action == "rollback"


# --- post-rollout ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("obs", "command", "outcome"), [
    (analysis(), None, "promoted"),
    (None, "abort", "rolled-back"),
    (None, "promote", "promoted"),
])
def test_post_rollout_is_due_once_after_either_outcome_and_never_changes_it(
        obs: Observations | None, command: Any, outcome: str) -> None:
    s = spec(POST)
    d = advance(s, at(2), obs, now=T, command=command)
    assert d.state.phase == outcome and d.state.post_rollout_due
    done = d.state
    assert analysis_due(s, done, now=T) and not needs_metrics(done) and hooks_due(s, done) == ["report"]
    failed = advance(s, done, hooks(report=HookAnswer(ok=False, detail="HTTP 500 boom")), now=T + 1)
    assert failed.action == "none" and failed.outcome is None
    assert failed.state == done.model_copy(update={"post_rollout_due": False})  # the outcome stands, as it was
    assert failed.reasons == (f"post-rollout webhook failed (the {outcome} outcome stands): report: HTTP 500 boom",)
    assert not analysis_due(s, failed.state, now=T + 2) and hooks_due(s, failed.state) == []
    passed = advance(s, done, hooks(report=OK), now=T + 1)
    assert passed.reasons == ("post-rollout webhook report: HTTP 200",) and not passed.state.post_rollout_due


def test_post_rollout_survives_the_write_back_and_is_not_due_without_a_hook() -> None:
    s = spec(POST)
    done = advance(s, at(2), analysis(), now=T).state
    written = s.model_copy(update={"stable": "v2", "canary": None})  # what the write-back commits
    d = advance(written, done, None, now=T + 1)
    assert d.state.post_rollout_due and d.state.phase == "promoted"
    assert not advance(spec(), at(2), analysis(), now=T).state.post_rollout_due
    assert not analysis_due(spec(), RolloutState(phase="promoted", stable="v2", canary="v2"), now=T)


# --- validation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["confirm-rollout", "pre-rollout", "post-rollout", "rollback"])
def test_every_flagger_hook_type_loads(kind: str) -> None:
    loaded = load(with_rollout(rollout_yaml(webhooks=[{"name": "h", "type": kind, "url": "http://127.0.0.1:1/"}])))
    assert loaded.ok, loaded.problems


# --- the controller calls them ---------------------------------------------------------------------


def test_the_controller_gates_the_start_calls_post_rollout_once_and_counts_every_call(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Real hooks on 127.0.0.1: confirm-rollout answers 403 (no traffic moves, no metrics queried), then
    200 (the first step); after an abort the post-rollout hook (500) is called once, and the outcome stands."""
    import reconciler.rollout.controller as controller
    from reconciler.rollout.commands import format_summary, send_command, summary
    from reconciler.rollout.controller import RolloutController
    from reconciler.source.git import Pygit2Source, init_repo
    from tests.fixtures.intents import TEMPLATE
    from tests.fixtures.runtime import FakeRuntime

    status = {"/approve": 403, "/report": 500}
    calls: list[tuple[str, dict[str, Any]]] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            calls.append((self.path, json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
            self.send_response(status[self.path])
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    text = rollout_yaml(interval="500ms", writeBack="off", webhooks=[
        {"name": "approve", "type": "confirm-rollout", "url": f"{url}/approve", "timeout": "200ms"},
        {"name": "report", "type": "post-rollout", "url": f"{url}/report", "timeout": "200ms"}])
    loaded = load(with_rollout(text))
    assert loaded.ok and loaded.intent is not None, loaded.problems
    repo = tmp_path / "repo"
    init_repo(repo, template=TEMPLATE)
    source = Pygit2Source.open(str(repo))
    runtime = FakeRuntime()
    changes: list[int] = []
    key = ("shop", "reviews")
    observed: list[dict[str, Any]] = []
    real_observe = controller.observe

    def observe(**kw: Any) -> Observations:
        observed.append(kw)
        return real_observe(**kw)

    monkeypatch.setattr(controller, "observe", observe)

    async def main() -> None:
        ctl = RolloutController(state_dir=tmp_path / "state", source=source, runtime=runtime,
                                on_change=lambda: changes.append(ctl.states[key].weight))
        ctl.on_revision(loaded.intent, source.head() or "")
        await ctl.tick()
        assert ctl.states[key].waiting_for == "confirm-rollout" and ctl.states[key].weight == 0
        await ctl.tick()  # due at once: the gate is asked, and says no
        assert [p for p, _ in calls] == ["/approve"] and calls[0][1]["type"] == "confirm-rollout"
        assert ctl.records[key]["lastDecision"]["reasons"] == ["waiting for confirm-rollout webhook: approve: HTTP 403"]
        status["/approve"] = 200
        while ctl.states[key].weight == 0:  # asked again an interval later
            assert len(calls) < 5
            await asyncio.sleep(0.1)
            await ctl.tick()
        assert ctl.states[key].weight == 10 and changes[-1] == 10 and set(changes) == {0, 10}
        assert ctl.records[key]["webhooks"]["approve"]["calls"] == 2
        assert observed == []  # nothing measured before traffic moved
        send_command(tmp_path / "state", namespace="shop", name="reviews", command="abort")
        await ctl.tick()
        assert ctl.states[key].phase == "rolled-back" and ctl.states[key].post_rollout_due
        await ctl.tick()
        await ctl.tick()
        assert [p for p, _ in calls].count("/report") == 1 and calls[-1][1]["phase"] == "rolled-back"
        st = ctl.states[key]
        assert st.phase == "rolled-back" and not st.post_rollout_due and st.stable == "v1"
        s = summary(ctl.records[key]["spec"], ctl.records[key], namespace="shop", name="reviews")
        assert s["webhooks"]["report"] == {**s["webhooks"]["report"], "type": "post-rollout", "calls": 1,
                                           "not2xx": 1, "last": "HTTP 500"}
        assert s["webhooks"]["approve"]["not2xx"] == 1
        assert "report (post-rollout) called 1, not 2xx 1, last HTTP 500" in format_summary(s)
        await ctl.close()

    try:
        asyncio.run(main())
    finally:
        httpd.shutdown()
        httpd.server_close()
