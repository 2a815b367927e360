"""The corpus of invalid intent (tests/invalid/): each file has one defect and names the one error it must get.

Each file is added to repo-template/ under its own name and loaded as a commit would be; its first line
says `# expect: <path>:<line>: <message prefix>`. Exactly one error is allowed, so a defect that also
trips an unrelated check (or is missed) fails here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.load import load, read_worktree

ROOT = Path(__file__).resolve().parents[3]
CORPUS = ROOT / "tests" / "invalid"
PREFIX = "# expect: "


def test_corpus_is_big_enough() -> None:
    assert len(list(CORPUS.glob("*.yaml"))) >= 30


@pytest.mark.parametrize("name", sorted(p.name for p in CORPUS.glob("*.yaml")))
def test_invalid_file_gets_exactly_its_error(name: str) -> None:
    text = (CORPUS / name).read_text()
    first = text.splitlines()[0]
    assert first.startswith(PREFIX), f"{name}: first line must be `{PREFIX}<path>:<line>: <message>`"
    expected = first.removeprefix(PREFIX)
    assert expected.startswith(f"{name}:"), "the error must point into the corpus file itself"
    files = {**read_worktree(ROOT / "repo-template"), name: text.encode()}
    loaded = load(files)
    errors = [str(p) for p in loaded.problems]
    assert loaded.intent is None
    assert len(errors) == 1 and errors[0].startswith(expected), errors
