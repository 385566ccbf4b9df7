"""SVDD and FK steering on the bundled text model: the reward against M candidates and K particles, and its cost.

    python scripts/text_guidance.py --json docs/masked/text_guidance.json

The first-hitting sampler with 4 tokens per model call (32 calls for 128 characters) draws ``--samples`` texts per
setting, steered towards digits by the reward ``text-chars:digit`` (the share of a text's characters that are
digits): SVDD-PM (Li et al. 2024) with M ∈ {1, 2, 4, 8} candidates per step (argmax), and FK steering (Singhal et
al. 2025) with K ∈ {1, 2, 4, 8} particles per sample (λ = 300, difference potential, every step; the first particle
of each group). Columns: the mean reward, the 5-gram bits per character of the texts (the corpus's n-gram: how
text-like they stay), the model calls per batch, the rows those calls evaluate per returned sample, and the seconds.
M = 1 and K = 1 are the plain sampler. The JSON is written after every setting; settings in it are skipped.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from diffsamplers.apps.registry import load_model
from diffsamplers.apps.tables import resumed_report, versions, write_json
from diffsamplers.apps.text_jobs import sample_text
from diffsamplers.metrics.ngram import reference_ngram

REWARD = "text-chars:digit"
SAMPLER = "first-hitting:k=4"


def settings_list(counts: list[int]) -> list[tuple[str, str, int]]:
    """(name, guidance spec, particles per returned sample) of every setting."""
    rows = [(f"SVDD-PM M={m}", f"svdd:m={m},reward={REWARD}", 1) for m in counts]
    rows += [(f"FK steering K={k}", f"fk-steering:k={k},lam=300,reward={REWARD}", k) for k in counts]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path("docs/masked/text_guidance.json"))
    args = parser.parse_args(argv)

    bundle = load_model("text", masked_ok=True)
    ngram = reference_ngram()
    settings = {"model": "text", "sampler": SAMPLER, "reward": REWARD, "samples": args.samples, "seed": args.seed}
    report = resumed_report(args.json, settings)
    done = {row["name"] for row in report["rows"]}
    for name, spec, per_sample in settings_list(args.counts):
        if name in done:
            continue
        rows = args.samples * per_sample
        began = time.perf_counter()
        texts, calls, _ = sample_text(bundle, SAMPLER, 0, rows, args.seed, guidance=spec)
        seconds = time.perf_counter() - began
        kept = texts[::per_sample]
        m = int(spec.split("m=")[1].split(",")[0]) if spec.startswith("svdd") else 1
        row: dict[str, Any] = {
            "name": name,
            "spec": spec,
            "reward": sum(  # the digit share of the returned texts (the reward, recomputed from them)
                sum(c.isdigit() for c in t) / len(t) for t in kept
            )
            / len(kept),
            "ngram_bits_per_char": ngram.bits_per_char(kept),
            "model_calls": calls,
            "rows_per_sample": calls * max(per_sample, m),  # each call evaluates K or M rows per returned sample
            "seconds": seconds,
            "example": kept[0],
        }
        report["rows"].append(row)
        report.update(versions=versions(), threads=torch.get_num_threads())
        write_json(report, args.json)
        print(f"{name}: reward {row['reward']:.3f}, {seconds:.0f} s", flush=True)
    print(format_table(report))
    return 0


def format_table(report: dict[str, Any]) -> str:
    lines = [
        "| setting | digit share | 5-gram bits/char | model calls | rows evaluated per sample | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['name']} | {row['reward']:.3f} | {row['ngram_bits_per_char']:.3f} | {row['model_calls']} | "
            f"{row['rows_per_sample']} | {row['seconds']:.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
