"""Notification payloads for a rollout decision. Pure: a decision in, the JSON a sink receives out.

`event` is the generic webhook's body (every number a receiver may act on); `slack` turns it into a
Slack-compatible incoming-webhook message (`text`, mrkdwn), which Mattermost and Rocket.Chat accept too.
`sinks_for` says where one rollout's decisions go: the Mesh-wide sinks and its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rollouts.advance import Check, Decision
from rollouts.intent import NotificationSpec
from rollouts.writeback import format_check

EVENT_VERSION = 1
"""Bumped only if a field changes meaning; fields are only ever added."""


def event(*, namespace: str, name: str, decision: Decision, clusters: Sequence[str]) -> dict[str, Any]:
    """The generic JSON webhook body for one decision."""
    st = decision.state
    return {
        "version": EVENT_VERSION, "rollout": f"{namespace}/{name}", "namespace": namespace, "name": name,
        "clusters": list(clusters), "action": decision.action, "phase": st.phase, "at": decision.at,
        "stable": st.stable, "canary": st.canary, "step": st.step + 1 if st.phase == "progressing" else None,
        "weight": st.weight, "iteration": st.iteration, "failedChecks": st.failed_checks,
        "canaryRevision": st.canary_revision, "reasons": list(decision.reasons),
        "checks": [c.model_dump(mode="json", by_alias=True) for c in decision.checks],
    }


_ICON = {"start": ":rocket:", "step": ":arrow_up:", "promote": ":white_check_mark:", "rollback": ":rewind:",
         "hold": ":pause_button:", "pause": ":double_vertical_bar:", "resume": ":arrow_forward:", "reset": ":x:",
         "wave": ":ocean:", "approve": ":ok_hand:"}


def slack(body: dict[str, Any]) -> dict[str, Any]:
    """A Slack incoming-webhook message for `event`'s body: one headline, then reasons and checks."""
    where = ", ".join(body["clusters"]) or "no cluster"
    head = (f"{_ICON.get(body['action'], ':information_source:')} *rollout {body['rollout']}*: {body['action']} "
            f"(canary {body['canary'] or '-'} at {body['weight']}%, stable {body['stable']}; {where})")
    lines = [head, *(f"• {r}" for r in body["reasons"])]
    checks = [format_check(Check.model_validate(c)) for c in body["checks"]]
    if checks:
        lines.append("```" + "\n".join(checks) + "```")
    return {"text": "\n".join(lines)}


def sinks_for(mesh: Sequence[NotificationSpec], own: Sequence[NotificationSpec]) -> list[NotificationSpec]:
    """The Mesh-wide sinks, then the Rollout's own; a name in both is one sink (the Rollout's, the more
    specific), so it gets each decision once."""
    mine = {n.name for n in own}
    return [n for n in mesh if n.name not in mine] + list(own)


def payload(sink: NotificationSpec, body: dict[str, Any]) -> dict[str, Any]:
    return slack(body) if sink.type == "slack" else body
