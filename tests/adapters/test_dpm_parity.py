"""Full-loop parity of DPMSolverPlusPlusScheduler with diffusers' DPMSolverMultistepScheduler (float32).

Both run the same exact Gaussian-mixture network (a well-conditioned one: a sharp mixture's denoiser amplifies any
float32 difference in the trajectory at low noise) from the same x_T (and, for SDE-DPM-Solver++, the same injected
noise). The target is max |Δ| ≤ 1e-5 with the default config, which answers with diffusers' numbers. The one
explained exception (:func:`assert_parity`): loops whose own float32 rounding is larger than that (a 1000-step loop,
a 4-step beta-sigma loop) — ours must then be no further than diffusers from the same loop in float64 scheduler
arithmetic. ``pytest -s`` prints the largest |Δ| of each test (the numbers in docs/parity.md).
"""

import logging
import math
import os

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from diffsamplers import DPMSolverPlusPlusScheduler
from diffsamplers.noise import noise_process_from_config
from tests.helpers import SMOOTH_MIXTURE, scheduler_loop

pytestmark = pytest.mark.usefixtures("single_thread")

GMM = SMOOTH_MIXTURE
TOL = 1e-5
STEPS = [1, 2, 3, 5, 10, 50]
ALGORITHMS = {
    "2M": {},
    "3M": {"solver_order": 3},
    "SDE-2M": {"algorithm_type": "sde-dpmsolver++"},
    "SDE-3M": {"algorithm_type": "sde-dpmsolver++", "solver_order": 3},
}


#: The largest |Δ| per test function and the loops that needed the rounding explanation, printed at the end of
#: the module (``pytest -s``): the numbers quoted in docs/parity.md.
DELTAS: dict[str, tuple[float, list[str]]] = {}


@pytest.fixture(scope="module", autouse=True)
def report_deltas():
    yield
    for name, (delta, explained) in sorted(DELTAS.items()):
        print(f"\nmax |Δ| {name}: {delta:.2e}" + (f"; above 1e-5, explained: {explained}" if explained else ""))
    DELTAS.clear()


def _record(delta: float, errors: tuple[float, float] | None = None) -> None:
    """Note Δ for the report; ``errors``: ours and diffusers' distance from the float64 loop, for Δ > 1e-5."""
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").split("::")[-1].rsplit(" ", 1)[0]
    name = test.split("[")[0]
    worst, explained = DELTAS.get(name, (0.0, []))
    if errors is not None:
        explained = explained + [
            f"{test[len(name) :]} Δ {delta:.1e}, from float64: ours {errors[0]:.1e}, diffusers {errors[1]:.1e}"
        ]
    DELTAS[name] = (max(worst, delta), explained)


def model_for(config, cls=DPMSolverPlusPlusScheduler, dtype=torch.float32):
    """The exact network in float32 on the config's process; with dtype=float64 its output is returned in float64."""
    process = noise_process_from_config(dict(cls(**config).config))
    net = GMM.as_model(process, config.get("prediction_type", "epsilon"))
    return lambda x, t: net(x.float(), t).sample.to(dtype)


def float64_loop(cls, config, x_T, noise=None, **set_timesteps):
    """Our loop with float64 scheduler arithmetic (the network still float32): the reference for rounding."""
    model = model_for(config, cls, torch.float64)
    noise = None if noise is None else noise.double()
    return scheduler_loop(cls(**config), x_T.double(), model, noise, **set_timesteps)


def assert_parity(ours, theirs, exact=None):
    """max |Δ| ≤ 1e-5; or, for a loop whose own float32 rounding exceeds that (``exact``: a callable giving the
    float64 loop, run only then), ours no further from the float64 loop than 1e-5 or than diffusers is (to 10%): the
    difference is rounding, not a different algorithm. Returns Δ."""
    assert torch.isfinite(ours).all()
    delta = float((ours - theirs).abs().max())
    if delta <= TOL:
        _record(delta)
        return delta
    assert exact is not None, f"Δ = {delta:.2e}"
    exact = exact()
    ours_err = float((ours.double() - exact).abs().max())
    theirs_err = float((theirs.double() - exact).abs().max())
    _record(delta, (ours_err, theirs_err))
    assert ours_err <= max(TOL, 1.1 * theirs_err), f"Δ = {delta:.2e}: ours {ours_err:.2e} / diffusers {theirs_err:.2e}"
    return delta


