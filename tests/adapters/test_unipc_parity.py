"""Full-loop parity of DCSolverScheduler (ratios = 1, i.e. UniPC) with diffusers' UniPCMultistepScheduler.

The same approach as ``test_dpm_parity.py``: both run the same exact, well-conditioned Gaussian-mixture
network from the same x_T; the target is max |Δ| ≤ 1e-5 in float32. Where the two differ by more (a first
ε step from t = 999, where x̂0 = (x − σε)/α divides float32 rounding by α ≈ 0.006), our float32 result must
lie within 1e-5 of the same loop with float64 scheduler arithmetic and diffusers' must not. diffusers'
UniPC returns NaN (bh1 into σ = 0) or fails (order ≥ 2 into σ = 0 without ``lower_order_final``): those
documented differences are tested explicitly.
"""

import pytest
import torch
from diffusers import UniPCMultistepScheduler

from diffsamplers import DCSolverScheduler
from diffsamplers.noise import noise_process_from_config
from diffsamplers.prediction import to_x0
from tests.adapters.test_dpm_parity import TOL, assert_parity
from tests.helpers import SMOOTH_MIXTURE, scheduler_loop

pytestmark = pytest.mark.usefixtures("single_thread")

GMM = SMOOTH_MIXTURE
STEPS = [1, 2, 3, 5, 10, 25]


def _model(config, dtype=torch.float32):
    process = noise_process_from_config(dict(UniPCMultistepScheduler(**config).config))
    net = GMM.as_model(process, config.get("prediction_type", "epsilon"))
    return lambda x, t: net(x.float(), t).sample.to(dtype)


def _ours(config, x_T, steps):
    return scheduler_loop(DCSolverScheduler(**config), x_T, _model(config), num_inference_steps=steps)


def _check_parity(config, x_T, steps, ours, theirs):
    """max |Δ| ≤ 1e-5, or ours within 1e-5 of float64 scheduler arithmetic and diffusers not (computed lazily)."""
    if float((ours - theirs).abs().max()) <= TOL:
        return
    exact = scheduler_loop(
        DCSolverScheduler(**config), x_T.double(), _model(config, torch.float64), num_inference_steps=steps
    )
    assert_parity(ours, theirs, exact)


def _x_T(seed):
    return torch.randn(4, *GMM.sample_shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_full_loop_parity(variant, order, final, steps):
    config = dict(solver_type=variant, solver_order=order, final_sigmas_type=final)
    x_T = _x_T(steps)
    ours = _ours(config, x_T, steps)
    assert torch.isfinite(ours).all()
    theirs = scheduler_loop(UniPCMultistepScheduler(**config), x_T, _model(config), num_inference_steps=steps)
    if variant == "bh1" and final == "zero":
        # diffusers: the first-order step into σ = 0 computes B(h)·0 with B(h) = h = −∞ → NaN.
        assert torch.isnan(theirs).all()
        return
    _check_parity(config, x_T, steps, ours, theirs)


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
    assert torch.isfinite(_ours(config, x_T, 8)).all()
    # Ending at σ_min instead, both run order ≥ 2 to the end and agree.
    sigma_min = dict(config, final_sigmas_type="sigma_min")
    theirs = scheduler_loop(UniPCMultistepScheduler(**sigma_min), x_T, _model(sigma_min), num_inference_steps=25)
    _check_parity(sigma_min, x_T, 25, _ours(sigma_min, x_T, 25), theirs)


@pytest.mark.parametrize(
    "config",
    [
        dict(prediction_type="v_prediction"),
        dict(prediction_type="sample", solver_order=3, solver_type="bh1", final_sigmas_type="sigma_min"),
        dict(disable_corrector=[0, 3]),
        dict(disable_corrector=list(range(30))),  # UniP alone
        dict(use_karras_sigmas=True),
        dict(use_exponential_sigmas=True),
        dict(timestep_spacing="leading", steps_offset=1),
        dict(timestep_spacing="trailing", solver_order=3),
        dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5, prediction_type="sample"),
        dict(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            prediction_type="v_prediction",
            rescale_betas_zero_snr=True,
        ),
    ],
    ids=lambda c: ",".join(f"{k}={v if not isinstance(v, list) or len(v) < 5 else 'all'}" for k, v in c.items()),
)
@pytest.mark.parametrize("steps", [4, 10, 25])
def test_config_variants_parity(config, steps):
    x_T = _x_T(0)
    theirs = scheduler_loop(UniPCMultistepScheduler(**config), x_T, _model(config), num_inference_steps=steps)
    _check_parity(config, x_T, steps, _ours(config, x_T, steps), theirs)


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
