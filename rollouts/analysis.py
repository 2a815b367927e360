"""One analysis: the PromQL of each check, run against a provider per cluster -> `Observations`.

Built-in metrics read Envoy's own stats of the canary's sidecars on their inbound listener (what the
canary actually served), so they need no instrumentation in the application.

Before anything is judged, one query per cluster fetches the raw sample times of the canary's series
over the window (and a little before it): a window Prometheus holds only part of (it restarted, or
the canary's sidecar is new) is `PartialWindow`, and every check there is no-data.

Which stats depends on the service's protocol (`Queries`, chosen by `queries_for`): HTTP, HTTP/2 and
gRPC sidecars count requests on their inbound HTTP connection manager; a TCP service's inbound
listener is a tcp_proxy with no requests to count, so its built-ins count connections to the app
(`TCP_QUERIES`). The caller passes the protocol it read from the intent, as it passes the namespace.
"""

from __future__ import annotations

import itertools
import math
import re
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from mesh.intent import L4_PROTOCOLS, Protocol
from rollouts.advance import CompareData, Observations, PartialData
from rollouts.intent import MetricSpec, RolloutSpec
from rollouts.provider import MetricProvider, NoValuesFound, PartialWindow, ProviderError, Samples

_SEL = ('envoy_http_conn_manager_prefix="inbound",kind="sidecar",service="{{ service }}",'
        'version="{{ version }}",namespace="{{ namespace }}",cluster="{{ cluster }}"')
REQUESTS_QUERY = f"sum(increase(envoy_http_downstream_rq_total{{{_SEL}}}[{{{{ interval }}}}]))"
_APP_SEL = ('envoy_cluster_name="inbound|app",kind="sidecar",service="{{ service }}",'
            'version="{{ version }}",namespace="{{ namespace }}",cluster="{{ cluster }}"')
ERRORS_QUERY = (
    f"(sum(increase(envoy_cluster_grpc_failure{{{_APP_SEL}}}[{{{{ interval }}}}]))"
    f" or 0 * sum(increase(envoy_cluster_grpc_total{{{_APP_SEL}}}[{{{{ interval }}}}]))"
    f" or sum(increase(envoy_http_downstream_rq_xx{{{_SEL},envoy_response_code_class=\"5\"}}[{{{{ interval }}}}])))"
)
"""The failed requests over the interval. A gRPC service's failures are calls whose grpc-status is not 0,
answered as HTTP 200: its inbound listener's grpc_stats filter counts them on the `inbound|app` cluster
(`envoy_cluster_grpc_failure`, which Envoy creates at the first failure, so a gRPC sidecar with calls and
no failure yet counts 0 through `grpc_total`). Every other service (no grpc_* series) counts HTTP 5xx.
request-success-rate reads it, and so does its comparison (a count each: Fisher's test)."""
BUILTIN_QUERIES = {
    "request-success-rate": f"100 * (1 - {ERRORS_QUERY} / {REQUESTS_QUERY})",
    "request-duration-p99": (
        "histogram_quantile(0.99, sum by (le) "
        f"(rate(envoy_http_downstream_rq_time_bucket{{{_SEL}}}[{{{{ interval }}}}])))"
    ),
}
COMPARE_QUERIES = {
    # One p99 per scrape: irate() reads the last two samples in its window, so consecutive steps use
    # disjoint scrape intervals (independent samples, as the test assumes); the window only makes sure
    # there are two.
    "request-duration-p99": (
        "histogram_quantile(0.99, sum by (le) "
        f"(irate(envoy_http_downstream_rq_time_bucket{{{_SEL}}}[{{{{ interval }}}}])))"
    ),
}
SAMPLE_WINDOW_STEPS = 3
"""A compared query's `{{ interval }}`: this many scrape steps, so irate()/rate() always have two samples."""
DEFAULT_STEP_S = 1.0
"""The range queries' step when the scrape interval cannot be learnt (no canary samples yet)."""
WINDOW_SELECTOR = f"envoy_http_downstream_rq_total{{{_SEL}}}"
"""The series every built-in (and the requests check) reads: one per canary sidecar. A restarted
Prometheus lost every series' samples alike, so custom queries are covered by it too."""
HISTORY_S = 30.0
"""Seconds fetched before the window: they give the scrape interval when the window has few samples,
and tell a series Prometheus lost for a while (partial, 0 s) from one it never had (no values)."""
REACH = 1.1
"""A sample vouches for 1.1 scrape intervals either side of it, as far as Prometheus extrapolates: one
missed scrape is no gap, a restart or a series that began inside the window is."""
LATE = 2.0
"""Scrape intervals the newest sample vouches for after it: the next one may be late or not yet written."""

