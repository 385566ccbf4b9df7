"""Flow-matching configs: a plain ``from_config(FlowMatchEuler config)`` gives the flow scheduler it means, and
``set_timesteps`` follows ``FlowMatchEulerDiscreteScheduler`` on flow configs (sigmas without the final level,
σ = 1 allowed, ``mu``, ``shift_terminal``, ``timesteps=``).

The flow model is the exact Gaussian mixture under the rectified-flow path x_t = (1 − t) x0 + t ε, predicting the
velocity v = ε − x0 (diffusers' ``flow_prediction``) at timestep 1000·t.
"""

import logging
import math

import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from diffsamplers import DCSolverScheduler, DPMSolverPlusPlusScheduler
from diffsamplers.adapters.source_config import is_flow_matching_config
from tests.helpers import SMOOTH_MIXTURE, rms, scheduler_loop

pytestmark = pytest.mark.usefixtures("single_thread")

#: Stable Diffusion 3 / 3.5's scheduler config, and Flux's (dynamic shifting; the pipeline passes μ).
SD3 = dict(num_train_timesteps=1000, shift=3.0)
FLUX = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)
BY_HAND = dict(use_flow_sigmas=True, prediction_type="flow_prediction")
PAIRS = [(DPMSolverPlusPlusScheduler, DPMSolverMultistepScheduler), (DCSolverScheduler, UniPCMultistepScheduler)]


