"""Write-back on a real repository racing a human commit: lockgate retries on the new tip, and the
human's commit is never lost; if the human changed the canary, lockgate writes nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path

import pygit2

from reconciler.rollout.controller import RolloutController
from reconciler.source.git import Pygit2Source, init_repo
from reconciler.state import read_json, write_json
from rollouts.advance import Decision, RolloutState
from tests.fixtures.intents import rollout_yaml
from tests.fixtures.runtime import FakeRuntime

TEMPLATE = Path(__file__).resolve().parents[3] / "repo-template"
ROLLOUT = rollout_yaml()
HUMAN = ("dev", "dev@example.org")


class RacingSource(Pygit2Source):
    """Lets a human commit land just before lockgate's first commit attempt."""

    human: Mapping[str, bytes] = {}
    raced = 0

    def commit(self, *, files: Mapping[str, bytes | None], message: str, parent: str,
               author: tuple[str, str] = ("lockgate", "lockgate@localhost")) -> str:
        if self.raced == 0:
            self.raced += 1
            super().commit(files=dict(self.human), message="human: concurrent change", parent=parent, author=HUMAN)
        return super().commit(files=files, message=message, parent=parent, author=author)


def _setup(tmp_path: Path, human: Mapping[str, bytes]) -> tuple[RacingSource, RolloutController, Decision]:
    repo = tmp_path / "repo"
    init_repo(repo, template=TEMPLATE)
    plain = Pygit2Source.open(str(repo))
    plain.commit(files={"rollout.yaml": ROLLOUT.encode()}, message="canary v2", parent=plain.head() or "",
                 author=HUMAN)
    source = RacingSource(pygit2.Repository(str(repo)), branch="main", location=str(repo), url=None)
    source.human = human
    ctl = RolloutController(state_dir=tmp_path / "state", source=source,
                            runtime=FakeRuntime(),
                            on_change=lambda: None)
    decision = Decision(action="promote", at=1.0, reasons=("analysis passed",),
                        state=RolloutState(phase="promoted", stable="v2", canary="v2", observed_canary="v2"))
    return source, ctl, decision


def test_write_back_retries_onto_a_concurrent_human_commit(tmp_path: Path) -> None:
    source, ctl, decision = _setup(tmp_path, {"NOTES.md": b"a human was here\n"})
    sha = ctl._write_back(("shop", "reviews"), decision, stable_before="v1")
    assert sha is not None and sha == source.head()
    log = [(c.author_name, c.message.splitlines()[0]) for c in source.log("HEAD", limit=3)]
    assert log == [("lockgate", "rollout shop/reviews: promote v2 (stable v1 -> v2)"),
                   ("dev", "human: concurrent change"), ("dev", "canary v2")]
    tree = source.read_tree(sha)
    assert tree["NOTES.md"] == b"a human was here\n"  # the human's commit is kept
    assert b"stable: v2" in tree["rollout.yaml"] and b"canary" not in tree["rollout.yaml"]


def test_write_back_yields_when_the_human_changed_the_canary(tmp_path: Path) -> None:
    source, ctl, decision = _setup(tmp_path, {"rollout.yaml": ROLLOUT.replace("canary: v2", "canary: v3").encode()})
    assert ctl._write_back(("shop", "reviews"), decision, stable_before="v1") == ""  # nothing to write
    assert source.log("HEAD", limit=1)[0].message.startswith("human: concurrent change")


def test_an_outcome_not_yet_committed_is_committed_after_a_restart(tmp_path: Path) -> None:
    """SIGKILL between persisting the decision and committing it: the next controller commits it."""
    source, _ctl, decision = _setup(tmp_path, {"NOTES.md": b"x\n"})
    record = {"namespace": "shop", "name": "reviews", "state": decision.state.model_dump(mode="json", by_alias=True),
              "lastDecision": decision.model_dump(mode="json", by_alias=True),
              "writeBackPending": {"stableBefore": "v1"}}
    write_json(tmp_path / "state" / "rollouts" / "shop.reviews.json", record)
    restarted = RolloutController(state_dir=tmp_path / "state", source=source,
                                  runtime=FakeRuntime(),
                                  on_change=lambda: None)
    asyncio.run(restarted._retry_write_back(("shop", "reviews")))
    assert source.log("HEAD", limit=1)[0].message.startswith("rollout shop/reviews: promote v2")
    saved = read_json(tmp_path / "state" / "rollouts" / "shop.reviews.json")
    assert "writeBackPending" not in saved and saved["writeBack"] == source.head()
