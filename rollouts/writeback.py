"""Write-back: a run's outcome as an edit of the Rollout's YAML, so Git never goes stale (flagger#682).

Pure: files in, files out. The edit touches only the `stable:`/`canary:` values of one Rollout (and
removes its `approve:`, which approved a wave of this run only) and keeps every comment and the rest of
the layout. After the edit the Rollout has no active canary, so the write-back commit cannot start a new run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import yaml

from mesh.intent import is_intent_file
from rollouts.advance import REQUESTS, Check, CheckComparison, Decision, format_requests
from rollouts.statistics import percent, signed

TRAILER_ROLLOUT = "Lockgate-Rollout"
TRAILER_DECISION = "Lockgate-Decision"


MAX_FILE_BYTES = 1 << 20
"""As the loader's limit: a bigger file is refused before parsing, so it cannot hold an applied Rollout."""


def _scalar(node: yaml.Node, key: str) -> tuple[yaml.Node, yaml.Node] | None:
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value == key:
                return k, v
    return None


def _value(node: yaml.Node, *path: str) -> str | None:
    for key in path:
        hit = _scalar(node, key)
        if hit is None:
            return None
        node = hit[1]
    return str(node.value) if isinstance(node, yaml.ScalarNode) else None


def edit_rollout(
    files: Mapping[str, bytes],
    *,
    namespace: str,
    name: str,
    outcome: Literal["promoted", "rolled-back"],
    canary: str,
) -> dict[str, bytes] | None:
    """The changed file(s), or None when there is nothing to write: the Rollout is gone, or its canary
    is no longer `canary` (a human changed it since; their change wins)."""
    for path in sorted(files):
        if not is_intent_file(path) or len(files[path]) > MAX_FILE_BYTES:
            continue  # a file the loader refuses holds no Rollout lockgate applied: nothing to edit there
        try:
            text = files[path].decode("utf-8")
            docs = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
        except (UnicodeDecodeError, yaml.YAMLError, RecursionError, MemoryError):
            continue
        for doc in docs:
            if doc is None or _value(doc, "kind") != "Rollout" or _value(doc, "metadata", "name") != name:
                continue
            if (_value(doc, "metadata", "namespace") or "default") != namespace:
                continue
            spec = _scalar(doc, "spec")
            if spec is None:
                return None
            stable_kv, canary_kv = _scalar(spec[1], "stable"), _scalar(spec[1], "canary")
            if stable_kv is None or canary_kv is None or canary_kv[1].value != canary:
                return None
            edits: list[tuple[int, int, str]] = []
            if outcome == "promoted":
                edits.append((stable_kv[1].start_mark.index, stable_kv[1].end_mark.index, canary))
                edits.append(_drop(text, *canary_kv))
            else:
                edits.append((canary_kv[1].start_mark.index, canary_kv[1].end_mark.index, str(stable_kv[1].value)))
            if (approve_kv := _scalar(spec[1], "approve")) is not None and isinstance(approve_kv[1], yaml.ScalarNode):
                edits.append(_drop(text, *approve_kv))
            for start, end, new in sorted(edits, reverse=True):
                text = text[:start] + new + text[end:]
            return {path: text.encode("utf-8")}
    return None


def _drop(text: str, key: yaml.Node, value: yaml.Node) -> tuple[int, int, str]:
    """Remove `canary: v2` when it has a line of its own; otherwise make its value null."""
    line_start = text.rfind("\n", 0, key.start_mark.index) + 1
    line_end = text.find("\n", value.end_mark.index)
    line_end = len(text) if line_end < 0 else line_end + 1
    rest = text[value.end_mark.index:line_end].strip()
    if text[line_start:key.start_mark.index].strip() == "" and (rest == "" or rest.startswith("#")):
        return line_start, line_end, ""
    return value.start_mark.index, value.end_mark.index, "null"


def commit_message(*, namespace: str, name: str, decision: Decision, stable_before: str,
                   wave: str | None = None) -> str:
    """Subject says what happened; the body the reasons and the numbers; trailers make it parseable.
    `wave`: the run had waves, and this one was running (or being watched) at the outcome."""
    st = decision.state
    if decision.action == "promote":
        subject = f"rollout {namespace}/{name}: promote {st.canary} (stable {stable_before} -> {st.canary})"
    elif wave is not None:  # a fleet abort: every cluster, whichever wave it was in
        failed = sorted({c.cluster for c in decision.checks if c.effective == "fail" and c.cluster != "*"})
        subject = (f"rollout {namespace}/{name}: roll back {st.canary} in every cluster (100% to {st.stable}) "
                   f"in {wave}" + (f", failed at {', '.join(failed)}" if failed else ""))
    else:
        subject = f"rollout {namespace}/{name}: roll back {st.canary} (100% to {st.stable})"
    lines = [subject, ""]
    lines += [f"- {r}" for r in decision.reasons]
    if decision.checks:
        lines += ["", "metrics at the decision:"]
        lines += [f"  {format_check(c)}" for c in decision.checks]
    lines += ["", f"{TRAILER_ROLLOUT}: {namespace}/{name}",
              f"{TRAILER_DECISION}: {'promote' if decision.action == 'promote' else 'rollback'}"]
    if wave is not None:
        lines.append(f"Lockgate-Wave: {wave}")
    if st.canary_revision:
        lines.append(f"Lockgate-Canary-Revision: {st.canary_revision}")
    return "\n".join(lines) + "\n"


def format_check(c: Check) -> str:
    """One check as a line of the commit message and of `rollout status`."""
    bounds = ", ".join(x for x in (f"min {c.min:g}" if c.min is not None else "",
                                   f"max {c.max:g}" if c.max is not None else "") if x)
    held = f" [{c.effective}]" if c.result in ("no-data", "inconclusive") else ""
    if (n := c.comparison) is not None:
        return f"{c.metric}@{c.cluster}: vs {n.baseline}: {compared(n)} -> {c.result}{held}"
    if c.metric == REQUESTS:  # a count: whole numbers, though increase() extrapolates to fractions
        value = format_requests(c.value, minimum=c.min)
    else:
        value = "no values" if c.value is None else f"{c.value:.4g}"
    return f"{c.metric}@{c.cluster}: {value} ({bounds}) -> {c.result}{held}"


def compared(n: CheckComparison) -> str:
    """A comparison's numbers: the test, its statistic and one-sided p-value, the effect, the samples."""
    if n.p_value is None:
        return f"{n.why}, n={n.n_canary:g} vs {n.n_baseline:g}"
    rel = "n/a" if n.relative is None else percent(n.relative)
    effect = signed(n.effect)
    name = {"mann-whitney": "Mann-Whitney U", "fisher": "Fisher errors"}[n.test]
    label = "Hodges-Lehmann" if n.test == "mann-whitney" else "error rate"
    return (f"{name}={n.statistic:g} p={n.p_value:.3g} {label} {effect} ({rel}) "
            f"n={n.n_canary:g} vs {n.n_baseline:g}; {n.why}")
