"""Notifications: validation with file:line, the JSON and Slack payloads (pure), and delivery against real
HTTP sinks on 127.0.0.1: in order, and a sink that is down, slow or failing never holds the sender."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

import reconciler.rollout.notify as mod
from reconciler.load import load
from reconciler.rollout.notify import Notifier, SinkStats
from rollouts.advance import Check, CheckComparison, Decision, RolloutState
from rollouts.intent import NotificationSpec
from rollouts.notify import event, payload, slack
from tests.fixtures.intents import TEMPLATE, with_rollout

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
  notifications:
    - {name: ops, type: webhook, url: "http://127.0.0.1:9000/events"}
    - {name: chat, type: slack, url: "https://hooks.example.com/T0/B0/x", timeout: 1s}
"""
KEY = ("shop", "reviews")


def files(rollout: str) -> dict[str, bytes]:
    return with_rollout(rollout)


def test_notifications_load() -> None:
    assert load(files(ROLLOUT)).ok


@pytest.mark.parametrize(("old", "new", "problem"), [
    ('url: "http://127.0.0.1:9000/events"', "url: ftp://x/y",
     "rollout.yaml:11: spec.notifications[0].url: url 'ftp://x/y' is not an http:// or https:// URL with a host"),
    ("name: chat", "name: ops", "rollout.yaml:12: spec.notifications[1].name: duplicate notification 'ops'"),
    ("timeout: 1s", "timeout: 30s",
     "rollout.yaml:12: spec.notifications[1].timeout: timeout 30s is not between 50ms and 10s"),
])
def test_notification_errors_point_at_file_and_line(old: str, new: str, problem: str) -> None:
    assert old in ROLLOUT
    assert [str(p) for p in load(files(ROLLOUT.replace(old, new))).problems] == [problem]


def decision() -> Decision:
    st = RolloutState(phase="rolled-back", stable="v1", canary="v2", observed_canary="v2", canary_revision="c" * 40,
                      weight=0, failed_checks=2)
    check = Check(metric="latency", cluster="east", value=4.0, requests=300.0, result="fail", effective="fail",
                  detail="latency vs stable: significantly higher",
                  comparison=CheckComparison(baseline="stable", test="mann-whitney", statistic=36.0, p_value=0.001,
                                             effect=4.0, relative=1.3, n_canary=6, n_baseline=6, why="higher"))
    return Decision(action="rollback", state=st, at=1795000000.0, checks=(check,),
                    reasons=("analysis failed (2/2): latency vs stable: significantly higher",
                             "rolled back: 100% to v1"))


def test_the_json_event_has_rollout_cluster_action_reasons_and_numbers() -> None:
    body = event(namespace="shop", name="reviews", decision=decision(), clusters=["east"])
    assert {k: body[k] for k in ("rollout", "clusters", "action", "phase", "stable", "canary", "weight",
                                 "failedChecks")} == {
        "rollout": "shop/reviews", "clusters": ["east"], "action": "rollback", "phase": "rolled-back",
        "stable": "v1", "canary": "v2", "weight": 0, "failedChecks": 2}
    assert body["reasons"][1] == "rolled back: 100% to v1"
    assert body["checks"][0]["comparison"]["pValue"] == 0.001
    json.dumps(body, allow_nan=False)
    assert payload(NotificationSpec(name="a", url="http://x/"), body) is body


def test_the_slack_message_is_one_text_with_headline_reasons_and_checks() -> None:
    body = event(namespace="shop", name="reviews", decision=decision(), clusters=["east", "west"])
    msg = slack(body)
    assert set(msg) == {"text"}
    lines = msg["text"].splitlines()
    assert lines[0] == ":rewind: *rollout shop/reviews*: rollback (canary v2 at 0%, stable v1; east, west)"
    assert lines[1] == "• analysis failed (2/2): latency vs stable: significantly higher"
    assert "latency@east: vs stable: Mann-Whitney U=36 p=0.001" in msg["text"]
    assert payload(NotificationSpec(name="a", type="slack", url="http://x/"), body) == msg


# --- delivery --------------------------------------------------------------------------------------


class Sink:
    def __init__(self) -> None:
        self.got: list[dict[str, Any]] = []
        self.status = 200
        self.delay = 0.0
        self.url = ""


