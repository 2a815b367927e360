"""Webhooks: validation with file:line, the gates and `rollout` hooks in the pure `advance`, and calls
against a real HTTP server on 127.0.0.1 (2xx, 403, refused, too slow)."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from reconciler.load import load
from reconciler.rollout.hooks import call_hooks
from rollouts.advance import HookAnswer, Observations, RolloutState, advance, gate_for, hooks_due
from rollouts.intent import RolloutSpec, WebhookSpec
from tests.fixtures.intents import with_rollout

T = 10_000.0
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
  interval: 10s
  webhooks:
    - {name: gate, type: confirm-promotion, url: "http://127.0.0.1:9000/gate", timeout: 5s, metadata: {team: shop}}
    - {name: load, type: rollout, url: "http://127.0.0.1:9000/load"}
"""


def test_webhooks_load() -> None:
    loaded = load(with_rollout(ROLLOUT))
    assert loaded.ok, loaded.problems


@pytest.mark.parametrize(("old", "new", "problem"), [
    ('url: "http://127.0.0.1:9000/load"', "url: /load",
     "rollout.yaml:13: spec.webhooks[1].url: url '/load' is not an http:// or https:// URL with a host"),
    ("name: load", "name: gate", "rollout.yaml:13: spec.webhooks[1].name: duplicate webhook 'gate'"),
    ("timeout: 5s", "timeout: 20s",
     "rollout.yaml:12: spec.webhooks[0].timeout: timeout 20s is not between 50ms and 10s"),
])
def test_webhook_errors_point_at_file_and_line(old: str, new: str, problem: str) -> None:
    assert old in ROLLOUT
    assert problem in [str(p) for p in load(with_rollout(ROLLOUT.replace(old, new))).problems]


def test_an_unknown_hook_type_is_a_located_error() -> None:
    problems = [str(p) for p in load(with_rollout(ROLLOUT.replace("type: rollout", "type: pre-deploy"))).problems]
    assert len(problems) == 1 and problems[0].startswith("rollout.yaml:13: spec.webhooks[1].type"), problems


def test_a_hook_slower_than_the_interval_is_a_warning() -> None:
    loaded = load(with_rollout(ROLLOUT.replace("interval: 10s", "interval: 4s")))
    assert loaded.ok and any("not shorter than the interval 4s" in str(w) for w in loaded.warnings), loaded.warnings


# --- in advance ------------------------------------------------------------------------------------


def spec(*hooks: dict[str, Any]) -> RolloutSpec:
    return RolloutSpec.model_validate({
        "service": "reviews", "stable": "v1", "canary": "v2", "steps": [10, 50, 100], "interval": "10s",
        "analysis": {"failureThreshold": 2, "minRequests": 20, "metrics": []},
        "webhooks": [{"url": "http://127.0.0.1:1/", **h} for h in hooks]})


def at(step: int, *, failed: int = 0) -> RolloutState:
    return RolloutState(phase="progressing", stable="v1", canary="v2", observed_canary="v2", step=step,
                        weight=[10, 50, 100][step], started_at=T - 60, next_analysis_at=T, failed_checks=failed)


def obs(**hooks: HookAnswer) -> Observations:
    return Observations(requests={"east": 300.0}, hooks=hooks)


OK, NO = HookAnswer(ok=True, detail="HTTP 200"), HookAnswer(ok=False, detail="HTTP 403 not yet")
GATE = {"name": "gate", "type": "confirm-promotion"}
STEP = {"name": "up", "type": "confirm-traffic-increase"}


@pytest.mark.parametrize(("step", "gate"), [(0, "confirm-traffic-increase"), (1, "confirm-traffic-increase"),
                                            (2, "confirm-promotion")])
def test_the_gate_is_the_next_transition(step: int, gate: str) -> None:
    s = spec(GATE, STEP, {"name": "load", "type": "rollout"})
    assert gate_for(s, at(step)) == gate
    assert gate_for(s, at(step).model_copy(update={"phase": "promoted"})) is None


def test_hooks_due_lists_rollout_hooks_and_the_gate_in_spec_order() -> None:
    s = spec(GATE, STEP, {"name": "load", "type": "rollout"})
    assert hooks_due(s, at(0)) == ["up", "load"]
    assert hooks_due(s, at(2)) == ["gate", "load"]


