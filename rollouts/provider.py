"""Metric providers: the `MetricProvider` protocol and `PrometheusProvider` (prometheus-api-client).

Timeouts are short and retries bounded (tenacity): a slow or stopped Prometheus turns into "offline"
or `NoValuesFound` within seconds, and the rollout holds instead of guessing.
"""

from __future__ import annotations

import logging
import math
from typing import Protocol

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


class MetricProvider(Protocol):
    def query(self, promql: str) -> float:
        """The query's single value; NoValuesFound when there is none, ProviderError on failure."""
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

    def query(self, promql: str) -> float:
        try:
            for attempt in tenacity.Retrying(
                stop=tenacity.stop_after_attempt(self._attempts),
                wait=tenacity.wait_exponential(multiplier=0.1, max=0.5),
                retry=tenacity.retry_if_exception_type((requests.RequestException,)),
                reraise=True,
            ):
                with attempt:
                    result = self._client.custom_query(promql)
        except requests.RequestException as exc:
            raise ProviderError(f"{self.url} unreachable: {exc}") from None
        except PrometheusApiClientException as exc:
            raise ProviderError(f"query failed: {exc}") from None
        if not result:
            raise NoValuesFound(f"no values found for {promql}")
        try:
            value = float(result[0]["value"][1])
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise ProviderError(f"unexpected answer {result[0]!r}: {exc}") from None
        if math.isnan(value):
            raise NoValuesFound(f"NaN for {promql}")
        return value

    def is_online(self) -> bool:
        try:
            ok = self._session.get(f"{self.url}/-/ready", timeout=self._timeout).ok
        except requests.RequestException:
            return False
        return bool(ok)

    def close(self) -> None:
        self._client.close()
