"""The one recipe parser: solver and schedule specs, what they build, and the errors for bad ones."""

import numpy as np
import pytest

from diffsamplers.apps.recipes import SOLVERS, flow_schedule, make_solver, parse_schedule, parse_solver
from diffsamplers.models.gmm import default_flow_process, default_process
from diffsamplers.schedules import SPACINGS, align_your_steps, diffusers_spacing, karras, uniform_logsnr
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
    same("karras", karras(PROCESS, 7, final="zero"))
    same("karras/append_zero", karras(PROCESS, 7, final="append_zero"))
    same("karras:rho=5/zero", karras(PROCESS, 7, final="zero", rho=5.0))
    sd = parse_schedule("ays:sd15/append")
    assert np.array_equal(sd.build(None, 10).sigmas, align_your_steps("sd15", 10, final="append_zero").sigmas)
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
        final = "sigma_min" if spec.endswith("sigma_min") else "zero"
        assert np.allclose(parse_schedule(spec).build(PROCESS, 4).sigmas, learned.schedule(4, final=final).sigmas)


@pytest.mark.parametrize("final", [None, "zero", "append_zero", "sigma_min", "replace", "append"])
def test_every_schedule_kind_takes_every_final_suffix(final, tmp_path):
    """``/zero`` (the default for every kind), ``/append_zero`` and ``/sigma_min`` on every σ̃ spacing, ays: and
    learned:; AYS's deprecated ``/replace`` and ``/append`` there too, as ``/zero`` and ``/append_zero``."""
    general = {None: "zero", "replace": "zero", "append": "append_zero"}.get(final, final)
    suffix = "" if final is None else f"/{final}"
    path = tmp_path / "learned.safetensors"
    learned = LearnedSchedule({4: uniform_logsnr(PROCESS, 4, final="sigma_min").sigmas})
    learned.save(path)
    kinds = {f"ays:sd15{suffix}": lambda: align_your_steps("sd15", 6, final=general)}
    kinds[f"learned:{path}{suffix}"] = lambda: learned.schedule(6, final=general)
    kinds[f"{path}{suffix}"] = kinds[f"learned:{path}{suffix}"]
    if final not in ("replace", "append"):
        for name, builder in SPACINGS.items():
            kinds[f"{name}{suffix}"] = lambda b=builder: b(PROCESS, 6, final=general)
    for spec, expected in kinds.items():
        got = parse_schedule(spec).build(None if spec.startswith("ays:") else PROCESS, 6)
        assert np.array_equal(got.sigmas, expected().sigmas), spec
        assert got.metadata["final"] == general and got.num_steps == 6, spec
        assert got.sigmas.size == 7 and (got.sigmas[-1] == 0) == (general != "sigma_min"), spec


