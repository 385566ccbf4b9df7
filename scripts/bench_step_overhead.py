"""Per-step scheduler overhead: our loop vs diffusers' schedulers, measured in the same run.

The "model" is a single elementwise kernel (0.1·x), so what is timed is the sampling loop itself:
``set_timesteps``, ``scale_model_input`` and ``step`` for diffusers (as its pipelines call them), and
``diffsamplers.sample`` (plan, denoiser call, solver update) for ours, plus our diffusers adapter driven
like a pipeline. Latents are (B, 4, 64, 64) with Stable Diffusion's β schedule, 25 steps; fp16 on CUDA,
fp32 on the CPU. Reported: median ms per step over repeats, the ratios to diffusers' DPMSolverMultistep
and UniPCMultistep (the baseline of our UniPC / DC-Solver rows), and device→host reads per 25-step run — counted at the dispatcher on every device
(:class:`diffsamplers.diagnostics.HostReadCounter`) and, on CUDA, also with
``torch.cuda.set_sync_debug_mode``.

    python scripts/bench_step_overhead.py                 # CPU, and CUDA when present
    python scripts/bench_step_overhead.py --device cpu --batch 1 16 --json out/bench.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
STEPS = 25


def _diffusers_loop(cls: type, **config) -> Callable[[torch.Tensor], torch.Tensor]:
    sched = cls(**SD, **config)

    def run(latents: torch.Tensor) -> torch.Tensor:
        sched.set_timesteps(STEPS, device=latents.device)
        x = latents * sched.init_noise_sigma
        for t in sched.timesteps:
            inp = sched.scale_model_input(x, t)
            x = sched.step(0.1 * inp, t, x).prev_sample
        return x

    return run


#: Compensation ratios for the timing rows (any values ≠ 1 cost the same); the first two steps use 1.
DC_RATIOS = [1.0, 1.0] + [1.05] * (STEPS - 2)


def _our_loop(order: int = 2, check_finite: bool = True, solver=None) -> Callable[[torch.Tensor], torch.Tensor]:
    from diffsamplers import Denoiser, DiscreteVP, DPMSolverPlusPlus, sample
    from diffsamplers.schedules import diffusers_spacing

    process = DiscreteVP.from_beta_schedule(**SD)
    denoiser = Denoiser(lambda x, t: 0.1 * x, process, "epsilon")
    solver = DPMSolverPlusPlus(order) if solver is None else solver
    schedule = diffusers_spacing(process, STEPS)

    def run(latents: torch.Tensor) -> torch.Tensor:
        return sample(
            denoiser, solver, schedule, x_T=latents, dtype=torch.float32, progress=False, check_finite=check_finite
        ).to(latents.dtype)

    return run


def _time_all(
    loops: dict[str, Callable[[torch.Tensor], torch.Tensor]], latents: torch.Tensor, repeats: int
) -> dict[str, float]:
    """Median ms per step of each loop; the loops take turns so that machine noise hits all alike."""
    sync = torch.cuda.synchronize if latents.device.type == "cuda" else (lambda: None)
    for fn in loops.values():
        for _ in range(2):
            fn(latents)
    sync()
    times: dict[str, list[float]] = {label: [] for label in loops}
    for _ in range(repeats):
        for label, fn in loops.items():
            start = time.perf_counter()
            fn(latents)
            sync()
            times[label].append(time.perf_counter() - start)
    return {label: statistics.median(t) / STEPS * 1e3 for label, t in times.items()}


def _host_reads(fn: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor) -> int:
    from diffsamplers.diagnostics import HostReadCounter

    with HostReadCounter(latents.device.type) as counter:
        fn(latents)
    return counter.total


def _cuda_syncs(fn: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor) -> int:
    from diffsamplers.diagnostics import count_cuda_syncs

    return count_cuda_syncs(lambda: fn(latents))[1]


#: The loops every ratio is taken against.
BASELINE, UNIPC_BASELINE = "diffusers DPMSolverMultistepScheduler", "diffusers UniPCMultistepScheduler"


def build_loops() -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The timed loops by label: ours (``sample()`` and our schedulers) and diffusers' schedulers."""
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler

    from diffsamplers import DCSolver, DCSolverScheduler, DPMSolverPlusPlusScheduler, UniPC

    return {
        "diffsamplers sample(), DPM-Solver++ 2M": _our_loop(2),
        "diffsamplers sample(), 2M, check_finite=False": _our_loop(2, check_finite=False),
        "diffsamplers sample(), DPM-Solver++ 3M": _our_loop(3),
        "diffsamplers DPMSolverPlusPlusScheduler (pipeline-style)": _diffusers_loop(DPMSolverPlusPlusScheduler),
        "diffusers DPMSolverMultistepScheduler": _diffusers_loop(DPMSolverMultistepScheduler),
        "diffsamplers sample(), UniPC (bh2, order 2)": _our_loop(solver=UniPC(2, "bh2")),
        "diffsamplers sample(), DC-Solver (UniPC bh2, 2)": _our_loop(solver=DCSolver(DC_RATIOS, UniPC(2, "bh2"))),
        "diffsamplers sample(), DC-Solver, check_finite=False": _our_loop(
            check_finite=False, solver=DCSolver(DC_RATIOS, UniPC(2, "bh2"))
        ),
        "diffsamplers DCSolverScheduler, ratios 1 (= UniPC)": _diffusers_loop(DCSolverScheduler),
        "diffsamplers DCSolverScheduler, DC ratios": _diffusers_loop(DCSolverScheduler, dc_ratios=DC_RATIOS),
        "diffusers UniPCMultistepScheduler": _diffusers_loop(UniPCMultistepScheduler),
        "diffusers EulerDiscreteScheduler": _diffusers_loop(EulerDiscreteScheduler),
    }


