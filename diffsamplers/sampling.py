"""The sampling loop: a denoiser, a solver and a schedule, run over a batch of any size.

The loop precomputes the solver plan on the host, then takes every step through the one step function
(:mod:`diffsamplers.step`): per model evaluation the network call and the solver's few fused tensor ops — no
value is read back to the host until the end of a chunk, where one read checks the model outputs for NaN/Inf
and names the first bad step. Sampling builds no autograd graph unless asked (``enable_grad=True``), or unless
a guidance needs the gradient of x̂0 (and then only inside that step).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from .denoiser import Denoiser, cond_batch_size, slice_cond
from .noise import NoiseProcess
from .rng import NoiseSource
from .schedules.schedule import Schedule
from .schedules.spacing import check_num_steps, default_schedule
from .solvers.base import Solver
from .step import Guidance, NonFiniteError, SamplingRun, StepInfo, as_guidance, integrate

__all__ = ["sample", "initial_noise", "model_device", "NonFiniteError", "StepInfo"]


def initial_noise(
    process: NoiseProcess,
    sigma: float,
    shape: Sequence[int],
    noise: NoiseSource | int,
    *,
    start: int = 0,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """x_T for rows ``start … start + shape[0] − 1`` of a run that starts at noise level σ̃ = ``sigma``.

    N(0, I) scaled by the process's ``init_noise_sigma`` at that level (1 for VP and flow models, σ̃ for VE
    models). ``noise`` is a :class:`NoiseSource` or an integer seed (one generator for the batch). Every
    sampler, reference and table in the package draws its initial noise here.
    """
    source = (
        noise if isinstance(noise, NoiseSource) else NoiseSource(generator=torch.Generator().manual_seed(int(noise)))
    )
    shape = tuple(int(s) for s in shape)
    device = torch.device(device) if device is not None else torch.device("cpu")
    x = source.draw(start, start + shape[0], shape[1:], device, dtype)
    scale = process.init_noise_sigma(float(sigma))
    return x if scale == 1.0 else x * scale


def model_device(denoiser: Denoiser) -> torch.device:
    """The device of the denoiser's network (its first parameter or buffer), else the CPU."""
    model = denoiser.model
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
        for b in model.buffers():
            return b.device
    return torch.device("cpu")


def _batch_shape(shape: Sequence[int] | None, x_T: torch.Tensor | None) -> tuple[int, ...]:
    if x_T is not None:
        if shape is not None and tuple(shape) != tuple(x_T.shape):
            raise ValueError(f"shape {tuple(shape)} does not match x_T's shape {tuple(x_T.shape)}")
        shape = tuple(x_T.shape)
    if shape is None:
        raise ValueError("give the batch shape (N, ...) or x_T")
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2 or any(s <= 0 for s in shape):
        raise ValueError(f"shape must be (N, *sample_shape) with positive sizes, got {shape}")
    return shape


def _check_request(
    total: int,
    cond: Mapping[str, Any] | None,
    uncond: Mapping[str, Any] | None,
    seeds: Sequence[int] | None,
    batch_size: int | None,
    dtype: torch.dtype,
) -> int:
    """Validate the per-sample inputs against the batch of ``total`` samples; returns the chunk size."""
    if seeds is not None and len(seeds) != total:
        raise ValueError(f"got {len(seeds)} seeds for {total} samples")
    for name, c in (("cond", cond), ("uncond", uncond)):
        b = cond_batch_size(c)
        if b is not None and b not in (1, total):
            raise ValueError(f"{name} has batch size {b} but {total} samples were requested")
    if batch_size is not None and (isinstance(batch_size, bool) or int(batch_size) <= 0):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    return total if batch_size is None else int(batch_size)


