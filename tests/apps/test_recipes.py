"""The one recipe parser: solver and schedule specs, what they build, and the errors for bad ones."""

import numpy as np
import pytest

from diffsamplers.apps.recipes import SOLVERS, flow_schedule, make_solver, parse_schedule, parse_solver
from diffsamplers.models.gmm import default_flow_process, default_process
from diffsamplers.schedules import align_your_steps, diffusers_spacing, karras, uniform_logsnr
from diffsamplers.schedules.learned import LearnedSchedule
from diffsamplers.solvers import (
    DDIM,
    DPMSolverPlusPlus,
    DPMSolverPlusPlusSinglestep,
    ExposureBiasTimeShift,
    UniPC,
)
from diffsamplers.solvers.dc_ratios import DCRatios

PROCESS = default_process()


@pytest.mark.parametrize(
    "spec, cls, attrs",
    [
        ("ddim", DDIM, {"eta": 0.0}),
        ("ddim:eta=0.5", DDIM, {"eta": 0.5}),
        ("ddim-eta1", DDIM, {"eta": 1.0}),
        ("dpm++2m", DPMSolverPlusPlus, {"order": 2, "sde": False}),
        ("dpm++3m:third_order=reference", DPMSolverPlusPlus, {"order": 3, "third_order": "reference"}),
        ("sde-dpm++2m", DPMSolverPlusPlus, {"order": 2, "sde": True}),
        ("dpm++3s", DPMSolverPlusPlusSinglestep, {"order": 3}),
        ("unipc:order=3,variant=bh1", UniPC, {"order": 3, "variant": "bh1"}),
    ],
)
def test_registered_solvers_with_options(spec, cls, attrs):
    solver = make_solver(spec)
    assert type(solver) is cls
    for name, value in attrs.items():
        assert getattr(solver, name) == value, (spec, name)


def test_every_registered_name_builds():
    for name in SOLVERS:
        assert make_solver(name).plan(PROCESS, uniform_logsnr(PROCESS, 6)).num_evals == 6, name


def test_time_shift_suffix_wraps_any_solver_of_ours():
    solver = make_solver("unipc+ts:half_width=15,cutoff=300,signal_variance=0.1")
    assert isinstance(solver, ExposureBiasTimeShift) and isinstance(solver.base, UniPC)
    assert (solver.half_width, solver.cutoff, solver.signal_variance) == (15, 300.0, 0.1)
    assert make_solver("ddim+ts").half_width == 10  # the class's defaults


def test_dc_solver_ratio_sources(tmp_path):
    path = tmp_path / "r.safetensors"
    DCRatios([1.0, 1.0, 1.2, 0.9, 1.1], "m", 1.0, {}, {}).save(path)
    recipe = parse_solver(f"dc-solver:{path}")
    assert recipe.ratios == str(path) and not recipe.searches_ratios
    assert recipe.build(nfe=5).ratios == (1.0, 1.0, 1.2, 0.9, 1.1)
    with pytest.raises(ValueError, match="searched for NFE 5, but this run has NFE 6"):
        recipe.build(nfe=6)
    searched = parse_solver("dc-solver:search")
    assert searched.searches_ratios
    assert searched.build(search=lambda dc: [1.0, 1.0, 0.5]).ratios == (1.0, 1.0, 0.5)
    assert searched.build(search=lambda dc: None).ratios is None
    with pytest.raises(ValueError, match="searches its ratios for the schedule: this job cannot run a search"):
        searched.build()
    plain = parse_solver("dc-solver:dc_order=1")
    assert plain.options == {"dc_order": 1} and plain.ratios is None
    with pytest.raises(ValueError, match="this model has no folder"):
        plain.build(nfe=5)


def test_diffusers_specs_are_recognised_but_not_built_as_solvers():
    recipe = parse_solver("diffusers:DDIMScheduler:timestep_spacing=trailing,set_alpha_to_one=true")
    assert recipe.is_diffusers and recipe.scheduler_class == "DDIMScheduler"
    assert recipe.options == {"timestep_spacing": "trailing", "set_alpha_to_one": True}
    with pytest.raises(ValueError, match="is a diffusers scheduler: run it with a diffusers loop"):
        recipe.build()


@pytest.mark.parametrize(
    "spec, message",
    [
        ("dpm++4m", "unknown solver 'dpm\\+\\+4m': expected ddim, ddim-eta1, euler"),
        ("ddim:eta", "options must be key=value pairs"),
        ("ddim:gamma=2", "'ddim:gamma=2': bad option"),
        ("ddim+tsx", "the time shift is written \\+ts or \\+ts:half_width"),
        ("diffusers:", "needs a scheduler class"),
    ],
)
def test_bad_solver_specs_name_the_spec_and_list_what_exists(spec, message):
    with pytest.raises(ValueError, match=message):
        make_solver(spec)


