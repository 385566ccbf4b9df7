"""``diffsamplers eval``: FD-digits, class accuracy and the k-NN metrics against NFE for several solvers, ours and
diffusers', under a guidance spec.

All methods sample the same N class-balanced digits (sample i: class i mod 10, its own seed) from the
bundled model; FD-digits is measured against the 1,438 training digits and accuracy by the bundled
classifier. The held-out digits give the floor: FD-digits of 359 real images the model never saw, and the
classifier's accuracy on them.

What guidance trades is reported apart (:mod:`diffsamplers.metrics.manifold`), in the same 64-d features of the
digits classifier (``bundle.features``) against the same training digits: improved precision and recall (k = 3),
density and coverage (k = 5), the average distance to the 5 nearest training digits (AvgkNN; higher = rarer
samples) and the within-class diversity (mean pairwise distance among samples of one class). The guidance spec
(:func:`~diffsamplers.apps.recipes.parse_guidance`) is a classifier-free scale and/or named guidances, built for
the model; named guidances run in our sampling loop only, so diffusers' schedulers are skipped under them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ..data.digits import load_digits_dataset, to_uint8
from ..metrics.features import DigitsFeatures
from ..metrics.frechet import FeatureStats, frechet_distance
from ..metrics.manifold import average_knn_distance, density_coverage, precision_recall, within_class_diversity
from .recipes import OutsideFitError, parse_guidance
from .registry import load_model
from .samplers import make_sampler

__all__ = ["DEFAULT_METHODS", "GuidanceError", "KNN_K", "KNN_METRICS", "run_eval", "format_table", "knn_metrics"]

#: (name, solver spec, schedule spec) — a diffusers scheduler runs on its own grid (its config's spacing).
DEFAULT_METHODS: list[tuple[str, str, str]] = [
    ("DDIM", "ddim", "linspace"),
    ("DPM-Solver++ 2M", "dpm++2m", "linspace"),
    ("DPM-Solver++ 3M", "dpm++3m", "linspace"),
    ("DPM-Solver++ 2S", "dpm++2s", "linspace"),
    ("DPM-Solver++ 2M, logSNR", "dpm++2m", "uniform_logsnr"),
    ("DPM-Solver++ 2M, Karras", "dpm++2m", "karras/append_zero"),
    ("UniPC (bh2), linspace→σ_min", "unipc", "linspace/sigma_min"),
    ("DC-Solver (CPR ratios), linspace→σ_min", "dc-solver", "linspace/sigma_min"),
    ("DPM-Solver++ 2M, linspace→σ_min", "dpm++2m", "linspace/sigma_min"),
    ("diffusers DDIM (trailing)", "diffusers:DDIMScheduler:timestep_spacing=trailing,set_alpha_to_one=true", ""),
    ("diffusers Euler", "diffusers:EulerDiscreteScheduler", "linspace"),
    ("diffusers DPM-Solver++ 2M", "diffusers:DPMSolverMultistepScheduler", "linspace"),
    ("diffusers UniPC", "diffusers:UniPCMultistepScheduler", "linspace"),
]


class GuidanceError(ValueError):
    """The guidance spec names a guidance that cannot be built for the model (a bad option, a model it cannot
    guide)."""


#: k of each k-NN metric: the papers' choices (Kynkäänniemi et al. 2019: 3; Naeem et al. 2020: 5; AvgkNN: 5).
KNN_K = {"precision_recall": 3, "density_coverage": 5, "avg_knn_distance": 5}
#: The k-NN metrics of a report, in table order (higher is better for all but AvgkNN, which measures rarity).
KNN_METRICS = ("precision", "recall", "density", "coverage", "avg_knn_distance", "within_class_diversity")


def _stats(extractor: DigitsFeatures, images: torch.Tensor) -> tuple[FeatureStats, torch.Tensor]:
    feats = torch.cat([extractor(images[i : i + 512]) for i in range(0, len(images), 512)])
    return FeatureStats(extractor.dim).update(feats), feats


def knn_metrics(real: torch.Tensor, fake: torch.Tensor, labels: torch.Tensor | None) -> dict[str, float | None]:
    """The k-NN metrics (:data:`KNN_METRICS`) of features ``fake`` (labels ``labels``) against ``real``; ``None``
    where the samples are too few (recall needs more than k of them, diversity a class with two)."""
    k_pr, k_dc, k_nn = KNN_K["precision_recall"], KNN_K["density_coverage"], KNN_K["avg_knn_distance"]
    out: dict[str, float | None] = dict.fromkeys(KNN_METRICS)
    if len(fake) > k_pr:
        out["precision"], out["recall"] = precision_recall(real, fake, k_pr)
    out["density"], out["coverage"] = density_coverage(real, fake, k_dc)
    out["avg_knn_distance"] = average_knn_distance(fake, real, k_nn)
    if labels is not None and int(torch.bincount(labels).max()) >= 2:
        out["within_class_diversity"] = within_class_diversity(fake, labels)
    return out


def run_eval(
    nfes: Sequence[int] = (5, 10, 20),
    num_samples: int = 500,
    guidance_scale: float = 1.0,
    seed: int = 0,
    methods: Sequence[tuple[str, str, str]] | None = None,
    select: str | None = None,
    batch_size: int = 500,
    model: str = "digits",
    progress: bool = True,
    guidance: str | None = None,
) -> dict[str, Any]:
    """Every method at every NFE: FD-digits, class accuracy and the k-NN metrics of ``num_samples`` samples.

    ``guidance`` is a guidance spec (:func:`~diffsamplers.apps.recipes.parse_guidance`): its number is the
    classifier-free scale (``guidance_scale`` where it has none), its named guidances are built for the model and
    run in every one of our solvers; diffusers' schedulers take only the scale, so under a named guidance their
    cells are ``None`` and the row says why (``skipped``).
    """
    methods = list(methods or DEFAULT_METHODS)
    if select:
        methods = [m for m in methods if select.lower() in m[0].lower()]
        if not methods:
            raise ValueError(f"no method matches {select!r}")
    if num_samples < 2:
        raise ValueError(f"num_samples must be at least 2 for a covariance, got {num_samples}")
    nfes = [int(n) for n in nfes]
    if any(n <= 0 for n in nfes):
        raise ValueError(f"NFEs must be positive, got {nfes}")
    recipe = parse_guidance(format(guidance_scale, "g") if guidance is None else guidance)
    scale = guidance_scale if recipe.scale is None else recipe.scale
    bundle = load_model(model)
    try:
        hooks = recipe.build(bundle)
    except ValueError as err:
        raise GuidanceError(str(err)) from None
    if bundle.features is None:
        raise ValueError(f"model {model!r} has no feature network for FD-digits and the k-NN metrics")
    extractor = bundle.features()
    train_images, _ = load_digits_dataset("train")
    ref, train_feats = _stats(extractor, to_uint8(train_images))
    test_images, test_labels = load_digits_dataset("test")
    held, held_feats = _stats(extractor, to_uint8(test_images))
    report: dict[str, Any] = {
        "model": model,
        "num_samples": num_samples,
        "guidance": recipe.spec,
        "guidance_scale": scale,
        "seed": seed,
        "nfe": nfes,
        "metric": "FD-digits (64-d features of the bundled digits classifier; not FID) vs the 1,438 training digits",
        "knn_metrics": "precision/recall (Kynkäänniemi et al. 2019), density/coverage (Naeem et al. 2020), AvgkNN "
        "(Sehwag et al. 2022), within-class diversity (mean pairwise distance), in the same features vs the same "
        "training digits",
        "knn_k": dict(KNN_K),
        "held_out": {
            "fd_digits": frechet_distance(held.mu, held.sigma, ref.mu, ref.sigma),
            "class_accuracy": float((extractor.classify(held_feats) == test_labels).float().mean()),
            **knn_metrics(train_feats, held_feats, test_labels),
            "num_images": len(test_images),
        },
        "methods": [],
    }
    metrics = ("fd_digits", "class_accuracy", *KNN_METRICS, "seconds")
    bar = tqdm(total=len(methods) * len(nfes), desc="eval", disable=not progress)
    for name, solver, schedule in methods:
        row: dict[str, Any] = {
            "name": name,
            "solver": solver,
            "schedule": schedule or "diffusers default",
            **{metric: {} for metric in metrics},
        }
        if hooks and solver.startswith("diffusers:"):
            row["skipped"] = (
                f"guidance {recipe.spec!r} runs in our sampling loop; diffusers' schedulers take a scale only"
            )
        for nfe in nfes:
            began = time.time()
            sampler = None
            if "skipped" not in row:
                try:
                    sampler = make_sampler(
                        bundle, solver, nfe, schedule or "linspace", scale, seed, batch_size=batch_size, guidance=hooks
                    )
                except OutsideFitError:  # DC-Solver's CPR ratios exist only for the NFEs it was fitted on
                    pass
            if sampler is None:
                for metric in metrics:
                    row[metric][str(nfe)] = None
                bar.update(1)
                continue
            images, labels = sampler(range(num_samples))
            stats, feats = _stats(extractor, images)
            row["fd_digits"][str(nfe)] = frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma)
            row["class_accuracy"][str(nfe)] = float((extractor.classify(feats) == labels).float().mean())
            for metric, value in knn_metrics(train_feats, feats, labels).items():
                row[metric][str(nfe)] = value
            row["seconds"][str(nfe)] = time.time() - began
            bar.update(1)
        report["methods"].append(row)
    bar.close()
    return report


def _cell(value: float | None) -> str:
    return f"{'—':>9}" if value is None else f"{value:>9.3f}"


#: Column heads of the k-NN block of :func:`format_table`, in :data:`KNN_METRICS` order.
_KNN_HEADS = ("prec", "recall", "density", "cover", "AvgkNN", "div")


def format_table(report: dict[str, Any]) -> str:
    """FD-digits and accuracy per method and NFE, the held-out floor, then the k-NN metrics (one line per method
    and NFE, the held-out digits last) where the report has them."""
    nfes = report["nfe"]
    width = max(len(m["name"]) for m in report["methods"]) + 2
    head = (
        f"{'':<{width}}"
        + "".join(f"{'FD@' + str(n):>9}" for n in nfes)
        + "".join(f"{'acc@' + str(n):>9}" for n in nfes)
    )
    lines = [head]
    for m in report["methods"]:
        lines.append(
            f"{m['name']:<{width}}"
            + "".join(_cell(m["fd_digits"][str(n)]) for n in nfes)
            + "".join(_cell(m["class_accuracy"][str(n)]) for n in nfes)
        )
    held = report["held_out"]
    lines.append(
        f"{'held-out digits (' + str(held['num_images']) + ')':<{width}}{held['fd_digits']:>9.3f}   (accuracy {held['class_accuracy']:.3f})"
    )
    if all(metric in held for metric in KNN_METRICS):
        k = report.get("knn_k", KNN_K)
        lines += [
            "",
            f"# k-NN metrics vs the training digits (precision/recall k={k['precision_recall']}, density/coverage "
            f"k={k['density_coverage']}, AvgkNN k={k['avg_knn_distance']}; div: within-class diversity)",
            f"{'':<{width}}{'NFE':>5}" + "".join(f"{h:>9}" for h in _KNN_HEADS),
        ]
        for m in report["methods"]:
            for n in nfes:
                cells = "".join(_cell(m[metric][str(n)]) for metric in KNN_METRICS)
                lines.append(f"{m['name']:<{width}}{n:>5}{cells}")
        cells = "".join(_cell(held[metric]) for metric in KNN_METRICS)
        lines.append(f"{'held-out digits (' + str(held['num_images']) + ')':<{width}}{'':>5}{cells}")
    return "\n".join(lines)
