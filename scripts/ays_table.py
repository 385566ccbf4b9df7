"""Align Your Steps, learned: error of a solver with the learned schedule against hand-made schedules.

For each NFE the schedule is optimised at that NFE (first stage only, early-stopped on the solver's RMS error
against the reference of held-out noises); the NFE-10 run is also refined 10 → 20 → 40 and interpolated to
the other NFEs, as the paper does. Learned schedules are written to (and reused from) ``--out-dir``, with
checkpoints, so an interrupted run resumes. All schedules are evaluated on other noises (``--eval-seed``):
RMS error against the exact (Gaussian mixture) or 1,000-step reference, and any registered sample metrics.

    python scripts/ays_table.py --model gmm --solver dpm++2m --nfe 5 7 10
    python scripts/ays_table.py --model gmm --solver dc-solver:search --nfe 5 7 10

``--solver dc-solver:search``: DC-Solver (UniPC bh2 base) with its compensation ratios searched afresh for every
schedule and NFE (on ``--search-samples`` other noises, against the reference trajectory), since ratios belong
to a grid; the schedules are learned with that searched DC-Solver's error as the early-stopping signal (the
KLUB itself does not depend on the solver; ``--stop-solver unipc`` stops on plain UniPC's error instead).
Solvers and models are specs of :mod:`diffsamplers.apps.recipes` and :mod:`diffsamplers.apps.registry`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diffsamplers import sample
from diffsamplers.apps.evaluation import evaluate, validation_set
from diffsamplers.apps.recipes import parse_solver
from diffsamplers.apps.registry import load_model
from diffsamplers.apps.schedule_job import StoppingRule, comparison_schedules, optimize_for_model
from diffsamplers.apps.tables import markdown_table, write_json
from diffsamplers.reference import reference_description
from diffsamplers.schedules.learned import LearnedSchedule
from diffsamplers.tuning.ays_optimizer import AYSSettings
from diffsamplers.tuning.dc_search import search_dc_ratios


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gmm")
    p.add_argument("--data", default=None, help="data for the KLUB (tensor file or 'sklearn-digits')")
    p.add_argument("--solver", default="dpm++2m")
    p.add_argument("--nfe", type=int, nargs="+", default=[5, 7, 10])
    p.add_argument("--out-dir", default="docs/ays")
    p.add_argument("--num-samples", type=int, default=2048, help="data samples in the KLUB estimate")
    p.add_argument("--metric-samples", type=int, default=256, help="held-out noises for early stopping")
    p.add_argument("--eval-samples", type=int, default=512)
    p.add_argument("--eval-seed", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--refine-sweeps", type=int, default=10, help="sweeps per refinement stage (10→20, 20→40)")
    p.add_argument("--refinements", type=int, default=2, help="refinement stages of the NFE-10 run (10→20→40)")
    p.add_argument(
        "--init", default="auto", choices=["auto", "uniform_time", "karras", "uniform_logsnr"], help="first schedule"
    )
    p.add_argument("--max-sweeps", type=int, default=100, help="first-stage sweeps at most (early stopping)")
    p.add_argument("--reference-steps", type=int, default=1000, help="steps of the reference solution")
    p.add_argument("--search-samples", type=int, default=10, help="DC-Solver: datapoints of each ratio search")
    p.add_argument("--sample-metrics", nargs="*", default=[], help="registered sample metrics, e.g. fd-digits")
    p.add_argument(
        "--stop-solver", default=None, help="solver whose error early-stops the optimisation (default: --solver)"
    )
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bundle = load_model(args.model, device=args.device, data=args.data)
    process = bundle.denoiser.process
    device = args.device or "cpu"

    schedule_solver = args.stop_solver or args.solver
    learned: dict[int, LearnedSchedule] = {}
    for n in sorted(set(args.nfe) | {10}):
        name = f"{args.model}_{schedule_solver}".replace(":", "_").replace("/", "_")
        path = out_dir / f"{name}_nfe{n}.safetensors"
        if path.is_file():
            learned[n] = LearnedSchedule.load(path)
            print(f"loaded {path}")
            continue
        settings = AYSSettings(
            num_steps=n,
            refinements=args.refinements if n == 10 else 0,
            max_sweeps=args.max_sweeps,
            num_samples=args.num_samples,
            seed=args.seed,
            batch_size=args.batch_size,
            refine_sweeps=args.refine_sweeps,
            init=args.init,
        )
        rule = StoppingRule(
            schedule_solver,
            metric_samples=args.metric_samples,
            reference_steps=args.reference_steps,
            search_samples=args.search_samples,
        )
        learned[n] = optimize_for_model(
            args.model,
            n,
            path,
            settings,
            rule,
            plot=path.with_suffix(".png"),
            data=args.data,
            device=args.device,
        )
        print(f"wrote {path} ({learned[n].metadata['seconds']} s)")

    evaluation = validation_set(
        bundle, args.eval_samples, args.eval_seed, device=device, reference_steps=args.reference_steps
    )
    recipe = parse_solver(args.solver)
    search = bundle.draw(args.search_samples, args.eval_seed + 1, device=device)

    def solver_for(sched):
        """The solver; DC-Solver's ratios searched for this schedule (they belong to a grid)."""
        return recipe.build(
            nfe=sched.num_steps,
            folder=bundle.folder,
            search=lambda dc: (
                search_dc_ratios(
                    bundle.denoiser,
                    dc,
                    sched,
                    search.x_T,
                    model_id=args.model,
                    cond=search.cond,
                    reference_steps=args.reference_steps,
                ).ratios
            ),
        )

    schedules = comparison_schedules(process, learned)
    rows = {}
    for name, build in schedules.items():
        rows[name] = {}
        for n in args.nfe:
            sched = build(n)
            solver = solver_for(sched)
            run = lambda x_T, cond, sched=sched, solver=solver: sample(  # noqa: E731
                bundle.denoiser, solver, sched, x_T=x_T, cond=cond, batch_size=1024, progress=False
            )
            rows[name][n] = evaluate(bundle, evaluation, run, args.sample_metrics)
    metrics = ["rms", *args.sample_metrics]
    for metric in metrics:
        print(f"\n{metric} ({args.model}, {args.solver}, {args.eval_samples} samples, eval seed {args.eval_seed})")
        print(markdown_table(rows, args.nfe, metric, "schedule", "NFE {}"))
    if args.json:
        write_json(
            {"args": vars(args), "reference": reference_description(args.reference_steps), "rows": rows}, args.json
        )


if __name__ == "__main__":
    main()
