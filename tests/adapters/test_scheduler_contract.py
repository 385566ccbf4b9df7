"""diffusers' scheduler contract for DPMSolverPlusPlusScheduler and DCSolverScheduler: the training tables and
``compute_snr``, config round trips, switching classes with the same numbers, ``add_noise``, step indices, outputs
and errors."""

import json
import logging

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.training_utils import compute_snr

from diffsamplers import DCSolverScheduler, DPMSolverPlusPlusScheduler, NonFiniteError
from diffsamplers.diagnostics import HostReadCounter
from diffsamplers.solvers import ExposureBiasTimeShift
from tests.helpers import scheduler_loop

SD_PNDM = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    skip_prk_steps=True,
    set_alpha_to_one=False,
    steps_offset=1,
)
BETA_CONFIGS = [
    {},
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(rescale_betas_zero_snr=True),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True),
    dict(trained_betas=np.linspace(1e-4, 0.02, 1000).tolist()),
    dict(trained_betas=np.linspace(3e-4, 0.03, 500).astype(np.float32).tolist(), num_train_timesteps=500),
    dict(num_train_timesteps=25),
]
PAIRS = [(DPMSolverPlusPlusScheduler, DPMSolverMultistepScheduler), (DCSolverScheduler, UniPCMultistepScheduler)]
TABLES = ("betas", "alphas", "alphas_cumprod", "alpha_t", "sigma_t", "lambda_t", "sigmas")


def _dummy(x, t):
    return x * t / (t + 1)


def _deterministic_sample():
    """diffusers' test fixture ``dummy_sample_deter``."""
    n = 4 * 3 * 8 * 8
    return (torch.arange(n).reshape(3, 8, 8, 4) / n).permute(3, 0, 1, 2)


def _full_loop(scheduler, steps=10):
    """diffusers' test loop (its ``full_loop``: x·t/(t + 1) as the model), seeded for stochastic schedulers."""
    torch.manual_seed(0)
    return scheduler_loop(scheduler, _deterministic_sample(), _dummy, num_inference_steps=steps)


# -- training tables ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", BETA_CONFIGS, ids=lambda c: ",".join(f"{k}" for k in c) or "default")
@pytest.mark.parametrize("ours, theirs", PAIRS, ids=lambda c: c.__name__)
def test_training_tables_are_diffusers(ours, theirs, config):
    """``betas`` … ``lambda_t`` (and ``sigmas`` before set_timesteps): float32, bit for bit diffusers'."""
    a, b = ours(**config), theirs(**config)
    for name in TABLES:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype == torch.float32 and torch.equal(x, y), name


@pytest.mark.parametrize("config", BETA_CONFIGS, ids=lambda c: ",".join(f"{k}" for k in c) or "default")
@pytest.mark.parametrize("ours, theirs", PAIRS, ids=lambda c: c.__name__)
def test_compute_snr_equals_ddpm(ours, theirs, config):
    """``diffusers.training_utils.compute_snr`` (Min-SNR weighting) reads ``alphas_cumprod``: on ours it equals its
    value on DDPMScheduler with the same config, for 1-D and per-sample timesteps — except where diffusers' own
    multistep schedulers differ from DDPM: with zero terminal SNR they set ᾱ_{N−1} = 2⁻²⁴ (DDPM keeps 0)."""
    a, ddpm = ours(**config), DDPMScheduler(**config)
    n = ddpm.config.num_train_timesteps
    for t in (torch.tensor([0, 1, n // 4, n // 2, n - 2, n - 1]), torch.tensor([[0, n // 3, n - 1], [5, 6, n - 2]])):
        snr, snr_ddpm = compute_snr(a, t), compute_snr(ddpm, t)
        assert torch.equal(snr, compute_snr(theirs(**config), t))
        terminal = t == n - 1
        assert torch.equal(snr[~terminal], snr_ddpm[~terminal])
        if config.get("rescale_betas_zero_snr"):
            assert torch.all(snr_ddpm[terminal] == 0) and torch.allclose(snr[terminal], torch.tensor(2.0**-24))
        else:
            assert torch.equal(snr[terminal], snr_ddpm[terminal])


@pytest.mark.parametrize("ours, theirs", PAIRS, ids=lambda c: c.__name__)
def test_flow_config_tables_are_diffusers(ours, theirs):
    """With use_flow_sigmas diffusers still builds the tables from the β keys (they describe no flow marginal); we
    do the same, so compute_snr gives DDPM's numbers there too."""
    config = dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)
    a, b = ours(**config), theirs(**config)
    for name in TABLES:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    t = torch.tensor([0, 250, 999])
    assert torch.equal(compute_snr(a, t), compute_snr(DDPMScheduler(), t))


# -- grids -------------------------------------------------------------------------------------------------------
def _config_id(config: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in config.items()) or "default"


GRID_CONFIGS = [
    {},
    dict(timestep_spacing="leading", steps_offset=1),
    dict(timestep_spacing="trailing"),
    dict(use_karras_sigmas=True),
    dict(use_exponential_sigmas=True),
    dict(use_beta_sigmas=True),
    dict(use_lu_lambdas=True),
    dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1),
    dict(beta_schedule="squaredcos_cap_v2", use_karras_sigmas=True),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, use_karras_sigmas=True),
    dict(rescale_betas_zero_snr=True),
    dict(rescale_betas_zero_snr=True, timestep_spacing="trailing"),
    dict(rescale_betas_zero_snr=True, use_exponential_sigmas=True),
    dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0),
    dict(use_flow_sigmas=True, prediction_type="flow_prediction", use_karras_sigmas=True),
    dict(use_flow_sigmas=True, prediction_type="flow_prediction", shift_terminal=0.1),
]


