"""diffusers' scheduler contract for DPMSolverPlusPlusScheduler: config round trips, switching, outputs, errors."""

import json

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

from diffsamplers import DPMSolverPlusPlusScheduler, NonFiniteError
from diffsamplers.diagnostics import HostReadCounter
from tests.helpers import scheduler_loop

SD_PNDM = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    skip_prk_steps=True,
    set_alpha_to_one=False,
    steps_offset=1,
)


def _dummy(x, t):
    return x * t / (t + 1)


def test_save_load_round_trip(tmp_path):
    sched = DPMSolverPlusPlusScheduler(
        solver_order=3,
        prediction_type="v_prediction",
        use_karras_sigmas=True,
        trained_betas=np.linspace(1e-4, 0.02, 1000).tolist(),
    )
    sched.save_pretrained(tmp_path)
    loaded = DPMSolverPlusPlusScheduler.from_pretrained(tmp_path)
    strip = lambda c: {k: v for k, v in c.items() if k != "_use_default_values"}  # noqa: E731
    assert strip(loaded.config) == strip(sched.config)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(
        scheduler_loop(sched, x, _dummy, num_inference_steps=7),
        scheduler_loop(loaded, x, _dummy, num_inference_steps=7),
    )
    json.loads((tmp_path / "scheduler_config.json").read_text())


def test_step_after_reload_with_history_is_identical(tmp_path):
    """diffusers' check_over_configs: a saved/reloaded scheduler mid-run gives the same next step."""
    a = DPMSolverPlusPlusScheduler(solver_order=2)
    a.set_timesteps(10)
    a.save_config(tmp_path)
    b = DPMSolverPlusPlusScheduler.from_pretrained(tmp_path)
    b.set_timesteps(10)
    x = torch.randn(2, 3, 4, 4)
    for t in a.timesteps[:3]:
        xa = a.step(_dummy(x, t), t, x).prev_sample
        xb = b.step(_dummy(x, t), t, x).prev_sample
        assert torch.equal(xa, xb)
        x = xa


@pytest.mark.parametrize(
    "other",
    [
        DPMSolverMultistepScheduler,
        UniPCMultistepScheduler,
        EulerDiscreteScheduler,
        DDIMScheduler,
        DEISMultistepScheduler,
        DPMSolverSinglestepScheduler,
        DDPMScheduler,
    ],
    ids=lambda c: c.__name__,
)
def test_switching_to_and_from_diffusers_schedulers(other):
    source = other(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="v_prediction")
    ours = DPMSolverPlusPlusScheduler.from_config(source.config)
    assert ours.config.beta_schedule == "scaled_linear" and ours.config.prediction_type == "v_prediction"
    assert ours.config.algorithm_type in ("dpmsolver++", "sde-dpmsolver++")
    assert ours.config.solver_type in ("midpoint", "heun")
    back = other.from_config(ours.config)
    assert back.config.beta_schedule == "scaled_linear" and back.config.prediction_type == "v_prediction"
    x = torch.randn(1, 4, 8, 8)
    assert torch.isfinite(scheduler_loop(ours, x, _dummy, num_inference_steps=5)).all()


def test_switching_reproduces_dpm_solver_numbers():
    dpm = DPMSolverMultistepScheduler(solver_order=3)
    ours = DPMSolverPlusPlusScheduler.from_config(dpm.config)
    again = DPMSolverMultistepScheduler.from_config(ours.config)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = scheduler_loop(dpm, x, _dummy, num_inference_steps=10)
    assert torch.allclose(scheduler_loop(ours, x, _dummy, num_inference_steps=10), ref, atol=1e-5)
    assert torch.equal(scheduler_loop(again, x, _dummy, num_inference_steps=10), ref)