def velocity(x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """The exact flow model: v = ε̂ − x̂0 = (x − x̂0)/t at t = timestep/1000 (t = 1 included: x̂0 is the mean)."""
    t = float(timestep) / 1000.0
    x0 = SMOOTH_MIXTURE.denoise(x.double(), 1.0 - t, t)
    return ((x.double() - x0) / t).float()


def x_T(seed: int = 0, batch: int = 4) -> torch.Tensor:
    return torch.randn((batch, *SMOOTH_MIXTURE.sample_shape), generator=torch.Generator().manual_seed(seed))


def flow_match(**config) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(**config)


# -- from_config ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ours, theirs", PAIRS, ids=["dpm", "dc"])
@pytest.mark.parametrize("source", [SD3, FLUX], ids=["sd3", "flux"])
def test_plain_from_config_builds_the_flow_scheduler(ours, theirs, source):
    scheduler = ours.from_config(flow_match(**source).config)
    cfg = scheduler.config
    assert cfg.use_flow_sigmas and cfg.prediction_type == "flow_prediction" and cfg.flow_shift == 3.0
    assert cfg.use_dynamic_shifting == source.get("use_dynamic_shifting", False)
    for key in ("base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len"):  # the pipelines read them
        assert cfg[key] == flow_match(**source).config[key]
    assert "shift" not in cfg and "invert_sigmas" not in cfg


@pytest.mark.parametrize("ours, theirs", PAIRS, ids=["dpm", "dc"])
@pytest.mark.parametrize(
    "source, kwargs",
    [(SD3, {}), (FLUX, {"mu": 0.8}), (FLUX, {"mu": -0.3})],
    ids=["sd3", "flux-mu0.8", "flux-mu-0.3"],
)
@pytest.mark.parametrize("steps", [5, 12, 28])
def test_flow_loop_equals_diffusers_configured_by_hand(ours, theirs, source, kwargs, steps):
    """Sampling the exact flow model with the plain ``from_config`` scheduler gives diffusers' flow DPM-Solver++ /
    UniPC configured with the flow keys by hand, to float32 rounding."""
    config = flow_match(**source).config
    a = ours.from_config(config)
    b = theirs.from_config(config, **BY_HAND, flow_shift=source["shift"])
    x = x_T()
    out_a = scheduler_loop(a, x, velocity, num_inference_steps=steps, **kwargs)
    out_b = scheduler_loop(b, x, velocity, num_inference_steps=steps, **kwargs)
    assert torch.equal(a.timesteps, b.timesteps) and torch.equal(a.sigmas, b.sigmas)
    assert (out_a - out_b).abs().max() <= 1e-5
    assert out_a.abs().mean() < 3.0  # a flow sample, not the ε-prediction garbage (mean |x| ≈ 1e2)


def test_plain_diffusers_from_config_is_not_a_flow_scheduler():
    """What the issue measured, kept as a check on the premise: diffusers' own class reads the config as VP."""
    b = DPMSolverMultistepScheduler.from_config(flow_match(**SD3).config)
    assert b.config.prediction_type == "epsilon" and not b.config.use_flow_sigmas
    out = scheduler_loop(b, x_T(), velocity, num_inference_steps=28)
    a = DPMSolverPlusPlusScheduler.from_config(flow_match(**SD3).config)
    ours = scheduler_loop(a, x_T(), velocity, num_inference_steps=28)
    assert out.abs().mean() > 3.0 and rms(out, ours) > 1.0


def test_from_pretrained_reads_a_saved_flow_match_folder(tmp_path):
    flow_match(**FLUX).save_pretrained(tmp_path)
    scheduler = DPMSolverPlusPlusScheduler.from_pretrained(tmp_path)
    assert scheduler.config.use_flow_sigmas and scheduler.config.use_dynamic_shifting
    scheduler.save_pretrained(tmp_path / "ours")  # and our own config round-trips unchanged
    again = DPMSolverPlusPlusScheduler.from_pretrained(tmp_path / "ours")
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(again.config) == public(scheduler.config)


def test_time_shift_keys_survive_the_translation():
    scheduler = DPMSolverPlusPlusScheduler.from_config(flow_match(**SD3).config, exposure_bias_shift_half_width=3)
    assert scheduler.config.use_flow_sigmas and scheduler.config.exposure_bias_shift_half_width == 3
    out = scheduler_loop(scheduler, x_T(), velocity, num_inference_steps=10)
    assert torch.isfinite(out).all()


def test_overrides_win(caplog):
    config = flow_match(**SD3).config
    scheduler = DPMSolverPlusPlusScheduler.from_config(config, flow_shift=5.0, solver_order=3)
    assert scheduler.config.flow_shift == 5.0 and scheduler.config.solver_order == 3
    with caplog.at_level(logging.WARNING):
        vp = DPMSolverPlusPlusScheduler.from_config(config, use_flow_sigmas=False)
    assert not vp.config.use_flow_sigmas and vp.config.prediction_type == "epsilon"
    assert "use_flow_sigmas=False" in caplog.text and "'shift': 3.0" in caplog.text


def test_stochastic_sampling_is_not_carried_and_says_so(caplog):
    with caplog.at_level(logging.WARNING):
        scheduler = DCSolverScheduler.from_config(flow_match(stochastic_sampling=True).config)
    assert scheduler.config.use_flow_sigmas
    assert "stochastic_sampling=True" in caplog.text


def test_a_foreign_class_with_a_shift_key_is_read_as_flow_with_a_warning(caplog):
    config = {"_class_name": "MyFlowScheduler", "num_train_timesteps": 1000, "shift": 2.0}
    assert is_flow_matching_config(config)
    with caplog.at_level(logging.WARNING):
        scheduler = DPMSolverPlusPlusScheduler.from_config(config)
    assert scheduler.config.use_flow_sigmas and scheduler.config.flow_shift == 2.0
    assert "MyFlowScheduler" in caplog.text and "use_flow_sigmas=False" in caplog.text
    assert not is_flow_matching_config(dict(DPMSolverMultistepScheduler().config))


# -- FlowMatchEuler's set_timesteps ----------------------------------------------------------------------------------
@pytest.mark.parametrize("ours", [DPMSolverPlusPlusScheduler, DCSolverScheduler], ids=["dpm", "dc"])
@pytest.mark.parametrize(
    "source, kwargs",
    [
        (SD3, {}),
        (FLUX, {"mu": 0.8}),
        (dict(FLUX, time_shift_type="linear"), {"mu": 1.7}),
        (dict(SD3, shift_terminal=0.1), {}),
    ],
    ids=["sd3", "flux", "linear-shift", "shift-terminal"],
)
def test_custom_sigmas_follow_flow_match_euler(ours, source, kwargs):
    """n sigmas from σ = 1 (what the Flux pipeline passes): FlowMatchEuler's n shifted levels and the final 0, so
    the pipeline gets the step count it asked for."""
    sigmas = np.linspace(1.0, 1 / 8, 8)
    reference = flow_match(**source)
    reference.set_timesteps(sigmas=sigmas, **kwargs)
    scheduler = ours.from_config(flow_match(**source).config)
    scheduler.set_timesteps(sigmas=sigmas, **kwargs)
    assert len(scheduler.timesteps) == scheduler.num_inference_steps == 8
    assert torch.allclose(scheduler.sigmas[1:], reference.sigmas[1:], atol=2e-7, rtol=0)
    # σ = 1 is kept as asked by DPM-Solver (and planned at 1 − 10⁻⁶); diffusers' UniPC stores 1 − 10⁻⁶
    first = 1.0 if ours is DPMSolverPlusPlusScheduler else np.float32(1 - 1e-6)
    assert scheduler.sigmas[0] == first and scheduler.sigmas[-1] == 0.0
    if ours is DPMSolverPlusPlusScheduler:  # FlowMatchEuler's float timesteps (to one float32 ulp at 1000)
        assert torch.allclose(scheduler.timesteps, reference.timesteps, atol=1.3e-4, rtol=0)
    else:  # diffusers' UniPC's (truncated) timesteps and levels
        unipc = UniPCMultistepScheduler.from_config(flow_match(**source).config, **BY_HAND, flow_shift=source["shift"])
        unipc.set_timesteps(sigmas=sigmas, **kwargs)
        assert torch.equal(scheduler.timesteps, unipc.timesteps) and torch.equal(scheduler.sigmas, unipc.sigmas)
    out = scheduler_loop(scheduler, x_T(), velocity, sigmas=sigmas, **kwargs)
    assert torch.isfinite(out).all()


def test_timesteps_follow_flow_match_euler():
    """``timesteps=`` alone: levels timesteps/N shifted, the network gets the timesteps as given; with ``sigmas``:
    both as given (shifted sigmas)."""
    timesteps = [1000.0, 750.0, 500.0, 250.0]
    reference = flow_match(**SD3)
    reference.set_timesteps(timesteps=timesteps)
    scheduler = DPMSolverPlusPlusScheduler.from_config(flow_match(**SD3).config)
    scheduler.set_timesteps(timesteps=timesteps)
    assert torch.equal(scheduler.timesteps, reference.timesteps)
    assert torch.allclose(scheduler.sigmas, reference.sigmas, atol=2e-7, rtol=0)
    sigmas = [1.0, 0.6, 0.3, 0.1]
    reference.set_timesteps(sigmas=sigmas, timesteps=timesteps, num_inference_steps=4)
    scheduler.set_timesteps(sigmas=sigmas, timesteps=timesteps, num_inference_steps=4)
    assert torch.equal(scheduler.timesteps, reference.timesteps)
    assert torch.allclose(scheduler.sigmas, reference.sigmas, atol=2e-7, rtol=0)


def _fine_flow_solution(x: torch.Tensor, steps: int = 4000) -> torch.Tensor:
    """FlowMatchEuler with many steps from t = 1 (first order: error O(1/steps))."""
    reference = flow_match(num_train_timesteps=1000, shift=1.0)
    return scheduler_loop(reference, x.double(), lambda y, t: velocity(y, t).double(), num_inference_steps=steps)


def test_a_grid_from_pure_noise_is_sampled_accurately():
    """From σ = 1 (the model's first call at pure noise) our DPM-Solver++ 2M with FlowMatchEuler's 8 sigmas is far
    nearer the ODE solution than FlowMatchEuler's own 8 Euler steps on the same sigmas."""
    x = x_T(3, batch=8)
    truth = _fine_flow_solution(x)
    sigmas = np.linspace(1.0, 1 / 8, 8)
    ours = DPMSolverPlusPlusScheduler.from_config(flow_match(num_train_timesteps=1000).config)
    euler = flow_match(num_train_timesteps=1000)
    error_ours = rms(scheduler_loop(ours, x, velocity, sigmas=sigmas), truth)
    error_euler = rms(scheduler_loop(euler, x, velocity, sigmas=sigmas), truth)
    assert error_ours < 0.5 * error_euler, (error_ours, error_euler)


# -- bad input -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "ours, option",
    [
        (ours, option)
        for ours in (DPMSolverPlusPlusScheduler, DCSolverScheduler)
        for option in ("use_exponential_sigmas", "use_beta_sigmas", "use_karras_sigmas")
        # UniPC converts Karras sigmas to flow times: defined, and parity-tested in test_unipc_parity.py
        if (ours, option) != (DCSolverScheduler, "use_karras_sigmas")
    ],
)
def test_a_vp_only_option_on_a_flow_config_is_refused(ours, option):
    with pytest.raises(ValueError, match=f"{option}=True with use_flow_sigmas=True"):
        ours.from_config(flow_match(**SD3, **{option: True}).config)


