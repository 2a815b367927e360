"""The composition root of `lockgate operator`: the reconcile loop on Kubernetes, driven by kopf.

One operator per cluster. It follows the GitSource in its namespace with the same reconcile loop as
`lockgate up` (pygit2 source, the one pipeline, the control plane), over a `KubernetesRuntime` whose
topology comes from kopf indexes of pods and EndpointSlices; it answers the sidecar injector's
AdmissionReviews; it writes Kubernetes-style status onto the GitSource. Handlers are registered on a
registry of their own, so several operators (tests) can run in one process.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kopf
import yaml
from aiohttp import web

from mesh.intent import parse_duration_ms
from multicluster.ca import ensure_hierarchy
from reconciler.k8s.gitsource import GitSourceSpec
from reconciler.loop import Reconciler, UpConfig, install_stop_signals
from reconciler.runtime.base import Bind
from reconciler.runtime.kubernetes.conditions import gitsource_status
from reconciler.runtime.kubernetes.objects import EndpointEntry, PodEntry, pod_entry, slice_entries
from reconciler.runtime.kubernetes.remote import REMOTE_LABEL, RemoteAccess, from_secret, read_remote
from reconciler.runtime.kubernetes.remote import api_client as remote_api_client
from reconciler.runtime.kubernetes.runtime import AUDIENCE, KubernetesRuntime, ReviewedToken, parse_review
from reconciler.source.base import GitError
from reconciler.source.git import HttpCredentials, Pygit2Source
from reconciler.source.subdir import SubdirSource, normalise

log = logging.getLogger("lockgate.operator")
GROUP, VERSION = "lockgate.io", "v1alpha1"
REVIEW_TIMEOUT_S = 5.0
STATUS_INTERVAL_S = 1.0
REAPPLY_DEBOUNCE_S = 0.2
"""A `kubectl apply` of many resources arrives as a burst of events: one re-apply for the burst."""
CLUSTER_PREFIX = "@cluster"
REMOTE_POLL_S = 5.0
"""Seconds between reads of a remote cluster's API (Istio watches; a list every few seconds is simpler and
bounds what a remote outage can do to us)."""
REMOTE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class OperatorConfig:
    cluster: str
    state_dir: Path
    namespace: str = "lockgate-system"
    ca_dir: Path | None = None
    xds: Bind = field(default_factory=lambda: Bind(address="0.0.0.0", port=15010))
    webhook: Bind | None = field(default_factory=lambda: Bind(address="0.0.0.0", port=9443))
    """Where the injector's HTTPS endpoint listens; None: no webhook (inject offline with `k8s inject`)."""
    metrics: Bind | None = field(default_factory=lambda: Bind(address="0.0.0.0", port=9090))
    prometheus_url: str | None = None
    kubeconfig: Path | None = None
    """None: in-cluster (the service account the Deployment runs as), else this kubeconfig."""
    standalone: bool = False
    """No peering: for one replica (and tests); with peering a second replica stands by."""
    image: str | None = None
    """The sidecar image the injector adds (default: the one `InjectConfig` names)."""
    xds_service: str | None = None
    """`host:port` injected sidecars reach the control plane at (default: the operator's Service)."""
    insecure_remotes: bool = False
    """Accept http:// remote APIs (an emulator in tests). Never for real clusters: tokens in clear."""


@dataclass
class _Session:
    key: tuple[str, str]
    spec: GitSourceSpec
    reconciler: Reconciler
    stop: asyncio.Event
    task: asyncio.Task[None]


