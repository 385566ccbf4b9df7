"""A solver's error on a schedule against reference samples from the same initial noise.

The early-stopping signal of the Align Your Steps optimiser (Sabour et al. 2024, Sec. 3.3 stop on the sampler's
quality): the reference is :func:`diffsamplers.reference.reference_samples` of held-out noises.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..denoiser import Denoiser
from ..sampling import sample
from ..schedules.align_your_steps import AysFinal, schedule_from_levels
from ..schedules.schedule import Schedule
from ..solvers.base import Solver

__all__ = ["SolverErrorMetric", "squared_errors"]


def squared_errors(samples: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Each sample's mean squared error against its reference (float64, on the CPU)."""
    return (samples.double().cpu() - reference.double().cpu()).flatten(1).pow(2).mean(1)


class SolverErrorMetric:
    """RMS error of ``solver`` on a schedule built from noise levels, against ``reference`` from the same ``x_T``.

    Calling it with decreasing levels σ̃_0 > … > σ̃_n (n = number of steps) builds the schedule with the
    ``final`` convention (the last level replaced by 0 by default) and samples from ``x_T``, which must be
    drawn at σ̃_0 (as ``sample`` does for the same levels) — or, with ``teleport`` (the data's Gaussian
    statistics), at ``sigma_start``: the samples are then carried by the Gaussian flow from ``sigma_start`` to
    σ̃_0 first (:func:`~diffsamplers.teleport.gaussian.gaussian_flow`), so a schedule starting below the model's
    σ_max is scored as the teleport + solver recipe it will be run as. The solver's ``final_step`` is used as set.

    ``outlier`` leaves out the noises on which the *first* schedule scored (a search's starting schedule) has more
    than ``outlier`` times the median noise's RMS error; the set is then fixed (:attr:`kept`), so a later schedule
    that sends another noise astray pays for it in full. On a mixture a few noises lie so close to the boundary
    between components that the exact ODE and any few-step solver end in different components (4 of 256 on the
    d = 768 mixture of docs/few_step.md, errors ≈ 0.7 against a median of 0.003): they dominate the plain RMS, and a
    search on it flips them, by chance, at the expense of every other sample. ``fixed_outliers=False`` judges every
    schedule on its own (its own outliers left out). With a few hundred noises (what ``diffsamplers schedule
    optimize`` fits on by default) the rule keeps a handful of boundary noises from deciding the search; but a
    schedule fitted without them is not fitted to the *rate* at which it sends noises astray, which sets the plain RMS
    over many noises at 5–10 steps. With thousands of noises the plain RMS (``outlier=None``) holds dozens of them and
    is the better objective: docs/few_step.md fits on 4,096 and stops on 2,048 that way.
    """

    def __init__(
        self,
        denoiser: Denoiser,
        solver: Solver,
        x_T: torch.Tensor,
        reference: torch.Tensor,
        final: AysFinal = "zero",
        cond: Mapping[str, Any] | None = None,
        batch_size: int | None = None,
        teleport: Any = None,
        sigma_start: float | None = None,
        outlier: float | None = None,
        fixed_outliers: bool = True,
    ):
        if x_T.shape != reference.shape:
            raise ValueError(f"x_T {tuple(x_T.shape)} and reference {tuple(reference.shape)} differ in shape")
        if (teleport is None) != (sigma_start is None):
            raise ValueError("teleport and sigma_start go together: x_T is drawn at sigma_start and teleported")
        self.denoiser, self.solver, self.x_T, self.reference = denoiser, solver, x_T, reference
        self.final, self.cond, self.batch_size = final, cond, batch_size
        self.teleport, self.sigma_start = teleport, sigma_start
        if outlier is not None and not (math.isfinite(outlier) and outlier > 1.0):
            raise ValueError(f"outlier must be a finite factor > 1 (or None), got {outlier}")
        self.outlier = outlier
        self.kept: torch.Tensor | None = None  # the samples scored, fixed by the first schedule (with ``outlier``)
        self.fixed_outliers = bool(fixed_outliers)

    def start(self, sigma: float) -> torch.Tensor:
        """x_T, teleported to ``sigma`` when the metric teleports."""
        if self.teleport is None:
            return self.x_T
        if sigma > self.sigma_start * (1 + 1e-9):  # type: ignore[operator]
            raise ValueError(f"cannot teleport up from sigma_start {self.sigma_start} to {sigma}")
        if sigma >= self.sigma_start:  # type: ignore[operator]
            return self.x_T
        from ..teleport.gaussian import gaussian_flow

        process = self.denoiser.process
        return gaussian_flow(self.teleport, process, self.x_T, float(self.sigma_start), float(sigma)).to(self.x_T.dtype)

    def schedule(self, levels: np.ndarray) -> Schedule:
        return schedule_from_levels(levels, len(levels) - 1, self.final, self.denoiser.process)

    def samples(self, schedule: Schedule, solver: Solver) -> torch.Tensor:
        """``solver``'s final samples on ``schedule`` from ``x_T`` (teleported to the schedule's top when it
        teleports)."""
        x_T = self.start(float(schedule.sigmas[0]))
        return sample(
            self.denoiser, solver, schedule, x_T=x_T, cond=self.cond, batch_size=self.batch_size, progress=False
        )

    def squared_errors(self, schedule: Schedule, solver: Solver) -> torch.Tensor:
        """Each sample's mean squared error (float64, on the CPU) of ``solver`` on ``schedule`` from ``x_T``."""
        return squared_errors(self.samples(schedule, solver), self.reference)

    def error(self, schedule: Schedule, solver: Solver) -> float:
        """RMS error of ``solver`` on ``schedule`` from ``x_T`` against the reference (``outlier`` noises left out)."""
        per_sample = self.squared_errors(schedule, solver)
        if self.outlier is None:
            return float(per_sample.mean().sqrt())
        keep = per_sample <= self.outlier**2 * per_sample.median()  # RMS per sample ≤ outlier × the median's
        if not self.fixed_outliers:
            return float(per_sample[keep].mean().sqrt())
        if self.kept is None:  # fixed by the first schedule scored
            self.kept = keep
        return float(per_sample[self.kept].mean().sqrt())

    def __call__(self, levels: np.ndarray) -> float:
        return self.error(self.schedule(np.asarray(levels, dtype=np.float64)), self.solver)
