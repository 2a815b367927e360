"""The decision core: `advance(spec, state, observations) -> Decision`. Pure: no clock, no I/O.

The controller calls it on every tick with the time, any manual command and (when an analysis is due)
what Prometheus said; it persists the returned state and applies the returned weights. Keeping every
rule here, as a table-tested function, is what Flagger's scheduler (weights computed on the object that
also does the I/O) makes hard.

Lifecycle of one run::

    idle ──spec.canary changes──► progressing ──analyses pass through every step──► promoted
                                     │  ▲ hold (no data, provider offline, paused)
                                     │  └─ failed analysis below failureThreshold
                                     └──failureThreshold failed analyses, abort, or a `rollback` hook──► rolled-back

A run with `confirm-rollout` or `pre-rollout` hooks starts with no traffic on the canary (`waiting_for`):
the `confirm-rollout` gate first (until it answers 2xx), then the `pre-rollout` hooks (once; each failure
is a failed check); only then does the first step move traffic. A run that ends by promotion or rollback
has its `post-rollout` hooks called once afterwards (`post_rollout_due`); their answer never changes it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from mesh.intent import Destination
from rollouts.intent import HookType, MetricSpec, NoData, RolloutSpec
from rollouts.statistics import Comparison, compare_counts, compare_series, describe
from rollouts.waves import (
    approve_hint,
    approved_in_git,
    is_last,
    is_waved,
    label,
    wave_at,
    weights_for,
)

Phase = Literal["idle", "progressing", "promoted", "rolled-back"]
Action = Literal["none", "wait", "start", "step", "hold", "promote", "rollback", "pause", "resume", "reset", "wave",
                 "approve"]
"""`wave`: a wave transition (a wave passed its last step, a bake ended, a wave started); `approve`: a
wave's approval gate opened (by command or `spec.approve`) and it started."""
Command = Literal["promote", "abort", "pause", "resume", "approve"]
Result = Literal["pass", "fail", "no-data", "inconclusive"]
PreTraffic = Literal["confirm-rollout", "pre-rollout"]
REQUESTS = "requests"
"""Name of the check every analysis makes first: enough canary requests to judge anything."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", alias_generator=to_camel, populate_by_name=True)


class RolloutState(_Frozen):
    """What survives a restart (persisted atomically after every change)."""

    phase: Phase = "idle"
    stable: str
    """The version that takes the traffic the canary does not (after promotion: the promoted one)."""
    canary: str | None = None
    """Canary of the current or last run."""
    observed_canary: str | None = None
    """spec.canary as last seen: a run starts only when Git changes it, so restarts never restart a run."""
    canary_revision: str | None = None
    """Git commit that started the run."""
    step: int = 0
    """Index into spec.steps (canary strategy)."""
    weight: int = 0
    """Share of the default rule's traffic the canary gets now, in percent."""
    iteration: int = 0
    """Passed analyses at full exposure (ab, bluegreen, mirror)."""
    failed_checks: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    next_analysis_at: float | None = None
    """None while paused: the countdown restarts on resume."""
    paused: bool = False
    """Paused by command (spec.paused pauses from Git)."""
    waiting_for: PreTraffic | None = None
    """The hooks a run started in Git waits for before any traffic moves (the phase stays progressing, so
    every reader of `phase` sees a run in progress; the weight stays 0 and render sees no canary)."""
    post_rollout_due: bool = False
    """The run ended by promotion or rollback and its `post-rollout` hooks are yet to be called (once)."""
    wave: int = 0
    """spec.waves: index of the wave whose steps run now (or which bakes or waits for approval)."""
    weights: dict[str, int] | None = None
    """spec.waves: the canary's weight per cluster (absent: 0, all on the stable), kept as it was at the
    run's end. None: one wave, `weight` in every cluster."""
    bake_until: float | None = None
    """spec.waves: when the bake before the current wave ends (the previous wave is judged meanwhile)."""
    waiting_for_approval: bool = False
    """spec.waves: the current wave waits for `approval: manual` (the previous wave is judged meanwhile)."""


class PartialData(_Frozen):
    """Prometheus holds only part of a cluster's analysis window (restarted, or the canary is new)."""

    covered: float
    """Seconds of the interval it has samples for."""
    why: str


class CompareData(_Frozen):
    """What a `compare` metric measured in one cluster: the canary's and the baseline's per-sample
    series (values, one per scrape step), or their error and request counts (request-success-rate)."""

    canary: tuple[float, ...] = ()
    baseline: tuple[float, ...] = ()
    counts: tuple[float, float, float, float] | None = None
    """canary errors, canary requests, baseline errors, baseline requests."""


class HookAnswer(_Frozen):
    """What a webhook answered this analysis: ok means 2xx."""

    ok: bool
    detail: str


