"""`lockgate ca init|cluster` and `lockgate certs`: the CA hierarchy by hand, and what every proxy holds.

Heavy imports (cryptography, pygit2) happen inside the commands: `lockgate demo-app` must start fast.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Any

from reconciler.state import DEFAULT_STATE_DIR


def add_commands(sub: Any) -> None:
    """Register the commands on the `lockgate` sub-parser collection."""
    p = sub.add_parser("ca", help="the CA hierarchy: a shared root, an intermediate per cluster")
    ca = p.add_subparsers(dest="ca_command", required=True, metavar="ACTION")
    q = ca.add_parser("init", help="a new root CA in DIR (its key never leaves DIR)")
    q.add_argument("--out", type=Path, required=True)
    q.set_defaults(func=cmd_ca_init)
    q = ca.add_parser("cluster", help="a cluster's intermediate CA, as Istio plug-in CA files")
    q.add_argument("name")
    q.add_argument("--root", type=Path, required=True, help="the directory `ca init` wrote")
    q.add_argument("--out", type=Path, help="where to write the files (default: ROOT/../NAME)")
    q.set_defaults(func=cmd_ca_cluster)

    p = sub.add_parser("certs", help="each proxy's identity, issuer chain, expiry and next rotation")
    p.add_argument("--json", action="store_true")
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    p.set_defaults(func=cmd_certs)


def inside_git_worktree(path: Path) -> Path | None:
    """The work tree `path` would be part of (and not ignored by), or None. Keys do not belong in Git."""
    import pygit2

    probe = path.resolve()
    existing = probe
    while not existing.exists():
        existing = existing.parent
    found = pygit2.discover_repository(str(existing))
    if found is None:
        return None
    repo = pygit2.Repository(found)
    if repo.is_bare or repo.workdir is None:
        return None
    workdir = Path(repo.workdir).resolve()
    try:
        rel = (probe / "ca-key.pem").relative_to(workdir).as_posix()
    except ValueError:
        return None
    return None if repo.path_is_ignored(rel) else workdir


def _refuse_git(out: Path) -> bool:
    if (tree := inside_git_worktree(out)) is not None:
        print(f"lockgate ca: {out} is inside the Git work tree {tree}; keep CA keys outside any repository",
              file=sys.stderr)
        return True
    return False


def ca_dir_problem(ca_dir: Path, repo: str) -> str | None:
    """Why `lockgate up` must not keep its CA in `ca_dir` (inside the intent repository), or None."""
    if "://" in repo:
        return None
    try:
        ca_dir.resolve().relative_to(Path(repo).resolve())
    except ValueError:
        return None
    return (f"the CA directory {ca_dir} is inside the intent repository {repo}; private keys must never be "
            "committed: give --state-dir or --ca-dir outside it")


def cmd_ca_init(args: argparse.Namespace) -> int:
    from multicluster.ca import CAError, fingerprint, init_root

    if _refuse_git(args.out):
        return 1
    try:
        root = init_root(args.out, now=dt.datetime.now(dt.UTC))
    except CAError as exc:
        print(f"lockgate ca init: {exc}", file=sys.stderr)
        return 1
    print(f"root CA {root.name} (sha256 {fingerprint(root.cert)[:16]}) in {args.out}; valid until "
          f"{root.cert.not_valid_after_utc:%Y-%m-%d}. Keep {args.out} private; next: "
          f"lockgate ca cluster NAME --root {args.out}")
    return 0


def cmd_ca_cluster(args: argparse.Namespace) -> int:
    from multicluster.ca import CAError, init_cluster

    out: Path = args.out or args.root.parent / args.name
    if _refuse_git(out):
        return 1
    try:
        ca = init_cluster(args.root, args.name, out, now=dt.datetime.now(dt.UTC))
    except CAError as exc:
        print(f"lockgate ca cluster: {exc}", file=sys.stderr)
        return 1
    print(f"intermediate CA {ca.name} in {out} (root-cert.pem, ca-cert.pem, ca-key.pem, cert-chain.pem); "
          f"valid until {ca.cert.not_valid_after_utc:%Y-%m-%d}")
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    path = args.state_dir / "status.json"
    try:
        status: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        print(f"lockgate certs: no {path}; is `lockgate up` running with --state-dir {args.state_dir}?",
              file=sys.stderr)
        return 1
    certs = status.get("certs") or {"ttl": None, "trustBundle": [], "proxies": []}
    now = time.time()
    for p in certs["proxies"]:
        p["rotatesIn"] = round(max(0.0, p["rotateAt"] - now), 3)
        p["expiresIn"] = round(p["notAfter"] - now, 3)
    if args.json:
        print(json.dumps(certs, indent=2))
        return 0
    for root in certs["trustBundle"]:
        print(f"trusted root  {root['subject']}  sha256 {root['sha256'][:16]}  until {_when(root['notAfter'])}")
    print(f"{'PROXY':32} {'IDENTITY':46} {'NOT AFTER':20} {'ROTATES IN':>10}  ISSUER CHAIN")
    for p in certs["proxies"]:
        print(f"{p['proxy']:32} {p['spiffeId']:46} {_when(p['notAfter']):20} {p['rotatesIn']:>9.1f}s  "
              + " < ".join(_cn(s) for s in p["issuer"]))
    return 0


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _cn(rfc4514: str) -> str:
    return next((part[3:] for part in rfc4514.split(",") if part.startswith("CN=")), rfc4514)
