"""`lockgate rollout status --watch` without --json: one plain line per change when stdout is not a terminal
(logs, pipes), a rich table on a terminal (rich is optional: the screen is redrawn without it)."""

from __future__ import annotations

import io

from reconciler.cli.rollout import plain_line, rich_table
from reconciler.rollout.commands import summary

SPEC = {"service": "reviews", "stable": "v1", "canary": "v2", "strategy": "canary", "steps": [20, 50, 100],
        "interval": "3s", "analysis": {"failureThreshold": 2}}
RECORD = {"state": {"phase": "progressing", "stable": "v1", "canary": "v2", "step": 1, "weight": 50,
                    "canaryRevision": "c" * 40, "startedAt": 100.0, "failedChecks": 0},
          "lastDecision": {"action": "step", "at": 110.0, "reasons": ["analysis passed: success-rate 100 >= 99"],
                           "checks": [{"metric": "success-rate", "cluster": "east", "value": 100.0, "min": 99.0,
                                       "max": None, "result": "pass", "effective": "pass"},
                                      {"metric": "latency", "cluster": "east", "value": None, "min": None,
                                       "max": 500.0, "result": "no-data", "effective": "pass"}]}}


def test_a_plain_line_says_where_the_run_is_and_why() -> None:
    s = summary(SPEC, RECORD, namespace="shop", name="reviews", now=111.0)
    line = plain_line(s, now=111.0)
    assert "\n" not in line and "\033" not in line
    assert "shop/reviews progressing weight 50% step 2/3 canary v2 (stable v1)" in line
    assert "last step: analysis passed: success-rate 100 >= 99" in line


def test_the_rich_table_shows_each_metric_against_its_bound() -> None:
    from rich.console import Console

    out = io.StringIO()
    Console(file=out, width=140, force_terminal=False, color_system=None).print(
        rich_table(summary(SPEC, RECORD, namespace="shop", name="reviews", now=111.0)))
    text = out.getvalue()
    assert "rollout shop/reviews" in text and "weight 50% to v2" in text and "step 2/3" in text
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if line.count("│") >= 5}
    assert "min 99" in rows["success-rate"] and "pass" in rows["success-rate"]
    assert "max 500" in rows["latency"] and "no values" in rows["latency"] and "no-data" in rows["latency"]
    assert "last decision: step: analysis passed" in text
