"""``diffsamplers eval``: FD-digits and class accuracy against NFE for several solvers, ours and diffusers'.

All methods sample the same N class-balanced digits (sample i: class i mod 10, its own seed) from the
bundled model; FD-digits is measured against the 1,438 training digits and accuracy by the bundled
classifier. The held-out digits give the floor: FD-digits of 359 real images the model never saw, and the
classifier's accuracy on them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ..data.digits import load_digits_dataset, to_uint8
from ..metrics.fd_digits import digits_features
from ..metrics.features import DigitsFeatures
from ..metrics.frechet import FeatureStats, frechet_distance
from .recipes import OutsideFitError
from .registry import load_model
from .samplers import make_sampler

__all__ = ["DEFAULT_METHODS", "run_eval", "format_table"]

#: (name, solver spec, schedule spec) — a diffusers scheduler runs on its own grid (its config's spacing).
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
    ("diffusers DDIM (trailing)", "diffusers:DDIMScheduler:timestep_spacing=trailing,set_alpha_to_one=true", ""),
    ("diffusers Euler", "diffusers:EulerDiscreteScheduler", "linspace"),
    ("diffusers DPM-Solver++ 2M", "diffusers:DPMSolverMultistepScheduler", "linspace"),
    ("diffusers UniPC", "diffusers:UniPCMultistepScheduler", "linspace"),
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
    bundle = load_model(model)
    extractor = digits_features()
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
                    bundle, solver, nfe, schedule or "linspace", guidance_scale, seed, batch_size=batch_size
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