def _inputs(steps, sde, seed=None, batch=4):
    g = torch.Generator().manual_seed(steps if seed is None else seed)
    x_T = torch.randn(batch, *GMM.sample_shape, generator=g)
    noise = torch.randn(steps, batch, *GMM.sample_shape, generator=g) if sde else None
    return x_T, noise


def _parity(config, steps, seed=None, **set_timesteps):
    """Our loop against diffusers' on the same inputs (the float64 loop only when Δ > 1e-5)."""
    x_T, noise = _inputs(steps, "sde" in config.get("algorithm_type", ""), seed)
    model = model_for(config)
    kwargs = set_timesteps or {"num_inference_steps": steps}
    theirs = scheduler_loop(DPMSolverMultistepScheduler(**config), x_T, model, noise, **kwargs)
    ours = scheduler_loop(DPMSolverPlusPlusScheduler(**config), x_T, model, noise, **kwargs)
    return assert_parity(ours, theirs, lambda: float64_loop(DPMSolverPlusPlusScheduler, config, x_T, noise, **kwargs))


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_full_loop_parity(algorithm, prediction_type, final, steps):
    config = dict(ALGORITHMS[algorithm], prediction_type=prediction_type, final_sigmas_type=final)
    assert _parity(config, steps) <= TOL


CONFIG_VARIANTS = [
    dict(solver_type="heun"),
    dict(solver_order=3, solver_type="heun"),
    dict(use_karras_sigmas=True),
    dict(use_lu_lambdas=True),
    dict(use_exponential_sigmas=True),
    dict(use_beta_sigmas=True),
    dict(use_karras_sigmas=True, use_lu_lambdas=True),  # diffusers accepts both; Karras wins
    # (d) a ramp that ends at σ_min with σ_min appended again: the last step has zero length, as in diffusers
    dict(use_karras_sigmas=True, final_sigmas_type="sigma_min", prediction_type="v_prediction"),
    dict(use_lu_lambdas=True, final_sigmas_type="sigma_min", prediction_type="v_prediction"),
    dict(use_exponential_sigmas=True, final_sigmas_type="sigma_min"),
    dict(use_beta_sigmas=True, final_sigmas_type="sigma_min"),
    dict(use_karras_sigmas=True, final_sigmas_type="sigma_min", lower_order_final=False),
    dict(timestep_spacing="leading", steps_offset=1),
    dict(timestep_spacing="trailing"),
    dict(euler_at_final=True, solver_order=3),
    dict(lower_order_final=False, final_sigmas_type="sigma_min"),
    dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5, prediction_type="sample"),
    # (c) sample_max_value < 1: torch.clamp(s, 1, m) returns m
    dict(thresholding=True, dynamic_thresholding_ratio=0.87, sample_max_value=0.5, prediction_type="sample"),
    dict(thresholding=True, dynamic_thresholding_ratio=0.87, sample_max_value=0.5, solver_order=3),
    dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1),
    dict(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
    ),
    # (a) DDPM's linear β rescaled to zero terminal SNR: ᾱ_999 = 2⁻²⁴ lies above ᾱ_998
    dict(rescale_betas_zero_snr=True),
    dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"),
    dict(rescale_betas_zero_snr=True, use_karras_sigmas=True, prediction_type="v_prediction"),
    dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0),
    dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0, final_sigmas_type="sigma_min"),
    dict(algorithm_type="sde-dpmsolver++", solver_type="heun", final_sigmas_type="sigma_min"),
]


