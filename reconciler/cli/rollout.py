"""`lockgate rollout status|promote|abort|pause|resume|approve NAME` and `lockgate history`.

They read the state dir of a running (or stopped) `lockgate up`; commands reach the running one as
command files (see reconciler.rollout.controller) and wait for its acknowledgement.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any, cast

from reconciler.state import DEFAULT_STATE_DIR, STATUS_FILE, pid_alive, read_json

ACK_TIMEOUT = 15.0


def add_commands(sub: Any) -> None:
    p = sub.add_parser("rollout", help="progressive delivery: status, promote, abort, pause, resume, approve")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (("status", "step, weight, each metric against its threshold, time to the next step"),
                         ("promote", "promote the canary now (skips the remaining analyses; with waves, the "
                                     "remaining steps of the current wave only)"),
                         ("abort", "roll back now: 100%% to the stable (with waves, in every cluster)"),
                         ("pause", "hold at the current step"), ("resume", "continue a paused run"),
                         ("approve", "start the wave waiting for its manual approval")):
        a = actions.add_parser(action, help=text)
        a.add_argument("name")
        a.add_argument("-n", "--namespace", help="the Rollout's namespace (needed only if the name is ambiguous)")
        a.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
        if action == "status":
            a.add_argument("--json", action="store_true", help="the documented JSON contract")
            a.add_argument("--watch", action="store_true",
                           help="print every change until the run ends; with no run in progress, wait for the next")
        a.set_defaults(func=cmd_rollout)

    h = sub.add_parser("history", help="the audit log: commits, applied revisions, rollout decisions (from Git)")
    h.add_argument("--json", action="store_true", help="the documented JSON contract")
    h.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    h.add_argument("--repo", help="the intent repository (default: the one `lockgate up` runs with)")
    h.add_argument("--limit", type=int, default=50, help="commits to read, newest first")
    h.set_defaults(func=cmd_history)


def _records(state_dir: Path) -> list[dict[str, Any]]:
    from reconciler.rollout.commands import ROLLOUTS_DIR

    out = []
    for path in sorted((state_dir / ROLLOUTS_DIR).glob("*.json")):
        try:
            out.append(read_json(path))
        except (OSError, ValueError):
            continue
    return out


def _matching(args: argparse.Namespace) -> list[dict[str, Any]]:
    return [r for r in _records(args.state_dir)
            if r.get("name") == args.name and (args.namespace is None or r.get("namespace") == args.namespace)]


def _find(args: argparse.Namespace) -> dict[str, Any] | None:
    found = _matching(args)
    if len(found) == 1:
        return found[0]
    if not found:
        known = ", ".join(f"{r['namespace']}/{r['name']}" for r in _records(args.state_dir)) or "none"
        print(f"lockgate rollout: no Rollout {args.name!r} in {args.state_dir} (known: {known})", file=sys.stderr)
    else:
        print(f"lockgate rollout: {args.name!r} is in several namespaces; pass --namespace", file=sys.stderr)
    return None


def cmd_rollout(args: argparse.Namespace) -> int:
    if args.action == "status" and args.watch:
        try:
            return _watch(args)
        except KeyboardInterrupt:  # how a watch is meant to end while nothing runs: no traceback
            return 130
    from reconciler.rollout.commands import format_summary, summary

    record = _find(args)
    if record is None:
        return 1
    ns, name = record["namespace"], record["name"]
    if args.action == "status":
        s = summary(record.get("spec", {}), record, namespace=ns, name=name)
        print(json.dumps(s, indent=2) if args.json else format_summary(s))
        return 0
    return _command(args, ns, name)


def _watch(args: argparse.Namespace) -> int:
    """Every change of one rollout until a run ends. Started with no run in progress (idle, or the last
    run's outcome) it waits for the next run, however long, rather than report that nothing is running;
    a Rollout without a state file yet (the commit adding it not applied yet) is waited for too."""
    from reconciler.rollout.commands import state_path, summary

    told = False
    while not (found := _matching(args)):
        if not told:
            print(f"lockgate rollout: no Rollout {args.name!r} in {args.state_dir} yet; waiting (Ctrl-C stops)",
                  file=sys.stderr, flush=True)
            told = True
        time.sleep(0.5)
    if len(found) > 1:
        _find(args)  # names the problem
        return 1
    record = found[0]
    ns, name = record["namespace"], record["name"]
    first_started = record.get("state", {}).get("startedAt")
    saw_run = False
    last = ""
    view = _WatchView.pick(json_lines=args.json)
    try:
        while True:
            s = summary(record.get("spec", {}), record, namespace=ns, name=name)
            changed = json.dumps({**s, "secondsToNextAnalysis": None}, sort_keys=True)
            view.show(s, changed=changed != last)
            last = changed
            # A run is one this watch saw progressing, or one that started (and maybe ended) between two looks.
            saw_run = saw_run or s["phase"] == "progressing" or s["startedAt"] != first_started
            if saw_run and s["phase"] != "progressing":
                return 0
            time.sleep(0.5)
            with contextlib.suppress(OSError, ValueError):  # removed: keep showing the last one
                record = read_json(state_path(args.state_dir, ns, name))
    finally:
        view.close()


class _WatchView:
    """How `rollout status --watch` shows each summary: one JSON object per change (`--json`); a live table
    (rich) on a terminal; the screen redrawn on a terminal without rich; else one plain line per change."""

    def __init__(self, *, json_lines: bool, live: Any = None) -> None:
        self.json_lines, self.live = json_lines, live

    @classmethod
    def pick(cls, *, json_lines: bool) -> _WatchView:
        if json_lines or not sys.stdout.isatty():
            return cls(json_lines=json_lines)
        try:
            from rich.live import Live
        except ImportError:  # rich is optional: the plain redraw
            return cls(json_lines=False, live=False)
        live = Live(auto_refresh=False, transient=False)
        live.start()
        return cls(json_lines=False, live=live)

    def show(self, s: dict[str, Any], *, changed: bool) -> None:
        from reconciler.rollout.commands import format_summary

        if self.json_lines:
            if changed:
                print(json.dumps(s), flush=True)
        elif self.live is False:  # a terminal without rich: redraw (the countdown moves)
            print(f"\033[2J\033[H{format_summary(s)}", flush=True)
        elif self.live is not None:
            self.live.update(rich_table(s), refresh=True)
        elif changed:  # not a terminal: a line per change, for logs and pipes
            print(plain_line(s, now=time.time()), flush=True)

    def close(self) -> None:
        if self.live not in (None, False):
            self.live.stop()


def plain_line(s: dict[str, Any], *, now: float) -> str:
    """One rollout summary as one line: time, rollout, phase, weight, step, and the last decision."""
    step = f" step {s['step']}/{len(s['steps'])}" if s.get("step") and s.get("strategy") == "canary" else ""
    last = s.get("lastDecision") or {}
    why = f"; last {last['action']}: {'; '.join(last.get('reasons', []))}" if last else ""
    return (f"{time.strftime('%H:%M:%S', time.localtime(now))} {s['namespace']}/{s['name']} {s['phase']}"
            f"{' [paused]' if s.get('paused') else ''} weight {s['weight']}%{step} canary {s.get('canary') or '-'}"
            f" (stable {s['stable']}), failed checks {s['failedChecks']}/{s.get('failureThreshold')}{why}")


def rich_table(s: dict[str, Any]) -> Any:
    """The summary as a rich renderable: the state, then each metric of the last analysis against its bounds."""
    from rich.console import Group
    from rich.table import Table

    head = Table.grid(padding=(0, 2))
    head.add_row(f"[bold]rollout {s['namespace']}/{s['name']}[/]", s["phase"] + (" [paused]" if s["paused"] else ""),
                 f"weight [bold]{s['weight']}%[/] to {s.get('canary') or '-'} (stable {s['stable']})",
                 f"step {s['step']}/{len(s['steps'])}" if s.get("step") else "",
                 f"next analysis in {s['secondsToNextAnalysis']:.1f}s" if s.get("secondsToNextAnalysis") else "")
    checks = Table("metric", "cluster", "value", "threshold", "result", title="last analysis", title_justify="left")
    last = s.get("lastDecision") or {}
    for c in last.get("checks", []):
        bounds = ", ".join(x for x in (f"min {c['min']:g}" if c.get("min") is not None else "",
                                       f"max {c['max']:g}" if c.get("max") is not None else "") if x)
        value = "no values" if c.get("value") is None else f"{c['value']:.4g}"
        colour = {"pass": "green", "fail": "red"}.get(c.get("effective", ""), "yellow")
        checks.add_row(c["metric"], c.get("cluster", ""), value, bounds or "-", f"[{colour}]{c['result']}[/]")
    reasons = f"last decision: {last['action']}: " + "; ".join(last.get("reasons", [])) if last else "no decision yet"
    return Group(head, checks, reasons)


def _command(args: argparse.Namespace, ns: str, name: str) -> int:
    from reconciler.rollout.commands import send_command, state_path
    from rollouts.advance import Command

    try:
        status = read_json(args.state_dir / STATUS_FILE)
    except (OSError, ValueError):
        status = {}
    if not pid_alive(status.get("lockgate", {}).get("pid")):
        print(f"lockgate rollout: `lockgate up` is not running with --state-dir {args.state_dir}; start it first "
              "(or change the Rollout in Git: spec.paused, spec.canary)", file=sys.stderr)
        return 1
    cid = send_command(args.state_dir, namespace=ns, name=name, command=cast(Command, args.action))
    deadline = time.monotonic() + ACK_TIMEOUT
    while time.monotonic() < deadline:
        try:
            record = read_json(state_path(args.state_dir, ns, name))
        except (OSError, ValueError):
            record = {}
        ack = record.get("lastCommand") or {}
        if ack.get("id") == cid:
            print(f"rollout {ns}/{name}: {ack['action']}: " + "; ".join(ack.get("reasons", [])))
            return 0 if ack["action"] not in ("none", "wait") else 1
        time.sleep(0.05)
    print(f"lockgate rollout: no acknowledgement from lockgate up within {ACK_TIMEOUT:.0f}s", file=sys.stderr)
    return 1


def cmd_history(args: argparse.Namespace) -> int:
    from reconciler.source.git import GitError, Pygit2Source
    from reconciler.source.history import format_event, history

    repo = args.repo
    if repo is None:
        try:
            repo = read_json(args.state_dir / STATUS_FILE)["lockgate"]["repo"]
        except (OSError, ValueError, KeyError):
            print(f"lockgate history: pass --repo, or --state-dir of a `lockgate up` ({args.state_dir} has none)",
                  file=sys.stderr)
            return 1
    try:
        source = Pygit2Source.open(str(repo), cache_dir=args.state_dir / "git")
        events = history(source, limit=args.limit)
    except GitError as exc:
        print(f"lockgate history: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(events, indent=2))
    else:
        for e in events:
            print(format_event(e))
    return 0
