"""Full-loop parity of DCSolverScheduler (ratios = 1, i.e. UniPC) with diffusers' UniPCMultistepScheduler.

The same approach as ``test_dpm_parity.py``: both run the same exact, well-conditioned Gaussian-mixture network
from the same x_T; the target is max |Δ| ≤ 1e-5 in float32 with the default config (or, for a loop whose own
float32 rounding is larger, ours no further than diffusers from the float64 loop). diffusers' UniPC returns NaN
(bh1 into σ = 0) or fails (order ≥ 2 into σ = 0 without ``lower_order_final``) where ours does not: those
documented differences are tested explicitly.
"""

import logging

import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler

from diffsamplers import DCSolverScheduler
from diffsamplers.noise import noise_process_from_config
from diffsamplers.prediction import to_x0
from tests.adapters.test_dpm_parity import TOL, assert_parity, float64_loop, model_for, report_deltas  # noqa: F401
from tests.helpers import SMOOTH_MIXTURE, scheduler_loop

pytestmark = pytest.mark.usefixtures("single_thread")

GMM = SMOOTH_MIXTURE
STEPS = [1, 2, 3, 5, 10, 25]


def _model(config):
    return model_for(config, DCSolverScheduler)


def _x_T(seed):
    return torch.randn(4, *GMM.sample_shape, generator=torch.Generator().manual_seed(seed))


def _parity(config, x_T, **set_timesteps):
    """Our loop against diffusers' on the same x_T (the float64 loop only when Δ > 1e-5); returns Δ."""
    model = _model(config)
    theirs = scheduler_loop(UniPCMultistepScheduler(**config), x_T, model, **set_timesteps)
    ours = scheduler_loop(DCSolverScheduler(**config), x_T, model, **set_timesteps)
    return assert_parity(ours, theirs, lambda: float64_loop(DCSolverScheduler, config, x_T, **set_timesteps))


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_full_loop_parity(variant, order, final, steps):
    config = dict(solver_type=variant, solver_order=order, final_sigmas_type=final)
    if variant == "bh1" and final == "zero":
        # diffusers: the first-order step into σ = 0 computes B(h)·0 with B(h) = h = −∞ → NaN.
        theirs = scheduler_loop(
            UniPCMultistepScheduler(**config), _x_T(steps), _model(config), num_inference_steps=steps
        )
        assert torch.isnan(theirs).all()
        ours = scheduler_loop(DCSolverScheduler(**config), _x_T(steps), _model(config), num_inference_steps=steps)
        assert torch.isfinite(ours).all()
        return
    assert _parity(config, _x_T(steps), num_inference_steps=steps) <= TOL


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("steps", [2, 5, 10])
def test_bh1_into_zero_is_finite_and_equal_up_to_the_last_step(order, steps):
    """Where diffusers' bh1 returns NaN, every step before the last agrees, and ours ends at x̂0 (λ = ∞)."""
    config = dict(solver_type="bh1", solver_order=order)
    model = _model(config)
    x_T = _x_T(steps)
    trajectories = []
    for cls in (UniPCMultistepScheduler, DCSolverScheduler):
        sched = cls(**config)
        sched.set_timesteps(steps)
        x, seen = x_T, []
        for t in sched.timesteps:
            seen.append(x)
            out = model(x, t)
            x = sched.step(out, t, x).prev_sample
        trajectories.append((seen, x, out))
    (theirs, theirs_final, _), (ours, ours_final, last_out) = trajectories
    for a, b in zip(theirs, ours):
        assert float((a - b).abs().max()) <= 1e-5
    assert torch.isnan(theirs_final).all() and torch.isfinite(ours_final).all()
    process = noise_process_from_config(dict(DCSolverScheduler(**config).config))
    alpha, sigma = process.alpha_sigma(process.sigma_tilde(float(sched.timesteps[-1])))
    assert torch.allclose(ours_final, to_x0(last_out, ours[-1], float(alpha), float(sigma), "epsilon"), atol=1e-6)


@pytest.mark.parametrize("order", [2, 3])
def test_no_lower_order_final_into_zero(order):
    """Order ≥ 2 into σ = 0: diffusers divides by r = 0 (NaN/inf) or hits a singular solve; ours steps first order."""
    config = dict(solver_order=order, lower_order_final=False)
    x_T = _x_T(0)
    try:
        theirs = scheduler_loop(UniPCMultistepScheduler(**config), x_T, _model(config), num_inference_steps=8)
        assert not torch.isfinite(theirs).all()
    except torch.linalg.LinAlgError:
        pass
    assert torch.isfinite(scheduler_loop(DCSolverScheduler(**config), x_T, _model(config), num_inference_steps=8)).all()
    # Ending at σ_min instead, both run order ≥ 2 to the end and agree.
    _parity(dict(config, final_sigmas_type="sigma_min"), x_T, num_inference_steps=25)


