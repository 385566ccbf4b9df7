"""The one model registry: every spec form, the bundle's conditions and draws, FD-digits, evaluation sets, and
DC-Solver as a sampler of the jobs."""

import pytest
import torch

from diffsamplers.apps.evaluation import evaluate, validation_set
from diffsamplers.apps.recipes import OutsideFitError
from diffsamplers.apps.registry import MODELS, ModelBundle, load_model, register_model
from diffsamplers.apps.samplers import make_sampler
from diffsamplers.metrics.fd_digits import fd_digits
from diffsamplers.models.gmm import default_mixture
from diffsamplers.noise import RectifiedFlow
from diffsamplers.reference import reference_samples
from diffsamplers.solvers.dc_ratios import DCRatios


def test_digits_bundle_and_fd_digits():
    bundle = load_model("digits")
    assert bundle.sample_shape == (1, 16, 16) and bundle.num_classes == 10 and bundle.null_class == 10
    assert bundle.folder is not None and bundle.scheduler_config["prediction_type"] == "v_prediction"
    x, labels = bundle.data
    assert x.shape == (1438, 1, 16, 16) and labels.shape == (1438,)
    assert bundle.sample_metric("fd-digits") is fd_digits
    subset = torch.randperm(1438, generator=torch.Generator().manual_seed(0))[:359]
    real = fd_digits(x[subset])  # a random subset, as large as the held-out split (whose FD-digits is 9.6)
    noise = fd_digits(torch.rand(359, 1, 16, 16) * 2 - 1)
    assert fd_digits(x) < 1e-6 and real < 25.0 and noise > 10 * real
    with pytest.raises(ValueError, match="unknown sample metric 'fid' for model 'digits': it has \\['fd-digits'\\]"):
        bundle.sample_metric("fid")


def test_gmm_flow_bundle_is_the_mixture_on_the_rectified_flow():
    bundle, gmm = load_model("gmm-flow"), default_mixture()
    process = bundle.process
    assert isinstance(process, RectifiedFlow) and process.to_config() == {
        "type": "flow",
        "t_min": 1e-6,
        "t_max": 1.0 - 1e-6,
        "timestep_scale": 1000.0,
    }
    assert bundle.scheduler_config == {
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "num_train_timesteps": 1000,
        "shift": 3.0,
    }
    assert bundle.sample_shape == (1, 8, 8) and bundle.num_classes == 0 and bundle.description
    x = bundle.draw(4, seed=0).x_T.double()
    assert torch.equal(x, torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)).double())
    # The exact denoiser at x_t = (1 − t) x0 + t ε, and the velocity network (timestep 1000·t) diffusers runs.
    t = 0.3
    assert torch.allclose(bundle.denoiser(x, t), gmm.denoise(x, 1 - t, t), atol=1e-12)
    v = bundle.denoiser.model(x, torch.tensor(1000.0 * t)).sample
    assert bundle.denoiser.prediction_type == "flow_prediction"
    assert torch.allclose(x - t * v, gmm.denoise(x, 1 - t, t), atol=1e-12)  # x̂0 = x − σ v


@pytest.mark.parametrize(
    "solver, schedule",
    [
        ("dpm++2m", "flow:shift=3"),
        ("unipc", "logsnr"),
        ("diffusers:FlowMatchEulerDiscreteScheduler", "linspace"),  # the model's own config; the spacing is unused
        ("diffusers:DPMSolverMultistepScheduler:use_flow_sigmas=true,prediction_type=flow_prediction", "linspace"),
    ],
)
def test_gmm_flow_samples_with_ours_and_diffusers_flow_schedulers(solver, schedule):
    images, labels = make_sampler(load_model("gmm-flow"), solver, 8, schedule, seed=1)(range(3))
    assert images.dtype == torch.uint8 and images.shape == (3, 1, 8, 8) and labels is None
    assert 0 < float(images.double().std())


def test_gmm_flow_refuses_diffusers_vp_spacings_with_a_hint():
    with pytest.raises(ValueError, match="schedule 'linspace' is diffusers' integer-timestep spacing .* use flow"):
        make_sampler(load_model("gmm-flow"), "dpm++2m", 8, "linspace")


def test_draws_are_seeded_and_carry_the_conditions():
    bundle = load_model("gmm-cond")
    a, b = bundle.draw(6, seed=3, guidance_scale=7.5), bundle.draw(6, seed=3, guidance_scale=7.5)
    assert torch.equal(a.x_T, b.x_T) and torch.equal(a.labels, b.labels)
    assert torch.equal(a.cond["class_labels"], a.labels) and a.uncond["class_labels"].tolist() == [bundle.null_class]
    assert bundle.draw(6, seed=3).uncond is None  # unguided: no unconditional input
    assert not torch.equal(bundle.draw(6, seed=4).x_T, a.x_T)
    # the same noise as a plain generator draw of that seed (the DC tables' draws are unchanged by the registry)
    g = torch.Generator().manual_seed(3)
    assert torch.equal(a.x_T, torch.randn(6, *bundle.sample_shape, generator=g))
    assert torch.equal(a.labels, torch.randint(0, bundle.num_classes, (6,), generator=g))
    with pytest.raises(ValueError, match="unconditional: it has no guidance scale 2"):
        load_model("gmm").draw(2, seed=0, guidance_scale=2.0)
    with pytest.raises(ValueError, match="--classes must be class labels in 0..9, got \\[3, 12\\]"):
        bundle.check_classes([3, 12], "--classes")


