"""The ``diffsamplers`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _compare(args: argparse.Namespace) -> int:
    from .compare import format_table, run_compare
    from .plots import plot_compare
    from .tables import write_json

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
        plot_compare(report, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _schedule_ays(args: argparse.Namespace) -> int:
    from ..schedules.align_your_steps import align_your_steps, ays_timesteps_for_diffusers, published_ays

    sched = align_your_steps(args.model, args.steps, final=args.final, source=args.source)
    print("sigmas:", [round(float(s), 10) for s in sched.sigmas])
    if args.timesteps:
        print("timesteps:", ays_timesteps_for_diffusers(sched, published_ays(args.model).process()))
    return 0


def _schedule_optimize(args: argparse.Namespace) -> int:
    from ..tuning.ays_optimizer import AYSSettings
    from .schedule_job import StoppingRule, optimize_for_model

    settings = AYSSettings(
        num_steps=args.nfe,
        refinements=args.refinements,
        num_samples=args.num_samples,
        max_sweeps=args.max_sweeps,
        refine_sweeps=args.refine_sweeps,
        patience=args.patience,
        init=args.init,
        seed=args.seed,
        batch_size=args.batch_size,
        importance_c=args.importance_c,
        power=args.power,
    )
    rule = StoppingRule(
        solver=args.solver,
        metric_samples=args.metric_samples,
        reference_steps=args.reference_steps,
        search_samples=args.search_samples,
    )
    learned = optimize_for_model(
        args.model,
        args.nfe,
        args.out,
        settings,
        rule,
        checkpoint=args.checkpoint,
        resume=not args.no_resume,
        plot=args.plot,
        data=args.data,
        device=args.device,
        log=None if args.quiet else print,
    )
    for n, levels in learned.stages.items():
        print(f"{n} steps:", [round(float(v), 6) for v in levels])
    print(f"wrote {args.out}" + (f" and {args.plot}" if args.plot else ""))
    return 0


def _schedule_show(args: argparse.Namespace) -> int:
    from ..schedules.learned import LearnedSchedule
    from .plots import plot_schedules

    learned = LearnedSchedule.load(args.path)
    meta = learned.metadata
    print({k: meta.get(k) for k in ("model", "solver", "nfe", "seed", "metric", "seconds")})
    for n, levels in learned.stages.items():
        print(f"{n} steps:", [round(float(v), 6) for v in levels])
    if args.steps:
        sched = learned.schedule(args.steps, final=args.final)
        print(f"{args.steps}-step schedule ({args.final}):", [round(float(v), 6) for v in sched.sigmas])
    if args.plot:
        plot_schedules(args.plot, {f"{n} steps": v for n, v in learned.stages.items()}, meta.get("klub_history"))
        print(f"wrote {args.plot}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    from .images import save_grid
    from .registry import load_model
    from .samplers import make_sampler

    bundle = load_model(args.model, args.device)
    if bundle.num_classes:
        classes = (
            bundle.check_classes(args.classes.split(","), "--classes")
            if args.classes
            else list(range(bundle.num_classes))
        )
        labels = [c for c in classes for _ in range(args.per_class)]
        rows, count = len(classes), len(labels)
    else:
        labels, rows, count = None, max(1, args.per_class // 8), args.per_class
    sampler = make_sampler(bundle, args.solver, args.steps, args.schedule, args.guidance, args.seed, classes=labels)
    images, _ = sampler(range(count))
    path = save_grid(images, rows, args.output)
    print(
        f"wrote {path}: {count} samples from {args.model} with {args.solver}, {args.steps} steps ({args.schedule}), "
        f"guidance {args.guidance}, seed {args.seed}"
    )
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .digits_eval import format_table, run_eval
    from .plots import plot_digits_eval
    from .tables import write_json

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
        plot_digits_eval(report, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _add_schedule_commands(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser("schedule", help="Align Your Steps schedules: published, learned (optimize), inspect")
    cmds = group.add_subparsers(dest="schedule_command", required=True)

    p = cmds.add_parser("ays", help="print a published Align Your Steps schedule for any number of steps")
    p.add_argument("--model", default="sd15", help="sd15, sdxl, svd or deepfloyd_if")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--final", default="replace", choices=["replace", "append", "sigma_min"])
    p.add_argument("--source", default=None, choices=["quickstart", "paper"])
    p.add_argument("--timesteps", action="store_true", help="also print integer timesteps for diffusers")
    p.set_defaults(func=_schedule_ays)

    p = cmds.add_parser("optimize", help="learn an Align Your Steps schedule (KLUB search) for a model")
    p.add_argument("--model", default="gmm", help="gmm, diffusers:<dir>, or a registered model")
    p.add_argument(
        "--solver",
        default="dpm++2m",
        help="solver whose error stops the first stage early ('dc-solver': DC-Solver, ratios searched per schedule)",
    )
    p.add_argument("--nfe", type=int, default=10, help="steps of the first stage")
    p.add_argument("--refinements", type=int, default=2, help="subdivisions after the first stage (10→20→40)")
    p.add_argument("--out", required=True, help="where to write the learned schedule (.safetensors)")
    p.add_argument("--checkpoint", default=None, help="checkpoint file (default: next to --out)")
    p.add_argument("--no-resume", action="store_true", help="start afresh even if a checkpoint exists")
    p.add_argument("--plot", default=None, help="write a PNG of the schedules and the KLUB history")
    p.add_argument("--data", default=None, help="data: a tensor file or 'sklearn-digits'")
    p.add_argument("--num-samples", type=int, default=8192, help="data samples in the KLUB estimate")
    p.add_argument("--metric-samples", type=int, default=256, help="held-out noises for early stopping")
    p.add_argument("--reference-steps", type=int, default=1000, help="steps of the reference run (no exact one)")
    p.add_argument("--search-samples", type=int, default=10, help="dc-solver: datapoints of each ratio search")
    p.add_argument("--max-sweeps", type=int, default=100)
    p.add_argument("--refine-sweeps", type=int, default=40)
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--init", default="auto", choices=["auto", "uniform_time", "karras", "uniform_logsnr"])
    p.add_argument("--importance-c", type=float, default=0.5)
    p.add_argument("--power", type=int, default=1, choices=[1, 2])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--device", default=None)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_schedule_optimize)

    p = cmds.add_parser("show", help="print (and plot) a learned schedule")
    p.add_argument("path")
    p.add_argument("--steps", type=int, default=None, help="also print the schedule interpolated to this many steps")
    p.add_argument("--final", default="replace", choices=["replace", "append", "sigma_min"])
    p.add_argument("--plot", default=None)
    p.set_defaults(func=_schedule_show)


def _fid(args: argparse.Namespace) -> int:
    from .fid_job import run_and_report

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

    from .fid_job import build_parser as fid_parser

    p = sub.add_parser("fid", help="sharded, resumable FID / FD-digits of one sampler (= scripts/eval_fid.py)")
    fid_parser(p)
    p.set_defaults(func=_fid)

    _add_schedule_commands(sub)
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