class Observations(_Frozen):
    """What the metric provider said for one analysis."""

    online: bool = True
    requests: Mapping[str, float | None] = Field(default_factory=dict)
    """cluster -> canary requests served in the interval (None: no values found)."""
    values: Mapping[str, Mapping[str, float | None]] = Field(default_factory=dict)
    """metric name -> cluster -> value (None: no values found, e.g. an idle canary)."""
    errors: Mapping[str, str] = Field(default_factory=dict)
    """metric name -> query error, reported in the reasons."""
    partial: Mapping[str, PartialData] = Field(default_factory=dict)
    """cluster -> its window is only partly in Prometheus: every check there is no-data, whatever the values."""
    compared: Mapping[str, Mapping[str, CompareData]] = Field(default_factory=dict)
    """metric name -> cluster -> what its comparison measured (metrics with `compare`)."""
    hooks: Mapping[str, HookAnswer] = Field(default_factory=dict)
    """webhook name -> its answer (the hooks `hooks_due` named)."""


class CheckComparison(_Frozen):
    """The numbers of a comparison check (see rollouts.statistics.Comparison)."""

    baseline: str
    test: Literal["mann-whitney", "fisher"]
    statistic: float | None
    p_value: float | None
    effect: float | None
    relative: float | None
    """None also when the baseline's is 0 (an infinite increase: `why` says +inf%), so JSON stays JSON."""
    n_canary: float
    n_baseline: float
    why: str


class Check(_Frozen):
    metric: str
    cluster: str
    value: float | None
    requests: float | None
    min: float | None = None
    max: float | None = None
    result: Result
    effective: Literal["pass", "fail", "hold"]
    """The result after the no-data policy (which an inconclusive comparison follows too)."""
    detail: str
    comparison: CheckComparison | None = None


class Decision(_Frozen):
    action: Action
    state: RolloutState
    reasons: tuple[str, ...] = ()
    checks: tuple[Check, ...] = ()
    at: float

    @property
    def outcome(self) -> Literal["promoted", "rolled-back"] | None:
        """Set when this decision ended a run (what write-back commits)."""
        if self.action == "promote":
            return "promoted"
        if self.action == "rollback":
            return "rolled-back"
        return None


def initial_state(spec: RolloutSpec) -> RolloutState:
    """A Rollout seen for the first time with a canary starts a run on the first advance."""
    return RolloutState(stable=spec.stable)


def analysis_due(spec: RolloutSpec, state: RolloutState, *, now: float) -> bool:
    """Whether the controller should observe before calling advance: query metrics (an analysis) and/or
    call the hooks `hooks_due` names (also for a finished run whose post-rollout hooks are due)."""
    if state.phase in ("promoted", "rolled-back"):
        return state.post_rollout_due
    return (state.phase == "progressing" and not (spec.paused or state.paused)
            and state.next_analysis_at is not None and now >= state.next_analysis_at
            and judged_clusters(spec, state) != [])


def judged_clusters(spec: RolloutSpec, state: RolloutState) -> list[str] | None:
    """The clusters an analysis judges now. None: one wave, every cluster where the canary runs (the
    controller knows them). With waves: the current wave's; while the next wave bakes or waits for
    approval, the wave before it (serving 100% canary, still watched: a failure there aborts the run);
    none before the first wave starts (it waits for approval, no traffic moved)."""
    if not is_waved(spec):
        return None
    if _between_waves(state):
        return list(wave_at(spec, state.wave - 1).clusters) if state.wave > 0 else []
    return list(wave_at(spec, state.wave).clusters)


def judged_wave(spec: RolloutSpec, state: RolloutState) -> int:
    """Index of the wave whose clusters `judged_clusters` names."""
    return state.wave - 1 if _between_waves(state) and state.wave > 0 else min(state.wave, len(spec.waves) - 1)


def _between_waves(state: RolloutState) -> bool:
    return state.bake_until is not None or state.waiting_for_approval


def needs_metrics(state: RolloutState) -> bool:
    """Whether an observation due now queries Prometheus: not before traffic moves, nor after the run."""
    return state.phase == "progressing" and state.waiting_for is None


def advance(
    spec: RolloutSpec,
    state: RolloutState | None,
    observations: Observations | None,
    *,
    now: float,
    revision: str | None = None,
    command: Command | None = None,
) -> Decision:
    """The next step of one rollout. `observations` matter only when `analysis_due` said so."""
    d = _advance(spec, state, observations, now=now, revision=revision, command=command)
    if d.action == "rollback" and state is not None and state.phase == "progressing" and is_waved(spec):
        served = ", ".join(f"{w}% in {c}" for c, w in sorted((state.weights or {}).items()) if w > 0)
        fleet = (f"fleet abort in {label(spec, judged_wave(spec, state))}: every cluster back to 100% "
                 f"{d.state.stable} at once" + (f" (the canary had {served})" if served else ""))
        d = d.model_copy(update={"reasons": (*d.reasons[:-1], fleet, *d.reasons[-1:])})
    if d.outcome is not None and any(h.type == "post-rollout" for h in spec.webhooks):
        return d.model_copy(update={"state": d.state.model_copy(update={"post_rollout_due": True})})
    return d


