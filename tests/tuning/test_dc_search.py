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
    x_val = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    val_labels = torch.arange(6) % 3
    val_cond, val_uncond = {"class_labels": val_labels}, {"class_labels": torch.full_like(val_labels, 3)}
    guided = dict(cond=val_cond, uncond=val_uncond, guidance_scale=5.0)
    val_ref = reference_trajectory(den, SCHEDULE, x_val, **guided)
    found = search_dc_ratios(
        den,
        DCSolver(),
        SCHEDULE,
        x_T,
        model_id="mix",
        cond=cond,
        uncond=uncond,
        guidance_scale=5.0,
        refine_iterations=3,
        refine_validation=x_val,
        refine_validation_cond=val_cond,
        refine_validation_uncond=val_uncond,
        refine_validation_reference=val_ref,
    )
    assert found.guidance_scale == 5.0 and found.search["reference_steps"] == 1000
    # the last iterate (as the paper takes it) need not beat ρ = 1 at every step, but it does overall
    before, after = found.search["loss_before"][2:], found.search["loss_after"][2:]
    assert after[-1] < before[-1] and sum(after) < sum(before)
    # the validation loss is the guided trajectory loss of the validation datapoints with their own labels
    info = found.search["refine"]
    greedy = found.search["greedy_ratios"]
    assert info["validation_loss_before"] == pytest.approx(
        _trajectory_loss(greedy, x_val, val_ref, den, **guided), rel=1e-4
    )
    assert info["validation_loss_after"] == pytest.approx(
        _trajectory_loss(found.ratios, x_val, val_ref, den, **guided), rel=1e-4
    )
    with pytest.raises(ValueError, match="the search has cond: give the validation datapoints' refine_validation_cond"):
        search_dc_ratios(
            den, DCSolver(), SCHEDULE, x_T, model_id="mix", cond=cond, uncond=uncond, refine_iterations=3,
            refine_validation=x_val,
        )  # fmt: skip


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


def _trajectory_loss(ratios, x_T, ref, den=DEN, **kw):
    """Σ_k MSE(x_k, x^GT_k) of a DC-Solver run, recorded with a callback (independent of the search code)."""
    states = []
    sample(den, DCSolver(ratios), SCHEDULE, x_T=x_T, progress=False, callback=lambda info: states.append(info.x), **kw)
    out = sample(den, DCSolver(ratios), SCHEDULE, x_T=x_T, progress=False, **kw)
    xs = [*states[1:], out]  # the callback sees x before each step: levels 1 … N − 1, then the final sample
    return sum(float((x - r).pow(2).mean()) for x, r in zip(xs, ref[1:]))


@pytest.fixture(scope="module")
def validation():
    x_val = torch.randn(16, *GMM.sample_shape, generator=torch.Generator().manual_seed(1))
    return x_val, reference_trajectory(DEN, SCHEDULE, x_val)


def _refined(data, validation, **kw):
    x_val, val_ref = validation
    kw.setdefault("refine_iterations", 30)
    return _search(data, refine_validation=x_val, refine_validation_reference=val_ref, **kw)


def test_unvalidated_refinement_lowers_the_trajectory_loss_it_reports(data, searched):
    """The opt-in unvalidated refinement (the best iterate on the search noises) starts from the greedy ratios,
    keeps the first dc_order at 1, and its reported losses are the whole-trajectory loss of sampling with the
    greedy and the refined ratios."""
    x_T, ref = data
    refined = _search(data, refine_iterations=30, refine_validation="search", refine_patience=None)
    info = refined.search["refine"]
    assert refined.search["greedy_ratios"] == pytest.approx(searched.ratios, abs=1e-6)
    assert refined.ratios[:2] == [1.0, 1.0] and refined.ratios != refined.search["greedy_ratios"]
    assert info["done"] and info["loss_after"] < info["loss_before"] and info["validation"] == "search"
    assert info["loss_before"] == pytest.approx(_trajectory_loss(searched.ratios, x_T, ref), rel=1e-4)
    assert info["loss_after"] == pytest.approx(_trajectory_loss(refined.ratios, x_T, ref), rel=1e-4)
    assert (info["validation_loss_before"], info["validation_loss_after"]) == (info["loss_before"], info["loss_after"])
    assert info["iterations_run"] == 30 and not info["stopped_early"]


def test_validated_refinement_is_never_worse_than_greedy_on_its_validation_noises(data, validation, searched):
    """The iterate kept is the one with the lowest trajectory loss on the validation noises, the greedy start
    included; the record holds both losses on both sets (each the loss of sampling with those ratios), and the
    validation reference is computed like the search's when not given."""
    x_T, ref = data
    x_val, val_ref = validation
    refined = _refined(data, validation, refine_patience=None)
    info = refined.search["refine"]
    assert refined.search["greedy_ratios"] == pytest.approx(searched.ratios, abs=1e-6)
    assert info["done"] and info["validation_loss_after"] <= info["validation_loss_before"]  # exactly: best-of
    assert info["validation_loss_before"] == pytest.approx(_trajectory_loss(searched.ratios, x_val, val_ref), rel=1e-4)
    assert info["validation_loss_after"] == pytest.approx(_trajectory_loss(refined.ratios, x_val, val_ref), rel=1e-4)
    assert info["loss_before"] == pytest.approx(_trajectory_loss(searched.ratios, x_T, ref), rel=1e-4)
    assert info["loss_after"] == pytest.approx(_trajectory_loss(refined.ratios, x_T, ref), rel=1e-4)
    assert 0 <= info["best_iteration"] <= info["iterations_run"] == 30 and info["stopped_early"] is False
    assert info["validation"]["datapoints"] == 16 and info["validation"]["reference_steps"] is None
    assert info["patience"] is None and info["seconds"] > 0
    if info["best_iteration"] == 0:
        assert refined.ratios == refined.search["greedy_ratios"]
    computed = _search(data, refine_iterations=30, refine_validation=x_val, refine_patience=None)
    assert computed.search["refine"]["validation"]["reference_steps"] == 1000
    assert computed.ratios == pytest.approx(refined.ratios, abs=1e-9)


