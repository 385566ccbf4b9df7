"""Reward against particles (FK steering) and candidates (SVDD) on the bundled digits model: docs/particles.md.

    python scripts/particles_digits.py --json docs/particles/digits.json --png docs/particles/digits.png
    python scripts/particles_digits.py --samples 40 --steps 10 --json /tmp/particles.json   # a quick look

Unconditional digits (the model's null label) are steered towards the digit 3 by a reward that is not
differentiated: the bundled digits classifier's probability of class 3 (the ``digits-class:3`` reward). FK steering
(Singhal et al. 2025) runs K ∈ {1, 2, 4, 8} particles per sample with the difference potential and λ = 10,
resampling at every step; SVDD-PM (Li et al. 2024) draws M ∈ {1, 2, 4, 8} candidates per step and keeps the one of
highest value (argmax). Both run DDIM with η = 1 on ``--steps`` steps and give ``--samples`` samples per setting
(for FK steering the first particle of each group: after the final resampling every particle is a draw from the
tilted target). K = 1 and M = 1 are the base sampler.

Columns: the mean reward (probability of a 3), the share the classifier labels 3, FD-digits against the 3s of the
training digits, precision and recall against them (k = 3), the diversity (mean pairwise distance) and AvgkNN in
the classifier's 64-d features, the model evaluations per returned sample, and the seconds. The JSON is written
after every setting and settings already in it are skipped, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from diffsamplers import DDIM, sample
from diffsamplers.apps.recipes import parse_guidance
from diffsamplers.apps.registry import load_model
from diffsamplers.apps.tables import resumed_report, versions, write_json
from diffsamplers.data.digits import load_digits_dataset, to_uint8
from diffsamplers.metrics.frechet import FeatureStats, frechet_distance
from diffsamplers.metrics.manifold import average_knn_distance, precision_recall, within_class_diversity
from diffsamplers.metrics.shards import sample_seed
from diffsamplers.rng import NoiseSource
from diffsamplers.schedules import uniform_time

TARGET = 3
COUNTS = (1, 2, 4, 8)


def settings_list(counts: tuple[int, ...]) -> list[tuple[str, str, int]]:
    """(name, guidance spec, particles per sample) of every setting."""
    reward = f"digits-class:{TARGET}"
    rows = [(f"FK steering K={k}", f"fk-steering:k={k},lam=10,reward={reward}", k) for k in counts]
    rows += [(f"SVDD-PM M={m}", f"svdd:m={m},reward={reward}", 1) for m in counts]
    return rows


def draw(bundle: Any, spec: str, per_sample: int, samples: int, steps: int, seed: int) -> tuple[torch.Tensor, int]:
    """``samples`` images (uint8, the first particle of each group) and the model evaluations they took."""
    hooks = parse_guidance(spec).build(bundle)
    rows = samples * per_sample
    seeds = [sample_seed(seed, i) for i in range(rows)]
    cond = {bundle.cond_key: torch.full((rows,), bundle.null_class, dtype=torch.long)}
    calls = 0
    model = bundle.denoiser.model

    def count(module: torch.nn.Module, args: Any, out: Any) -> None:
        nonlocal calls
        calls += int(args[0].shape[0])

    handle = model.register_forward_hook(count)
    try:
        x = sample(
            bundle.denoiser,
            DDIM(eta=1.0),
            uniform_time(bundle.process, steps),
            shape=(rows, *bundle.sample_shape),
            cond=cond,
            guidance=hooks,
            noise=NoiseSource(seeds=seeds),
            batch_size=min(rows, 64 * per_sample),
            progress=False,
        )
    finally:
        handle.remove()
    return to_uint8(x[::per_sample].cpu()), calls // samples


def measure(bundle: Any, images: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Reward, share of 3s, FD-digits, precision/recall, diversity and AvgkNN of ``images`` against the 3s."""
    extractor = bundle.features()
    feats = extractor(images)
    head = extractor.classifier.head
    with torch.no_grad():
        probs = torch.softmax(head(feats.to(head.weight.dtype)), dim=1)[:, TARGET]
    labels = extractor.classify(feats)
    ref_stats = FeatureStats(extractor.dim).update(reference)
    stats = FeatureStats(extractor.dim).update(feats)
    precision, recall = precision_recall(reference, feats, 3)
    return {
        "reward": float(probs.mean()),
        "share_target": float((labels == TARGET).float().mean()),
        "fd_digits": frechet_distance(stats.mu, stats.sigma, ref_stats.mu, ref_stats.sigma),
        "precision": precision,
        "recall": recall,
        "diversity": within_class_diversity(feats, torch.zeros(len(feats), dtype=torch.long)),
        "avg_knn_distance": average_knn_distance(feats, reference, 5),
    }


