"""Train the minority classifier p_ψ(l̃ | x_t, t) of the bundled digits model and write it into the package.

    python scripts/train_minority_classifier.py            # ~5 minutes on 2 busy CPU cores

Um, Lee & Ye, "Don't Play Favorites: Minority Guidance for Diffusion Models", ICLR 2024, Sec. 3.2 and the official
``construct_ms_dataset.py`` / ``classifier_train.py``:

1. the minority score ℓ (Eq. 5) of every training digit under the bundled model, conditioned on its label
   (uniqueness within its class), at normalised time s = 0.6 (the paper's step ≈ 605/1000), averaged over
   ``--draws`` seeded draws, with the digits feature network as d (the LPIPS stand-in on 16×16 digits);
2. L = ``--levels`` equal-frequency levels (Eq. 6): 10 levels of ≈ 144 of the 1,438 digits;
3. a stratified held-out split (``--held-out`` of each level), the rest for training;
4. cross-entropy on x_t = α_t x0 + σ_t ε at t uniform over the 1,000 training steps (the paper's uniform schedule
   sampler), AdamW with weight decay 0.05 and the learning rate annealed linearly to 0;
5. held-out accuracy, accuracy within one level, expected calibration error and the rank correlation of the
   predicted mean level with the score, at several noise levels (fixed noise), and over uniform t;
6. ``diffsamplers/assets/digits_minority/{model.safetensors,config.json}`` with the model id, L, the thresholds,
   the perturbation level, the distance and these metrics.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from diffsamplers.apps.registry import ModelBundle, load_model
from diffsamplers.models.minority_classifier import (
    MinorityClassifier,
    MinorityClassifierInfo,
    default_minority_dir,
    network_id,
    save_minority_classifier,
)
from diffsamplers.tuning.minority import minority_levels, minority_score

#: Normalised times at which the held-out metrics are reported (0 = the data end of the 1000-step table).
REPORT_TIMES = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)


def noise_table(bundle: ModelBundle) -> tuple[torch.Tensor, torch.Tensor]:
    """(α_t, σ_t) at the model's training timesteps 0 … N − 1, float32."""
    process = bundle.process
    t = np.arange(int(process.t_max) + 1, dtype=np.float64)
    alpha, sigma = process.alpha_sigma(process.sigma_tilde(t))
    return torch.as_tensor(alpha, dtype=torch.float32), torch.as_tensor(sigma, dtype=torch.float32)


def noised(x0: torch.Tensor, steps: torch.Tensor, table: tuple[torch.Tensor, torch.Tensor], g: torch.Generator):
    """(x_t, log σ̃_t) of clean ``x0`` at integer training ``steps``."""
    alpha, sigma = table[0][steps], table[1][steps]
    eps = torch.randn(x0.shape, generator=g)
    x_t = alpha.view(-1, 1, 1, 1) * x0 + sigma.view(-1, 1, 1, 1) * eps
    return x_t, torch.log(sigma / alpha)


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) indices with ``fraction`` of each level held out."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    for level in labels.unique().tolist():
        idx = np.flatnonzero(labels.numpy() == level)
        rng.shuffle(idx)
        k = max(1, int(round(fraction * idx.size)))
        held.append(idx[:k])
        train.append(idx[k:])
    return torch.from_numpy(np.sort(np.concatenate(train))), torch.from_numpy(np.sort(np.concatenate(held)))


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE (Guo et al. 2017, Eq. 3): the |accuracy − confidence| gap over equal-width confidence bins."""
    confidence, predicted = probs.max(1)
    correct = (predicted == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            ece += float(inside.double().mean() * (correct[inside].mean() - confidence[inside].double().mean()).abs())
    return ece


@torch.no_grad()
def evaluate(
    model: MinorityClassifier,
    x0: torch.Tensor,
    labels: torch.Tensor,
    scores: torch.Tensor,
    table: tuple[torch.Tensor, torch.Tensor],
    steps: list[int],
    seed: int,
) -> dict[str, float]:
    """Accuracy, accuracy within one level, ECE, NLL and Spearman(E[level], score) at the given steps (pooled)."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    probs, ys, ss = [], [], []
    for step in steps:
        x_t, level = noised(x0, torch.full((len(x0),), step), table, g)
        probs.append(torch.softmax(model(x_t, level), dim=1).double())
        ys.append(labels)
        ss.append(scores)
    p, y, s = torch.cat(probs), torch.cat(ys), torch.cat(ss)
    predicted = p.argmax(1)
    mean_level = (p * torch.arange(p.shape[1], dtype=torch.float64)).sum(1)
    return {
        "accuracy": float((predicted == y).double().mean()),
        "accuracy_within_1": float(((predicted - y).abs() <= 1).double().mean()),
        "ece": expected_calibration_error(p, y),
        "nll": float(-torch.log(p[torch.arange(len(y)), y].clamp_min(1e-12)).mean()),
        "spearman_mean_level_vs_score": float(spearmanr(mean_level.numpy(), s.double().numpy())[0]),
    }


