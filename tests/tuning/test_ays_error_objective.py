"""The schedule search on the solver's own error (issue 15): fitted on some noises, stopped on others, and scored
on a third set it never saw."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffsamplers.metrics.errors import rms_error
from diffsamplers.models.gmm import GaussianMixture, reference_solution
from diffsamplers.noise import DiscreteVP
from diffsamplers.sampling import initial_noise, sample
from diffsamplers.schedules import from_sigmas, karras, uniform_logsnr
from diffsamplers.solvers import UniPC
from diffsamplers.teleport.statistics import GaussianStatistics
from diffsamplers.tuning.ays_optimizer import STANDARD_INITS, AYSSettings, initial_levels, optimize_schedule
from diffsamplers.tuning.solver_error import SolverErrorMetric

PROCESS = DiscreteVP.from_beta_schedule("scaled_linear", 0.00085, 0.012, 1000)
GMM = GaussianMixture.isotropic(48, 4, 0.15, seed=5)
DEN = GMM.as_denoiser(PROCESS)
TOP = float(PROCESS.sigma_max)


def _noises(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    x_T = initial_noise(PROCESS, TOP, (n, 48), seed)
    return x_T, reference_solution(GMM, PROCESS, x_T.double(), TOP, 0.0).float()


@pytest.fixture(scope="module")
def sets() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {"fit": _noises(128, 1), "stop": _noises(32, 2), "test": _noises(32, 0)}


def _settings(n: int, **kw: object) -> AYSSettings:
    kw = {"init": "uniform_logsnr", "max_sweeps": 8, **kw}
    return AYSSettings(num_steps=n, refinements=0, objective="error", num_candidates=7, **kw)


def test_learned_schedule_beats_logsnr_and_karras_on_unseen_noises(sets) -> None:
    solver = UniPC().with_final_step("midpoint")
    fit, stop = (SolverErrorMetric(DEN, solver, *sets[k], final="zero") for k in ("fit", "stop"))
    learned = optimize_schedule(DEN, None, _settings(5), metric=stop, objective=fit, log=None)
    history = learned.metadata["objective_history"]
    assert all(b <= a for a, b in zip(history, history[1:]))  # the fitted error never rises
    assert "klub_history" not in learned.metadata and learned.metadata["metric_history"]
    levels = learned.levels(5).copy()
    levels[-1] = 0.0
    x_T, exact = sets["test"]

    def error(schedule) -> float:
        return rms_error(sample(DEN, solver, schedule, x_T=x_T, progress=False), exact)

    ours = error(from_sigmas(PROCESS, levels))
    assert ours < 0.8 * error(uniform_logsnr(PROCESS, 5))
    assert ours < 0.8 * error(karras(PROCESS, 5, final="zero"))


def test_teleporting_metric_scores_the_recipe_as_run(sets) -> None:
    """With teleport statistics the metric starts every noise at σ_max and carries it to the schedule's first level."""
    solver = UniPC().with_final_step("midpoint")
    stats = GaussianStatistics.from_gmm(GMM)
    metric = SolverErrorMetric(DEN, solver, *sets["test"], final="zero", teleport=stats, sigma_start=TOP)
    low = uniform_logsnr(PROCESS, 6, sigma_max=6.0, final="sigma_min").sigmas
    moved = metric.start(6.0)
    assert not torch.equal(moved, sets["test"][0])
    assert metric(low) == pytest.approx(
        rms_error(sample(DEN, solver, metric.schedule(low), x_T=moved, progress=False), sets["test"][1])
    )
    assert torch.equal(metric.start(TOP), sets["test"][0])
    with pytest.raises(ValueError, match="teleport up"):
        metric.start(TOP * 2)
    with pytest.raises(ValueError, match="go together"):
        SolverErrorMetric(DEN, solver, *sets["test"], teleport=stats)


