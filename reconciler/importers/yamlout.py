"""Block-style YAML with a comment on every value: where an imported value came from.

PyYAML drops comments, so the importers build a small tree instead: `Val` (a scalar and its note), `Noted`
(a mapping or list and the note of its key line) and `Comment` (a line of its own), inside plain dicts
and lists. `emit` writes it the way the repo template is written (two-space indents, lists indented
under their key); `plain` strips the notes, which is what the YAML loads back as.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import yaml

Scalar = str | int | float | bool


@dataclass(frozen=True)
class Val:
    value: Scalar
    note: str | None = None


@dataclass(frozen=True)
class Noted:
    value: dict[str, Any] | list[Any]
    note: str


@dataclass(frozen=True)
class Comment:
    """A comment line in a mapping (its key is only a placeholder) or a list."""

    text: str


_PLAIN = re.compile(r"^[A-Za-z0-9_/][A-Za-z0-9_./*-]*$")


def scalar(value: Scalar) -> str:
    """A YAML scalar that loads back as exactly `value`: plain when that is unambiguous, else JSON-quoted."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return json.dumps(value)
    if _PLAIN.match(value) and yaml.safe_load(value) == value:
        return value
    return json.dumps(value)


def _key(key: str) -> str:
    return scalar(key)


def _suffix(note: str | None) -> str:
    return f"  # {_one_line(note)}" if note else ""


def _one_line(text: str) -> str:
    return " ".join(text.split())


def plain(node: Any) -> Any:
    """The data the emitted YAML loads as."""
    if isinstance(node, Val):
        return node.value
    if isinstance(node, Noted):
        return plain(node.value)
    if isinstance(node, dict):
        return {k: plain(v) for k, v in node.items() if not isinstance(v, Comment)}
    if isinstance(node, list):
        return [plain(v) for v in node if not isinstance(v, Comment)]
    return node


def _empty(node: Any) -> bool:
    return isinstance(node, dict | list) and not [v for v in (node.values() if isinstance(node, dict) else node)
                                                  if not isinstance(v, Comment)]


def _mapping(node: dict[str, Any], indent: int) -> list[str]:
    pad, out = " " * indent, []
    for key, value in node.items():
        note = None
        if isinstance(value, Comment):
            out.append(f"{pad}# {_one_line(value.text)}")
            continue
        if isinstance(value, Noted):
            note = value.note
            value = value.value
        if isinstance(value, Val):
            out.append(f"{pad}{_key(key)}: {scalar(value.value)}{_suffix(value.note)}")
        elif _empty(value):
            out.append(f"{pad}{_key(key)}: {'{}' if isinstance(value, dict) else '[]'}{_suffix(note)}")
        elif isinstance(value, dict):
            out.append(f"{pad}{_key(key)}:{_suffix(note)}")
            out += _mapping(value, indent + 2)
        elif isinstance(value, list):
            out.append(f"{pad}{_key(key)}:{_suffix(note)}")
            out += _sequence(value, indent + 2)
        else:
            out.append(f"{pad}{_key(key)}: {scalar(value)}{_suffix(note)}")
    return out


def _sequence(node: list[Any], indent: int) -> list[str]:
    pad, out = " " * indent, []
    for item in node:
        note = None
        if isinstance(item, Comment):
            out.append(f"{pad}# {_one_line(item.text)}")
            continue
        if isinstance(item, Noted):
            note = item.note
            item = item.value
        if isinstance(item, Val):
            out.append(f"{pad}- {scalar(item.value)}{_suffix(item.note)}")
        elif _empty(item):
            out.append(f"{pad}- {'{}' if isinstance(item, dict) else '[]'}{_suffix(note)}")
        elif isinstance(item, dict):
            if note:
                out.append(f"{pad}# {_one_line(note)}")
            lines = _mapping(item, indent + 2)
            first = next(i for i, line in enumerate(lines) if not line.lstrip().startswith("#"))
            lines[first] = f"{pad}- {lines[first][indent + 2:]}"
            out += lines
        elif isinstance(item, list):
            raise ValueError("a list directly inside a list is not emitted (no lockgate field has one)")
        else:
            out.append(f"{pad}- {scalar(item)}{_suffix(note)}")
    return out


def emit(documents: list[tuple[list[str], dict[str, Any]]]) -> str:
    """YAML documents separated by `---`, each preceded by its comment lines."""
    parts = []
    for comments, doc in documents:
        lines = [f"# {_one_line(c)}" for c in comments] + _mapping(doc, 0)
        parts.append("\n".join(lines) + "\n")
    return "---\n".join(parts)
