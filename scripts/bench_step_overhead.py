"""Per-step scheduler overhead: our loop vs diffusers' schedulers, measured in the same run.

The "model" is a single elementwise kernel (0.1·x), so what is timed is the sampling loop itself:
``set_timesteps``, ``scale_model_input`` and ``step`` for diffusers (as its pipelines call them), and
``diffsamplers.sample`` (plan, denoiser call, solver update) for ours, plus our diffusers adapter driven
like a pipeline. Latents are (B, 4, 64, 64) with Stable Diffusion's β schedule, 25 steps; fp16 on CUDA,
fp32 on the CPU. Reported: median ms per step over repeats, the ratios to diffusers' DPMSolverMultistep
and UniPCMultistep (the baseline of our UniPC / DC-Solver rows), and device→host reads per 25-step run — counted at the dispatcher on every device
(:class:`diffsamplers.diagnostics.HostReadCounter`) and, on CUDA, also with
``torch.cuda.set_sync_debug_mode``.

**Guidance rows** (``guidance_rows`` in the JSON): what each guidance registered in
:data:`diffsamplers.apps.recipes.GUIDANCES` costs per step against unguided sampling, in the same run — the bundled
digits model (fp32; a real network, since guidances differentiate it, anneal its class embedding or run a classifier
beside it), DPM-Solver++ 2M, ``--guidance-steps`` steps, batch ``--guidance-batch``: unguided (classifier-free scale
1), classifier-free guidance at scale 2 (one batched call of twice the rows), and each guidance with that scale
(:data:`GUIDANCE_SPECS`), as ms per step, the factor against unguided and against CFG alone, and host reads per run.
A guidance that cannot be built or run here (e.g. no minority classifier shipped) is listed under
``guidance_skipped`` with the reason.

    python scripts/bench_step_overhead.py                 # CPU, and CUDA when present
    python scripts/bench_step_overhead.py --device cpu --batch 1 16 --json out/bench.json
    OMP_NUM_THREADS=1 python scripts/bench_step_overhead.py --device cpu --guidance-only   # the guidance rows
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
    loops: dict[str, Callable[[torch.Tensor], torch.Tensor]],
    latents: torch.Tensor,
    repeats: int,
    steps: int = STEPS,
    warmup: int = 2,
) -> dict[str, float]:
    """Median ms per step of each loop (``steps`` steps a run); the loops take turns so that machine noise hits all
    alike."""
    sync = torch.cuda.synchronize if latents.device.type == "cuda" else (lambda: None)
    for fn in loops.values():
        for _ in range(warmup):
            fn(latents)
    sync()
    times: dict[str, list[float]] = {label: [] for label in loops}
    for _ in range(repeats):
        for label, fn in loops.items():
            start = time.perf_counter()
            fn(latents)
            sync()
            times[label].append(time.perf_counter() - start)
    return {label: statistics.median(t) / steps * 1e3 for label, t in times.items()}


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


#: The guidance rows' specs (CFG scale 2 with each guidance); a registered guidance not listed runs as ``2+NAME``.
#: self-minority needs its scale w; by default it guides every 5th evaluation, ``k=1`` every one (its worst case).
UNGUIDED, CFG = "1", "2"
GUIDANCE_SPECS: dict[str, list[str]] = {
    "cads": ["2+cads"],
    "minority": ["2+minority"],
    "self-minority": ["2+self-minority:w=0.3", "2+self-minority:w=0.3,k=1"],
    "fk-steering": ["2+fk-steering:k=2,reward=digits-class:3"],
    "fkc": ["fkc:k=2,cfg=2"],
    "svdd": ["2+svdd:m=4,reward=digits-class:3"],
}
#: The guidances that need a stochastic sampler (particles, candidates): their rows run SDE-DPM-Solver++ 2M, which
#: costs what DPM-Solver++ 2M does per step plus one noise draw.
STOCHASTIC_GUIDANCES = ("fk-steering", "fkc", "svdd")


def solver_for(spec: str) -> str:
    """The solver of a guidance row: ``sde-dpm++2m`` for a guidance that needs noise, else ``dpm++2m``."""
    return "sde-dpm++2m" if any(name in spec for name in STOCHASTIC_GUIDANCES) else "dpm++2m"


def guidance_specs() -> list[str]:
    """Unguided, CFG, then the specs of every registered guidance (:data:`GUIDANCE_SPECS`)."""
    from diffsamplers.apps.recipes import GUIDANCES

    return [UNGUIDED, CFG, *(spec for name in GUIDANCES for spec in GUIDANCE_SPECS.get(name, [f"{CFG}+{name}"]))]


def build_guidance_loops(
    device: str, batch: int, steps: int
) -> tuple[dict[str, Callable[[torch.Tensor], torch.Tensor]], dict[str, str]]:
    """The guidance loops by spec, each run once here (its first warm-up), and the specs that could not be built or
    run, with the reason (one line)."""
    from diffsamplers import DPMSolverPlusPlus, sample
    from diffsamplers.apps.recipes import parse_guidance, parse_schedule
    from diffsamplers.apps.registry import load_model
    from diffsamplers.rng import NoiseSource
    from diffsamplers.sampling import initial_noise

    bundle = load_model("digits", device)
    schedule = parse_schedule(bundle.default_schedule).build(bundle.process, steps)
    labels = bundle.labels_for(range(batch))
    x_T = initial_noise(
        bundle.process,
        schedule.sigmas[0],
        (batch, *bundle.sample_shape),
        NoiseSource(seeds=range(batch)),
        device=device,
    )
    loops: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    skipped: dict[str, str] = {}
    for spec in guidance_specs():
        try:
            recipe = parse_guidance(spec)
            scale = 1.0 if recipe.scale is None else recipe.scale
            hooks = recipe.build(bundle)
            cond, uncond = bundle.conditions(labels, scale)

            def run(
                _latents: torch.Tensor, hooks=hooks, cond=cond, uncond=uncond, scale=scale, spec=spec
            ) -> torch.Tensor:
                noise = NoiseSource(seeds=range(batch))  # a guidance's own draws: per-sample streams
                return sample(
                    bundle.denoiser,
                    DPMSolverPlusPlus(2, sde=solver_for(spec) != "dpm++2m"),
                    schedule,
                    x_T=x_T,
                    cond=cond,
                    uncond=uncond,
                    guidance_scale=scale,
                    guidance=hooks,
                    noise=noise,
                    progress=False,
                )

            run(x_T)
        except Exception as err:  # a guidance that cannot run here is reported, not fatal
            skipped[spec] = " ".join(f"{type(err).__name__}: {err}".split())
            continue
        loops[spec] = run
    return loops, skipped


def measure_guidance(device: str, batch: int, steps: int, repeats: int) -> tuple[list[dict], list[dict]]:
    """One row per guidance spec on ``device`` (printed as a table): ms per step, the factors against unguided
    sampling and against CFG alone, host reads per run (and on CUDA synchronising calls per run); and the specs
    skipped, with the reason."""
    loops, skipped = build_guidance_loops(device, batch, steps)
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    print(f"\n## guidance on {device} ({name}): digits model, fp32, DPM-Solver++ 2M, {steps} steps, batch {batch}")
    header = f"{'guidance spec':<34}{'ms/step':>10}{'vs unguided':>13}{'vs CFG 2':>10}{'host reads/run':>16}"
    print(header + (f"{'CUDA syncs/run':>16}" if device == "cuda" else ""))
    x = torch.zeros(1, device=device)  # the loops carry their own noises
    times = _time_all(loops, x, repeats, steps=steps, warmup=1)
    rows = []
    for spec, fn in loops.items():
        ms = times[spec]
        base, cfg = times.get(UNGUIDED), times.get(CFG)
        row = {
            "device": device,
            "device_name": name,
            "spec": spec,
            "model": "digits",
            "solver": solver_for(spec),
            "steps": steps,
            "batch": batch,
            "ms_per_step": ms,
            "ratio_vs_unguided": None if base is None else ms / base,
            "ratio_vs_cfg": None if cfg is None else ms / cfg,
            "host_reads_per_run": _host_reads(fn, x),
        }
        ratios = "".join(
            f"{'—' if r is None else f'{r:.2f}':>{w}}"
            for r, w in ((row["ratio_vs_unguided"], 13), (row["ratio_vs_cfg"], 10))
        )
        label = spec + {UNGUIDED: " (unguided)", CFG: " (CFG)"}.get(spec, "")
        line = f"{label:<34}{ms:>10.2f}{ratios}{row['host_reads_per_run']:>16d}"
        if device == "cuda":
            row["cuda_syncs_per_run"] = _cuda_syncs(fn, x)
            line += f"{row['cuda_syncs_per_run']:>16d}"
        print(line)
        rows.append(row)
    for spec, reason in skipped.items():
        print(f"{spec:<34} skipped: {reason}")
    return rows, [{"device": device, "spec": spec, "reason": reason} for spec, reason in skipped.items()]


def main(argv: list[str] | None = None) -> None:
    import diffusers

    import diffsamplers

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", nargs="+", default=None, help="devices (default: cpu, and cuda if present)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", default=None)
    parser.add_argument("--guidance-batch", type=int, default=16, help="batch of the guidance rows")
    parser.add_argument("--guidance-steps", type=int, default=10, help="sampling steps of the guidance rows")
    parser.add_argument("--guidance-repeats", type=int, default=5, help="repeats of the guidance rows")
    parser.add_argument("--no-guidance", action="store_true", help="leave out the guidance rows")
    parser.add_argument("--guidance-only", action="store_true", help="only the guidance rows")
    args = parser.parse_args(argv)
    devices = args.device or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))

    if args.no_guidance and args.guidance_only:
        parser.error("--no-guidance and --guidance-only leave nothing to measure")
    loops = build_loops()
    rows = (
        [] if args.guidance_only else [r for d in devices for r in measure_device(d, args.batch, args.repeats, loops)]
    )
    guidance_rows: list[dict] = []
    guidance_skipped: list[dict] = []
    for device in [] if args.no_guidance else devices:
        measured, skipped = measure_guidance(device, args.guidance_batch, args.guidance_steps, args.guidance_repeats)
        guidance_rows += measured
        guidance_skipped += skipped
    meta = {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "diffsamplers": diffsamplers.__version__,
        "steps": None if args.guidance_only else STEPS,
        "repeats": None if args.guidance_only else args.repeats,
        "guidance": None
        if args.no_guidance
        else {"steps": args.guidance_steps, "batch": args.guidance_batch, "repeats": args.guidance_repeats},
    }
    print(f"\n{json.dumps(meta)}")
    if args.json:
        with open(args.json, "w") as f:
            data = {"meta": meta, "rows": rows, "guidance_rows": guidance_rows, "guidance_skipped": guidance_skipped}
            json.dump(data, f, indent=2)


if __name__ == "__main__":
    main()
