"""Step schedules: diffusers' spacings reproduced, the named final conventions, and bad input."""

import math

import numpy as np
import pytest
from diffusers import DPMSolverMultistepScheduler

from diffsamplers.noise import ContinuousVP, DiscreteVP, RectifiedFlow, VarianceExploding
from diffsamplers.schedules import (
    FINAL_CONVENTIONS,
    SPACINGS,
    Schedule,
    align_your_steps,
    beta,
    build_schedule,
    diffusers_spacing,
    exponential,
    from_sigmas,
    from_timesteps,
    karras,
    uniform_logsnr,
    uniform_time,
)
from diffsamplers.schedules.diffusers_compat import schedule_from_scheduler_config
from diffsamplers.schedules.learned import LearnedSchedule

VP = DiscreteVP.from_beta_schedule()


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 25, 50, 999])
def test_diffusers_spacing_matches_dpm_solver(spacing, final, n):
    if n == 999 and (spacing == "leading" or (spacing == "trailing" and final == "sigma_min")):
        # diffusers feeds timestep 1000 (leading + offset) or ends with a zero-length step (trailing);
        # both are rejected here with a clear error instead.
        with pytest.raises(ValueError, match="cannot place 999 distinct steps|zero length"):
            diffusers_spacing(VP, n, spacing, final=final, steps_offset=int(spacing == "leading"))
        return
    ref = DPMSolverMultistepScheduler(
        timestep_spacing=spacing, final_sigmas_type=final, steps_offset=int(spacing == "leading")
    )
    ref.set_timesteps(n)
    ours = diffusers_spacing(VP, n, spacing, final=final, steps_offset=int(spacing == "leading"))
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    np.testing.assert_allclose(ours.sigmas, ref.sigmas.double().numpy(), rtol=2e-6)
    assert ours.num_steps == n


def test_duplicate_rounding_is_resolved():
    # diffusers puts two of 1000 linspace steps on one training timestep (and then returns NaN).
    ref = DPMSolverMultistepScheduler()
    ref.set_timesteps(1000)
    assert len(np.unique(ref.timesteps.numpy())) == 999
    ours = diffusers_spacing(VP, 1000, "linspace")
    np.testing.assert_array_equal(ours.timesteps, np.arange(999, -1, -1))
    with pytest.raises(ValueError, match="beyond the training schedule"):
        diffusers_spacing(VP, 1000, "linspace", final="sigma_min")


def test_lambda_min_clipped_matches_diffusers():
    cos = DiscreteVP.from_beta_schedule("squaredcos_cap_v2")
    ref = DPMSolverMultistepScheduler(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1)
    ref.set_timesteps(20)
    ours = diffusers_spacing(cos, 20, lambda_min_clipped=-5.1)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())


@pytest.mark.parametrize(
    "option, builder",
    [("use_karras_sigmas", karras), ("use_exponential_sigmas", exponential), ("use_beta_sigmas", beta)],
)
@pytest.mark.parametrize("n", [3, 10, 30])
def test_sigma_spacings_match_diffusers(option, builder, n):
    ref = DPMSolverMultistepScheduler(**{option: True})
    ref.set_timesteps(n)
    ours = builder(VP, n, final="append_zero")
    np.testing.assert_allclose(ours.sigmas, ref.sigmas.double().numpy(), rtol=1e-5)
    via_config = schedule_from_scheduler_config(VP, dict(ref.config), n)
    np.testing.assert_array_equal(via_config.timesteps, ref.timesteps.numpy())


def test_lu_lambdas_are_uniform_logsnr():
    ref = DPMSolverMultistepScheduler(use_lu_lambdas=True)
    ref.set_timesteps(12)
    ours = uniform_logsnr(VP, 12, final="append_zero")
    np.testing.assert_allclose(ours.sigmas, ref.sigmas.double().numpy(), rtol=1e-5)
    lam = -np.log(ours.sigmas[:-1])
    np.testing.assert_allclose(np.diff(lam), np.diff(lam)[0], rtol=1e-9)


@pytest.mark.parametrize("process", [VP, ContinuousVP(), VarianceExploding(), RectifiedFlow()], ids=type)
@pytest.mark.parametrize("builder", [uniform_time, uniform_logsnr, karras, exponential, beta])
def test_final_conventions(process, builder):
    n = 6
    zero = builder(process, n, final="zero")
    keep = builder(process, n, final="sigma_min")
    append = builder(process, n, final="append_zero")
    for s in (zero, keep, append):
        assert s.num_steps == n and np.all(np.diff(s.sigmas) < 0)
    assert zero.sigmas[-1] == 0 and append.sigmas[-1] == 0
    assert math.isclose(keep.sigmas[-1], process.sigma_min, rel_tol=1e-9)
    np.testing.assert_allclose(zero.sigmas[:-1], keep.sigmas[:-1])  # "zero" replaces the last grid point
    assert math.isclose(append.sigmas[-2], process.sigma_min, rel_tol=1e-9)  # "append_zero" keeps it
    assert math.isclose(keep.sigmas[0], process.sigma_max, rel_tol=1e-9)


