"""DC-Solver's error with ratios searched per schedule: the early-stopping signal of AYS for DC-Solver."""

import pytest
import torch

from diffsamplers import UniPC, sample
from diffsamplers.metrics.errors import rms_error
from diffsamplers.models.gmm import default_mixture, default_process, reference_solution
from diffsamplers.schedules import uniform_logsnr
from diffsamplers.solvers import DCSolver
from diffsamplers.tuning.dc_schedule_metric import SearchedDCErrorMetric
from diffsamplers.tuning.dc_search import search_dc_ratios
from diffsamplers.tuning.solver_error import SolverErrorMetric


@pytest.fixture(scope="module")
def mixture():
    gmm, process = default_mixture(), default_process()
    den = gmm.as_denoiser(process)
    x_val = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    reference = reference_solution(gmm, process, x_val, process.sigma_max, 0.0)
    x_search = torch.randn(10, 1, 8, 8, generator=torch.Generator().manual_seed(12))
    return den, x_val.float(), reference, x_search


def test_metric_is_dc_solver_with_ratios_searched_on_the_candidate(mixture):
    """The metric's value is DC-Solver's error with the ratios the paper's search finds on that schedule,
    and the search pays: it is below plain UniPC's error on the same schedule and noises."""
    den, x_val, reference, x_search = mixture
    metric = SearchedDCErrorMetric(den, DCSolver(), x_val, reference, x_search, model_id="gmm", reference_steps=200)
    levels = uniform_logsnr(den.process, 5, final="sigma_min").sigmas
    schedule = metric.schedule(levels)
    found = search_dc_ratios(den, DCSolver(), schedule, x_search, model_id="gmm", reference_steps=200)
    assert any(r != 1.0 for r in found.ratios)
    by_hand = rms_error(sample(den, DCSolver(found.ratios), schedule, x_T=x_val, progress=False), reference)
    value = metric(levels)
    assert value == pytest.approx(by_hand, rel=1e-6)
    assert value < 0.95 * SolverErrorMetric(den, UniPC(2, "bh2"), x_val, reference)(levels)


def test_metric_rejects_other_solvers_and_too_few_datapoints(mixture):
    den, x_val, reference, x_search = mixture
    with pytest.raises(TypeError, match="DCSolver"):
        SearchedDCErrorMetric(den, UniPC(), x_val, reference, x_search, model_id="gmm")
    with pytest.raises(ValueError, match="at least 10 datapoints.*\\(9, 1, 8, 8\\)"):
        SearchedDCErrorMetric(den, DCSolver(), x_val, reference, x_search[:9], model_id="gmm")


def test_optimize_for_model_stops_on_searched_dc_solver(tmp_path):
    """Stopping on ``dc-solver:search`` scores every sweep with DC-Solver searched on that schedule."""
    from diffsamplers.apps.schedule_job import StoppingRule, optimize_for_model
    from diffsamplers.tuning.ays_optimizer import AYSSettings

    settings = AYSSettings(num_steps=4, refinements=0, num_samples=64, max_sweeps=1, batch_size=64)
    learned = optimize_for_model(
        "gmm", 4, tmp_path / "l.safetensors", settings,
        StoppingRule("dc-solver:search", metric_samples=16, reference_steps=100, search_samples=10), log=None,
    )  # fmt: skip
    assert learned.metadata["solver"] == "dc-solver:search" and learned.metadata["search_samples"] == 10
    assert len(learned.metadata["metric_history"]) == 2
    assert learned.metadata["metric"].startswith("RMS error of dc-solver:search")