CONNECTIONS_QUERY = f"sum(increase(envoy_cluster_upstream_cx_total{{{_APP_SEL}}}[{{{{ interval }}}}]))"
"""A TCP service's "requests": connections its sidecars opened to the app (`inbound|app`) over the interval,
refused and timed-out attempts included (what minRequests counts for it)."""
CONNECTION_ERRORS_QUERY = (
    f"sum(increase(envoy_cluster_upstream_cx_destroy_local{{{_APP_SEL}}}[{{{{ interval }}}}]))"
    f" + sum(increase(envoy_cluster_upstream_cx_connect_fail{{{_APP_SEL}}}[{{{{ interval }}}}]))"
    f" - sum(increase(envoy_cluster_upstream_cx_connect_timeout{{{_APP_SEL}}}[{{{{ interval }}}}]))"
)
"""A TCP service's failed connections over the interval, on its sidecars' `inbound|app` cluster:

- `upstream_cx_connect_fail`: the app refused the connection or did not accept it within the connect
  timeout;
- `upstream_cx_destroy_local`: the app closed its side first. tcp_proxy passes half-closes through, and
  Envoy names a close after the side that ended last (measured with Envoy 1.40): a client that closes
  first (its FIN to the app, the app follows) ends as `destroy_remote`, an app that closes first (its FIN
  to the client, the client follows) as `destroy_local`. Envoy's own closes count there too: a client's
  reset and a connect timeout (both measured; the timeout is in connect_fail already, hence
  `- upstream_cx_connect_timeout`, while a refused connect is `destroy_remote`, so counted once), and by
  the same rule an idle timeout or a drained listener.

So "the server closed first" is a failure. That is right only for protocols where the client closes
first (request/response sessions, pooled database connections); a protocol whose server ends every
session (HTTP/1.0-style, a server-side idle timeout) reads as failing: judge such a service on a query of
its own. Connections the sidecar refused before the app (authorization and rate limits act before
tcp_proxy; a circuit breaker's `upstream_cx_overflow`) are not counted, and connections still open
count in the total only (their end counts in the interval it falls in)."""
TCP_WINDOW_SELECTOR = f"envoy_cluster_upstream_cx_total{{{_APP_SEL}}}"
"""WINDOW_SELECTOR for a TCP service: one series per canary sidecar, there from the cluster's creation."""


@dataclass(frozen=True)
class Queries:
    """The templates the built-ins of one kind of service read: what a request and a failure are, which
    series shows the window, which built-ins exist at all."""

    requests: str
    """The count minRequests is compared with (and a success rate's denominator)."""
    errors: str
    """The failures among `requests` (a success rate's numerator, and what a comparison counts)."""
    window: str
    """One series per canary sidecar, whose sample times tell a partial window."""
    builtins: Mapping[str, str]
    """Built-in name -> its query; a built-in missing here has no honest series for this protocol."""
    compare: Mapping[str, str]
    """Built-ins compared through series of values (request-success-rate compares counts)."""


HTTP_QUERIES = Queries(requests=REQUESTS_QUERY, errors=ERRORS_QUERY, window=WINDOW_SELECTOR,
                       builtins=BUILTIN_QUERIES, compare=COMPARE_QUERIES)
TCP_QUERIES = Queries(
    requests=CONNECTIONS_QUERY, errors=CONNECTION_ERRORS_QUERY, window=TCP_WINDOW_SELECTOR,
    builtins={"request-success-rate": f"100 * (1 - ({CONNECTION_ERRORS_QUERY}) / {CONNECTIONS_QUERY})"},
    compare={})
"""No request-duration-p99: tcp_proxy times no requests, and a connection's length
(`upstream_cx_length_ms`) is how long its client kept it open, not how fast the app answered
(validation refuses it for a TCP service)."""
_VAR = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def queries_for(protocol: Protocol) -> Queries:
    """TCP (and anything else the proxies carry as opaque connections) counts connections; every HTTP
    flavour counts requests."""
    return TCP_QUERIES if protocol in L4_PROTOCOLS else HTTP_QUERIES


def render_query(template: str, variables: Mapping[str, str]) -> str:
    """Fill `{{ name }}` placeholders; an unknown name is left for Prometheus to reject, visibly."""
    return _VAR.sub(lambda m: variables.get(m.group(1), m.group(0)), template)


def query_of(metric: MetricSpec, queries: Queries = HTTP_QUERIES) -> str | None:
    """The metric's PromQL; None for a built-in these queries have no series for (validation refuses it)."""
    return queries.builtins.get(metric.builtin) if metric.builtin is not None else str(metric.query)


