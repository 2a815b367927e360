"""One analysis: the PromQL of each check, run against a provider per cluster -> `Observations`.

Built-in metrics read Envoy's own stats of the canary's sidecars on their inbound listener (what the
canary actually served), so they need no instrumentation in the application.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from rollouts.advance import Observations
from rollouts.intent import MetricSpec, RolloutSpec
from rollouts.provider import MetricProvider, NoValuesFound, ProviderError

_SEL = ('envoy_http_conn_manager_prefix="inbound",kind="sidecar",service="{{ service }}",'
        'version="{{ version }}",namespace="{{ namespace }}",cluster="{{ cluster }}"')
REQUESTS_QUERY = f"sum(increase(envoy_http_downstream_rq_total{{{_SEL}}}[{{{{ interval }}}}]))"
BUILTIN_QUERIES = {
    "request-success-rate": (
        f"100 * (1 - sum(increase(envoy_http_downstream_rq_xx{{{_SEL},envoy_response_code_class=\"5\"}}"
        f"[{{{{ interval }}}}])) / sum(increase(envoy_http_downstream_rq_total{{{_SEL}}}[{{{{ interval }}}}])))"
    ),
    "request-duration-p99": (
        "histogram_quantile(0.99, sum by (le) "
        f"(rate(envoy_http_downstream_rq_time_bucket{{{_SEL}}}[{{{{ interval }}}}])))"
    ),
}
_VAR = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def render_query(template: str, variables: Mapping[str, str]) -> str:
    """Fill `{{ name }}` placeholders; an unknown name is left for Prometheus to reject, visibly."""
    return _VAR.sub(lambda m: variables.get(m.group(1), m.group(0)), template)


def query_of(metric: MetricSpec) -> str:
    return BUILTIN_QUERIES[metric.builtin] if metric.builtin is not None else str(metric.query)


def window(spec: RolloutSpec) -> str:
    """The analysis window: one interval (as a PromQL duration)."""
    return f"{round(spec.interval_s * 1000)}ms"


def observe(
    *, spec: RolloutSpec, namespace: str, canary: str, providers: Mapping[str, MetricProvider]
) -> Observations:
    """Query every check for every cluster (cluster -> its provider). Offline if any provider is."""
    if not providers or not all(p.is_online() for p in providers.values()):
        return Observations(online=False)
    requests: dict[str, float | None] = {}
    values: dict[str, dict[str, float | None]] = {m.name: {} for m in spec.analysis.metrics}
    errors: dict[str, str] = {}
    for cluster, provider in sorted(providers.items()):
        variables = {"service": spec.service, "version": canary, "namespace": namespace, "cluster": cluster,
                     "interval": window(spec)}
        try:
            requests[cluster] = provider.query(render_query(REQUESTS_QUERY, variables))
        except NoValuesFound:
            requests[cluster] = None
        except ProviderError as exc:
            return Observations(online=False, errors={"requests": str(exc)})
        for m in spec.analysis.metrics:
            try:
                values[m.name][cluster] = provider.query(render_query(query_of(m), variables))
            except NoValuesFound:
                values[m.name][cluster] = None
            except ProviderError as exc:
                values[m.name][cluster] = None
                errors[m.name] = str(exc)
    return Observations(online=True, requests=requests, values=values, errors=errors)
