"""render(): every proxy of one cluster -> its Snapshot. Pure: no clock, no environment, no I/O.

The same inputs give byte-identical snapshots, which is what makes versions meaningful and golden tests
possible. Listeners, routes and clusters are built by their own modules; this one decides who gets what.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

from mesh.intent import Intent, Route, TrafficPolicy
from mesh.render.clusters import Outbound, cluster_versions, inbound_cluster, outbound_clusters
from mesh.render.clusters import for_protocol as cluster_protocol
from mesh.render.context import Ctx, Dirty, Extension, GatewayResources, Proxy, RenderCache, Shared, shared_set
from mesh.render.egress import EgressRender, outbound_listener
from mesh.render.listeners import any_fault, faulty, listener_config, scoped
from mesh.render.listeners import for_protocol as listener_protocol
from mesh.render.routes import (
    inbound_routes,
    ingress_scoped,
    ingress_vhosts,
    outbound_config,
    outbound_scoped,
    route_config,
)
from mesh.render.tcp import is_tcp
from mesh.render.tcp import outbound_listeners as tcp_outbound
from mesh.topology import ClusterTopology, Gateway, Sidecar
from mesh.xds.snapshot import ResourceSet, Snapshot


def render(
    *,
    intent: Intent,
    topology: ClusterTopology,
    revision: str = "",
    extensions: Sequence[Extension] = (),
    cache: RenderCache | None = None,
) -> dict[str, Snapshot]:
    """Every proxy of one cluster -> its snapshot. Proxies absent from the topology get nothing.

    Rollout weights arrive already written into the intent's Routes (the rollout overlay); `extensions`
    let higher layers add filters, transport sockets, secrets, endpoints elsewhere and gateways of their
    own kinds; `cache` (from the previous render of the same cluster) makes unchanged parts free."""
    cache = cache if cache is not None else RenderCache()
    prints = tuple(ext.fingerprint() for ext in extensions)
    route_prints = tuple(ext.routes_fingerprint() for ext in extensions)
    # Compared once here, then by identity per resource: a deep fingerprint (every service's identities)
    # compared for each of thousands of clusters cost most of a one-route render.
    same_prints = prints == cache.prints
    if same_prints:
        prints = cache.prints
    dirty = changed_services(cache, intent, topology, same=same_prints and route_prints == cache.route_prints
                             and not any(ext.routes_per_proxy for ext in extensions))
    cache.prints = prints
    cache.intent = None  # until this render has finished: one that fails leaves nothing to compare against
    memos = (cache.configs, cache.sets)
    for memo in memos:  # a render of every service finds what the mesh still has: the rest is swept at its end
        if dirty is None:
            memo.track()
        else:
            memo.sweep(drop=False)
    shared = Shared(intent=intent, cache=cache, prints=prints, dirty=dirty)
    leaving = EgressRender(intent=intent, cache=cache)  # ExternalServices and the outbound traffic policy
    before = cache.outbound
    raw = outbound_clusters(intent, topology, cache, dirty)
    by_service = _with_endpoint_hooks(shared, extensions, raw)
    # The changed services' clusters are last render's objects (a weight moved, say) and nothing else may
    # differ (`dirty`): every reach's cluster and endpoint sets are last render's too.
    kept_reaches = cache.reach_sets if dirty is not None and before and all(
        raw[k] is before.get(k) for k in dirty) else {}
    base_inbound = inbound_routes()
    inbound_sets = {id(base_inbound): (base_inbound, ResourceSet([base_inbound]))}

    def inbound_for(ctx: Ctx) -> ResourceSet:
        """A sidecar's inbound route configuration after the extensions' hooks: one set per distinct result
        object, so every sidecar the hooks leave alone (or hand the same object) shares one."""
        config = ctx.inbound_route(base_inbound)
        found = inbound_sets.get(id(config))
        if found is None or found[0] is not config:
            found = inbound_sets[id(config)] = (config, ResourceSet([config]))
        return found[1]

    shared_hooks = not any(ext.clusters_per_proxy for ext in extensions)
    everything = tuple(by_service)
    per_reach: dict[tuple[tuple[str, str], ...], tuple[ResourceSet, ResourceSet, bool]] = {}
    reach_ids: dict[int, tuple[object, tuple[ResourceSet, ResourceSet, bool]]] = {}

    def for_reach(ctx: Ctx, reach: tuple[tuple[str, str], ...]) -> tuple[ResourceSet, ResourceSet, bool]:
        """Clusters, endpoints and "any fault" of one reach: computed once per render, not per proxy (found
        by identity first: most sidecars hold the one `everything` tuple, which is slow to hash)."""
        hit = reach_ids.get(id(reach))
        if hit is not None and hit[0] is reach:
            return hit[1]
        found = per_reach.get(reach)
        if found is None:
            last = kept_reaches.get(reach)
            if last is not None:
                clusters, endpoints = last
            else:
                clusters = shared_set(cache, ("clusters", reach),
                                      [_hooked(shared, c, ctx.cluster) for key in reach for c in by_service[key][0]])
                endpoints = shared_set(cache, ("endpoints", reach),
                                       [e for key in reach for e in by_service[key][1]], key="cluster_name")
            found = per_reach[reach] = (clusters, endpoints, any_fault(shared, reach))
        reach_ids[id(reach)] = (reach, found)
        return found

    own_now: dict[tuple[str, str], tuple[list[dict[str, Any]], ResourceSet]] = {}

    def kept(key: tuple[str, str], items: list[dict[str, Any]]) -> ResourceSet:
        """A proxy's own resources (its listeners, its inbound cluster, its secrets), built afresh every
        render: last render's set when equal in content. A deep `==` costs a fraction of hashing them
        again, and the kept set keeps its identity, so its version, its serialised form and the delta
        server's per-part bookkeeping all carry over (only proxies whose own resources changed differ)."""
        hit = cache.own.get(key)
        if hit is None or hit[0] != items:
            hit = (items, ResourceSet(items))
        own_now[key] = hit
        return hit[1]

    out: dict[str, Snapshot] = {}
    views: dict[Any, Any] = {}  # Snapshot.memo
    for gw in topology.gateways:
        # A gateway of a kind render does not know: the extension that knows it renders it; none does, an
        # empty configuration (an unanswered proxy would stay un-ready for its initial fetch timeout).
        ctx = Ctx(extensions=extensions, proxy=gw, shared=shared)
        made = next((r for ext in extensions if (r := ext.gateway(gw, intent=intent, topology=topology))), None)
        made = made or GatewayResources()
        out[gw.node_id] = Snapshot.of(listeners=[ctx.listener(x) for x in made.listeners], clusters=made.clusters,
                                      endpoints=made.endpoints, revision=revision)
    proxies: list[Proxy] = [*([topology.ingress] if topology.ingress else []), *topology.sidecars]
    for proxy in proxies:
        ctx = Ctx(extensions=extensions, proxy=proxy, shared=shared)
        if isinstance(proxy, Gateway):
            reach = everything  # the ingress may route to any service (hosts, and their mirrors)
            clusters, endpoints, _ = for_reach(ctx, reach)
            exposed = cache.exposed if dirty is not None and cache.exposed is not None else [
                key for key, r in intent.routes.items() if r.spec.hosts]  # `dirty`: every Route's hosts as before
            cache.exposed = exposed
            vhosts = ingress_vhosts(ctx)
            cut = ingress_scoped(ctx, vhosts)  # one route configuration per host, unless a host is a wildcard
            listener = listener_config("ingress", proxy.address, proxy.port, ingress=True,
                                       fault=any_fault(shared, exposed), lowercase_host=cut is not None)
            scopes: list[ResourceSet] = []
            if cut is None:
                routes = [ResourceSet([route_config("ingress", vhosts)])]
            else:
                scopes, routes = cut
                listener = scoped(listener, route_config("ingress", [])["virtual_hosts"][-1])
            listeners = [listener]
            own: list[dict[str, Any]] = []
            outside: list[ResourceSet] = []
        else:
            allowed = egress(intent, proxy)
            reach = everything if allowed is None else tuple(key for key in everything if key in allowed)
            clusters, endpoints, fault = for_reach(ctx, reach)
            exits = leaving.for_sidecar(namespace=proxy.namespace, allowed=allowed, reach=reach)
            outbound = outbound_listener(listener_protocol(intent, proxy, listener_config(
                "outbound", proxy.outbound_address or proxy.address, proxy.outbound_port, ingress=False,
                proxy=True, fault=fault)), allow_any=exits.allow_any)
            # A TCP service's inbound listener has no routes (tcp_proxy): no inbound route configuration.
            inbound = [] if is_tcp(intent, proxy.namespace, proxy.service) else [inbound_for(ctx)]
            # Routes cut per destination (scopes), unless ALLOW_ANY (it needs a catch-all virtual host, which
            # scopes cannot have) or there is no destination at all (Envoy wants at least one scope).
            scope_sets, route_sets = ([], []) if exits.allow_any else outbound_scoped(
                ctx, proxy, reach, external=exits.vhosts, external_key=exits.key)
            if any(len(part) for part in scope_sets):
                outbound = scoped(outbound, exits.catch_all)
                routes, scopes = [*inbound, *route_sets], scope_sets
            else:
                routes = [*inbound, outbound_config(ctx, proxy, reach, external=exits.vhosts,
                                                    catch_all=exits.catch_all, external_key=exits.key)]
                scopes = []
            listeners = [  # the app's protocol first, so extensions see the listeners they will serve
                listener_protocol(intent, proxy, listener_config("inbound", proxy.address, proxy.inbound_port,
                                                                 ingress=False)),
                outbound,
                *tcp_outbound(intent, proxy, reach),
            ]
            own = [ctx.cluster(cluster_protocol(intent, proxy, inbound_cluster(proxy)))]
            outside = [exits.clusters]  # no extension hooks: the mesh's mTLS is not for servers outside it
        if not shared_hooks:
            clusters = ResourceSet([ctx.cluster(c) for key in reach for c in by_service[key][0]])
        out[proxy.node_id] = Snapshot.compose(
            listeners=[kept((proxy.node_id, "listeners"), [ctx.listener(x) for x in listeners])],
            routes=routes,
            clusters=[clusters, kept((proxy.node_id, "clusters"), own), *outside],
            endpoints=[endpoints],
            secrets=[kept((proxy.node_id, "secrets"), ctx.secrets())],
            scoped_routes=scopes,
            revision=revision,
            previous=cache.snapshots.get(proxy.node_id),
            memo=views,
        )
    cache.faulty = faulty(shared)  # what the next render's changed services are applied to
    cache.reach_sets = {reach: (c, e) for reach, (c, e, _) in per_reach.items()}
    cache.buckets, cache.reaches, cache.layout_of = shared.buckets, shared.reaches, dict(shared.layouts)
    cache.snapshots = out
    cache.route_prints, cache.intent, cache.topology = route_prints, intent, topology
    cache.hooked = shared.hooked  # only what this render used: the cache does not grow with history
    cache.own = own_now
    cache.scoped = shared.scoped_groups
    cache.group_configs = shared.group_configs
    for memo in memos:
        memo.sweep(drop=dirty is None)
    if dirty is None:
        _prune(cache, intent)
    return out