@contextlib.asynccontextmanager
async def sink() -> AsyncIterator[Sink]:
    """An HTTP sink on 127.0.0.1 recording every JSON body it is posted."""
    s = Sink()

    async def handle(request: web.Request) -> web.Response:
        if s.delay:
            await asyncio.sleep(s.delay)
        s.got.append(await request.json())
        return web.Response(status=s.status)

    app = web.Application()
    app.router.add_post("/events", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    s.url = f"http://127.0.0.1:{port}/events"
    yield s
    await runner.cleanup()


def refused_url() -> str:
    with socket.socket() as sock:  # a port just freed: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/events"


async def wait_until(check: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_events_arrive_in_order_and_are_counted() -> None:
    async def main() -> None:
        results: list[tuple[str, int, int]] = []
        async with sink() as s:
            n = Notifier(on_result=lambda _k, name, st: results.append((name, st.sent, st.failed)))
            spec = NotificationSpec(name="ops", url=s.url)
            for action in ("start", "step", "step", "promote"):
                n.send(KEY, [spec], {"action": action})
            await wait_until(lambda: len(s.got) == 4)
            assert [b["action"] for b in s.got] == ["start", "step", "step", "promote"]
            await wait_until(lambda: n.stats(KEY)["ops"].sent == 4)
            assert results[-1] == ("ops", 4, 0)
            await n.close()
    run(main())


def test_a_refused_sink_never_holds_the_sender_and_counts_failures() -> None:
    async def main() -> None:
        async with sink() as s:
            n = Notifier()
            down = NotificationSpec(name="down", url=refused_url(), timeout="1s")
            up = NotificationSpec(name="up", url=s.url)
            t0 = time.monotonic()
            for action in ("start", "step", "rollback"):
                n.send(KEY, [down, up], {"action": action})
            assert time.monotonic() - t0 < 0.05  # send only enqueues
            await wait_until(lambda: len(s.got) == 3 and n.stats(KEY)["down"].failed == 3)
            stats = n.stats(KEY)
            assert (stats["down"].sent, stats["up"].sent, stats["up"].failed) == (0, 3, 0)
            assert stats["down"].last_error is not None and "onnect" in stats["down"].last_error
            await n.close()
    run(main())


def test_a_slow_or_failing_sink_times_out_and_a_full_queue_drops_the_oldest() -> None:
    async def main() -> None:
        async with sink() as s:
            s.delay = 0.5
            n = Notifier()
            slow = NotificationSpec(name="slow", url=s.url, timeout="100ms")
            n.send(KEY, [slow], {"action": "start"})
            await wait_until(lambda: n.stats(KEY)["slow"].failed == 1)
            assert n.stats(KEY)["slow"].last_error == "Timeout: no answer within 100ms"
            s.delay, s.status = 0.0, 503
            n.send(KEY, [slow], {"action": "step"})
            await wait_until(lambda: n.stats(KEY)["slow"].failed == 2)
            assert n.stats(KEY)["slow"].last_error == "ValueError: HTTP 503"
            await n.close()

            s.delay, s.status = 1.0, 200
            small = Notifier()
            old, mod.QUEUE = mod.QUEUE, 2
            try:
                spec = NotificationSpec(name="q", url=s.url, timeout="2s")
                for i in range(5):
                    small.send(KEY, [spec], {"i": i})
                    await asyncio.sleep(0)  # the sender takes the first one
                assert small.stats(KEY)["q"].dropped == 2  # 0 in flight, 1 and 2 dropped, 3 and 4 queued
            finally:
                mod.QUEUE = old
                await small.close(timeout=0.1)
    run(main())


def test_stats_json() -> None:
    assert SinkStats(sent=1).as_json() == {"sent": 1, "failed": 0, "dropped": 0, "lastError": None, "lastAt": None}


def test_the_controller_sends_each_decision_and_counts_a_down_sink_in_status(tmp_path: Path) -> None:
    """A run starts: the start event reaches the sink that is up, the one that refuses counts a failure in
    the rollout's status, and the tick that decided did not wait for either."""
    from reconciler.rollout.commands import format_summary, summary
    from reconciler.rollout.controller import RolloutController
    from reconciler.source.git import Pygit2Source, init_repo
    from reconciler.state import read_json
    from tests.fixtures.runtime import FakeRuntime

    repo = tmp_path / "repo"
    init_repo(repo, template=TEMPLATE)
    source = Pygit2Source.open(str(repo))

    async def main() -> None:
        async with sink() as s:
            s.delay = 1.0
            text = ROLLOUT.replace('url: "http://127.0.0.1:9000/events"', f'url: "{s.url}"').replace(
                "https://hooks.example.com/T0/B0/x", refused_url())
            loaded = load(files(text))
            assert loaded.ok and loaded.intent is not None, loaded.problems
            ctl = RolloutController(state_dir=tmp_path / "state", source=source, runtime=FakeRuntime(),
                                    on_change=lambda: None)
            ctl.on_revision(loaded.intent, source.head() or "")
            t0 = time.monotonic()
            await ctl.tick()
            assert time.monotonic() - t0 < 0.5  # the sink answers after 1 s: the tick did not wait
            await wait_until(lambda: len(s.got) == 1 and "chat" in ctl.records[KEY].get("notifications", {}))
            assert s.got[0]["action"] == "start" and s.got[0]["rollout"] == "shop/reviews"
            await wait_until(lambda: ctl.records[KEY]["notifications"].get("ops", {}).get("sent") == 1)
            saved = read_json(tmp_path / "state" / "rollouts" / "shop.reviews.json")
            status = summary(saved["spec"], saved, namespace="shop", name="reviews")
            assert status["notifications"]["ops"]["sent"] == 1
            assert status["notifications"]["chat"]["failed"] == 1 and status["notifications"]["chat"]["sent"] == 0
            assert status["phase"] == "progressing"
            human = format_summary(status)
            assert "  notifications: chat sent 0 failed 1 dropped 0 (ClientConnectorError: " in human, human
            assert "; ops sent 1 failed 0 dropped 0" in human, human
            await ctl.close()
    run(main())


# --- Mesh-wide sinks -------------------------------------------------------------------------------


def mesh_with(sinks: str) -> dict[str, bytes]:
    """The template with `sinks` (YAML list items, indented 4) as Mesh.spec.notifications: mesh.yaml line 11 on."""
    f = files(ROLLOUT)
    f["mesh.yaml"] = f["mesh.yaml"] + b"  notifications:\n" + sinks.encode()
    return f


def n(name: str, url: str = "http://127.0.0.1:9000/events", **kw: Any) -> NotificationSpec:
    return NotificationSpec.model_validate({"name": name, "url": url, **kw})


@pytest.mark.parametrize(("mesh", "own", "expected"), [
    ([], [n("ops")], [n("ops")]),
    ([n("all")], [], [n("all")]),
    ([n("all")], [n("ops")], [n("all"), n("ops")]),
    ([n("ops"), n("all")], [n("ops")], [n("all"), n("ops")]),  # named in both: once
    ([n("ops", "http://a/")], [n("ops", "http://b/", type="slack")], [n("ops", "http://b/", type="slack")]),
])
def test_a_rollout_goes_to_the_mesh_sinks_and_its_own_each_name_once(
        mesh: list[NotificationSpec], own: list[NotificationSpec], expected: list[NotificationSpec]) -> None:
    from rollouts.notify import sinks_for

    assert sinks_for(mesh, own) == expected


def test_mesh_sinks_load_and_are_checked_like_a_rollouts() -> None:
    assert load(mesh_with('    - {name: all, type: slack, url: "https://hooks.example.com/T/B/x"}\n')).ok
    bad = mesh_with("    - {name: all, url: ftp://x/y}\n    - {name: all, url: 'http://127.0.0.1:1/', timeout: 20s}\n")
    problems = [str(p) for p in load(bad).problems]
    assert problems == [
        "mesh.yaml:11: spec.notifications[0].url: url 'ftp://x/y' is not an http:// or https:// URL with a host",
        "mesh.yaml:12: spec.notifications[1].name: duplicate notification 'all'",
        "mesh.yaml:12: spec.notifications[1].timeout: timeout 20s is not between 50ms and 10s"], problems


def test_a_rollout_sink_set_differently_from_the_mesh_one_of_its_name_is_a_warning() -> None:
    def sink_warnings(loaded: Any) -> list[str]:
        return [str(w) for w in loaded.warnings if "notifications" in str(w)]

    same = load(mesh_with('    - {name: ops, type: webhook, url: "http://127.0.0.1:9000/events"}\n'))
    assert same.ok and sink_warnings(same) == [], same.warnings
    other = load(mesh_with('    - {name: ops, url: "http://127.0.0.1:9001/all"}\n'))
    assert other.ok and sink_warnings(other) == [
        "rollout.yaml:11: warning: spec.notifications[0].name: notification 'ops' is also a Mesh-wide sink, set "
        "differently: this Rollout's decisions go to this one only"], other.warnings


def test_the_controller_sends_to_mesh_sinks_too_and_a_sink_in_both_once(tmp_path: Path) -> None:
    from reconciler.rollout.controller import RolloutController
    from reconciler.source.git import Pygit2Source, init_repo
    from tests.fixtures.runtime import FakeRuntime

    repo = tmp_path / "repo"
    init_repo(repo, template=TEMPLATE)
    source = Pygit2Source.open(str(repo))

    async def main() -> None:
        async with sink() as ops, sink() as wide:
            text = ROLLOUT.replace('url: "http://127.0.0.1:9000/events"', f'url: "{ops.url}"').replace(
                "https://hooks.example.com/T0/B0/x", refused_url())
            f = with_rollout(text)
            f["mesh.yaml"] += (f"  notifications:\n    - {{name: ops, url: '{ops.url}'}}\n"
                               f"    - {{name: all, url: '{wide.url}', timeout: 1s}}\n").encode()
            loaded = load(f)
            assert loaded.ok and loaded.intent is not None, loaded.problems
            ctl = RolloutController(state_dir=tmp_path / "state", source=source, runtime=FakeRuntime(),
                                    on_change=lambda: None)
            ctl.on_revision(loaded.intent, source.head() or "")
            await ctl.tick()
            await wait_until(lambda: len(wide.got) == 1 and len(ops.got) == 1
                             and set(ctl.records[KEY].get("notifications", {})) == {"ops", "chat", "all"})
            await asyncio.sleep(0.2)  # a second delivery to `ops` would have arrived by now
            assert len(ops.got) == 1 and wide.got[0]["action"] == "start" == ops.got[0]["action"]
            assert wide.got[0]["rollout"] == "shop/reviews"
            assert ctl.records[KEY]["notifications"]["all"]["sent"] == 1
            await ctl.close()
    run(main())
