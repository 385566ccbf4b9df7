"""Classifier-based minority guidance (Um, Lee & Ye, ICLR 2024) on the bundled digits model: docs/guidance.md's
"Minority guidance" table and grid.

    python scripts/minority_guidance_digits.py --json docs/guidance/minority_digits.json \\
        --grid docs/guidance/minority_digits.png

Every w samples the same ``--num-samples`` class-balanced digits (sample i: class i mod 10, its own seed) with the
same solver and steps (``make_sampler``, as ``diffsamplers eval``) under ``minority:level=L-1,w=W`` with the
classifier shipped for the model (w = 0 is the unguided sampler, bit for bit). Reported per w:

* the minority score of the samples (Eq. 5, :func:`~diffsamplers.tuning.minority.minority_score` at the
  classifier's own perturbation time, distance and draws, conditioned on the sample's class), its mean and the
  share of samples above the training digits' top-level threshold (10 % of the training digits are);
* the same score with the L2 distance and 5 draws (a check that does not use the feature network the classifier was
  labelled with);
* the classifier's mean predicted level of the final samples at σ̃ = 0.01;
* AvgkNN (mean distance to the 5 nearest training digits), precision/recall (k = 3), density/coverage (k = 5) and
  within-class diversity in the 64-d digits features (:func:`~diffsamplers.apps.digits_eval.knn_metrics`),
  FD-digits and class accuracy by the bundled classifier.

The grid has one row per w: the first ``--grid-samples`` digits from the same noises.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import torch

from diffsamplers.apps.digits_eval import KNN_K, knn_metrics
from diffsamplers.apps.images import save_grid
from diffsamplers.apps.recipes import parse_guidance
from diffsamplers.apps.registry import ModelBundle, load_model
from diffsamplers.apps.samplers import make_sampler
from diffsamplers.apps.tables import versions, write_json
from diffsamplers.data.digits import load_digits_dataset, to_uint8
from diffsamplers.metrics.fd_digits import fd_digits
from diffsamplers.models.minority_classifier import default_minority_dir, load_minority_classifier
from diffsamplers.tuning.minority import assign_levels, minority_score

DEFAULT_WEIGHTS = [0.0, 0.5, 1.0, 2.0, 4.0]
#: Monte-Carlo draws of the L2 check (the main score uses the classifier's own).
L2_DRAWS = 5
COLUMNS = [
    ("w", "w", "{:g}"),
    ("minority_score", "minority score", "{:.2f}"),
    ("top_level_share", "top level %", "{:.1%}"),
    ("minority_score_l2", "score (L2)", "{:.3f}"),
    ("classifier_level", "classifier level", "{:.2f}"),
    ("avg_knn_distance", "AvgkNN", "{:.3f}"),
    ("class_accuracy", "accuracy", "{:.1%}"),
    ("fd_digits", "FD-digits", "{:.2f}"),
    ("precision", "precision", "{:.3f}"),
    ("recall", "recall", "{:.3f}"),
    ("density", "density", "{:.3f}"),
    ("coverage", "coverage", "{:.3f}"),
    ("within_class_diversity", "diversity", "{:.3f}"),
]


def measure(bundle: ModelBundle, images: torch.Tensor, labels: torch.Tensor, real: torch.Tensor, ctx: dict) -> dict:
    """The metrics of one setting's uint8 samples (module docstring)."""
    extractor, info, classifier = bundle.features(), ctx["info"], ctx["classifier"]
    feats = torch.cat([extractor(images[i : i + 512]) for i in range(0, len(images), 512)])
    x = images.float() / 127.5 - 1.0
    cond, _ = bundle.conditions(labels)
    kwargs = {"time": info.time, "num_draws": ctx["draws"] or info.num_draws, "seed": ctx["seed"], "cond": cond}
    score = minority_score(bundle.denoiser, x, distance=info.distance, **kwargs)
    l2_kwargs = {**kwargs, "num_draws": ctx["draws"] or L2_DRAWS}
    with torch.no_grad():
        probs = torch.softmax(classifier(x, math.log(0.01)), dim=1)
    return {
        "minority_score": float(score.mean()),
        "top_level_share": float(
            (assign_levels(score, torch.tensor(info.thresholds)) == info.num_levels - 1).float().mean()
        ),
        "minority_score_l2": float(minority_score(bundle.denoiser, x, distance="l2", **l2_kwargs).mean()),
        "classifier_level": float((probs * torch.arange(info.num_levels)).sum(1).mean()),
        "fd_digits": fd_digits(x),
        "class_accuracy": float((extractor.classify(feats) == labels).float().mean()),
        **knn_metrics(real, feats, labels),
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table, the held-out digits last."""
    lines = ["| " + " | ".join(head for _, head, _ in COLUMNS) + " |", "|---" * len(COLUMNS) + "|"]
    for row in rows:
        cells = [
            str(row[key]) if isinstance(row.get(key), str) else "—" if row.get(key) is None else fmt.format(row[key])
            for key, _, fmt in COLUMNS
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", type=float, nargs="+", default=DEFAULT_WEIGHTS, help="guidance scales w")
    parser.add_argument("--level", type=int, default=None, help="target level (default L − 1)")
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--nfe", type=int, default=10)
    parser.add_argument("--solver", default="dpm++2m")
    parser.add_argument("--schedule", default="linspace")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--draws", type=int, default=None, help="score draws (default: the classifier's; L2: 5)")
    parser.add_argument("--json", type=Path, default=Path("docs/guidance/minority_digits.json"))
    parser.add_argument("--grid", type=Path, default=None, help="one row per w, same noises (.png)")
    parser.add_argument("--grid-samples", type=int, default=20)
    args = parser.parse_args(argv)

    bundle = load_model("digits")
    classifier, info = load_minority_classifier(default_minority_dir(bundle.folder))
    ctx = {"info": info, "classifier": classifier, "seed": args.seed, "draws": args.draws}
    real = bundle.features()(to_uint8(load_digits_dataset("train")[0]))
    test, test_labels = load_digits_dataset("test")
    report: dict[str, Any] = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "classifier": {"model_id": info.model_id, "num_levels": info.num_levels, "time": info.time,
                       "num_draws": info.num_draws, "distance": info.distance},
        "held_out": {"w": "held-out digits", **measure(bundle, to_uint8(test), test_labels, real, ctx)},
        "knn_k": dict(KNN_K),
        "versions": versions(),
        "threads": torch.get_num_threads(),
        "rows": [],
    }  # fmt: skip
    level = f"level={args.level}," if args.level is not None else ""
    sheets = []
    for w in args.weights:
        began = time.time()
        spec = f"minority:{level}w={w:g}"
        hooks = parse_guidance(spec).build(bundle)
        sampler = make_sampler(bundle, args.solver, args.nfe, args.schedule, 1.0, args.seed, guidance=hooks)
        images, labels = sampler(range(args.num_samples))
        seconds = time.time() - began
        sheets.append(images[: args.grid_samples])
        report["rows"].append({"w": w, "spec": spec, **measure(bundle, images, labels, real, ctx), "seconds": seconds})
        write_json(report, args.json)
        print(f"w={w:g}: sampled in {seconds:.0f} s, measured in {time.time() - began - seconds:.0f} s", flush=True)
    if args.grid is not None:
        save_grid(torch.cat(sheets), len(sheets), args.grid)
    print(format_table([*report["rows"], report["held_out"]]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
