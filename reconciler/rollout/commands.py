"""Rollout control files and the rollout status contract, shared by the CLI and the controller.

Control commands reach a running `lockgate up` as files: `lockgate rollout promote NAME` writes
`<state-dir>/rollouts/commands/<id>.json` atomically; the controller applies it on its next tick,
records `lastCommand` in the rollout's state file, then deletes the command file. `summary` is the
`rollout status --json` contract (fields are only ever added).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

from reconciler.state import ROLLOUTS_DIR as ROLLOUTS_DIR  # re-exported: where the controller and the CLI look
from reconciler.state import write_json
from rollouts.advance import Check, Command
from rollouts.writeback import format_check

COMMANDS_DIR = "commands"
DECISIONS_FILE = "decisions.jsonl"


def state_path(state_dir: Path, namespace: str, name: str) -> Path:
    return state_dir / ROLLOUTS_DIR / f"{namespace}.{name}.json"


def send_command(state_dir: Path, *, namespace: str, name: str, command: Command) -> str:
    """Queue a command for the running `lockgate up`; returns its id (acknowledged in the state file)."""
    cid = f"{time.time_ns()}-{uuid.uuid4().hex[:8]}"
    write_json(state_dir / ROLLOUTS_DIR / COMMANDS_DIR / f"{cid}.json",
               {"id": cid, "namespace": namespace, "name": name, "command": command, "at": time.time()})
    return cid


def summary(spec: dict[str, Any], record: dict[str, Any], *, namespace: str, name: str,
            now: float | None = None) -> dict[str, Any]:
    """The `rollout status --json` / status.json contract for one rollout.

    A finished run's `phase` (promoted | rolled-back) and `finishedAt` come from the persisted state, which
    `advance` keeps through the write-back commit until the next run starts (then progressing, no finishedAt).
    """
    now = time.time() if now is None else now
    st = record.get("state", {})
    last = record.get("lastDecision") or {}
    steps = spec.get("steps", [])
    nxt = st.get("nextAnalysisAt")
    return {
        "name": name, "namespace": namespace, "service": spec.get("service"), "strategy": spec.get("strategy"),
        "phase": st.get("phase", "idle"), "stable": st.get("stable", spec.get("stable")),
        "canary": st.get("canary"), "canaryRevision": st.get("canaryRevision"),
        "step": st.get("step", 0) + 1 if st.get("phase") == "progressing" else None, "steps": steps,
        "weight": st.get("weight", 0), "iteration": st.get("iteration", 0), "iterations": spec.get("iterations"),
        "failedChecks": st.get("failedChecks", 0),
        "failureThreshold": spec.get("analysis", {}).get("failureThreshold"),
        "paused": bool(st.get("paused") or spec.get("paused")),
        "interval": spec.get("interval"), "startedAt": st.get("startedAt"), "finishedAt": st.get("finishedAt"),
        "nextAnalysisAt": nxt, "secondsToNextAnalysis": max(0.0, nxt - now) if nxt else None,
        "lastDecision": {"action": last.get("action"), "at": last.get("at"), "reasons": last.get("reasons", []),
                         "checks": last.get("checks", [])} if last else None,
        "lastCommand": record.get("lastCommand"), "writeBack": record.get("writeBack"),
        "notifications": record.get("notifications", {}), "waitingFor": st.get("waitingFor"),
        "webhooks": record.get("webhooks", {}),
        "wave": st.get("wave", 0) if st.get("weights") is not None else None,
        "weights": st.get("weights"), "bakeUntil": st.get("bakeUntil"),
        "secondsToBake": max(0.0, st["bakeUntil"] - now) if st.get("bakeUntil") else None,
        "waitingForApproval": bool(st.get("waitingForApproval")),
        "waves": waves_summary(spec, record, now=now),
    }


def waves_summary(spec: dict[str, Any], record: dict[str, Any], *, now: float) -> list[dict[str, Any]]:
    """A row per wave and cluster: each cluster's canary weight and last checks; each wave's state
    (pending | running | baking | waiting-for-approval | passed, or the run's outcome), bake countdown and
    approval. A Rollout without `waves` is one wave of every cluster where the canary runs."""
    st = record.get("state", {})
    phase = st.get("phase", "idle")
    waves = spec.get("waves") or [{"clusters": record.get("canaryClusters", []), "name": None, "bake": None,
                                   "approval": None}]
    waved = bool(spec.get("waves"))
    current = st.get("wave", 0)
    weights = st.get("weights") or {}
    judged = record.get("clusters", {})
    out = []
    for i, w in enumerate(waves):
        if phase != "progressing":
            state = phase if phase != "idle" or i == 0 else "idle"
        elif not waved or i == current:
            state = ("baking" if st.get("bakeUntil") else "waiting-for-approval" if st.get("waitingForApproval")
                     else "running")
        else:
            state = "passed" if i < current else "pending"
        rows = []
        for c in w.get("clusters", []):
            weight = 0
            if phase == "progressing":
                weight = weights.get(c, 0) if waved else st.get("weight", 0)
            seen = judged.get(c, {})
            rows.append({"name": c, "weight": weight, "checks": seen.get("checks", []), "checkedAt": seen.get("at")})
        here = phase == "progressing" and i == current
        out.append({"index": i, "name": w.get("name"), "state": state, "bake": w.get("bake"),
                    "approval": w.get("approval"), "clusters": rows,
                    "bakeUntil": st.get("bakeUntil") if here else None,
                    "secondsToBake": max(0.0, st["bakeUntil"] - now) if here and st.get("bakeUntil") else None,
                    "waitingForApproval": bool(here and st.get("waitingForApproval"))})
    return out


def _format_waves(s: dict[str, Any]) -> list[str]:
    """A row per wave and cluster (a Rollout without waves: its clusters, when there are several)."""
    waves = s.get("waves") or []
    if not waves or (s.get("wave") is None and len(waves[0]["clusters"]) < 2):
        return []
    lines = ["  waves:"]
    for w in waves:
        head = f"waves[{w['index']}]" + (f" {w['name']}" if w.get("name") else "")
        state = w["state"]
        if w.get("secondsToBake") is not None:
            state += f" {w['secondsToBake']:.1f}s"
        if w.get("waitingForApproval"):
            state += f" (lockgate rollout approve {s['name']})"
        gate = ", ".join(x for x in (f"bake {w['bake']}" if w.get("bake") not in (None, "0s") else "",
                                     "approval manual" if w.get("approval") else "") if x)
        lines.append(f"    {head:16} {state}" + (f"  [{gate}]" if gate else ""))
        for c in w["clusters"]:
            checks = "; ".join(format_check(Check.model_validate(x)) for x in c["checks"]) or "not judged yet"
            lines.append(f"      {c['name']:12} {c['weight']:3d}%  {checks}")
    return lines


def format_summary(s: dict[str, Any]) -> str:
    """Human form of `summary`."""
    lines = [f"rollout {s['namespace']}/{s['name']} ({s['strategy']}, service {s['service']}): {s['phase']}"
             + (" [paused]" if s["paused"] else "")]
    lines.append(f"  stable {s['stable']}  canary {s['canary'] or '-'}  weight {s['weight']}%"
                 + (f"  step {s['step']}/{len(s['steps'])} {s['steps']}" if s["strategy"] == "canary" and s["step"]
                    else f"  iteration {s['iteration']}/{s['iterations']}" if s["step"] else ""))
    lines.append(f"  failed checks {s['failedChecks']}/{s['failureThreshold']}"
                 + (f"  next analysis in {s['secondsToNextAnalysis']:.1f}s"
                    if s["secondsToNextAnalysis"] is not None else ""))
    last = s.get("lastDecision")
    if last:
        lines.append(f"  last decision: {last['action']}: " + "; ".join(last["reasons"]))
        for c in last["checks"]:
            lines.append(f"    {format_check(Check.model_validate(c))}")
    if s.get("waitingFor"):
        lines.append(f"  waiting for its {s['waitingFor']} webhooks before any traffic moves")
    lines += _format_waves(s)
    hooks = s.get("webhooks") or {}
    if hooks:
        lines.append("  webhooks: " + "; ".join(
            f"{name} ({h.get('type')}) called {h.get('calls', 0)}, not 2xx {h.get('not2xx', 0)}, last {h.get('last')}"
            for name, h in sorted(hooks.items())))
    sinks = s.get("notifications") or {}
    if sinks:
        lines.append("  notifications: " + "; ".join(
            f"{name} sent {n.get('sent', 0)} failed {n.get('failed', 0)} dropped {n.get('dropped', 0)}"
            + (f" ({n['lastError']})" if n.get("lastError") else "") for name, n in sorted(sinks.items())))
    return "\n".join(lines)