FLOW = dict(use_flow_sigmas=True, prediction_type="flow_prediction")
CONFIG_VARIANTS = [
    dict(prediction_type="v_prediction"),
    dict(prediction_type="sample", solver_order=3, solver_type="bh1", final_sigmas_type="sigma_min"),
    dict(disable_corrector=[0, 3]),
    dict(disable_corrector=list(range(30))),  # UniP alone
    dict(use_karras_sigmas=True),
    dict(use_exponential_sigmas=True),
    dict(use_beta_sigmas=True),
    # (d) ramps with final_sigmas_type="sigma_min": UniPC repeats the ramp's last level (a zero-length last step)
    dict(use_karras_sigmas=True, final_sigmas_type="sigma_min", prediction_type="v_prediction"),
    dict(use_exponential_sigmas=True, final_sigmas_type="sigma_min"),
    dict(use_beta_sigmas=True, final_sigmas_type="sigma_min"),
    dict(use_karras_sigmas=True, sigma_min=0.05, sigma_max=50.0),
    dict(timestep_spacing="leading", steps_offset=1),
    dict(timestep_spacing="trailing", solver_order=3),
    dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5, prediction_type="sample"),
    # (c) sample_max_value < 1
    dict(thresholding=True, dynamic_thresholding_ratio=0.87, sample_max_value=0.5, prediction_type="sample"),
    dict(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
    ),
    # (a) DDPM's linear β rescaled to zero terminal SNR
    dict(rescale_betas_zero_snr=True),
    dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"),
    # flow models: UniPC's own grid (linspace from 1, shifted), its σ_min repeat, the terminal stretch, Karras
    dict(FLOW, flow_shift=3.0),
    dict(FLOW, flow_shift=3.0, final_sigmas_type="sigma_min"),
    dict(FLOW, flow_shift=2.0, shift_terminal=0.05),
    dict(FLOW, use_karras_sigmas=True),
    dict(FLOW, use_karras_sigmas=True, final_sigmas_type="sigma_min"),
]


@pytest.mark.parametrize(
    "config",
    CONFIG_VARIANTS,
    ids=lambda c: ",".join(f"{k}={v if not isinstance(v, list) or len(v) < 5 else 'all'}" for k, v in c.items()),
)
@pytest.mark.parametrize("steps", [4, 10, 25])
def test_config_variants_parity(config, steps):
    _parity(config, _x_T(0), num_inference_steps=steps)


@pytest.mark.parametrize("time_shift_type", ["exponential", "linear"])
@pytest.mark.parametrize("mu", [0.5, 1.2])
def test_dynamic_shift_parity(time_shift_type, mu):
    config = dict(FLOW, use_dynamic_shifting=True, time_shift_type=time_shift_type)
    _parity(config, _x_T(1), num_inference_steps=10, mu=mu)
    with pytest.raises(ValueError, match="mu must be passed"):
        DCSolverScheduler(**config).set_timesteps(10)
    # Without dynamic shifting diffusers' UniPC ignores mu (flow pipelines pass it whenever set_timesteps takes it).
    plain = dict(FLOW, flow_shift=3.0)
    _parity(plain, _x_T(1), num_inference_steps=10, mu=mu)


@pytest.mark.parametrize("final", ["zero", "sigma_min"])
def test_custom_flow_sigmas_follow_unipc(final):
    """On a flow model UniPC takes n flow times (no final level) and shifts them, as FlowMatch pipelines pass them."""
    config = dict(FLOW, flow_shift=3.0, final_sigmas_type=final)
    sigmas = np.linspace(1.0, 1 / 8, 8)
    _parity(config, _x_T(2), sigmas=sigmas)
    ours, theirs = DCSolverScheduler(**config), UniPCMultistepScheduler(**config)
    for s in (ours, theirs):
        s.set_timesteps(sigmas=sigmas)
    assert torch.equal(ours.sigmas, theirs.sigmas) and torch.equal(ours.timesteps, theirs.timesteps)


@pytest.mark.parametrize("num_train", [25, 1000])
def test_as_many_steps_as_training_timesteps(num_train, caplog):
    """(b) n = N: a repeated timestep. First order gives diffusers' numbers; at order 2 diffusers returns NaN after
    the repeat and ours raises there."""
    base = dict(num_train_timesteps=num_train, final_sigmas_type="sigma_min")
    assert _parity(dict(base, solver_order=1), _x_T(3), num_inference_steps=num_train) <= TOL
    config = dict(base, solver_order=2)
    model = _model(config)
    theirs = scheduler_loop(UniPCMultistepScheduler(**config), _x_T(3), model, num_inference_steps=num_train)
    assert torch.isnan(theirs).any()
    with caplog.at_level(logging.WARNING), pytest.raises(ValueError, match="not defined on this grid"):
        scheduler_loop(DCSolverScheduler(**config), _x_T(3), model, num_inference_steps=num_train)


def test_img2img_start_uses_lower_orders_like_diffusers():
    """Starting at begin_index (img2img): no corrector at the first step, then the orders build up."""
    x = _x_T(5)
    model = _model({})
    outs = []
    for cls in (UniPCMultistepScheduler, DCSolverScheduler):
        sched = cls(solver_order=3)
        sched.set_timesteps(20)
        sched.set_begin_index(8)
        y = x
        for t in sched.timesteps[8:]:
            y = sched.step(model(y, t), t, y).prev_sample
        outs.append(y)
    assert float((outs[0] - outs[1]).abs().max()) <= 1e-5
