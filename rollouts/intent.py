"""The Rollout kind: which version is stable, which is the canary, and how the canary earns traffic.

A Rollout governs one service: while it exists, the weights of that service's default route rule come
from the rollout state, not from the Route (see `governs()`).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from mesh.intent import Duration, HTTPMatch, Model, Name, PositiveDuration, ResourceBase, parse_duration_ms
from mesh.intent import NotificationSpec as NotificationSpec  # defined in mesh (Mesh.spec has sinks too)

Strategy = Literal["canary", "ab", "bluegreen", "mirror"]
NoData = Literal["fail", "hold", "pass"]
BUILTINS = ("request-success-rate", "request-duration-p99")
"""Metrics computed from Envoy's own inbound stats, so they work without app instrumentation."""


BASELINES = ("stable",)
"""What a `compare` metric measures the canary against."""


class CompareSpec(Model):
    """Judge the canary against a baseline measured in the same clusters over the same interval."""

    baseline: str = "stable"
    """One of BASELINES (checked by validate, with its line)."""
    max_increase: str | int | float
    """How much worse than the baseline the canary may be, as a percentage (`20%`) of the baseline's
    median (values) or error rate (request-success-rate)."""
    confidence: float = 0.98
    """1 - the p-value below which a difference counts as real (Kayenta's default: 0.98)."""
    min_increase: float = 0.0
    """The smallest increase that counts, in the metric's own unit (ms for `request-duration-p99`; error-rate
    points for `request-success-rate`, 0.01 = one point): a shift below it neither fails nor holds. At
    sub-millisecond latencies, scheduling noise alone moves one version's p99 by several times over a
    few scrapes, which `maxIncrease` (relative) would call a regression."""

    @property
    def max_increase_fraction(self) -> float:
        value = parse_percent(self.max_increase)
        if value is None:
            raise ValueError(f"bad percentage {self.max_increase!r}")
        return value


def parse_percent(text: str | float) -> float | None:
    """`20%` -> 0.2; None for anything else (a bare number is ambiguous: 20 or 2000%?)."""
    if not isinstance(text, str) or not text.strip().endswith("%"):
        return None
    try:
        value = float(text.strip()[:-1])
    except ValueError:
        return None
    return value / 100 if math.isfinite(value) and value >= 0 else None


class MetricSpec(Model):
    """One check of an analysis: a built-in or a PromQL query, with a lower and/or upper bound and/or a
    comparison with the stable."""

    name: Name
    builtin: str | None = None
    """One of BUILTINS (unknown names are validation errors, never a silent fallback)."""
    query: str | None = None
    """PromQL; `{{ service }}`, `{{ version }}`, `{{ namespace }}`, `{{ cluster }}`, `{{ interval }}` are filled in."""
    min: float | None = None
    max: float | None = None
    no_data: NoData | None = None
    """Overrides analysis.noData for this metric (and for an inconclusive comparison)."""
    compare: CompareSpec | None = None

    @model_validator(mode="after")
    def _shape(self) -> MetricSpec:
        if (self.builtin is None) == (self.query is None):
            raise ValueError("give exactly one of builtin, query")
        if self.min is None and self.max is None and self.compare is None:
            raise ValueError("give min, max or compare: a metric without a threshold judges nothing")
        return self


class AnalysisSpec(Model):
    failure_threshold: int = Field(default=2, ge=1, le=100)
    """Failed analyses (in one run) that roll the canary back."""
    min_requests: int = Field(default=50, ge=0)
    """Canary requests in the interval below which every metric has "no data"."""
    no_data: NoData = "hold"
    """What "no data" means: fail counts a failed check, hold waits, pass counts as passed."""
    metrics: list[MetricSpec] = Field(default_factory=list)


HookType = Literal["confirm-rollout", "pre-rollout", "rollout", "confirm-traffic-increase", "confirm-promotion",
                   "post-rollout", "rollback"]
"""Flagger's set. Before any traffic moves: `confirm-rollout` (a gate: the run waits until it answers 2xx),
then `pre-rollout` (once; a failure is a failed check, retried each interval). Every analysis: `rollout`
(a failure is a failed check). Gates before a step up and before promotion: `confirm-traffic-increase`,
`confirm-promotion`. `rollback`: called with every analysis (and while waiting); a 2xx rolls the run back.
`post-rollout`: called once after promotion or rollback; its answer never changes the outcome."""


