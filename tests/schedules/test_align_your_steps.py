"""Published Align Your Steps schedules: exact 10-step lists, diffusers' AysSchedules, interpolation, usage."""

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler
from diffusers.schedulers.scheduling_utils import AysSchedules

from diffsamplers import DDIM, DPMSolverPlusPlus, DPMSolverPlusPlusScheduler, DPMSolverPlusPlusSinglestep, Euler, sample
from diffsamplers.models.gmm import reference_solution
from diffsamplers.schedules import (
    align_your_steps,
    ays_noise_levels,
    ays_sigmas_for_diffusers,
    ays_timesteps_for_diffusers,
    from_timesteps,
    loglinear_interpolation,
    schedule_from_levels,
)
from diffsamplers.schedules.align_your_steps import published_ays
from diffsamplers.schedules.learned import LearnedSchedule
from tests.helpers import SMOOTH_MIXTURE, rms, scheduler_loop

SD = published_ays("sd15").process()
SD_CONFIG = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}

# Table 3 of Sabour et al. 2024 (three decimals).
PAPER = {
    "sd15": [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029],
    "sdxl": [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029],
    "svd": [700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002],
    "deepfloyd_if": [160.41, 8.081, 3.315, 1.885, 1.207, 0.785, 0.553, 0.293, 0.186, 0.030, 0.006],
}
DIFFUSERS = {"sd15": "StableDiffusion", "sdxl": "StableDiffusionXL"}


@pytest.mark.parametrize("model", sorted(PAPER))
def test_ten_steps_reproduce_the_paper_lists_exactly(model):
    ends_at_min = align_your_steps(model, 10, final="sigma_min", source="paper")
    assert np.array_equal(ends_at_min.sigmas, np.array(PAPER[model]))
    replaced = align_your_steps(model, 10, source="paper")
    assert np.array_equal(replaced.sigmas, np.array(PAPER[model][:-1] + [0.0]))


@pytest.mark.parametrize("model", ["sd15", "sdxl", "svd"])
def test_paper_source_equals_diffusers_ays_schedules(model):
    name = {"svd": "StableDiffusionVideo"}.get(model, DIFFUSERS.get(model))
    ours = ays_sigmas_for_diffusers(align_your_steps(model, 10, source="paper"))
    assert ours == AysSchedules[f"{name}Sigmas"]


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_quickstart_levels_are_the_noise_levels_of_diffusers_timesteps(model):
    quick = align_your_steps(model, 10, final="sigma_min")
    assert quick.metadata["source"] == "quickstart"
    steps = AysSchedules[f"{DIFFUSERS[model]}Timesteps"]
    # Full precision: σ̃ at the integer timesteps of diffusers' lists (and at 0 for σ_min), computed from SD's
    # β table in float64 (CompVis/k-diffusion) to the 10 printed decimals; diffusers' float32 table is 4e-7 off.
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    alphas_cumprod = np.cumprod(1 - betas)[steps + [0]]
    assert np.allclose(quick.sigmas, np.sqrt((1 - alphas_cumprod) / alphas_cumprod), rtol=2e-9, atol=0)
    assert np.allclose(quick.sigmas, SD.sigma_tilde(np.array(steps + [0], float)), rtol=2e-5, atol=0)
    # They map back to diffusers' timesteps exactly; the paper's rounded values only to within one step
    # (SD 1.5: 0.399 lies at t = 124.56, which rounds to 125).
    assert ays_timesteps_for_diffusers(quick, SD) == steps
    paper_steps = ays_timesteps_for_diffusers(align_your_steps(model, 10, source="paper"), SD)
    assert np.abs(np.array(paper_steps) - steps).max() <= 1
    # diffusers' sigma lists are the paper's three decimals, which differ from the quickstart's full-precision
    # levels by up to 3.5e-3: the two published sources really disagree at the third decimal.
    diff = np.abs(align_your_steps(model, 10).sigmas - np.array(AysSchedules[f"{DIFFUSERS[model]}Sigmas"]))
    assert 1e-3 < diff.max() < 3.5e-3


