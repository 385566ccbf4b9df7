"""The self-guided minority sampler (Um & Ye, ECCV 2024) on the bundled digits model: docs/guidance.md's table.

    python scripts/self_minority_digits.py --json docs/guidance/self_minority_digits.json \\
        --grid docs/guidance/self_minority_digits.png

Every w samples the same ``--num-samples`` class-balanced digits (sample i: class i mod 10, its own seed) with the
same solver and steps (``make_sampler``, as ``diffsamplers eval``): w = 0 is the unguided sampler. Reported per w:

* the minority score of the samples (Um, Lee & Ye, ICLR 2024, Eq. 5; :func:`~diffsamplers.tuning.minority.minority_score`:
  the mean reconstruction loss after re-noising to t = 0.6, 5 draws, L2 on the images and, ``--features``, in the
  digits classifier's 64-d features) — not the guidance's own objective (t = 0.8, one draw, unclipped);
* AvgkNN (Sehwag et al. 2022: mean distance to the 5 nearest training digits), precision/recall (k = 3),
  density/coverage (k = 5) and within-class diversity in the same 64-d features against the 1,438 training digits
  (:func:`~diffsamplers.apps.digits_eval.knn_metrics`), FD-digits and class accuracy by the bundled classifier.

The JSON is written after every w and settings already in it are skipped, so an interrupted run resumes. The grid
shows the first ``--grid-samples`` digits unguided and at the largest w, from the same noises.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from diffsamplers.apps.digits_eval import KNN_K, knn_metrics
from diffsamplers.apps.images import save_grids_side_by_side
from diffsamplers.apps.recipes import parse_guidance
from diffsamplers.apps.registry import load_model
from diffsamplers.apps.samplers import make_sampler
from diffsamplers.apps.tables import resumed_report, versions, write_json
from diffsamplers.data.digits import load_digits_dataset, to_uint8
from diffsamplers.metrics.fd_digits import fd_digits
from diffsamplers.tuning.minority import minority_score

DEFAULT_WEIGHTS = [0.0, 0.05, 0.1, 0.2, 0.4]
KNN = ("precision", "recall", "density", "coverage", "avg_knn_distance", "within_class_diversity")


def _features(extractor: Any, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([extractor(images[i : i + 512]) for i in range(0, len(images), 512)])


def measure(bundle: Any, images: torch.Tensor, labels: torch.Tensor, real: torch.Tensor, args: Any) -> dict[str, Any]:
    """The metrics of one setting's uint8 samples."""
    extractor = bundle.features()
    feats = _features(extractor, images)
    x = images.float() / 127.5 - 1.0
    cond, _ = bundle.conditions(labels)
    score = minority_score(bundle.denoiser, x, num_draws=5, distance="l2", seed=args.seed, cond=cond)
    row = {
        "minority_score": float(score.mean()),
        "minority_score_median": float(score.median()),
        "fd_digits": fd_digits(x),
        "class_accuracy": float((extractor.classify(feats) == labels).float().mean()),
        **knn_metrics(real, feats, labels),
    }
    if args.features:
        feat_score = minority_score(bundle.denoiser, x, num_draws=5, distance="features", seed=args.seed, cond=cond)
        row["minority_score_features"] = float(feat_score.mean())
    return row


def format_table(report: dict[str, Any]) -> str:
    """The rows as a Markdown table (accuracy in %), the held-out digits last."""
    heads = ["w", "minority score", "AvgkNN", "accuracy %", "FD-digits", "precision", "recall", "density", "coverage"]
    keys = ["minority_score", "avg_knn_distance", "class_accuracy", "fd_digits", "precision", "recall", "density"]
    keys.append("coverage")
    lines = ["| " + " | ".join(heads) + " |", "|---" * len(heads) + "|"]
    rows = [(f"{row['w']:g}", row) for row in report["rows"]] + [("held-out digits", report["held_out"])]
    for name, row in rows:
        cells = [name]
        for key in keys:
            value = row.get(key)
            cells.append("—" if value is None else f"{100 * value:.1f}" if key == "class_accuracy" else f"{value:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", type=float, nargs="+", default=DEFAULT_WEIGHTS, help="guidance scales w")
    parser.add_argument("--options", default="k=1", help="other self-minority options, e.g. k=1,p=0.8")
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--nfe", type=int, default=20)
    parser.add_argument("--solver", default="ddim-eta1")
    parser.add_argument("--schedule", default="linspace")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--features", action="store_true", help="also the minority score in classifier features")
    parser.add_argument("--json", type=Path, default=Path("docs/guidance/self_minority_digits.json"))
    parser.add_argument("--grid", type=Path, default=None, help="unguided vs the largest w, same noises (.png)")
    parser.add_argument("--grid-samples", type=int, default=40)
    args = parser.parse_args(argv)

    settings = {
        "model": "digits",
        "num_samples": args.num_samples,
        "nfe": args.nfe,
        "solver": args.solver,
        "schedule": args.schedule,
        "options": args.options,
        "seed": args.seed,
        "features": args.features,
    }
    report = resumed_report(args.json, settings)
    bundle = load_model("digits")
    extractor = bundle.features()
    train, _ = load_digits_dataset("train")
    real = _features(extractor, to_uint8(train))
    test, test_labels = load_digits_dataset("test")
    report["held_out"] = measure(bundle, to_uint8(test), test_labels, real, args)
    done = {row["w"] for row in report["rows"]}
    sheets: dict[float, torch.Tensor] = {}
    for w in args.weights:
        spec = f"self-minority:w={w:g}" + (f",{args.options}" if args.options else "")
        if w in done and args.grid is None:
            continue
        began = time.time()
        hooks = parse_guidance(spec).build(bundle)
        sampler = make_sampler(bundle, args.solver, args.nfe, args.schedule, 1.0, args.seed, guidance=hooks)
        images, labels = sampler(range(args.num_samples))
        seconds = time.time() - began
        sheets[w] = images[: args.grid_samples]
        if w in done:
            continue
        row = {"w": w, "spec": spec, **measure(bundle, images, labels, real, args), "sampling_seconds": seconds}
        report["rows"].append(row)
        report.update(
            minority_score="mean over samples of Um et al. 2024 Eq. 5: L2 reconstruction loss after re-noising "
            "to normalised time 0.6, 5 draws, x̂0 clipped to [-1, 1], on the uint8 samples",
            knn_metrics="64-d features of the bundled digits classifier vs the 1,438 training digits",
            knn_k=dict(KNN_K),
            versions=versions(),
            threads=torch.get_num_threads(),
        )
        report["rows"].sort(key=lambda r: r["w"])
        write_json(report, args.json)
        print(f"w={w:g}: {time.time() - began:.0f} s", flush=True)
    if args.grid is not None and len(sheets) > 1:
        rows = max(1, args.grid_samples // 10)
        save_grids_side_by_side([sheets[min(sheets)], sheets[max(sheets)]], rows, args.grid)
    print(format_table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
