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


def _sample(args: argparse.Namespace) -> int:
    import torch

    from .evaluation.sources import load_model_source, make_sampler
    from .images import save_grid

    source = load_model_source(args.model, args.device)
    if source.num_classes:
        classes = [int(c) for c in args.classes.split(",")] if args.classes else list(range(source.num_classes))
        labels = [c for c in classes for _ in range(args.per_class)]
        rows = len(classes)
    else:
        labels, rows = None, max(1, args.per_class // 8)
    count = len(labels) if labels else args.per_class
    sampler = make_sampler(source, args.solver, args.steps, args.schedule, args.guidance, args.seed, classes=labels)
    with torch.no_grad():
        images, _ = sampler(range(count))
    path = save_grid(images, rows, args.output)
    print(
        f"wrote {path}: {count} samples from {args.model} with {args.solver}, {args.steps} steps ({args.schedule}), "
        f"guidance {args.guidance}, seed {args.seed}"
    )
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .evaluation.digits_eval import format_table, run_eval, write_json, write_plot

    report = run_eval(
        nfes=args.nfe,
        num_samples=args.num_samples,
        guidance_scale=args.guidance,
        seed=args.seed,
        select=args.methods,
        progress=not args.quiet,
    )
    print(
        f"# {report['metric']}; {report['num_samples']} samples, guidance {report['guidance_scale']}, seed {report['seed']}"
    )
    print(format_table(report))
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        write_plot(report, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _fid(args: argparse.Namespace) -> int:
    from .evaluation.fid_job import run_and_report

    return run_and_report(args)


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

    p = sub.add_parser("sample", help="a grid of samples (default: the bundled digits model, one row per digit)")
    p.add_argument("--model", default="digits", help="'digits' or a diffusers pipeline folder (unet/ + scheduler/)")
    p.add_argument("--solver", default="dpm++2m")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--schedule", default="linspace")
    p.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance scale")
    p.add_argument("--classes", default=None, help="comma-separated digits, one row each (default 0..9)")
    p.add_argument("--per-class", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="samples.png")
    p.add_argument("--device", default=None)
    p.set_defaults(func=_sample)

    p = sub.add_parser("eval", help="FD-digits and class accuracy vs NFE for several solvers (ours and diffusers')")
    p.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20])
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default=None, help="only methods whose name contains this text")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_eval)

    from .evaluation.fid_job import build_parser as fid_parser

    p = sub.add_parser("fid", help="sharded, resumable FID / FD-digits of one sampler (= scripts/eval_fid.py)")
    fid_parser(p)
    p.set_defaults(func=_fid)
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
