"""An idle rollout controller costs nothing per resource (issue 15, idle cost): it ticks five times a second,
and each tick used to scan every resource of the applied intent for Rollouts (at 1000 services most of
the reconciler's idle 0.8% of a core; ~4% at 5000). The Rollouts are now found once per revision."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh.intent import Intent
from reconciler.load import load
from reconciler.rollout.controller import RolloutController
from reconciler.source.git import Pygit2Source, init_repo
from tests.fixtures.intents import TEMPLATE, rollout_yaml, template_files
from tests.fixtures.runtime import FakeRuntime

SERVICES = 1000


def service_yaml(i: int) -> str:
    ns = f"ns{i % 10}"
    return (f"apiVersion: lockgate.io/v1alpha1\nkind: Service\nmetadata: {{name: s{i}, namespace: {ns}}}\n"
            "spec: {ports: [{name: http, port: 80}], versions: [v1, v2]}\n---\n"
            f"apiVersion: lockgate.io/v1alpha1\nkind: Route\nmetadata: {{name: s{i}, namespace: {ns}}}\n"
            f"spec:\n  service: s{i}\n  hosts: [s{i}.example]\n  http:\n"
            "    - name: default\n      route: [{version: v1, weight: 90}, {version: v2, weight: 10}]\n")


def big_intent(**extra: str) -> Intent:
    files = {**template_files(), **{f"ns{i % 10}/s{i}.yaml": service_yaml(i).encode() for i in range(SERVICES)}}
    files.update({name: text.encode() for name, text in extra.items()})
    loaded = load(files)
    assert loaded.ok and loaded.intent is not None, loaded.problems[:3]
    return loaded.intent


@pytest.fixture(scope="module")
def plain() -> Intent:
    return big_intent()


@pytest.fixture
def scans(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every `Intent.of_kind` call (the scan of every resource), by kind asked for."""
    calls: list[str] = []
    real = Intent.of_kind

    def spy(self: Intent, cls: type[Any]) -> Any:
        calls.append(cls.__name__)
        return real(self, cls)

    monkeypatch.setattr(Intent, "of_kind", spy)
    yield calls


def controller(tmp_path: Path, changes: list[int]) -> RolloutController:
    repo = tmp_path / "repo"
    init_repo(repo, template=TEMPLATE)
    return RolloutController(state_dir=tmp_path / "state", source=Pygit2Source.open(str(repo)),
                             runtime=FakeRuntime(), on_change=lambda: changes.append(1))


def test_a_hundred_ticks_with_no_rollouts_scan_the_resources_at_most_once(
        tmp_path: Path, plain: Intent, scans: list[str]) -> None:
    assert len(plain.resources) > 2 * SERVICES

    async def scenario() -> None:
        changes: list[int] = []
        ctl = controller(tmp_path, changes)
        try:
            ctl.on_revision(plain, "a" * 40)
            for _ in range(100):
                await ctl.tick()
                assert ctl.describe() == []  # status (written on every ACK burst) does not scan either
            assert scans.count("Rollout") <= 1
            assert ctl.states == {} and changes == []
        finally:
            await ctl.close()

    asyncio.run(scenario())


def test_a_revision_that_adds_a_rollout_is_picked_up(tmp_path: Path, plain: Intent, scans: list[str]) -> None:
    with_rollout = big_intent(**{"rollout.yaml": rollout_yaml(steps=[10, 100], interval="1h")})

    async def scenario() -> None:
        changes: list[int] = []
        ctl = controller(tmp_path, changes)
        try:
            ctl.on_revision(plain, "a" * 40)
            for _ in range(10):
                await ctl.tick()
            assert ctl.states == {} and changes == []
            ctl.on_revision(with_rollout, "b" * 40)
            await ctl.tick()
            state = ctl.states[("shop", "reviews")]
            assert state.phase == "progressing" and state.canary == "v2" and state.weight == 10
            assert changes  # a re-render was asked for: the weights moved
            assert [r["name"] for r in ctl.describe()] == ["reviews"]
            # And a revision that drops it again: its state goes, and render is asked to put traffic back.
            ctl.on_revision(plain, "c" * 40)
            before = len(changes)
            await ctl.tick()
            assert ctl.states == {} and len(changes) > before and ctl.describe() == []
            assert not (tmp_path / "state" / "rollouts" / "shop.reviews.json").exists()
            assert scans.count("Rollout") <= 3  # once per revision
        finally:
            await ctl.close()

    asyncio.run(scenario())
