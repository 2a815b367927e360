"""Waves: a rollout across clusters, one group of clusters at a time. Pure helpers over `spec.waves`.

A Rollout without `waves` is one wave of every cluster where the canary runs, all moved together (the
weight is the same in every cluster, as before waves existed). With `waves` (canary strategy) the steps
run in one wave's clusters at a time, judged by their metrics; a wave that passes its last step serves
100% canary, the next one bakes (`bake`), waits for approval (`approval: manual`) and starts at the first
step; the last wave's pass promotes. See `rollouts.advance` for the transitions.
"""

from __future__ import annotations

from collections.abc import Sequence

from rollouts.intent import RolloutSpec, WaveSpec


def is_waved(spec: RolloutSpec) -> bool:
    """Whether the run moves wave by wave (per-cluster weights) rather than everywhere at once."""
    return spec.strategy == "canary" and bool(spec.waves)


def wave_at(spec: RolloutSpec, index: int) -> WaveSpec:
    """The wave at `index`, clamped: a state written before `waves` was shortened in Git still has one."""
    return spec.waves[max(0, min(index, len(spec.waves) - 1))]


def is_last(spec: RolloutSpec, index: int) -> bool:
    return index + 1 >= len(spec.waves)


def label(spec: RolloutSpec, index: int) -> str:
    """How reasons and status name a wave: `waves[1] west (west, central)`, or `waves[1] (west, central)`."""
    w = wave_at(spec, index)
    return f"waves[{index}]{' ' + w.name if w.name else ''} ({', '.join(w.clusters)})"


def approved_in_git(spec: RolloutSpec, index: int) -> bool:
    """`spec.approve` names this wave, by its index in `waves` or by its name."""
    a = spec.approve
    if a is None or isinstance(a, bool):
        return False
    if isinstance(a, int):
        return a == index
    return wave_at(spec, index).name == a


def approve_hint(spec: RolloutSpec, index: int) -> str:
    """What a person does to open a wave's approval gate."""
    w = wave_at(spec, index)
    return f"`lockgate rollout approve` or `spec.approve: {w.name or index}` in Git"


def clusters_before(spec: RolloutSpec, index: int) -> list[str]:
    """Every cluster of the waves before `index` (the ones serving 100% canary once `index` runs)."""
    return [c for w in spec.waves[:index] for c in w.clusters]


def all_clusters(spec: RolloutSpec) -> list[str]:
    return [c for w in spec.waves for c in w.clusters]


def weights_for(spec: RolloutSpec, index: int, weight: int, *, base: dict[str, int] | None = None
                ) -> dict[str, int]:
    """Per-cluster canary weights while wave `index` runs at `weight`: earlier waves 100, its own
    `weight`, later ones absent (0: all on the stable)."""
    out = dict(base or {})
    out.update({c: 100 for c in clusters_before(spec, index)})
    out.update({c: weight for c in wave_at(spec, index).clusters})
    return out


def default_clusters(canary_clusters: Sequence[str]) -> list[str]:
    """The one wave of a Rollout without `waves`: every cluster where the canary runs."""
    return sorted(set(canary_clusters))