def _advance(spec: RolloutSpec, state: RolloutState | None, observations: Observations | None, *, now: float,
             revision: str | None, command: Command | None) -> Decision:
    st = state if state is not None else initial_state(spec)
    canary = spec.active_canary

    if spec.canary != st.observed_canary or (state is None and canary is not None):
        if canary is None:
            ended = st.phase == "progressing"
            if st.phase in ("promoted", "rolled-back"):  # the outcome written back: it stays until the next run
                new = st.model_copy(update={"stable": spec.stable, "observed_canary": spec.canary})
            else:
                new = RolloutState(stable=spec.stable, observed_canary=spec.canary, canary=st.canary,
                                   canary_revision=st.canary_revision)
            reason = (f"canary removed in Git: run ended, 100% to {spec.stable}" if ended
                      else f"no canary: 100% to {spec.stable}")
            return Decision(action="reset" if ended else "none", state=new, reasons=(reason,), at=now)
        waiting = _pre_traffic(spec)
        new = RolloutState(
            phase="progressing", stable=spec.stable, canary=canary, observed_canary=spec.canary,
            canary_revision=revision, step=0, weight=0 if waiting else _first_weight(spec), started_at=now,
            next_analysis_at=None if spec.paused else now if waiting else now + spec.interval_s,
            waiting_for=waiting,
        )
        if is_waved(spec):
            new = new.model_copy(update={"weight": 0, "weights": {}, "wave": 0})
            if not waiting:
                return _enter(spec, new, now=now, action="start", reasons=(f"new canary {canary} in Git",))
        exposure = (f"no traffic to {canary} until its {waiting} webhooks answer 2xx" if waiting
                    else _exposure(spec, new))
        return Decision(action="start", state=new, at=now, reasons=(f"new canary {canary} in Git: {exposure}",))

    if st.phase != "progressing":
        if st.post_rollout_due and observations is not None:
            return _post_rollout(spec, st, observations, now=now)
        # Git's stable rules once Git has no canary; before that (writeBack: off) a promoted stable stays.
        if st.stable != spec.stable and (st.phase == "idle" or canary is None):
            return Decision(action="none", state=st.model_copy(update={"stable": spec.stable}), at=now,
                            reasons=(f"stable is now {spec.stable}",))
        reason = "no run in progress" + (f": command {command!r} ignored" if command else "")
        return Decision(action="none", state=st, reasons=(reason,), at=now)

    if command == "abort":
        return _rollback(st, now=now, reasons=("aborted by command",))
    if command == "promote":
        if is_waved(spec):  # the current wave's remaining steps only: later waves still bake, wait and step
            return _wave_passed(spec, st, now=now, reasons=(
                f"promoted by command: the remaining steps of {label(spec, st.wave)} skipped",))
        return _promote(st, now=now, reasons=("promoted by command",))
    if command == "approve":
        return _approve(spec, st, now=now)
    if command == "pause":
        return Decision(action="pause", state=st.model_copy(update={"paused": True, "next_analysis_at": None}),
                        reasons=("paused by command",), at=now)
    if command == "resume" and st.paused:
        st = st.model_copy(update={"paused": False})
        if not spec.paused:
            st = st.model_copy(update={"next_analysis_at": now + spec.interval_s})
            return Decision(action="resume", state=st, reasons=("resumed by command",), at=now)

    if spec.paused or st.paused:
        why = "paused in Git (spec.paused: true)" if spec.paused else "paused by command"
        changed = st.next_analysis_at is not None
        return Decision(action="pause" if changed else "wait", state=st.model_copy(update={"next_analysis_at": None}),
                        reasons=(why,), at=now)
    if st.next_analysis_at is None:  # unpaused in Git: restart the countdown
        return Decision(action="resume", state=st.model_copy(update={"next_analysis_at": now + spec.interval_s}),
                        reasons=("resumed (spec.paused is false)",), at=now)
    if is_waved(spec):
        if st.bake_until is not None and now >= st.bake_until:
            return _enter(spec, st.model_copy(update={"bake_until": None}), now=now, action="wave",
                          reasons=(f"{label(spec, st.wave)} baked {wave_at(spec, st.wave).bake}",))
        if st.waiting_for_approval and approved_in_git(spec, st.wave):
            return _start_wave(spec, st, now=now, action="approve",
                               reasons=(f"{label(spec, st.wave)} approved in Git (spec.approve: {spec.approve})",))
    if now < st.next_analysis_at or observations is None:
        return Decision(action="wait", state=st, at=now,
                        reasons=(f"next analysis in {max(0.0, st.next_analysis_at - now):.1f}s",))

    later = st.model_copy(update={"next_analysis_at": now + spec.interval_s})
    if asked := [(h.name, a) for h in spec.webhooks if h.type == "rollback"
                 and (a := observations.hooks.get(h.name)) is not None and a.ok]:
        why = "; ".join(f"{n}: {a.detail}" for n, a in asked)
        return _rollback(later, now=now, reasons=(f"rollback webhook answered 2xx (a manual rollback): {why}",))
    if st.waiting_for is not None:
        return _before_traffic(spec, st, later, observations, now=now)
    if not observations.online:
        return Decision(action="hold", state=later, at=now,
                        reasons=("metrics provider offline: holding at the current step, never promoting blind",))
    judged = judged_clusters(spec, st)
    if judged is not None:
        if not judged:  # the first wave waits for approval: no traffic moved, nothing to judge
            return Decision(action="wait", state=later, at=now,
                            reasons=(f"{label(spec, st.wave)} waits for approval before any traffic moves",))
        observations = _only(observations, judged)
    where = f" in {label(spec, judged_wave(spec, st))}" if judged else ""
    checks = judge(spec, observations, label_clusters=judged is not None)
    failed = [c for c in checks if c.effective == "fail"]
    held = [c for c in checks if c.effective == "hold"]
    errors = tuple(f"{name}: {err}" for name, err in sorted(observations.errors.items()))
    if failed:
        count = st.failed_checks + 1
        reasons = (f"analysis failed ({count}/{spec.analysis.failure_threshold}){where}: "
                   + "; ".join(c.detail for c in failed), *errors)
        if count >= spec.analysis.failure_threshold:
            return _rollback(later.model_copy(update={"failed_checks": count}), now=now, reasons=reasons,
                             checks=tuple(checks))
        return Decision(action="hold", state=later.model_copy(update={"failed_checks": count}), at=now,
                        reasons=reasons, checks=tuple(checks))
    if held:
        return Decision(action="hold", state=later, at=now, checks=tuple(checks),
                        reasons=("holding: " + "; ".join(c.detail for c in held), *errors))
    passed = f"analysis passed{where}: " + "; ".join(c.detail for c in checks)
    if judged and _between_waves(st):  # the soak: the wave that passed is watched, nothing moves
        pending = (f"bakes {max(0.0, (st.bake_until or now) - now):.1f}s more" if st.bake_until is not None
                   else f"waits for approval: {approve_hint(spec, st.wave)}")
        return Decision(action="wait", state=later, at=now, checks=tuple(checks),
                        reasons=(passed, f"{label(spec, st.wave)} {pending}"))
    gate = gate_for(spec, st)
    closed = [(h.name, observations.hooks.get(h.name)) for h in spec.webhooks if h.type == gate]
    if closed := [(n, a) for n, a in closed if a is None or not a.ok]:
        why = "; ".join(f"{n}: {a.detail if a else 'not called'}" for n, a in closed)
        return Decision(action="hold", state=later, at=now, checks=tuple(checks),
                        reasons=(passed, f"waiting for {gate} webhook: {why}"))
    if spec.strategy == "canary":
        if st.step + 1 >= len(spec.steps):
            if is_waved(spec):
                return _wave_passed(spec, later, now=now, reasons=(passed,), checks=tuple(checks))
            return _promote(later, now=now, reasons=(passed,), checks=tuple(checks))
        weight = spec.steps[st.step + 1]
        nxt = later.model_copy(update={"step": st.step + 1, "weight": weight})
        if is_waved(spec):
            nxt = nxt.model_copy(update={"weights": weights_for(spec, st.wave, weight, base=st.weights)})
        return Decision(action="step", state=nxt, at=now, checks=tuple(checks),
                        reasons=(passed, f"step {st.step + 2}/{len(spec.steps)}: {weight}% "
                                 f"to {st.canary}" + (f" in {label(spec, st.wave)}" if is_waved(spec) else "")))
    iteration = st.iteration + 1
    if iteration >= spec.iterations:
        return _promote(later.model_copy(update={"iteration": iteration}), now=now, reasons=(passed,),
                        checks=tuple(checks))
    return Decision(action="step", state=later.model_copy(update={"iteration": iteration}), at=now,
                    checks=tuple(checks), reasons=(passed, f"iteration {iteration}/{spec.iterations} passed"))