def test_stable_diffusion_pndm_config_keeps_hidden_keys(tmp_path):
    ours = DPMSolverPlusPlusScheduler.from_config(PNDMScheduler(**SD_PNDM).config)
    assert ours.config.steps_offset == 1
    ours.save_config(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["skip_prk_steps"] is True and saved["set_alpha_to_one"] is False
    # Defaults that were only defaults in PNDM ("leading") become ours ("linspace").
    assert ours.config.timestep_spacing == "linspace"


def test_public_api():
    sched = DPMSolverPlusPlusScheduler()
    assert sched.order == 1 and sched.init_noise_sigma == 1.0 and len(sched) == 1000
    assert DPMSolverMultistepScheduler in sched.compatibles
    sched.set_timesteps(12, device="cpu")
    assert sched.timesteps.dtype == torch.int64 and sched.timesteps.shape == (12,)
    assert sched.sigmas.shape == (13,) and sched.sigmas.device.type == "cpu"
    x = torch.randn(2, 3, 8, 8)
    assert sched.scale_model_input(x, sched.timesteps[0]) is x
    assert sched.step_index is None and sched.begin_index is None


def test_step_shape_tuple_and_dict():
    a, b = DPMSolverPlusPlusScheduler(), DPMSolverPlusPlusScheduler()
    for s in (a, b):
        s.set_timesteps(10)
    x = torch.randn(2, 3, 8, 8)
    ya, yb = x, x
    for t in a.timesteps[:2]:
        ya = a.step(_dummy(ya, t), t, ya, return_dict=True).prev_sample
        out = b.step(_dummy(yb, t), t, yb, return_dict=False)
        assert isinstance(out, tuple)
        yb = out[0]
        assert ya.shape == x.shape and torch.equal(ya, yb)


@pytest.mark.parametrize("algorithm", ["dpmsolver++", "sde-dpmsolver++"])
def test_fp16_in_fp16_out(algorithm):
    sched = DPMSolverPlusPlusScheduler(algorithm_type=algorithm)
    x = torch.randn(2, 3, 8, 8).half()
    out = scheduler_loop(sched, x, lambda s, t: (0.1 * s.float()).half(), num_inference_steps=10)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


def test_custom_timesteps_equal_the_default_loop():
    for final in ("zero", "sigma_min"):
        a = DPMSolverPlusPlusScheduler(final_sigmas_type=final)
        a.set_timesteps(10)
        ts = a.timesteps.tolist()
        x = torch.randn(2, 3, 8, 8)
        assert torch.equal(
            scheduler_loop(a, x, _dummy, num_inference_steps=10),
            scheduler_loop(DPMSolverPlusPlusScheduler(final_sigmas_type=final), x, _dummy, timesteps=ts),
        )


def test_custom_sigmas_are_used_exactly():
    ays = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.0]
    sched = DPMSolverPlusPlusScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    sched.set_timesteps(sigmas=ays)
    assert sched.num_inference_steps == 10
    np.testing.assert_allclose(sched.sigmas.numpy(), ays, rtol=1e-6)
    ref = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    ref.set_timesteps(sigmas=ays)
    np.testing.assert_allclose(sched.timesteps.numpy(), ref.timesteps.numpy(), atol=1e-3)


def test_add_noise():
    ours, ddpm = DPMSolverPlusPlusScheduler(), DDPMScheduler()
    x0, eps = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 250, 999, 500])
    # Training-style noising is the DDPM forward process. (diffusers' DPM-Solver scheduler gets this wrong
    # before set_timesteps: it looks training timesteps up in its reversed inference list.)
    assert torch.allclose(ours.add_noise(x0, eps, t), ddpm.add_noise(x0, eps, t), atol=1e-6)
    # img2img: the schedule's level at begin_index, before the first step, as diffusers does.
    theirs = DPMSolverMultistepScheduler()
    for s in (ours, theirs):
        s.set_timesteps(20)
        s.set_begin_index(5)
    ts = ours.timesteps[5:6].repeat(4)
    assert torch.allclose(ours.add_noise(x0, eps, ts), theirs.add_noise(x0, eps, ts), atol=1e-6)
    # Between training steps (not in diffusers): interpolated in log σ, with no device read.
    fresh = DPMSolverPlusPlusScheduler()
    with HostReadCounter() as counter:
        noisy = fresh.add_noise(x0, eps, torch.tensor([10.5, 11.0, 12.0, 998.0]))
    assert counter.total == 0
    lo, hi = (
        ddpm.add_noise(x0, eps, torch.tensor([10, 11, 12, 998]))[:1],
        ddpm.add_noise(x0, eps, torch.tensor([11, 11, 12, 998]))[:1],
    )
    assert torch.all((noisy[:1] - lo) * (noisy[:1] - hi) <= 1e-6)


def test_img2img_start_uses_lower_orders_like_diffusers():
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    outs = []
    for cls in (DPMSolverMultistepScheduler, DPMSolverPlusPlusScheduler):
        sched = cls(solver_order=3)
        sched.set_timesteps(20)
        sched.set_begin_index(8)
        y = x
        for t in sched.timesteps[8:]:
            y = sched.step(_dummy(y, t), t, y).prev_sample
        outs.append(y)
    assert torch.allclose(outs[0], outs[1], atol=1e-5)


def test_finds_the_step_index_without_reading_the_timestep_back():
    sched = DPMSolverPlusPlusScheduler()
    sched.set_timesteps(25)
    x = torch.randn(2, 3, 8, 8)
    with HostReadCounter() as counter:
        for t in sched.timesteps:
            x = sched.step(0.1 * x, t, x).prev_sample
    # one read in all: the NaN flag after the last step
    assert counter.total == 1, dict(counter.counts)
    sched.check_finite = False
    sched.set_timesteps(25)
    with HostReadCounter() as counter:
        for t in sched.timesteps[10:]:  # an img2img-style slice, no set_begin_index: a view of the same tensor
            x = sched.step(0.1 * x, t, x).prev_sample
    assert counter.total == 0 and sched.step_index == 25