def test_interpolation_semantics():
    levels = ays_noise_levels("sd15")
    assert np.array_equal(loglinear_interpolation(levels, 11), levels)
    # 5 steps (6 points) land exactly on every other published level.
    five = align_your_steps("sd15", 5)
    assert np.allclose(five.sigmas[:-1], levels[0:10:2], rtol=1e-13) and five.sigmas[-1] == 0.0
    # 20 steps: the published levels plus their geometric means (log-midpoints).
    twenty = align_your_steps("sd15", 20, final="sigma_min").sigmas
    assert np.allclose(twenty[::2], levels, rtol=1e-13)
    assert np.allclose(twenty[1::2], np.sqrt(levels[:-1] * levels[1:]), rtol=1e-13)
    # 8 steps, ComfyUI semantics: log-linear interpolation of the 11 levels to 9, the last replaced by 0.
    eight = align_your_steps("sd15", 8)
    assert np.allclose(eight.sigmas, [14.615, 5.691, 3.227, 2.060, 1.394, 0.875, 0.509, 0.193, 0.0], atol=6e-4)
    assert ays_timesteps_for_diffusers(eight, SD) == [999, 823, 692, 571, 455, 314, 173, 38]
    for n in (1, 2, 3, 7, 13, 50):
        s = align_your_steps("sdxl", n)
        assert s.num_steps == n and s.sigmas[0] == levels[0] and s.sigmas[-1] == 0.0


def test_final_conventions():
    levels = ays_noise_levels("sd15")
    zero = align_your_steps("sd15", 10)
    append = align_your_steps("sd15", 10, final="append_zero")
    keep = align_your_steps("sd15", 10, final="sigma_min")
    assert zero.metadata["final"] == "zero" and append.metadata["final"] == "append_zero"
    assert zero.num_steps == append.num_steps == keep.num_steps == 10
    assert zero.sigmas[-2] == levels[-2] and zero.sigmas[-1] == 0.0 and keep.sigmas[-1] == levels[-1]
    # append_zero (AUTOMATIC1111): 10 levels interpolated over the 11 published ones, then σ_min → 0.
    assert append.sigmas[-2] == levels[-1] and append.sigmas[-1] == 0.0
    assert np.allclose(append.sigmas[:-1], loglinear_interpolation(levels, 10))
    assert not np.allclose(append.sigmas[1:-2], levels[1:-2], rtol=1e-3)
    assert align_your_steps("sd15", 1, final="append_zero").sigmas.tolist() == [levels[0], 0.0]


@pytest.mark.parametrize("old, general", [("replace", "zero"), ("append", "append_zero")])
def test_former_final_names_are_deprecated_aliases_of_the_general_ones(old, general):
    with pytest.warns(DeprecationWarning, match=f"final convention '{old}' is deprecated: use '{general}'"):
        sched = align_your_steps("sd15", 7, final=old)
    assert np.array_equal(sched.sigmas, align_your_steps("sd15", 7, final=general).sigmas)
    assert sched.metadata["final"] == general  # the canonical name, whichever was asked for
    with pytest.warns(DeprecationWarning):
        assert schedule_from_levels(ays_noise_levels("sdxl"), 5, old).metadata["final"] == general
    learned = LearnedSchedule({4: ays_noise_levels("sd15")[::2][:5], 10: ays_noise_levels("sd15")})
    for n in (4, 6):  # a stage's own levels, and the finest stage interpolated
        with pytest.warns(DeprecationWarning):
            old_way = learned.schedule(n, final=old)
        new_way = learned.schedule(n, final=general)
        assert np.array_equal(old_way.sigmas, new_way.sigmas) and old_way.metadata["final"] == general


@pytest.mark.parametrize(
    "make", [lambda f: align_your_steps("sd15", 10, final=f), lambda f: schedule_from_levels([9.0, 1.0, 0.1], 4, f)]
)
def test_unknown_final_names_the_options(make):
    message = (
        r"unknown final convention 'last': expected one of \('zero', 'sigma_min', 'append_zero'\) "
        r"\(deprecated: 'replace' for 'zero', 'append' for 'append_zero'\)"
    )
    with pytest.raises(ValueError, match=message):
        make("last")