def test_every_spec_form_and_the_error_for_an_unknown_one(tmp_path, monkeypatch):
    for name in ("gmm", "gmm-cond", "gmm-flow"):
        bundle = load_model(name)
        assert bundle.name == name and bundle.sample_shape == (1, 8, 8)
    with pytest.raises(
        ValueError, match="unknown model 'cifar': expected digits, gmm, gmm-cond, gmm-flow, text, a diffusers pipeline"
    ):
        load_model("cifar")
    with pytest.raises(FileNotFoundError, match="is not a diffusers pipeline folder"):
        load_model(str(tmp_path))
    with pytest.raises(ValueError, match="cannot import 'nothing' from 'diffsamplers.models.gmm'"):
        load_model("diffsamplers.models.gmm:nothing")
    with pytest.raises(TypeError, match="returned GaussianMixture, not a ModelBundle"):
        load_model("diffsamplers.models.gmm:default_mixture")
    monkeypatch.setitem(MODELS, "tiny", lambda: ModelBundle("tiny", load_model("gmm").denoiser, (1, 8, 8)))
    assert load_model("tiny").name == "tiny"
    register_model("tiny2", MODELS["tiny"])
    try:
        assert load_model("tiny2").name == "tiny"
    finally:
        MODELS.pop("tiny2")


def test_evaluation_sets_use_the_one_reference_and_score_sample_metrics():
    bundle = load_model("gmm")
    held_out = validation_set(bundle, 8, seed=1, reference_steps=50)
    assert torch.equal(held_out.x_T, bundle.draw(8, seed=1).x_T)
    assert torch.equal(held_out.reference, reference_samples(bundle.denoiser, held_out.x_T, steps=50))
    result = evaluate(bundle, held_out, lambda x, c: held_out.reference.float())
    assert result["rms"] < 1e-6
    digits = load_model("digits")
    evaluation = validation_set(digits, 4, seed=1, reference_steps=0)
    assert evaluation.reference is None
    assert evaluate(digits, evaluation, lambda x, c: torch.zeros_like(x), ()) == {}
    with pytest.raises(ValueError, match="reference_steps must be >= 0"):
        validation_set(digits, 4, seed=1, reference_steps=-1)


def _ratio_file(path, nfe):
    DCRatios([1.0] * nfe, "digits", 1.0, {}, {}).save(path)
    return path


def test_dc_solver_sampler_from_a_ratio_file(tmp_path):
    bundle = load_model("digits")
    path = _ratio_file(tmp_path / "r4.safetensors", 4)
    dc = make_sampler(bundle, f"dc-solver:{path}", 4, "linspace/sigma_min", seed=5, batch_size=8)
    unipc = make_sampler(bundle, "unipc", 4, "linspace/sigma_min", seed=5, batch_size=8)
    (a, la), (b, lb) = dc(range(6)), unipc(range(6))
    assert torch.equal(la, lb)
    assert (a.int() - b.int()).abs().max() <= 1  # ratios of 1 are UniPC (up to uint8 rounding)
    with pytest.raises(ValueError, match="searched for NFE 4, but this run has NFE 6"):
        make_sampler(bundle, f"dc-solver:{path}", 6, "linspace/sigma_min")
    with pytest.raises(FileNotFoundError, match="no DC-Solver ratios"):
        make_sampler(bundle, f"dc-solver:{tmp_path / 'missing.safetensors'}", 4)


def test_bundled_cpr_gives_dc_solver_ratios_inside_its_fit_only():
    from diffsamplers.solvers.dc_cpr import CascadePolynomialRegression

    bundle = load_model("digits")
    cpr = CascadePolynomialRegression.load(bundle.folder / "dc_solver_cpr.safetensors")
    assert cpr.model == "digits" and cpr.nfe_range == (5, 10)
    images, _ = make_sampler(bundle, "dc-solver", 6, "linspace/sigma_min", seed=1, batch_size=4)(range(4))
    assert images.dtype == torch.uint8 and images.shape == (4, 1, 16, 16)
    with pytest.raises(OutsideFitError, match="fitted on NFE 5–10"):
        make_sampler(bundle, "dc-solver", 20, "linspace/sigma_min")
    with pytest.raises(ValueError, match="this model has no folder"):
        make_sampler(load_model("gmm"), "dc-solver", 6)
