"""The ratio search: it lowers the loss it optimises, sampling reproduces it, checkpoints resume, bad input."""

import pytest
import torch

from diffsamplers import DCSolver, DPMSolverPlusPlus, UniPC, sample
from diffsamplers.models.gmm import GaussianMixture, default_process
from diffsamplers.reference import reference_trajectory
from diffsamplers.schedules import diffusers_spacing
from diffsamplers.solvers.dc_ratios import DCRatios, RatioMismatchError
from diffsamplers.tuning.dc_search import search_dc_ratios

PROCESS = default_process()
GMM = GaussianMixture.random((1, 4, 4), num_components=4, seed=2)
DEN = GMM.as_denoiser(PROCESS)
SCHEDULE = diffusers_spacing(PROCESS, 6, final="sigma_min")


@pytest.fixture(scope="module")
def data():
    x_T = torch.randn(10, *GMM.sample_shape, generator=torch.Generator().manual_seed(0))
    return x_T, reference_trajectory(DEN, SCHEDULE, x_T)


def _search(data, solver=None, **kw):
    x_T, ref = data
    kw.setdefault("iterations", 15)
    return search_dc_ratios(DEN, solver or DCSolver(), SCHEDULE, x_T, model_id="gmm16", reference=ref, **kw)


@pytest.fixture(scope="module")
def searched(data):
    return _search(data)


def test_search_improves_every_step_and_sampling_reproduces_it(data, searched):
    x_T, ref = data
    before, after = searched.search["loss_before"], searched.search["loss_after"]
    assert before[:2] == [None, None] and searched.ratios[:2] == [1.0, 1.0]
    for k in range(2, 6):
        assert after[k] < before[k], (k, before[k], after[k])  # before: the loss at ρ = 1
    # The last step's loss is exactly the MSE of sampling with the found ratios against the reference's final
    # sample at the same level: the search steps are the solver's own, aligned with the reference.
    out = sample(DEN, DCSolver(searched.ratios), SCHEDULE, x_T=x_T, progress=False)
    assert float((out - ref[-1]).pow(2).mean()) == pytest.approx(after[-1], rel=1e-5)
    plain = sample(DEN, UniPC(), SCHEDULE, x_T=x_T, progress=False)
    assert float((out - ref[-1]).pow(2).mean()) < float((plain - ref[-1]).pow(2).mean())


def test_predictor_only_plug_in(data):
    """DC on DPM-Solver++ 2M (no corrector): the loss at the next level has no model call, and still falls."""
    found = _search(data, DCSolver(base=DPMSolverPlusPlus(2)))
    assert all(a < b for a, b in zip(found.search["loss_after"][2:], found.search["loss_before"][2:]))
    assert found.solver["base"] == "DPMSolverPlusPlus"


def test_tanh_bound_keeps_ratios_in_range(data):
    found = _search(data, bound="tanh", iterations=30, lr=0.5)
    assert all(0.5 < r < 1.5 for r in found.ratios)


def test_checkpoint_resume_gives_the_same_ratios(data, searched, tmp_path):
    path = tmp_path / "r.safetensors"

    class Stop(Exception):
        pass

    def interrupt(line):
        if line.startswith("step 4/"):
            raise Stop

    with pytest.raises(Stop):
        _search(data, checkpoint=path, log=interrupt)
    partial = DCRatios.load(path)
    assert not partial.complete and partial.searched_steps == 3 and partial.ratios[2] == searched.ratios[2]
    with pytest.raises(RatioMismatchError, match="stopped after 3 of 6 steps"):
        partial.check(nfe=6)
    lines = []
    resumed = _search(data, checkpoint=path, log=lines.append)
    assert [line.split(":")[0] for line in lines] == ["step 4/6", "step 5/6", "step 6/6"]
    assert resumed.ratios == pytest.approx(searched.ratios, abs=1e-12)
    assert DCRatios.load(path).complete
    # another NFE, model or datapoints cannot resume this file
    with pytest.raises(RatioMismatchError, match="model 'gmm16', not 'other'"):
        search_dc_ratios(DEN, DCSolver(), SCHEDULE, data[0], model_id="other", reference=data[1], checkpoint=path)
    with pytest.raises(RatioMismatchError, match="other datapoints"):
        search_dc_ratios(DEN, DCSolver(), SCHEDULE, data[0] + 1, model_id="gmm16", reference=data[1], checkpoint=path)