def window(spec: RolloutSpec) -> str:
    """The analysis window: one interval (as a PromQL duration)."""
    return f"{round(spec.interval_s * 1000)}ms"


def scrape_interval(timestamps: Sequence[float]) -> float | None:
    """The usual spacing of a series' samples (the lower median: a restart's gap is one spacing among
    many); None with fewer than two samples."""
    spacings = [b - a for a, b in itertools.pairwise(timestamps) if b - a > 1e-3]
    return statistics.median_low(spacings) if spacings else None


def covered_seconds(timestamps: Sequence[float], *, at: float, window_s: float, step: float | None,
                    since: float | None = None) -> float:
    """Seconds of the window (`window_s` before `at`) the samples vouch for: each one for REACH scrape
    intervals either side, the newest for LATE after it, none across `since` (Prometheus's start). A lone
    sample (no interval known) only for the time since it was taken, so one sample is never a full window
    (`rate()` needs two anyway)."""
    start = at - window_s
    if not timestamps:
        return 0.0
    if step is None:  # one sample: Prometheus has had the series only since it was taken
        first = timestamps[0]
        return at - first if first > start and (since is None or first >= since) else 0.0
    covered, edge = 0.0, start
    for i, ts in enumerate(timestamps):
        lo = max(ts - REACH * step, edge)
        hi = min(ts + (LATE if i == len(timestamps) - 1 else REACH) * step, at)
        if since is not None:
            lo, hi = (lo, min(hi, since)) if ts < since else (max(lo, since), hi)
        if hi > lo:
            covered += hi - lo
            edge = hi
    return covered


def check_window(samples: Samples, *, window_s: float) -> None:
    """Nothing when every current series covers the whole window; else `PartialWindow` with the least
    covered series' seconds; `NoValuesFound` when Prometheus has no such series at all.

    A series whose samples stopped while the others go on is a removed target (its sidecar went away):
    it is left out rather than holding the run until it ages out of the history."""
    series = {k: ts for k, ts in samples.series.items() if ts}
    if not series:
        raise NoValuesFound(f"no samples in the last {samples.seconds:g} s")
    own = {k: scrape_interval(ts) for k, ts in series.items()}
    known = [s for s in own.values() if s is not None]
    fallback = statistics.median_low(known) if known else None  # a one-sample series: its siblings' interval
    steps = {k: s if s is not None else fallback for k, s in own.items()}
    newest = max(ts[-1] for ts in series.values())
    current = [k for k, ts in series.items() if ts[-1] >= newest - LATE * (steps[k] or 0.0)]
    covered = {k: covered_seconds(series[k], at=samples.at, window_s=window_s, step=steps[k], since=samples.since)
               for k in current}
    worst = min(sorted(covered), key=lambda k: covered[k])
    if covered[worst] >= window_s - 1e-3:
        return
    last, step = series[worst][-1], steps[worst]
    stale = samples.at - last > LATE * step if step is not None else last <= samples.at - window_s
    if samples.since is not None and samples.since > samples.at - window_s:
        why = f"Prometheus restarted {samples.at - samples.since:.1f} s ago"
    elif stale:
        why = f"no sample in the last {samples.at - last:.1f} s: Prometheus restarted or is not scraping the target"
    else:
        why = "Prometheus restarted or the target is new"
    raise PartialWindow(covered_s=max(0.0, covered[worst]), window_s=window_s, why=why)


def _window_of(provider: MetricProvider, variables: Mapping[str, str], window_s: float,
               selector: str = WINDOW_SELECTOR) -> tuple[PartialData | None, float | None]:
    """None when the canary's series cover the whole window (or do not exist: the queries say so); and
    the scrape interval the samples show (None without two samples)."""
    samples = provider.samples(render_query(selector, variables), seconds=window_s + HISTORY_S)
    known = [s for ts in samples.series.values() if (s := scrape_interval(ts)) is not None]
    step = statistics.median_low(known) if known else None
    try:
        check_window(samples, window_s=window_s)
    except PartialWindow as exc:
        return PartialData(covered=exc.covered_s, why=exc.why), step
    except NoValuesFound:
        pass  # no such series at all: the queries answer "no values found", as they always did
    return None, step


def _series(provider: MetricProvider, promql: str, *, start: float, end: float, step: float) -> tuple[float, ...]:
    try:
        return tuple(provider.query_range(promql, start=start, end=end, step=step))
    except NoValuesFound:
        return ()


def _count(provider: MetricProvider, promql: str, *, end: float, step: float) -> float | None:
    """One value at `end` (a range query of one point: the same instant for canary and baseline)."""
    try:
        values = provider.query_range(promql, start=end, end=end, step=step)
    except NoValuesFound:
        return None
    return values[-1]