def _applies(theirs: type, config: dict, steps: int) -> bool:
    """Whether diffusers' class takes the config at that step count (some keys exist for one class only)."""
    if theirs is DPMSolverMultistepScheduler and (
        "shift_terminal" in config or (config.get("use_flow_sigmas") and config.get("use_karras_sigmas"))
    ):
        return False  # UniPC-only configs
    if theirs is UniPCMultistepScheduler and ("lambda_min_clipped" in config or "use_lu_lambdas" in config):
        return False  # DPM-Solver-only configs
    return not ("shift_terminal" in config and steps == 1)  # diffusers' levels are NaN there (test below)


GRID_CASES = [
    pytest.param(ours, theirs, config, final, steps, id=f"{ours.__name__}-{_config_id(config)}-{final}-{steps}")
    for ours, theirs in PAIRS
    for config in GRID_CONFIGS
    for final in ("zero", "sigma_min")
    for steps in (1, 7, 25, 999, 1000)
    if _applies(theirs, config, steps)
]


@pytest.mark.parametrize("ours, theirs, config, final, steps", GRID_CASES)
def test_grids_are_diffusers_bit_for_bit(ours, theirs, config, final, steps):
    """``timesteps`` and the float32 ``sigmas`` after ``set_timesteps`` equal diffusers', zero-length and rising
    steps included (every ramp with σ_min, 1000 of 1000, a zero-terminal-SNR table's last steps)."""
    config = dict(config, final_sigmas_type=final)
    if steps > 25 and (config.get("use_karras_sigmas") or config.get("use_beta_sigmas")):
        steps = 25  # diffusers' per-level Python loop is slow; the grids are the same at any count
    a, b = ours(**config), theirs(**config)
    a.set_timesteps(steps)
    b.set_timesteps(steps)
    assert torch.equal(a.timesteps, b.timesteps) and torch.equal(a.sigmas, b.sigmas)


def test_one_step_shift_terminal_grid_is_refused_where_diffusers_gives_nan():
    config = dict(use_flow_sigmas=True, prediction_type="flow_prediction", shift_terminal=0.1)
    theirs = UniPCMultistepScheduler(**config)
    with np.errstate(divide="ignore", invalid="ignore"):
        theirs.set_timesteps(1)
    assert not torch.isfinite(theirs.sigmas).all()
    with pytest.raises(ValueError, match="shift_terminal=0.1 cannot stretch a grid whose last level is t = 1"):
        DCSolverScheduler(**config).set_timesteps(1)


