"""Settling the garbage collector once pushes settle: a full pass at most every GC_FULL_EVERY_S (it scans
the whole heap, ~0.2 s on the event loop at 1000 services), a pass over what is young otherwise."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from reconciler.loop import GC_FULL_EVERY_S, GcSettler


class Node:
    """A reference cycle (only the collector frees it) that can be watched through a weak reference."""

    def __init__(self) -> None:
        self.me = self


@pytest.fixture
def frozen_heap() -> Iterator[None]:
    yield
    gc.unfreeze()  # leave the test process's collector as it found it


def test_a_light_pass_collects_young_garbage_and_the_full_pass_what_was_frozen(frozen_heap: None) -> None:
    now = [1000.0]
    settle = GcSettler(clock=lambda: now[0])
    old = Node()
    old_ref = weakref.ref(old)
    assert settle() is True  # the first settle is a full pass: `old` is alive and gets frozen
    assert gc.get_freeze_count() > 0
    del old  # garbage now, but frozen: only a full pass can see it

    young = Node()
    young_ref = weakref.ref(young)
    del young
    now[0] += 10
    assert settle() is False  # a light pass
    assert young_ref() is None  # allocated since the freeze: collected
    assert old_ref() is not None  # frozen garbage waits for the full pass

    now[0] += GC_FULL_EVERY_S
    assert settle() is True
    assert old_ref() is None


def test_a_light_pass_freezes_what_survives_it(frozen_heap: None) -> None:
    now = [0.0]
    settle = GcSettler(clock=lambda: now[0])
    settle()
    before = gc.get_freeze_count()
    survivors = [Node() for _ in range(1000)]
    now[0] += 1
    assert settle() is False
    assert gc.get_freeze_count() >= before + 1000
    assert all(n.me is n for n in survivors)