@pytest.mark.parametrize("ours", [DPMSolverPlusPlusScheduler, DCSolverScheduler], ids=["dpm", "dc"])
@pytest.mark.parametrize(
    "call, message",
    [
        (lambda s: s.set_timesteps(8), "mu must be passed to set_timesteps when use_dynamic_shifting=True"),
        (lambda s: s.set_timesteps(sigmas=[1.0, 0.5, 0.7], mu=0.5), r"strictly decreasing, got \[1.0, 0.5, 0.7\]"),
        (lambda s: s.set_timesteps(sigmas=[1.5, 0.5], mu=0.5), r"flow times in \(0, 1\].*got \[1.5\]"),
        (lambda s: s.set_timesteps(sigmas=[1.0, 0.5, 0.0], mu=0.5), r"flow times in \(0, 1\].*got \[0.0\]"),
        (lambda s: s.set_timesteps(sigmas=[1.0, float("nan")], mu=0.5), r"flow times in \(0, 1\].*nan"),
        (lambda s: s.set_timesteps(sigmas=[], mu=0.5), "must not be empty"),
        (lambda s: s.set_timesteps(3, sigmas=[1.0, 0.5], mu=0.5), "num_inference_steps=3 does not match the 2"),
        (lambda s: s.set_timesteps(sigmas=[1.0, 0.5], timesteps=[900.0], mu=0.5), r"sigmas \(2\) and timesteps \(1\)"),
        (lambda s: s.set_timesteps(8, mu=float("inf")), "mu must be finite"),
    ],
    ids=["no-mu", "rising", "above-1", "zero", "nan", "empty", "count", "lengths", "inf-mu"],
)
def test_bad_flow_calls(ours, call, message):
    scheduler = ours.from_config(flow_match(**FLUX).config)
    with pytest.raises(ValueError, match=message):
        call(scheduler)