@pytest.mark.parametrize(
    "spec, steps, error, message",
    [
        ("cosine", 5, ValueError, "unknown schedule 'cosine': expected linspace, leading, trailing"),
        ("karras/last", 5, ValueError, "unknown final level 'last'"),
        ("linspace/replace", 5, ValueError, "/replace is for ays: and learned: schedules .*: use /zero"),
        ("karras/append", 5, ValueError, "/append is for ays: and learned: schedules .*: use /append_zero"),
        ("linspace/append_zero", 5, ValueError, "'append_zero' for diffusers' 'linspace' spacing: expected 'zero' or"),
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


# -- guidance specs of the reward and particle methods ----------------------------------------------------------


def spec_reward(x):
    """A reward for ``reward=package.module:function``: the first coordinate of each sample."""
    return x.flatten(1)[:, 0]


@pytest.fixture(scope="module")
def gmm_cond():
    from diffsamplers.apps.registry import load_model

    return load_model("gmm-cond")


def test_fk_steering_spec_splits_the_name_and_each_option_once(gmm_cond):
    """The reward's own colon and dots stay in its value: the name ends at the first colon, an option at its first =."""
    from diffsamplers.apps.recipes import parse_guidance
    from diffsamplers.guidance import FKSteering
    from diffsamplers.guidance.rewards import DigitsClassProbability

    recipe = parse_guidance("2+fk-steering:k=8,lam=10,potential=max,reward=digits-class:3")
    assert recipe.scale == 2.0
    assert recipe.terms == (("fk-steering", {"k": 8, "lam": 10, "potential": "max", "reward": "digits-class:3"}),)
    (fk,) = recipe.build(None)  # no model at hand: the classifier on the CPU
    assert isinstance(fk, FKSteering) and isinstance(fk.reward, DigitsClassProbability)
    assert (fk.num_particles, fk.lam, fk.potential, fk.reward.target) == (8, 10.0, "max", 3)
    assert (fk.interval, fk.start, fk.ess_threshold, fk.scheme) == (1, 1.0, None, "systematic")  # the class's defaults
    spec = f"fk-steering:k=2,reward={__name__}:spec_reward,interval=5,start=0.6,ess=0.5,scheme=multinomial"
    (fk,) = parse_guidance(spec).build(gmm_cond)
    assert fk.reward is spec_reward and fk.potential == "difference" and fk.lam == 10.0
    assert (fk.interval, fk.start, fk.ess_threshold, fk.scheme) == (5, 0.6, 0.5, "multinomial")


def test_fkc_specs_build_the_three_targets(gmm_cond):
    from diffsamplers.apps.recipes import parse_guidance
    from diffsamplers.guidance.fk_correctors import FeynmanKacCorrector

    (anneal,) = parse_guidance("fkc:k=8,anneal=2").build(gmm_cond)
    assert isinstance(anneal, FeynmanKacCorrector) and anneal.num_particles == 8
    assert [(e.beta, e.cond) for e in anneal.experts] == [(2.0, "cond")]
    (cfg,) = parse_guidance("fkc:k=4,cfg=3,interval=2,ess=0.5,clamp=1").build(gmm_cond)
    (w_c, cond), (w_u, null) = [(e.beta, e.cond) for e in cfg.experts]  # the unconditional expert: the null label
    assert (w_c, cond, w_u) == (3.0, "cond", -2.0) and null["class_labels"].tolist() == [gmm_cond.null_class]
    assert (cfg.num_particles, cfg.interval, cfg.ess_threshold, cfg.clamp) == (4, 2, 0.5, 1.0)
    (product,) = parse_guidance("fkc:k=2,classes=3-5").build(gmm_cond)
    assert [e.beta for e in product.experts] == [1.0, 1.0]
    assert [e.cond[gmm_cond.cond_key].tolist() for e in product.experts] == [[3], [5]]


def test_svdd_spec(gmm_cond):
    from diffsamplers.apps.recipes import parse_guidance
    from diffsamplers.guidance.rewards import PixelMass
    from diffsamplers.guidance.svdd import SVDD

    (svdd,) = parse_guidance("svdd:m=8,reward=pixel-mass:-1,alpha=0.5,value=mc,rollouts=2,rollout_steps=3").build(
        gmm_cond
    )
    assert isinstance(svdd, SVDD) and isinstance(svdd.reward, PixelMass) and svdd.reward.sign == -1
    assert (svdd.num_candidates, svdd.alpha, svdd.value, svdd.rollouts, svdd.rollout_steps) == (8, 0.5, "mc", 2, 3)
    (svdd,) = parse_guidance("svdd:m=4,reward=pixel-mass").build(gmm_cond)
    assert (svdd.alpha, svdd.value) == (0.0, "pm")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("fk-steering:reward=pixel-mass", "fk-steering needs k=K, the particles per group"),
        ("fk-steering:k=0,reward=pixel-mass", "fk-steering: k (the particles per group) must be an integer ≥ 1, got 0"),
        ("fk-steering:k=2.5,reward=pixel-mass", "must be an integer ≥ 1, got 2.5"),
        (
            "fk-steering:k=4",
            "fk-steering needs reward=SPEC: digits-class:C, pixel-mass[:-1], text-chars:CLASS, package.module:function",
        ),
        ("fk-steering:k=4,reward=clip", "unknown reward 'clip': expected digits-class:C"),
        ("fk-steering:k=4,reward=pixel-mass,potential=rt", "fk-steering: unknown potential 'rt': expected one of"),
        ("fk-steering:k=4,reward=pixel-mass,lam=hot", "fk-steering: lam must be a finite number, got 'hot'"),
        ("fk-steering:k=4,reward=pixel-mass,lam=-1", "the inverse temperature λ must be finite and ≥ 0, got -1.0"),
        ("fk-steering:k=4,reward=pixel-mass,interval=0", "fk-steering: interval (the evaluations between"),
        ("fk-steering:k=4,reward=pixel-mass,particles=8", "bad option (_fk_steering() got an unexpected keyword"),
        ("fk-steering:k=4,reward=digits-class:3", "reward 'digits-class:3' scores 1×16×16 digits images"),
        ("fkc:k=4", "fkc takes exactly one target: anneal=β, cfg=S or classes=C1-C2, got none"),
        ("fkc:k=4,anneal=2,cfg=3", "fkc takes exactly one target: anneal=β, cfg=S or classes=C1-C2, got anneal, cfg"),
        ("fkc:k=0,anneal=2", "fkc: k (the particles per group) must be an integer ≥ 1, got 0"),
        ("fkc:k=2,classes=3", "fkc: classes= names the product's classes, two or more separated by '-'"),
        ("fkc:k=2,classes=3-12", "fkc: classes must be class labels in 0..9, got [3, 12]"),
        ("fkc:k=2,anneal=-1", "the annealing exponent β must be a finite number > 0, got -1"),
        ("svdd:m=0,reward=pixel-mass", "svdd: m (the candidates per step) must be an integer ≥ 1, got 0"),
        ("svdd:reward=pixel-mass", "svdd needs m=M, the candidates per step"),
        ("svdd:m=2,reward=pixel-mass,value=tds", "svdd: unknown value estimator 'tds': expected one of pm, mc"),
        ("svdd:m=2,reward=nope.module:f", "reward 'nope.module:f': no module 'nope.module' to import"),
    ],
)
def test_bad_particle_specs_raise_one_line_naming_the_value(spec, message, gmm_cond):
    from diffsamplers.apps.recipes import parse_guidance

    with pytest.raises(ValueError) as err:
        parse_guidance(spec).build(gmm_cond)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_fkc_cfg_and_classes_need_a_class_conditional_model():
    from diffsamplers.apps.recipes import parse_guidance
    from diffsamplers.apps.registry import load_model

    gmm = load_model("gmm")
    for spec in ("fkc:k=2,cfg=3", "fkc:k=2,classes=1-2"):
        with pytest.raises(ValueError, match=r"needs a class-conditional model; 'gmm' is not"):
            parse_guidance(spec).build(gmm)
    assert parse_guidance("fkc:k=2,anneal=0.5").build(gmm)[0].experts[0].beta == 0.5
