"""Search DC-Solver's compensation ratios for a model, NFE and guidance scale; save them (resumable).

    python scripts/search_dc_ratios.py --problem gmm-cond --nfe 8 --guidance 7.5 --out ratios/gmm-cond_8_7.5.safetensors
    python scripts/search_dc_ratios.py --problem mypkg.models:dc_problem --nfe 5 --guidance 1 --out r.safetensors

``--problem`` is a bundled exact model (``gmm``, ``gmm-cond``) or ``package.module:factory`` returning a
:class:`diffsamplers.dc.evaluate.Problem` (denoiser, sample shape, condition sampler, grid). The ratios are
written after every step; running the same command again resumes an interrupted search.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from diffsamplers.dc.evaluate import load_problem
from diffsamplers.dc.search import PAPER_DATAPOINTS, search_dc_ratios
from diffsamplers.solvers import DCSolver, DPMSolverPlusPlus, UniPC


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problem", default="gmm-cond", help="gmm, gmm-cond or package.module:factory")
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
    parser.add_argument("--reference-steps", type=int, default=1000)
    parser.add_argument("--base", choices=["unipc", "dpmsolver++"], default="unipc")
    parser.add_argument("--order", type=int, default=2)
    parser.add_argument("--variant", choices=["bh1", "bh2"], default="bh2")
    parser.add_argument("--dc-order", type=int, default=2)
    parser.add_argument("--device", default=None, help="e.g. cuda (default: where the model is, else cpu)")
    args = parser.parse_args(argv)

    problem = load_problem(args.problem)
    base = UniPC(args.order, args.variant) if args.base == "unipc" else DPMSolverPlusPlus(args.order)
    solver = DCSolver(base=base, dc_order=args.dc_order)
    x_T, (cond, uncond) = problem.draw(args.datapoints, args.seed, args.guidance)
    if args.device is not None:
        x_T = x_T.to(args.device)
        move = lambda c: (
            None if c is None else {k: v.to(args.device) if torch.is_tensor(v) else v for k, v in c.items()}
        )  # noqa: E731
        cond, uncond = move(cond), move(uncond)
    start = time.perf_counter()
    try:
        result = search_dc_ratios(
            problem.denoiser,
            solver,
            problem.schedule(args.nfe),
            x_T,
            model_id=problem.name,
            cond=cond,
            uncond=uncond,
            guidance_scale=args.guidance,
            reference_steps=args.reference_steps,
            iterations=args.iterations,
            lr=args.lr,
            bound=args.bound,
            refine_iterations=args.refine_iterations,
            refine_lr=args.refine_lr,
            checkpoint=args.out,
            log=lambda line: print(line, flush=True),
        )
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"search_dc_ratios: error: {err}", file=sys.stderr)
        return 2
    print(f"ratios ({problem.name}, {solver.name}, NFE {args.nfe}, guidance {args.guidance:g}): {result.ratios}")
    print(f"wrote {args.out} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
