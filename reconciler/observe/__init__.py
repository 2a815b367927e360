"""What people look at beside lockgate's own terminal: a Grafana dashboard, Prometheus recording rules, and
the one metric lockgate itself exports (each rollout's canary weight).

`grafana` is pure (dicts in the shapes Grafana and Prometheus read); `exporter` renders the weight gauge
from the rollout state files `lockgate up` keeps.
"""

from reconciler.observe.exporter import WEIGHT_METRIC, exposition, read_exposition
from reconciler.observe.grafana import dashboard, expressions, recording_rules

__all__ = ["WEIGHT_METRIC", "dashboard", "exposition", "expressions", "read_exposition", "recording_rules"]
