"""`lockgate rollout status NAME --watch` started with no run in progress waits for the next run and
shows it, rather than exit; it ends when that run ends. Run as a real subprocess against a state dir
the test writes the way the controller does (atomic replace of STATE/rollouts/NS.NAME.json)."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from reconciler.state import write_json

ROOT = Path(__file__).resolve().parents[3]
SPEC = {"service": "reviews", "stable": "v1", "canary": None, "strategy": "canary", "steps": [10, 50, 100],
        "iterations": 5, "interval": "10s", "analysis": {"failureThreshold": 2}}
IDLE = {"phase": "idle", "stable": "v1", "observedCanary": None}
RUN = {"phase": "progressing", "stable": "v1", "canary": "v2", "observedCanary": "v2", "canaryRevision": "a" * 40,
       "step": 0, "weight": 10, "startedAt": 200.0, "nextAnalysisAt": 4e9}
PROMOTED = {"phase": "promoted", "stable": "v2", "canary": "v2", "observedCanary": None, "startedAt": 200.0,
            "finishedAt": 260.0}


def write_state(state_dir: Path, state: dict[str, Any]) -> None:
    write_json(state_dir / "rollouts" / "shop.reviews.json",
               {"namespace": "shop", "name": "reviews", "service": "reviews", "spec": SPEC, "state": state})


class Watch:
    """The watch as a subprocess; its stdout lines arrive on a queue so reads can time out."""

    def __init__(self, state_dir: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "reconciler.cli", "rollout", "status", "reviews", "--watch", "--json",
             "--state-dir", str(state_dir)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        assert self.proc.stdout is not None
        self.pump = threading.Thread(target=self._pump, args=(self.proc.stdout,), daemon=True)
        self.pump.start()

    def _pump(self, out: IO[str]) -> None:
        for line in out:
            self.lines.put(line)

    def close(self) -> str:
        """Stop it if it still runs; its stderr."""
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(timeout=10)
        self.pump.join(timeout=10)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.proc.stdout.close()
        err = self.proc.stderr.read()
        self.proc.stderr.close()
        return err

    def next_phase(self, timeout: float = 20.0) -> str:
        phase: str = json.loads(self.lines.get(timeout=timeout))["phase"]
        return phase

    def quiet_for(self, seconds: float) -> bool:
        """Nothing printed and still running after `seconds`."""
        try:
            line = self.lines.get(timeout=seconds)
        except queue.Empty:
            return self.proc.poll() is None
        raise AssertionError(f"unexpected output: {line}")


@pytest.fixture
def start_watch(tmp_path: Path) -> Iterator[Callable[[], Watch]]:
    """Starts the watch on tmp_path; terminates it at the end if it is still running."""
    started: list[Watch] = []

    def start() -> Watch:
        started.append(Watch(tmp_path))
        return started[-1]

    yield start
    for w in started:
        assert "Traceback" not in w.close()


@pytest.mark.parametrize("before", [IDLE, PROMOTED], ids=["idle", "after-the-last-run"])
def test_watch_with_no_run_waits_for_the_next_run_and_ends_with_it(
        tmp_path: Path, start_watch: Callable[[], Watch], before: dict[str, Any]) -> None:
    state_dir = tmp_path
    write_state(state_dir, before)
    w = start_watch()
    assert w.next_phase() == before["phase"]
    assert w.quiet_for(1.0)  # no run yet: keeps watching
    write_state(state_dir, {**RUN, "startedAt": 300.0})  # the controller starts a run
    assert w.next_phase() == "progressing"
    assert w.proc.poll() is None
    write_state(state_dir, {**RUN, "startedAt": 300.0, "step": 1, "weight": 50})
    assert w.next_phase() == "progressing"
    write_state(state_dir, {**PROMOTED, "startedAt": 300.0, "finishedAt": 330.0})
    assert w.next_phase() == "promoted"
    assert w.proc.wait(timeout=10) == 0  # the run it waited for ended


def test_watch_waits_for_a_rollout_without_a_state_file_yet(tmp_path: Path,
                                                            start_watch: Callable[[], Watch]) -> None:
    state_dir = tmp_path
    w = start_watch()
    assert w.quiet_for(1.0)
    write_state(state_dir, RUN)
    assert w.next_phase() == "progressing"
    assert w.proc.poll() is None


def test_watch_of_a_run_that_starts_and_ends_between_two_looks_ends(tmp_path: Path,
                                                                    start_watch: Callable[[], Watch]) -> None:
    state_dir = tmp_path
    write_state(state_dir, PROMOTED)
    w = start_watch()
    assert w.next_phase() == "promoted"
    write_state(state_dir, {**PROMOTED, "startedAt": 400.0, "finishedAt": 400.1})  # promoted by command at once
    assert w.next_phase() == "promoted"
    assert w.proc.wait(timeout=10) == 0