def test_refinement_stops_when_patience_runs_out(data, validation):
    """Without a lower validation loss for ``refine_patience`` iterations the refinement stops; an overshooting
    first step (huge learning rate) leaves the greedy ratios."""
    overshoot = _refined(data, validation, refine_lr=5.0, refine_patience=1)
    info = overshoot.search["refine"]
    assert info["stopped_early"] and info["iterations_run"] == 1 and info["best_iteration"] == 0
    assert overshoot.ratios == overshoot.search["greedy_ratios"]
    assert info["validation_loss_after"] == info["validation_loss_before"]
    # Adam's first steps are not monotone on the validation noises (lower at iteration 1, higher for a while):
    # a small patience stops there, at an iterate that beats the greedy start
    patient = _refined(data, validation, refine_iterations=200, refine_patience=3)
    info = patient.search["refine"]
    assert info["stopped_early"] and info["iterations_run"] == info["best_iteration"] + 3 < 200
    assert info["validation_loss_after"] < info["validation_loss_before"]
    assert patient.ratios != patient.search["greedy_ratios"]


def test_refinement_resumes_and_redoes_only_what_changed(data, validation, tmp_path):
    """A checkpoint with the greedy search complete is refined without searching again; the same refinement
    resumes as done; other iterations or validation noises refine again from the stored greedy ratios; a file
    refined before validation existed counts as the unvalidated refinement without early stopping."""
    x_val, val_ref = validation
    path = tmp_path / "r.safetensors"
    greedy = _search(data, checkpoint=path)
    refined = _refined(data, validation, checkpoint=path, refine_iterations=10)
    assert refined.search["greedy_ratios"] == greedy.ratios
    assert refined.search["loss_after"] == greedy.search["loss_after"]  # greedy losses kept, not re-searched
    lines = []
    again = _refined(data, validation, checkpoint=path, refine_iterations=10, log=lines.append)
    assert again.ratios == refined.ratios and lines == []
    longer = _refined(data, validation, checkpoint=path, refine_iterations=20, log=lines.append)
    assert longer.search["greedy_ratios"] == greedy.ratios and lines[0].startswith("joint refinement")
    info, shorter = longer.search["refine"], refined.search["refine"]
    assert info["validation_loss_after"] <= shorter["validation_loss_after"] + 1e-12
    other = _search(data, checkpoint=path, refine_iterations=20, refine_validation=x_val[:8])
    assert other.search["refine"]["validation"]["data_fingerprint"] != info["validation"]["data_fingerprint"]
    assert other.search["greedy_ratios"] == greedy.ratios
    # a refinement recorded before validation existed: the same as refine_validation="search", no patience
    old = _search(data, checkpoint=path, refine_iterations=10, refine_validation="search", refine_patience=None)
    for key in ("validation", "patience", "validation_loss_before", "validation_loss_after", "best_iteration"):
        del old.search["refine"][key]
    old.save(path)
    lines.clear()
    resumed = _search(data, checkpoint=path, refine_iterations=10, refine_validation="search", refine_patience=None,
                      log=lines.append)  # fmt: skip
    assert resumed.ratios == old.ratios and lines == []
    validated = _refined(data, validation, checkpoint=path, refine_iterations=10, log=lines.append)
    assert validated.ratios == refined.ratios and len(lines) == 1


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(refine_iterations=-1), ValueError, "refine_iterations >= 0"),
        (dict(refine_validation=None), ValueError, "needs validation noises: refine_validation="),
        (
            dict(refine_validation="train"),
            ValueError,
            "refine_validation must be a tensor of initial noise or 'search'",
        ),
        (dict(refine_validation=torch.randn(8, 16)), ValueError, r"x_T's sample shape \(1, 4, 4\).*got \(8, 16\)"),
        (dict(refine_validation=torch.randn(8, 1, 4, 5)), ValueError, r"sample shape \(1, 4, 4\)"),
        (dict(refine_validation=torch.randn(0, 1, 4, 4)), ValueError, "at least one sample"),
        (dict(refine_validation_reference=torch.zeros(7, 3, 1, 4, 4)), ValueError, "refine_validation_reference must"),
        (dict(refine_patience=0), ValueError, "refine_patience must be >= 1 or None"),
    ],
)
def test_bad_refinement_input(data, kwargs, error, message):
    """Refused before the greedy search starts."""
    args = dict(refine_iterations=5, refine_validation=torch.randn(4, 1, 4, 4))
    args.update(kwargs)
    with pytest.raises(error, match=message):
        _search(data, **args)
