"""How far to teleport for a budget of evaluations, chosen on held-out noises (issue 15): the candidates are the
criterion's levels for several tolerances and no teleport; the choice is the one with the smallest measured error."""

from __future__ import annotations

import pytest
import torch

from diffsamplers.models.gmm import GaussianMixture, reference_solution
from diffsamplers.noise import DiscreteVP
from diffsamplers.sampling import initial_noise
from diffsamplers.solvers import DPMSolverPlusPlus, UniPC
from diffsamplers.teleport.gaussian import teleport_level
from diffsamplers.teleport.statistics import GaussianStatistics
from diffsamplers.tuning.solver_error import SolverErrorMetric
from diffsamplers.tuning.teleport_choice import TELEPORT_TOLERANCES, choose_teleport

PROCESS = DiscreteVP.from_beta_schedule("scaled_linear", 0.00085, 0.012, 1000)
GMM = GaussianMixture.isotropic(64, 6, 0.15, seed=3)
DEN = GMM.as_denoiser(PROCESS)
STATS = GaussianStatistics.from_gmm(GMM)
TOP = float(PROCESS.sigma_max)


@pytest.fixture(scope="module")
def noises() -> tuple[torch.Tensor, torch.Tensor]:
    x_T = initial_noise(PROCESS, TOP, (48, 64), 2)
    return x_T, reference_solution(GMM, PROCESS, x_T.double(), TOP, 0.0).float()


@pytest.fixture(scope="module")
def curve():
    return teleport_level(DEN, STATS, tolerance=max(TELEPORT_TOLERANCES))


def _metric(solver, noises, **kw) -> SolverErrorMetric:
    return SolverErrorMetric(DEN, solver, *noises, final="zero", teleport=STATS, sigma_start=TOP, **kw)


def test_the_choice_is_the_smallest_measured_error(noises, curve) -> None:
    solver = DPMSolverPlusPlus(order=2)
    choice = choose_teleport(curve, _metric(solver, noises), solver, 5)
    assert list(choice.errors) == [None, *TELEPORT_TOLERANCES]
    assert choice.errors[choice.tolerance] == min(choice.errors.values())
    skip = int(choice.schedule.metadata["teleport_skip"])
    assert choice.schedule.num_steps - skip == 5  # exactly the budget of model evaluations
    if choice.tolerance is None:
        assert skip == 0 and choice.sigma == TOP
    else:
        assert skip == 1 and choice.sigma == curve.at(choice.tolerance).sigma < TOP
    # the error recorded is the recipe's as run: teleport from σ_max, then the solver
    run = choice.solver_schedule
    assert run.num_steps == 5 and run.sigmas[0] == pytest.approx(choice.sigma)
    assert _metric(solver, noises).error(run, solver) == pytest.approx(choice.errors[choice.tolerance])
    # a coarse solver takes a teleport: its own error at 5 evaluations dwarfs the teleport's
    assert choice.tolerance is not None


def test_an_accurate_solver_teleports_less_far(noises, curve) -> None:
    """The teleport's error is a floor under an accurate solver: with 20 UniPC steps and the midpoint last step the
    chosen level is no lower than DPM-Solver++ 2M's at 5 evaluations."""
    coarse, fine = DPMSolverPlusPlus(order=2), UniPC().with_final_step("midpoint")
    low = choose_teleport(curve, _metric(coarse, noises), coarse, 5)
    high = choose_teleport(curve, _metric(fine, noises), fine, 20)
    assert high.sigma >= low.sigma


def test_bad_arguments_raise_clear_errors(noises, curve) -> None:
    solver = UniPC()
    with pytest.raises(ValueError, match="must teleport"):
        choose_teleport(curve, SolverErrorMetric(DEN, solver, *noises), solver, 5)
    other = SolverErrorMetric(DEN, solver, *noises, teleport=STATS, sigma_start=TOP / 2)
    with pytest.raises(ValueError, match="curve starts"):
        choose_teleport(curve, other, solver, 5)
    with pytest.raises(ValueError, match="looser"):
        choose_teleport(curve, _metric(solver, noises), solver, 5, tolerances=(0.1,))
    with pytest.raises(ValueError, match="at least one"):
        choose_teleport(curve, _metric(solver, noises), solver, 5, tolerances=())
