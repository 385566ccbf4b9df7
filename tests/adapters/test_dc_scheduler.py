"""DCSolverScheduler: JSON config, ratios as a list or a file (checked), CPR files, the plug-in base, the same
numbers as the solver, and no host reads. (UniPC parity: test_unipc_parity.py; pipelines: test_pipelines.py.)"""

import json

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler

from diffsamplers import DCSolver, DCSolverScheduler, Denoiser, DPMSolverPlusPlus, UniPC, sample
from diffsamplers.diagnostics import HostReadCounter
from diffsamplers.noise import noise_process_from_config
from diffsamplers.schedules.diffusers_compat import schedule_from_scheduler_config
from diffsamplers.solvers.dc_cpr import CascadePolynomialRegression
from diffsamplers.solvers.dc_ratios import DCRatios, RatioMismatchError, schedule_description, solver_settings
from tests.helpers import SMOOTH_MIXTURE, scheduler_loop

pytestmark = pytest.mark.usefixtures("single_thread")

RATIOS8 = [1.0, 1.0, 0.9, 1.1, 1.05, 0.95, 1.2, 1.3]


def _model(config):
    process = noise_process_from_config(dict(UniPCMultistepScheduler(**config).config))
    net = SMOOTH_MIXTURE.as_model(process, "epsilon")
    return lambda x, t: net(x, t).sample


def _x(seed=0):
    return torch.randn(3, *SMOOTH_MIXTURE.sample_shape, generator=torch.Generator().manual_seed(seed))


def _ratio_file(tmp_path, nfe=8, model="gmm", scale=7.5, final="zero", base=None, name="r.safetensors"):
    sched = DCSolverScheduler(final_sigmas_type=final)
    schedule = schedule_from_scheduler_config(sched.process, sched.config, nfe)
    ratios = RATIOS8[:nfe] + [1.1] * max(0, nfe - 8)
    solver = DCSolver(base=base or UniPC(2, "bh2"))
    r = DCRatios(ratios, model, scale, schedule_description(schedule, sched.process), solver_settings(solver))
    return str(r.save(tmp_path / name))


def test_ratios_equal_the_solver_through_sample():
    """The scheduler loop with ratios equals diffsamplers.sample with DCSolver on the same schedule."""
    config = {}
    model = _model(config)
    x = _x().double()
    ours = scheduler_loop(DCSolverScheduler(dc_ratios=RATIOS8), x, model, num_inference_steps=8)
    sched = DCSolverScheduler()
    process = sched.process
    schedule = schedule_from_scheduler_config(process, sched.config, 8)
    direct = sample(
        Denoiser(model, process, "epsilon"), DCSolver(RATIOS8), schedule, x_T=x, dtype=torch.float64, progress=False
    )
    assert torch.allclose(ours, direct, atol=1e-12)
    plain = scheduler_loop(DCSolverScheduler(), x, model, num_inference_steps=8)
    assert not torch.allclose(ours, plain, atol=1e-4)


def test_config_round_trip_with_a_list_and_a_path(tmp_path):
    path = _ratio_file(tmp_path)
    for value in (RATIOS8, path):
        sched = DCSolverScheduler(dc_ratios=value, dc_model_id="gmm", solver_order=2)
        sched.save_pretrained(tmp_path / "s")
        saved = json.loads((tmp_path / "s" / "scheduler_config.json").read_text())
        assert saved["dc_ratios"] == value and saved["dc_order"] == 2
        loaded = DCSolverScheduler.from_pretrained(tmp_path / "s")
        x = _x()
        a = scheduler_loop(sched, x, _model({}), num_inference_steps=8)
        b = scheduler_loop(loaded, x, _model({}), num_inference_steps=8)
        assert torch.equal(a, b) and list(loaded.active_ratios) == pytest.approx(RATIOS8)


def test_ratio_file_checks(tmp_path):
    path = _ratio_file(tmp_path)
    sched = DCSolverScheduler(dc_ratios=path)
    with pytest.raises(RatioMismatchError, match=r"searched for NFE 8, but this run has NFE 10"):
        sched.set_timesteps(10)
    with pytest.raises(RatioMismatchError, match="model 'gmm', not 'digits'"):
        DCSolverScheduler(dc_ratios=path, dc_model_id="digits").set_timesteps(8)
    with pytest.raises(RatioMismatchError, match="guidance scale 7.5, not 3"):
        DCSolverScheduler(dc_ratios=path, dc_guidance_scale=3.0).set_timesteps(8)
    with pytest.raises(RatioMismatchError, match="noise levels"):
        DCSolverScheduler(dc_ratios=path, final_sigmas_type="sigma_min").set_timesteps(8)
    with pytest.raises(RatioMismatchError, match="variant='bh2', not variant='bh1'"):
        DCSolverScheduler(dc_ratios=path, solver_type="bh1").set_timesteps(8)
    DCSolverScheduler(dc_ratios=path, dc_model_id="gmm", dc_guidance_scale=7.5).set_timesteps(8)  # matches
    with pytest.raises(ValueError, match=r"dc_ratios has 8 ratios but the schedule has 6 steps"):
        DCSolverScheduler(dc_ratios=RATIOS8).set_timesteps(6)
    with pytest.raises(FileNotFoundError):
        DCSolverScheduler(dc_ratios=str(tmp_path / "missing.safetensors")).set_timesteps(8)


