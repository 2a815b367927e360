"""`lockgate rollback [REV]`, `lockgate suspend`, `lockgate resume`: act on the running `lockgate up`.

As `lockgate rollout promote` does: the CLI writes `STATE/control/<id>.json` atomically; the running `up`
(`serve_commands`, beside the reconcile loop) takes it within 0.1 s, acts, writes `<id>.done` with the
outcome and removes the command; the CLI waits for that answer and exits 0, or 1 with the reason.
With no `up` running, `suspend` and `resume` change the state dir's suspension file themselves (the next
`up` starts suspended, or not); `rollback` needs the running one (it applies what it commits).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reconciler.state import DEFAULT_STATE_DIR, STATUS_FILE, SUSPENDED_FILE, pid_alive, read_json, write_json

if TYPE_CHECKING:  # the loop only where `up` runs: every other command starts without importing it
    from reconciler.loop import Reconciler

log = logging.getLogger("lockgate")

CONTROL_DIR = "control"
ACTIONS = ("rollback", "suspend", "resume")
ACK_TIMEOUT = {"rollback": 150.0, "suspend": 15.0, "resume": 60.0}
"""Seconds the CLI waits for the running `up` (a rollback commits and pushes; a resume applies the head)."""


def add_commands(sub: Any) -> None:
    p = sub.add_parser("rollback", help="undo the last applied human change (or return to REV) with a commit by "
                       "lockgate, applied at once")
    p.add_argument("rev", nargs="?", help="restore the files of this revision instead (sha, tag, HEAD~N)")
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    p.set_defaults(func=cmd_control, action="rollback")
    for action, text in (("suspend", "stop applying new revisions (they are noticed and shown); rollouts hold"),
                         ("resume", "apply again: the newest revision at once, rollouts go on")):
        p = sub.add_parser(action, help=text)
        p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
        p.set_defaults(func=cmd_control, action=action)


# --- the CLI side -------------------------------------------------------------------------------------


def cmd_control(args: argparse.Namespace) -> int:
    state_dir: Path = args.state_dir
    try:
        status = read_json(state_dir / STATUS_FILE)
    except (OSError, ValueError):
        status = {}
    if not pid_alive((status.get("lockgate") or {}).get("pid")):
        return _offline(args.action, state_dir, status)
    cid = f"{time.time_ns()}-{uuid.uuid4().hex[:8]}"
    command = {"id": cid, "action": args.action, "rev": getattr(args, "rev", None), "at": time.time()}
    write_json(state_dir / CONTROL_DIR / f"{cid}.json", command)
    done = state_dir / CONTROL_DIR / f"{cid}.done"
    deadline = time.monotonic() + ACK_TIMEOUT[args.action]
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            answer = read_json(done)
            done.unlink(missing_ok=True)
            print(answer["message"], file=sys.stdout if answer["ok"] else sys.stderr)
            return 0 if answer["ok"] else 1
        time.sleep(0.05)
    print(f"lockgate {args.action}: no answer from lockgate up within {ACK_TIMEOUT[args.action]:.0f}s",
          file=sys.stderr)
    return 1


def _offline(action: str, state_dir: Path, status: dict[str, Any]) -> int:
    path = state_dir / SUSPENDED_FILE
    if action == "rollback":
        print(f"lockgate rollback: `lockgate up` is not running with --state-dir {state_dir}: start it first (a "
              "rollback is a commit it applies at once), or `git revert` by hand", file=sys.stderr)
        return 1
    if action == "suspend":
        if not state_dir.is_dir():
            print(f"lockgate suspend: {state_dir} is not a state dir of lockgate up", file=sys.stderr)
            return 1
        applied = (status.get("revision") or {}).get("applied")
        if not path.is_file():
            write_json(path, {"at": time.time(), "applied": applied})
        print(f"suspended: lockgate up is not running; it will start suspended, serving "
              f"{(applied or 'the branch tip')[:12]}")
        return 0
    path.unlink(missing_ok=True)
    print("resumed: lockgate up is not running; it will apply the branch tip when it starts")
    return 0


# --- the running `up` ---------------------------------------------------------------------------------


async def act(rec: Reconciler, command: dict[str, Any]) -> dict[str, Any]:
    """One command on the reconciler: `{"ok", "message", ...}` (what the CLI prints)."""
    action = command.get("action")
    if action == "suspend":
        was = rec.suspended
        if not was:
            rec.suspend()
        return {"ok": True, "message": ("already suspended" if was else "suspended") + ": new revisions are noticed "
                f"(status: revision.head), not applied; rollouts hold; serving {(rec.applied or '-')[:12]}"}
    if action == "resume":
        was = rec.suspended
        await rec.resume()
        head = rec.head or "-"
        if rec.failed == rec.head and rec.head is not None:
            return {"ok": True, "message": f"resumed; the branch tip {head[:12]} is refused (see lockgate status), "
                    f"still serving {(rec.applied or '-')[:12]}"}
        serving = (rec.applied or "-")[:12]
        return {"ok": True, "message": ("resumed" if was else "not suspended") + f": serving {serving}"}
    if action == "rollback":
        from reconciler.loop import RollbackRefused

        rev = command.get("rev")
        try:
            done = await rec.rollback(rev if isinstance(rev, str) and rev else None)
        except RollbackRefused as exc:
            return {"ok": False, "message": f"lockgate rollback: {exc}"}
        undid = f" (undoes {done['undid'][:12]})" if done.get("undid") else ""
        return {"ok": True, **done, "message": f"rolled back: lockgate committed {done['sha'][:12]} with the files "
                f"of {done['to'][:12]}{undid}; applied"}
    return {"ok": False, "message": f"unknown command {action!r}"}


async def serve_commands(rec: Reconciler, *, interval: float = 0.1) -> None:
    """Take every command file under STATE/control, one at a time, oldest first, until cancelled."""
    folder = rec.config.state_dir / CONTROL_DIR
    while True:
        await asyncio.sleep(interval)
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            try:
                command = read_json(path)
            except (OSError, ValueError):
                path.unlink(missing_ok=True)
                continue
            try:
                answer = await act(rec, command if isinstance(command, dict) else {})
            except Exception as exc:  # a bug of ours: answered, and the loop goes on
                log.exception("lockgate %s failed", command.get("action") if isinstance(command, dict) else "?")
                answer = {"ok": False, "message": f"lockgate: internal error: {exc!r}"}
            rec.flush_status()  # the answer implies status shows what was done (its write is debounced)
            write_json(path.with_suffix(".done"), {"id": path.stem, **answer})
            path.unlink(missing_ok=True)