# -- config round trips ------------------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    sched = DPMSolverPlusPlusScheduler(
        solver_order=3,
        prediction_type="v_prediction",
        use_karras_sigmas=True,
        trained_betas=np.linspace(1e-4, 0.02, 1000).tolist(),
        strictly_decreasing_sigmas=True,
        float64_x0_conversion=True,
    )
    sched.save_pretrained(tmp_path)
    loaded = DPMSolverPlusPlusScheduler.from_pretrained(tmp_path)
    strip = lambda c: {k: v for k, v in c.items() if k != "_use_default_values"}  # noqa: E731
    assert strip(loaded.config) == strip(sched.config)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(
        scheduler_loop(sched, x, _dummy, num_inference_steps=7),
        scheduler_loop(loaded, x, _dummy, num_inference_steps=7),
    )
    json.loads((tmp_path / "scheduler_config.json").read_text())


@pytest.mark.parametrize("cls", [DPMSolverPlusPlusScheduler, DCSolverScheduler], ids=lambda c: c.__name__)
def test_time_shift_keys_round_trip(cls, tmp_path):
    """The exposure-bias time shift is config: saved, loaded, and the loaded scheduler shifts the same way."""
    keys = dict(
        exposure_bias_shift_half_width=20,
        exposure_bias_shift_cutoff=200.0,
        exposure_bias_shift_variance_source="epsilon",
        exposure_bias_shift_signal_variance=0.1,
        exposure_bias_shift_start_step=2,
    )
    sched = cls(**keys)
    sched.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert {k: saved[k] for k in keys} == keys
    loaded = cls.from_pretrained(tmp_path)
    for s in (sched, loaded):
        assert isinstance(s.solver, ExposureBiasTimeShift)
        assert (s.solver.half_width, s.solver.cutoff, s.solver.variance_source) == (20, 200.0, "epsilon")
        assert (s.solver.signal_variance, s.solver.start_step) == (0.1, 2)
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    shifted = scheduler_loop(loaded, x, _dummy, num_inference_steps=8)
    assert torch.equal(scheduler_loop(sched, x, _dummy, num_inference_steps=8), shifted)
    assert not torch.allclose(scheduler_loop(cls(), x, _dummy, num_inference_steps=8), shifted)
    assert not isinstance(cls().solver, ExposureBiasTimeShift)  # 0, the default, is off


def test_step_after_reload_with_history_is_identical(tmp_path):
    """diffusers' check_over_configs: a saved/reloaded scheduler mid-run gives the same next step."""
    a = DPMSolverPlusPlusScheduler(solver_order=2)
    a.set_timesteps(10)
    a.save_config(tmp_path)
    b = DPMSolverPlusPlusScheduler.from_pretrained(tmp_path)
    b.set_timesteps(10)
    x = torch.randn(2, 3, 4, 4)
    for t in a.timesteps[:3]:
        xa = a.step(_dummy(x, t), t, x).prev_sample
        xb = b.step(_dummy(x, t), t, x).prev_sample
        assert torch.equal(xa, xb)
        x = xa


# -- switching classes -------------------------------------------------------------------------------------------
SWITCH_SOURCES = [
    DPMSolverMultistepScheduler,
    UniPCMultistepScheduler,
    EulerDiscreteScheduler,
    DDIMScheduler,
    DEISMultistepScheduler,
    DPMSolverSinglestepScheduler,
    DDPMScheduler,
    PNDMScheduler,
]


