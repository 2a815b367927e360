"""`lockgate grafana [--rules] [--out DIR]`: the Grafana dashboard and the Prometheus recording rules."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

DASHBOARD_FILE = "lockgate-dashboard.json"
RULES_FILE = "lockgate-rules.yaml"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("grafana", help="the Grafana dashboard JSON (or, with --rules, Prometheus recording rules)")
    p.add_argument("--rules", action="store_true", help="print the recording rules (YAML) instead of the dashboard")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help=f"write both, {DASHBOARD_FILE} and {RULES_FILE}, into DIR instead of printing")
    p.set_defaults(func=run)


def _texts() -> tuple[str, str]:
    from reconciler.observe import dashboard, recording_rules

    return (json.dumps(dashboard(), indent=2) + "\n",
            "# Prometheus recording rules for a lockgate mesh (`lockgate grafana --rules`); load with rule_files:\n"
            + yaml.safe_dump(recording_rules(), sort_keys=False, width=1000))


def run(args: argparse.Namespace) -> int:
    board, rules = _texts()
    if args.out is None:
        sys.stdout.write(rules if args.rules else board)
        return 0
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / DASHBOARD_FILE).write_text(board)
        (args.out / RULES_FILE).write_text(rules)
    except OSError as exc:
        print(f"lockgate grafana: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.out / DASHBOARD_FILE} and {args.out / RULES_FILE}")
    return 0