@dataclass
class Operator:
    """The operator's state between kopf's handlers: the runtime, the session following the GitSource."""

    config: OperatorConfig
    api: Any
    """A `kubernetes.client.ApiClient` (TokenReview); the same credentials kopf logs in with."""
    runtime: KubernetesRuntime = field(init=False)
    session: _Session | None = None
    remotes: dict[str, tuple[RemoteAccess, asyncio.Task[None]]] = field(default_factory=dict)
    """Other clusters of the Mesh, read from their APIs (remote secrets)."""
    remote_errors: dict[str, str] = field(default_factory=dict)
    resources: dict[tuple[str, str, str], bytes] = field(default_factory=dict)
    """lockgate resources applied with kubectl: (kind, namespace, name) -> their YAML, as intent files."""
    _reapply: asyncio.TimerHandle | None = None
    problem: str | None = None
    webhook_files: tuple[Path, Path] | None = None

    def __post_init__(self) -> None:
        self.runtime = KubernetesRuntime(cluster=self.config.cluster, xds=self.config.xds, review=self.review,
                                         prometheus_url=self.config.prometheus_url)

    # --- identity ---------------------------------------------------------------------------------

    async def review(self, token: str) -> ReviewedToken | None:
        """TokenReview (audience `lockgate`) on a thread: the kubernetes client is synchronous."""
        from kubernetes import client

        def ask() -> Mapping[str, Any]:
            body = client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token, audiences=[AUDIENCE]))
            result = client.AuthenticationV1Api(self.api).create_token_review(
                body, _request_timeout=REVIEW_TIMEOUT_S)
            status = self.api.sanitize_for_serialization(result).get("status") or {}
            return status if isinstance(status, Mapping) else {}

        status = await asyncio.wait_for(asyncio.to_thread(ask), REVIEW_TIMEOUT_S + 1)
        return parse_review(status)

    # --- the GitSource ----------------------------------------------------------------------------

    async def follow(self, key: tuple[str, str], spec: Mapping[str, Any]) -> None:
        """Start (or restart, when the spec changed) the loop that follows this GitSource."""
        if self.session is not None and self.session.key != key:
            raise kopf.PermanentError(f"this operator already follows GitSource {'/'.join(self.session.key)}; "
                                      "one GitSource per cluster")
        try:
            parsed = GitSourceSpec.model_validate(dict(spec))
        except ValueError as exc:
            self.problem = f"invalid spec: {exc}"
            raise kopf.PermanentError(self.problem) from exc
        if self.session is not None and self.session.spec == parsed:
            return
        await self.unfollow()
        self.problem = None
        if parsed.suspend:
            log.info("GitSource %s is suspended: the last applied revision keeps serving", "/".join(key))
            return
        cfg = self.config
        up = UpConfig(repo=parsed.url, state_dir=cfg.state_dir, branch=parsed.branch,
                      poll_interval=parse_duration_ms(parsed.interval) / 1000.0,
                      prometheus_url=cfg.prometheus_url, ca_dir=cfg.ca_dir)
        credentials = None
        if parsed.secret_ref is not None:
            credentials = await self.credentials(key[0], parsed.secret_ref.name)
        try:  # opening a URL clones it: network I/O, off the loop
            source = await asyncio.to_thread(Pygit2Source.open, parsed.url, branch=parsed.branch,
                                             cache_dir=cfg.state_dir / "git", fetch_deadline=up.fetch_timeout,
                                             credentials=credentials)
        except GitError as exc:
            raise kopf.TemporaryError(f"cannot open {parsed.url}: {exc}", delay=10) from exc
        folder = normalise(parsed.path)
        followed = SubdirSource(source, folder) if folder else source
        rec = Reconciler(config=up, source=followed, runtime=self.runtime, announced=True,
                         extra_files=self.resource_files)
        stop = asyncio.Event()
        task = asyncio.create_task(rec.run(stop), name=f"reconcile {'/'.join(key)}")
        self.session = _Session(key=key, spec=parsed, reconciler=rec, stop=stop, task=task)
        log.info("following GitSource %s: %s (%s)", "/".join(key), parsed.url, parsed.branch or "default branch")

    async def credentials(self, namespace: str, name: str) -> HttpCredentials:
        """The GitSource's Secret as http(s) credentials (`username` + `password`, the password may be a
        token). A Secret that is not there yet is a temporary error (kopf retries); one lockgate cannot use
        is permanent, with the reason in status."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        def read() -> Mapping[str, str]:
            secret = client.CoreV1Api(self.api).read_namespaced_secret(name, namespace, _request_timeout=10)
            return {str(k): str(v) for k, v in (secret.data or {}).items()}

        try:
            data = await asyncio.to_thread(read)
        except ApiException as exc:
            if exc.status == 404:
                raise kopf.TemporaryError(f"spec.secretRef: Secret {namespace}/{name} not found", delay=10) from None
            raise kopf.TemporaryError(f"spec.secretRef: reading Secret {namespace}/{name}: {exc.reason}",
                                      delay=10) from None
        values = {k: base64.b64decode(v).decode(errors="replace") for k, v in data.items()}
        if "identity" in values:
            self.problem = (f"spec.secretRef: Secret {name} holds an SSH identity; SSH credentials are not "
                            "supported yet: use an https:// URL with `username` and `password` (a token)")
            raise kopf.PermanentError(self.problem)
        if not values.get("username") or not values.get("password"):
            self.problem = f"spec.secretRef: Secret {name} needs `username` and `password`"
            raise kopf.PermanentError(self.problem)
        return HttpCredentials(values["username"], values["password"])

    async def unfollow(self) -> None:
        """Stop following Git. The control plane goes with it, the proxies keep their last configuration."""
        session, self.session = self.session, None
        if session is None:
            return
        session.stop.set()
        await asyncio.wait({session.task}, timeout=10)  # never raises: not even if kopf cancelled it
        if not session.task.done():
            session.task.cancel()
        await session.reconciler.detach()

    def status(self, generation: int | None, previous: list[Mapping[str, Any]]) -> dict[str, Any]:
        loop = self.session.reconciler.status() if self.session is not None else None
        if self.session is not None and self.session.task.done() and not self.session.task.cancelled():
            exc = self.session.task.exception()
            if exc is not None:
                loop = None
                self.problem = f"the reconcile loop stopped: {exc!r}"
        out = gitsource_status(loop, generation=generation, previous=previous, problem=self.problem)
        if self.remotes or self.remote_errors:
            out["remoteClusters"] = {
                c: {"error": self.remote_errors.get(c),
                    "readyInstances": len(self.runtime.topology(c).ready),
                    "eastwest": next((f"{g.address}:{g.port}" for g in self.runtime.topology(c).gateways), None)}
                for c in sorted(set(self.remotes) | set(self.remote_errors))}
        return out

    # --- other clusters (remote secrets) ----------------------------------------------------------

    def remote_secret(self, event: str, body: Mapping[str, Any]) -> None:
        """A labelled Secret changed: read the clusters it names from now on, forget those it stopped naming."""
        name = str((body.get("metadata") or {}).get("name"))
        wanted: dict[str, RemoteAccess] = {}
        if event != "DELETED":
            wanted, problems = from_secret(body, allow_http=self.config.insecure_remotes)
            for cluster, problem in problems.items():
                log.warning("secret %s: %s", name, problem)
                self.remote_errors[cluster] = problem
        for cluster in [c for c in self.remotes if c not in wanted or self.remotes[c][0] != wanted[c]]:
            self.remotes.pop(cluster)[1].cancel()
            if cluster not in wanted:
                self.runtime.set_remote(cluster, None)
        for cluster, access in wanted.items():
            if cluster == self.config.cluster:
                self.remote_errors[cluster] = f"secret {name} names this cluster itself: ignored"
                continue
            if cluster not in self.remotes:
                task = asyncio.create_task(self._follow_remote(access), name=f"remote cluster {cluster}")
                self.remotes[cluster] = (access, task)

    async def _follow_remote(self, access: RemoteAccess) -> None:
        """Read the remote API every REMOTE_POLL_S. When it cannot be reached the last view stays (its
        instances were there a moment ago; dropping them would move traffic on a network blip)."""
        api = await asyncio.to_thread(remote_api_client, access)
        while True:
            try:
                topo = await asyncio.wait_for(asyncio.to_thread(
                    read_remote, api, access.cluster, namespace=self.config.namespace), REMOTE_TIMEOUT_S + 5)
                self.remote_errors.pop(access.cluster, None)
                self.runtime.set_remote(access.cluster, topo)
            except Exception as exc:  # the remote API is down or refuses us: keep the last view, say so
                self.remote_errors[access.cluster] = f"{type(exc).__name__}: {exc}"[:500]
                log.warning("remote cluster %s: %s", access.cluster, self.remote_errors[access.cluster])
            await asyncio.sleep(REMOTE_POLL_S)

    def stop_remotes(self) -> None:
        for _, task in self.remotes.values():
            task.cancel()
        self.remotes.clear()

    # --- lockgate resources applied with kubectl ----------------------------------------------------

    def resource_files(self) -> dict[str, bytes]:
        """Each resource as the file `@cluster/<Kind>/<namespace>/<name>.yaml`: errors name it, and the
        loader's limits and checks apply to it as to a committed file."""
        return {f"{CLUSTER_PREFIX}/{kind}/{ns or '_'}/{name}.yaml": text
                for (kind, ns, name), text in sorted(self.resources.items())}

    def resource_changed(self, event: str, body: Mapping[str, Any]) -> None:
        meta = body.get("metadata") or {}
        key = (str(body.get("kind")), str(meta.get("namespace") or ""), str(meta.get("name")))
        if event == "DELETED" or meta.get("deletionTimestamp"):
            changed = self.resources.pop(key, None) is not None
        else:
            doc: dict[str, Any] = {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
                                   "metadata": {"name": meta.get("name"),
                                                **({"namespace": meta["namespace"]} if meta.get("namespace") else {})},
                                   "spec": body.get("spec")}
            text = yaml.safe_dump(doc, sort_keys=False).encode()
            changed = self.resources.get(key) != text
            self.resources[key] = text
        if changed and self.session is not None:
            if self._reapply is not None:
                self._reapply.cancel()
            rec = self.session.reconciler
            self._reapply = asyncio.get_running_loop().call_later(
                REAPPLY_DEBOUNCE_S, lambda: asyncio.ensure_future(rec.reapply()))

    # --- topology ---------------------------------------------------------------------------------

    def sync(self, pods: Mapping[Any, Any], endpoints: Mapping[Any, Any]) -> None:
        self.runtime.sync([v for store in pods.values() for v in store if isinstance(v, PodEntry)],
                          [v for store in endpoints.values() for v in store if isinstance(v, EndpointEntry)])

    @property
    def ready(self) -> bool:
        return self.session is not None and self.session.reconciler.applied is not None

    # --- the webhook's certificate ----------------------------------------------------------------

    def serving_files(self) -> tuple[Path, Path]:
        """The injector's serving certificate, issued at start by this cluster's intermediate (so the
        install manifests hold no serving key), valid for the operator's Service names."""
        from reconciler.k8s.tls import serving_certificate
        from reconciler.runtime.local.runtime import write_private

        ca_dir = self.config.ca_dir or self.config.state_dir / "ca"
        now = dt.datetime.now(dt.UTC)
        authority = ensure_hierarchy(ca_dir, [self.config.cluster], now=now,
                                     create_root=self.config.ca_dir is None)[self.config.cluster]
        chain, key = serving_certificate(authority, dns_names=["localhost"], now=now, ttl=dt.timedelta(days=30))
        where = self.config.state_dir / "webhook"
        cert_file, key_file = where / "tls.crt", where / "tls.key"
        write_private(cert_file, chain)
        write_private(key_file, key)
        return cert_file, key_file


