"""lockgate's own metric: each rollout's canary weight, as a gauge Prometheus scrapes.

Envoy's stats say what each version served; only lockgate knows what it *decided*: the weight a run has
reached. The dashboard draws it over time beside the traffic. The numbers come from the rollout state
files the controller writes atomically before acting on a decision (`STATE/rollouts/NS.NAME.json`), so the
gauge shows exactly what the mesh was told, and reading it needs nothing from the running controller.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from reconciler.state import ROLLOUTS_DIR

WEIGHT_METRIC = "lockgate_rollout_canary_weight"
_HELP = ("Percent of the default rule's traffic the rollout's canary gets now, as lockgate decided it "
         "(0 between runs)")


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def weight(state: Mapping[str, Any]) -> int:
    """The canary's share now: the state's weight while a run progresses, 0 otherwise (after a promotion
    the promoted version is the stable one, and the state keeps its last weight only for the record)."""
    if state.get("phase") != "progressing":
        return 0
    value = state.get("weight", 0)
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


def exposition(records: Iterable[Mapping[str, Any]], *, cluster: str | None = None) -> str:
    """Prometheus text format (0.0.4) of one gauge sample per rollout record.

    `cluster` adds the label itself; leave it out where the scrape target already carries `cluster` (the
    local runtime's discovery does), or Prometheus would rename ours to `exported_cluster`."""
    lines = [f"# HELP {WEIGHT_METRIC} {_HELP}", f"# TYPE {WEIGHT_METRIC} gauge"]
    for record in sorted(records, key=lambda r: (str(r.get("namespace")), str(r.get("name")))):
        state = record.get("state")
        if not isinstance(state, Mapping) or not record.get("name"):
            continue
        labels = {"namespace": str(record.get("namespace", "")), "rollout": str(record["name"]),
                  "service": str(record.get("service") or ""), "canary": str(state.get("canary") or "")}
        if cluster is not None:
            labels["cluster"] = cluster
        text = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
        lines.append(f"{WEIGHT_METRIC}{{{text}}} {weight(state)}")
    return "\n".join(lines) + "\n"


def read_records(state_dir: Path) -> list[dict[str, Any]]:
    """Every rollout state record under the state dir; one being replaced or unreadable is skipped (the
    next scrape, a second later, reads it)."""
    out: list[dict[str, Any]] = []
    for path in sorted((state_dir / ROLLOUTS_DIR).glob("*.json")):
        with contextlib.suppress(OSError, ValueError):
            record = json.loads(path.read_text())
            if isinstance(record, dict):
                out.append(record)
    return out


def read_exposition(state_dir: Path, *, cluster: str | None = None) -> str:
    """`exposition` of the state dir's rollouts: what `GET /metrics` answers."""
    return exposition(read_records(state_dir), cluster=cluster)
