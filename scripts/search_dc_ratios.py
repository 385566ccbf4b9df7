"""Search DC-Solver's compensation ratios for a model, NFE and guidance scale; save them (resumable).

    python scripts/search_dc_ratios.py --model gmm-cond --nfe 8 --guidance 7.5 --out ratios/gmm-cond_8_7.5.safetensors
    python scripts/search_dc_ratios.py --model mypkg.models:bundle --nfe 5 --guidance 1 --out r.safetensors

``--model`` is any model spec of :mod:`diffsamplers.apps.registry` (``gmm``, ``gmm-cond``, ``digits``, a pipeline
folder, or ``package.module:factory`` returning a ``ModelBundle``); ``--schedule`` a schedule spec. The ratios are
written after every step; running the same command again resumes an interrupted search. ``--refine-iterations``
refines the ratios jointly, keeping the iterate with the lowest trajectory loss on ``--refine-validation`` other
noises (seed ``--refine-validation-seed``, by default ``--seed + 1``); ``--refine-unvalidated`` keeps the best
iterate on the search noises themselves instead (it overfits them).
"""

from __future__ import annotations

import argparse
import sys
import time

from diffsamplers.apps.arguments import add_refine_validation_arguments
from diffsamplers.apps.recipes import parse_schedule
from diffsamplers.apps.registry import describe_models, load_model
from diffsamplers.solvers import DCSolver, DPMSolverPlusPlus, UniPC
from diffsamplers.tuning.dc_search import ON_SEARCH_NOISES, PAPER_DATAPOINTS, search_dc_ratios


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gmm-cond", help=f"model spec: {describe_models()}")
    parser.add_argument("--schedule", default="linspace/sigma_min", help="schedule spec (the DC paper's grid)")
    parser.add_argument("--nfe", type=int, required=True)
    parser.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1: none)")
    parser.add_argument("--out", required=True, help="output .safetensors (also the checkpoint to resume)")
    parser.add_argument("--datapoints", type=int, default=PAPER_DATAPOINTS)
    parser.add_argument("--seed", type=int, default=1, help="seed of the datapoints' noise and conditions")
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--bound", choices=["none", "tanh"], default="none")
    parser.add_argument(
        "--refine-iterations", type=int, default=0, help="then refine all ratios jointly on the trajectory (Adam steps)"
    )
    parser.add_argument("--refine-lr", type=float, default=0.02)
    add_refine_validation_arguments(parser, 32, "validation noises whose trajectory loss picks the iterate")
    parser.add_argument("--refine-validation-seed", type=int, default=None, help="their seed (default: --seed + 1)")
    parser.add_argument("--reference-steps", type=int, default=1000)
    parser.add_argument("--base", choices=["unipc", "dpmsolver++"], default="unipc")
    parser.add_argument("--order", type=int, default=2)
    parser.add_argument("--variant", choices=["bh1", "bh2"], default="bh2")
    parser.add_argument("--dc-order", type=int, default=2)
    parser.add_argument("--device", default=None, help="e.g. cuda (default: where the model is, else cpu)")
    args = parser.parse_args(argv)

    try:
        bundle = load_model(args.model, device=args.device)
        schedule = parse_schedule(args.schedule).build(bundle.process, args.nfe)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"search_dc_ratios: error: {err}", file=sys.stderr)
        return 2
    base = UniPC(args.order, args.variant) if args.base == "unipc" else DPMSolverPlusPlus(args.order)
    solver = DCSolver(base=base, dc_order=args.dc_order)
    device = args.device or bundle.device
    draw = bundle.draw(args.datapoints, args.seed, args.guidance, device=device)
    refine: dict = {"refine_patience": args.refine_patience or None}
    if args.refine_iterations > 0 and args.refine_unvalidated:
        refine["refine_validation"] = ON_SEARCH_NOISES
    elif args.refine_iterations > 0:
        seed = args.seed + 1 if args.refine_validation_seed is None else args.refine_validation_seed
        if seed == args.seed:
            print("search_dc_ratios: error: the validation noises need a seed other than --seed", file=sys.stderr)
            return 2
        held_out = bundle.draw(args.refine_validation, seed, args.guidance, device=device)
        refine.update(
            refine_validation=held_out.x_T,
            refine_validation_cond=held_out.cond,
            refine_validation_uncond=held_out.uncond,
        )
    start = time.perf_counter()
    try:
        result = search_dc_ratios(
            bundle.denoiser,
            solver,
            schedule,
            draw.x_T,
            model_id=bundle.name,
            cond=draw.cond,
            uncond=draw.uncond,
            guidance_scale=args.guidance,
            reference_steps=args.reference_steps,
            iterations=args.iterations,
            lr=args.lr,
            bound=args.bound,
            refine_iterations=args.refine_iterations,
            refine_lr=args.refine_lr,
            **refine,
            checkpoint=args.out,
            log=lambda line: print(line, flush=True),
        )
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"search_dc_ratios: error: {err}", file=sys.stderr)
        return 2
    print(f"ratios ({bundle.name}, {solver.name}, NFE {args.nfe}, guidance {args.guidance:g}): {result.ratios}")
    print(f"wrote {args.out} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