@pytest.mark.parametrize("other", SWITCH_SOURCES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("ours, theirs", PAIRS, ids=lambda c: c.__name__)
def test_switching_to_and_from_diffusers_schedulers(ours, theirs, other):
    """``from_config`` both ways: ours from another scheduler's config runs diffusers' counterpart's numbers on it,
    and the other scheduler rebuilt from our config runs its own original numbers."""
    source = other(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="v_prediction")
    switched = ours.from_config(source.config)
    assert switched.config.beta_schedule == "scaled_linear" and switched.config.prediction_type == "v_prediction"
    expected = _full_loop(theirs.from_config(source.config))
    assert float((_full_loop(switched) - expected).abs().max()) <= 1e-5
    back = other.from_config(switched.config)
    assert torch.equal(_full_loop(back), _full_loop(other.from_config(source.config)))


def test_switch_chain_reproduces_the_numbers():
    """diffusers' test_switch, with our classes in the chain: DPM → Singlestep → UniPC → DEIS → ours → DPM gives
    DPM-Solver's full-loop numbers at both ends and in ours (0.3301, diffusers' reference mean), and the same
    chain into DCSolverScheduler gives UniPC's."""
    config = dict(lower_order_final=False, final_sigmas_type="sigma_min")
    dpm = DPMSolverMultistepScheduler(**config)
    reference = _full_loop(dpm)
    assert float(reference.abs().mean()) == pytest.approx(0.3301, abs=1e-3)
    chain = [DPMSolverSinglestepScheduler, UniPCMultistepScheduler, DEISMultistepScheduler, DPMSolverPlusPlusScheduler]
    sched = dpm
    for cls in chain:
        sched = cls.from_config(sched.config)
    assert float((_full_loop(sched) - reference).abs().max()) <= 1e-5
    again = DPMSolverMultistepScheduler.from_config(sched.config)
    assert float((_full_loop(again) - reference).abs().max()) <= 1e-6

    unipc = UniPCMultistepScheduler.from_config(dpm.config)
    sched = unipc
    for cls in (DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler, DEISMultistepScheduler, DCSolverScheduler):
        sched = cls.from_config(sched.config)
    assert float((_full_loop(sched) - _full_loop(unipc)).abs().max()) <= 1e-5


def test_stable_diffusion_pndm_config_keeps_hidden_keys(tmp_path):
    ours = DPMSolverPlusPlusScheduler.from_config(PNDMScheduler(**SD_PNDM).config)
    assert ours.config.steps_offset == 1
    ours.save_config(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["skip_prk_steps"] is True and saved["set_alpha_to_one"] is False
    # Defaults that were only defaults in PNDM ("leading") become ours ("linspace").
    assert ours.config.timestep_spacing == "linspace"


def test_hidden_keys_of_the_other_scheduler_do_not_leak():
    """A DPM config's lambda_min_clipped / use_lu_lambdas mean nothing to UniPC (and so to DCSolverScheduler)."""
    dpm = DPMSolverMultistepScheduler(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-3.0, use_lu_lambdas=True)
    ours, theirs = DCSolverScheduler.from_config(dpm.config), UniPCMultistepScheduler.from_config(dpm.config)
    for s in (ours, theirs):
        s.set_timesteps(10)
    assert torch.equal(ours.timesteps, theirs.timesteps) and torch.equal(ours.sigmas, theirs.sigmas)


# -- public API and outputs --------------------------------------------------------------------------------------
def test_public_api():
    sched = DPMSolverPlusPlusScheduler()
    assert sched.order == 1 and sched.init_noise_sigma == 1.0 and len(sched) == 1000
    assert DPMSolverMultistepScheduler in sched.compatibles
    assert sched.sigmas.shape == (1000,)  # the training levels until set_timesteps, as diffusers
    sched.set_timesteps(12, device="cpu")
    assert sched.timesteps.dtype == torch.int64 and sched.timesteps.shape == (12,)
    assert sched.sigmas.shape == (13,) and sched.sigmas.device.type == "cpu" and sched.sigmas.dtype == torch.float32
    x = torch.randn(2, 3, 8, 8)
    assert sched.scale_model_input(x, sched.timesteps[0]) is x
    assert sched.step_index is None and sched.begin_index is None


def test_step_shape_tuple_and_dict():
    a, b = DPMSolverPlusPlusScheduler(), DPMSolverPlusPlusScheduler()
    for s in (a, b):
        s.set_timesteps(10)
    x = torch.randn(2, 3, 8, 8)
    ya, yb = x, x
    for t in a.timesteps[:2]:
        ya = a.step(_dummy(ya, t), t, ya, return_dict=True).prev_sample
        out = b.step(_dummy(yb, t), t, yb, return_dict=False)
        assert isinstance(out, tuple)
        yb = out[0]
        assert ya.shape == x.shape and torch.equal(ya, yb)


@pytest.mark.parametrize("algorithm", ["dpmsolver++", "sde-dpmsolver++"])
def test_fp16_in_fp16_out(algorithm):
    sched = DPMSolverPlusPlusScheduler(algorithm_type=algorithm)
    x = torch.randn(2, 3, 8, 8).half()
    out = scheduler_loop(sched, x, lambda s, t: (0.1 * s.float()).half(), num_inference_steps=10)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


def test_custom_timesteps_equal_the_default_loop():
    for final in ("zero", "sigma_min"):
        a = DPMSolverPlusPlusScheduler(final_sigmas_type=final)
        a.set_timesteps(10)
        ts = a.timesteps.tolist()
        x = torch.randn(2, 3, 8, 8)
        assert torch.equal(
            scheduler_loop(a, x, _dummy, num_inference_steps=10),
            scheduler_loop(DPMSolverPlusPlusScheduler(final_sigmas_type=final), x, _dummy, timesteps=ts),
        )


def test_custom_sigmas_are_used_exactly():
    ays = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.0]
    sched = DPMSolverPlusPlusScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    sched.set_timesteps(sigmas=ays)
    assert sched.num_inference_steps == 10
    np.testing.assert_allclose(sched.plan.sigmas, ays, rtol=1e-15)
    ref = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    ref.set_timesteps(sigmas=ays)
    np.testing.assert_allclose(sched.timesteps.numpy(), ref.timesteps.numpy(), atol=1e-3)


# -- add_noise ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ours, theirs", PAIRS, ids=lambda c: c.__name__)
def test_add_noise_is_diffusers(ours, theirs):
    """diffusers' rule, without a host read: before set_timesteps the timesteps are looked up in 999 … 0 against
    the training levels 0 … 999; after it in the inference schedule (not found: its last step); with begin_index
    the level there (img2img), after a step the current one (inpainting)."""
    a, b = ours(), theirs()
    x0, eps = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 250, 999, 500])
    with HostReadCounter() as counter:
        noisy = a.add_noise(x0, eps, t)
    assert counter.total == 0
    assert torch.allclose(noisy, b.add_noise(x0, eps, t), atol=1e-6)
    for s in (a, b):
        s.set_timesteps(20)
    in_schedule = torch.cat([a.timesteps[[3, 7]], torch.tensor([5, 998])])  # the last two are not in it
    assert torch.allclose(a.add_noise(x0, eps, in_schedule), b.add_noise(x0, eps, in_schedule), atol=1e-6)
    for s in (a, b):
        s.set_begin_index(5)
    ts = a.timesteps[5:6].repeat(4)
    assert torch.allclose(a.add_noise(x0, eps, ts), b.add_noise(x0, eps, ts), atol=1e-6)
    for s in (a, b):
        s.step(_dummy(x0, ts[0]), ts[0], x0)
    ts = a.timesteps[6:7]
    assert torch.allclose(a.add_noise(x0, eps, ts), b.add_noise(x0, eps, ts), atol=1e-6)