Gate = Literal["confirm-rollout", "confirm-traffic-increase", "confirm-promotion"]


def gate_for(spec: RolloutSpec, state: RolloutState) -> Gate | None:
    """Which gate the run must clear now: the start of traffic while the run waits for `confirm-rollout`;
    then promotion at the last step (or iteration), or a step up before it (canary only: other strategies
    do not change the traffic until promotion). None while `pre-rollout` hooks are due: they are checks
    (a failure counts), not a gate."""
    if state.phase != "progressing":
        return None
    if state.waiting_for is not None:
        return "confirm-rollout" if state.waiting_for == "confirm-rollout" else None
    if is_waved(spec) and _between_waves(state):
        return None  # a soak moves no traffic: nothing to confirm
    last = state.step + 1 >= len(spec.steps) if spec.strategy == "canary" else state.iteration + 1 >= spec.iterations
    if last:  # a wave's last step before the last wave's is a traffic increase (the wave goes to 100%)
        return "confirm-promotion" if not is_waved(spec) or is_last(spec, state.wave) else "confirm-traffic-increase"
    return "confirm-traffic-increase" if spec.strategy == "canary" else None


def hooks_due(spec: RolloutSpec, state: RolloutState) -> list[str]:
    """The webhooks to call now, in spec order: before traffic moves, the hooks it waits for; during the
    analyses, every `rollout` hook and the gate's; in both, the `rollback` hooks (a 2xx rolls back); after
    a promotion or rollback, the `post-rollout` hooks once."""
    types: set[HookType]
    if state.phase in ("promoted", "rolled-back"):
        types = {"post-rollout"} if state.post_rollout_due else set()
    elif state.phase != "progressing":
        types = set()
    elif state.waiting_for is not None:
        types = {state.waiting_for, "rollback"}
    else:
        types = {"rollout", "rollback"}
        if (gate := gate_for(spec, state)) is not None:
            types.add(gate)
    return [h.name for h in spec.webhooks if h.type in types]