def test_a_closed_promotion_gate_holds_at_the_last_step_until_it_opens() -> None:
    s = spec(GATE)
    d = advance(s, at(2), obs(gate=NO), now=T)
    assert d.action == "hold" and d.state.step == 2 and d.state.weight == 100 and d.state.failed_checks == 0
    assert d.reasons[-1] == "waiting for confirm-promotion webhook: gate: HTTP 403 not yet"
    assert d.state.next_analysis_at == T + 10  # asked again next interval
    d = advance(s, d.state, obs(gate=NO), now=T + 10)
    assert d.action == "hold" and d.state.failed_checks == 0  # however long: never a failure, never a rollback
    d = advance(s, d.state, obs(gate=OK), now=T + 20)
    assert d.action == "promote" and d.state.stable == "v2"


def test_a_gate_not_called_is_closed_and_a_traffic_gate_holds_the_step() -> None:
    s = spec(GATE, STEP)
    d = advance(s, at(2), obs(), now=T)
    assert d.action == "hold" and "gate: not called" in d.reasons[-1]
    d = advance(s, at(0), obs(up=NO), now=T)
    assert d.action == "hold" and d.state.weight == 10 and "confirm-traffic-increase" in d.reasons[-1]
    d = advance(s, at(0), obs(up=OK, gate=NO), now=T)  # the promotion gate is not this transition's
    assert d.action == "step" and d.state.weight == 50


def test_a_failing_rollout_hook_is_a_failed_check() -> None:
    s = spec({"name": "load", "type": "rollout"})
    d = advance(s, at(0), obs(load=HookAnswer(ok=False, detail="unreachable: ConnectionError")), now=T)
    assert d.action == "hold" and d.state.failed_checks == 1
    check = d.checks[-1]
    assert (check.metric, check.result) == ("webhook/load", "fail")
    assert "webhook load: unreachable: ConnectionError" in d.reasons[0]
    d = advance(s, d.state, obs(), now=T + 10)  # not called at all: failed too
    assert d.action == "rollback"
    d = advance(s, at(0), obs(load=OK), now=T)
    assert d.action == "step" and d.checks[-1].result == "pass"


# --- calls -----------------------------------------------------------------------------------------


class Server:
    def __init__(self) -> None:
        self.status = 200
        self.delay = 0.0
        self.bodies: list[dict[str, Any]] = []
        self.url = ""


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            s.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            time.sleep(s.delay)
            body = b"not yet" if s.status >= 300 else b""
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the caller gave up (timeout)
                self.send_response(s.status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    s.url = f"http://127.0.0.1:{httpd.server_address[1]}/gate"
    yield s
    httpd.shutdown()
    httpd.server_close()


def hook(url: str, **kw: Any) -> WebhookSpec:
    return WebhookSpec.model_validate({"name": "gate", "type": "confirm-promotion", "url": url,
                                       "metadata": {"team": "shop"}, **kw})


def test_a_call_sends_the_run_and_the_metadata_and_reads_the_status(server: Server) -> None:
    assert call_hooks([hook(server.url)], namespace="shop", name="reviews", state=at(2)) == {
        "gate": HookAnswer(ok=True, detail="HTTP 200")}
    body = server.bodies[0]
    assert {k: body[k] for k in ("name", "namespace", "type", "canary", "stable", "step", "weight", "metadata")} == {
        "name": "reviews", "namespace": "shop", "type": "confirm-promotion", "canary": "v2", "stable": "v1",
        "step": 3, "weight": 100, "metadata": {"team": "shop"}}
    server.status = 403
    assert call_hooks([hook(server.url)], namespace="shop", name="reviews", state=at(2)) == {
        "gate": HookAnswer(ok=False, detail="HTTP 403 not yet")}


def test_a_refused_or_slow_hook_is_not_ok_within_its_timeout(server: Server) -> None:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        refused = f"http://127.0.0.1:{free.getsockname()[1]}/gate"
    t0 = time.monotonic()
    answer = call_hooks([hook(refused)], namespace="shop", name="reviews", state=at(2))["gate"]
    assert answer == HookAnswer(ok=False, detail="unreachable: ConnectionError")
    assert time.monotonic() - t0 < 2
    server.delay = 1.0
    t0 = time.monotonic()
    answer = call_hooks([hook(server.url, timeout="200ms")], namespace="shop", name="reviews", state=at(2))["gate"]
    assert answer == HookAnswer(ok=False, detail="no answer within 200ms")
    assert time.monotonic() - t0 < 0.9
    assert len(server.bodies) == 1  # a timeout is not retried (the server may be acting on it)


def test_a_manual_promote_does_not_ask_the_gate() -> None:
    d = advance(spec(GATE), at(2), obs(gate=NO), now=T, command="promote")
    assert d.action == "promote" and d.reasons[0] == "promoted by command"
