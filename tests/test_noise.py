"""Noise processes: inverses, scalings, and diffusers' training tables reproduced exactly."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

from diffsamplers.noise import (
    ContinuousVP,
    DiscreteVP,
    RectifiedFlow,
    VarianceExploding,
    noise_process_from_config,
)

PROCESSES = [
    DiscreteVP.from_beta_schedule("linear"),
    DiscreteVP.from_beta_schedule("scaled_linear", 0.00085, 0.012),
    DiscreteVP.from_beta_schedule("squaredcos_cap_v2"),
    ContinuousVP("linear"),
    ContinuousVP("cosine"),
    VarianceExploding(0.002, 80.0),
    VarianceExploding(0.002, 80.0, timestep="edm"),
    RectifiedFlow(),
]


@pytest.mark.parametrize("process", PROCESSES, ids=lambda p: repr(p)[:40])
def test_lambda_inverse_and_scaling(process):
    t = np.linspace(process.t_min, process.t_max, 97)
    lam = process.lambda_(t)
    assert np.all(np.diff(lam) < 0), "λ must fall with t"
    np.testing.assert_allclose(process.t_from_lambda(lam), t, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(process.t_from_timestep(process.timestep(t)), t, rtol=1e-10, atol=1e-12)
    alpha, sigma = process.alpha(t), process.sigma(t)
    np.testing.assert_allclose(np.log(alpha / sigma), lam, rtol=1e-10, atol=1e-10)
    if process.scaling == "vp":
        np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, rtol=1e-12)
    elif process.scaling == "flow":
        np.testing.assert_allclose(alpha + sigma, 1.0, rtol=1e-12)
    else:
        np.testing.assert_allclose(alpha, 1.0)
    # σ̃ = 0 is the clean end for every scaling.
    a0, s0 = process.alpha_sigma(0.0)
    assert a0 == 1.0 and s0 == 0.0


@pytest.mark.parametrize(
    "config",
    [
        dict(beta_schedule="linear"),
        dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        dict(beta_schedule="squaredcos_cap_v2"),
        dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True),
        dict(trained_betas=np.linspace(1e-4, 2e-2, 50).tolist(), num_train_timesteps=50),
    ],
)
def test_discrete_vp_is_diffusers_training_table(config):
    ref = DPMSolverMultistepScheduler(**config)
    process = noise_process_from_config(dict(ref.config))
    assert isinstance(process, DiscreteVP)
    # Bit-identical float32 table, then float64.
    np.testing.assert_array_equal(process.alphas_cumprod.astype(np.float32), ref.alphas_cumprod.numpy())
    n = process.num_train_timesteps
    np.testing.assert_allclose(process.sigma_tilde(np.arange(n)), ref.sigmas.double().numpy()[:n], rtol=2e-6)


def test_discrete_interpolation_is_log_sigma_linear():
    process = DiscreteVP.from_beta_schedule("linear")
    log_s = np.log(process.sigma_tilde(np.array([10.0, 11.0])))
    mid = process.sigma_tilde(10.25)
    assert math.isclose(math.log(mid), 0.75 * log_s[0] + 0.25 * log_s[1], rel_tol=1e-12)


def test_from_ddpm_config_and_round_trip():
    process = noise_process_from_config(dict(DDPMScheduler().config))
    again = noise_process_from_config(process.to_config())
    np.testing.assert_array_equal(process.alphas_cumprod, again.alphas_cumprod)
    for p in PROCESSES[3:]:
        q = noise_process_from_config(p.to_config())
        t = np.linspace(p.t_min, p.t_max, 5)
        np.testing.assert_allclose(q.lambda_(t), p.lambda_(t))
    flow = noise_process_from_config({"num_train_timesteps": 1000, "use_flow_sigmas": True})
    assert isinstance(flow, RectifiedFlow) and flow.timestep(0.5) == 500.0


def test_continuous_vp_linear_matches_closed_form():
    p = ContinuousVP("linear", beta_min=0.1, beta_max=20.0)
    t = 0.37
    log_alpha = -0.25 * t**2 * 19.9 - 0.5 * t * 0.1
    assert math.isclose(float(p.alpha(t)), math.exp(log_alpha), rel_tol=1e-12)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(beta_schedule="quadratic"), "unknown beta_schedule 'quadratic'"),
        (dict(beta_schedule="linear", beta_start=0.0), "betas must lie in"),
        (dict(num_train_timesteps=0), "num_train_timesteps must be a positive integer"),
    ],
)
def test_bad_training_schedules(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DiscreteVP.from_beta_schedule(**kwargs)


def test_bad_process_arguments():
    with pytest.raises(ValueError, match="strictly decreasing"):
        DiscreteVP([0.9, 0.95, 0.5])
    with pytest.raises(ValueError, match="t_max < 1"):
        RectifiedFlow(t_max=1.0)
    with pytest.raises(ValueError, match="unknown continuous VP schedule"):
        ContinuousVP("sigmoid")
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        VarianceExploding(1.0, 0.5)
    with pytest.raises(ValueError, match="unknown noise process type"):
        noise_process_from_config({"type": "banana"})


def test_float64_on_host():
    p = DiscreteVP.from_beta_schedule()
    assert p.lambda_(np.array([1.0, 2.0])).dtype == np.float64
    assert isinstance(p.alphas_cumprod, np.ndarray) and not isinstance(p.alphas_cumprod, torch.Tensor)
