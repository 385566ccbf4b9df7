"""DC-Solver's own error as a schedule's quality: ratios searched afresh for every candidate schedule.

DC-Solver's compensation ratios belong to a grid (Zhao et al. 2024, arXiv:2409.03755, Sec. 3.3: they are
searched for one schedule and NFE), so judging a schedule by DC-Solver means searching the ratios on it
first. :class:`SearchedDCErrorMetric` does that — the paper's greedy search
(:func:`~diffsamplers.tuning.dc_search.search_dc_ratios`) on a few search noises against a high-NFE trajectory on
the candidate's grid — and then scores DC-Solver with those ratios on separate held-out noises. It is the
early-stopping signal of Align Your Steps' optimiser for ``--solver dc-solver`` (Sabour et al. 2024, Sec. 3.3
stop on the sampler's quality) and the per-schedule solver of the AYS tables.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..denoiser import Denoiser
from ..reference import REFERENCE_STEPS
from ..schedules.align_your_steps import AysFinal
from ..schedules.schedule import Schedule
from ..solvers.dc_solver import DCSolver
from .dc_search import PAPER_DATAPOINTS, search_dc_ratios
from .solver_error import SolverErrorMetric

__all__ = ["SearchedDCErrorMetric"]


class SearchedDCErrorMetric(SolverErrorMetric):
    """RMS error of ``solver`` (a :class:`DCSolver`) with ratios searched for each candidate schedule.

    Args:
        x_T / reference / cond: the held-out noises that score the schedule, and their reference samples.
        x_search / cond_search: the search datapoints (at least 10, the paper's number), other noises.
        model_id: the model's name, recorded with the searched ratios.
        reference_steps / iterations: of the ratio search (its ground-truth trajectory and optimiser).
    """

    def __init__(
        self,
        denoiser: Denoiser,
        solver: DCSolver,
        x_T: torch.Tensor,
        reference: torch.Tensor,
        x_search: torch.Tensor,
        *,
        model_id: str,
        cond_search: Mapping[str, Any] | None = None,
        reference_steps: int = REFERENCE_STEPS,
        iterations: int = 40,
        final: AysFinal = "zero",
        cond: Mapping[str, Any] | None = None,
        batch_size: int | None = None,
    ):
        if not isinstance(solver, DCSolver):
            raise TypeError(f"solver must be a DCSolver, got {type(solver).__name__}")
        if x_search.ndim < 2 or x_search.shape[0] < PAPER_DATAPOINTS:
            raise ValueError(
                f"the ratio search needs at least {PAPER_DATAPOINTS} datapoints (x_search), got shape "
                f"{tuple(x_search.shape)}"
            )
        super().__init__(denoiser, solver, x_T, reference, final=final, cond=cond, batch_size=batch_size)
        self.x_search, self.cond_search, self.model_id = x_search, cond_search, model_id
        self.reference_steps, self.iterations = reference_steps, iterations

    def searched(self, schedule: Schedule) -> DCSolver:
        """The DC-Solver with its ratios searched on ``schedule``."""
        dc: DCSolver = self.solver  # type: ignore[assignment]
        found = search_dc_ratios(
            self.denoiser,
            dc,
            schedule,
            self.x_search,
            model_id=self.model_id,
            cond=self.cond_search,
            reference_steps=self.reference_steps,
            iterations=self.iterations,
        )
        return dc.with_ratios(found.ratios)

    def __call__(self, levels: np.ndarray) -> float:
        schedule = self.schedule(np.asarray(levels, dtype=np.float64))
        return self.error(schedule, self.searched(schedule))