def _prune(cache: RenderCache, intent: Intent) -> None:
    """Forget the per-service memos of services the intent no longer has, and the ingress virtual hosts of
    hosts no Route still exposes (after a render of every service: one of the changed ones only cannot
    have lost either)."""
    services, routes = intent.services, intent.routes
    cache.routes = {k: v for k, v in cache.routes.items() if k in services}
    cache.clusters = {k: v for k, v in cache.clusters.items() if k in services}

    def live(key: tuple[Any, ...]) -> bool:
        if key[0] != "ingress":
            return key[:2] in services
        route = routes.get(key[1:3])
        return route is not None and tuple(route.spec.hosts) == key[3:]

    cache.vhosts = {k: v for k, v in cache.vhosts.items() if live(k)}


DIRTY_SHARE = 8
"""Past one service in this many changed, a render takes the whole path (`changed_services`)."""


def changed_services(cache: RenderCache, intent: Intent, topology: ClusterTopology, *, same: bool) -> Dirty:
    """Which services' route entries may differ from the last render's, when nothing else does: the same
    Mesh, Services, Workloads, topology and other resources, Routes and TrafficPolicies for the same
    services, and each changed Route exposing the same hosts. A commit (or a rollout step) that changes
    a few Routes then costs those services' parts, not a walk of every service: at 1000 services that
    walk was most of a one-route render. None (anything may differ) otherwise; `same`: the extensions'
    fingerprints are equal to the last render's."""
    before = cache.intent
    if before is None or not same:
        return None
    if before is intent and cache.topology is topology:
        return frozenset()
    if not (before.mesh is intent.mesh and cache.topology == topology and before.services == intent.services
            and before.workloads == intent.workloads and before.routes.keys() == intent.routes.keys()
            and before.traffic_policies.keys() == intent.traffic_policies.keys()):
        return None
    if before.resources is not intent.resources and (len(before.resources) != len(intent.resources) or not all(
            a is b or (isinstance(a, Route | TrafficPolicy) and type(a) is type(b))
            for a, b in zip(before.resources, intent.resources, strict=True))):
        return None  # another kind changed (a policy, an ExternalService, a Rollout), or one came or went
    dirty = {k for k, r in intent.routes.items() if before.routes[k] is not r}
    if any(before.routes[k].spec.hosts != intent.routes[k].spec.hosts for k in dirty):
        return None
    dirty.update(k for k, tp in intent.traffic_policies.items() if before.traffic_policies[k] is not tp)
    return frozenset(dirty) if len(dirty) * DIRTY_SHARE <= len(intent.services) else None