def build_registry(op: Operator) -> kopf.OperatorRegistry:
    """Every handler of the operator, bound to `op`, on a registry of its own."""
    reg = kopf.OperatorRegistry()
    cfg = op.config

    @kopf.on.startup(registry=reg)
    async def configure(**kw: Any) -> None:
        settings: kopf.OperatorSettings = kw["settings"]
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="lockgate.io")
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="lockgate.io")
        settings.posting.level = logging.WARNING
        settings.peering.standalone = cfg.standalone
        settings.peering.name = f"lockgate-{cfg.cluster}"
        settings.peering.clusterwide = True
        settings.watching.server_timeout = 300
        if cfg.webhook is not None:
            certfile, pkeyfile = op.serving_files()
            settings.admission.server = kopf.WebhookServer(addr=cfg.webhook.address, port=cfg.webhook.port,
                                                           certfile=str(certfile), pkeyfile=str(pkeyfile))

    @kopf.on.login(registry=reg)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return connection_info(op.api)

    @kopf.index("pods", id="lockgate_pods", registry=reg)
    def index_pod(**kw: Any) -> dict[tuple[str, str], PodEntry] | None:
        entry = pod_entry(kw["body"])
        return {(entry.namespace, entry.name): entry} if entry is not None else None

    @kopf.index("discovery.k8s.io", "v1", "endpointslices", id="lockgate_endpoints", registry=reg)
    def index_slice(**kw: Any) -> dict[tuple[str, str], EndpointEntry] | None:
        entries = slice_entries(kw["body"])
        return {(e.namespace, e.pod): e for e in entries} or None

    @kopf.on.event("pods", registry=reg)
    @kopf.on.event("discovery.k8s.io", "v1", "endpointslices", registry=reg)
    async def topology_changed(**kw: Any) -> None:
        op.sync(kw["lockgate_pods"], kw["lockgate_endpoints"])

    gitsources = (GROUP, VERSION, "gitsources")

    @kopf.on.resume(*gitsources, registry=reg)
    @kopf.on.create(*gitsources, registry=reg)
    @kopf.on.update(*gitsources, field="spec", registry=reg)
    async def gitsource(**kw: Any) -> None:
        namespace, name = str(kw["namespace"]), str(kw["name"])
        if namespace != cfg.namespace:
            raise kopf.PermanentError(f"GitSources are read from namespace {cfg.namespace} only")
        await op.follow((namespace, name), kw["spec"])

    @kopf.on.delete(*gitsources, registry=reg, optional=True)
    async def gitsource_gone(**kw: Any) -> None:
        if op.session is not None and op.session.key == (kw["namespace"], kw["name"]):
            await op.unfollow()

    @kopf.timer(*gitsources, interval=STATUS_INTERVAL_S, registry=reg)
    async def gitsource_status_timer(**kw: Any) -> None:
        meta: kopf.Meta = kw["meta"]
        status: kopf.Status = kw["status"]
        patch: kopf.Patch = kw["patch"]
        namespace, name = kw["namespace"], kw["name"]
        if namespace != cfg.namespace or (op.session is not None and op.session.key != (namespace, name)):
            return
        previous: list[Mapping[str, Any]] = [dict(c) for c in status.get("conditions") or []]
        new = op.status(meta.get("generation"), previous)
        if {k: v for k, v in status.items()} != new:
            patch.status.update(new)

    @kopf.on.event("", "v1", "secrets", labels={REMOTE_LABEL: "true"}, registry=reg)
    async def remote_secret(**kw: Any) -> None:
        if kw["namespace"] == cfg.namespace:
            op.remote_secret(str(kw["type"] or ""), kw["body"])

    for plural in cluster_plurals():
        @kopf.on.event(GROUP, VERSION, plural, id=f"resource-{plural}", registry=reg)
        async def resource(**kw: Any) -> None:
            op.resource_changed(str(kw["type"] or ""), kw["body"])

    def inject(**kw: Any) -> None:
        body: kopf.Body = kw["body"]
        patch: kopf.Patch = kw["patch"]
        from reconciler.k8s.inject import InjectConfig, inject_pod_spec

        extra: dict[str, Any] = {}
        if cfg.image:
            extra["image"] = cfg.image
        if cfg.xds_service:
            extra["xds"] = cfg.xds_service
        done = inject_pod_spec(dict(body.get("metadata") or {}), dict(body.get("spec") or {}),
                               InjectConfig(cluster=cfg.cluster, **extra))
        if done is None:
            return
        meta, spec = done
        for key in ("labels", "annotations"):
            if meta.get(key) != body.get("metadata", {}).get(key):
                patch.metadata[key] = meta.get(key)
        for key, value in spec.items():
            if body.get("spec", {}).get(key) != value:
                patch.spec[key] = value

    if cfg.webhook is not None:
        kopf.on.mutate("pods", operations=["CREATE"], id="inject", registry=reg)(inject)
    return reg