def measure_device(
    device: str,
    batches: list[int],
    repeats: int,
    loops: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> list[dict]:
    """One row per loop on ``device`` (printed as a table): ms/step per batch, the ratios to diffusers'
    DPMSolverMultistep and UniPCMultistep, host reads per run and, on CUDA, synchronising calls per run."""
    loops = build_loops() if loops is None else loops
    dtype = torch.float16 if device == "cuda" else torch.float32
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    print(f"\n## {device} ({name}), {dtype}, {STEPS} steps, latents (B, 4, 64, 64)")
    header = f"{'loop':<58}" + "".join(f"{'ms/step B=' + str(b):>16}{'vs DPM':>8}{'vs UniPC':>9}" for b in batches)
    header += f"{'host reads/run':>16}" + (f"{'CUDA syncs/run':>16}" if device == "cuda" else "")
    print(header)
    results = {}
    for b in batches:
        latents = torch.randn(b, 4, 64, 64, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        for label, ms in _time_all(loops, latents, repeats).items():
            results[(label, b)] = ms
    latents = torch.randn(1, 4, 64, 64).to(device, dtype)
    rows = []
    for label, fn in loops.items():
        line = f"{label:<58}"
        row = {
            "device": device,
            "device_name": name,
            "loop": label,
            "ms_per_step": {},
            "ratio_vs_dpm": {},
            "ratio_vs_unipc": {},
        }
        for b in batches:
            ms = results[(label, b)]
            ratio, ratio_unipc = ms / results[(BASELINE, b)], ms / results[(UNIPC_BASELINE, b)]
            row["ms_per_step"][b], row["ratio_vs_dpm"][b], row["ratio_vs_unipc"][b] = ms, ratio, ratio_unipc
            line += f"{ms:>16.3f}{ratio:>8.2f}{ratio_unipc:>9.2f}"
        row["host_reads_per_run"] = _host_reads(fn, latents)
        line += f"{row['host_reads_per_run']:>16d}"
        if device == "cuda":
            row["cuda_syncs_per_run"] = _cuda_syncs(fn, latents)
            line += f"{row['cuda_syncs_per_run']:>16d}"
        print(line)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    import diffusers

    import diffsamplers

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", nargs="+", default=None, help="devices (default: cpu, and cuda if present)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    devices = args.device or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))

    loops = build_loops()
    rows = [row for device in devices for row in measure_device(device, args.batch, args.repeats, loops)]
    meta = {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "diffsamplers": diffsamplers.__version__,
        "steps": STEPS,
        "repeats": args.repeats,
    }
    print(f"\n{json.dumps(meta)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