def test_guided_search_runs_through_the_guided_denoiser():
    from diffsamplers.models.conditional_gmm import ClassConditionalMixture

    mix = ClassConditionalMixture.random(3, 2, (1, 4, 4), seed=1)
    den = mix.as_denoiser(PROCESS)
    x_T = torch.randn(10, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(10) % 3
    cond, uncond = {"class_labels": labels}, {"class_labels": torch.full_like(labels, 3)}
    found = search_dc_ratios(
        den, DCSolver(), SCHEDULE, x_T, model_id="mix", cond=cond, uncond=uncond, guidance_scale=5.0
    )
    assert found.guidance_scale == 5.0 and found.search["reference_steps"] == 1000
    # the last iterate (as the paper takes it) need not beat ρ = 1 at every step, but it does overall
    before, after = found.search["loss_before"][2:], found.search["loss_after"][2:]
    assert after[-1] < before[-1] and sum(after) < sum(before)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(x_T=torch.randn(4, 1, 4, 4)), ValueError, "needs at least 10 datapoints .* got 4"),
        (dict(min_datapoints=0), ValueError, "min_datapoints must be at least 1"),
        (dict(iterations=0), ValueError, "iterations >= 1"),
        (dict(optimizer="sgd"), ValueError, "unknown optimizer 'sgd'"),
        (dict(bound="sigmoid"), ValueError, "unknown bound 'sigmoid'"),
        (dict(solver=UniPC()), TypeError, "solver must be a DCSolver"),
        (dict(reference=torch.zeros(3, 10, 1, 4, 4)), ValueError, "reference must have shape"),
    ],
)
def test_bad_input(data, kwargs, error, message):
    args = dict(x_T=data[0], reference=data[1], solver=DCSolver())
    args.update(kwargs)
    with pytest.raises(error, match=message):
        search_dc_ratios(DEN, args.pop("solver"), SCHEDULE, args.pop("x_T"), model_id="gmm16", **args)


def _trajectory_loss(ratios, x_T, ref):
    """Σ_k MSE(x_k, x^GT_k) of a DC-Solver run, recorded with a callback (independent of the search code)."""
    states = []
    sample(DEN, DCSolver(ratios), SCHEDULE, x_T=x_T, progress=False, callback=lambda info: states.append(info.x))
    out = sample(DEN, DCSolver(ratios), SCHEDULE, x_T=x_T, progress=False)
    xs = [*states[1:], out]  # the callback sees x before each step: levels 1 … N − 1, then the final sample
    return sum(float((x - r).pow(2).mean()) for x, r in zip(xs, ref[1:]))


def test_joint_refinement_lowers_the_trajectory_loss_it_reports(data, searched):
    """The refinement starts from the greedy ratios, keeps the first dc_order at 1, and its reported losses are
    the whole-trajectory loss of sampling with the greedy and the refined ratios."""
    x_T, ref = data
    refined = _search(data, refine_iterations=30)
    info = refined.search["refine"]
    assert refined.search["greedy_ratios"] == pytest.approx(searched.ratios, abs=1e-6)
    assert refined.ratios[:2] == [1.0, 1.0] and refined.ratios != refined.search["greedy_ratios"]
    assert info["done"] and info["loss_after"] < info["loss_before"]
    assert info["loss_before"] == pytest.approx(_trajectory_loss(searched.ratios, x_T, ref), rel=1e-4)
    assert info["loss_after"] == pytest.approx(_trajectory_loss(refined.ratios, x_T, ref), rel=1e-4)


def test_joint_refinement_resumes_and_redoes_only_what_changed(data, tmp_path):
    """A checkpoint with the greedy search complete is refined without searching again; asking for another
    refinement restarts it from the stored greedy ratios; bad refinement settings are refused."""
    path = tmp_path / "r.safetensors"
    greedy = _search(data, checkpoint=path)
    refined = _search(data, checkpoint=path, refine_iterations=10)
    assert refined.search["greedy_ratios"] == greedy.ratios
    assert refined.search["loss_after"] == greedy.search["loss_after"]  # greedy losses kept, not re-searched
    again = _search(data, checkpoint=path, refine_iterations=10)
    assert again.ratios == refined.ratios
    longer = _search(data, checkpoint=path, refine_iterations=20)
    assert longer.search["greedy_ratios"] == greedy.ratios
    assert longer.search["refine"]["loss_after"] <= refined.search["refine"]["loss_after"] + 1e-12
    with pytest.raises(ValueError, match="refine_iterations >= 0"):
        _search(data, refine_iterations=-1)