def _pre_traffic(spec: RolloutSpec) -> PreTraffic | None:
    """What a new run waits for before its first step: the confirm-rollout gate first, then pre-rollout."""
    types = {h.type for h in spec.webhooks}
    return "confirm-rollout" if "confirm-rollout" in types else "pre-rollout" if "pre-rollout" in types else None


def _answers(spec: RolloutSpec, obs: Observations, kind: HookType) -> tuple[list[str], list[str]]:
    """The answers of the hooks of one type, as `name: answer`: (the 2xx ones, the others)."""
    ok: list[str] = []
    bad: list[str] = []
    for h in spec.webhooks:
        if h.type == kind:
            a = obs.hooks.get(h.name)
            (ok if a is not None and a.ok else bad).append(f"{h.name}: {a.detail if a else 'not called'}")
    return ok, bad


def _before_traffic(spec: RolloutSpec, st: RolloutState, later: RolloutState, obs: Observations, *,
                    now: float) -> Decision:
    """A run waiting for its confirm-rollout gate (closed: it waits, never fails) or its pre-rollout hooks
    (a failure is a failed check: retried each interval, rolled back at failureThreshold)."""
    kind = st.waiting_for
    assert kind is not None
    ok, bad = _answers(spec, obs, kind)
    if kind == "confirm-rollout":
        if bad:
            return Decision(action="hold", state=later, at=now,
                            reasons=(f"waiting for confirm-rollout webhook: {'; '.join(bad)}",))
        opened = f"confirm-rollout webhook {'; '.join(ok)}"
        if any(h.type == "pre-rollout" for h in spec.webhooks):  # called at the next tick, not an interval later
            return Decision(action="hold", state=later.model_copy(update={"waiting_for": "pre-rollout",
                                                                          "next_analysis_at": now}), at=now,
                            reasons=(opened, "calling the pre-rollout webhooks before any traffic moves"))
        return _first_step(spec, later, now=now, reasons=(opened,))
    if bad:
        count = st.failed_checks + 1
        reasons = (f"pre-rollout webhook failed ({count}/{spec.analysis.failure_threshold}): {'; '.join(bad)}",)
        failed = later.model_copy(update={"failed_checks": count})
        if count >= spec.analysis.failure_threshold:
            return _rollback(failed, now=now, reasons=reasons)
        return Decision(action="hold", state=failed, at=now, reasons=reasons)
    return _first_step(spec, later, now=now, reasons=(f"pre-rollout webhook {'; '.join(ok)}",))


def _first_step(spec: RolloutSpec, later: RolloutState, *, now: float, reasons: tuple[str, ...]) -> Decision:
    """Traffic moves: the first step's weight (or the ab/bluegreen/mirror exposure), analyses from now on."""
    if is_waved(spec):  # the first wave's approval gate, if it has one, comes after the hooks
        return _enter(spec, later.model_copy(update={"waiting_for": None}), now=now, action="step", reasons=reasons)
    nxt = later.model_copy(update={"waiting_for": None, "weight": _first_weight(spec),
                                   "next_analysis_at": now + spec.interval_s})
    return Decision(action="step", state=nxt, at=now, reasons=(*reasons, _exposure(spec, nxt)))


def _wave_passed(spec: RolloutSpec, st: RolloutState, *, now: float, reasons: tuple[str, ...],
                 checks: tuple[Check, ...] = ()) -> Decision:
    """The current wave passed its last step (or was promoted by command): its clusters serve 100%
    canary; the next wave bakes, waits for approval or starts; after the last wave, the run is promoted."""
    i = st.wave
    done = f"{label(spec, i)} passed: 100% to {st.canary} there"
    if is_last(spec, i):
        full = st.model_copy(update={"weights": weights_for(spec, i, 100, base=st.weights)})
        return _promote(full, now=now, reasons=(*reasons, done), checks=checks)
    nxt = i + 1
    moved = st.model_copy(update={"wave": nxt, "step": 0, "weight": 0, "bake_until": None,
                                  "waiting_for_approval": False, "weights": weights_for(spec, nxt, 0, base=st.weights)})
    bake = wave_at(spec, nxt)
    if bake.bake_s > 0:
        return Decision(action="wave", state=moved.model_copy(update={"bake_until": now + bake.bake_s}), at=now,
                        checks=checks, reasons=(*reasons, done, f"{label(spec, nxt)} bakes {bake.bake} before it "
                                                f"starts ({label(spec, i)} is judged meanwhile)"))
    return _enter(spec, moved, now=now, action="wave", reasons=(*reasons, done), checks=checks)