def test_bad_input_is_rejected_with_the_offending_value():
    with pytest.raises(ValueError, match=r"strictly decreasing: \[2\] = 5.0 is not below \[1\] = 3.0"):
        schedule_from_levels([10.0, 3.0, 5.0, 0.1], 5)
    with pytest.raises(ValueError, match="non-finite value: \\[1\\] = nan"):
        schedule_from_levels([10.0, float("nan"), 0.1], 5)
    with pytest.raises(ValueError, match="positive"):
        schedule_from_levels([10.0, 1.0, 0.0], 5)
    with pytest.raises(ValueError, match="outside the model's noise range"):
        align_your_steps("svd", 10, process=SD)  # σ = 700 on Stable Diffusion
    with pytest.raises(ValueError, match="no published Align Your Steps schedule for 'sd3'"):
        align_your_steps("sd3", 10)
    with pytest.raises(ValueError, match="quickstart has no deepfloyd_if"):
        ays_noise_levels("deepfloyd_if", source="quickstart")
    with pytest.raises(ValueError, match="round to the same training timestep"):
        ays_timesteps_for_diffusers(align_your_steps("sd15", 900), SD)
    assert align_your_steps("SD1", 10).metadata["model"] == "sd15"  # ComfyUI's names work


@pytest.fixture(scope="module")
def sd_gmm():
    x_T = torch.randn(6, *SMOOTH_MIXTURE.sample_shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return SMOOTH_MIXTURE.as_model(SD, "epsilon"), x_T


def test_every_solver_of_ours_runs_on_ays_schedules(sd_gmm):
    model, x_T = sd_gmm
    den = SMOOTH_MIXTURE.as_denoiser(SD)
    sched = align_your_steps("sd15", 10, final="sigma_min", process=SD)
    exact = reference_solution(SMOOTH_MIXTURE, SD, x_T, sched.sigmas[0], sched.sigmas[-1], rtol=1e-8, atol=1e-8)
    errors = {}
    for solver in (DDIM(), Euler(), DPMSolverPlusPlus(2), DPMSolverPlusPlus(3), DPMSolverPlusPlusSinglestep(2)):
        out = sample(den, solver, sched, x_T=x_T, dtype=torch.float64, progress=False)
        errors[solver.name] = rms(out, exact)
    assert all(e < 0.15 for e in errors.values()), errors
    assert errors["dpm++2m"] < errors["ddim"] / 2 and errors["dpm++3m"] < errors["ddim"] / 2, errors


def test_with_diffusers_euler_sigmas_and_dpm_timesteps(sd_gmm):
    model, x_T = sd_gmm
    sched = align_your_steps("sd15", 10, process=SD)
    call = lambda x, t: model(x, t).sample  # noqa: E731
    # diffusers' Euler with sigmas= equals our Euler on the same schedule.
    euler = EulerDiscreteScheduler(**SD_CONFIG)
    euler.set_timesteps(sigmas=ays_sigmas_for_diffusers(sched))
    # (diffusers' Euler starts from σ_max·x_T with linspace spacing; the VP-consistent start is √(1 + σ_max²)·x_T.)
    x = x_T.float() * float(np.sqrt(1 + sched.sigmas[0] ** 2))
    for t in euler.timesteps:
        x = euler.step(call(euler.scale_model_input(x, t), t), t, x).prev_sample
    theirs = x
    ours = sample(SMOOTH_MIXTURE.as_denoiser(SD), Euler(), sched, x_T=x_T.float(), progress=False)
    assert torch.allclose(ours, theirs, atol=2e-5), float((ours - theirs).abs().max())
    # diffusers' DPM-Solver++ with timesteps= equals ours (pipeline scheduler and sample()).
    steps = ays_timesteps_for_diffusers(sched, SD)
    ref = scheduler_loop(DPMSolverMultistepScheduler(**SD_CONFIG), x_T.float(), call, timesteps=steps)
    adapter = scheduler_loop(DPMSolverPlusPlusScheduler(**SD_CONFIG), x_T.float(), call, timesteps=steps)
    looped = sample(
        SMOOTH_MIXTURE.as_denoiser(SD), DPMSolverPlusPlus(2), from_timesteps(SD, steps), x_T=x_T.float(), progress=False
    )
    assert torch.allclose(adapter, ref, atol=1e-5) and torch.allclose(looped, ref, atol=1e-5)