def test_add_noise_training_levels_option():
    """``add_noise_training_levels=True``: DDPM's forward process at any timestep, also between training steps."""
    ours, ddpm = DPMSolverPlusPlusScheduler(add_noise_training_levels=True), DDPMScheduler()
    x0, eps = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 250, 999, 500])
    assert torch.allclose(ours.add_noise(x0, eps, t), ddpm.add_noise(x0, eps, t), atol=1e-6)
    with HostReadCounter() as counter:
        noisy = ours.add_noise(x0, eps, torch.tensor([10.5, 11.0, 12.0, 998.0]))
    assert counter.total == 0
    lo = ddpm.add_noise(x0, eps, torch.tensor([10, 11, 12, 998]))[:1]
    hi = ddpm.add_noise(x0, eps, torch.tensor([11, 11, 12, 998]))[:1]
    assert torch.all((noisy[:1] - lo) * (noisy[:1] - hi) <= 1e-6)
    ours.set_timesteps(20)  # after set_timesteps too (diffusers would look 250 up and miss)
    assert torch.allclose(ours.add_noise(x0, eps, t), ddpm.add_noise(x0, eps, t), atol=1e-6)


# -- step indices ------------------------------------------------------------------------------------------------
def test_img2img_start_uses_lower_orders_like_diffusers():
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    outs = []
    for cls in (DPMSolverMultistepScheduler, DPMSolverPlusPlusScheduler):
        sched = cls(solver_order=3)
        sched.set_timesteps(20)
        sched.set_begin_index(8)
        y = x
        for t in sched.timesteps[8:]:
            y = sched.step(_dummy(y, t), t, y).prev_sample
        outs.append(y)
    assert torch.allclose(outs[0], outs[1], atol=1e-5)