def train(
    model: MinorityClassifier,
    x0: torch.Tensor,
    labels: torch.Tensor,
    table: tuple[torch.Tensor, torch.Tensor],
    args: argparse.Namespace,
) -> float:
    """Noisy cross-entropy training (t uniform over the training steps); returns the last 50 iterations' mean loss."""
    g = torch.Generator().manual_seed(args.seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - i / args.iterations)
    num_steps, losses, start = table[0].numel(), [], time.time()
    for it in range(args.iterations):
        model.train()
        idx = torch.randint(0, len(x0), (args.batch_size,), generator=g)
        x_t, level = noised(x0[idx], torch.randint(0, num_steps, (args.batch_size,), generator=g), table, g)
        loss = F.cross_entropy(model(x_t, level), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (it + 1) % 100 == 0:
            print(f"iteration {it + 1:5d}  loss {np.mean(losses[-100:]):.4f}  ({time.time() - start:.0f} s)")
    return float(np.mean(losses[-50:]))


def report(model, split: dict[str, Any], table, num_steps: int, seed: int) -> dict[str, Any]:
    """Held-out metrics at :data:`REPORT_TIMES` and over a uniform grid of 20 steps; train accuracy at t = 0."""
    x, y, s = split["held_x"], split["held_y"], split["held_s"]
    per_time = {f"{t:g}": evaluate(model, x, y, s, table, [round(t * (num_steps - 1))], seed) for t in REPORT_TIMES}
    uniform = evaluate(model, x, y, s, table, np.linspace(0, num_steps - 1, 20).round().astype(int).tolist(), seed)
    train_t0 = evaluate(model, split["train_x"], split["train_y"], split["train_s"], table, [0], seed)
    return {"held_out": {"by_time": per_time, "uniform_t": uniform}, "train_accuracy_t0": train_t0["accuracy"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="digits")
    parser.add_argument("--levels", type=int, default=10)
    parser.add_argument("--time", type=float, default=0.6, help="normalised perturbation time s of the score")
    parser.add_argument("--draws", type=int, default=10, help="Monte-Carlo draws of the score")
    parser.add_argument("--distance", default="features", help="l2, features or lpips")
    parser.add_argument("--held-out", type=float, default=0.15)
    parser.add_argument("--iterations", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--width", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="default: the model folder's sibling <name>_minority")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    bundle = load_model(args.model)
    x, y = bundle.data
    start = time.time()
    scores = minority_score(
        bundle.denoiser, x, time=args.time, num_draws=args.draws, distance=args.distance, seed=args.seed,
        cond={bundle.cond_key: y} if bundle.num_classes else None,
    )  # fmt: skip
    labels, thresholds = minority_levels(scores, args.levels)
    print(f"scored {len(x)} samples in {time.time() - start:.0f} s; thresholds {np.round(thresholds.numpy(), 3)}")
    train_idx, held_idx = stratified_split(labels, args.held_out, args.seed)
    split = {
        "train_x": x[train_idx], "train_y": labels[train_idx], "train_s": scores[train_idx],
        "held_x": x[held_idx], "held_y": labels[held_idx], "held_s": scores[held_idx],
    }  # fmt: skip
    table = noise_table(bundle)
    model = MinorityClassifier(args.levels, x.shape[1], x.shape[-1], width=args.width)
    final_loss = train(model, split["train_x"], split["train_y"], table, args)
    metrics = report(model, split, table, table[0].numel(), args.seed + 2)
    metrics.update(
        final_train_loss=final_loss, num_train=len(train_idx), num_held_out=len(held_idx),
        iterations=args.iterations, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        seed=args.seed, seconds=round(time.time() - start, 1), chance_accuracy=1.0 / args.levels,
        score_mean=float(scores.mean()), score_std=float(scores.std()),
    )  # fmt: skip
    info = MinorityClassifierInfo(
        model=bundle.name,
        model_id=network_id(bundle.denoiser.model),
        num_levels=args.levels,
        thresholds=tuple(float(v) for v in thresholds),
        time=args.time,
        num_draws=args.draws,
        distance=args.distance,
        metrics=metrics,
    )
    if args.output is None and bundle.folder is None:
        raise SystemExit(f"model {bundle.name!r} has no folder: pass --output")
    out = save_minority_classifier(model, args.output or default_minority_dir(bundle.folder), info)
    held = metrics["held_out"]
    print(
        f"wrote {out}: held-out accuracy at t=0 {held['by_time']['0']['accuracy']:.3f} "
        f"(within one level {held['by_time']['0']['accuracy_within_1']:.3f}, ECE {held['by_time']['0']['ece']:.3f}), "
        f"over uniform t {held['uniform_t']['accuracy']:.3f}; chance {1 / args.levels:.3f}"
    )


if __name__ == "__main__":
    main()
