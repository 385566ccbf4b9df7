"""Full-loop parity of DPMSolverPlusPlusScheduler with diffusers' DPMSolverMultistepScheduler (float32).

Both run the same exact Gaussian-mixture network (a well-conditioned one: a sharp mixture's denoiser
amplifies any float32 difference in the trajectory at low noise) from the same x_T (and, for SDE-DPM-Solver++, the same
injected noise). The target is max |Δ| ≤ 1e-5. Where the two differ by more — a first ε-prediction step from t = 999,
where x̂0 = (x − σ ε)/α divides float32 rounding by α ≈ 0.006 (see :mod:`diffsamplers.prediction`) — the
test instead requires our float32 result to lie within 1e-5 of the same loop with float64 scheduler
arithmetic (the network still evaluated in float32 on the rounded sample), and diffusers' not: the
discrepancy is then diffusers' float32 rounding, not a different algorithm.
"""

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from diffsamplers import DPMSolverPlusPlusScheduler
from diffsamplers.noise import noise_process_from_config
from tests.helpers import SMOOTH_MIXTURE, scheduler_loop

GMM = SMOOTH_MIXTURE
TOL = 1e-5
STEPS = [1, 2, 3, 5, 10, 50, 1000]
ALGORITHMS = {
    "2M": {},
    "3M": {"solver_order": 3},
    "SDE-2M": {"algorithm_type": "sde-dpmsolver++"},
    "SDE-3M": {"algorithm_type": "sde-dpmsolver++", "solver_order": 3},
}


def _model(config, dtype=torch.float32):
    """The exact network in float32; with dtype=float64 its float32 output is returned in float64."""
    process = noise_process_from_config(dict(DPMSolverMultistepScheduler(**config).config))
    net = GMM.as_model(process, config.get("prediction_type", "epsilon"))
    return lambda x, t: net(x.float(), t).sample.to(dtype)


def _ours_and_float64(config, x_T, noise, steps):
    """Our float32 loop, and the same loop with float64 scheduler arithmetic."""
    ours = scheduler_loop(DPMSolverPlusPlusScheduler(**config), x_T, _model(config), noise, num_inference_steps=steps)
    exact = scheduler_loop(
        DPMSolverPlusPlusScheduler(**config),
        x_T.double(),
        _model(config, torch.float64),
        None if noise is None else noise.double(),
        num_inference_steps=steps,
    )
    return ours, exact


def assert_parity(ours, theirs, exact):
    delta = float((ours - theirs).abs().max())
    if delta <= TOL:
        return delta
    ours_err = float((ours.double() - exact).abs().max())
    theirs_err = float((theirs.double() - exact).abs().max())
    assert ours_err <= TOL < theirs_err, f"Δ={delta:.2e}: ours {ours_err:.2e} / diffusers {theirs_err:.2e} from float64"
    return delta


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_full_loop_parity(algorithm, prediction_type, final, steps):
    config = dict(ALGORITHMS[algorithm], prediction_type=prediction_type, final_sigmas_type=final)
    g = torch.Generator().manual_seed(steps)
    x_T = torch.randn(4, *GMM.sample_shape, generator=g)
    noise = torch.randn(steps, 4, *GMM.sample_shape, generator=g) if algorithm.startswith("SDE") else None
    model = _model(config)
    ours_sched = DPMSolverPlusPlusScheduler(**config)  # only for the 1000-step refusal below
    theirs_sched = DPMSolverMultistepScheduler(**config)
    if steps == 1000:
        if final == "sigma_min":
            # 1001 distinct noise levels do not exist in a 1000-step model: we refuse, diffusers returns NaN.
            with pytest.raises(ValueError, match="beyond the training schedule"):
                ours_sched.set_timesteps(1000)
            out = scheduler_loop(theirs_sched, x_T, model, noise, num_inference_steps=1000)
            assert torch.isnan(out).any()
            return
        # diffusers' default 1000-step grid repeats a timestep and returns NaN; ours is the full grid 999..0,
        # which diffusers reproduces when given it explicitly.
        assert torch.isnan(
            scheduler_loop(DPMSolverMultistepScheduler(**config), x_T, model, noise, num_inference_steps=1000)
        ).any()
        theirs = scheduler_loop(theirs_sched, x_T, model, noise, timesteps=list(range(999, -1, -1)))
    else:
        theirs = scheduler_loop(theirs_sched, x_T, model, noise, num_inference_steps=steps)
    ours, exact = _ours_and_float64(config, x_T, noise, steps)
    assert torch.isfinite(ours).all()
    assert_parity(ours, theirs, exact)


