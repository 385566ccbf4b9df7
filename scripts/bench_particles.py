"""Batched particles and candidates against sequential runs, measured in the same run: docs/particles.md's speed rows.

    python scripts/bench_particles.py --device cpu --json docs/particles/bench_cpu.json
    python scripts/bench_particles.py --device cuda --json docs/gpu/bench_particles.json   # scripts/gpu_report.py

On the bundled digits model, DDIM η = 1, ``--steps`` steps, ``--groups`` samples (1 by default: one prompt):

* **particles** — FK steering with K particles per sample in one batch of groups·K rows, against K sequential
  runs of the same sampler with one particle per sample (FK steering at K = 1: the same reward evaluations, on
  groups rows). The speed-up is K·t(K = 1) / t(K): K when the K particles cost one run, 1 when batching gains
  nothing. The target on a GPU is ≥ 0.8·K at K = 8.
* **candidates** — SVDD-PM with M candidates per step valued in one batched model call of groups·M rows, against the
  same sampler valuing them in M calls of groups rows (``chunk=groups``): the same draws, the same selections, the
  same samples. Speed-up t(M calls) / t(one call). (At M = 1 SVDD is the base sampler: no value call.)

Each time is the median of ``--repeats`` runs after a warm-up; CUDA is synchronised around each run. The reward is
the digits classifier's probability of a 3 (``digits-class:3``), the same in both arms.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from diffsamplers import DDIM, sample
from diffsamplers.apps.recipes import parse_guidance
from diffsamplers.apps.registry import load_model
from diffsamplers.apps.tables import versions, write_json
from diffsamplers.rng import NoiseSource
from diffsamplers.schedules import uniform_time

REWARD = "digits-class:3"


def run_time(bundle: Any, spec: str, rows: int, steps: int, device: torch.device, repeats: int) -> float:
    """Median seconds of one sampling run of ``rows`` rows under the guidance ``spec``."""
    hooks = parse_guidance(spec).build(bundle)
    cond = {bundle.cond_key: torch.full((rows,), bundle.null_class, dtype=torch.long, device=device)}
    schedule = uniform_time(bundle.process, steps)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def once(seed: int) -> None:
        sample(
            bundle.denoiser,
            DDIM(eta=1.0),
            schedule,
            shape=(rows, *bundle.sample_shape),
            cond=cond,
            guidance=hooks,
            noise=NoiseSource(seeds=[seed * 100_003 + i for i in range(rows)]),
            device=device,
            progress=False,
        )

    once(0)
    times = []
    for r in range(repeats):
        sync()
        began = time.perf_counter()
        once(r + 1)
        sync()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def measure(device: str, counts: list[int], groups: int, steps: int, repeats: int) -> dict[str, Any]:
    """The two tables' rows: per count, the batched time, the sequential time and their ratio."""
    dev = torch.device(device)
    bundle = load_model("digits", device=dev) if device != "cpu" else load_model("digits")
    report: dict[str, Any] = {
        "settings": {"device": device, "groups": groups, "steps": steps, "repeats": repeats, "reward": REWARD},
        "particles": [],
        "candidates": [],
    }
    single_k = run_time(bundle, f"fk-steering:k=1,reward={REWARD}", groups, steps, dev, repeats)
    for n in counts:
        batched = run_time(bundle, f"fk-steering:k={n},reward={REWARD}", groups * n, steps, dev, repeats)
        report["particles"].append(
            {"K": n, "batched_s": batched, "sequential_s": n * single_k, "speedup": n * single_k / batched}
        )
        batched = run_time(bundle, f"svdd:m={n},reward={REWARD}", groups, steps, dev, repeats)
        calls = run_time(bundle, f"svdd:m={n},reward={REWARD},chunk={groups}", groups, steps, dev, repeats)
        report["candidates"].append({"M": n, "batched_s": batched, "sequential_s": calls, "speedup": calls / batched})
        print(
            f"K = M = {n}: particles ×{report['particles'][-1]['speedup']:.2f}, "
            f"candidates ×{report['candidates'][-1]['speedup']:.2f}",
            flush=True,
        )
    report.update(versions=versions(), threads=torch.get_num_threads())
    if dev.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(dev)
    return report


def format_table(report: dict[str, Any]) -> str:
    heads = "| count | K particles: batched s | K sequential runs s | speed-up | M candidates: one call s | M calls s | speed-up |"
    lines = [heads, "|---" * 7 + "|"]
    for p, c in zip(report["particles"], report["candidates"], strict=True):
        lines.append(
            f"| {p['K']} | {p['batched_s']:.3f} | {p['sequential_s']:.3f} | ×{p['speedup']:.2f} "
            f"| {c['batched_s']:.3f} | {c['sequential_s']:.3f} | ×{c['speedup']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--groups", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    report = measure(args.device, args.counts, args.groups, args.steps, args.repeats)
    if args.json is not None:
        write_json(report, args.json)
    print(format_table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
