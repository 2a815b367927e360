"""`lockgate import istio FILE... --out DIR`: Istio YAML in, lockgate intent files out.

Exit codes (a contract scripts rely on): 0 imported with nothing lost; 3 imported, but something had no
lockgate equivalent (each a `file:line: warning:` on stderr; `--allow-loss` makes that 0); 1 an error
(unreadable, not Istio YAML, a resource of the wrong shape: `file:line:` as `lockgate validate` prints
them), and nothing is written; 2 a usage error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_LOSS = 3


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("import", help="turn another mesh's YAML into lockgate intent files (istio)")
    kinds = p.add_subparsers(dest="source", required=True, metavar="SOURCE")
    istio = kinds.add_parser("istio", help="VirtualService, DestinationRule, PeerAuthentication and "
                             "AuthorizationPolicy -> Route, TrafficPolicy, PeerAuthentication, AuthorizationPolicy, "
                             "Service")
    istio.add_argument("files", nargs="+", type=Path, metavar="FILE", help="Istio YAML files (several documents each)")
    istio.add_argument("--out", type=Path, required=True, metavar="DIR", help="where the intent files are written")
    istio.add_argument("--namespace", default="default",
                       help="the namespace of resources that name none (kubectl's -n; default: default)")
    istio.add_argument("--trust-domain", metavar="TD",
                       help="rewrite AuthorizationPolicy principals into this trust domain (the Mesh's trustDomain; "
                       "Istio's default is cluster.local)")
    istio.add_argument("--allow-loss", action="store_true",
                       help="exit 0 even when something had no lockgate equivalent (the warnings are still printed)")
    istio.add_argument("--force", action="store_true", help="overwrite intent files already in DIR")
    istio.set_defaults(func=run_istio)


def run_istio(args: argparse.Namespace) -> int:
    from reconciler.importers import import_istio
    from reconciler.load import MAX_FILE_BYTES, Problem

    sources: dict[str, bytes] = {}
    errors: list[Problem] = []
    for path in args.files:
        try:
            if path.stat().st_size > MAX_FILE_BYTES:  # refused unread, as `lockgate validate` does
                sources[str(path)] = b" " * (MAX_FILE_BYTES + 1)
                continue
            sources[str(path)] = path.read_bytes()
        except OSError as exc:
            errors.append(Problem(str(path), 0, f"cannot read: {exc.strerror or exc}"))
    result = import_istio(sources, namespace=args.namespace, trust_domain=args.trust_domain)
    errors += result.errors
    for problem in [*errors, *result.warnings, *result.notes]:
        print(problem, file=sys.stderr)
    if errors:
        print(f"not imported: {len(errors)} error(s); nothing written", file=sys.stderr)
        return 1
    out: Path = args.out
    existing = [name for name in result.files if (out / name).exists()]
    if existing and not args.force:
        print(f"lockgate import istio: {', '.join(str(out / n) for n in existing)} already exist(s); nothing "
              "written (--force overwrites)", file=sys.stderr)
        return 1
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, text in result.files.items():
            (out / name).write_text(text)
    except OSError as exc:
        print(f"lockgate import istio: {exc}", file=sys.stderr)
        return 1
    lost = len(result.warnings)
    print(f"wrote {', '.join(str(out / n) for n in result.files)}"
          + (f"; {lost} warning(s): something had no lockgate equivalent" if lost else ""))
    print("next: add a Mesh and Workloads (see repo-template/), then `lockgate validate`")
    return EXIT_LOSS if lost and not args.allow_loss else 0
