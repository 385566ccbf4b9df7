"""How far to teleport for a budget of model evaluations, chosen on the solver's error on held-out noises.

The criterion of :func:`~diffsamplers.teleport.gaussian.teleport_level` bounds the teleported state's error by a
``tolerance`` of the noise left in it; the right tolerance depends on how accurate the solver below the teleport is.
A fixed 0.01 is harmless for a coarse solver (DPM-Solver++ 2M at 5–10 evaluations) but becomes the error floor once
the solver is accurate: on the d = 768 mixture of docs/few_step.md, UniPC with the midpoint last step on uniform
logSNR reaches 2.1e-3 at 10 evaluations from σ_max and 2.8e-3 after the 0.01 teleport. :func:`choose_teleport`
reads the levels of several tolerances off one criterion curve (:meth:`TeleportLevel.at`), builds the schedule that
teleports there and spends exactly ``nfe`` evaluations (:func:`~diffsamplers.teleport.gaussian.teleport_schedule`)
for each, scores them — and the plain schedule without a teleport — on noises with known exact (or reference)
solutions, and keeps the best (Wang & Vastola 2024, arXiv:2412.09726, pick the skip by measured quality).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..schedules.schedule import Schedule
from ..solvers.base import Solver
from ..teleport.gaussian import GaussianTeleport, TeleportLevel, teleport_schedule
from .solver_error import SolverErrorMetric

__all__ = ["TELEPORT_TOLERANCES", "TeleportChoice", "choose_teleport"]

#: The tolerances :func:`choose_teleport` tries by default (besides no teleport), loosest first.
TELEPORT_TOLERANCES: tuple[float, ...] = (0.03, 0.01, 0.003, 0.001)


@dataclass(frozen=True)
class TeleportChoice:
    """The outcome of :func:`choose_teleport`.

    Attributes:
        schedule: the chosen schedule (``metadata["teleport_skip"]`` 1 when it teleports, 0 when not).
        tolerance: the criterion's tolerance behind it (None: no teleport won).
        sigma: the level the solver starts at (the curve's ``sigma_start`` when it does not teleport).
        errors: the metric's error per candidate, keyed by tolerance (None: no teleport).
    """

    schedule: Schedule
    tolerance: float | None
    sigma: float
    errors: dict[float | None, float]

    @property
    def solver_schedule(self) -> Schedule:
        """The levels the solver runs: :attr:`schedule` after its teleport entry (if any)."""
        return _after_teleport(self.schedule)


def _after_teleport(schedule: Schedule) -> Schedule:
    return GaussianTeleport.remaining(schedule, int(schedule.metadata["teleport_skip"]))


def choose_teleport(
    curve: TeleportLevel,
    metric: SolverErrorMetric,
    solver: Solver,
    nfe: int,
    tolerances: Sequence[float] = TELEPORT_TOLERANCES,
    spacing: str = "uniform_logsnr",
    final: str | None = None,
    **spacing_kwargs: Any,
) -> TeleportChoice:
    """The teleport level (one of ``tolerances`` on ``curve``, or none) whose ``nfe``-evaluation schedule has the
    smallest ``metric`` error with ``solver``.

    ``curve`` comes from :func:`~diffsamplers.teleport.gaussian.teleport_level` with a tolerance at least the largest
    of ``tolerances``; ``metric`` must teleport (``teleport=`` the data's statistics, ``sigma_start`` the curve's
    start) and hold noises the choice is not then scored on. Ties keep the earlier candidate: no teleport first, then
    ``tolerances`` in their order.
    """
    if metric.teleport is None or metric.sigma_start is None:
        raise ValueError("the metric must teleport (SolverErrorMetric(..., teleport=stats, sigma_start=...))")
    if abs(float(metric.sigma_start) - curve.sigma_start) > 1e-9 * curve.sigma_start:
        raise ValueError(
            f"the metric's noises are drawn at σ̃ = {metric.sigma_start:g}, the curve starts at {curve.sigma_start:g}"
        )
    if not tolerances:
        raise ValueError("give at least one tolerance")
    process = metric.denoiser.process
    levels: dict[float | None, float] = {None: curve.sigma_start}
    levels.update({float(t): curve.at(t).sigma for t in tolerances})
    errors: dict[float | None, float] = {}
    schedules: dict[float | None, Schedule] = {}
    scored: dict[float, float] = {}  # level → error (tolerances that land on the same level are scored once)
    for tol, level in levels.items():
        schedules[tol] = teleport_schedule(
            process, level, nfe, spacing, final, sigma_start=curve.sigma_start, **spacing_kwargs
        )
        if level not in scored:
            scored[level] = metric.error(_after_teleport(schedules[tol]), solver)
        errors[tol] = scored[level]
    best = min(errors, key=lambda t: errors[t])  # dicts keep insertion order: ties keep the earlier
    return TeleportChoice(schedules[best], best, levels[best], errors)