def test_contradictory_flow_keys_are_refused():
    with pytest.raises(ValueError, match="prediction_type='flow_prediction' with use_flow_sigmas=False"):
        DPMSolverPlusPlusScheduler(prediction_type="flow_prediction")
    with pytest.raises(ValueError, match="invert_sigmas=True"):
        DPMSolverPlusPlusScheduler.from_config(flow_match(invert_sigmas=True).config)
    ok = DPMSolverPlusPlusScheduler.from_config(flow_match(invert_sigmas=True).config, invert_sigmas=False)
    assert ok.config.use_flow_sigmas
    with pytest.raises(ValueError, match="time_shift_type.*cubic"):
        DCSolverScheduler(**BY_HAND, time_shift_type="cubic")
    with pytest.raises(ValueError, match="shift_terminal must lie in"):
        DPMSolverPlusPlusScheduler(**BY_HAND, shift_terminal=1.5)
    with pytest.raises(ValueError, match="mu=0.5 is the dynamic flow shift"):
        DPMSolverPlusPlusScheduler().set_timesteps(8, mu=0.5)


def test_mu_without_dynamic_shifting_is_ignored_on_flow_configs():
    """As FlowMatchEuler and UniPC: the Flux pipeline passes μ whatever the scheduler's config says."""
    a = DPMSolverPlusPlusScheduler.from_config(flow_match(**SD3).config)
    b = DPMSolverPlusPlusScheduler.from_config(flow_match(**SD3).config)
    a.set_timesteps(10, mu=0.8)
    b.set_timesteps(10)
    assert torch.equal(a.sigmas, b.sigmas) and a.config.flow_shift == 3.0


def test_dpm_solver_takes_the_linear_time_shift_and_shift_terminal():
    """Extensions of diffusers' DPM-Solver (UniPC has them): μ as the shift, and the stretch to the terminal time."""
    scheduler = DPMSolverPlusPlusScheduler(**BY_HAND, use_dynamic_shifting=True, time_shift_type="linear")
    scheduler.set_timesteps(10, mu=2.0)
    static = DPMSolverPlusPlusScheduler(**BY_HAND, flow_shift=2.0)
    static.set_timesteps(10)
    assert torch.equal(scheduler.sigmas, static.sigmas)
    stretched = DPMSolverPlusPlusScheduler(**BY_HAND, flow_shift=3.0, shift_terminal=0.05)
    stretched.set_timesteps(10)
    assert math.isclose(float(stretched.sigmas[-2]), 0.05, rel_tol=1e-6) and stretched.sigmas[-1] == 0.0
