"""`lockgate ca init|cluster|rotate-cluster|rotate-root|finish-root-rotation` and `lockgate certs`: the CA
hierarchy by hand, and what every proxy holds.

The root key is meant to stay on an offline machine: `init` and `cluster` run there, the rotations take
what was made there (or the root directory itself, where the CA directory is reachable from it). A running
`lockgate up` follows its CA directory, so every command here is just a change of files.

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
    q = ca.add_parser("rotate-cluster", help="install a new intermediate for a cluster (same root)")
    q.add_argument("name")
    source = q.add_mutually_exclusive_group(required=True)
    source.add_argument("--root", type=Path, help="the root directory (with its key): sign the new intermediate now")
    source.add_argument("--from", dest="from_dir", type=Path,
                        help="an intermediate made where the root key is (`lockgate ca cluster NAME --root ROOTDIR`)")
    _ca_dir_arguments(q)
    q.set_defaults(func=cmd_ca_rotate_cluster)
    q = ca.add_parser("rotate-root", help="step 1 of a root rotation: bundles hold old and new root, "
                                          "every cluster gets an intermediate of the new root")
    q.add_argument("--new-root", type=Path, required=True,
                   help="root-cert.pem of the new root, and its key or NAME/ intermediates made with it")
    _ca_dir_arguments(q)
    q.set_defaults(func=cmd_ca_rotate_root)
    q = ca.add_parser("finish-root-rotation", help="step 2: drop the old root from every bundle, once every "
                                                   "proxy holds a certificate of the new one")
    _ca_dir_arguments(q)
    q.add_argument("--force", action="store_true", help="skip the check of the running mesh's status")
    q.set_defaults(func=cmd_ca_finish_root_rotation)

    p = sub.add_parser("certs", help="each proxy's identity, issuer chain, expiry and next rotation")
    p.add_argument("--json", action="store_true")
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    p.set_defaults(func=cmd_certs)


def _ca_dir_arguments(q: argparse.ArgumentParser) -> None:
    q.add_argument("--ca-dir", type=Path, help="the CA directory `lockgate up` uses (default: STATE_DIR/ca)")
    q.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                   help="the running mesh's state directory (its status says what every proxy holds)")


def _ca_dir(args: argparse.Namespace) -> Path:
    return Path(args.ca_dir if args.ca_dir is not None else args.state_dir / "ca")


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


def cmd_ca_rotate_cluster(args: argparse.Namespace) -> int:
    from multicluster.ca import CAError, load_cluster, load_root, rotate_cluster

    ca_dir = _ca_dir(args)
    if _refuse_git(ca_dir):
        return 1
    try:
        root = load_root(args.root) if args.root is not None else None
        made = load_cluster(args.from_dir) if args.from_dir is not None else None
        ca = rotate_cluster(ca_dir, args.name, root=root, replacement=made, now=dt.datetime.now(dt.UTC))
    except CAError as exc:
        print(f"lockgate ca rotate-cluster: {exc}", file=sys.stderr)
        return 1
    print(f"intermediate CA {ca.name} installed in {ca_dir / args.name}; valid until "
          f"{ca.cert.not_valid_after_utc:%Y-%m-%d}. A running `lockgate up` on {ca_dir} re-issues every certificate "
          f"of cluster {args.name} from it within a second (`lockgate certs` shows the new issuer); certificates "
          "of the old intermediate stay valid until they expire")
    return 0


def cmd_ca_rotate_root(args: argparse.Namespace) -> int:
    from multicluster.ca import CAError, anchor_of, rotate_root

    ca_dir = _ca_dir(args)
    if _refuse_git(ca_dir):
        return 1
    try:
        made = rotate_root(ca_dir, args.new_root, now=dt.datetime.now(dt.UTC))
    except CAError as exc:
        print(f"lockgate ca rotate-root: {exc}", file=sys.stderr)
        return 1
    first = next(iter(made.values()))
    print(f"every bundle in {ca_dir} now holds {len(first.roots)} roots; new intermediates under "
          f"{anchor_of(first).subject.rfc4514_string()}: " + ", ".join(f"{c} ({ca.name})" for c, ca in made.items()))
    print("A running `lockgate up` first delivers the bundle to every proxy, then re-issues every certificate from "
          "the new intermediates. Once `lockgate certs` shows every proxy under the new root: "
          f"lockgate ca finish-root-rotation --ca-dir {ca_dir} --state-dir {args.state_dir}")
    return 0


def cmd_ca_finish_root_rotation(args: argparse.Namespace) -> int:
    from multicluster.ca import CAError, fingerprint, finish_root_rotation, retiring_roots, subject

    ca_dir = _ca_dir(args)
    try:
        kept, dropped = retiring_roots(ca_dir)
        if not dropped:
            raise CAError(f"{ca_dir}: no root rotation in progress (every root of the bundle signs an intermediate)")
        if not args.force:
            problems = rotation_blockers(args.state_dir, {fingerprint(r) for r in kept})
            if problems:
                print(f"lockgate ca finish-root-rotation: not yet, the old root is still needed ({len(problems)}):\n  "
                      + "\n  ".join(problems), file=sys.stderr)
                return 1
        kept, dropped = finish_root_rotation(ca_dir)
    except CAError as exc:
        print(f"lockgate ca finish-root-rotation: {exc}", file=sys.stderr)
        return 1
    print(f"dropped {', '.join(subject(r) for r in dropped)} from every bundle in {ca_dir}; trusted now: "
          f"{', '.join(subject(r) for r in kept)}. A running `lockgate up` sends the new bundle to every proxy")
    return 0


def rotation_blockers(state_dir: Path, keep: set[str]) -> list[str]:
    """Why the roots outside `keep` (SHA-256) cannot be dropped yet, from the running mesh's status: an
    intermediate still waiting or signing under another root, a proxy holding (or not yet having ACKed) a
    certificate of the new chain. Empty when the old roots verify nothing any more."""
    path = state_dir / "status.json"
    try:
        status: dict[str, Any] = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return [f"no readable {path} to check what every proxy holds (give --state-dir, or --force)"]
    certs = status.get("certs") or {}
    out = []
    for a in certs.get("authorities", []):
        if a.get("pending"):
            out.append(f"cluster {a['cluster']}: intermediate {a['subject']} waits for every proxy to have the "
                       "new bundle")
        elif a.get("rootSha256") not in keep:
            out.append(f"cluster {a['cluster']}: lockgate up still signs with {a['subject']}, under a root being "
                       "dropped")
    for p in certs.get("proxies", []):
        if p.get("rootSha256") not in keep:
            out.append(f"{p['proxy']}: its certificate chains to a root being dropped")
        elif not p.get("delivered"):
            out.append(f"{p['proxy']}: has not ACKed its certificate of the new chain yet")
    return out


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
