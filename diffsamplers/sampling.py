"""The sampling loop: a denoiser, a solver and a schedule, run over a batch of any size.

The loop precomputes the solver plan on the host, then per model evaluation issues the network call and
the solver's few fused tensor ops — no value is read back to the host until the end of a chunk. Model
outputs are checked for NaN/Inf by writing each step's per-sample sum of x̂0 (one reduction kernel; NaN
and Inf propagate through a sum) into a device buffer that is read once per chunk; the error names the
first bad step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .denoiser import Denoiser, cond_batch_size, slice_cond
from .rng import NoiseSource
from .schedules.schedule import Schedule
from .schedules.spacing import check_num_steps, default_schedule
from .solvers.base import Solver, SolverPlan

__all__ = ["sample", "StepInfo", "NonFiniteError", "run_plan", "model_device"]


class NonFiniteError(FloatingPointError):
    """The model produced NaN or Inf; ``step`` is the 0-based evaluation index where it first happened."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


@dataclass(frozen=True)
class StepInfo:
    """What a callback sees after each model evaluation, before the update (k-diffusion's convention)."""

    step: int
    num_steps: int
    sigma: float
    timestep: float
    x: torch.Tensor
    x0: torch.Tensor
    batch_start: int


def _timesteps_on(plan: SolverPlan, device: torch.device) -> torch.Tensor:
    ts = plan.timesteps
    integral = bool(np.all(ts == np.round(ts)))
    return torch.as_tensor(ts, dtype=torch.int64 if integral else torch.float32).to(device)


def run_plan(
    denoiser: Denoiser,
    solver: Solver,
    plan: SolverPlan,
    x: torch.Tensor,
    noise: NoiseSource,
    *,
    row_offset: int = 0,
    cond: Mapping[str, Any] | None = None,
    uncond: Mapping[str, Any] | None = None,
    guidance_scale: float | None = None,
    callback: Callable[[StepInfo], None] | None = None,
    check_finite: bool = True,
    progress: tqdm | None = None,
) -> torch.Tensor:
    """Integrate one batch ``x`` (at the plan's first noise level) to its final level.

    ``row_offset`` says which row of the whole run this batch starts at, for the noise source and callbacks.
    """
    device = x.device
    start, stop = row_offset, row_offset + x.shape[0]
    timesteps = _timesteps_on(plan, device).unbind(0)  # views, indexed on the host
    alphas, sigmas = plan.alpha_t.tolist(), plan.sigma_t.tolist()
    stochastic = [s.noise != 0.0 for s in plan.steps]
    state = solver.init_state()
    sums = torch.empty((plan.num_evals, x.shape[0]), dtype=x.dtype, device=device) if check_finite else None
    for k in range(plan.num_evals):
        # A solver that moves samples off the grid (per-sample time shift) gives per-sample values here.
        point = solver.evaluation_point(plan, state, k)
        t_k, alpha_k, sigma_k = (timesteps[k], alphas[k], sigmas[k]) if point is None else point
        x0 = denoiser.predict_x0(
            x,
            t_k,
            alpha_k,
            sigma_k,
            cond=cond,
            uncond=uncond,
            guidance_scale=guidance_scale,
        )
        if sums is not None:
            torch.sum(x0.detach().flatten(1), dim=1, out=sums[k])  # detached: sampling may run with grad
        if callback is not None:
            callback(StepInfo(k, plan.num_evals, float(plan.sigmas[k]), float(plan.timesteps[k]), x, x0, start))
        z = noise.draw(start, stop, x.shape[1:], device, x.dtype) if stochastic[k] else None
        x = solver.step(plan, state, k, x, x0, z)
        if progress is not None:
            progress.update(1)
    if sums is not None:
        _raise_if_bad(sums, plan, start)
    return x