@pytest.mark.parametrize(
    "config",
    [
        dict(solver_type="heun"),
        dict(solver_order=3, solver_type="heun"),
        dict(use_karras_sigmas=True),
        dict(use_lu_lambdas=True),
        dict(use_exponential_sigmas=True),
        dict(timestep_spacing="leading", steps_offset=1),
        dict(timestep_spacing="trailing"),
        dict(euler_at_final=True, solver_order=3),
        dict(lower_order_final=False, final_sigmas_type="sigma_min"),
        dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5, prediction_type="sample"),
        dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1),
        dict(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            prediction_type="v_prediction",
            rescale_betas_zero_snr=True,
        ),
        dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0),
        dict(algorithm_type="sde-dpmsolver++", solver_type="heun", final_sigmas_type="sigma_min"),
    ],
    ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()),
)
@pytest.mark.parametrize("steps", [4, 10, 25])
def test_config_variants_parity(config, steps):
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(4, *GMM.sample_shape, generator=g)
    noise = torch.randn(steps, 4, *GMM.sample_shape, generator=g) if "sde" in config.get("algorithm_type", "") else None
    theirs = scheduler_loop(
        DPMSolverMultistepScheduler(**config), x_T, _model(config), noise, num_inference_steps=steps
    )
    ours, exact = _ours_and_float64(config, x_T, noise, steps)
    assert_parity(ours, theirs, exact)


def test_sde_with_generator_matches():
    """Drawing the SDE noise from the same generator (not injected) gives the same samples too."""
    x_T = torch.randn(2, *GMM.sample_shape, generator=torch.Generator().manual_seed(3))
    config = {"algorithm_type": "sde-dpmsolver++"}
    model = _model(config)
    results = []
    for cls in (DPMSolverMultistepScheduler, DPMSolverPlusPlusScheduler):
        sched = cls(**config)
        sched.set_timesteps(12)
        x, gen = x_T.clone(), torch.Generator().manual_seed(7)
        for t in sched.timesteps:
            x = sched.step(model(x, t), t, x, generator=gen).prev_sample
        results.append(x)
    assert float((results[0] - results[1]).abs().max()) <= TOL


def test_taylor_third_order_option_is_more_accurate_at_high_nfe():
    """``third_order="taylor"`` through the scheduler, on exact (unrounded) uniform-logSNR levels via ``sigmas=``."""
    from diffsamplers.models.gmm import default_process, reference_solution
    from diffsamplers.schedules import uniform_logsnr

    process = default_process()
    x_T = torch.randn(4, *GMM.sample_shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    net = GMM.as_model(process, "epsilon")
    model = lambda x, t: net(x, t).sample  # noqa: E731
    ref = reference_solution(GMM, process, x_T, process.sigma_max, process.sigma_min)
    levels = uniform_logsnr(process, 100, final="sigma_min").sigmas.tolist()
    errs = {}
    for form in ("reference", "taylor"):
        sched = DPMSolverPlusPlusScheduler(solver_order=3, third_order=form)
        errs[form] = float((scheduler_loop(sched, x_T, model, sigmas=levels) - ref).pow(2).mean().sqrt())
    assert errs["taylor"] < 0.5 * errs["reference"], errs
