"""Calls of a Rollout's webhooks (Flagger's gates and `rollout` hooks): POST JSON, answer 2xx = ok.

Run in a worker thread next to the metric queries, never on the event loop. Failure policy: anything
but a 2xx within the hook's timeout (after one retry of a failed connection, tenacity) is "not ok": a
gate (confirm-*) stays closed and the run waits; a `rollout` or `pre-rollout` hook counts a failed check;
a `rollback` hook's "not ok" is its usual answer (only a 2xx rolls back); a `post-rollout` hook's is
logged and counted, and the outcome stands.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import requests
import tenacity

from rollouts.advance import HookAnswer, RolloutState
from rollouts.intent import WebhookSpec

log = logging.getLogger("lockgate.rollouts.hooks")
ATTEMPTS = 2


def hook_body(hook: WebhookSpec, *, namespace: str, name: str, state: RolloutState) -> dict[str, Any]:
    """What a hook is sent: which rollout, which gate, where the run is, and the hook's metadata."""
    return {"name": name, "namespace": namespace, "type": hook.type, "phase": state.phase, "canary": state.canary,
            "stable": state.stable, "step": state.step + 1, "weight": state.weight, "iteration": state.iteration,
            "failedChecks": state.failed_checks, "canaryRevision": state.canary_revision, "metadata": hook.metadata}


def call_hooks(hooks: Sequence[WebhookSpec], *, namespace: str, name: str,
               state: RolloutState) -> dict[str, HookAnswer]:
    """Every hook's answer, by name (one session; each call bounded by its own timeout)."""
    out: dict[str, HookAnswer] = {}
    with requests.Session() as session:
        session.trust_env = False  # a loopback hook is never reached through an HTTP_PROXY from the environment
        for hook in hooks:
            out[hook.name] = _call(session, hook, hook_body(hook, namespace=namespace, name=name, state=state))
    return out


def _call(session: requests.Session, hook: WebhookSpec, body: dict[str, Any]) -> HookAnswer:
    try:
        for attempt in tenacity.Retrying(stop=tenacity.stop_after_attempt(ATTEMPTS), wait=tenacity.wait_fixed(0.1),
                                         retry=tenacity.retry_if_exception_type(requests.ConnectionError),
                                         reraise=True):
            with attempt:
                resp = session.post(hook.url, json=body, timeout=hook.timeout_s)
    except requests.Timeout:
        return HookAnswer(ok=False, detail=f"no answer within {hook.timeout}")
    except requests.RequestException as exc:
        return HookAnswer(ok=False, detail=f"unreachable: {type(exc).__name__}")
    text = resp.text.strip().replace("\n", " ")[:120]
    detail = f"HTTP {resp.status_code}" + (f" {text}" if text else "")
    if not 200 <= resp.status_code < 300 and hook.type != "rollback":  # a rollback hook's usual answer
        log.info("webhook %s: %s", hook.name, detail)
    return HookAnswer(ok=200 <= resp.status_code < 300, detail=detail)
