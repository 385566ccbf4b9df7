"""The exposure-bias time shift inside a real diffusers pipeline (small UNet, nothing downloaded).

To exercise the selection rule (Li et al. 2024: per sample, the candidate timestep whose σ² best matches the
sample's variance) and not only the window's edge, the UNet's output is replaced by a noise prediction with a known,
per-sample bias: the exact ε of data x0 = 0 (ε = x/σ_t), scaled by 0.9 … 1.1 across the batch. The samples' variances
then drift apart, and the rule moves them to different timesteps, some inside the window. Our own loop on the same
network must take the same per-sample timesteps and give the same images.
"""

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler
from diffusers.models.unets.unet_2d import UNet2DOutput

from diffsamplers import DCSolverScheduler, Denoiser, DPMSolverPlusPlus, DPMSolverPlusPlusScheduler, sample
from diffsamplers.adapters import attach_exposure_bias_time_shift, time_shift_settings
from diffsamplers.noise import noise_process_from_config
from diffsamplers.schedules.diffusers_compat import schedule_from_scheduler_config
from diffsamplers.solvers import DDIM, ExposureBiasTimeShift
from tests.adapters.test_pipelines import _tiny_unet

BATCH, STEPS, HALF_WIDTH, CUTOFF = 4, 10, 40, 100
ALPHAS_CUMPROD = DDPMScheduler().alphas_cumprod


def _biased_noise_prediction(module, args, kwargs, output):
    """Forward hook: ε̂_b = c_b·x/σ_t with c_b = 0.9 … 1.1 over the batch (t per sample or one for all)."""
    x = args[0]
    t = args[1] if len(args) > 1 else kwargs["timestep"]
    alpha_bar = ALPHAS_CUMPROD[torch.as_tensor(t).long().reshape(-1)].reshape(-1, 1, 1, 1).to(x.dtype)
    scale = 1 + 0.1 * torch.linspace(-1, 1, x.shape[0], dtype=x.dtype).reshape(-1, 1, 1, 1)
    return UNet2DOutput(sample=scale * x / (1 - alpha_bar).sqrt())


@pytest.fixture(scope="module")
def pipe():
    p = DDPMPipeline(unet=_tiny_unet(), scheduler=DDPMScheduler())
    p.set_progress_bar_config(disable=True)
    hook = p.unet.register_forward_hook(_biased_noise_prediction, with_kwargs=True)
    yield p
    hook.remove()


def _run(pipe, steps=STEPS, seed=3):
    out = pipe(
        batch_size=BATCH, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="np"
    )
    return torch.from_numpy(out.images)


def _record_timesteps(module: torch.nn.Module, seen: list):
    """A pre-hook (registered after the time shift's, so it sees what the network receives) recording timesteps."""

    def hook(m, args, kwargs):
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        seen.append(torch.as_tensor(t).clone().reshape(-1))

    return module.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("order", [1, 2], ids=["ddim", "dpm++2m"])
def test_pipeline_takes_the_same_per_sample_timesteps_as_our_loop(pipe, order):
    original = pipe.scheduler
    piped_ts: list[torch.Tensor] = []
    handle = attach_exposure_bias_time_shift(pipe, half_width=HALF_WIDTH, cutoff=CUTOFF, solver_order=order)
    recorder = _record_timesteps(pipe.unet, piped_ts)
    try:
        piped = _run(pipe)
        assert isinstance(pipe.scheduler, DPMSolverPlusPlusScheduler)
        assert pipe.scheduler.config.exposure_bias_shift_half_width == HALF_WIDTH
    finally:
        recorder.remove()
        handle.remove()
    assert pipe.scheduler is original

    # The rule moved samples to different timesteps, and not only to the window's edges.
    nominal = handle.scheduler.timesteps.tolist()
    shifted = [(k, t) for k, t in enumerate(piped_ts) if t.numel() == BATCH]
    assert len(shifted) >= 5
    spread = [t for _, t in shifted if len(set(t.tolist())) >= 3]
    inside = [t for k, t in shifted if any(0 < abs(v - nominal[k]) < HALF_WIDTH for v in t.tolist())]
    assert spread and inside, [t.tolist() for _, t in shifted]

    # Our sampling loop on the same network, solver, grid and x_T: the same timesteps and the same images.
    config = dict(handle.scheduler.config)
    process = noise_process_from_config(config)
    x_T = torch.randn((BATCH, 3, 16, 16), generator=torch.Generator().manual_seed(3))
    base = DDIM() if order == 1 else DPMSolverPlusPlus(2)
    ours_ts: list[torch.Tensor] = []
    recorder = _record_timesteps(pipe.unet, ours_ts)
    try:
        with torch.no_grad():
            ours = sample(
                Denoiser(pipe.unet, process, "epsilon"),
                ExposureBiasTimeShift(base, half_width=HALF_WIDTH, cutoff=CUTOFF),
                schedule_from_scheduler_config(process, config, STEPS),
                x_T=x_T,
                progress=False,
            )
    finally:
        recorder.remove()
    assert [t.expand(BATCH).tolist() for t in ours_ts] == [t.expand(BATCH).tolist() for t in piped_ts]
    ours = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    assert torch.allclose(ours, piped, atol=1e-5), float((ours - piped).abs().max())


def test_keys_of_a_loaded_scheduler_with_the_hook(pipe, tmp_path):
    """A scheduler saved with the shift's keys, loaded into the pipeline, and the hook attached from its settings:
    the same images as attaching the shift directly; the class of one of our schedulers is kept."""
    original = pipe.scheduler
    handle = attach_exposure_bias_time_shift(pipe, half_width=HALF_WIDTH, cutoff=CUTOFF)
    direct = _run(pipe)
    handle.scheduler.save_pretrained(tmp_path)
    handle.remove()
    pipe.scheduler = DPMSolverPlusPlusScheduler.from_pretrained(tmp_path)
    handle = attach_exposure_bias_time_shift(pipe, **time_shift_settings(pipe.scheduler))
    assert torch.equal(_run(pipe), direct)
    handle.remove()
    pipe.scheduler = DCSolverScheduler.from_config(original.config)
    handle = attach_exposure_bias_time_shift(pipe, half_width=HALF_WIDTH, cutoff=CUTOFF)
    assert isinstance(pipe.scheduler, DCSolverScheduler) and isinstance(pipe.scheduler.solver, ExposureBiasTimeShift)
    assert torch.isfinite(_run(pipe)).all()
    handle.remove()
    pipe.scheduler = original


def test_zero_window_changes_nothing(pipe):
    original = pipe.scheduler
    pipe.scheduler = DPMSolverPlusPlusScheduler.from_config(original.config)
    plain = _run(pipe)
    pipe.scheduler = original
    handle = attach_exposure_bias_time_shift(pipe, half_width=0)
    same = _run(pipe)
    handle.remove()
    assert torch.equal(plain, same)