def _enter(spec: RolloutSpec, st: RolloutState, *, now: float, action: Action, reasons: tuple[str, ...],
           checks: tuple[Check, ...] = ()) -> Decision:
    """The current wave is due (the run started, the wave before passed, or its bake ended): it waits
    for approval if it asks for one (unless `spec.approve` names it already), else it starts."""
    i = st.wave
    if wave_at(spec, i).approval == "manual":
        if not approved_in_git(spec, i):
            return Decision(action=action, state=st.model_copy(update={"waiting_for_approval": True,
                                                                       "bake_until": None}),
                            at=now, checks=checks,
                            reasons=(*reasons, f"{label(spec, i)} waits for approval: {approve_hint(spec, i)}"))
        reasons = (*reasons, f"{label(spec, i)} approved in Git (spec.approve: {spec.approve})")
    return _start_wave(spec, st, now=now, action=action, reasons=reasons, checks=checks)


def _start_wave(spec: RolloutSpec, st: RolloutState, *, now: float, action: Action, reasons: tuple[str, ...],
                checks: tuple[Check, ...] = ()) -> Decision:
    """The current wave's first step: its clusters get the first weight, judged from one interval on."""
    i = st.wave
    first = _first_weight(spec)
    nxt = st.model_copy(update={
        "step": 0, "weight": first, "weights": weights_for(spec, i, first, base=st.weights), "bake_until": None,
        "waiting_for_approval": False, "waiting_for": None,
        "next_analysis_at": None if spec.paused or st.paused else now + spec.interval_s})
    return Decision(action=action, state=nxt, at=now, checks=checks, reasons=(
        *reasons, f"{label(spec, i)} starts: step 1/{len(spec.steps)}: {first}% to {st.canary} in "
        f"{', '.join(wave_at(spec, i).clusters)}"))


def _approve(spec: RolloutSpec, st: RolloutState, *, now: float) -> Decision:
    """`lockgate rollout approve`: the wave waiting for approval starts (a paused run stays paused)."""
    if not is_waved(spec) or not st.waiting_for_approval:
        why = (f"{label(spec, st.wave)} bakes {max(0.0, st.bake_until - now):.1f}s more, then asks"
               if is_waved(spec) and st.bake_until is not None else "no wave waits for approval")
        return Decision(action="none", state=st, at=now, reasons=(f"approve ignored: {why}",))
    if spec.paused or st.paused:
        return Decision(action="none", state=st, at=now, reasons=("approve ignored: the run is paused; resume it, "
                                                                  "then approve",))
    return _start_wave(spec, st, now=now, action="approve", reasons=(f"{label(spec, st.wave)} approved by command",))


def _only(obs: Observations, clusters: list[str]) -> Observations:
    """The observations of these clusters only: with waves, the others' numbers judge nothing."""
    keep = set(clusters)
    return obs.model_copy(update={
        "requests": {c: v for c, v in obs.requests.items() if c in keep},
        "values": {m: {c: v for c, v in by.items() if c in keep} for m, by in obs.values.items()},
        "partial": {c: v for c, v in obs.partial.items() if c in keep},
        "compared": {m: {c: v for c, v in by.items() if c in keep} for m, by in obs.compared.items()}})


def _post_rollout(spec: RolloutSpec, st: RolloutState, obs: Observations, *, now: float) -> Decision:
    """The post-rollout hooks were called: their answers are reported, the outcome stands whatever they said."""
    ok, bad = _answers(spec, obs, "post-rollout")
    reasons = ((f"post-rollout webhook {'; '.join(ok)}",) if ok else ()) + (
        (f"post-rollout webhook failed (the {st.phase} outcome stands): {'; '.join(bad)}",) if bad else ())
    return Decision(action="none", state=st.model_copy(update={"post_rollout_due": False}), at=now, reasons=reasons)


