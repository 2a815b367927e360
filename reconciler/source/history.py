"""`lockgate history`: the audit trail, from Git alone.

Three sources merged by time: commits on the branch (people's and lockgate's write-backs, recognisable
by their `Lockgate-Decision` trailer), and the git notes lockgate adds under refs/notes/lockgate —
`applied` (when a revision reached which clusters) and `rollout` (each decision of a run, on the commit
that started it).
"""

from __future__ import annotations

import json
import time
from typing import Any

import pygit2

from reconciler.source.base import trailers as commit_trailers
from reconciler.source.git import NOTES_REF, Pygit2Source
from rollouts.writeback import TRAILER_DECISION, TRAILER_ROLLOUT


def _notes(repo: pygit2.Repository, sha: str) -> list[tuple[str, dict[str, Any]]]:
    try:
        text = str(repo.lookup_note(sha, NOTES_REF).message)
    except KeyError:
        return []
    out = []
    for para in text.split("\n\n"):
        kind, _, rest = para.strip().partition(" ")
        try:
            out.append((kind, json.loads(rest)))
        except ValueError:
            continue
    return out


def history(source: Pygit2Source, *, limit: int = 50) -> list[dict[str, Any]]:
    """Newest first. The `--json` contract: a list of events, each with `at` (epoch seconds), `type`
    (commit | applied | decision) and `sha`; see the README for the fields of each type."""
    head = source.head()
    if head is None:
        return []
    repo = pygit2.Repository(str(source.git_dir))
    events: list[dict[str, Any]] = []
    for c in source.log("HEAD", limit=limit):
        trailers = commit_trailers(c.message)
        event: dict[str, Any] = {"at": float(c.time), "type": "commit", "sha": c.sha, "author": c.author_name,
                                 "subject": c.message.splitlines()[0] if c.message else "",
                                 "automated": TRAILER_DECISION in trailers}
        if TRAILER_DECISION in trailers:
            event["rollout"] = trailers.get(TRAILER_ROLLOUT)
            event["decision"] = trailers[TRAILER_DECISION]
            event["body"] = c.message
        events.append(event)
        for kind, data in _notes(repo, c.sha):
            if kind == "applied":
                events.append({"at": float(data.get("at", c.time)), "type": "applied", "sha": c.sha,
                               "clusters": data.get("clusters", [])})
            elif kind == "rollout":
                events.append({"at": float(data.get("at", c.time)), "type": "decision", "sha": c.sha,
                               "rollout": data.get("rollout"), "action": data.get("action"),
                               "step": data.get("step"), "weight": data.get("weight"),
                               "canary": data.get("canary"), "reasons": data.get("reasons", [])})
    events.sort(key=lambda e: (e["at"], {"commit": 0, "applied": 1, "decision": 2}[e["type"]]), reverse=True)
    return events


def format_event(e: dict[str, Any]) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["at"]))
    sha = e["sha"][:10]
    if e["type"] == "commit":
        who = "lockgate (automated)" if e["automated"] else e["author"]
        return f"{when}  {sha}  commit    {who}: {e['subject']}"
    if e["type"] == "applied":
        return f"{when}  {sha}  applied   to {', '.join(e['clusters'])}"
    return f"{when}  {sha}  decision  {e['rollout']}: {e['action']} (weight {e['weight']}%): " + "; ".join(
        e["reasons"])