class WebhookSpec(Model):
    """An HTTP hook called with the run's state (POST, JSON); its answer gates or checks the run."""

    name: Name
    type: HookType
    url: str
    timeout: Duration = "5s"
    metadata: dict[str, str] = Field(default_factory=dict)
    """Sent as is in the call's `metadata`."""

    @property
    def timeout_s(self) -> float:
        return parse_duration_ms(self.timeout) / 1000.0


class SessionAffinitySpec(Model):
    """Flagger's sessionAffinity: a client the weights sent to the canary gets a cookie, and while the run
    lasts every request carrying it goes to the canary (one user never flips between versions)."""

    cookie_name: str = Field(default="lockgate-canary", pattern=r"^[A-Za-z0-9_.-]+$", max_length=64)
    """Letters, digits, `_`, `.`, `-` (a cookie-name token that needs no quoting in a regex or a header)."""
    max_age: PositiveDuration = "24h"
    """The cookie's Max-Age (whole seconds, at least 1s); the route that honours it ends with the run."""

    @property
    def max_age_s(self) -> int:
        return parse_duration_ms(self.max_age) // 1000


class WaveSpec(Model):
    """One wave of a rollout across clusters: the canary's steps run in these clusters, judged by their
    Prometheus, while the clusters of later waves keep 100% on the stable."""

    clusters: list[Name] = Field(min_length=1)
    """Mesh clusters where the canary runs (each in one wave only)."""
    name: Name | None = None
    """What `spec.approve`, status and the reasons call it (otherwise `waves[INDEX]`)."""
    bake: Duration = "0s"
    """Soak after the previous wave passed its last step, before this one starts: the previous wave serves
    100% canary and is still judged every interval (a failure there aborts the whole run)."""
    approval: Literal["manual"] | None = None
    """manual: the wave starts only once approved (`lockgate rollout approve NAME`, or `spec.approve`)."""

    @property
    def bake_s(self) -> float:
        return parse_duration_ms(self.bake) / 1000.0


class RolloutSpec(Model):
    service: Name
    stable: Name
    canary: Name | None = None
    """The version being rolled out; none (or equal to stable) means no run."""
    strategy: Strategy = "canary"
    steps: list[int] = Field(default_factory=lambda: [10, 25, 50, 100])
    """Canary weight per step (canary strategy); promotion follows a passed analysis at the last step."""
    match: list[HTTPMatch] = Field(default_factory=list)
    """ab: requests matching any of these go to the canary; bluegreen: a preview route to the canary."""
    iterations: int = Field(default=5, ge=1, le=1000)
    """Analysis rounds at full exposure (ab, bluegreen, mirror)."""
    interval: Duration = "30s"
    paused: bool = False
    analysis: AnalysisSpec = Field(default_factory=AnalysisSpec)
    webhooks: list[WebhookSpec] = Field(default_factory=list)
    notifications: list[NotificationSpec] = Field(default_factory=list)
    """Sinks for this rollout's decisions, beside the Mesh-wide ones (`Mesh.spec.notifications`); a sink
    named in both is one sink, this Rollout's, and gets each decision once."""
    session_affinity: SessionAffinitySpec | None = None
    """canary strategy: keep a client on the canary once the weights sent it there (see SessionAffinitySpec)."""
    write_back: Literal["commit", "off"] = "commit"
    """commit: promotion and rollback are committed to the intent repo, so Git never goes stale."""
    waves: list[WaveSpec] = Field(default_factory=list)
    """Rollout across clusters, one wave at a time (canary strategy); none: one wave with every cluster
    where the canary runs, all moved together."""
    approve: int | Name | None = None
    """Approves the wave of this index in `waves` (from 0) or of this name, from Git: the same as
    `lockgate rollout approve NAME` once that wave waits for approval. The write-back of the outcome
    removes it, so it never approves the next run's wave."""

    @property
    def interval_s(self) -> float:
        return parse_duration_ms(self.interval) / 1000.0

    @property
    def active_canary(self) -> str | None:
        """The canary, unless it is absent or the stable itself (what a rollback write-back leaves)."""
        return self.canary if self.canary and self.canary != self.stable else None


class Rollout(ResourceBase):
    kind: Literal["Rollout"]
    spec: RolloutSpec

    def governs(self) -> tuple[str, str] | None:
        return (self.metadata.namespace, self.spec.service)


KINDS: dict[str, type[ResourceBase]] = {"Rollout": Rollout}