def judge(spec: RolloutSpec, obs: Observations, *, label_clusters: bool = False) -> list[Check]:
    """Every check of one analysis: canary requests per cluster first, then each metric per cluster
    (`label_clusters`: each detail names its cluster, also when there is one, as a wave's reasons do).

    A cluster whose window is partial is never judged: each check is no-data (its own policy applies),
    because `rate()` over a few seconds extrapolated to the interval would pass or fail on noise."""
    a = spec.analysis
    out: list[Check] = []
    clusters = sorted(set(obs.requests) | set(obs.partial)) or ["*"]
    for cluster in clusters:
        req = obs.requests.get(cluster)
        enough = req is not None and req >= a.min_requests  # the raw (extrapolated) count, never rounded up
        where = f"@{cluster}" if len(clusters) > 1 or label_clusters else ""
        shown = format_requests(req, minimum=a.min_requests)
        if (gap := obs.partial.get(cluster)) is not None:
            part = f"only {_tenths(gap.covered)} s of {spec.interval_s:g} s of data ({gap.why})"
            out.append(_no_data(REQUESTS, cluster, req, a.no_data, min_=a.min_requests,
                                detail=f"requests{where}: {part}"))
            out.extend(_no_data(name, cluster, obs.values.get(m.name, {}).get(cluster), m.no_data or a.no_data,
                                m=m, requests=req, detail=f"{name}{where}: {part}")
                       for m in a.metrics for name in _check_names(m))
            continue
        if enough:
            out.append(Check(metric=REQUESTS, cluster=cluster, value=req, requests=req, min=a.min_requests,
                             result="pass", effective="pass", detail=f"requests{where} {shown} >= {a.min_requests}"))
        else:
            out.append(_no_data(REQUESTS, cluster, req, a.no_data, min_=a.min_requests,
                                detail=f"requests{where} {shown} < minRequests {a.min_requests}"))
        for m in a.metrics:
            value = obs.values.get(m.name, {}).get(cluster)
            policy = m.no_data or a.no_data
            if not enough:
                out.extend(_no_data(name, cluster, value, policy, m=m, requests=req,
                                    detail=f"{name}{where}: no data (too few requests)") for name in _check_names(m))
                continue
            if m.compare is not None:
                out.append(_compare_check(m, cluster, where, req, obs.compared.get(m.name, {}).get(cluster), policy,
                                          min_requests=a.min_requests))
                if not has_bounds(m):
                    continue
            if value is None or math.isnan(value):
                out.append(_no_data(m.name, cluster, None, policy, m=m, requests=req,
                                    detail=f"{m.name}{where}: no values found"))
            else:
                ok, bound = _within(m, value)
                out.append(Check(metric=m.name, cluster=cluster, value=value, requests=req, min=m.min, max=m.max,
                                 result="pass" if ok else "fail", effective="pass" if ok else "fail",
                                 detail=f"{m.name}{where} {_num(value)} {bound}"))
    for h in spec.webhooks:  # a failing `rollout` hook is a failed check, like a metric out of bounds
        if h.type != "rollout":
            continue
        answer = obs.hooks.get(h.name)
        ok = answer is not None and answer.ok
        out.append(Check(metric=f"webhook/{h.name}", cluster="*", value=None, requests=None,
                         result="pass" if ok else "fail", effective="pass" if ok else "fail",
                         detail=f"webhook {h.name}: {answer.detail if answer else 'not called'}"))
    return out


def _check_names(m: MetricSpec) -> list[str]:
    return ([m.name] if has_bounds(m) else []) + ([compare_name(m)] if m.compare is not None else [])


def has_bounds(m: MetricSpec) -> bool:
    return m.min is not None or m.max is not None


def compare_name(m: MetricSpec) -> str:
    """The comparison's check name: the metric's own, or `NAME vs stable` when it also has bounds."""
    assert m.compare is not None
    return f"{m.name} vs {m.compare.baseline}" if has_bounds(m) else m.name


def _compare_check(m: MetricSpec, cluster: str, where: str, req: float | None, data: CompareData | None,
                   policy: NoData, *, min_requests: float) -> Check:
    """One comparison: the statistics decide; inconclusive follows the no-data policy, like no data."""
    assert m.compare is not None
    name, baseline = compare_name(m), m.compare.baseline
    margin, confidence = m.compare.max_increase_fraction, m.compare.confidence
    if data is None:
        return _no_data(name, cluster, None, policy, m=m, requests=req, detail=f"{name}{where}: no values found")
    if data.counts is not None:
        ec, nc, eb, nb = data.counts
        result = compare_counts(canary_errors=ec, canary_total=nc, baseline_errors=eb, baseline_total=nb,
                                max_increase=margin, confidence=confidence, min_increase=m.compare.min_increase)
        if result.verdict != "inconclusive" and nb < min_requests:
            result = _inconclusive(result, f"{baseline} requests {format_requests(nb, minimum=min_requests)} "
                                           f"< minRequests {min_requests:g}")
    else:
        result = compare_series(data.canary, data.baseline, max_increase=margin, confidence=confidence,
                                min_increase=m.compare.min_increase)
    numbers = CheckComparison(baseline=baseline, test=result.test, statistic=result.statistic,
                              p_value=result.p_value, effect=result.effect,
                              relative=None if result.relative is None or math.isinf(result.relative)
                              else result.relative,
                              n_canary=result.n_canary, n_baseline=result.n_baseline, why=result.why)
    label = f"{m.name}{where} vs {baseline}"
    detail = f"{label}: {result.why} [{describe(result, baseline=baseline)}]"
    if result.verdict == "inconclusive":
        effective: Literal["pass", "fail", "hold"] = "hold" if policy == "hold" else policy
        return Check(metric=name, cluster=cluster, value=result.effect, requests=req, result="inconclusive",
                     effective=effective, detail=f"{label}: inconclusive, {result.why} "
                     f"[{describe(result, baseline=baseline)}] (noData: {policy})", comparison=numbers)
    return Check(metric=name, cluster=cluster, value=result.effect, requests=req, result=result.verdict,
                 effective=result.verdict, detail=detail, comparison=numbers)


