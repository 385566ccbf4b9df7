"""High-NFE reference trajectories: the "ground truth" a few-step sampler is measured and trained against.

For a target schedule σ̃_0 > … > σ̃_N, :func:`refine_schedule` builds a fine schedule (≈ 1,000 steps) that
contains every target level exactly: each target interval is cut into pieces of equal length in process
time, their number proportional to the interval's length. For diffusers' integer grids and 1,000 steps
this is exactly every training timestep 999, 998, …, 0 (then σ̃ = 0 if the target ends there).
:func:`reference_trajectory` integrates the probability-flow ODE on it from the same x_T (by default
DPM-Solver++ 3M, with the same denoiser, conditions and guidance scale as the run it serves) and records
the sample at every target level, so the state after target step k is compared with the reference at
the same noise level (the alignment the DC-Solver reference code gets wrong, see the reference notes
§2.7). With classifier-free guidance this is the solution of the *guided* ODE.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .denoiser import Denoiser
from .noise import NoiseProcess
from .sampling import StepInfo, sample
from .schedules.schedule import Schedule
from .solvers.base import Solver
from .solvers.dpm_solver_pp import DPMSolverPlusPlus

__all__ = ["refine_schedule", "reference_trajectory", "reference_trajectories", "DEFAULT_REFERENCE_STEPS"]

DEFAULT_REFERENCE_STEPS = 1000


def refine_schedule(
    process: NoiseProcess, schedule: Schedule, steps: int = DEFAULT_REFERENCE_STEPS
) -> tuple[Schedule, np.ndarray]:
    """A schedule of about ``steps`` steps containing every level of ``schedule``, and the position of each
    target level in it (``fine.sigmas[index[j]] == schedule.sigmas[j]``). Target levels keep their model
    timesteps; the new levels in between are equally spaced in process time."""
    target = schedule.sigmas
    n = target.size - 1
    if steps < n:
        raise ValueError(f"a reference needs at least as many steps as the target ({n}), got {steps}")
    final_zero = target[-1] == 0.0
    node_sigma = list(target[:-1] if final_zero else target)
    node_t = list(process.t_from_timestep(schedule.model_timesteps(process)))
    if not final_zero:
        node_t.append(float(process.t_from_sigma_tilde(target[-1])))
    elif target[-2] > process.sigma_min * (1 + 1e-9):  # integrate down to t_min, then jump to σ̃ = 0
        node_sigma.append(process.sigma_min)
        node_t.append(process.t_min)
    target_nodes = n if final_zero else n + 1  # nodes that are target levels (the others: σ̃_min)
    t = np.asarray(node_t, dtype=np.float64)
    spans = t[:-1] - t[1:]
    budget = steps - int(final_zero)
    pieces = np.maximum(1, np.round(budget * spans / spans.sum()).astype(int)) if spans.size else spans
    sigmas, times, index = [float(node_sigma[0])], [float(t[0])], [0]
    for j, m in enumerate(pieces):
        inner = np.linspace(t[j], t[j + 1], int(m) + 1)[1:-1]
        sigmas += process.sigma_tilde(inner).tolist()
        times += inner.tolist()
        sigmas.append(float(node_sigma[j + 1]))
        times.append(float(t[j + 1]))
        if j + 1 < target_nodes:
            index.append(len(sigmas) - 1)
    if final_zero:
        sigmas.append(0.0)
        index.append(len(sigmas) - 1)
    timesteps = process.timestep(np.asarray(times[: len(sigmas) - 1]))
    model_ts = schedule.model_timesteps(process)
    timesteps[np.asarray(index[:n])] = model_ts  # the target levels keep exactly their own timesteps
    fine = Schedule(np.asarray(sigmas), timesteps=timesteps, metadata={"spacing": "refined"})
    index_arr = np.asarray(index)
    if index_arr.size != target.size or not np.array_equal(fine.sigmas[index_arr], target):
        raise AssertionError("the refined schedule lost a target level")  # internal invariant
    return fine, index_arr


def reference_trajectory(
    denoiser: Denoiser,
    schedule: Schedule,
    x_T: torch.Tensor,
    *,
    steps: int = DEFAULT_REFERENCE_STEPS,
    solver: Solver | None = None,
    cond: Mapping[str, Any] | None = None,
    uncond: Mapping[str, Any] | None = None,
    guidance_scale: float | None = None,
    dtype: torch.dtype = torch.float32,
    batch_size: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """The fine-grid solution from ``x_T`` at every level of ``schedule``: shape (N + 1, *x_T.shape).

    Row 0 is x_T, row k the reference sample at ``schedule.sigmas[k]``.
    """
    fine, index = refine_schedule(denoiser.process, schedule, steps)
    wanted = {int(i): j for j, i in enumerate(index[:-1])}
    out = torch.empty((index.size, *x_T.shape), dtype=dtype)

    def record(info: StepInfo) -> None:
        j = wanted.get(info.step)
        if j is not None:
            out[j, info.batch_start : info.batch_start + info.x.shape[0]] = info.x.detach().to("cpu", dtype)

    with torch.no_grad():
        final = sample(
            denoiser,
            solver if solver is not None else DPMSolverPlusPlus(3),
            fine,
            x_T=x_T,
            cond=cond,
            uncond=uncond,
            guidance_scale=guidance_scale,
            dtype=dtype,
            batch_size=batch_size,
            callback=record,
            progress=progress,
        )
    out[-1] = final.detach().to("cpu", dtype)
    return out


def _union_schedule(process: NoiseProcess, schedules: Sequence[Schedule]) -> Schedule:
    """All levels of ``schedules`` in one schedule (each keeps its model timestep where it is evaluated)."""
    timestep_of: dict[float, float] = {}
    finals = set()
    for sched in schedules:
        for level, ts in zip(sched.sigmas[:-1], sched.model_timesteps(process)):
            timestep_of.setdefault(float(level), float(ts))
        finals.add(float(sched.sigmas[-1]))
    levels = sorted(set(timestep_of) | finals, reverse=True)
    ts = [timestep_of.get(level, float(process.timestep_from_sigma_tilde(np.asarray(level)))) for level in levels[:-1]]
    return Schedule(np.asarray(levels), timesteps=np.asarray(ts), metadata={"spacing": "union"})


def reference_trajectories(
    denoiser: Denoiser, schedules: Sequence[Schedule], x_T: torch.Tensor, **kwargs: Any
) -> list[torch.Tensor]:
    """:func:`reference_trajectory` for several schedules from the same x_T with one fine-grid run (on the
    union of their levels); entry i has shape (N_i + 1, *x_T.shape). Every schedule must start at the same
    level."""
    if len({float(s.sigmas[0]) for s in schedules}) != 1:
        raise ValueError("reference_trajectories needs schedules that start at the same noise level")
    union = _union_schedule(denoiser.process, schedules)
    rows = reference_trajectory(denoiser, union, x_T, **kwargs)
    position = {float(level): i for i, level in enumerate(union.sigmas)}
    return [rows[[position[float(level)] for level in s.sigmas]] for s in schedules]
