"""The shared waiting helpers: what a test waits for, and what a timeout says."""

from __future__ import annotations

import asyncio

import pytest

from tests.fixtures.waiting import until, wait_for


def test_wait_for_returns_the_first_truthy_result_and_tolerates_only_what_it_is_told() -> None:
    answers = iter([None, OSError("starting"), [], "up"])

    def check() -> object:
        got = next(answers)
        if isinstance(got, Exception):
            raise got
        return got

    assert wait_for("up", check, timeout=5, interval=0, tolerate=(OSError,)) == "up"
    with pytest.raises(KeyError):
        wait_for("a key", lambda: {}["missing"], timeout=5, interval=0, tolerate=(OSError,))


def test_a_timeout_names_what_was_awaited_and_the_last_answer() -> None:
    with pytest.raises(TimeoutError, match=r"waiting for two replicas \(last: \[\]\)"):
        wait_for("two replicas", lambda: [], timeout=0.05, interval=0.01)

    def refused() -> None:
        raise ConnectionRefusedError(111, "refused")

    with pytest.raises(TimeoutError, match=r"waiting for a listener \(last: ConnectionRefusedError"):
        wait_for("a listener", refused, timeout=0.05, interval=0.01, tolerate=(OSError,))


def test_until_awaits_an_awaitable_check_and_lets_the_loop_run() -> None:
    async def scenario() -> str:
        box: list[str] = []
        asyncio.get_running_loop().call_later(0.02, box.append, "set")

        async def check() -> str | None:
            return box[0] if box else None

        return str(await until("the callback ran", check, timeout=5))

    assert asyncio.run(scenario()) == "set"
    with pytest.raises(TimeoutError, match="waiting for never"):
        asyncio.run(until("never", lambda: False, timeout=0.05))