def test_schedule_specs_build_the_schedules_of_the_library(tmp_path):
    def same(spec, expected, steps=7):
        got = parse_schedule(spec).build(PROCESS, steps)
        assert np.array_equal(got.sigmas, expected.sigmas), spec
        return got

    same("linspace", diffusers_spacing(PROCESS, 7))
    same("trailing/sigma_min", diffusers_spacing(PROCESS, 7, "trailing", final="sigma_min"))
    same("logsnr", uniform_logsnr(PROCESS, 7))
    same("uniform_logsnr/sigma_min", uniform_logsnr(PROCESS, 7, final="sigma_min"))
    same("karras", karras(PROCESS, 7))
    same("karras:rho=5/zero", karras(PROCESS, 7, final="zero", rho=5.0))
    sd = parse_schedule("ays:sd15/append")
    assert np.array_equal(sd.build(None, 10).sigmas, align_your_steps("sd15", 10, final="append").sigmas)
    assert (
        parse_schedule("linspace").diffusers_spacing == "linspace"
        and parse_schedule("karras").diffusers_spacing is None
    )
    explicit = parse_schedule("sigmas:100,10,1,0").build(PROCESS, None)
    assert explicit.sigmas.tolist() == [100.0, 10.0, 1.0, 0.0]
    path = tmp_path / "learned.safetensors"
    learned = LearnedSchedule({4: uniform_logsnr(PROCESS, 4, final="sigma_min").sigmas})
    learned.save(path)
    for spec in (str(path), f"learned:{path}", f"{path}/sigma_min"):
        final = "sigma_min" if spec.endswith("sigma_min") else "replace"
        assert np.allclose(parse_schedule(spec).build(PROCESS, 4).sigmas, learned.schedule(4, final=final).sigmas)


@pytest.mark.parametrize(
    "spec, steps, error, message",
    [
        ("cosine", 5, ValueError, "unknown schedule 'cosine': expected linspace, leading, trailing"),
        ("karras/last", 5, ValueError, "unknown final level 'last'"),
        ("linspace/replace", 5, ValueError, "/replace is for ays: and learned: schedules"),
        ("ays:", 5, ValueError, "ays needs a model"),
        ("ays:sd3", 5, ValueError, "no published Align Your Steps schedule for 'sd3'"),
        ("sigmas:3", None, ValueError, "at least two finite levels"),
        ("sigmas:3,x", None, ValueError, "takes numbers separated by commas"),
        ("learned:missing.safetensors", 5, FileNotFoundError, "no learned schedule file missing.safetensors"),
        ("logsnr", None, ValueError, "needs a number of steps"),
        ("karras:rho=-1", 5, ValueError, "rho must be positive"),
        ("flow:shift=0", 5, ValueError, "schedule 'flow:shift=0': shift must be a positive number, got 0"),
        ("flow:shift=inf", 5, ValueError, "shift must be a positive number, got inf"),
        ("flow:mu=1", 5, ValueError, "schedule 'flow:mu=1': flow takes only shift=S, got mu"),
        ("flow/append_zero", 5, ValueError, "the flow grid ends with /zero or /sigma_min, not /append_zero"),
        (
            "flow:shift=3",
            5,
            ValueError,
            "'flow:shift=3' is the flow-matching grid: it needs a RectifiedFlow model, not",
        ),
    ],
)
def test_bad_schedule_specs(spec, steps, error, message):
    with pytest.raises(error, match=message):
        parse_schedule(spec).build(PROCESS, steps)


@pytest.mark.parametrize("steps, shift", [(5, 3.0), (20, 3.0), (8, 1.0)])
def test_flow_spec_is_diffusers_dpm_solver_flow_grid(steps, shift):
    """``flow:shift=S`` visits the levels diffusers' DPM-Solver visits on a flow model (its float32 flow times),
    shifted as t = s·u/(1 + (s − 1)·u), ends at t = 0, and feeds the network 1000·t unrounded."""
    import diffusers

    flow = default_flow_process()
    spec = "flow" if shift == 1.0 else f"flow:shift={shift:g}"
    schedule = parse_schedule(spec).build(flow, steps)
    scheduler = diffusers.DPMSolverMultistepScheduler(
        use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift
    )
    scheduler.set_timesteps(steps)
    t = schedule.sigmas / (1.0 + schedule.sigmas)  # σ̃ → flow time
    np.testing.assert_array_equal(t.astype(np.float32), scheduler.sigmas.numpy())
    u = 1.0 - np.linspace(1.0, 1.0 / 1000, steps + 1)
    np.testing.assert_allclose(t[:-1], np.flip(shift * u / (1 + (shift - 1) * u))[:-1], rtol=1e-6)
    assert t[-1] == 0.0 and schedule.timesteps is None and schedule.metadata["shift"] == shift
    np.testing.assert_allclose(schedule.model_timesteps(flow), 1000.0 * t[:-1], rtol=1e-9)
    assert np.array_equal(flow_schedule(flow, steps, shift).sigmas, schedule.sigmas)


def test_diffusers_vp_spacings_on_a_flow_model_point_to_the_flow_grid():
    with pytest.raises(ValueError, match="'trailing' is diffusers' integer-timestep spacing .* use flow\\[:shift=S\\]"):
        parse_schedule("trailing").build(default_flow_process(), 5)