def test_finds_the_step_index_without_reading_the_timestep_back():
    sched = DPMSolverPlusPlusScheduler()
    sched.set_timesteps(25)
    x = torch.randn(2, 3, 8, 8)
    with HostReadCounter() as counter:
        for t in sched.timesteps:
            x = sched.step(0.1 * x, t, x).prev_sample
    # one read in all: the NaN flag after the last step
    assert counter.total == 1, dict(counter.counts)
    sched.check_finite = False
    sched.set_timesteps(25)
    with HostReadCounter() as counter:
        for t in sched.timesteps[10:]:  # an img2img-style slice, no set_begin_index: a view of the same tensor
            x = sched.step(0.1 * x, t, x).prev_sample
    assert counter.total == 0 and sched.step_index == 25


@pytest.mark.parametrize("ours, theirs", PAIRS, ids=lambda c: c.__name__)
def test_timestep_by_value_and_not_in_the_schedule(ours, theirs, caplog):
    """(e) A timestep passed by value is found as diffusers finds it; one that is not in the schedule makes the step
    start from the last timestep, as diffusers does (with a warning here). The numbers are diffusers'."""
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for timestep, index in ((None, 4), (5, 10)):  # the step index after the step
        outs = []
        for cls in (ours, theirs):
            sched = cls()
            sched.set_timesteps(10)
            t = int(sched.timesteps[3]) if timestep is None else timestep
            with caplog.at_level(logging.WARNING):
                outs.append(sched.step(0.1 * x, t, x).prev_sample)
            assert sched.step_index == index
        assert torch.allclose(outs[0], outs[1], atol=1e-6)
    assert "not in the schedule" in caplog.text


@pytest.mark.parametrize("num_train", [25, 50, 100, 999, 1000])
@pytest.mark.parametrize("ours, theirs", PAIRS, ids=lambda c: c.__name__)
def test_diffusers_check_over_configs_pattern(ours, theirs, num_train):
    """diffusers' own test_timesteps: N training timesteps, 25 steps, final_sigmas_type="sigma_min", a step at
    t = 0 (not in the schedule: the last step) — including 25 of 25."""
    config = dict(num_train_timesteps=num_train, final_sigmas_type="sigma_min", lower_order_final=False)
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    outs = []
    for cls in (ours, theirs):
        sched = cls(**config)
        sched.set_timesteps(25)
        outs.append(sched.step(0.1 * x, 0, x).prev_sample)
    assert torch.allclose(outs[0], outs[1], atol=1e-6)


def _undefined_step_cases():
    """n = N = 25 (a repeated timestep) for every DPM-Solver++ / UniPC variant, and 20-step Karras ramps ending at
    σ_min twice (a zero-length last step)."""
    dpm = [
        dict(
            num_train_timesteps=25,
            solver_order=o,
            solver_type=st,
            algorithm_type=alg,
            final_sigmas_type=f,
            lower_order_final=lof,
        )
        for o in (1, 2, 3)
        for st in ("midpoint", "heun")
        for alg in ("dpmsolver++", "sde-dpmsolver++")
        for f in ("zero", "sigma_min")
        for lof in (True, False)
    ]
    dpm += [
        dict(use_karras_sigmas=True, final_sigmas_type="sigma_min", solver_order=o, solver_type=st)
        for o in (1, 2, 3)
        for st in ("midpoint", "heun")
    ]
    unipc = [
        dict(num_train_timesteps=25, solver_order=o, solver_type=st, final_sigmas_type=f, lower_order_final=lof)
        for o in (1, 2, 3)
        for st in ("bh1", "bh2")
        for f in ("zero", "sigma_min")
        for lof in (True, False)
    ]
    return [(*PAIRS[0], c) for c in dpm] + [(*PAIRS[1], c) for c in unipc]


