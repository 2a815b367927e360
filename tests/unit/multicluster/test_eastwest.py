"""Several clusters: east-west gateways and other clusters' instances as failover, as a render extension."""

from __future__ import annotations

from pathlib import Path

from mesh.names import cluster_name, sni
from mesh.render import render
from mesh.topology import ClusterTopology, Gateway
from mesh.xds.snapshot import CLUSTER, ENDPOINT, LISTENER
from multicluster.eastwest import EASTWEST, EastWestExtension, RemoteCluster, remote_view
from reconciler.load import load, read_worktree
from tests.fixtures.topology import topology as shop_topology

GOLDEN = Path(__file__).parents[1] / "mesh" / "golden"
WEST = RemoteCluster(cluster="west", address="127.0.2.1", port=15443,
                     instances=((("shop", "reviews", "v1"), 2), (("shop", "reviews", "v2"), 1)))


def topology(ready_v2: bool = True) -> ClusterTopology:
    return shop_topology(ready=lambda s: ready_v2 or "v2" not in s.node_id,
                         gateways=(Gateway("east/eastwest", "127.0.1.1", 15443, kind=EASTWEST),))


def test_other_clusters_are_failover_through_their_east_west_gateways() -> None:
    loaded = load(read_worktree(GOLDEN / "template"))
    assert loaded.intent is not None
    snaps = render(intent=loaded.intent, topology=topology(ready_v2=False),
                   extensions=[EastWestExtension(local="east", remotes=(WEST,))])
    eds = snaps["east/ingress"].items(ENDPOINT)
    v1 = eds[cluster_name("shop", "reviews", "v1")]["endpoints"]
    # Local instance first (priority 0), the other cluster's gateway as failover, weighted by its instances.
    assert [(g.get("priority", 0), g["locality"]["zone"], len(g["lb_endpoints"])) for g in v1] == [
        (0, "east", 1), (1, "west", 1)]
    assert v1[1]["lb_endpoints"][0]["load_balancing_weight"] == 2
    assert v1[1]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"] == {"address": "127.0.2.1",
                                                                                 "port_value": 15443}
    # A version with no ready local instance goes to the other cluster, at priority 0.
    v2 = eds[cluster_name("shop", "reviews", "v2")]["endpoints"]
    assert [(g["priority"], g["locality"]["zone"]) for g in v2] == [(0, "west")]
    # A service the other cluster does not run has no remote endpoints at all.
    fe = eds[cluster_name("shop", "frontend", "v1")]["endpoints"]
    assert all("priority" not in g for g in fe)
    # This cluster's gateway passes TLS through by SNI, to local instances only.
    gw = snaps["east/eastwest"]
    [listener] = gw.items(LISTENER).values()
    names = [c["filter_chain_match"]["server_names"][0] for c in listener["filter_chains"]]
    assert sni("shop", "reviews", "v1") in names and sni("shop", "reviews", None) in names
    assert sni("shop", "reviews", "v2") not in names  # not ready here: nothing to pass through to
    assert all(not n.startswith("outbound|") for n in gw.items(CLUSTER))  # never onward to another cluster
    for snap in snaps.values():
        snap.consistent()


def test_without_the_extension_render_knows_nothing_of_other_clusters() -> None:
    loaded = load(read_worktree(GOLDEN / "template"))
    assert loaded.intent is not None
    snaps = render(intent=loaded.intent, topology=topology(ready_v2=False))
    v2 = snaps["east/ingress"].items(ENDPOINT)[cluster_name("shop", "reviews", "v2")]
    assert v2["endpoints"] == []
    assert snaps["east/eastwest"].items(LISTENER) == {}  # answered, but render cannot build a gateway it does not know


def test_nearer_clusters_come_first_when_localities_are_given() -> None:
    loaded = load(read_worktree(GOLDEN / "template"))
    assert loaded.intent is not None
    near = RemoteCluster(cluster="west", address="127.0.2.1", port=15443, locality="eu/eu-1",
                         instances=((("shop", "reviews", "v1"), 1),))
    same_region = RemoteCluster(cluster="north", address="127.0.3.1", port=15443, locality="eu/eu-2",
                                instances=((("shop", "reviews", "v1"), 1),))
    far = RemoteCluster(cluster="south", address="127.0.4.1", port=15443, locality="us/us-1",
                        instances=((("shop", "reviews", "v1"), 3),))
    also_far = RemoteCluster(cluster="south2", address="127.0.5.1", port=15443, locality="us/us-1",
                             instances=((("shop", "reviews", "v1"), 1),))
    ext = EastWestExtension(local="east", locality="eu/eu-1", remotes=(far, near, also_far, same_region))
    snaps = render(intent=loaded.intent, topology=topology(), extensions=[ext])
    v1 = snaps["east/ingress"].items(ENDPOINT)[cluster_name("shop", "reviews", "v1")]["endpoints"]
    assert [(g.get("priority", 0), g["locality"]) for g in v1] == [
        (0, {"region": "eu", "zone": "eu-1"}),  # here
        (1, {"region": "eu", "zone": "eu-1"}),  # west: same zone
        (2, {"region": "eu", "zone": "eu-2"}),  # north: same region
        (3, {"region": "us", "zone": "us-1"}),  # south and south2 share a locality: one group
    ]
    assert [e["load_balancing_weight"] for e in v1[3]["lb_endpoints"]] == [3, 1]
    snaps["east/ingress"].consistent()


def test_remote_view_counts_only_ready_instances() -> None:
    view = remote_view(topology(ready_v2=False), locality="eu")
    assert view is not None
    assert view.instances == ((("shop", "frontend", "v1"), 1), (("shop", "reviews", "v1"), 1))
    assert (view.address, view.port, view.locality) == ("127.0.1.1", 15443, "eu")
    assert remote_view(ClusterTopology(cluster="x")) is None  # no east-west gateway: not reachable from others


def test_envoy_accepts_locality_priorities_and_the_gateway(tmp_path: Path) -> None:
    import asyncio

    from mesh.envoy import static_bootstrap, validate_config
    from mesh.xds.snapshot import ROUTE, SCOPED_ROUTE, SECRET

    loaded = load(read_worktree(GOLDEN / "template"))
    assert loaded.intent is not None
    near = RemoteCluster(cluster="west", address="127.0.2.1", port=15443, locality="eu/eu-1",
                         instances=((("shop", "reviews", "v1"), 1),))
    far = RemoteCluster(cluster="south", address="127.0.4.1", port=15443, locality="us",
                        instances=((("shop", "reviews", "v1"), 3),))
    ext = EastWestExtension(local="east", locality="eu/eu-1", remotes=(far, near))
    snaps = render(intent=loaded.intent, topology=topology(), extensions=[ext])
    for node in ("east/ingress", "east/eastwest"):
        snap = snaps[node]
        parts = {key: [dict(r) for r in snap.items(t).values()] for key, t in (
            ("listeners", LISTENER), ("routes", ROUTE), ("clusters", CLUSTER), ("endpoints", ENDPOINT),
            ("secrets", SECRET), ("scoped_routes", SCOPED_ROUTE))}
        assert asyncio.run(validate_config(static_bootstrap(**parts), workdir=tmp_path)) is None, node