def test_cpr_file_predicts_any_nfe(tmp_path):
    searched = [DCRatios.load(_ratio_file(tmp_path, n, name=f"{n}.safetensors")) for n in (8, 10, 12)]
    fit = CascadePolynomialRegression.fit(searched)
    path = str(fit.save(tmp_path / "cpr.safetensors"))
    sched = DCSolverScheduler(dc_ratios=path, dc_guidance_scale=7.5)
    sched.set_timesteps(9)
    assert list(sched.active_ratios) == pytest.approx(fit.predict(9, 7.5))
    with pytest.raises(ValueError, match="set dc_guidance_scale"):
        DCSolverScheduler(dc_ratios=path).set_timesteps(9)
    with pytest.raises(ValueError, match="is for model 'gmm', not 'x'"):
        DCSolverScheduler(dc_ratios=path, dc_guidance_scale=7.5, dc_model_id="x").set_timesteps(9)


def test_plug_in_on_dpm_solver():
    """base_solver='dpmsolver++': ratio 1 is diffusers' DPM-Solver++ 2M; other ratios compensate it."""
    x, model = _x(1), _model({})
    theirs = scheduler_loop(DPMSolverMultistepScheduler(), x, model, num_inference_steps=8)
    ours = scheduler_loop(DCSolverScheduler(base_solver="dpmsolver++"), x, model, num_inference_steps=8)
    assert float((ours - theirs).abs().max()) <= 1e-5
    # float64_x0_conversion: the ε → x̂0 conversion of our own loop (the Denoiser), for an exact comparison
    dc = scheduler_loop(
        DCSolverScheduler(base_solver="dpmsolver++", dc_ratios=RATIOS8, float64_x0_conversion=True),
        x,
        model,
        num_inference_steps=8,
    )
    assert not torch.allclose(dc, ours, atol=1e-4)
    process = DCSolverScheduler().process
    schedule = schedule_from_scheduler_config(process, DCSolverScheduler().config, 8)
    direct = sample(
        Denoiser(model, process, "epsilon"), DCSolver(RATIOS8, DPMSolverPlusPlus(2)), schedule, x_T=x, progress=False
    )
    assert torch.allclose(dc, direct, atol=1e-6)


def test_no_host_reads_in_the_loop():
    sched = DCSolverScheduler(dc_ratios=[1.0, 1.0] + [1.1] * 23)
    sched.set_timesteps(25)
    x = torch.randn(2, 4, 8, 8)
    with HostReadCounter() as counter:
        for t in sched.timesteps:
            x = sched.step(0.1 * x, t, x).prev_sample
    assert counter.total == 1, dict(counter.counts)  # the NaN flag, after the last step
    sched.check_finite = False
    sched.set_timesteps(25)
    with HostReadCounter() as counter:
        for t in sched.timesteps:
            x = sched.step(0.1 * x, t, x).prev_sample
    assert counter.total == 0, dict(counter.counts)


@pytest.mark.parametrize("other", [UniPCMultistepScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler])
def test_switching_with_from_config(other):
    """From another scheduler's config (with ratios added) and back: ratios 1 give UniPC's numbers on that config,
    other ratios differ from them, and the other scheduler rebuilt from our config gives its own numbers again."""
    source = other(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="v_prediction")
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    model = lambda s, t: 0.1 * s  # noqa: E731
    ours = DCSolverScheduler.from_config(source.config, dc_ratios=[1.0, 1.0, 1.1, 1.1, 1.1])
    assert ours.config.beta_schedule == "scaled_linear" and ours.config.solver_type in ("bh1", "bh2")
    assert ours.config.dc_ratios == [1.0, 1.0, 1.1, 1.1, 1.1]
    unipc = scheduler_loop(UniPCMultistepScheduler.from_config(source.config), x, model, num_inference_steps=5)
    plain = scheduler_loop(DCSolverScheduler.from_config(source.config), x, model, num_inference_steps=5)
    assert float((plain - unipc).abs().max()) <= 1e-5
    assert not torch.allclose(scheduler_loop(ours, x, model, num_inference_steps=5), unipc, atol=1e-4)
    back = other.from_config(ours.config)
    assert back.config.prediction_type == "v_prediction"
    assert torch.equal(
        scheduler_loop(back, x, model, num_inference_steps=5),
        scheduler_loop(other.from_config(source.config), x, model, num_inference_steps=5),
    )


def test_same_numbers_as_diffusers_after_a_unipc_config_switch():
    unipc = UniPCMultistepScheduler(solver_order=3, solver_type="bh1", final_sigmas_type="sigma_min")
    ours = DCSolverScheduler.from_config(unipc.config)
    x, model = _x(2), _model({})
    a = scheduler_loop(unipc, x, model, num_inference_steps=12)
    assert float((scheduler_loop(ours, x, model, num_inference_steps=12) - a).abs().max()) <= 1e-5


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(solver_p=DPMSolverMultistepScheduler()), ValueError, "solver_p .* is not supported"),
        (dict(dc_ratios=torch.ones(5)), TypeError, "dc_ratios must be a list of numbers or a file path"),
        (dict(dc_ratios=np.ones(5)), TypeError, "dc_ratios must be a list"),
        (dict(solver_type="bh3"), ValueError, "unknown solver_type 'bh3'"),
        (dict(base_solver="ddim"), ValueError, "unknown base_solver 'ddim'"),
        (dict(solver_order=4), ValueError, "order must be 1, 2 or 3"),
        (dict(dc_order=5), ValueError, "dc_order must be an integer from 1 to 3"),
        (dict(use_karras_sigmas=True, use_beta_sigmas=True), ValueError, "only one of"),
    ],
)
def test_bad_config(kwargs, error, message):
    with pytest.raises(error, match=message):
        DCSolverScheduler(**kwargs)


def test_predict_x0_false_runs_in_data_prediction(caplog):
    sched = DCSolverScheduler(predict_x0=False)
    assert sched.config.predict_x0 is True
    assert "data prediction" in caplog.text
