"""Fit DC-Solver's cascade polynomial regression on searched ratio files; predict unseen configurations.

    python scripts/fit_cpr.py ratios/*.safetensors --out cpr.safetensors --predict 6 7.5 --predict 12 3

The files must come from one model and solver (several NFEs and guidance scales). ``--predict NFE SCALE``
prints the predicted ratios; a fitted file can be passed to ``DCSolverScheduler(dc_ratios=...)`` with
``dc_guidance_scale``.
"""

from __future__ import annotations

import argparse
import sys

from diffsamplers.solvers.dc_cpr import CascadePolynomialRegression
from diffsamplers.solvers.dc_ratios import DCRatios


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("ratios", nargs="+", help="searched ratio files (.safetensors)")
    parser.add_argument("--out", default=None, help="write the fit here (.safetensors)")
    parser.add_argument("--predict", nargs=2, action="append", default=[], metavar=("NFE", "SCALE"))
    args = parser.parse_args(argv)
    try:
        searched = [DCRatios.load(p) for p in args.ratios]
        fit = CascadePolynomialRegression.fit(searched)
    except (ValueError, FileNotFoundError) as err:
        print(f"fit_cpr: error: {err}", file=sys.stderr)
        return 2
    print(f"fitted on {[(r.nfe, r.guidance_scale) for r in searched]} ({searched[0].model}, dc_order {fit.dc_order})")
    for r in searched:
        predicted = fit.predict(r.nfe, r.guidance_scale)
        worst = max(abs(a - b) for a, b in zip(predicted, r.ratios))
        print(f"  NFE {r.nfe}, guidance {r.guidance_scale:g}: max |fit - searched| = {worst:.3f}")
    for nfe, scale in args.predict:
        print(
            f"NFE {int(nfe)}, guidance {float(scale):g}: {[round(v, 4) for v in fit.predict(int(nfe), float(scale))]}"
        )
    if args.out:
        fit.save(args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
