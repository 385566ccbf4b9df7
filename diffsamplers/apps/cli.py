"""The ``diffsamplers`` command line.

Every command checks its arguments before it computes anything: a bad value ends in one line,
``diffsamplers <command>: error: --flag …``, exit status 2 (:mod:`diffsamplers.apps.arguments`); so does bad input
the library finds later. Files are written to ``--output`` (the reports: ``--json`` and ``--plot``); the folders
they go into are created first. Model, solver and schedule specs are those of :func:`~.registry.load_model`,
:func:`~.recipes.parse_solver` and :func:`~.recipes.parse_schedule`; ``--help`` lists them.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from ..schedules.align_your_steps import AYS_MODELS
from ..step import Guidance
from .arguments import (
    DEFAULT_SOLVER,
    CommandParser,
    add_commands,
    add_output,
    add_sampler_arguments,
    device,
    finite_float,
    help_text,
    integer,
    outlier_factor,
    output_file,
    parse_class_labels,
    plot_suffixes,
    positive_float,
    run_command,
    seed,
    set_command,
    spec,
)
from .images import image_suffixes
from .recipes import SolverRecipe, describe_solvers, parse_solver
from .registry import ModelBundle, describe_models

__all__ = ["build_parser", "main"]

#: The learned-schedule file extension (what ``--schedule`` recognises as a learned schedule).
SCHEDULE_SUFFIX = ".safetensors"


# -- commands ---------------------------------------------------------------------------------------


def _compare(args: argparse.Namespace) -> int:
    from .compare import format_best_shipped, format_table, run_compare
    from .plots import plot_compare

    report = run_compare(
        nfes=args.nfe,
        num_samples=args.num_samples,
        seed=args.seed,
        process=args.process,
        select=args.methods,
        progress=not args.quiet,
    )
    print(f"# {report['metric']}")
    print(f"# model: {report['model']}; {report['num_samples']} samples, seed {report['seed']}")
    print(f"# process: {report['process']}; {report['start']}")
    print(format_table(report))
    shipped = format_best_shipped(report)
    if shipped:
        print(shipped)
    _write_report(report, args, plot_compare)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .digits_eval import GuidanceError, format_table, run_eval
    from .plots import plot_digits_eval

    if args.model == "text":
        return _eval_text(args)
    if args.model != "digits":
        raise ValueError(f"--model: eval measures the bundled digits or text model, got {args.model!r}")
    try:
        report = run_eval(
            nfes=args.nfe,
            num_samples=args.num_samples,
            guidance=args.guidance,
            seed=args.seed,
            select=args.methods,
            progress=not args.quiet,
        )
    except GuidanceError as err:  # a named guidance the model cannot take (built once the model is loaded)
        raise ValueError(f"--guidance: {err}") from None
    print(
        f"# {report['metric']}; {report['num_samples']} samples, guidance {report['guidance']} (classifier-free "
        f"scale {report['guidance_scale']:g}), seed {report['seed']}"
    )
    print(format_table(report))
    _write_report(report, args, plot_digits_eval)
    return 0


def _eval_text(args: argparse.Namespace) -> int:
    from .registry import load_model
    from .text_jobs import format_text_table, run_text_eval

    if args.guidance != "1" or args.plot:
        raise ValueError("eval --model text takes no --guidance or --plot (its table compares the masked samplers)")
    bundle = load_model("text", masked_ok=True)
    report = run_text_eval(bundle, args.num_samples, args.seed, select=args.methods)
    print(f"# {report['metric']}")
    print(f"# model: text; {report['num_samples']} samples of {report['sequence_length']} characters, seed {args.seed}")
    print(format_text_table(report))
    _write_report(report, args, None)
    return 0


def _sample_text(args: argparse.Namespace, bundle: Any) -> int:
    """Masked-model samples printed as text (``--per-class`` of them, optionally guided by fk-steering or svdd)."""
    from .text_jobs import sample_text

    if args.classes or args.compare_unguided:
        raise ValueError(f"model {args.model!r} takes no --classes or --compare-unguided")
    solver = "first-hitting" if args.solver == DEFAULT_SOLVER else args.solver
    texts, nfe, seconds = sample_text(bundle, solver, args.steps, args.per_class, args.seed, guidance=args.guidance)
    for i, text in enumerate(texts):
        print(f"--- sample {i} ---")
        print(text)
    print(
        f"# {len(texts)} samples from {args.model} with {solver} ({nfe} model calls, {seconds:.1f} s), seed {args.seed}"
    )
    return 0


def _write_report(report: dict[str, Any], args: argparse.Namespace, plot: Any) -> None:
    from .tables import write_json

    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        plot(report, args.plot)
        print(f"wrote {args.plot}")


def _sample_classes(bundle: ModelBundle, classes: str | None) -> list[int] | None:
    """The rows of the sheet: ``--classes`` (all classes by default); ``None`` for an unconditional model."""
    if classes:
        return bundle.check_classes(parse_class_labels(classes), "--classes")
    return list(range(bundle.num_classes)) if bundle.num_classes else None


def _sample_guidance(bundle: ModelBundle, guidance: str | None) -> tuple[float, tuple[Guidance, ...]]:
    """``--guidance``: the classifier-free scale (by default 2 for a class-conditional model and 1, none, for an
    unconditional one) and the guidance hooks its spec names, built for the model."""
    from .recipes import parse_guidance

    recipe = None if guidance is None else parse_guidance(guidance)
    scale = None if recipe is None else recipe.scale
    if scale is None:
        scale = 2.0 if bundle.num_classes else 1.0
    elif not bundle.num_classes and scale != 1.0:
        raise ValueError(f"--guidance: model {bundle.name!r} is unconditional; it takes only 1, got {scale:g}")
    try:
        hooks = () if recipe is None else recipe.build(bundle)
    except ValueError as err:
        raise ValueError(f"--guidance: {err}") from None
    return scale, hooks


def _grid_rows(count: int) -> int:
    """Rows of about 8 samples that the ``count`` samples fill exactly."""
    return next(r for r in range(max(1, count // 8), 0, -1) if count % r == 0)


def _sample(args: argparse.Namespace) -> int:
    from .images import save_grid, save_grids_side_by_side
    from .registry import MaskedModelBundle, load_model
    from .samplers import make_sampler, particle_group_size

    bundle = load_model(args.model, args.device, masked_ok=True)
    if isinstance(bundle, MaskedModelBundle):
        return _sample_text(args, bundle)
    classes = _sample_classes(bundle, args.classes)
    guidance, hooks = _sample_guidance(bundle, args.guidance)
    group = particle_group_size(hooks)
    if args.per_class % group:
        raise ValueError(
            f"--per-class {args.per_class} is not a multiple of the {group} particles per group of --guidance "
            f"{args.guidance!r}: a group's particles are consecutive samples of one class; use --per-class "
            f"{-(-args.per_class // group) * group}"
        )
    labels = None if classes is None else [c for c in classes for _ in range(args.per_class)]
    count = args.per_class if labels is None else len(labels)
    rows = _grid_rows(count) if classes is None else len(classes)
    schedule = args.schedule or bundle.default_schedule
    sampler = make_sampler(
        bundle, args.solver, args.steps, schedule, guidance, args.seed, classes=labels, guidance=hooks
    )
    images, _ = sampler(range(count))
    what = f"guidance {args.guidance or format(guidance, 'g')}"
    if args.compare_unguided:  # the same seeds with the classifier-free scale alone, on the left
        plain = make_sampler(bundle, args.solver, args.steps, schedule, guidance, args.seed, classes=labels)
        path = save_grids_side_by_side([plain(range(count))[0], images], rows, args.output)
        what = f"left: classifier-free scale {guidance:g} only; right: {what}; the same noises"
    else:
        path = save_grid(images, rows, args.output)
    print(
        f"wrote {path}: {count} samples from {args.model} with {args.solver}, {args.steps} steps ({schedule}), "
        f"{what}, seed {args.seed}"
    )
    return 0


def _schedule_ays(args: argparse.Namespace) -> int:
    from ..schedules.align_your_steps import align_your_steps, ays_timesteps_for_diffusers, published_ays

    sched = align_your_steps(args.model, args.steps, final=args.final, source=args.source)
    print("sigmas:", [round(float(s), 10) for s in sched.sigmas])
    if args.timesteps:
        print("timesteps:", ays_timesteps_for_diffusers(sched, published_ays(args.model).process()))
    return 0


def _schedule_optimize(args: argparse.Namespace) -> int:
    from ..tuning.ays_optimizer import AYSSettings, ScheduleBoundsError
    from .schedule_job import StoppingRule, optimize_for_model

    if args.sigma_min is not None and args.sigma_max is not None and args.sigma_min >= args.sigma_max:
        raise ValueError(f"--sigma-min must be below --sigma-max, got {args.sigma_min:g} and {args.sigma_max:g}")
    refinements = args.refinements if args.refinements is not None else (2 if args.objective == "klub" else 0)
    settings = AYSSettings(
        num_steps=args.nfe,
        refinements=refinements,
        objective=args.objective,
        num_samples=args.num_samples,
        max_sweeps=args.max_sweeps,
        refine_sweeps=args.refine_sweeps,
        patience=args.patience,
        init=args.init,
        sigma_min=args.sigma_min,
        sigma_max=args.sigma_max,
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
        final=args.final,
        fit_samples=args.fit_samples,
        outlier=args.outlier,
    )
    try:
        learned = optimize_for_model(
            args.model,
            args.nfe,
            args.output,
            settings,
            rule,
            checkpoint=args.checkpoint,
            resume=not args.no_resume,
            plot=args.plot,
            data=args.data,
            device=args.device,
            log=None if args.quiet else print,
        )
    except ScheduleBoundsError as err:  # checked against the model's noise range once the model is loaded
        raise ValueError(f"--{err.name.replace('_', '-')}: {err}") from None
    for n, levels in learned.stages.items():
        print(f"{n} steps:", [round(float(v), 6) for v in levels])
    print(f"wrote {args.output}" + (f" and {args.plot}" if args.plot else ""))
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


# -- parsers ----------------------------------------------------------------------------------------


def _parse_our_solver(text: str) -> SolverRecipe:
    """A solver spec the schedule search can run (not one of diffusers' schedulers)."""
    recipe = parse_solver(text)
    if recipe.is_diffusers:
        raise ValueError(f"{text!r} is a diffusers scheduler; the schedule search needs one of ours")
    return recipe


def _plot_argument(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--plot", type=output_file(plot_suffixes, "a plot"), default=None, help=help)


def _command(sub: Any, name: str, help: str) -> CommandParser:
    return sub.add_parser(name, help=help, description=help)


def _add_report_arguments(p: argparse.ArgumentParser, nfes: list[int], num_samples: int, min_samples: int) -> None:
    """The options ``compare`` and ``eval`` share."""
    p.add_argument("--nfe", type=integer(), nargs="+", default=nfes, help="model evaluations per sample")
    p.add_argument("--num-samples", type=integer(min_samples), default=num_samples, help="samples per method")
    p.add_argument("--seed", type=seed, default=0, help="seed of the initial noises")
    p.add_argument("--methods", default=None, help="only methods whose name contains this text")
    p.add_argument("--json", type=output_file(), default=None, help="write the table as JSON here")
    _plot_argument(p, "write a plot of error vs NFE here (.png, .pdf, .svg, …)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_compare(sub: Any) -> None:
    from .compare import PROCESSES

    p = _command(sub, "compare", "solver error vs the exact ODE solution on the bundled Gaussian mixture")
    _add_report_arguments(p, [5, 6, 8, 10, 15, 20, 50], 64, 1)
    p.add_argument(
        "--process",
        default="vp",
        choices=PROCESSES,
        help="vp: DDPM's discrete VP schedule, an ε-network (model gmm); flow: rectified flow, a velocity network "
        "from x_T = ε at t = 1 (model gmm-flow), with diffusers' flow schedulers",
    )
    set_command(p, _compare, outputs=("json", "plot"))


def _add_sample(sub: Any) -> None:
    p = _command(sub, "sample", "a grid of samples (default: the bundled digits model, one row per digit)")
    add_sampler_arguments(
        p,
        guidance=None,
        guidance_help="guidance spec; a number is the classifier-free guidance scale, > 0, 1 = none (default: 2 for "
        "class-conditional models, 1 otherwise)",
        classes_help="comma-separated class labels, one row each (default: all classes)",
        guidance_specs=True,
    )
    p.add_argument(
        "--per-class",
        type=integer(),
        default=8,
        help="samples per class (unconditional model: in all); with a particle guidance (fk-steering, fkc: K "
        "particles per group, which needs a stochastic solver such as sde-dpm++2m, ddim-eta1 or euler-maruyama) a "
        "multiple of K: each row then holds per-class/K groups of K resampled particles",
    )
    p.add_argument(
        "--compare-unguided",
        action="store_true",
        help="write two grids side by side from the same noises: left with the --guidance spec's classifier-free "
        "scale only, right with its named guidances as well",
    )
    image = output_file(image_suffixes, "an image")
    add_output(p, "the image to write (.png, .jpg, .webp, …)", default="samples.png", type=image)
    set_command(p, _sample, outputs=("output",))


def _add_eval(sub: Any) -> None:
    from .recipes import describe_guidances, parse_guidance

    p = _command(
        sub,
        "eval",
        "FD-digits, class accuracy, precision/recall, density/coverage, AvgkNN and within-class diversity vs NFE "
        "for several solvers (ours and diffusers') on the digits model",
    )
    _add_report_arguments(p, [5, 10, 20], 500, 2)
    p.add_argument(
        "--model",
        default="digits",
        choices=("digits", "text"),
        help="digits: the table above; text: the masked diffusion language model — first-hitting vs ancestral "
        "sampling, wall time, 5-gram bits per character and unigram entropy, float64 vs float32 categorical sampling",
    )
    p.add_argument(
        "--guidance",
        type=spec(parse_guidance),
        default="1",
        help=help_text(
            "guidance spec; a number is the classifier-free guidance scale, > 0, 1 = none; named guidances run in "
            f"our solvers only (diffusers' schedulers are skipped): {describe_guidances()}"
        ),
    )
    set_command(p, _eval, outputs=("json", "plot"))


def _add_fid(sub: Any) -> None:
    from .fid_job import build_parser as fid_parser

    fid_parser(_command(sub, "fid", "sharded, resumable FID / FD-digits of one sampler (= scripts/eval_fid.py)"))


def _final_argument(p: Any) -> None:
    from ..schedules.schedule import DEFAULT_FINAL, FINAL_ALIASES, FINAL_CONVENTIONS

    p.add_argument(
        "--final",
        default=DEFAULT_FINAL,
        choices=[*FINAL_CONVENTIONS, *FINAL_ALIASES],
        help=f"the last level (default {DEFAULT_FINAL}: the last of n + 1 levels replaced by 0; append_zero: n levels, "
        "then 0); replace and append are deprecated names of zero and append_zero",
    )


def _add_schedule_ays(cmds: Any) -> None:
    p = _command(cmds, "ays", "print a published Align Your Steps schedule for any number of steps")
    p.add_argument("--model", default="sd15", help=f"the published schedule's model: {', '.join(AYS_MODELS)}")
    p.add_argument("--steps", type=integer(), default=10, help="steps (the published 10 interpolated log-linearly)")
    _final_argument(p)
    p.add_argument("--source", default=None, choices=["quickstart", "paper"], help="which published list")
    p.add_argument("--timesteps", action="store_true", help="also print integer timesteps for diffusers")
    set_command(p, _schedule_ays)


def _add_schedule_optimize(cmds: Any) -> None:
    from ..schedules.schedule import DEFAULT_FINAL, FINAL_CONVENTIONS

    p = _command(cmds, "optimize", "learn an Align Your Steps schedule (KLUB or the solver's error) for a model")
    p.add_argument("--model", default="gmm", help=help_text(f"model: {describe_models()}"))
    p.add_argument(
        "--solver",
        default="dpm++2m",
        type=spec(_parse_our_solver),
        help=help_text(
            f"solver whose error stops the first stage early (dc-solver:search: DC-Solver with ratios searched per "
            f"schedule): {describe_solvers()}"
        ),
    )
    p.add_argument("--nfe", type=integer(2), default=10, help="steps of the first stage")
    p.add_argument(
        "--refinements",
        type=integer(0),
        default=None,
        help="subdivisions after the first stage (default 2 with the KLUB, 10→20→40; 0 with --objective error)",
    )
    p.add_argument(
        "--objective",
        default="klub",
        choices=["klub", "error"],
        help="what the search minimises: the KLUB (the paper) or the solver's own error on --fit-samples noises "
        "(the schedule then fits this NFE, the solver, --final and the solver's final_step as they will be run)",
    )
    p.add_argument(
        "--fit-samples", type=integer(), default=256, help="--objective error: noises the error is fitted on"
    )
    p.add_argument(
        "--final",
        default=DEFAULT_FINAL,
        choices=list(FINAL_CONVENTIONS),
        help="how the schedule ends when the solver's error is measured (as it will be run)",
    )
    p.add_argument(
        "--outlier",
        type=outlier_factor,
        default=20.0,
        help="noises with more than this many times the median noise's error are left out of the error (boundary "
        "noises of a mixture, where a few-step solver can end in another component); 0: the plain RMS, the better "
        "objective with thousands of --fit-samples",
    )
    schedule_file = output_file({SCHEDULE_SUFFIX}, "a learned schedule")
    add_output(p, "the learned schedule to write (.safetensors)", alias="--out", type=schedule_file, required=True)
    p.add_argument("--checkpoint", type=schedule_file, default=None, help="checkpoint file (default: next to --output)")
    p.add_argument("--no-resume", action="store_true", help="start afresh even if a checkpoint exists")
    _plot_argument(p, "write a plot of the schedules and the KLUB history here (.png, .pdf, .svg, …)")
    p.add_argument("--data", default=None, help="data: a tensor file or 'sklearn-digits' (default: the model's)")
    p.add_argument("--num-samples", type=integer(), default=8192, help="data samples in the KLUB estimate")
    p.add_argument("--metric-samples", type=integer(), default=256, help="held-out noises for early stopping")
    p.add_argument("--reference-steps", type=integer(), default=1000, help="steps of the reference run (no exact one)")
    p.add_argument("--search-samples", type=integer(), default=10, help="dc-solver:search: datapoints of each search")
    p.add_argument("--max-sweeps", type=integer(0), default=100, help="sweeps of the first stage at most")
    p.add_argument("--refine-sweeps", type=integer(0), default=40, help="sweeps of each refinement at most")
    p.add_argument("--patience", type=integer(), default=3, help="sweeps without improvement before stopping")
    p.add_argument(
        "--init",
        default="auto",
        choices=["auto", "best", "uniform_time", "karras", "uniform_logsnr"],
        help="the first stage's starting schedule (best: whichever of the last three has the smallest stopping metric)",
    )
    p.add_argument(
        "--sigma-min",
        type=positive_float,
        default=None,
        help="the lowest level σ̃ of the learned schedule, where the KLUB's last interval ends; sampling replaces it by "
        "0 (default: the model's σ̃_min; on a flow model, 1e-6, which makes the last interval's KLUB dominate)",
    )
    p.add_argument(
        "--sigma-max",
        type=positive_float,
        default=None,
        help="the highest level σ̃ of the learned schedule, where sampling starts (default: the model's σ̃_max)",
    )
    p.add_argument("--importance-c", type=finite_float, default=0.5, help="importance sampling constant of the KLUB")
    p.add_argument("--power", type=int, default=1, choices=[1, 2], help="power of the KLUB weights")
    p.add_argument("--seed", type=seed, default=0, help="seed of the search")
    p.add_argument("--batch-size", type=integer(), default=4096, help="data samples per network call")
    p.add_argument("--device", type=device, default=None, help="torch device, e.g. cpu or cuda:0 (default: cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress log")
    set_command(p, _schedule_optimize, outputs=("output", "checkpoint", "plot"))


def _add_schedule_show(cmds: Any) -> None:
    p = _command(cmds, "show", "print (and plot) a learned schedule")
    p.add_argument("path", help="a learned schedule (.safetensors)")
    p.add_argument(
        "--steps", type=integer(), default=None, help="also print the schedule interpolated to this many steps"
    )
    _final_argument(p)
    _plot_argument(p, "write a plot of the schedule here (.png, .pdf, .svg, …)")
    set_command(p, _schedule_show, outputs=("plot",))


def _add_schedule(sub: Any) -> None:
    group = _command(sub, "schedule", "Align Your Steps schedules: published (ays), learned (optimize), inspect (show)")
    cmds = add_commands(group, "schedule_command")
    _add_schedule_ays(cmds)
    _add_schedule_optimize(cmds)
    _add_schedule_show(cmds)


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="diffsamplers", description="Diffusion-model samplers that drop into diffusers.")
    sub = add_commands(parser, "command")
    for add in (_add_compare, _add_sample, _add_eval, _add_fid, _add_schedule):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``diffsamplers``; the exit status (2: bad input, reported in one line)."""
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
