"""Names that several layers must agree on: node ids, xDS cluster names, TLS server names.

One definition each, so no caller parses or formats them by hand (a node id written in one place and
split in another is how two halves of a system drift apart).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ProxyKind = Literal["sidecar", "ingress", "eastwest"]
GATEWAY_KINDS: tuple[ProxyKind, ...] = ("ingress", "eastwest")


@dataclass(frozen=True, order=True)
class NodeId:
    """Who a proxy is to its control plane: `east/shop/reviews-v1-0`, `east/ingress`, `east/eastwest`."""

    cluster: str
    kind: ProxyKind
    namespace: str | None = None
    """Sidecars only: the workload's namespace."""
    instance: str | None = None
    """Sidecars only: `<workload>-<index>`."""

    @classmethod
    def sidecar(cls, *, cluster: str, namespace: str, workload: str, index: int) -> NodeId:
        return cls(cluster=cluster, kind="sidecar", namespace=namespace, instance=f"{workload}-{index}")

    @classmethod
    def gateway(cls, *, cluster: str, kind: ProxyKind) -> NodeId:
        if kind not in GATEWAY_KINDS:
            raise ValueError(f"not a gateway kind: {kind!r}")
        return cls(cluster=cluster, kind=kind)

    @classmethod
    def parse(cls, text: str) -> NodeId:
        """The inverse of `str()`; ValueError for anything that is not a node id of ours."""
        parts = text.split("/")
        if len(parts) == 2 and parts[0] and parts[1] in GATEWAY_KINDS:
            return cls.gateway(cluster=parts[0], kind=parts[1])
        if len(parts) == 3 and all(parts):
            return cls(cluster=parts[0], kind="sidecar", namespace=parts[1], instance=parts[2])
        raise ValueError(f"not a lockgate node id: {text!r}")

    def __str__(self) -> str:
        if self.kind == "sidecar":
            return f"{self.cluster}/{self.namespace}/{self.instance}"
        return f"{self.cluster}/{self.kind}"

    @property
    def slug(self) -> str:
        """For file names: `east_shop_reviews-v1-0`."""
        return str(self).replace("/", "_")


def kind_of(node_id: str) -> ProxyKind:
    """sidecar | ingress | eastwest; a string that is no node id of ours counts as a sidecar."""
    try:
        return NodeId.parse(node_id).kind
    except ValueError:
        return "sidecar"


def cluster_name(namespace: str, service: str, version: str | None = None) -> str:
    """`outbound|reviews.shop|v1` for one version, `outbound|reviews.shop` for all of them."""
    base = f"outbound|{service}.{namespace}"
    return f"{base}|{version}" if version else base


def sni(namespace: str, service: str, version: str | None) -> str:
    """The TLS server name a sidecar sends to a service (version), by which an east-west gateway routes
    the still-encrypted connection to its own instances: mTLS stays end to end."""
    return f"{version or 'any'}.{service}.{namespace}.lockgate"
