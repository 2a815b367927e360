"""`lockgate k8s crds|install|inject`: what a user pipes into `kubectl apply` to run lockgate on Kubernetes.

Every command prints multi-document YAML on stdout and nothing else there; notes go to stderr, and an error
is one line `lockgate: ...` on stderr with exit 2. Heavy imports happen inside the commands.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import sys
from pathlib import Path
from typing import Any

from reconciler.state import DEFAULT_STATE_DIR

IMAGE_REPOSITORY = "ghcr.io/lockgate/lockgate"
MAX_INPUT_BYTES = 16 << 20
"""`k8s inject` reads at most this much YAML (a manifest, not a data set)."""

_ORDER = """\
order (CRDs first, as Flux and Istio split them; a custom resource cannot be applied before its CRD is
Established):
  lockgate k8s crds > crds.yaml
  kubectl apply -f crds.yaml && kubectl wait --for condition=Established -f crds.yaml
  lockgate k8s install --cluster NAME --ca DIR | kubectl apply -f -
  kubectl label namespace APP-NAMESPACE lockgate.io/inject=enabled
`crds` carries kopf's ClusterKopfPeering CRD too (install repeats it), so the peering object in `install`
applies on a fresh cluster."""


def add_parser(sub: Any) -> None:
    """Register `lockgate k8s` on the `lockgate` sub-parser collection."""
    p = sub.add_parser("k8s", help="Kubernetes manifests: CRDs, the install of one cluster, sidecar injection",
                       description="Kubernetes manifests for kubectl apply.\n\n" + _ORDER,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    k8s = p.add_subparsers(dest="k8s_command", required=True, metavar="ACTION")
    k8s.add_parser("crds", help="the CustomResourceDefinitions (lockgate.io and kopf's peering): apply first",
                   description=_ORDER, formatter_class=argparse.RawDescriptionHelpFormatter)
    q = k8s.add_parser("install", help="the operator of one cluster: namespace, RBAC, CA Secret, Deployment, "
                       "Service, injection webhook", description=_ORDER,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("--cluster", required=True, help="the cluster's name, as in the Mesh resource")
    q.add_argument("--ca", type=Path, default=DEFAULT_STATE_DIR / "ca",
                   help="the CA directory holding NAME/ (`lockgate ca cluster NAME --root ROOTDIR --out DIR/NAME`); "
                   "default: %(default)s")
    q.add_argument("--image", help=f"the lockgate image (default: {IMAGE_REPOSITORY}:<this version>)")
    q.add_argument("--prometheus", metavar="URL", help="the cluster's Prometheus, for rollout analysis")
    q.add_argument("--replicas", type=int, default=1, help="operator replicas; more than 1 stand by (kopf peering)")
    q.add_argument("--pod-monitor", action="store_true",
                   help="add a PodMonitor (Prometheus Operator) scraping every injected sidecar")
    q = k8s.add_parser("inject", help="print a manifest with the lockgate sidecar injected into its pods")
    q.add_argument("-f", "--filename", required=True, metavar="FILE", help="the manifest, or - for stdin")
    q.add_argument("--cluster", required=True, help="the cluster the workloads run in")
    q.add_argument("--image", help="the image of the injected proxy (default: the injector's)")
    q.add_argument("--xds", metavar="HOST:PORT", help="the control plane the sidecar connects to")
    p.set_defaults(func=run)


class UsageError(Exception):
    """A problem the user fixes (a file, a flag, a CA directory): printed as one line, exit 2."""


def run(args: argparse.Namespace) -> int:
    try:
        if args.k8s_command == "crds":
            docs = _crds()
        elif args.k8s_command == "install":
            docs = _install(args)
        else:
            docs = _inject(args)
    except UsageError as exc:
        print(f"lockgate: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(dump_yaml(docs))
    return 0


def _crds() -> list[dict[str, Any]]:
    from reconciler.k8s.crds import crd_documents
    from reconciler.k8s.install import kopf_peering_crd

    return [*crd_documents(), kopf_peering_crd()]


def _install(args: argparse.Namespace) -> list[dict[str, Any]]:
    from reconciler.k8s.install import InstallError, install_documents, scrape_hint

    try:
        docs = install_documents(cluster=args.cluster, ca_dir=args.ca, image=args.image or default_image(),
                                 prometheus=args.prometheus, replicas=args.replicas, now=dt.datetime.now(dt.UTC),
                                 pod_monitor=args.pod_monitor)
    except InstallError as exc:
        raise UsageError(f"k8s install: {exc}") from None
    if args.prometheus is None:
        print(f"lockgate: note: {scrape_hint()}", file=sys.stderr)
    return docs


def _inject(args: argparse.Namespace) -> list[dict[str, Any]]:
    import yaml

    inject = _module("reconciler.k8s.inject")
    raw = _read_input(args.filename)
    try:
        docs = [d for d in yaml.load_all(raw, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) if d is not None]
    except (yaml.YAMLError, RecursionError) as exc:
        raise UsageError(f"k8s inject: {args.filename}: not YAML: {' '.join(str(exc).split())}") from None
    if not all(isinstance(d, dict) for d in docs):
        raise UsageError(f"k8s inject: {args.filename}: every document must be a Kubernetes object (a mapping)")
    options: dict[str, Any] = {"cluster": args.cluster, "image": args.image}  # None: InjectConfig's default
    if args.xds is not None:
        host, sep, port = args.xds.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise UsageError(f"k8s inject: --xds {args.xds!r}: give HOST:PORT")
        options["xds"] = args.xds
    try:
        config = inject.InjectConfig(**{k: v for k, v in options.items() if v is not None})
    except (TypeError, ValueError) as exc:  # a flag the injector refuses
        raise UsageError(f"k8s inject: {' '.join(str(exc).split())}") from None
    try:
        injected: list[dict[str, Any]] = inject.inject_documents(docs, config)
    except ValueError as exc:  # a document the injector refuses
        raise UsageError(f"k8s inject: {args.filename}: {' '.join(str(exc).split())}") from None
    return injected


def _read_input(filename: str) -> bytes:
    try:
        if filename == "-":
            raw: bytes = sys.stdin.buffer.read(MAX_INPUT_BYTES + 1)
        else:
            with open(filename, "rb") as f:
                raw = f.read(MAX_INPUT_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"k8s inject: {filename}: {exc.strerror or exc}") from None
    if len(raw) > MAX_INPUT_BYTES:
        raise UsageError(f"k8s inject: {filename}: more than {MAX_INPUT_BYTES >> 20} MiB")
    return raw


def default_image() -> str:
    """The image of this very version: what the manifests run is what printed them."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{IMAGE_REPOSITORY}:{version('lockgate')}"
    except PackageNotFoundError:
        raise UsageError("lockgate is not installed as a package, so its version is unknown: give --image") from None


def dump_yaml(docs: list[dict[str, Any]]) -> str:
    """Multi-document YAML, the one way every `k8s` command prints (the CRDs' dumper)."""
    from reconciler.k8s.crds import dump_yaml as dump

    return dump(docs)


def _exists(module: str) -> bool:
    from importlib.util import find_spec

    return find_spec(module) is not None


def _module(name: str) -> Any:
    """The module `name`, or a UsageError saying this build lacks it (the parts of `k8s` land separately)."""
    if not _exists(name):
        raise UsageError(f"k8s: not available in this build ({name} is missing)")
    return importlib.import_module(name)
