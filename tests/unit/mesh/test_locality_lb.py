"""TrafficPolicy.loadBalancer.localityLbSetting: Istio's shape and checks, against the Mesh's localities,
each finding at its file:line."""

from __future__ import annotations

import pytest

from mesh.intent import LoadBalancer
from reconciler.load import Loaded, load
from tests.fixtures.intents import reviews_policy_yaml, template_files

MESH = """\
apiVersion: lockgate.io/v1alpha1
kind: Mesh
metadata: {name: mesh}
spec:
  trustDomain: example.org
  clusters:
    - {name: east, locality: us/us-east-1/a}
    - {name: west, locality: us/us-west-2}
    - {name: central, locality: eu/eu-central-1}
    - {name: lab}
"""
OUTLIER = "  outlierDetection: {consecutive5xxErrors: 3}\n"


def with_policy(spec: str) -> Loaded:
    """The template on a four-cluster Mesh with a reviews TrafficPolicy whose spec (after `service:`) is
    `spec`: policy.yaml line 6 is the first line of `spec`."""
    files = {**template_files(), "mesh.yaml": MESH.encode(),
             "policy.yaml": reviews_policy_yaml(spec).removeprefix("---\n").encode()}
    return load(files)


def messages(loaded: Loaded) -> list[str]:
    return [str(p) for p in [*loaded.problems, *loaded.warnings]]


def test_a_valid_setting_of_each_kind_loads_clean() -> None:
    for spec in (
        "  loadBalancer:\n    localityLbSetting:\n      distribute:\n"
        "        - {from: us/*, to: {us/us-east-1/*: 70, us/us-west-2/*: 20, central: 10}}\n",
        "  loadBalancer:\n    simple: LEAST_REQUEST\n    localityLbSetting:\n"
        "      failover: [{from: us, to: eu}, {from: east, to: lab}]\n" + OUTLIER,
        "  loadBalancer:\n    localityLbSetting:\n      failoverPriority: [topology.kubernetes.io/region, "
        "topology.istio.io/cluster]\n" + OUTLIER,
        "  loadBalancer:\n    localityLbSetting: {enabled: false}\n",
    ):
        loaded = with_policy(spec)
        assert loaded.ok and messages(loaded) == [], (spec, messages(loaded))


def test_distribute_weights_must_sum_to_100_and_name_known_places() -> None:
    loaded = with_policy("""\
  loadBalancer:
    localityLbSetting:
      distribute:
        - from: us/us-east-1/*
          to: {"us/*": 60, "ap/*": 30}
        - from: mars
          to: {"*/zone": 100}
        - from: us/us-east-1/*
          to: {east: 100}
""")
    assert not loaded.ok
    assert messages(loaded) == [
        "policy.yaml:10: spec.loadBalancer.localityLbSetting.distribute[0].to.ap/*: 'ap/*' is no locality or "
        "cluster of the Mesh (Mesh localities: eu/eu-central-1, us/us-east-1/a, us/us-west-2; clusters: east, "
        "west, central, lab)",
        "policy.yaml:10: spec.loadBalancer.localityLbSetting.distribute[0].to: weights must sum to 100, got "
        "60 + 30 = 90",
        "policy.yaml:11: spec.loadBalancer.localityLbSetting.distribute[1].from: 'mars' is no locality or cluster "
        "of the Mesh (Mesh localities: eu/eu-central-1, us/us-east-1/a, us/us-west-2; clusters: east, west, "
        "central, lab)",
        "policy.yaml:12: spec.loadBalancer.localityLbSetting.distribute[1].to.*/zone: '*/zone': '*' may only "
        "stand as the whole last part (region/*, region/zone/*, *)",
        "policy.yaml:13: spec.loadBalancer.localityLbSetting.distribute[2].from: 'us/us-east-1/*' already has "
        "distribute rule #1: merge them (only the first would apply)",
    ]


def test_failover_and_distribute_together_are_refused_as_istio_does() -> None:
    loaded = with_policy("""\
  loadBalancer:
    localityLbSetting:
      distribute: [{from: "*", to: {"*": 100}}]
      failover: [{from: us, to: eu}]
""" + OUTLIER)
    assert messages(loaded) == ["policy.yaml:9: spec.loadBalancer.localityLbSetting.failover: give distribute or "
                                "failover, not both (as Istio: weights per locality leave no order to fail over in)"]


