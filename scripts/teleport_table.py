"""Gaussian teleportation: model evaluations saved at equal error.

For grids of N steps (Karras ρ = 7 by default, as the paper's code) the solver runs (a) on the whole grid and
(b) from the Gaussian teleport to the level chosen by the skip criterion (``--tolerance``: the teleported state's
estimated error as a fraction of the noise left in it, :func:`~diffsamplers.teleport.gaussian.teleport_level`), on
the rest of the grid. Then, for a target of N evaluations (the second table; ``--no-target-nfe`` leaves it out),
(c) the teleport to the criterion's level followed by N evaluations on the same spacing from there
(:meth:`GaussianTeleport.schedule_for <diffsamplers.teleport.gaussian.GaussianTeleport.schedule_for>`). Errors are
RMS against the exact (Gaussian mixture) or 1,000-step reference on seeded noises. "Saved at equal error": for each
teleported run, the NFE the plain solver needs for the same error (log-log interpolation of its error curve) minus
the teleported run's NFE.

    python scripts/teleport_table.py --model gmm --solver dpm++2m
"""

from __future__ import annotations

import argparse

import numpy as np

from diffsamplers import sample
from diffsamplers.apps.evaluation import evaluate, validation_set
from diffsamplers.apps.recipes import make_solver, parse_schedule
from diffsamplers.apps.registry import load_model
from diffsamplers.apps.tables import write_json
from diffsamplers.reference import reference_description
from diffsamplers.teleport.gaussian import TELEPORT_SPACINGS, GaussianTeleport, choose_skip
from diffsamplers.teleport.statistics import GaussianStatistics, class_statistics, load_class_statistics


