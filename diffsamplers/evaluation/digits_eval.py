"""``diffsamplers eval``: FD-digits and class accuracy against NFE for several solvers, ours and diffusers'.

All methods sample the same N class-balanced digits (sample i: class i mod 10, its own seed) from the
bundled model; FD-digits is measured against the 1,438 training digits and accuracy by the bundled
classifier. The held-out digits give the floor: FD-digits of 359 real images the model never saw, and the
classifier's accuracy on them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..data.digits import load_digits_dataset, to_uint8
from ..models.digits import load_digits_classifier
from .features import DigitsFeatures
from .frechet import FeatureStats, frechet_distance
from .sources import OutsideFitError, load_model_source, make_sampler

__all__ = ["DEFAULT_METHODS", "run_eval", "format_table", "write_plot"]

#: (name, solver, schedule) — a diffusers scheduler runs on its own default grid.
DEFAULT_METHODS: list[tuple[str, str, str]] = [
    ("DDIM", "ddim", "linspace"),
    ("DPM-Solver++ 2M", "dpm++2m", "linspace"),
    ("DPM-Solver++ 3M", "dpm++3m", "linspace"),
    ("DPM-Solver++ 2S", "dpm++2s", "linspace"),
    ("DPM-Solver++ 2M, logSNR", "dpm++2m", "uniform_logsnr"),
    ("DPM-Solver++ 2M, Karras", "dpm++2m", "karras"),
    ("UniPC (bh2), linspace→σ_min", "unipc", "linspace/sigma_min"),
    ("DC-Solver (CPR ratios), linspace→σ_min", "dc-solver", "linspace/sigma_min"),
    ("DPM-Solver++ 2M, linspace→σ_min", "dpm++2m", "linspace/sigma_min"),
    ("diffusers DDIM (trailing)", "diffusers:DDIMScheduler", ""),
    ("diffusers Euler", "diffusers:EulerDiscreteScheduler", ""),
    ("diffusers DPM-Solver++ 2M", "diffusers:DPMSolverMultistepScheduler", ""),
    ("diffusers UniPC", "diffusers:UniPCMultistepScheduler", ""),
]


def _stats(extractor: DigitsFeatures, images: torch.Tensor) -> tuple[FeatureStats, torch.Tensor]:
    feats = torch.cat([extractor(images[i : i + 512]) for i in range(0, len(images), 512)])
    return FeatureStats(extractor.dim).update(feats), feats


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
) -> dict[str, Any]:
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
    source = load_model_source(model)
    extractor = DigitsFeatures(load_digits_classifier())
    train_images, _ = load_digits_dataset("train")
    ref, _ = _stats(extractor, to_uint8(train_images))
    test_images, test_labels = load_digits_dataset("test")
    held, held_feats = _stats(extractor, to_uint8(test_images))
    report: dict[str, Any] = {
        "model": model,
        "num_samples": num_samples,
        "guidance_scale": guidance_scale,
        "seed": seed,
        "nfe": nfes,
        "metric": "FD-digits (64-d features of the bundled digits classifier; not FID) vs the 1,438 training digits",
        "held_out": {
            "fd_digits": frechet_distance(held.mu, held.sigma, ref.mu, ref.sigma),
            "class_accuracy": float((extractor.classify(held_feats) == test_labels).float().mean()),
            "num_images": len(test_images),
        },
        "methods": [],
    }
    bar = tqdm(total=len(methods) * len(nfes), desc="eval", disable=not progress)
    for name, solver, schedule in methods:
        row: dict[str, Any] = {
            "name": name,
            "solver": solver,
            "schedule": schedule or "diffusers default",
            "fd_digits": {},
            "class_accuracy": {},
            "seconds": {},
        }
        for nfe in nfes:
            began = time.time()
            try:
                sampler = make_sampler(
                    source, solver, nfe, schedule or "linspace", guidance_scale, seed, batch_size=batch_size
                )
            except OutsideFitError:  # DC-Solver's CPR ratios exist only for the NFEs it was fitted on
                row["fd_digits"][str(nfe)] = row["class_accuracy"][str(nfe)] = row["seconds"][str(nfe)] = None
                bar.update(1)
                continue
            images, labels = sampler(range(num_samples))
            stats, feats = _stats(extractor, images)
            row["fd_digits"][str(nfe)] = frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma)
            row["class_accuracy"][str(nfe)] = float((extractor.classify(feats) == labels).float().mean())
            row["seconds"][str(nfe)] = time.time() - began
            bar.update(1)
        report["methods"].append(row)
    bar.close()
    return report


def _cell(value: float | None) -> str:
    return f"{'—':>9}" if value is None else f"{value:>9.3f}"


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value


def format_table(report: dict[str, Any]) -> str:
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
    return "\n".join(lines)


def write_plot(report: dict[str, Any], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for m in report["methods"]:
        style = "--s" if m["solver"].startswith("diffusers:") else "-o"
        xs = report["nfe"]
        axes[0].plot(xs, [_nan(m["fd_digits"][str(n)]) for n in xs], style, label=m["name"], markersize=4)
        axes[1].plot(xs, [_nan(m["class_accuracy"][str(n)]) for n in xs], style, label=m["name"], markersize=4)
    axes[0].axhline(report["held_out"]["fd_digits"], color="k", linewidth=0.8, linestyle=":", label="held-out digits")
    axes[1].axhline(report["held_out"]["class_accuracy"], color="k", linewidth=0.8, linestyle=":")
    axes[0].set_yscale("log")
    for ax, label in zip(axes, ("FD-digits (lower is better)", "class accuracy")):
        ax.set_xlabel("NFE")
        ax.set_ylabel(label)
        ax.set_xticks(report["nfe"])
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Bundled digits model, {report['num_samples']} samples, guidance {report['guidance_scale']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(report: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(json.dumps(report, indent=2))
