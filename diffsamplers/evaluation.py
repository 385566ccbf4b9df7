"""Measuring a sampler against a reference: the same initial noise, the exact or a many-step solution.

Used as the early-stopping signal of the Align Your Steps optimiser and by the scripts that print the README
tables. The reference is the exact probability-flow ODE solution for the bundled Gaussian mixture
(:func:`diffsamplers.models.gmm.reference_solution`) or, for a network, a many-step run
(:func:`reference_samples`: DPM-Solver++(2M), 1,000 uniform-logSNR steps by default).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .denoiser import Denoiser
from .sampling import sample
from .schedules.align_your_steps import AysFinal, schedule_from_levels
from .schedules.schedule import Schedule
from .schedules.spacing import uniform_logsnr
from .solvers.base import Solver
from .solvers.dpm_solver_pp import DPMSolverPlusPlus

__all__ = ["rms_error", "reference_samples", "SolverErrorMetric"]


def rms_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Root-mean-square difference over all elements (float64)."""
    return float((a.double().cpu() - b.double().cpu()).pow(2).mean().sqrt())


def reference_samples(
    denoiser: Denoiser,
    x_T: torch.Tensor,
    num_steps: int = 1000,
    solver: Solver | None = None,
    schedule: Schedule | None = None,
    cond: Mapping[str, Any] | None = None,
    batch_size: int | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """A many-step solution from ``x_T`` (at the schedule's first level) down to σ = 0."""
    schedule = schedule or uniform_logsnr(denoiser.process, num_steps, final="zero")
    with torch.no_grad():
        return sample(
            denoiser,
            solver or DPMSolverPlusPlus(2),
            schedule,
            x_T=x_T,
            cond=cond,
            batch_size=batch_size,
            dtype=dtype,
            progress=False,
        )


class SolverErrorMetric:
    """RMS error of ``solver`` on a schedule built from noise levels, against ``reference`` from the same ``x_T``.

    Calling it with decreasing levels σ̃_0 > … > σ̃_n (n = number of steps) builds the schedule with the
    ``final`` convention (the last level replaced by 0 by default) and samples from ``x_T``, which must be
    drawn at σ̃_0 (as ``sample`` does for the same levels).
    """

    def __init__(
        self,
        denoiser: Denoiser,
        solver: Solver,
        x_T: torch.Tensor,
        reference: torch.Tensor,
        final: AysFinal = "replace",
        cond: Mapping[str, Any] | None = None,
        batch_size: int | None = None,
    ):
        if x_T.shape != reference.shape:
            raise ValueError(f"x_T {tuple(x_T.shape)} and reference {tuple(reference.shape)} differ in shape")
        self.denoiser, self.solver, self.x_T, self.reference = denoiser, solver, x_T, reference
        self.final, self.cond, self.batch_size = final, cond, batch_size

    def schedule(self, levels: np.ndarray) -> Schedule:
        return schedule_from_levels(levels, len(levels) - 1, self.final, self.denoiser.process)

    def __call__(self, levels: np.ndarray) -> float:
        with torch.no_grad():
            out = sample(
                self.denoiser,
                self.solver,
                self.schedule(np.asarray(levels, dtype=np.float64)),
                x_T=self.x_T,
                cond=self.cond,
                batch_size=self.batch_size,
                progress=False,
            )
        return rms_error(out, self.reference)