def test_failover_names_regions_or_clusters() -> None:
    loaded = with_policy("""\
  loadBalancer:
    localityLbSetting:
      failover:
        - {from: us, to: us}
        - {from: us/us-east-1, to: ap}
        - {from: east, to: "eu*"}
""" + OUTLIER)
    known = "(Mesh localities: eu/eu-central-1, us/us-east-1/a, us/us-west-2; clusters: east, west, central, lab)"
    assert messages(loaded) == [
        "policy.yaml:9: spec.loadBalancer.localityLbSetting.failover[0].to: failover from 'us' to itself: name "
        "another region or cluster",
        f"policy.yaml:10: spec.loadBalancer.localityLbSetting.failover[1].from: 'us/us-east-1': failover names a "
        f"region or a cluster, without '/' or '*' {known}",
        f"policy.yaml:10: spec.loadBalancer.localityLbSetting.failover[1].to: 'ap' is no region or cluster of the "
        f"Mesh {known}",
        f"policy.yaml:11: spec.loadBalancer.localityLbSetting.failover[2].to: 'eu*': failover names a region or a "
        f"cluster, without '/' or '*' {known}",
    ]


def test_failover_priority_labels() -> None:
    loaded = with_policy("""\
  loadBalancer:
    localityLbSetting:
      failover: [{from: us, to: eu}]
      failoverPriority: [topology.kubernetes.io/region, rack, topology.kubernetes.io/region]
""" + OUTLIER)
    assert messages(loaded) == [
        "policy.yaml:9: spec.loadBalancer.localityLbSetting.failoverPriority[0]: failover and failoverPriority "
        "on the region label together are ambiguous (as Istio refuses): keep one",
        "policy.yaml:9: spec.loadBalancer.localityLbSetting.failoverPriority[1]: unknown label 'rack' (known: "
        "topology.kubernetes.io/region, topology.kubernetes.io/zone, topology.istio.io/subzone, "
        "topology.istio.io/cluster)",
        "policy.yaml:9: spec.loadBalancer.localityLbSetting.failoverPriority[2]: failover and failoverPriority "
        "on the region label together are ambiguous (as Istio refuses): keep one",
        "policy.yaml:9: spec.loadBalancer.localityLbSetting.failoverPriority[2]: label "
        "'topology.kubernetes.io/region' listed twice",
    ]


def test_failover_without_outlier_detection_is_a_warning() -> None:
    loaded = with_policy("  loadBalancer:\n    localityLbSetting:\n      failover: [{from: us, to: eu}]\n")
    assert loaded.ok
    assert messages(loaded) == [
        "policy.yaml:8: warning: spec.loadBalancer.localityLbSetting.failover: without outlierDetection only "
        "instances that go away move traffic to the next locality, not ones that answer errors (as Istio warns): "
        "add outlierDetection"]
    # A version's own outlier detection counts for the version's setting; the service's for the service's.
    per_version = with_policy("""\
  versions:
    - version: v2
      loadBalancer:
        localityLbSetting: {failover: [{from: us, to: eu}]}
      outlierDetection: {consecutive5xxErrors: 2}
""")
    assert per_version.ok and messages(per_version) == []


def test_enabled_false_ignores_the_rules_with_a_warning() -> None:
    loaded = with_policy("  loadBalancer:\n    localityLbSetting:\n      enabled: false\n"
                         "      distribute: [{from: east, to: {west: 100}}]\n")
    assert loaded.ok
    assert messages(loaded) == [
        "policy.yaml:8: warning: spec.loadBalancer.localityLbSetting.enabled: enabled: false turns locality "
        "balancing off: distribute, failover and failoverPriority are ignored"]


@pytest.mark.parametrize(("lb", "error"), [
    ({}, "give simple, consistentHash or localityLbSetting"),
    ({"simple": "RANDOM", "consistentHash": {"useSourceIp": True}},
     r"give exactly one of simple, consistentHash \(not both\)"),
    ({"localityLbSetting": {"distribute": [{"from": "a", "to": {"b": 101}}]}}, "less than or equal to 100"),
    ({"localityLbSetting": {"distribute": [{"from": "a", "to": {}}]}}, "at least 1 item"),
    ({"localityLbSetting": {"failover": [{"from": "a"}]}}, "Field required"),
])
def test_model_shape(lb: dict[str, object], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        LoadBalancer.model_validate(lb)
