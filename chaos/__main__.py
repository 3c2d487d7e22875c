"""`python -m chaos --seeds N [--seed S]`: run N seeds (S, S+1, ...) and exit non-zero on any violation."""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from chaos.plan import ALL_FAULTS, parse_faults
from chaos.run import Options, execute


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chaos", description=__doc__)
    parser.add_argument("--seeds", type=int, default=1, help="how many seeds to run (default 1)")
    parser.add_argument(
        "--seed", type=int, default=None, help="the first seed (default: a random one, printed)"
    )
    parser.add_argument("--tasks", type=int, default=500, help="tasks per seed (default 500)")
    parser.add_argument("--duration", type=float, default=60.0, help="launch window in seconds (default 60)")
    parser.add_argument(
        "--faults",
        default="all",
        help="comma-separated faults to inject, or 'all' (default): "
        + ", ".join(f.value for f in ALL_FAULTS),
    )
    parser.add_argument(
        "--pending-timeout",
        type=float,
        default=60.0,
        help="the reconciler's --pending-timeout-s (default 60: longer than any API server outage the "
        "faults cause, so only unschedulable pods time out)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=240.0,
        help="after the faults, how long tasks may take to finish before the rest count as lost",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="where to keep logs (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory even when all is well")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.tasks < 1 or args.duration <= 0:
        parser.error("--seeds, --tasks and --duration must be positive")
    try:
        faults = parse_faults(args.faults)
    except ValueError as err:
        parser.error(str(err))
    first = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 1_000_000)
    options = Options(
        tasks=args.tasks,
        duration_s=args.duration,
        faults=faults,
        pending_timeout_s=args.pending_timeout,
        drain_timeout_s=args.drain_timeout,
        workdir=args.workdir,
        keep=args.keep,
    )
    return execute(options, list(range(first, first + args.seeds)))


if __name__ == "__main__":
    sys.exit(main())
