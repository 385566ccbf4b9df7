"""Measuring a sampler against a reference: the same initial noise, the exact or a many-step solution.

Used as the early-stopping signal of the Align Your Steps optimiser and by the scripts that print the README
tables. The reference is the exact probability-flow ODE solution for the bundled Gaussian mixture
(:func:`diffsamplers.models.gmm.reference_solution`) or, for a network, a many-step run
(:func:`reference_samples`: DPM-Solver++(2M), 1,000 uniform-logSNR steps by default).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..denoiser import Denoiser
from ..sampling import sample
from ..schedules.align_your_steps import AysFinal, schedule_from_levels
from ..schedules.schedule import Schedule
from ..schedules.spacing import uniform_logsnr
from ..solvers.base import Solver
from ..solvers.dpm_solver_pp import DPMSolverPlusPlus

if TYPE_CHECKING:
    from ..models.registry import ModelBundle

__all__ = [
    "rms_error",
    "reference_samples",
    "SolverErrorMetric",
    "ValidationSet",
    "initial_noise",
    "validation_set",
    "evaluate",
]


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

    def error(self, schedule: Schedule, solver: Solver) -> float:
        """RMS error of ``solver`` on ``schedule`` from ``x_T`` against the reference."""
        with torch.no_grad():
            out = sample(
                self.denoiser,
                solver,
                schedule,
                x_T=self.x_T,
                cond=self.cond,
                batch_size=self.batch_size,
                progress=False,
            )
        return rms_error(out, self.reference)

    def __call__(self, levels: np.ndarray) -> float:
        return self.error(self.schedule(np.asarray(levels, dtype=np.float64)), self.solver)


@dataclass
class ValidationSet:
    """Initial noise at σ_max, its reference samples (None: sample metrics only) and the per-sample condition."""

    x_T: torch.Tensor
    reference: torch.Tensor | None
    cond: dict[str, torch.Tensor] | None


def initial_noise(
    bundle: ModelBundle,
    num_samples: int,
    seed: int,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """``num_samples`` seeded initial noises at σ_max and their model inputs (class labels), on ``device``."""
    process = bundle.denoiser.process
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(num_samples, *bundle.sample_shape, generator=g, dtype=torch.float64)
    x_T = (x_T * process.init_noise_sigma(process.sigma_max)).to(device=device, dtype=dtype)
    cond = bundle.cond(num_samples, seed + 1)
    return x_T, (None if cond is None else {k: v.to(device) for k, v in cond.items()})


def validation_set(
    bundle: ModelBundle,
    num_samples: int,
    seed: int,
    device: str | torch.device = "cpu",
    reference_steps: int = 1000,
) -> ValidationSet:
    """``num_samples`` initial noises (seeded) with their exact or ``reference_steps``-step reference samples
    (``reference_steps=0``: no reference for a model without an exact one; only sample metrics are scored)."""
    if reference_steps < 0:
        raise ValueError(f"reference_steps must be >= 0, got {reference_steps}")
    x_T, cond = initial_noise(bundle, num_samples, seed, device, torch.float64)
    if bundle.exact_reference is not None:
        reference = bundle.exact_reference(x_T.cpu()).to(device)
    elif reference_steps == 0:
        reference = None
    else:
        reference = reference_samples(bundle.denoiser, x_T, num_steps=reference_steps, cond=cond, batch_size=256)
    return ValidationSet(x_T.float(), reference, cond)


def evaluate(
    bundle: ModelBundle,
    evaluation: ValidationSet,
    run: Callable[[torch.Tensor, Mapping[str, Any] | None], torch.Tensor],
    sample_metrics: Sequence[str] = (),
) -> dict[str, float]:
    """``run(x_T, cond)`` on the evaluation noises: RMS error against the reference, plus registered sample
    metrics (:func:`diffsamplers.models.registry.register_sample_metric`) by name."""
    from ..models.registry import sample_metric

    with torch.no_grad():
        out = run(evaluation.x_T, evaluation.cond)
    result = {} if evaluation.reference is None else {"rms": rms_error(out, evaluation.reference)}
    for name in sample_metrics:
        result[name] = float(sample_metric(name)(out, bundle))
    return result
