"""The reference solution: the "ground truth" every few-step sampler is measured and tuned against.

One definition serves every table, search and stopping rule of the package: the probability-flow ODE from the
given x_T, integrated in float64 by DPM-Solver++ 3M (the Taylor third-order term, :mod:`diffsamplers.solvers.
dpm_solver_pp`) on about 1,000 steps uniform in λ = log(α/σ) — refined so that the grid contains every level
of the schedule it serves, so that the state after target step k is compared with the reference at the same
noise level. With classifier-free guidance it is the solution of the *guided* ODE. A schedule that ends at
σ̃ = 0 is integrated to the model's smallest trained level σ̃_min and ends, as every solver here does, with the
jump x ← x̂0(x, σ̃_min).

Accuracy, against SciPy's DOP853 solution (rtol 1e-10) of the same ODE on the bundled Gaussian mixture from
σ̃_max to σ̃_min (``tests/test_reference.py``): 5.6e-8 RMS with 1,000 steps, 6.9e-9 with 2,000, on samples of
RMS ≈ 1; on the time-uniform grid the package used before it was ≈ 1e-4. For exact models the remaining gap to
the ODE solution *at* σ̃ = 0 is the final jump's (7e-4 RMS on the mixture), which every sampler that ends at 0
shares.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .denoiser import Denoiser
from .noise import NoiseProcess
from .sampling import sample
from .schedules.schedule import Schedule
from .solvers.dpm_solver_pp import DPMSolverPlusPlus
from .step import StepInfo

__all__ = [
    "REFERENCE_STEPS",
    "refine_schedule",
    "reference_samples",
    "reference_trajectories",
    "reference_trajectory",
    "reference_description",
]

#: Steps of the reference run.
REFERENCE_STEPS = 1000

Cond = Mapping[str, Any] | None


def reference_description(steps: int = REFERENCE_STEPS) -> str:
    """How the reference was made, for the tables and JSON files that use it."""
    return (
        f"diffsamplers.reference: float64 DPM-Solver++ 3M, {steps} steps uniform in log-SNR refined to contain the "
        "target levels (5.6e-8 RMS from SciPy's solution on the bundled mixture at 1,000 steps)"
    )


def refine_schedule(
    process: NoiseProcess, schedule: Schedule, steps: int = REFERENCE_STEPS
) -> tuple[Schedule, np.ndarray]:
    """A schedule of about ``steps`` steps containing every level of ``schedule``, and the position of each
    target level in it (``fine.sigmas[index[j]] == schedule.sigmas[j]``).

    Each target interval is cut into pieces of equal length in λ = −log σ̃, their number proportional to its
    λ-length; target levels keep their own model timesteps. A final σ̃ = 0 is reached from σ̃_min (added as a
    node when the schedule's last non-zero level lies above it) in one jump.
    """
    target = schedule.sigmas
    n = target.size - 1
    if int(steps) < n:
        raise ValueError(f"a reference needs at least as many steps as the target ({n}), got {steps}")
    final_zero = target[-1] == 0.0
    nodes = list(target[:-1] if final_zero else target)
    node_ts = list(schedule.model_timesteps(process))
    if not final_zero:
        node_ts.append(float(process.timestep_from_sigma_tilde(target[-1])))
    elif nodes[-1] > process.sigma_min * (1 + 1e-9):
        nodes.append(process.sigma_min)
        node_ts.append(float(process.timestep(process.t_min)))
    lam = -np.log(np.asarray(nodes, dtype=np.float64))
    spans = np.diff(lam)
    budget = int(steps) - int(final_zero)
    pieces = np.maximum(1, np.round(budget * spans / spans.sum()).astype(int)) if spans.size else spans.astype(int)
    sigmas, timesteps, index = [float(nodes[0])], [float(node_ts[0])], [0]
    for j, m in enumerate(pieces):
        inner = np.exp(-np.linspace(lam[j], lam[j + 1], int(m) + 1)[1:-1])
        sigmas += inner.tolist()
        timesteps += process.timestep_from_sigma_tilde(inner).tolist()
        sigmas.append(float(nodes[j + 1]))
        timesteps.append(float(node_ts[j + 1]))
        if j + 1 < n + int(not final_zero):
            index.append(len(sigmas) - 1)
    if final_zero:
        sigmas.append(0.0)
        index.append(len(sigmas) - 1)
    fine = Schedule(
        np.asarray(sigmas), timesteps=np.asarray(timesteps[: len(sigmas) - 1]), metadata={"spacing": "refined"}
    )
    index_arr = np.asarray(index)
    if index_arr.size != target.size or not np.array_equal(fine.sigmas[index_arr], target):
        raise AssertionError("the refined schedule lost a target level")  # internal invariant
    return fine, index_arr


def reference_trajectory(
    denoiser: Denoiser,
    schedule: Schedule,
    x_T: torch.Tensor,
    *,
    steps: int = REFERENCE_STEPS,
    cond: Cond = None,
    uncond: Cond = None,
    guidance_scale: float | None = None,
    batch_size: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """The reference solution from ``x_T`` at every level of ``schedule``: shape (N + 1, *x_T.shape), float64
    on the CPU. Row 0 is x_T, row k the reference sample at ``schedule.sigmas[k]``."""
    fine, index = refine_schedule(denoiser.process, schedule, steps)
    wanted = {int(i): j for j, i in enumerate(index[:-1])}
    out = torch.empty((index.size, *x_T.shape), dtype=torch.float64)

    def record(info: StepInfo) -> None:
        j = wanted.get(info.step)
        if j is not None:
            out[j, info.batch_start : info.batch_start + info.x.shape[0]] = info.x.detach().to("cpu", torch.float64)

    final = sample(
        denoiser,
        DPMSolverPlusPlus(3),
        fine,
        x_T=x_T,
        cond=cond,
        uncond=uncond,
        guidance_scale=guidance_scale,
        dtype=torch.float64,
        batch_size=batch_size,
        callback=record,
        progress=progress,
    )
    out[-1] = final.detach().to("cpu", torch.float64)
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
    """:func:`reference_trajectory` for several schedules from the same x_T with one run (on the union of their
    levels); entry i has shape (N_i + 1, *x_T.shape). Every schedule must start at the same level."""
    if len({float(s.sigmas[0]) for s in schedules}) != 1:
        raise ValueError("reference_trajectories needs schedules that start at the same noise level")
    union = _union_schedule(denoiser.process, schedules)
    rows = reference_trajectory(denoiser, union, x_T, **kwargs)
    position = {float(level): i for i, level in enumerate(union.sigmas)}
    return [rows[[position[float(level)] for level in s.sigmas]] for s in schedules]


def reference_samples(
    denoiser: Denoiser,
    x_T: torch.Tensor,
    *,
    schedule: Schedule | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """The reference's final samples from ``x_T``: at σ̃ = 0 from the model's largest level σ̃_max, or at the end
    of ``schedule`` from its first level; float64 on the CPU."""
    process = denoiser.process
    schedule = schedule or Schedule(np.array([process.sigma_max, 0.0]))
    return reference_trajectory(denoiser, schedule, x_T, **kwargs)[-1]
