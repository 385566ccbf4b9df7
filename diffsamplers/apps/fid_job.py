"""One sampler configuration → N images in shards → Fréchet distance (and class accuracy for digits).

This is ``scripts/eval_fid.py`` and ``diffsamplers fid``. It runs on one process or many, with accelerate::

    python scripts/eval_fid.py --model digits --solver dpm++2m --steps 20 --num-samples 10000 --output runs/dpm20
    accelerate launch scripts/eval_fid.py ...                  # all GPUs of a machine (or several machines)
    torchrun --nproc_per_node 2 scripts/eval_fid.py ...        # several CPU processes

Every sample index has its own seed, so the images are the same for any number of processes; finished
shards survive an interruption and a rerun with the same arguments resumes (see
:mod:`diffsamplers.metrics.shards`). Metrics: ``fd-digits`` (the bundled digits feature network — not
FID), ``fid`` (torchmetrics' FID Inception, weights from ``--inception-weights`` or the torch hub cache,
``antialias=False``, rounded uint8 images), or ``module:pkg.mod:factory`` (any network ``factory()`` that maps
uint8 images to features).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
from pathlib import Path
from typing import Any

import torch

from ..data.digits import load_digits_dataset, to_uint8
from ..metrics.features import DigitsFeatures, InceptionFeatures, ModuleFeatures
from ..metrics.frechet import FeatureStats, frechet_distance, load_stats, save_stats
from ..metrics.shards import ShardRun
from .arguments import (
    CommandParser,
    add_output,
    add_sampler_arguments,
    integer,
    output_file,
    output_folder,
    run_command,
    set_command,
)
from .registry import load_model
from .samplers import make_sampler

__all__ = ["build_parser", "run", "run_and_report", "main", "make_extractor"]


def make_extractor(metric: str, inception_weights: str | None, device: str | torch.device) -> Any:
    from ..models.digits import load_digits_classifier

    if metric == "fd-digits":
        return DigitsFeatures(load_digits_classifier(device=device))
    if metric == "fid":
        return InceptionFeatures(inception_weights, device=device)
    if metric.startswith("module:"):
        target = metric[len("module:") :]
        module_name, _, attr = target.partition(":")
        if not attr:
            raise ValueError(f"--metric module:<python.module>:<factory>, got {metric!r}")
        factory = getattr(importlib.import_module(module_name), attr)
        return ModuleFeatures(factory().to(device), name=target)
    raise ValueError(f"unknown metric {metric!r}: expected 'fd-digits', 'fid' or 'module:pkg.mod:factory'")


def reference_stats(args: argparse.Namespace, extractor: Any) -> tuple[Any, Any, str] | None:
    """The reference (μ, Σ): from ``--ref-stats``, or the digits training images for the digits model."""
    if args.ref_stats and Path(args.ref_stats).exists():
        mu, sigma, meta = load_stats(args.ref_stats)
        return mu, sigma, f"{args.ref_stats} ({meta.get('source', 'unknown source')})"
    if args.model != "digits":
        if args.ref_stats:
            raise FileNotFoundError(f"reference statistics not found: {args.ref_stats}")
        return None
    images, _ = load_digits_dataset("train")
    stats = FeatureStats(extractor.dim)
    for start in range(0, len(images), 512):
        stats.update(extractor(to_uint8(images[start : start + 512])))
    if args.ref_stats:  # asked for a file that does not exist yet: write it for next time
        save_stats(args.ref_stats, stats.mu, stats.sigma, stats.n, source="digits train split", metric=args.metric)
    return stats.mu, stats.sigma, "digits train split (1,438 images)"


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    """Run the job; returns the result on the main process (None on the others)."""
    from accelerate import PartialState

    state = PartialState(cpu=args.device == "cpu" or not torch.cuda.is_available())
    device = args.device or state.device
    bundle = load_model(args.model, device)
    extractor = make_extractor(args.metric, args.inception_weights, device)
    classes = [int(c) for c in args.classes.split(",")] if args.classes else None
    config = {
        "model": str(args.model),
        "solver": args.solver,
        "steps": args.steps,
        "schedule": args.schedule or bundle.default_schedule,
        "guidance_scale": args.guidance,
        "seed": args.seed,
        "classes": classes,
        "metric": args.metric,
    }
    shards = ShardRun(Path(args.out), args.num_samples, args.shard_size, config)
    sampler = make_sampler(
        bundle, args.solver, args.steps, args.schedule, args.guidance, args.seed, classes, args.batch_size
    )
    shards.generate(sampler, extractor, state.process_index, state.num_processes, progress=not args.quiet)
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    stats = shards.feature_stats()
    result: dict[str, Any] = {**config, "num_samples": stats.n, "out": str(args.out)}
    if args.save_stats:
        save_stats(args.save_stats, stats.mu, stats.sigma, stats.n, source=json.dumps(config), metric=args.metric)
    ref = reference_stats(args, extractor)
    if ref is not None:
        result["frechet_distance"] = frechet_distance(stats.mu, stats.sigma, ref[0], ref[1])
        result["reference"] = ref[2]
    if isinstance(extractor, DigitsFeatures) and bundle.num_classes:
        predicted = extractor.classify(shards.load("features"))
        result["class_accuracy"] = float((predicted == shards.load("labels")).float().mean())
    (Path(args.out) / "result.json").write_text(json.dumps(result, indent=2))
    return result


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The job's arguments on ``parser`` (``diffsamplers fid``), or a parser of its own (``scripts/eval_fid.py``)."""
    p = parser or CommandParser(description="Sample N images in resumable shards and compute a Fréchet distance.")
    add_sampler_arguments(
        p,
        guidance=1.0,
        guidance_help="classifier-free guidance scale of class-conditional models, > 0, 1 = none",
        classes_help="comma-separated class labels to cycle through (default: all classes)",
    )
    p.add_argument("--num-samples", type=integer(2), default=1000, help="samples (at least 2, for a covariance)")
    p.add_argument("--batch-size", type=integer(), default=250, help="samples per network call")
    p.add_argument("--shard-size", type=integer(), default=250, help="samples per shard file")
    p.add_argument("--metric", default="fd-digits", help="fd-digits | fid | module:pkg.mod:factory")
    p.add_argument("--inception-weights", default=None, help="path to the FID Inception weights (.pth)")
    p.add_argument("--ref-stats", default=None, help="reference .npz (mu, sigma); written here if missing for digits")
    p.add_argument("--save-stats", type=output_file(), default=None, help="also write the samples' statistics here")
    add_output(
        p,
        "shard folder (rerun with the same arguments to resume)",
        dest="out",
        alias="--out",
        metavar="FOLDER",
        type=output_folder,
        required=True,
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    set_command(p, run_and_report, outputs=("out", "save_stats"))
    return p


def _check_reference(args: argparse.Namespace) -> None:
    """Fail before sampling when ``--ref-stats`` names no file and the model cannot compute one (only digits can)."""
    if args.ref_stats and args.model != "digits" and not Path(args.ref_stats).exists():
        raise FileNotFoundError(f"--ref-stats: no such file {args.ref_stats} (only the digits model computes its own)")


def run_and_report(args: argparse.Namespace) -> int:
    _check_reference(args)
    result = run(args)
    if result is not None:
        fd = result.get("frechet_distance", math.nan)
        acc = result.get("class_accuracy")
        print(
            f"{args.metric}: {fd:.4f}"
            + ("" if acc is None else f"   class accuracy: {acc:.4f}")
            + f"   ({result['num_samples']} samples)"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    """``scripts/eval_fid.py``: the exit status (2: bad input, reported in one line)."""
    return run_command(build_parser(), argv)