def sample(
    denoiser: Denoiser,
    solver: Solver,
    schedule: Schedule | int,
    shape: Sequence[int] | None = None,
    *,
    x_T: torch.Tensor | None = None,
    cond: Mapping[str, Any] | None = None,
    uncond: Mapping[str, Any] | None = None,
    guidance_scale: float | None = None,
    guidance: Guidance | Sequence[Guidance] | None = None,
    generator: torch.Generator | None = None,
    seeds: Sequence[int] | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    output_device: str | torch.device | None = None,
    callback: Callable[[StepInfo], None] | None = None,
    progress: bool = True,
    check_finite: bool = True,
    noise: NoiseSource | None = None,
    enable_grad: bool = False,
) -> torch.Tensor:
    """Draw samples by integrating from noise with ``solver`` on ``schedule``.

    Args:
        denoiser: the model seen as x̂0 = D(x, t, cond); it carries the noise process.
        solver: e.g. ``DPMSolverPlusPlus(order=2)``.
        schedule: a :class:`Schedule`, or a number of steps for the default (uniform-time, ending at σ = 0).
        shape: the full batch shape ``(N, *sample_shape)``, unless ``x_T`` is given.
        x_T: initial noise at the schedule's first level (otherwise drawn by :func:`initial_noise`).
        cond / uncond: model keyword inputs (e.g. ``{"class_labels": y}``); tensors whose first dimension is
            N are split with the batch. ``uncond`` and a guidance scale ≠ 1 enable classifier-free guidance.
        guidance: guidance hooks (:class:`~diffsamplers.step.Guidance`, one or a sequence composed in order).
        generator / seeds: one generator for the batch, or one seed per sample (results then do not depend
            on ``batch_size``).
        batch_size: run the N samples in chunks of this size.
        dtype: the solver's working dtype (float32 by default, float64 for reference runs); the network
            runs in its own dtype.
        output_device: where to gather the results (e.g. ``"cpu"`` for large runs).
        callback: called with a :class:`StepInfo` after every model evaluation.
        check_finite: raise :class:`NonFiniteError` naming the step if the model produces NaN/Inf (one host
            read per chunk, at its end).
        noise: an explicit :class:`NoiseSource` (overrides ``generator``/``seeds``).
        enable_grad: build the autograd graph through the whole run (off by default: sampling keeps no graph).
    """
    process = denoiser.process
    sched = (
        schedule if isinstance(schedule, Schedule) else default_schedule(process, check_num_steps(schedule, process))
    )
    plan = solver.plan(process, sched)
    shape = _batch_shape(shape, x_T)
    total = shape[0]
    chunk = _check_request(total, cond, uncond, seeds, batch_size, dtype)
    hooks = as_guidance(guidance)
    run_device = (
        torch.device(device) if device is not None else (x_T.device if x_T is not None else model_device(denoiser))
    )
    noise = noise if noise is not None else NoiseSource(generator=generator, seeds=seeds)

    outputs = []
    bar = tqdm(total=plan.num_evals * -(-total // chunk), desc=f"sampling ({solver.name})", disable=not progress)
    try:
        with torch.set_grad_enabled(enable_grad):
            for start in range(0, total, chunk):
                stop = min(start + chunk, total)
                if x_T is not None:
                    x = x_T[start:stop].to(device=run_device, dtype=dtype)
                else:
                    x = initial_noise(
                        process,
                        plan.sigmas[0],
                        (stop - start, *shape[1:]),
                        noise,
                        start=start,
                        device=run_device,
                        dtype=dtype,
                    )
                run = SamplingRun.start(
                    solver,
                    plan,
                    x,
                    denoiser=denoiser,
                    cond=slice_cond(cond, start, stop, total),
                    uncond=slice_cond(uncond, start, stop, total),
                    guidance_scale=guidance_scale,
                    guidance=hooks,
                    noise=noise,
                    row_offset=start,
                    callback=callback,
                    check_finite=check_finite,
                )
                out = integrate(run, x, bar.update)
                outputs.append(out if output_device is None else out.to(output_device))
    finally:
        bar.close()
    return torch.cat(outputs, dim=0) if len(outputs) > 1 else outputs[0]