@pytest.mark.parametrize("ours, theirs, config", _undefined_step_cases())
def test_undefined_steps_are_where_diffusers_returns_nan(ours, theirs, config, caplog):
    """On grids with a zero-length step: where diffusers' loop is finite, ours runs and agrees; where it returns NaN
    (or fails), ours raises at the undefined step — except first-order UniPC bh1 into σ = 0, where only diffusers'
    last step is NaN and ours is finite."""
    steps = config.get("num_train_timesteps", 20)
    x = torch.linspace(-1, 1, 2 * 3 * 4 * 4).reshape(2, 3, 4, 4)
    noise = torch.randn(steps, 2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    sde = config.get("algorithm_type") == "sde-dpmsolver++"
    try:
        theirs_out = scheduler_loop(theirs(**config), x, _dummy, noise if sde else None, num_inference_steps=steps)
        finite = bool(torch.isfinite(theirs_out).all())
    except (torch.linalg.LinAlgError, IndexError):
        finite = False
    if finite:
        ours_out = scheduler_loop(ours(**config), x, _dummy, noise if sde else None, num_inference_steps=steps)
        assert float((ours_out - theirs_out).abs().max()) <= 1e-5
    elif config.get("solver_type") == "bh1" and config["final_sigmas_type"] == "zero" and config["solver_order"] == 1:
        assert torch.isfinite(scheduler_loop(ours(**config), x, _dummy, num_inference_steps=steps)).all()
    else:
        with caplog.at_level(logging.WARNING), pytest.raises(ValueError, match="not defined on this grid"):
            scheduler_loop(ours(**config), x, _dummy, noise if sde else None, num_inference_steps=steps)


def test_nan_model_output_names_the_step():
    sched = DPMSolverPlusPlusScheduler()
    sched.set_timesteps(6)
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(NonFiniteError, match=r"step 3 of 6 \(evaluation index 2, sigma=9.48892, timestep=666\)"):
        for i, t in enumerate(sched.timesteps):
            out = torch.full_like(x, float("nan")) if i == 2 else 0.1 * x
            x = sched.step(out, t, x).prev_sample


# -- errors ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda s: s.set_timesteps(0), ValueError, "num_steps must be >= 1, got 0"),
        (lambda s: s.set_timesteps(-2), ValueError, "num_steps must be >= 1, got -2"),
        (
            lambda s: DPMSolverPlusPlusScheduler(strictly_decreasing_sigmas=True).set_timesteps(1001),
            ValueError,
            "num_steps=1001 is beyond the training schedule",
        ),
        (
            lambda s: DPMSolverPlusPlusScheduler(use_karras_sigmas=True).set_timesteps(1001),
            ValueError,
            "num_steps=1001 is beyond the training schedule",
        ),
        (lambda s: s.set_timesteps(), ValueError, "exactly one of num_inference_steps, timesteps or sigmas"),
        (lambda s: s.set_timesteps(5, timesteps=[999, 500]), ValueError, "exactly one of"),
        (lambda s: s.set_timesteps(sigmas=[1.0, 2.0, 0.0]), ValueError, "strictly decreasing"),
        (lambda s: s.set_timesteps(sigmas=[400.0, 1.0, 0.0]), ValueError, "outside the model's noise range"),
        (lambda s: s.set_timesteps(sigmas=[3.0, float("nan"), 0.0]), ValueError, "non-finite"),
        (lambda s: s.set_timesteps(5, mu=0.5), ValueError, "use_dynamic_shifting"),
        (lambda s: s.step(torch.zeros(1, 3), 999, torch.zeros(1, 3)), ValueError, "call set_timesteps"),
        (
            lambda s: DPMSolverPlusPlusScheduler(use_karras_sigmas=True).set_timesteps(timesteps=[999, 500]),
            ValueError,
            "custom timesteps cannot be combined with use_karras_sigmas",
        ),
    ],
)
def test_bad_calls(make, error, message):
    with pytest.raises(error, match=message):
        make(DPMSolverPlusPlusScheduler())


