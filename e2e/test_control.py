"""`lockgate rollback`, `suspend` and `resume` against a running `lockgate up` on real Envoys, with the
traffic counted at the ingress after each step.

The template's mesh (frontend -> reviews v1 100% / v2 0%). A person sends everything to v2; `lockgate
rollback` commits (as lockgate) the files from before that change and the ingress answers v1 again; an
unknown REV is refused. Suspended, a 50/50 commit is noticed (revision.head) but not served, also after a
restart of `up`; `lockgate resume` applies it and the ingress splits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from e2e.harness import Client, Up, alive, git, lockgate, split, wait_for

pytestmark = pytest.mark.e2e

HOST = "shop.example.com"


def reviews(weights: tuple[int, int]) -> str:
    text = (Path(__file__).resolve().parents[1] / "repo-template" / "routes.yaml").read_text()
    assert "          weight: 100" in text and "weight: 0" in text
    return text.replace("weight: 0", "weight: V2").replace("          weight: 100", f"          weight: {weights[0]}") \
        .replace("weight: V2", f"weight: {weights[1]}")


def commit_routes(repo: Path, weights: tuple[int, int], message: str) -> str:
    (repo / "routes.yaml").write_text(reviews(weights))
    git(repo, "commit", "-q", "-am", message)
    return git(repo, "rev-parse", "HEAD")


def served(up: Up, n: int = 60) -> dict[str, int]:
    client = Client(up.ingress())
    try:
        return dict(split(client, HOST, n))
    finally:
        client.close()


def test_rollback_suspend_resume_with_traffic_at_the_ingress(tmp_path: Path) -> None:
    repo, state = tmp_path / "repo", tmp_path / "state"
    lockgate("init", str(repo))
    up = Up(repo=repo, state_dir=state, extra=("--web", "off"))
    children: set[int] = set()
    try:
        first = git(repo, "rev-parse", "HEAD")
        up.wait_converged(first)
        assert up.status()["lockgate"]["suspended"] is False
        assert served(up) == {"v1": 60}

        # a person's change: everything to v2
        to_v2 = commit_routes(repo, (0, 100), "reviews: all to v2")
        up.wait_converged(to_v2)
        assert served(up) == {"v2": 60}

        # rollback: a commit by lockgate with the files of the revision before that change, applied at once
        out = lockgate("rollback", "--state-dir", str(state), check=False)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("rolled back: lockgate committed"), out.stdout
        head = git(repo, "rev-parse", "HEAD")
        assert head not in (first, to_v2) and up.status()["revision"]["applied"] == head
        assert git(repo, "log", "-1", "--format=%an|%s") == f"lockgate|rollback: undo {to_v2[:10]} (reviews: all to " \
                                                             f"v2), back to {first[:10]}"
        assert git(repo, "diff", first, head) == ""  # the files of the revision before the change
        up.wait_converged(head)
        assert served(up) == {"v1": 60}
        history = json.loads(lockgate("history", "--json", "--state-dir", str(state)).stdout)
        assert any(e["type"] == "commit" and e["sha"] == head and e["automated"] and e["decision"] == "rollback"
                   for e in history)
        assert any(e["type"] == "applied" and e["sha"] == head for e in history)

        refused = lockgate("rollback", "no-such-rev", "--state-dir", str(state), check=False)
        assert refused.returncode == 1 and "cannot resolve revision 'no-such-rev'" in refused.stderr
        assert git(repo, "rev-parse", "HEAD") == head  # refused: nothing committed

        # suspend: a new head is noticed, not applied; the ingress keeps answering v1
        out = lockgate("suspend", "--state-dir", str(state), check=False)
        assert out.returncode == 0 and out.stdout.startswith("suspended"), (out.stdout, out.stderr)
        assert up.status()["lockgate"]["suspended"] is True
        half = commit_routes(repo, (50, 50), "reviews: 50/50")
        wait_for("the new head noticed", lambda: up.status()["revision"]["head"] == half, timeout=10)
        st = up.status()
        assert st["revision"]["applied"] == head and st["lockgate"]["suspended"] is True
        assert served(up) == {"v1": 60}

        # the suspension survives a restart: the restarted `up` serves what it served, and notices the head
        for c in st["clusters"]:
            children |= {p["pid"] for p in c["proxies"] if p.get("pid")}
        up.stop()
        up = Up(repo=repo, state_dir=state, extra=("--web", "off"))
        up.wait_converged(head)
        wait_for("the head noticed after the restart", lambda: up.status()["revision"]["head"] == half, timeout=10)
        assert up.status()["lockgate"]["suspended"] is True
        assert served(up) == {"v1": 60}

        # resume: the noticed head is applied at once
        out = lockgate("resume", "--state-dir", str(state), check=False)
        assert out.returncode == 0 and out.stdout.startswith("resumed"), (out.stdout, out.stderr)
        up.wait_converged(half)
        assert up.status()["lockgate"]["suspended"] is False
        seen = served(up, 200)
        assert set(seen) == {"v1", "v2"} and min(seen.values()) > 40, seen
    finally:
        children |= up.child_pids
        up.stop()
    assert not alive(children), "processes left behind"