def format_table(report: dict[str, Any]) -> str:
    heads = ["setting", "reward", f"share of {TARGET}s %", "FD-digits", "precision", "recall", "diversity"]
    heads += ["AvgkNN", "NFE/sample", "seconds"]
    rows = [
        [
            row["name"],
            f"{row['reward']:.3f}",
            f"{100 * row['share_target']:.1f}",
            f"{row['fd_digits']:.2f}",
            f"{row['precision']:.3f}",
            f"{row['recall']:.3f}",
            f"{row['diversity']:.3f}",
            f"{row['avg_knn_distance']:.3f}",
            str(row["evaluations_per_sample"]),
            f"{row['seconds']:.1f}",
        ]
        for row in report["rows"]
    ]
    lines = ["| " + " | ".join(heads) + " |", "|---" * len(heads) + "|"]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


def picture(grids: dict[str, torch.Tensor], path: Path, scale: int = 3) -> None:
    """One labelled row of the first 12 images per setting (the same seeds in every row)."""
    from PIL import Image, ImageDraw

    cell, gap, label = 16 * scale, 2, 130
    width = label + 12 * (cell + gap)
    canvas = Image.new("L", (width, len(grids) * (cell + 2 * gap)), color=255)
    draw = ImageDraw.Draw(canvas)
    for r, (name, images) in enumerate(grids.items()):
        top = r * (cell + 2 * gap)
        draw.text((4, top + cell // 2 - 6), name, fill=0)
        for c, image in enumerate(images[:12, 0]):
            tile = Image.fromarray(image.numpy()).resize((cell, cell), Image.NEAREST)
            canvas.paste(tile, (label + c * (cell + gap), top))
    canvas.save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path("docs/particles/digits.json"))
    parser.add_argument("--png", type=Path, default=None)
    args = parser.parse_args(argv)

    bundle = load_model("digits")
    settings = {"model": "digits", "samples": args.samples, "steps": args.steps, "seed": args.seed, "solver": "ddim"}
    report = resumed_report(args.json, settings)
    done = {row["name"] for row in report["rows"]}
    train_images, train_labels = load_digits_dataset("train")
    reference = bundle.features()(to_uint8(train_images[train_labels == TARGET]))
    grids: dict[str, torch.Tensor] = {}
    for name, spec, per_sample in settings_list(COUNTS):
        if name in done and args.png is None:
            continue
        began = time.time()
        images, evaluations = draw(bundle, spec, per_sample, args.samples, args.steps, args.seed)
        seconds = time.time() - began
        grids[name] = images
        if name in done:
            continue
        row = {"name": name, "spec": spec, **measure(bundle, images, reference)}
        row.update(evaluations_per_sample=evaluations, seconds=seconds)
        report["rows"].append(row)
        report.update(versions=versions(), threads=torch.get_num_threads())
        write_json(report, args.json)
        print(f"{name}: reward {row['reward']:.3f}, {seconds:.0f} s", flush=True)
    if args.png is not None:
        args.png.parent.mkdir(parents=True, exist_ok=True)
        picture(grids, args.png)
    print(format_table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