def compare_data(metric: MetricSpec, provider: MetricProvider, *, variables: Mapping[str, str], baseline: str,
                 window_s: float, step: float, end: float, queries: Queries = HTTP_QUERIES) -> CompareData:
    """Canary and baseline measured alike: same cluster, same queries, same instants. ProviderError through;
    KeyError for a built-in `queries` cannot compare (`observe` never asks)."""
    if metric.builtin == "request-success-rate":
        counted = {**variables, "interval": f"{round(window_s * 1000)}ms"}
        base = {**counted, "version": baseline}
        totals = [_count(provider, render_query(queries.requests, v), end=end, step=step) for v in (counted, base)]
        errors = [_count(provider, render_query(queries.errors, v), end=end, step=step) for v in (counted, base)]
        # No 5xx series: that version answered no 5xx; no request series: it served nothing (inconclusive).
        return CompareData(counts=(errors[0] or 0.0, totals[0] or 0.0, errors[1] or 0.0, totals[1] or 0.0))
    template = queries.compare[metric.builtin] if metric.builtin is not None else str(metric.query)
    sample = {**variables, "interval": f"{round(SAMPLE_WINDOW_STEPS * step * 1000)}ms"}
    points = max(1, round(window_s / step))  # a learnt step of 1.0003 s still gives 5 points in 5 s
    start = end - (points - 1) * step
    return CompareData(
        canary=_series(provider, render_query(template, sample), start=start, end=end, step=step),
        baseline=_series(provider, render_query(template, {**sample, "version": baseline}), start=start, end=end,
                         step=step))


def observe(
    *, spec: RolloutSpec, namespace: str, canary: str, providers: Mapping[str, MetricProvider],
    stable: str | None = None, now: Callable[[], float] = time.time, protocol: Protocol = "HTTP",
) -> Observations:
    """Query every check for every cluster (cluster -> its provider). Offline if any provider is.

    `protocol` is the service's (`Service.spec.protocol`, read from the intent by the caller): it picks
    what the built-ins count (`queries_for`). A built-in with no series for it (validation refuses
    those) is an error of that metric and no data, never another protocol's numbers.

    A cluster whose window is partial is still queried (the numbers are shown), but `partial` says
    so and `advance.judge` makes every check there no-data."""
    if not providers or not all(p.is_online() for p in providers.values()):
        return Observations(online=False)
    queries = queries_for(protocol)
    requests: dict[str, float | None] = {}
    values: dict[str, dict[str, float | None]] = {m.name: {} for m in spec.analysis.metrics}
    errors = {m.name: f"built-in {m.builtin} has no series for a {protocol} service"
              for m in spec.analysis.metrics if query_of(m, queries) is None}
    missing = set(errors)
    partial: dict[str, PartialData] = {}
    compared: dict[str, dict[str, CompareData]] = {m.name: {} for m in spec.analysis.metrics if m.compare}
    baselines = {"stable": stable or spec.stable}
    for cluster, provider in sorted(providers.items()):
        variables = {"service": spec.service, "version": canary, "namespace": namespace, "cluster": cluster,
                     "interval": window(spec)}
        try:
            gap, step = _window_of(provider, variables, spec.interval_s, queries.window)
            if gap is not None:
                partial[cluster] = gap
        except ProviderError as exc:
            return Observations(online=False, errors={"window": str(exc)})
        try:
            requests[cluster] = provider.query(render_query(queries.requests, variables))
        except NoValuesFound:
            requests[cluster] = None
        except ProviderError as exc:
            return Observations(online=False, errors={"requests": str(exc)})
        for m in spec.analysis.metrics:
            if m.min is None and m.max is None:
                continue  # compared only: its range queries follow
            promql = query_of(m, queries)
            if promql is None:
                values[m.name][cluster] = None
                continue
            try:
                values[m.name][cluster] = provider.query(render_query(promql, variables))
            except NoValuesFound:
                values[m.name][cluster] = None
            except ProviderError as exc:
                values[m.name][cluster] = None
                errors[m.name] = str(exc)
        if gap is not None:
            continue  # a partial window is not judged: nothing to compare
        end = float(math.floor(now()))  # whole seconds: what the range API takes
        for m in spec.analysis.metrics:
            if m.compare is None or m.name in missing:
                continue
            try:
                compared[m.name][cluster] = compare_data(
                    m, provider, variables=variables, baseline=baselines[m.compare.baseline],
                    window_s=spec.interval_s, step=step or DEFAULT_STEP_S, end=end, queries=queries)
            except ProviderError as exc:
                errors[m.name] = str(exc)
    return Observations(online=True, requests=requests, values=values, errors=errors, partial=partial,
                        compared=compared)