def cluster_plurals() -> list[str]:
    """The lockgate kinds that may be applied with kubectl. Not Rollouts: their decisions are committed
    to Git next to them, so they live in Git."""
    from reconciler.k8s.crds import crd_documents

    return [d["spec"]["names"]["plural"] for d in crd_documents()
            if d["spec"]["group"] == GROUP and d["spec"]["names"]["kind"] not in ("GitSource", "Rollout")]


def connection_info(api: Any) -> kopf.ConnectionInfo:
    """kopf's login from the kubernetes client's configuration, so both speak to the same server as the
    same identity."""
    c = api.configuration
    token = (c.api_key or {}).get("authorization") or (c.api_key or {}).get("BearerToken")
    scheme, _, value = str(token or "").partition(" ")
    return kopf.ConnectionInfo(
        server=c.host, ca_path=c.ssl_ca_cert, insecure=not c.verify_ssl,
        scheme=scheme if value else None, token=value or None,
        certificate_path=c.cert_file, private_key_path=c.key_file)


def api_client(kubeconfig: Path | None) -> Any:
    from kubernetes import client, config

    configuration = client.Configuration()
    if kubeconfig is not None:
        config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)  # type: ignore[no-untyped-call]
    else:
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    return client.ApiClient(configuration)


async def health_app(op: Operator) -> web.Application:
    """`/healthz` (the process serves), `/readyz` (a revision is applied: send proxies here) and
    `/metrics` (a few gauges in Prometheus' text format)."""

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        return web.Response(text="ready\n" if op.ready else "not ready\n", status=200 if op.ready else 503)

    async def metrics(_: web.Request) -> web.Response:
        loop = op.session.reconciler.status() if op.session is not None else None
        lines = ["# TYPE lockgate_operator_ready gauge", f"lockgate_operator_ready {int(op.ready)}"]
        if loop is not None:
            proxies = [p for c in loop["clusters"] for p in c["proxies"]]
            applied = loop["revision"]["applied"]
            lines += ["# TYPE lockgate_proxies gauge", f"lockgate_proxies {len(proxies)}",
                      "# TYPE lockgate_proxies_connected gauge",
                      f"lockgate_proxies_connected {sum(1 for p in proxies if p['connected'])}",
                      "# TYPE lockgate_proxies_converged gauge",
                      f"lockgate_proxies_converged {sum(1 for p in proxies if p['ackedRevision'] == applied)}",
                      "# TYPE lockgate_revision_invalid gauge",
                      f"lockgate_revision_invalid {int(loop['revision']['failed'] is not None)}"]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    app = web.Application()
    app.add_routes([web.get("/healthz", healthz), web.get("/readyz", readyz), web.get("/metrics", metrics)])
    return app