@pytest.mark.parametrize("config", CONFIG_VARIANTS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("steps", [4, 10, 25])
def test_config_variants_parity(config, steps):
    _parity(config, steps, seed=0)


@pytest.mark.parametrize("mu", [-0.5, 0.8])
def test_dynamic_shift_parity_and_stored_shift(mu):
    """``mu`` on a flow model: the same grid and numbers, and e^μ kept as ``flow_shift`` — diffusers does that too."""
    config = dict(use_flow_sigmas=True, prediction_type="flow_prediction", use_dynamic_shifting=True)
    _parity(config, 12, num_inference_steps=12, mu=mu)
    ours, theirs = DPMSolverPlusPlusScheduler(**config), DPMSolverMultistepScheduler(**config)
    for s in (ours, theirs):
        s.set_timesteps(8, mu=mu)
    assert ours.config.flow_shift == pytest.approx(theirs.config.flow_shift) == pytest.approx(math.exp(mu))
    assert torch.equal(ours.timesteps, theirs.timesteps) and torch.equal(ours.sigmas, theirs.sigmas)


@pytest.mark.parametrize("num_train", [25, 1000])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("algorithm", ["dpmsolver++", "sde-dpmsolver++"])
def test_as_many_steps_as_training_timesteps(algorithm, final, num_train, caplog):
    """(b) n = N: diffusers' linspace grid puts two steps on one timestep. A first-order step of zero length leaves
    the sample unchanged, so order 1 gives diffusers' numbers; from order 2 on diffusers returns NaN after the
    repeat, and ours raises there, naming the option that builds a grid without it."""
    base = dict(num_train_timesteps=num_train, algorithm_type=algorithm, final_sigmas_type=final)
    steps = num_train
    assert _parity(dict(base, solver_order=1), steps, seed=1) <= TOL

    config = dict(base, solver_order=2)
    x_T, noise = _inputs(steps, algorithm.startswith("sde"), seed=1)
    model = model_for(config)
    theirs = scheduler_loop(DPMSolverMultistepScheduler(**config), x_T, model, noise, num_inference_steps=steps)
    assert torch.isnan(theirs).any()
    with caplog.at_level(logging.WARNING), pytest.raises(ValueError, match="strictly_decreasing_sigmas=True"):
        scheduler_loop(DPMSolverPlusPlusScheduler(**config), x_T, model, noise, num_inference_steps=steps)
    assert "has zero length" in caplog.text

    strict = dict(config, strictly_decreasing_sigmas=True)
    if final == "sigma_min":  # n + 1 distinct levels do not exist
        with pytest.raises(ValueError, match="beyond the training schedule"):
            DPMSolverPlusPlusScheduler(**strict).set_timesteps(steps)
        return
    # Without the repeat the grid is every training timestep, which diffusers runs when given it explicitly.
    every = list(range(num_train - 1, -1, -1))
    reference = scheduler_loop(DPMSolverMultistepScheduler(**config), x_T, model, noise, timesteps=every)
    ours = scheduler_loop(DPMSolverPlusPlusScheduler(**strict), x_T, model, noise, num_inference_steps=steps)
    assert_parity(
        ours, reference, lambda: float64_loop(DPMSolverPlusPlusScheduler, strict, x_T, noise, timesteps=every)
    )


@pytest.mark.parametrize("steps", [4, 10])
def test_repeated_first_timestep(steps):
    """Cosine β with Karras sigmas: the unrounded timesteps repeat 998 at the start. diffusers looks the first one up
    by value, takes its second occurrence (meant for img2img) and runs off the end; we take the pipeline's element
    by position, which is what diffusers does when the pipeline sets ``begin_index`` — and then the numbers agree."""
    config = dict(beta_schedule="squaredcos_cap_v2", use_karras_sigmas=True)
    x_T, _ = _inputs(steps, False, seed=2)
    model = model_for(config)
    with pytest.raises(IndexError):
        scheduler_loop(DPMSolverMultistepScheduler(**config), x_T, model, num_inference_steps=steps)
    theirs = DPMSolverMultistepScheduler(**config)
    theirs.set_timesteps(steps)
    theirs.set_begin_index(0)
    x = x_T
    for t in theirs.timesteps:
        x = theirs.step(model(x, t), t, x).prev_sample
    ours = scheduler_loop(DPMSolverPlusPlusScheduler(**config), x_T, model, num_inference_steps=steps)
    assert_parity(ours, x, lambda: float64_loop(DPMSolverPlusPlusScheduler, config, x_T, num_inference_steps=steps))


def test_diffusers_test_suite_numbers():
    """diffusers' own full-loop numbers (its test file's base config, deterministic sample, model x·t/(t + 1)),
    and the two sigma_min ramps that ``strictly_decreasing_sigmas=True`` changes (``docs/parity.md``)."""

    def loop(scheduler):
        n = 4 * 3 * 8 * 8
        x = (torch.arange(n).reshape(3, 8, 8, 4) / n).permute(3, 0, 1, 2)
        scheduler.set_timesteps(10)
        for t in scheduler.timesteps:
            x = scheduler.step(x * t / (t + 1), t, x).prev_sample
        return float(x.abs().mean())

    base = dict(lower_order_final=False, final_sigmas_type="sigma_min")
    cases = [
        ({}, 0.3301, None),
        ({"prediction_type": "v_prediction"}, 0.2251, None),
        ({"prediction_type": "v_prediction", "use_karras_sigmas": True}, 0.2092, 0.1935),
        ({"prediction_type": "v_prediction", "use_lu_lambdas": True}, 0.1554, 0.1467),
        ({"thresholding": True, "dynamic_thresholding_ratio": 0.87, "sample_max_value": 0.5}, 1.1364, None),
    ]
    for extra, expected, strict in cases:
        config = dict(base, **extra)
        theirs, ours = loop(DPMSolverMultistepScheduler(**config)), loop(DPMSolverPlusPlusScheduler(**config))
        assert ours == pytest.approx(theirs, abs=1e-6) and ours == pytest.approx(expected, abs=1e-3)
        if strict is not None:
            assert loop(DPMSolverPlusPlusScheduler(**config, strictly_decreasing_sigmas=True)) == pytest.approx(
                strict, abs=1e-3
            )


def test_strictly_decreasing_sigmas_ends_the_ramp_once():
    config = dict(use_karras_sigmas=True, final_sigmas_type="sigma_min")
    theirs, ours = DPMSolverMultistepScheduler(**config), DPMSolverPlusPlusScheduler(**config)
    strict = DPMSolverPlusPlusScheduler(**config, strictly_decreasing_sigmas=True)
    for s in (theirs, ours, strict):
        s.set_timesteps(10)
    assert torch.equal(ours.sigmas, theirs.sigmas) and ours.sigmas[-1] == ours.sigmas[-2]  # diffusers' repeat
    assert torch.all(strict.sigmas[1:] < strict.sigmas[:-1]) and strict.sigmas[-1] == ours.sigmas[-1]
    assert strict.sigmas[0] == ours.sigmas[0] and len(strict.timesteps) == 10


def test_float64_x0_conversion_option():
    """diffusers converts ε → x̂0 in float32, which at t = 999 (1/α ≈ 157) loses ≈ 1e-5 — by default so do we;
    ``float64_x0_conversion=True`` converts there in float64 and lands nearer the float64 loop."""
    config = {}
    x_T, _ = _inputs(1, False, seed=1)
    model = model_for(config)
    theirs = scheduler_loop(DPMSolverMultistepScheduler(), x_T, model, num_inference_steps=1)
    default = scheduler_loop(DPMSolverPlusPlusScheduler(), x_T, model, num_inference_steps=1)
    precise = scheduler_loop(DPMSolverPlusPlusScheduler(float64_x0_conversion=True), x_T, model, num_inference_steps=1)
    exact = float64_loop(DPMSolverPlusPlusScheduler, config, x_T, num_inference_steps=1)
    assert float((default - theirs).abs().max()) <= 1e-6
    precise_err = float((precise.double() - exact).abs().max())
    theirs_err = float((theirs.double() - exact).abs().max())
    assert precise_err < 0.25 * theirs_err and theirs_err > TOL, (precise_err, theirs_err)


def test_sde_with_generator_matches():
    """Drawing the SDE noise from the same generator (not injected) gives the same samples too."""
    x_T = torch.randn(2, *GMM.sample_shape, generator=torch.Generator().manual_seed(3))
    config = {"algorithm_type": "sde-dpmsolver++"}
    model = model_for(config)
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