def test_timestep_by_value_and_second_occurrence():
    sched = DPMSolverPlusPlusScheduler()
    sched.set_timesteps(10)
    x = torch.randn(1, 3, 4, 4)
    t = int(sched.timesteps[3])
    sched.step(0.1 * x, t, x)
    assert sched.step_index == 4
    sched.set_timesteps(10)
    with pytest.raises(ValueError, match="timestep 5 is not in the schedule"):
        sched.step(0.1 * x, 5, x)


def test_nan_model_output_names_the_step():
    sched = DPMSolverPlusPlusScheduler()
    sched.set_timesteps(6)
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(NonFiniteError, match=r"step 3 of 6 \(evaluation index 2, sigma=9.48892, timestep=666\)"):
        for i, t in enumerate(sched.timesteps):
            out = torch.full_like(x, float("nan")) if i == 2 else 0.1 * x
            x = sched.step(out, t, x).prev_sample


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda s: s.set_timesteps(0), ValueError, "num_steps must be >= 1, got 0"),
        (lambda s: s.set_timesteps(-2), ValueError, "num_steps must be >= 1, got -2"),
        (lambda s: s.set_timesteps(1001), ValueError, "num_steps=1001 is beyond the training schedule"),
        (lambda s: s.set_timesteps(), ValueError, "exactly one of num_inference_steps, timesteps or sigmas"),
        (lambda s: s.set_timesteps(5, timesteps=[999, 500]), ValueError, "exactly one of"),
        (lambda s: s.set_timesteps(timesteps=[999, 1500]), ValueError, "outside the model's range"),
        (lambda s: s.set_timesteps(sigmas=[1.0, 2.0, 0.0]), ValueError, "strictly decreasing"),
        (lambda s: s.set_timesteps(sigmas=[400.0, 1.0, 0.0]), ValueError, "outside the model's noise range"),
        (lambda s: s.set_timesteps(sigmas=[3.0, float("nan"), 0.0]), ValueError, "non-finite"),
        (lambda s: s.set_timesteps(5, mu=0.5), ValueError, "use_dynamic_shifting"),
        (lambda s: s.step(torch.zeros(1, 3), 999, torch.zeros(1, 3)), ValueError, "call set_timesteps"),
    ],
)
def test_bad_calls(make, error, message):
    with pytest.raises(error, match=message):
        make(DPMSolverPlusPlusScheduler())


def test_bad_step_inputs():
    sched = DPMSolverPlusPlusScheduler()
    sched.set_timesteps(2)
    with pytest.raises(
        ValueError, match=r"model_output shape \(1, 2, 4, 4\) does not match sample shape \(1, 3, 4, 4\)"
    ):
        sched.step(torch.zeros(1, 2, 4, 4), sched.timesteps[0], torch.zeros(1, 3, 4, 4))
    x = torch.zeros(1, 3, 4, 4)
    for t in sched.timesteps:
        x = sched.step(x, t, x).prev_sample
    with pytest.raises(ValueError, match="all 2 steps have been taken"):
        sched.step(x, sched.timesteps[-1], x)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(prediction_type="noise"), ValueError, "unknown prediction_type 'noise'"),
        (dict(algorithm_type="euler"), ValueError, "unknown algorithm_type 'euler'"),
        (dict(solver_type="rk4"), ValueError, "unknown solver_type 'rk4'"),
        (dict(solver_order=4), ValueError, "order must be 1, 2 or 3, got 4"),
        (dict(timestep_spacing="cosine"), ValueError, "unknown timestep_spacing 'cosine'"),
        (dict(use_karras_sigmas=True, use_lu_lambdas=True), ValueError, "only one of"),
        (dict(final_sigmas_type="none"), ValueError, "final_sigmas_type must be"),
        (dict(beta_schedule="sigmoid"), ValueError, "unknown beta_schedule 'sigmoid'"),
        (dict(third_order="exact"), ValueError, "unknown third_order form 'exact'"),
        (
            dict(trained_betas=torch.linspace(1e-4, 0.02, 1000)),
            TypeError,
            "trained_betas=Tensor is not JSON-serialisable",
        ),
        (dict(steps_offset=object()), TypeError, "steps_offset=object is not JSON-serialisable"),
    ],
)
def test_bad_config(kwargs, error, message):
    with pytest.raises(error, match=message):
        DPMSolverPlusPlusScheduler(**kwargs)