def test_custom_timesteps_outside_the_training_range_are_diffusers():
    """diffusers clamps their levels to the table's ends and feeds the timesteps as given."""
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    ours = scheduler_loop(DPMSolverPlusPlusScheduler(), x, _dummy, timesteps=[1200, 700, 300, -3])
    theirs = scheduler_loop(DPMSolverMultistepScheduler(), x, _dummy, timesteps=[1200, 700, 300, -3])
    assert float((ours - theirs).abs().max()) <= 1e-5


def test_more_steps_than_training_timesteps_is_diffusers_grid():
    """1001 linspace steps of a 1000-step model: diffusers' grid (repeated timesteps), first order runs it."""
    ours, theirs = DPMSolverPlusPlusScheduler(solver_order=1), DPMSolverMultistepScheduler(solver_order=1)
    for s in (ours, theirs):
        s.set_timesteps(1001)
    assert torch.equal(ours.timesteps, theirs.timesteps) and torch.equal(ours.sigmas, theirs.sigmas)


def test_bad_step_inputs():
    sched = DPMSolverPlusPlusScheduler()
    sched.set_timesteps(2)
    with pytest.raises(
        ValueError, match=r"model_output shape \(1, 2, 4, 4\) does not match sample shape \(1, 3, 4, 4\)"
    ):
        sched.step(torch.zeros(1, 2, 4, 4), sched.timesteps[0], torch.zeros(1, 3, 4, 4))
    x = torch.zeros(1, 3, 4, 4)
    for t in sched.timesteps:
        x = sched.step(x, t, x).prev_sample
    with pytest.raises(ValueError, match="all 2 steps have been taken"):
        sched.step(x, sched.timesteps[-1], x)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(prediction_type="noise"), ValueError, "unknown prediction_type 'noise'"),
        (dict(algorithm_type="euler"), ValueError, "unknown algorithm_type 'euler'"),
        (dict(solver_type="rk4"), ValueError, "unknown solver_type 'rk4'"),
        (dict(solver_order=4), ValueError, "order must be 1, 2 or 3, got 4"),
        (dict(timestep_spacing="cosine"), ValueError, "unknown timestep_spacing 'cosine'"),
        (dict(use_karras_sigmas=True, use_exponential_sigmas=True), ValueError, "only one of"),
        (dict(final_sigmas_type="none"), ValueError, "final_sigmas_type must be"),
        (dict(beta_schedule="sigmoid"), ValueError, "unknown beta_schedule 'sigmoid'"),
        (dict(third_order="exact"), ValueError, "unknown third_order form 'exact'"),
        (dict(thresholding=True, sample_max_value=0.0), ValueError, "max_value must be positive"),
        (dict(exposure_bias_shift_half_width=-1), ValueError, "half_width must be a non-negative integer"),
        (
            dict(exposure_bias_shift_half_width=5, exposure_bias_shift_variance_source="v"),
            ValueError,
            "unknown variance_source 'v'",
        ),
        (
            dict(trained_betas=torch.linspace(1e-4, 0.02, 1000)),
            TypeError,
            "trained_betas=Tensor is not JSON-serialisable",
        ),
        (dict(steps_offset=object()), TypeError, "steps_offset=object is not JSON-serialisable"),
    ],
)
def test_bad_config(kwargs, error, message):
    with pytest.raises(error, match=message):
        DPMSolverPlusPlusScheduler(**kwargs)


def test_configs_diffusers_accepts_are_accepted():
    """Configs that were refused before: zero terminal SNR on DDPM's linear β, sample_max_value < 1, Karras with
    logSNR lambdas (Karras wins, as in diffusers), n = N with final_sigmas_type="sigma_min"."""
    for config in (
        dict(rescale_betas_zero_snr=True),
        dict(thresholding=True, sample_max_value=0.5),
        dict(use_karras_sigmas=True, use_lu_lambdas=True),
    ):
        DPMSolverPlusPlusScheduler(**config).set_timesteps(10)
        DCSolverScheduler(**{k: v for k, v in config.items() if k != "use_lu_lambdas"}).set_timesteps(10)
    for n in (25, 1000):
        DPMSolverPlusPlusScheduler(num_train_timesteps=n, final_sigmas_type="sigma_min").set_timesteps(n)