def nfe_for_error(nfes: list[int], errors: list[float], target: float) -> float:
    """The (log-log interpolated) NFE at which the plain solver reaches ``target``; NaN outside the range."""
    x, y = np.log(np.asarray(nfes, float)), np.log(np.asarray(errors, float))
    order = np.argsort(y)  # errors fall with NFE
    if not y.min() <= np.log(target) <= y.max():
        return float("nan")
    return float(np.exp(np.interp(np.log(target), y[order], x[order])))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gmm")
    p.add_argument("--data", default=None, help="data for the statistics (tensor file or 'sklearn-digits')")
    p.add_argument("--stats", default=None, help="statistics file (.safetensors); else analytic or from the data")
    p.add_argument("--rank", type=int, default=None, help="low-rank + isotropic statistics of this rank")
    p.add_argument("--per-class", action="store_true", help="one Gaussian per class (class-conditional models)")
    p.add_argument("--solver", default="dpm++2m")
    p.add_argument(
        "--schedule",
        default="karras/append_zero",
        help="schedule spec (see diffsamplers.apps.recipes; default: Karras ρ = 7 with 0 appended, as k-diffusion)",
    )
    p.add_argument("--steps", type=int, nargs="+", default=[5, 6, 7, 8, 10, 12, 15, 20, 25, 30])
    p.add_argument("--tolerance", type=float, nargs="+", default=[0.01, 0.05])
    p.add_argument("--eval-samples", type=int, default=512)
    p.add_argument("--eval-seed", type=int, default=7)
    p.add_argument("--sample-metrics", nargs="*", default=[])
    p.add_argument("--device", default=None)
    p.add_argument("--no-target-nfe", action="store_true", help="leave out the table for a target NFE")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    bundle = load_model(args.model, device=args.device, data=args.data)
    den = bundle.denoiser
    device = args.device or "cpu"
    if args.per_class:
        stats = load_class_statistics(args.stats) if args.stats else class_statistics(bundle.data, rank=args.rank)
        first = next(iter(stats.values()))
        print(f"statistics: {len(stats)} classes, {first.source}, rank {first.rank} of {first.dim}")
    else:
        if args.stats:
            stats = GaussianStatistics.load(args.stats)
        elif bundle.gaussian_statistics is not None and args.data is None:
            stats = bundle.gaussian_statistics()
        else:
            stats = GaussianStatistics.from_data(bundle.data, rank=args.rank)
        if args.rank and stats.rank > args.rank:
            stats = stats.truncate(args.rank)
        print(f"statistics: {stats.source}, rank {stats.rank} of {stats.dim}, residual {stats.residual_variance:.3g}")
    solver = make_solver(args.solver)
    evaluation = validation_set(bundle, args.eval_samples, args.eval_seed, device=device)
    recipe = parse_schedule(args.schedule)

    def run(sched, tele=None):
        if tele is None:
            go = lambda x_T, cond: sample(den, solver, sched, x_T=x_T, cond=cond, batch_size=1024, progress=False)  # noqa: E731
        else:
            go = lambda x_T, cond: tele.sample(den, solver, sched, x_T=x_T, cond=cond, batch_size=1024, progress=False)  # noqa: E731
        return evaluate(bundle, evaluation, go, args.sample_metrics)

    plain = {}
    for n in args.steps:
        plain[n] = run(recipe.build(den.process, n))
    nfes = sorted(plain)
    results = {"plain": {n: plain[n] for n in nfes}, "teleport": {}}
    print(f"\n{args.model}, {args.solver}, {args.schedule} grids, {args.eval_samples} samples (RMS vs reference)")
    print(
        "| steps N | plain: NFE, RMS | tolerance | skip k (σ_skip) | teleport: NFE, RMS | plain NFE at that RMS | NFE saved |"
    )
    print("|---|---|---|---|---|---|---|")
    for tol in args.tolerance:
        results["teleport"][tol] = {}
        for n in nfes:
            sched = recipe.build(den.process, n)
            choice = choose_skip(den, stats, sched, tolerance=tol, cond=bundle.draw(64, 99).cond)
            k = choice.skip
            res = run(sched, GaussianTeleport(stats, skip=k)) if k else plain[n]
            need = nfe_for_error(nfes, [plain[m]["rms"] for m in nfes], res["rms"])
            saved = need - (n - k)
            results["teleport"][tol][n] = {**res, "skip": k, "sigma_skip": choice.sigma, "plain_nfe_at_error": need}
            print(
                f"| {n} | {n}, {plain[n]['rms']:.3e} | {tol:g} | {k} ({choice.sigma:.3g}) | {n - k}, {res['rms']:.3e} "
                f"| {need:.2f} | {saved:.2f} ({100 * saved / need:.0f} %) |"
            )
    if not args.no_target_nfe and recipe.kind not in TELEPORT_SPACINGS:
        print(f"\n(no table for a target NFE: a teleport schedule takes one of {TELEPORT_SPACINGS}, not {recipe.kind})")
    elif not args.no_target_nfe:
        results["target_nfe"] = {}
        print(f"\nTeleport to the criterion's level, then N evaluations on {args.schedule} grids from there")
        print("| NFE N | plain RMS | tolerance | level σ̃ | teleport RMS | plain NFE at that RMS | NFE saved |")
        print("|---|---|---|---|---|---|---|")
        for tol in args.tolerance:
            tele = GaussianTeleport(stats, tolerance=tol)
            level = tele.level_for(den, cond=bundle.draw(64, 99).cond)
            results["target_nfe"][tol] = {"level": level.sigma}
            for n in nfes:
                options = {} if recipe.final is None else {"final": recipe.final}
                sched = tele.schedule_for(den, n, spacing=recipe.kind, **options, **dict(recipe.options))
                res = run(sched, tele)
                need = nfe_for_error(nfes, [plain[m]["rms"] for m in nfes], res["rms"])
                results["target_nfe"][tol][n] = {**res, "plain_nfe_at_error": need}
                print(
                    f"| {n} | {plain[n]['rms']:.3e} | {tol:g} | {level.sigma:.3g} | {res['rms']:.3e} | {need:.2f} "
                    f"| {need - n:.2f} ({100 * (need - n) / need:.0f} %) |"
                )
    if args.json:
        write_json({"args": vars(args), "reference": reference_description(), "results": results}, args.json)


if __name__ == "__main__":
    main()