async def run_operator(op: Operator, *, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
    """Run until `stop`. Stopping the operator stops following Git and serving xDS; the data plane (the
    user's pods and their Envoys) keeps its last configuration."""
    config = op.config
    config.state_dir.mkdir(parents=True, exist_ok=True)
    registry = build_registry(op)
    runner: web.AppRunner | None = None
    if config.metrics is not None:
        runner = web.AppRunner(await health_app(op), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, config.metrics.address, config.metrics.port).start()
    # Our session first, then kopf: kopf cancels every task still running when it stops, and the loop
    # must detach (stop serving, leave the proxies their configuration) rather than die mid-push.
    kopf_stop = asyncio.Event()

    async def stop_session_first() -> None:
        await stop.wait()
        op.stop_remotes()
        await op.unfollow()
        kopf_stop.set()

    stopper = asyncio.create_task(stop_session_first())
    try:
        await kopf.operator(registry=registry, clusterwide=True, stop_flag=kopf_stop, ready_flag=ready,
                            standalone=config.standalone)
    finally:
        stopper.cancel()
        op.stop_remotes()
        await op.unfollow()
        if runner is not None:
            await runner.cleanup()


def cmd_operator(args: Any) -> int:
    config = OperatorConfig(
        cluster=args.cluster, namespace=args.namespace, state_dir=args.state_dir, ca_dir=args.ca,
        xds=Bind(args.bind, args.xds_port),
        webhook=Bind(args.bind, args.webhook_port) if args.webhook_port else None,
        metrics=Bind(args.bind, args.metrics_port) if args.metrics_port else None,
        prometheus_url=args.prometheus, kubeconfig=args.kubeconfig, standalone=args.standalone,
        image=args.image, xds_service=args.xds_address)
    op = Operator(config=config, api=api_client(config.kubeconfig))

    async def main() -> None:
        stop, ready = asyncio.Event(), asyncio.Event()

        async def own_signals() -> None:
            # kopf installs SIGINT/SIGTERM handlers of its own once started; ours replace them, so a stop
            # ends the session first (the control plane stops serving cleanly), then kopf.
            await ready.wait()
            install_stop_signals(stop)

        signals = asyncio.create_task(own_signals())  # before kopf starts: kopf leaves it alone
        try:
            await run_operator(op, stop=stop, ready=ready)
        finally:
            signals.cancel()

    asyncio.run(main())
    return 0
