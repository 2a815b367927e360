"""The `lockgate` command line. Imports are lazy so `lockgate demo-app` starts fast."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from reconciler.state import DEFAULT_STATE_DIR, TEMPLATE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lockgate", description="GitOps for a service mesh on real Envoy.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("init", help="new intent repository from the template (git init + first commit)")
    p.add_argument("dir", type=Path)
    p.add_argument("--branch", default="main")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("validate", help="validate intent: exit 0, or 1 with `path:line: message` on stderr")
    p.add_argument("dir", nargs="?", default=".",
                   help="the intent repository: a work tree (default: .), a bare repository or a URL")
    p.add_argument("--rev", help="validate this commit instead of the working tree (a bare repository or a URL: "
                   "default its branch tip)")
    p.add_argument("--no-envoy", action="store_true",
                   help="skip asking Envoy itself (`envoy --mode validate`) to check the rendered config")
    _signature_flags(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("plan", help="what applying a revision would change in each cluster")
    p.add_argument("--repo", default=".", help="the intent repository: a work tree, a bare repository or a URL")
    p.add_argument("--rev", default="HEAD", help="the revision to plan (default: the branch tip)")
    p.add_argument("--worktree", action="store_true", help="plan the working tree instead of a commit")
    p.add_argument("--from", dest="base", help="compare with this revision (default: what `up` applied, "
                   "from --state-dir; else nothing)")
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("up", help="run the mesh locally (foreground; Ctrl-C stops everything)")
    p.add_argument("--repo", required=True, help="path or URL (file://, https://) of the intent repository")
    p.add_argument("--branch", help="branch to follow (default: the repository's HEAD branch)")
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    p.add_argument("--poll-interval", type=float, default=5.0, help="seconds between fetches of a remote")
    p.add_argument("--fetch-timeout", type=float, default=120.0,
                   help="seconds one fetch of a remote may take before status says it is unreachable")
    p.add_argument("--envoy-log-level", default="warning")
    p.add_argument("--prometheus-url", help="use this Prometheus for rollout analysis instead of starting one per "
                   "cluster (it should scrape each cluster's discovery endpoint, shown in status)")
    p.add_argument("--cert-ttl", default="24h", help="workload certificate lifetime, e.g. 20s, 1h (rotated at half)")
    p.add_argument("--ca-dir", type=Path, help="CA hierarchy (root/, <cluster>/); default STATE_DIR/ca")
    p.add_argument("--isolate-clusters", action="store_true",
                   help="run each cluster in a network namespace of its own, joined by a bridge, so the only path "
                   "between clusters is the east-west gateways (needs root; default: loopback addresses)")
    _signature_flags(p)
    p.add_argument("--signing-key", type=Path, metavar="KEY",
                   help="SSH private key lockgate signs its own write-back commits with (trust it in the "
                   "allowed-signers file as lockgate@localhost)")
    p.add_argument("--web", default="127.0.0.1:0", metavar="HOST:PORT|off",
                   help="where the read-only web view listens (default 127.0.0.1:0: loopback, any free port; "
                   "its address is lockgate.dashboard in status); off: no web view")
    p.add_argument("--webhook-secret", type=Path, metavar="FILE",
                   help="take Git webhooks (GitHub, GitLab, generic) at POST /hooks/git on the web view's "
                   "address, verified with the secret in FILE; a verified push fetches at once")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("demo", help="the one-command tour: a mesh on real Envoys and four commits")
    p.add_argument("--dir", type=Path, help="where to put the demo repo and state (default: a temp dir)")
    p.add_argument("--keep-running", action="store_true", help="leave the mesh up after the tour")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("status", help="applied revision, clusters, proxies and their ACKed versions")
    p.add_argument("--json", action="store_true", help="the documented JSON contract")
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    p.set_defaults(func=cmd_status)

    from reconciler.cli import rollout as rollout_cli
    from reconciler.demo import app as demo_app

    rollout_cli.add_commands(sub)

    from reconciler.cli import control as control_cli

    control_cli.add_commands(sub)  # rollback, suspend, resume

    from reconciler.cli.ca import add_commands as add_ca_commands

    add_ca_commands(sub)  # ca init|cluster, certs

    from reconciler.cli import k8s as k8s_cli

    k8s_cli.add_parser(sub)  # k8s crds|install|inject: dispatched through args.func = k8s_cli.run

    from reconciler.cli import operator_args

    operator_args.add_parser(sub)  # the operator itself (kopf) is imported only when it runs
    operator_args.add_sidecar_parser(sub)

    from reconciler.cli import grafana as grafana_cli

    grafana_cli.add_parser(sub)  # grafana: dashboard JSON and recording rules
    from reconciler.cli import importers as importers_cli

    importers_cli.add_parser(sub)  # import istio FILE... --out DIR

    p = sub.add_parser("demo-app", help="the demo workload: a small fast HTTP service")
    demo_app.add_arguments(p)
    p.set_defaults(func=demo_app.run)

    args = parser.parse_args(argv)
    quiet = args.func is cmd_demo  # the tour prints what matters itself
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        code: int = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the try, not at interpreter exit
    except BrokenPipeError:
        # The reader went away (`lockgate history | head`): stop quietly, as `git log | head` does. SIGPIPE
        # stays ignored (Python's default; SIG_DFL would make a dropped socket in `lockgate up` a silent
        # death); stdout goes to /dev/null so the exit-time flush cannot raise again; exit 141 (128 +
        # SIGPIPE) is what a shell reports for git killed by SIGPIPE: output cut short, not success.
        import os
        import select
        import signal

        try:  # only stdout's own pipe: a broken socket (up, demo-app) stays a visible error
            poll = select.poll()
            poll.register(sys.stdout.fileno(), select.POLLOUT)
            stdout_gone = any(events & select.POLLERR for _, events in poll.poll(0))
        except (OSError, ValueError):  # a stdout without a descriptor (replaced in tests)
            stdout_gone = False
        if not stdout_gone:
            raise
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + int(signal.SIGPIPE)
    return code


def _signature_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verify-signatures", type=Path, metavar="ALLOWED_SIGNERS",
                   help="apply only commits signed by a key in this SSH allowed-signers file (git's "
                   "gpg.ssh.allowedSignersFile format; the principal is the committer's email)")
    p.add_argument("--verify-gpg-keyring", type=Path, metavar="KEYRING",
                   help="trust commits signed by a key in this GPG keyring too")


def cmd_init(args: argparse.Namespace) -> int:
    from reconciler.source.git import GitError, init_repo

    try:
        sha = init_repo(args.dir, template=TEMPLATE, branch=args.branch)
    except GitError as exc:
        print(f"lockgate init: {exc}", file=sys.stderr)
        return 1
    print(f"initialised {args.dir} at {sha[:12]} from the template; next: lockgate up --repo {args.dir}")
    return 0


def _is_url(location: str) -> bool:
    return "://" in location or (location.count(":") == 1 and "@" in location.split(":", 1)[0])


def cmd_validate(args: argparse.Namespace) -> int:
    from reconciler.isolate import load_isolated
    from reconciler.load import read_worktree
    from reconciler.source import GitError, SignaturePolicy, reading

    location = str(args.dir)
    trust = None
    try:
        if args.verify_signatures is not None or args.verify_gpg_keyring is not None:
            trust = SignaturePolicy(allowed_signers=args.verify_signatures, keyring=args.verify_gpg_keyring)
        # A signature belongs to a commit: with a policy, the branch tip rather than the working tree.
        rev = args.rev or ("HEAD" if trust is not None else None)
        if rev or _is_url(location) or (not Path(location, ".git").exists() and Path(location, "HEAD").is_file()):
            # A commit (default: the branch tip): asked for, signature-checked, or a URL / bare repository.
            with reading(location) as source:
                sha = source.resolve(rev or "HEAD")
                if trust is not None and (why := trust.verify(source, sha)) is not None:
                    print(f"{location}:0: commit {sha[:12]} is not trusted: {why}", file=sys.stderr)
                    return 1
                files = source.read_tree(sha)
        elif Path(location).is_dir():
            files = read_worktree(Path(location))
        else:
            print(f"{location}:0: not a directory; give the intent repository's path or URL", file=sys.stderr)
            return 1
    except GitError as exc:
        print(f"{location}:0: {exc}", file=sys.stderr)
        return 1
    loaded = load_isolated(files)
    if loaded.intent is not None and not args.no_envoy:
        import asyncio

        from reconciler.envoycheck import check_with_envoy, locate

        loaded.problems += locate(asyncio.run(check_with_envoy(loaded.intent)), loaded)
    for problem in [*loaded.problems, *loaded.warnings]:  # each already sorted; ".:0: N more" stays last
        print(problem, file=sys.stderr)
    if not loaded.ok:
        print(f"invalid: {loaded.error_count} error(s)", file=sys.stderr)
        return 1
    kinds: dict[str, int] = {}
    for r in loaded.resources:
        kinds[r.key[0]] = kinds.get(r.key[0], 0) + 1
    print("valid: " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from reconciler.isolate import load_isolated as load
    from reconciler.load import read_worktree
    from reconciler.plan import plan, render_text, to_json
    from reconciler.rollout.controller import read_states
    from reconciler.source import GitError, reading
    from reconciler.state import STATUS_FILE, read_json

    try:
        with reading(args.repo) as source:
            if args.worktree:
                if source.workdir is None:
                    raise GitError(f"{args.repo} has no work tree (a bare repository or a URL): plan a commit "
                                   "with --rev instead of --worktree")
                new_sha, new = "worktree", load(read_worktree(source.workdir))
            else:
                new_sha = source.resolve(args.rev)
                new = load(source.read_tree(new_sha))
            base = args.base
            if base is None:
                try:
                    base = read_json(args.state_dir / STATUS_FILE)["revision"]["applied"]
                except (OSError, ValueError, KeyError):
                    base = None
            base = source.resolve(base) if base else None
            old = load(source.read_tree(base)) if base else None
    except GitError as exc:
        print(f"{args.repo}:0: {exc}", file=sys.stderr)
        return 1
    if new.intent is None:
        for problem in new.problems:
            print(problem, file=sys.stderr)
        print(f"invalid: {new.error_count} error(s); nothing would be applied", file=sys.stderr)
        return 1
    states, _ = read_states(args.state_dir)  # what `up` overlays now: the plan shows rollout-owned weights
    plans = plan(old=old.intent if old else None, new=new.intent, states=states)
    if args.json:
        print(json.dumps(to_json(plans, old=base, new=new_sha), indent=2))
    else:
        print(render_text(plans, old=base, new=new_sha))
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    import asyncio

    from mesh.intent import parse_duration_ms
    from multicluster.ca import CAError
    from reconciler.cli.ca import ca_dir_problem
    from reconciler.cli.up import run_up
    from reconciler.loop import UpConfig
    from reconciler.runtime.local.lock import StateDirBusy
    from reconciler.runtime.local.netns import NetworkError
    from reconciler.runtime.local.prometheus import PrometheusMissing
    from reconciler.source.git import GitError

    try:
        cert_ttl = parse_duration_ms(args.cert_ttl) / 1000
        if cert_ttl < 2:
            raise ValueError(f"{args.cert_ttl!r} is too short: at least 2s")
    except ValueError as exc:
        print(f"lockgate up: --cert-ttl: {exc}", file=sys.stderr)
        return 2
    if (problem := ca_dir_problem(args.ca_dir or args.state_dir / "ca", args.repo)) is not None:
        print(f"lockgate up: {problem}", file=sys.stderr)
        return 1
    from reconciler.web.server import WebError, parse_listen

    try:
        web = parse_listen(args.web)
    except ValueError as exc:
        print(f"lockgate up: --web: {exc}", file=sys.stderr)
        return 2
    if web is None and args.webhook_secret is not None:
        print("lockgate up: --webhook-secret needs the web view (its address takes the hooks): drop --web off",
              file=sys.stderr)
        return 2
    config = UpConfig(repo=args.repo, branch=args.branch, state_dir=args.state_dir,
                      poll_interval=args.poll_interval, fetch_timeout=args.fetch_timeout,
                      envoy_log_level=args.envoy_log_level,
                      prometheus_url=args.prometheus_url, cert_ttl=cert_ttl, ca_dir=args.ca_dir,
                      verify_signatures=args.verify_signatures, verify_gpg_keyring=args.verify_gpg_keyring,
                      signing_key=args.signing_key, isolate_clusters=args.isolate_clusters)
    try:
        return asyncio.run(run_up(config, web=web, webhook_secret=args.webhook_secret))
    except (GitError, PrometheusMissing, CAError, StateDirBusy, NetworkError) as exc:
        print(f"lockgate up: {exc}", file=sys.stderr)
        return 1
    except WebError as exc:
        print(f"lockgate up: --web: {exc}", file=sys.stderr)
        return 1


def cmd_demo(args: argparse.Namespace) -> int:
    import asyncio

    from reconciler.demo.tour import run_demo

    if args.dir is not None and args.dir.exists() and any(args.dir.iterdir()):
        print(f"lockgate demo: {args.dir} is not empty; give a new directory", file=sys.stderr)
        return 1
    from reconciler.cli.up import local_reconciler
    from reconciler.loop import Reconciler, UpConfig

    async def make(config: UpConfig) -> Reconciler:
        return await local_reconciler(config, announced=True)  # the tour announces itself

    return asyncio.run(run_demo(workdir=args.dir, keep_running=args.keep_running, make=make))


def cmd_status(args: argparse.Namespace) -> int:
    from reconciler.state import STATUS_FILE, read_status

    try:
        status = read_status(args.state_dir)
    except FileNotFoundError:
        print(f"lockgate status: no {args.state_dir / STATUS_FILE}; is `lockgate up` running with --state-dir "
              f"{args.state_dir}?", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    rev = status["revision"]
    running = "running" if status["lockgate"]["running"] else "not running"
    print(f"lockgate {running} (repo {status['lockgate']['repo']})")
    source = status.get("source") or {}
    if source.get("reachable") is False:
        last = source.get("lastFetchAt")
        when = time.strftime("%H:%M:%S", time.localtime(last)) if last else "never"
        print(f"source   UNREACHABLE (last good fetch: {when}): {source.get('lastError')}")
    print(f"head     {_short(rev['head'])}")
    print(f"applied  {_short(rev['applied'])}")
    if rev.get("lastError"):
        print(f"failed   {_short(rev.get('failed'))}: {len(rev['lastError'])} error(s), still serving applied:")
        for line in rev["lastError"]:
            print(f"  {line}")
    for c in status["clusters"]:
        conv = _short(c.get("convergedRevision")) if c.get("convergedRevision") else "not yet"
        print(f"cluster {c['name']}: ingress http://{c['ingress']}  applied {_short(c['appliedRevision'])}"
              f"  converged {conv}")
        for p in c["proxies"]:
            nack = f"  NACK: {p['nack']}" if p.get("nack") else ""
            print(f"  {p['kind']:8} {p['id']:40} acked {p.get('ackedRevision') and _short(p['ackedRevision'])}"
                  f" {p.get('state', '')}{nack}")
        if c.get("prometheus"):
            print(f"  prometheus {c['prometheus']['url']}  (discovery {c['prometheus']['discovery']})")
    for warning in (status.get("certs") or {}).get("warnings", []):
        print(f"WARNING  {warning}")
    for r in status.get("rollouts", []):
        where = f"weight {r['weight']}%" + (f", step {r['step']}/{len(r['steps'])}" if r.get("step") else "")
        print(f"rollout {r['namespace']}/{r['name']}: {r['phase']} (stable {r['stable']}, canary {r['canary'] or '-'}"
              f", {where}); details: lockgate rollout status {r['name']}")
    return 0


def _short(sha: str | None) -> str:
    return sha[:12] if sha else "-"


if __name__ == "__main__":
    sys.exit(main())
