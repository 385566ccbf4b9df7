"""A solver's error on a schedule against reference samples from the same initial noise.

The early-stopping signal of the Align Your Steps optimiser (Sabour et al. 2024, Sec. 3.3 stop on the sampler's
quality): the reference is :func:`diffsamplers.reference.reference_samples` of held-out noises.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..denoiser import Denoiser
from ..metrics.errors import rms_error
from ..sampling import sample
from ..schedules.align_your_steps import AysFinal, schedule_from_levels
from ..schedules.schedule import Schedule
from ..solvers.base import Solver

__all__ = ["SolverErrorMetric"]


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

    def error(self, schedule: Schedule, solver: Solver) -> float:
        """RMS error of ``solver`` on ``schedule`` from ``x_T`` against the reference."""
        out = sample(
            self.denoiser, solver, schedule, x_T=self.x_T, cond=self.cond, batch_size=self.batch_size, progress=False
        )
        return rms_error(out, self.reference)

    def __call__(self, levels: np.ndarray) -> float:
        return self.error(self.schedule(np.asarray(levels, dtype=np.float64)), self.solver)