Services = Outbound


def _with_endpoint_hooks(shared: Shared, extensions: Sequence[Extension], by_service: Services) -> Services:
    """Every service's endpoints after the extensions' endpoint hooks (instances in other clusters, say):
    proxy-independent, so once per render, and reused across renders while fingerprints are equal."""
    if not extensions:
        return by_service
    def hook(res: dict[str, Any], *, namespace: str, service: str, version: str | None) -> dict[str, Any]:
        for ext in extensions:
            res = ext.endpoints(res, namespace=namespace, service=service, version=version)
        return res

    out: Services = {}
    for (ns, svc), (clusters, endpoints) in by_service.items():
        versions = cluster_versions(shared.intent, ns, svc)
        out[(ns, svc)] = (clusters, [
            _hooked(shared, cla, functools.partial(hook, namespace=ns, service=svc, version=version))
            for version, cla in zip(versions, endpoints, strict=True)])
    return out


def _hooked(shared: Shared, res: dict[str, Any], hook: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
    """A shared resource after the extensions' proxy-independent hooks, once per resource object (and
    across renders while the extensions' fingerprints are equal)."""
    if not shared.prints:
        return res
    prints, cache = shared.prints, shared.cache
    hit = cache.hooked.get(id(res))
    fresh = hit is None or hit[0] is not res or hit[1] is not prints
    result = hook(res) if fresh else hit[2]  # type: ignore[index]
    shared.hooked[id(res)] = (res, prints, result)
    return result


def egress(intent: Intent, sidecar: Sidecar) -> frozenset[tuple[str, str]] | None:
    """(namespace, service) pairs a sidecar's workload may call; None when its Workload does not say."""
    workload = intent.workloads.get((sidecar.namespace, sidecar.workload))
    if workload is None or workload.spec.egress is None:
        return None
    return frozenset(egress_key(name, sidecar.namespace) for name in workload.spec.egress)


def egress_key(name: str, namespace: str) -> tuple[str, str]:
    """`svc` (in the workload's own namespace) or `svc.ns` -> (ns, svc)."""
    svc, _, ns = name.partition(".")
    return (ns or namespace, svc)
