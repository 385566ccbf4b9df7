"""DC-Solver vs UniPC and DPM-Solver++: error against a 1,000-step reference, the README's tables.

    python scripts/eval_dc_solver.py --problem gmm-cond --guidance 1 7.5 --plug-in --unseen 7 4 --json out.json
    python scripts/eval_dc_solver.py --problem gmm --guidance 1
    python scripts/eval_dc_solver.py --problem mypkg.models:dc_problem --guidance 1 7.5 --ratio-dir ratios/

For each guidance scale and NFE: ratios searched on ``--search`` datapoints, scored on ``--eval`` other
ones; the CPR row predicts each configuration's ratios from a fit on all the others (leave-one-out, for
interior NFEs) and, for ``--unseen NFE SCALE`` configurations off the grid, from a fit on the whole grid.
``--ratio-dir`` keeps the searched ratios (resumable).
"""

from __future__ import annotations

import argparse
import json
import time

import diffsamplers
from diffsamplers.dc.evaluate import evaluate_dc, format_tables, load_problem
from diffsamplers.solvers import DCSolver, UniPC


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problem", default="gmm-cond", help="gmm, gmm-cond or package.module:factory")
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
    parser.add_argument("--reference-steps", type=int, default=1000)
    parser.add_argument("--spacing", default=None, help="grid (default: the problem's, linspace)")
    parser.add_argument("--final", default=None, help="zero, sigma_min or append_zero (default: the problem's)")
    parser.add_argument("--order", type=int, default=2)
    parser.add_argument("--variant", choices=["bh1", "bh2"], default="bh2")
    parser.add_argument("--plug-in", action="store_true", help="also DC on DPM-Solver++ 2M")
    parser.add_argument("--ratio-dir", default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    problem = load_problem(args.problem)
    problem.spacing = args.spacing or problem.spacing
    problem.final = args.final or problem.final
    start = time.perf_counter()
    report = evaluate_dc(
        problem,
        nfes=args.nfe,
        guidance_scales=args.guidance,
        unseen=[(int(n), float(g)) for n, g in args.unseen],
        num_eval=args.eval,
        num_search=args.search,
        seed=args.seed,
        solver=DCSolver(base=UniPC(args.order, args.variant)),
        plug_in=args.plug_in,
        reference_steps=args.reference_steps,
        iterations=args.iterations,
        refine_iterations=args.refine_iterations,
        ratio_dir=args.ratio_dir,
        batch_size=args.batch_size,
        log=lambda line: print(line, flush=True),
    )
    report["seconds"] = time.perf_counter() - start
    report["versions"] = {"diffsamplers": diffsamplers.__version__}
    print(f"\n# {report['problem']}: {report['metric']}; grid {report['grid']}")
    print(f"# {report['num_eval']} scored samples, ratios searched on {report['num_search']} others\n")
    print(format_tables(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
