"""Train the bundled character-level masked diffusion language model and write it into the package.

    python scripts/train_text_mdm.py --threads 1     # the bundled settings: 2,500 iterations of 32 windows,
                                                     # ≈ 0.5–0.65 s each on one CPU core → 21–27 minutes
    python scripts/train_text_mdm.py --stop-at 1000  # run up to iteration 1000, checkpoint, exit; rerun to go on

Data: windows of ``--context-length`` characters at random starts in the training split of Python's documentation
text (``pydoc_data.topics``, :mod:`diffsamplers.data.text`; the last 10 % of the topics by key are held out).
Model: :class:`diffsamplers.models.text_mdm.TextMDM`, a time-agnostic bidirectional transformer (no t input;
Zheng et al. 2024, arXiv:2409.02908, Prop. 3.2). Objective: the MDLM continuous-time NELBO with the linear schedule
m(t) = t — one t per sequence from a low-discrepancy grid on [10⁻³, 1], each token masked with probability t, the
cross-entropy of the masked tokens weighted by m'(t)/m(t) = 1/t (Sahoo et al. 2024, arXiv:2406.07524, Eq. 10–11;
Shi et al. 2024, arXiv:2406.04329, Eq. 5; :func:`~diffsamplers.models.text_mdm.mdlm_loss`). AdamW (β = 0.9, 0.99),
linear warm-up then cosine decay to 10 % of the peak learning rate, gradient clipping at 1, one fixed seed for all
draws. Every ``--eval-every`` iterations the held-out NELBO in bits per character is logged (fixed windows and
fixed masks, masked-count form, :func:`~diffsamplers.models.text_mdm.masked_count_nelbo`); at the end it is
measured on every held-out window, next to the order-5 Kneser–Ney n-gram reference
(:func:`diffsamplers.metrics.ngram.reference_ngram`).

A checkpoint (weights, optimiser, random state, log) is written atomically every ``--checkpoint-every`` iterations
(an interruption loses at most that many); a rerun with the same settings resumes from it and reaches the same weights as an uninterrupted
run. The output folder gets ``model.safetensors`` and ``config.json`` (architecture, vocabulary, settings,
metrics); :func:`diffsamplers.models.text_mdm.load_text_mdm` reads it.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from diffsamplers.data.text import fixed_windows, load_text_corpus, random_windows
from diffsamplers.models.text_mdm import TEXT_MDM_DIR, TextMDM, TextMDMConfig, masked_count_nelbo, mdlm_loss
from diffsamplers.models.text_mdm import save_text_mdm as save_model

#: Settings that change the trained weights: a checkpoint made with other values is refused.
RESULT_SETTINGS = (
    "iterations", "batch_size", "lr", "min_lr_ratio", "warmup", "weight_decay", "eps", "seed", "context_length",
    "d_model", "layers", "heads", "mlp_ratio",
)  # fmt: skip
LN2 = math.log(2.0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iterations", type=int, default=2500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final learning rate / peak")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--eps", type=float, default=1e-3, help="smallest training time t")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--context-length", type=int, default=128)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--mlp-ratio", type=int, default=4)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-windows", type=int, default=64, help="held-out windows of the periodic evaluation")
    p.add_argument("--final-eval-draws", type=int, default=2, help="mask draws per held-out window at the end")
    p.add_argument("--ngram-order", type=int, default=5, help="order of the n-gram reference (0: none)")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--stop-at", type=int, default=None, help="stop after this iteration (checkpointed)")
    p.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's; use 1 on a shared machine)"
    )
    p.add_argument("--output", default=str(TEXT_MDM_DIR))
    p.add_argument("--checkpoint", default="out/train_text_mdm_checkpoint.pt", help="resumed from if present")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    for name in ("iterations", "batch_size", "eval_every", "eval_windows", "final_eval_draws", "checkpoint_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    return args


def learning_rate(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up over ``warmup`` iterations, then cosine decay from ``lr`` to ``min_lr_ratio · lr``."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.iterations - args.warmup)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def held_out_bpc(model: TextMDM, windows: torch.Tensor, draws: int, seed: int, batch: int = 64) -> float:
    """Held-out NELBO in bits per character: ``draws`` masked-count estimates per window, masks fixed by ``seed``
    (drawn on the CPU, so the number does not depend on the device)."""
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = 0.0
    for _ in range(draws):
        for i in range(0, len(windows), batch):
            total += float(masked_count_nelbo(model, windows[i : i + batch].to(device), gen).sum())
    model.train(was_training)
    return total / (draws * len(windows)) / LN2


def settings(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in RESULT_SETTINGS}


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    corpus = load_text_corpus()
    config = TextMDMConfig(
        vocab_size=corpus.vocab.size, context_length=args.context_length, d_model=args.d_model,
        n_layers=args.layers, n_heads=args.heads, mlp_ratio=args.mlp_ratio,
    )  # fmt: skip
    torch.manual_seed(args.seed)
    model = TextMDM(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay)
    gen = torch.Generator().manual_seed(args.seed)  # windows, times and masks: all draws of training
    eval_windows = fixed_windows(corpus.held_out, args.context_length, args.eval_windows)
    log: list[dict[str, float]] = []
    start, elapsed = 0, 0.0

    ckpt = Path(args.checkpoint)
    if ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        if state["settings"] != settings(args):
            diff = {
                k: (state["settings"].get(k), v) for k, v in settings(args).items() if state["settings"].get(k) != v
            }
            raise SystemExit(
                f"{ckpt} was made with other settings (checkpoint, now): {diff}; delete it or pass --checkpoint"
            )
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        start, elapsed, log = state["step"], state["elapsed"], state["log"]
        print(f"resumed from {ckpt} at iteration {start}", flush=True)

    def checkpoint(step: int) -> None:
        save_checkpoint(
            ckpt,
            {
                "model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(), "step": step,
                "elapsed": elapsed + time.time() - began, "log": log, "settings": settings(args),
            },
        )  # fmt: skip

    stop = args.iterations if args.stop_at is None else min(args.iterations, args.stop_at)
    began = time.time()
    running, running_n = 0.0, 0
    model.train()
    for step in range(start, stop):
        x0 = random_windows(corpus.train, args.context_length, args.batch_size, gen).to(device)
        loss = mdlm_loss(model, x0, gen, eps=args.eps)  # draws on the CPU generator: the same on any device
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, args)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running, running_n = running + float(loss.detach()), running_n + 1
        done = step + 1
        if done % args.eval_every == 0 or done == args.iterations:
            bpc = held_out_bpc(model, eval_windows, 1, args.seed + 1)
            train_bpc = running / running_n / LN2
            running, running_n = 0.0, 0
            seconds = elapsed + time.time() - began
            log.append({"iteration": done, "train_bpc": train_bpc, "held_out_bpc": bpc, "seconds": seconds})
            print(
                f"iteration {done:6d}  train NELBO {train_bpc:.3f}  held-out NELBO {bpc:.3f} bits/char  "
                f"({seconds:.0f} s)",
                flush=True,
            )
        if done % args.checkpoint_every == 0 or done == stop:
            checkpoint(done)
    if stop < args.iterations:
        print(f"stopped at iteration {stop}; rerun with the same settings to continue from {ckpt}", flush=True)
        return 0

    total_seconds = elapsed + time.time() - began
    all_windows = fixed_windows(corpus.held_out, args.context_length)
    metrics: dict[str, Any] = {
        "held_out_bpc": held_out_bpc(model, all_windows, args.final_eval_draws, args.seed + 2),
        "held_out_windows": len(all_windows),
        "held_out_draws_per_window": args.final_eval_draws,
        "train_seconds": round(total_seconds, 1),
    }
    if args.ngram_order > 0:
        from diffsamplers.data.text import split_text
        from diffsamplers.metrics.ngram import reference_ngram

        metrics[f"ngram{args.ngram_order}_held_out_bpc"] = reference_ngram(args.ngram_order).bits_per_char(
            split_text("held_out")
        )
    model = model.to("cpu").eval()
    metadata = {
        "objective": "MDLM continuous-time NELBO, linear schedule m(t) = t, weight 1/t (Sahoo et al. 2024 Eq. 10-11)",
        "time_conditioned": False,
        "mask_id": model.mask_id,
        "training": {
            **settings(args),
            "held_out_fraction": corpus.held_out_fraction,
            "corpus": "pydoc_data.topics.topics",
            "corpus_fingerprint": corpus.fingerprint,
            "train_chars": corpus.train.numel(),
            "held_out_chars": corpus.held_out.numel(),
            "device": str(device),
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "metrics": metrics,
        "log": log,
    }
    save_model(model, corpus.vocab, args.output, metadata)
    print(
        f"wrote {args.output}: held-out NELBO {metrics['held_out_bpc']:.3f} bits/char after {args.iterations} "
        f"iterations ({total_seconds:.0f} s)",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
