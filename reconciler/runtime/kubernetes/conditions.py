"""The reconcile loop's status as Kubernetes-style status on the GitSource (Flux's Ready / Reconciling /
Stalled). Pure: a function of the loop's `status()` dict, the object's generation and the previous
conditions (a condition keeps its lastTransitionTime while its status does not change).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

MAX_MESSAGE = 4000
"""Characters of a condition message: the API server stores what we write; errors are capped before."""


def _condition(kind: str, status: bool, reason: str, message: str, generation: int | None,
               previous: Mapping[str, Mapping[str, Any]], now: str) -> dict[str, Any]:
    value = "True" if status else "False"
    before = previous.get(kind)
    since = before.get("lastTransitionTime") if before and before.get("status") == value else None
    return {"type": kind, "status": value, "reason": reason, "message": message[:MAX_MESSAGE],
            "observedGeneration": generation, "lastTransitionTime": since or now}


def gitsource_status(loop: Mapping[str, Any] | None, *, generation: int | None,
                     previous: Sequence[Mapping[str, Any]] = (), now: datetime | None = None,
                     problem: str | None = None) -> dict[str, Any]:
    """The GitSource's `status`: conditions, the applied / head / failed revisions and per-proxy
    convergence counts. `problem`: why the loop is not running at all (a spec the operator cannot follow)."""
    stamp = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    prev = {str(c.get("type")): c for c in previous}
    if loop is None:
        reason, message = ("InvalidSpec", problem) if problem else ("Progressing", "starting")
        return {"observedGeneration": generation, "conditions": [
            _condition("Ready", False, reason, message, generation, prev, stamp),
            _condition("Reconciling", problem is None, reason, message, generation, prev, stamp),
            _condition("Stalled", problem is not None, reason, message, generation, prev, stamp)]}
    rev = loop.get("revision") or {}
    applied, head, failed = rev.get("applied"), rev.get("head"), rev.get("failed")
    errors = [str(e) for e in rev.get("lastError") or []]
    proxies = [p for c in loop.get("clusters") or [] for p in c.get("proxies") or []]
    connected = sum(1 for p in proxies if p.get("connected"))
    converged = sum(1 for p in proxies if applied is not None and p.get("ackedRevision") == applied)
    nacked = [p for p in proxies if p.get("nack")]
    source = loop.get("source") or {}
    unreachable = source.get("lastError") if isinstance(source, Mapping) else None
    counts = f"{converged}/{len(proxies)} proxies converged"
    if failed is not None and failed == head:
        serving = f"still serving {applied[:12]}" if applied else "nothing applied yet"
        message = f"revision {str(failed)[:12]} is invalid; {serving}: " + "; ".join(errors)
        ready = (False, "InvalidRevision", message)
        stalled = (True, "InvalidRevision", message)
        reconciling = (False, "InvalidRevision", message)
    elif applied is None:
        why = f"source unreachable: {unreachable}" if unreachable else "waiting for the first revision"
        ready = (False, "Progressing", why)
        stalled = (False, "Progressing", why)
        reconciling = (True, "Progressing", why)
    elif nacked:
        message = f"applied {applied[:12]}; {len(nacked)} proxies rejected it: " + "; ".join(
            f"{p.get('id')}: {p.get('nack')}" for p in nacked[:5])
        ready = (False, "ProxyRejected", message)
        stalled = (True, "ProxyRejected", message)
        reconciling = (False, "ProxyRejected", message)
    else:
        done = converged == len(proxies)
        message = f"applied revision {applied[:12]}; {counts}"
        if unreachable:
            message += f"; source unreachable (retrying): {unreachable}"
        ready = (True, "Converged" if done else "Applied", message)
        stalled = (False, "Converged" if done else "Applied", message)
        reconciling = (not done, "Converged" if done else "Progressing", message)
    return {
        "observedGeneration": generation,
        "appliedRevision": applied,
        "headRevision": head,
        "failedRevision": failed,
        "lastError": errors[:20],
        "proxies": {"total": len(proxies), "connected": connected, "converged": converged},
        "conditions": [_condition("Ready", *ready, generation, prev, stamp),
                       _condition("Reconciling", *reconciling, generation, prev, stamp),
                       _condition("Stalled", *stalled, generation, prev, stamp)],
    }
