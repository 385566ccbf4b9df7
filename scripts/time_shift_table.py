"""Exposure-bias time shift (Li et al. 2024): the same solver and grid with and without the shift.

Errors are RMS against the exact (Gaussian mixture) or 1,000-step reference on seeded noises, plus any
registered sample metric (``--sample-metrics fd-digits`` for the bundled digits model; ``--reference-steps 0``
skips the reference run and scores the sample metrics only). Grids are diffusers' ``trailing`` integer timesteps (time-uniform, as the paper's samplers).
Settings are ``half_width:cutoff[:signal_variance]``; the official scripts' ``--window_size w`` is half width
w // 2 (e.g. DPM-Solver 5 steps: w = 30, c = 300 → ``15:300``; ADM-DDIM: w = 80, c = 300 → ``40:300``).

    python scripts/time_shift_table.py --model gmm --solvers ddim dpm++2m unipc --steps 5 10 20
    python scripts/time_shift_table.py --model digits --sample-metrics fd-digits --reference-steps 0 \
        --eval-samples 1000
"""

from __future__ import annotations

import argparse

from diffsamplers import sample
from diffsamplers.apps.evaluation import evaluate, validation_set
from diffsamplers.apps.recipes import make_solver, parse_schedule
from diffsamplers.apps.registry import load_model
from diffsamplers.apps.tables import markdown_table, write_json
from diffsamplers.reference import reference_description


def parse_setting(text: str) -> tuple[int, float, float]:
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(f"expected half_width:cutoff[:signal_variance], got {text!r}")
    return int(parts[0]), float(parts[1]), float(parts[2]) if len(parts) == 3 else 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gmm")
    p.add_argument("--data", default=None)
    p.add_argument("--solvers", nargs="+", default=["ddim", "dpm++2m"])
    p.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20])
    p.add_argument("--schedule", default="trailing", help="schedule spec (see diffsamplers.apps.recipes)")
    p.add_argument(
        "--settings", type=parse_setting, nargs="+", default=[(15, 300.0, 0.0), (40, 300.0, 0.0), (5, 550.0, 0.0)]
    )
    p.add_argument("--eval-samples", type=int, default=512)
    p.add_argument("--eval-seed", type=int, default=7)
    p.add_argument("--sample-metrics", nargs="*", default=[])
    p.add_argument("--reference-steps", type=int, default=1000, help="0: no reference run, sample metrics only")
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    bundle = load_model(args.model, device=args.device, data=args.data)
    den = bundle.denoiser
    device = args.device or "cpu"
    evaluation = validation_set(
        bundle, args.eval_samples, args.eval_seed, device=device, reference_steps=args.reference_steps
    )
    schedule = parse_schedule(args.schedule)
    metrics = ([] if evaluation.reference is None else ["rms"]) + list(args.sample_metrics)
    rows = {}
    for name in args.solvers:
        variants = {name: make_solver(name)}
        for w, c, v in args.settings:
            label = f"{name} + time shift (half width {w}, cutoff {c:g}" + (f", signal variance {v:g})" if v else ")")
            variants[label] = make_solver(f"{name}+ts:half_width={w},cutoff={c!r},signal_variance={v!r}")
        for label, solver in variants.items():
            rows[label] = {}
            for n in args.steps:
                sched = schedule.build(den.process, n)
                run = lambda x_T, cond, s=solver, sc=sched: sample(  # noqa: E731
                    den, s, sc, x_T=x_T, cond=cond, batch_size=1024, progress=False
                )
                rows[label][n] = evaluate(bundle, evaluation, run, args.sample_metrics)
    for metric in metrics:
        print(
            f"\n{metric} ({args.model}, {args.schedule} grids, {args.eval_samples} samples, eval seed {args.eval_seed})"
        )
        print(markdown_table(rows, args.steps, metric, "sampler"))
    if args.json:
        write_json(
            {"args": vars(args), "reference": reference_description(args.reference_steps), "rows": rows}, args.json
        )


if __name__ == "__main__":
    main()
