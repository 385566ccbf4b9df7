"""DC-Solver vs UniPC and DPM-Solver++: error against a 1,000-step reference, the README's tables.

    python scripts/eval_dc_solver.py --model gmm-cond --guidance 1 7.5 --plug-in --unseen 7 4 --json out.json
    python scripts/eval_dc_solver.py --model gmm --guidance 1
    python scripts/eval_dc_solver.py --model mypkg.models:bundle --guidance 1 7.5 --ratio-dir ratios/

For each guidance scale and NFE: ratios searched on ``--search`` datapoints, scored on ``--eval`` other
ones; the CPR row predicts each configuration's ratios from a fit on all the others (leave-one-out, for
interior NFEs) and, for ``--unseen NFE SCALE`` configurations off the grid, from a fit on the whole grid.
``--ratio-dir`` keeps the searched ratios (resumable).
"""

from __future__ import annotations

import argparse
import time

import diffsamplers
from diffsamplers.apps.arguments import add_refine_validation_arguments
from diffsamplers.apps.dc_report import REFINE_VALIDATION, DCEvaluation, evaluate_dc, format_tables
from diffsamplers.apps.registry import describe_models, load_model
from diffsamplers.apps.tables import write_json
from diffsamplers.solvers import DCSolver, UniPC


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gmm-cond", help=f"model spec: {describe_models()}")
    parser.add_argument("--nfe", type=int, nargs="+", default=[5, 6, 8, 10])
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0])
    parser.add_argument("--unseen", nargs=2, action="append", default=[], metavar=("NFE", "SCALE"))
    parser.add_argument("--eval", type=int, default=64, help="samples scored per configuration")
    parser.add_argument("--search", type=int, default=10, help="datapoints the ratios are searched on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument(
        "--refine-iterations", type=int, default=0, help="also DC-Solver with the ratios refined jointly (Adam steps)"
    )
    add_refine_validation_arguments(
        parser, REFINE_VALIDATION, "noises (seed --seed + 3) whose trajectory loss picks the refinement's iterate"
    )
    parser.add_argument("--reference-steps", type=int, default=1000)
    parser.add_argument("--schedule", default="linspace/sigma_min", help="schedule spec (default: the DC paper's grid)")
    parser.add_argument("--order", type=int, default=2)
    parser.add_argument("--variant", choices=["bh1", "bh2"], default="bh2")
    parser.add_argument("--plug-in", action="store_true", help="also DC on DPM-Solver++ 2M")
    parser.add_argument("--ratio-dir", default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    bundle = load_model(args.model)
    start = time.perf_counter()
    settings = DCEvaluation(
        nfes=args.nfe,
        guidance_scales=args.guidance,
        unseen=[(int(n), float(g)) for n, g in args.unseen],
        num_eval=args.eval,
        num_search=args.search,
        seed=args.seed,
        schedule=args.schedule,
        plug_in=args.plug_in,
        reference_steps=args.reference_steps,
        iterations=args.iterations,
        refine_iterations=args.refine_iterations,
        num_validation=args.refine_validation,
        refine_patience=args.refine_patience or None,
        refine_unvalidated=args.refine_unvalidated,
        ratio_dir=args.ratio_dir,
        batch_size=args.batch_size,
    )
    report = evaluate_dc(
        bundle,
        settings,
        solver=DCSolver(base=UniPC(args.order, args.variant)),
        log=lambda line: print(line, flush=True),
    )
    report["seconds"] = time.perf_counter() - start
    report["versions"] = {"diffsamplers": diffsamplers.__version__}
    print(f"\n# {report['model']}: {report['metric']}; schedule {report['schedule']}")
    print(f"# {report['num_eval']} scored samples, ratios searched on {report['num_search']} others\n")
    print(format_tables(report))
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
