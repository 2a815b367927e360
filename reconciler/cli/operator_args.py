"""`lockgate operator`'s arguments, apart from the operator itself: kopf takes a second to import, and
every other command (`lockgate demo-app` first) must start at once."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> None:
    """`lockgate operator`: what the Deployment of `lockgate k8s install` runs in each cluster."""
    p = sub.add_parser("operator", help="run the Kubernetes operator of one cluster (kopf; see docs/kubernetes.md)")
    p.add_argument("--cluster", required=True, help="this cluster's name in the Mesh")
    p.add_argument("--namespace", default="lockgate-system", help="where the GitSource and Secrets are")
    p.add_argument("--kubeconfig", type=Path, default=None, help="default: in-cluster (the pod's service account)")
    p.add_argument("--ca", type=Path, default=None, help="the CA directory (the mounted lockgate-ca Secret)")
    p.add_argument("--state-dir", type=Path, default=Path("/var/lib/lockgate"))
    p.add_argument("--bind", default="0.0.0.0", help="address the xDS, webhook and metrics ports listen on")
    p.add_argument("--xds-port", type=int, default=15010)
    p.add_argument("--webhook-port", type=int, default=9443, help="0: no injection webhook")
    p.add_argument("--metrics-port", type=int, default=9090, help="0: no /metrics, /healthz, /readyz")
    p.add_argument("--prometheus", default=None, help="the Prometheus URL rollouts are judged from")
    p.add_argument("--image", default=None, help="the sidecar image the injector adds")
    p.add_argument("--xds-address", default=None,
                   help="host:port injected sidecars reach the control plane at (default: the operator's Service)")
    p.add_argument("--standalone", action="store_true", help="no peering (one replica only)")
    p.set_defaults(func=_run)


def _run(args: Any) -> int:
    from reconciler.cli.operator import cmd_operator

    return cmd_operator(args)


def add_sidecar_parser(sub: Any) -> None:
    """`lockgate sidecar`: what the injected `lockgate-proxy` container runs (its settings come from the
    environment the injector wrote: see reconciler/k8s/inject.py)."""
    p = sub.add_parser("sidecar", help="run Envoy in an injected pod (the lockgate-proxy container's command)")
    p.set_defaults(func=_sidecar)


def _sidecar(args: Any) -> int:
    from reconciler.k8s.sidecar import main

    return main([])
