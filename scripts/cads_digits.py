"""CADS against plain classifier-free guidance on the bundled digits model: docs/guidance.md's CADS table.

    python scripts/cads_digits.py --num-samples 1000 --json docs/guidance/cads_digits.json
    python scripts/cads_digits.py --specs 7.5 7.5+cads:s=0.25 --num-samples 200 --json /tmp/cads.json

Every guidance spec samples the same ``--num-samples`` class-balanced digits (sample i: class i mod 10, its own
seed) with the same solver and steps, through ``diffsamplers eval``'s measurement (:func:`run_eval`): FD-digits and
class accuracy, precision/recall, density/coverage, AvgkNN and within-class diversity in the 64-d features of the
bundled digits classifier against the 1,438 training digits. The JSON is written after every spec and specs
already in it are skipped, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from diffsamplers.apps.digits_eval import run_eval
from diffsamplers.apps.tables import resumed_report, versions, write_json

#: CFG at 7.5 and 3, and CADS (τ1 = 0.6, τ2 = 0.9, ψ = 1) at the paper's class-conditional noise scales.
DEFAULT_SPECS = [
    "7.5",
    "7.5+cads:s=0.05",
    "7.5+cads:s=0.1",
    "7.5+cads:s=0.25",
    "3",
    "3+cads:s=0.05",
    "3+cads:s=0.1",
    "3+cads:s=0.25",
]
METRICS = (
    "fd_digits",
    "class_accuracy",
    "precision",
    "recall",
    "density",
    "coverage",
    "avg_knn_distance",
    "within_class_diversity",
)


def _row(spec: str, report: dict[str, Any], nfe: int) -> dict[str, Any]:
    method = report["methods"][0]
    return {
        "spec": spec,
        "guidance_scale": report["guidance_scale"],
        **{m: method[m][str(nfe)] for m in METRICS},
        "seconds": method["seconds"][str(nfe)],
    }


def format_table(report: dict[str, Any]) -> str:
    """The rows as a Markdown table (accuracy in %)."""
    heads = ["guidance", "FD-digits", "accuracy %", "precision", "recall", "density", "coverage", "AvgkNN", "diversity"]
    lines = ["| " + " | ".join(heads) + " |", "|---" * len(heads) + "|"]
    for row in report["rows"]:
        cells = [f"`{row['spec']}`", f"{row['fd_digits']:.2f}", f"{100 * row['class_accuracy']:.1f}"]
        cells += [f"{row[m]:.3f}" for m in METRICS[2:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--specs", nargs="+", default=DEFAULT_SPECS, help="guidance specs, one setting each")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--nfe", type=int, default=20)
    parser.add_argument("--solver", default="dpm++2m")
    parser.add_argument("--schedule", default="linspace")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path("docs/guidance/cads_digits.json"))
    args = parser.parse_args(argv)

    settings = {
        "model": "digits",
        "num_samples": args.num_samples,
        "nfe": args.nfe,
        "solver": args.solver,
        "schedule": args.schedule,
        "seed": args.seed,
    }
    report = resumed_report(args.json, settings)
    done = {row["spec"] for row in report["rows"]}
    for spec in args.specs:
        if spec in done:
            continue
        began = time.time()
        out = run_eval(
            nfes=[args.nfe],
            num_samples=args.num_samples,
            seed=args.seed,
            methods=[(args.solver, args.solver, args.schedule)],
            guidance=spec,
            progress=False,
        )
        report["rows"].append(_row(spec, out, args.nfe))
        report.update(
            metric=out["metric"],
            knn_metrics=out["knn_metrics"],
            knn_k=out["knn_k"],
            held_out=out["held_out"],
            versions=versions(),
            threads=torch.get_num_threads(),
        )
        write_json(report, args.json)
        print(f"{spec}: {time.time() - began:.0f} s", flush=True)
    order = {spec: i for i, spec in enumerate(dict.fromkeys([*DEFAULT_SPECS, *args.specs]))}
    report["rows"].sort(key=lambda row: order.get(row["spec"], len(order)))
    write_json(report, args.json)
    print(format_table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