def test_error_objective_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="refinements must be 0"):
        AYSSettings(objective="error", refinements=2)
    with pytest.raises(ValueError, match="unknown objective"):
        AYSSettings(objective="fid")
    with pytest.raises(ValueError, match="objective="):
        optimize_schedule(DEN, None, _settings(4), objective=None, log=None)
    with pytest.raises(ValueError, match="NaN"):
        optimize_schedule(DEN, None, _settings(4), objective=lambda levels: float("nan"), log=None)


@pytest.mark.parametrize("target", STANDARD_INITS)
def test_best_init_starts_from_the_standard_schedule_the_metric_prefers(target: str) -> None:
    """``init="best"`` scores every standard schedule on the stop metric (the objective without one) and starts there;
    with no sweeps that start is the result."""
    settings = {init: initial_levels(PROCESS, _settings(5, init=init)) for init in STANDARD_INITS}
    metric = lambda levels: float(np.abs(np.log(levels) - np.log(settings[target])).sum())  # noqa: E731
    objective = lambda levels: -metric(levels)  # prefers another start: the metric decides  # noqa: E731
    learned = optimize_schedule(
        DEN, None, _settings(5, init="best", max_sweeps=0), metric=metric, objective=objective, log=None
    )
    np.testing.assert_allclose(learned.levels(5), settings[target])
    alone = optimize_schedule(DEN, None, _settings(5, init="best", max_sweeps=0), objective=metric, log=None)
    np.testing.assert_allclose(alone.levels(5), settings[target])  # no metric: the objective decides
    with pytest.raises(ValueError, match="chosen by optimize_schedule"):
        initial_levels(PROCESS, _settings(5, init="best"))


def test_error_objective_resumes_from_its_checkpoint(tmp_path, sets) -> None:
    solver = UniPC().with_final_step("midpoint")
    fit = SolverErrorMetric(DEN, solver, *sets["fit"], final="zero")
    path = tmp_path / "ckpt.safetensors"
    whole = optimize_schedule(DEN, None, _settings(4), objective=fit, log=None)
    calls = []

    def counting(levels: np.ndarray) -> float:
        calls.append(1)
        return fit(levels)

    first = optimize_schedule(DEN, None, _settings(4), objective=counting, checkpoint=path, log=None)
    n_first = len(calls)
    again = optimize_schedule(DEN, None, _settings(4), objective=counting, checkpoint=path, log=None)
    np.testing.assert_array_equal(first.levels(4), whole.levels(4))
    np.testing.assert_array_equal(again.levels(4), whole.levels(4))
    assert len(calls) - n_first <= 1  # resumed at the end: nothing searched again


def test_outlier_samples_are_left_out_of_the_search_metric(sets) -> None:
    """``outlier`` drops noises with more than that many times the median error under the first schedule scored
    (boundary noises); None is the plain RMS."""
    solver = UniPC().with_final_step("midpoint")
    x_T, exact = sets["test"]
    spoiled = exact.clone()
    spoiled[3] += 5.0  # one sample "in another component"
    schedule = uniform_logsnr(PROCESS, 5)
    plain = SolverErrorMetric(DEN, solver, x_T, spoiled).error(schedule, solver)
    robust = SolverErrorMetric(DEN, solver, x_T, spoiled, outlier=20.0).error(schedule, solver)
    out = sample(DEN, solver, schedule, x_T=x_T, progress=False)
    keep = torch.ones(32, dtype=torch.bool)
    keep[3] = False
    assert plain > 0.5 and robust == pytest.approx(rms_error(out[keep], exact[keep]), rel=1e-6)
    # the noises left out are fixed by the first schedule scored: a later one pays for every other noise in full
    metric = SolverErrorMetric(DEN, solver, x_T, spoiled, outlier=20.0)
    metric.error(schedule, solver)
    assert metric.kept is not None and metric.kept.sum() == 31 and not metric.kept[3]
    other = uniform_logsnr(PROCESS, 3)
    out3 = sample(DEN, solver, other, x_T=x_T, progress=False)
    assert metric.error(other, solver) == pytest.approx(rms_error(out3[keep], exact[keep]), rel=1e-6)
    each = SolverErrorMetric(DEN, solver, x_T, exact, outlier=20.0, fixed_outliers=False)
    each.error(schedule, solver)
    assert each.kept is None  # every schedule judged on its own noises
    clean = SolverErrorMetric(DEN, solver, x_T, exact, outlier=20.0).error(schedule, solver)
    assert clean == pytest.approx(rms_error(out, exact), rel=1e-6)  # no outlier: the plain RMS
    with pytest.raises(ValueError, match="outlier"):
        SolverErrorMetric(DEN, solver, x_T, exact, outlier=0.5)


