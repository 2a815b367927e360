"""Pure render: intent at a revision + where things run -> one xDS Snapshot per proxy.

`render` decides who gets what (build); listeners, routes and clusters are built by their own modules;
`Extension` is how higher layers (security, other clusters) shape the result without mesh knowing them.
"""

from mesh.names import cluster_name, sni
from mesh.render.build import egress, egress_key, render
from mesh.render.context import ADS, Extension, GatewayResources, Proxy, RenderCache, duration, fractional
from mesh.render.routes import default_rule_index

__all__ = [
    "ADS",
    "Extension",
    "GatewayResources",
    "Proxy",
    "RenderCache",
    "cluster_name",
    "default_rule_index",
    "duration",
    "egress",
    "egress_key",
    "fractional",
    "render",
    "sni",
]
