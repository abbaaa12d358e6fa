"""``python -m tests.soak --minutes 10``: run the soak, print its report, exit 1 on a violation.

Exit codes: 0 no invariant violated; 1 violations (or the harness failed mid-run);
3 the soak could not start (e.g. PostgreSQL unreachable).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tests.soak.config import SoakConfig
from tests.soak.environment import SoakSetupError
from tests.soak.harness import run_soak


def parse(argv: list[str]) -> tuple[SoakConfig, Path | None]:
    parser = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__)
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, default=10.0, help="workload length (10)")
    length.add_argument("--seconds", type=float, help="workload length in seconds")
    parser.add_argument("--seed", type=int, help="seed of the workload and fault schedule")
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    parser.add_argument("--streams", type=int, default=300, help="ledger streams (300)")
    parser.add_argument(
        "--workdir", type=Path, help="keep logs here (default: a temporary directory)"
    )
    args = parser.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else args.minutes * 60
    config = SoakConfig(
        seconds=seconds, seed=args.seed, ledger_streams=args.streams, workdir=args.workdir
    )
    return config, args.json


def main(argv: list[str] | None = None) -> int:
    config, json_path = parse(sys.argv[1:] if argv is None else argv)
    try:
        report = run_soak(config)
    except SoakSetupError as exc:
        print(f"soak: cannot start: {exc}", file=sys.stderr)
        return 3
    print()
    print(report.text())
    if json_path is not None:
        report.write(json_path)
        print(f"JSON report written to {json_path}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