@pytest.mark.parametrize("process", [VP, VarianceExploding()], ids=type)
@pytest.mark.parametrize("n", [1, 4, 10])
def test_one_final_policy_every_builder_defaults_to_zero(process, n):
    """Every builder ends by default with ``final="zero"``: the (n + 1)-point grid from σ_max to σ_min, its last
    level replaced by 0, so the n evaluation levels are the first n of that grid."""
    learned = LearnedSchedule({6: uniform_logsnr(process, 6, final="sigma_min").sigmas})
    builders = {
        **{name: lambda n, b=b: b(process, n) for name, b in SPACINGS.items()},
        **{f"build_schedule({name!r})": lambda n, s=name: build_schedule(process, n, s) for name in SPACINGS},
        "learned": learned.schedule,
    }
    grids = {
        **{name: lambda n, b=b: b(process, n, final="sigma_min").sigmas for name, b in SPACINGS.items()},
        **{
            f"build_schedule({name!r})": lambda n, b=b: b(process, n, final="sigma_min").sigmas
            for name, b in SPACINGS.items()
        },
        "learned": lambda n: learned.schedule(n, final="sigma_min").sigmas,
    }
    if process is VP:
        builders["align_your_steps"] = lambda n: align_your_steps("sd15", n)
        grids["align_your_steps"] = lambda n: align_your_steps("sd15", n, final="sigma_min").sigmas
        builders["diffusers linspace"] = lambda n: build_schedule(process, n, "linspace")
        grids["diffusers linspace"] = lambda n: build_schedule(process, n, "linspace", "sigma_min").sigmas
    for name, build in builders.items():
        sched, grid = build(n), grids[name](n)
        assert sched.metadata["final"] == "zero", name
        assert sched.sigmas.size == grid.size == n + 1 and sched.sigmas[-1] == 0.0, name
        np.testing.assert_array_equal(sched.sigmas[:-1], grid[:-1], err_msg=name)
        assert grid[-1] > 0, name


@pytest.mark.parametrize("builder", [*SPACINGS.values(), from_timesteps, diffusers_spacing])
def test_unknown_final_convention_names_the_options(builder):
    args = (VP, [999, 500]) if builder is from_timesteps else (VP, 4)
    with pytest.raises(ValueError, match=r"unknown final convention 'replace'.*expected .*'zero'.*'sigma_min'"):
        builder(*args, final="replace")  # AYS's deprecated name is not one of the builders'
    assert FINAL_CONVENTIONS == ("zero", "sigma_min", "append_zero")


def test_uniform_time_and_karras_formulae():
    p = ContinuousVP()
    s = uniform_time(p, 4, final="sigma_min")
    np.testing.assert_allclose(p.t_from_sigma_tilde(s.sigmas), np.linspace(1.0, 1e-3, 5), rtol=1e-10)
    k = karras(VarianceExploding(0.002, 80.0), 4, final="sigma_min", rho=7.0)
    ramp = np.linspace(0, 1, 5)
    np.testing.assert_allclose(k.sigmas, (80 ** (1 / 7) + ramp * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7)


def test_model_timesteps_default_to_the_process_map():
    s = uniform_logsnr(VP, 5)
    np.testing.assert_allclose(s.model_timesteps(VP), VP.t_from_sigma_tilde(s.sigmas[:-1]))
    assert s.model_timesteps(VP)[0] == pytest.approx(999.0)


def test_custom_lists():
    s = from_sigmas(VP, [14.6, 6.5, 2.0, 0.5, 0.0])
    assert s.num_steps == 4
    t = from_timesteps(VP, [999, 500, 100])
    np.testing.assert_allclose(t.sigmas[:-1], VP.sigma_tilde(np.array([999.0, 500.0, 100.0])))
    assert build_schedule(VP, 5, "karras").metadata["spacing"] == "karras"
    assert build_schedule(VP, 5, "trailing").metadata["spacing"] == "trailing"


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: uniform_time(VP, 0), "num_steps must be >= 1, got 0"),
        (lambda: uniform_time(VP, -3), "num_steps must be >= 1, got -3"),
        (lambda: karras(VP, 1001), "num_steps=1001 is beyond the training schedule"),
        (lambda: diffusers_spacing(VP, 5000), "beyond the training schedule"),
        (lambda: uniform_time(VP, 2.5), "must be an integer"),
        (lambda: Schedule([1.0, 2.0, 0.0]), r"sigmas\[1\] = 2.0 does not fall below sigmas\[0\] = 1.0"),
        (lambda: Schedule([3.0, float("nan"), 0.0]), r"non-finite noise level: sigmas\[1\] = nan"),
        (lambda: Schedule([3.0, 1.0, 1.0]), "strictly decreasing"),
        (lambda: Schedule([3.0]), "at least 2 noise levels"),
        (lambda: Schedule([3.0, -1.0]), "non-negative"),
        (lambda: from_sigmas(VP, [500.0, 1.0, 0.0]), r"sigmas\[0\] = 500 is outside the model's noise range"),
        (lambda: from_sigmas(VP, [10.0, 0.001, 0.0]), r"sigmas\[1\] = 0.001 is outside"),
        (lambda: from_timesteps(VP, [1200, 10]), "outside the model's range"),
        (lambda: uniform_time(VP, 5, final="last"), "unknown final convention 'last'"),
        (lambda: build_schedule(VP, 5, "cosine"), "unknown spacing 'cosine'"),
        (lambda: diffusers_spacing(ContinuousVP(), 5), "needs a discrete training schedule"),
    ],
)
def test_bad_schedules(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()
