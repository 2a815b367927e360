"""Metric providers: the `MetricProvider` protocol and `PrometheusProvider` (prometheus-api-client).

Timeouts are short and retries bounded (tenacity): a slow or stopped Prometheus turns into "offline"
or `NoValuesFound` within seconds, and the rollout holds instead of guessing.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import requests
import tenacity
from prometheus_api_client import PrometheusConnect
from prometheus_api_client.exceptions import PrometheusApiClientException
from urllib3.util.retry import Retry

log = logging.getLogger(__name__)


class ProviderError(Exception):
    """The provider could not answer (unreachable, bad query)."""


class NoValuesFound(ProviderError):
    """The query ran but returned nothing usable (no series, or NaN such as 0/0 on an idle canary)."""


class PartialWindow(NoValuesFound):
    """Prometheus has samples for only part of the analysis window (it restarted, or the target is new).

    `rate()` and `increase()` would extrapolate those few seconds to the whole interval, so the window
    counts as "no values found" and follows the no-data policy instead of being judged.
    """

    def __init__(self, *, covered_s: float, window_s: float, why: str) -> None:
        self.covered_s = covered_s
        self.window_s = window_s
        self.why = why
        super().__init__(f"only {math.floor(covered_s * 10 + 1e-6) / 10:.1f} s of {window_s:g} s of data ({why})")

    @property
    def fraction(self) -> float:
        """Share of the window covered, 0..1."""
        return min(1.0, self.covered_s / self.window_s) if self.window_s > 0 else 0.0


@dataclass(frozen=True)
class Samples:
    """When Prometheus has samples: the timestamps (ascending) of every series of one selector over the
    `seconds` before `at`, keyed by the series' labels. Raw times, so gaps are visible, not averaged away."""

    at: float
    seconds: float
    series: Mapping[str, tuple[float, ...]]
    since: float | None = None
    """When the answering Prometheus started, if it says: nothing before that vouches for the time after
    it (a restarted one has not scraped yet, however recent its last sample from before the restart)."""


class MetricProvider(Protocol):
    def query(self, promql: str) -> float:
        """The query's single value; NoValuesFound when there is none, ProviderError on failure."""
        ...

    def samples(self, selector: str, *, seconds: float) -> Samples:
        """Sample times of every series `selector` matches in the last `seconds`; ProviderError on failure."""
        ...

    def query_range(self, promql: str, *, start: float, end: float, step: float) -> list[float]:
        """Every value of every series the query gives at start, start + step, ... end (NaN left out, in
        time order); NoValuesFound when there is none, ProviderError on failure."""
        ...

    def is_online(self) -> bool: ...


class PrometheusProvider:
    """Instant queries against one Prometheus server."""

    def __init__(self, url: str, *, timeout: float = 2.0, attempts: int = 2) -> None:
        self.url = url.rstrip("/")
        self._timeout = timeout
        self._attempts = attempts
        session = requests.Session()
        session.trust_env = False  # never send loopback queries through an HTTP_PROXY from the environment
        # Retries are ours (tenacity, bounded); the client's default urllib3 retries back off for seconds.
        self._session = session
        self._client = PrometheusConnect(url=self.url, session=session, retry=Retry(total=0),
                                         timeout=timeout)  # type: ignore[arg-type,unused-ignore]

    def __repr__(self) -> str:
        return f"PrometheusProvider({self.url!r})"

    def _run(self, promql: str, params: dict[str, str] | None = None, *,
             span: tuple[float, float, float] | None = None) -> list[Any]:
        """An instant query, or with `span` (start, end, step) a range query."""
        try:
            for attempt in tenacity.Retrying(
                stop=tenacity.stop_after_attempt(self._attempts),
                wait=tenacity.wait_exponential(multiplier=0.1, max=0.5),
                retry=tenacity.retry_if_exception_type((requests.RequestException,)),
                reraise=True,
            ):
                with attempt:
                    if span is None:
                        result: list[Any] = self._client.custom_query(promql, params=params)
                    else:
                        start, end, step = span
                        result = self._client.custom_query_range(
                            promql, start_time=datetime.fromtimestamp(start, tz=UTC),
                            end_time=datetime.fromtimestamp(end, tz=UTC), step=f"{step:g}", params=params)
        except requests.RequestException as exc:
            raise ProviderError(f"{self.url} unreachable: {exc}") from None
        except PrometheusApiClientException as exc:
            raise ProviderError(f"query failed: {exc}") from None
        return result

    def query(self, promql: str) -> float:
        result = self._run(promql)
        if not result:
            raise NoValuesFound(f"no values found for {promql}")
        try:
            value = float(result[0]["value"][1])
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise ProviderError(f"unexpected answer {result[0]!r}: {exc}") from None
        if math.isnan(value):
            raise NoValuesFound(f"NaN for {promql}")
        return value

    def query_range(self, promql: str, *, start: float, end: float, step: float) -> list[float]:
        result = self._run(promql, span=(start, end, step))
        points: list[tuple[float, float]] = []
        for item in result:
            try:
                points += [(float(t), float(v)) for t, v in item["values"]]
            except (KeyError, IndexError, TypeError, ValueError) as exc:
                raise ProviderError(f"unexpected answer {item!r} for {promql}: {exc}") from None
        values = [v for _, v in sorted(points) if not math.isnan(v)]
        if not values:
            raise NoValuesFound(f"no values found for {promql} over {end - start:g} s")
        return values

    def samples(self, selector: str, *, seconds: float) -> Samples:
        """One instant query of `selector[seconds]`, evaluated at a time we pick (so the window is known):
        Prometheus answers every raw sample in it, stale markers left out."""
        at = round(time.time(), 3)
        since = self._started()
        result = self._run(f"{selector}[{max(1, round(seconds * 1000))}ms]", {"time": f"{at:.3f}"})
        series: dict[str, tuple[float, ...]] = {}
        for item in result:
            try:
                labels = ",".join(f"{k}={v}" for k, v in sorted(item["metric"].items()))
                series[labels] = tuple(sorted(float(point[0]) for point in item["values"]))
            except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
                raise ProviderError(f"unexpected answer {item!r} for {selector}: {exc}") from None
        return Samples(at=at, seconds=seconds, series=series, since=since)

    def _started(self) -> float | None:
        """Prometheus's own start time (`/api/v1/status/runtimeinfo`); None from a server without it."""
        try:
            resp = self._session.get(f"{self.url}/api/v1/status/runtimeinfo", timeout=self._timeout)
            return datetime.fromisoformat(resp.json()["data"]["startTime"]).timestamp() if resp.ok else None
        except (requests.RequestException, ValueError, KeyError, TypeError) as exc:
            log.debug("%s: no start time: %s", self.url, exc)
            return None

    def is_online(self) -> bool:
        try:
            ok = self._session.get(f"{self.url}/-/ready", timeout=self._timeout).ok
        except requests.RequestException:
            return False
        return bool(ok)

    def close(self) -> None:
        self._client.close()