def _raise_if_bad(sums: torch.Tensor, plan: SolverPlan, offset: int) -> None:
    finite = torch.isfinite(sums).cpu()  # the one host read of the chunk
    if bool(finite.all()):
        return
    bad_steps, bad_rows = torch.nonzero(~finite, as_tuple=True)
    k = int(bad_steps.min())
    rows = (bad_rows[bad_steps == k] + offset).tolist()
    raise NonFiniteError(
        f"the model produced NaN/Inf at step {k + 1} of {plan.num_evals} (evaluation index {k}, "
        f"sigma={plan.sigmas[k]:.6g}, timestep={plan.timesteps[k]:g}) for {len(rows)} sample(s), "
        f"e.g. rows {rows[:8]}",
        step=k,
    )


def model_device(denoiser: Denoiser) -> torch.device:
    """The device of the denoiser's network (its first parameter or buffer), else the CPU."""
    model = denoiser.model
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
        for b in model.buffers():
            return b.device
    return torch.device("cpu")


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
) -> torch.Tensor:
    """Draw samples by integrating from noise with ``solver`` on ``schedule``.

    Args:
        denoiser: the model seen as x̂0 = D(x, t, cond); it carries the noise process.
        solver: e.g. ``DPMSolverPlusPlus(order=2)``.
        schedule: a :class:`Schedule`, or a number of steps for the default (uniform-time, ending at σ = 0).
        shape: the full batch shape ``(N, *sample_shape)``, unless ``x_T`` is given.
        x_T: initial noise at the schedule's first level (otherwise drawn with std ``init_noise_sigma``).
        cond / uncond: model keyword inputs (e.g. ``{"class_labels": y}``); tensors whose first dimension is
            N are split with the batch. ``uncond`` and a guidance scale ≠ 1 enable classifier-free guidance.
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
    """
    process = denoiser.process
    if isinstance(schedule, Schedule):
        sched = schedule
    else:
        sched = default_schedule(process, check_num_steps(schedule, process))
    plan = solver.plan(process, sched)

    if x_T is not None:
        if shape is not None and tuple(shape) != tuple(x_T.shape):
            raise ValueError(f"shape {tuple(shape)} does not match x_T's shape {tuple(x_T.shape)}")
        shape = tuple(x_T.shape)
    if shape is None:
        raise ValueError("give the batch shape (N, ...) or x_T")
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2 or any(s <= 0 for s in shape):
        raise ValueError(f"shape must be (N, *sample_shape) with positive sizes, got {shape}")
    total = shape[0]
    if seeds is not None and len(seeds) != total:
        raise ValueError(f"got {len(seeds)} seeds for {total} samples")
    for name, c in (("cond", cond), ("uncond", uncond)):
        b = cond_batch_size(c)
        if b is not None and b not in (1, total):
            raise ValueError(f"{name} has batch size {b} but {total} samples were requested")
    if batch_size is not None and int(batch_size) <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    chunk = total if batch_size is None else int(batch_size)
    run_device = (
        torch.device(device) if device is not None else (x_T.device if x_T is not None else model_device(denoiser))
    )
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    noise = noise if noise is not None else NoiseSource(generator=generator, seeds=seeds)

    outputs = []
    bar = tqdm(total=plan.num_evals * -(-total // chunk), desc=f"sampling ({solver.name})", disable=not progress)
    try:
        for start in range(0, total, chunk):
            stop = min(start + chunk, total)
            if x_T is not None:
                x = x_T[start:stop].to(device=run_device, dtype=dtype)
            else:
                x = noise.draw(start, stop, shape[1:], run_device, dtype) * plan.init_noise_sigma
            out = run_plan(
                denoiser,
                solver,
                plan,
                x,
                noise,
                row_offset=start,
                cond=slice_cond(cond, start, stop, total),
                uncond=slice_cond(uncond, start, stop, total),
                guidance_scale=guidance_scale,
                callback=callback,
                check_finite=check_finite,
                progress=bar,
            )
            outputs.append(out if output_device is None else out.to(output_device))
    finally:
        bar.close()
    return torch.cat(outputs, dim=0) if len(outputs) > 1 else outputs[0]
