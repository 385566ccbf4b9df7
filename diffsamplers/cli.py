"""The ``diffsamplers`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _compare(args: argparse.Namespace) -> int:
    from .compare import format_table, run_compare, write_json, write_plot

    report = run_compare(
        nfes=args.nfe, num_samples=args.num_samples, seed=args.seed, select=args.methods, progress=not args.quiet
    )
    print(f"# {report['metric']}")
    print(f"# model: {report['model']}; {report['num_samples']} samples, seed {report['seed']}")
    print(format_table(report))
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        write_plot(report, args.plot)
        print(f"wrote {args.plot}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffsamplers", description="Diffusion-model samplers that drop into diffusers."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compare", help="solver error vs the exact ODE solution on the bundled Gaussian mixture")
    p.add_argument("--nfe", type=int, nargs="+", default=[5, 6, 8, 10, 15, 20, 50], help="model evaluations per sample")
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default=None, help="only methods whose name contains this text")
    p.add_argument("--json", default=None, help="write the table as JSON here")
    p.add_argument("--plot", default=None, help="write a log-log plot (PNG) here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_compare)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"diffsamplers {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