def _inconclusive(c: Comparison, why: str) -> Comparison:
    return Comparison(verdict="inconclusive", test=c.test, statistic=c.statistic, p_value=c.p_value, effect=c.effect,
                      relative=c.relative, n_canary=c.n_canary, n_baseline=c.n_baseline, why=why, errors=c.errors)


def format_requests(count: float | None, *, minimum: float | None = None) -> str:
    """A request count as a whole number: Prometheus `increase()` extrapolates, so 52.5 means about 53.

    Rounded half up for display only (judging compares the raw count with minRequests); a count below
    `minimum` is never shown as reaching it, so no reason reads "requests 50 < minRequests 50".
    """
    if count is None or math.isnan(count):
        return "no values"
    if math.isinf(count):
        return str(count)
    shown = math.floor(count + 0.5)
    if minimum is not None and count < minimum:
        shown = min(shown, math.ceil(minimum) - 1)
    return str(shown)


def destinations(spec: RolloutSpec, state: RolloutState | None, *, cluster: str | None = None) -> list[Destination]:
    """The weights of the governed service's default rule in `cluster`: the canary's share during a
    canary run (with waves, that cluster's; none given: the current wave's), otherwise 100% to the stable
    (the promoted version after a promotion)."""
    if state is None:
        return [Destination(version=spec.stable, weight=100)]
    weight = cluster_weight(spec, state, cluster)
    if state.phase == "progressing" and spec.strategy == "canary" and state.canary and weight > 0:
        if weight >= 100:
            return [Destination(version=state.canary, weight=100)]
        return [Destination(version=state.stable, weight=100 - weight),
                Destination(version=state.canary, weight=weight)]
    return [Destination(version=state.stable, weight=100)]


def cluster_weight(spec: RolloutSpec, state: RolloutState, cluster: str | None) -> int:
    """The canary's weight in one cluster: the run's one weight, or with waves that cluster's own (waves
    removed from Git mid-run: the one weight again, everywhere)."""
    if state.weights is None or cluster is None or not is_waved(spec):
        return state.weight
    return state.weights.get(cluster, 0)


def _first_weight(spec: RolloutSpec) -> int:
    return spec.steps[0] if spec.strategy == "canary" and spec.steps else 0


def _exposure(spec: RolloutSpec, st: RolloutState) -> str:
    if spec.strategy == "canary":
        return f"step 1/{len(spec.steps)}: {st.weight}% to {st.canary}"
    if spec.strategy == "ab":
        return f"requests matching spec.match go to {st.canary}"
    if spec.strategy == "mirror":
        return f"traffic mirrored to {st.canary}"
    return f"{st.canary} deployed beside {st.stable} (preview via spec.match), 0% of traffic"


def _promote(st: RolloutState, *, now: float, reasons: tuple[str, ...], checks: tuple[Check, ...] = ()) -> Decision:
    assert st.canary is not None
    done = st.model_copy(update={"phase": "promoted", "stable": st.canary, "weight": 0, "finished_at": now,
                                 "next_analysis_at": None, "paused": False, "waiting_for": None,
                                 "bake_until": None, "waiting_for_approval": False})
    return Decision(action="promote", state=done, at=now, checks=checks,
                    reasons=(*reasons, f"promoted: {st.canary} is the stable at 100%"))


def _rollback(st: RolloutState, *, now: float, reasons: tuple[str, ...], checks: tuple[Check, ...] = ()) -> Decision:
    done = st.model_copy(update={"phase": "rolled-back", "weight": 0, "finished_at": now,
                                 "next_analysis_at": None, "paused": False, "waiting_for": None,
                                 "bake_until": None, "waiting_for_approval": False})
    return Decision(action="rollback", state=done, at=now, checks=checks,
                    reasons=(*reasons, f"rolled back: 100% to {st.stable}"))


def _no_data(metric: str, cluster: str, value: float | None, policy: NoData, *, detail: str,
             m: MetricSpec | None = None, requests: float | None = None, min_: float | None = None) -> Check:
    effective: Literal["pass", "fail", "hold"] = "hold" if policy == "hold" else policy
    return Check(metric=metric, cluster=cluster, value=value, requests=requests if m else value,
                 min=m.min if m else min_, max=m.max if m else None, result="no-data", effective=effective,
                 detail=f"{detail} (noData: {policy})")


def _within(m: MetricSpec, value: float) -> tuple[bool, str]:
    if m.min is not None and value < m.min:
        return False, f"< min {_num(m.min)}"
    if m.max is not None and value > m.max:
        return False, f"> max {_num(m.max)}"
    parts = ([f">= {_num(m.min)}"] if m.min is not None else []) + ([f"<= {_num(m.max)}"] if m.max is not None else [])
    return True, " and ".join(parts)


def _tenths(seconds: float) -> str:
    """Rounded down: a window 2.97 s of 3 s full reads "2.9 s of 3 s", never "3.0 s of 3 s"."""
    return f"{math.floor(seconds * 10 + 1e-6) / 10:.1f}"


def _num(v: float) -> str:
    return f"{v:.0f}" if v == int(v) and abs(v) < 1e15 else f"{v:.3g}" if abs(v) < 0.01 else f"{v:.2f}"