def test_cli_fits_the_solver_error_with_its_final_step(tmp_path) -> None:
    """``schedule optimize --objective error`` on the bundled mixture: fitting and held-out noises are other noises,
    the solver spec's final step and --final are what the error is measured with, and they are recorded."""
    from diffsamplers.apps.cli import main
    from diffsamplers.schedules.learned import LearnedSchedule

    out = tmp_path / "s.safetensors"
    args = ["schedule", "optimize", "--model", "gmm", "--nfe", "4", "--objective", "error"]
    args += ["--solver", "unipc:final_step=midpoint", "--fit-samples", "24", "--metric-samples", "16"]
    args += ["--reference-steps", "200", "--max-sweeps", "2", "--init", "best", "--output", str(out), "--quiet"]
    assert main(args) == 0
    learned = LearnedSchedule.load(out)
    meta = learned.metadata
    assert sorted(learned.stages) == [4] and meta["settings"]["objective"] == "error"
    assert meta["final"] == "zero" and meta["fit_samples"] == 24 and meta["solver"] == "unipc:final_step=midpoint"
    assert meta["outlier"] == 20.0 and meta["objective_history"][-1] <= meta["objective_history"][0]
    assert meta["settings"]["init"] == "best"
    from diffsamplers.apps.cli import build_parser

    plain = build_parser().parse_args(
        ["schedule", "optimize", "--model", "gmm", "--outlier", "0", "--output", str(out)]
    )
    assert plain.outlier is None  # the plain RMS


def test_top_level_is_searched_below_teleport_from(sets) -> None:
    """With ``teleport_from`` the top level moves too (a Gaussian teleport from the initial noise's level down to
    it, scored by a teleporting metric), never above ``teleport_from``; the objective never rises and the held-out
    error of the fitted teleport + schedule is no worse than the starting one's."""
    solver = UniPC().with_final_step("midpoint")
    stats = GaussianStatistics.from_gmm(GMM)
    fit, stop, test = (
        SolverErrorMetric(DEN, solver, *sets[k], final="zero", teleport=stats, sigma_start=TOP)
        for k in ("fit", "stop", "test")
    )
    start = 1.5  # too far down: the teleported state is off by more than the solver's error
    learned = optimize_schedule(
        DEN, None, _settings(5, sigma_max=start, teleport_from=TOP), metric=stop, objective=fit, log=None
    )
    levels = learned.levels(5)
    assert start < levels[0] <= TOP  # the top level moved up, within the ceiling
    assert all(np.diff(levels) < 0)
    history = learned.metadata["objective_history"]
    assert all(b <= a for a, b in zip(history, history[1:]))
    fixed_top = optimize_schedule(DEN, None, _settings(5, sigma_max=start), metric=stop, objective=fit, log=None)
    assert fixed_top.levels(5)[0] == start
    assert fit(levels) <= fit(fixed_top.levels(5))
    assert test(levels) < test(fixed_top.levels(5))
    with pytest.raises(ValueError, match="objective 'error'"):
        AYSSettings(teleport_from=TOP)
    with pytest.raises(ValueError, match="positive, finite"):
        _settings(4, teleport_from=float("nan"))
    with pytest.raises(ValueError, match="teleport_from"):
        optimize_schedule(DEN, None, _settings(4, sigma_max=start, teleport_from=1.0), objective=fit, log=None)
