"""The exposure-bias time shift inside a real diffusers pipeline (small random UNet, nothing downloaded)."""

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler

from diffsamplers import Denoiser, DPMSolverPlusPlus, DPMSolverPlusPlusScheduler, sample
from diffsamplers.adapters import attach_exposure_bias_time_shift
from diffsamplers.noise import noise_process_from_config
from diffsamplers.schedules.diffusers_compat import schedule_from_scheduler_config
from diffsamplers.solvers import DDIM, ExposureBiasTimeShift
from tests.adapters.test_pipelines import _tiny_unet


@pytest.fixture(scope="module")
def pipe():
    p = DDPMPipeline(unet=_tiny_unet(), scheduler=DDPMScheduler())
    p.set_progress_bar_config(disable=True)
    return p


def _run(pipe, steps=6, seed=3):
    out = pipe(batch_size=2, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="np")
    return torch.from_numpy(out.images)


@pytest.mark.parametrize("order", [1, 2], ids=["ddim", "dpm++2m"])
def test_pipeline_equals_our_loop(pipe, order):
    original = pipe.scheduler
    seen = []
    handle = attach_exposure_bias_time_shift(pipe, half_width=40, cutoff=100, solver_order=order)
    recorder = pipe.unet.register_forward_pre_hook(lambda m, args: seen.append(args[1].clone()))  # runs after ours
    try:
        piped = _run(pipe)
        assert isinstance(pipe.scheduler, DPMSolverPlusPlusScheduler)
    finally:
        recorder.remove()
        handle.remove()
    assert pipe.scheduler is original
    # The network saw per-sample timesteps off the nominal grid at the shifted steps (with random weights every
    # sample's variance exceeds σ², so all of them take the noisiest candidate: the window's top).
    nominal = set(handle.scheduler.timesteps.tolist())
    vectors = [t for t in seen if t.ndim == 1 and t.numel() == 2]
    assert vectors and any(not set(t.tolist()) <= nominal for t in vectors)
    # Our sampling loop on the same network, with the same solver and x_T, gives the same images.
    config = dict(handle.scheduler.config)
    process = noise_process_from_config(config)
    x_T = torch.randn((2, 3, 16, 16), generator=torch.Generator().manual_seed(3))
    base = DDIM() if order == 1 else DPMSolverPlusPlus(2)
    with torch.no_grad():
        ours = sample(
            Denoiser(pipe.unet, process, "epsilon"),
            ExposureBiasTimeShift(base, half_width=40, cutoff=100),
            schedule_from_scheduler_config(process, config, 6),
            x_T=x_T,
            progress=False,
        )
    ours = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    assert torch.allclose(ours, piped, atol=1e-5), float((ours - piped).abs().max())


def test_zero_window_changes_nothing(pipe):
    original = pipe.scheduler
    pipe.scheduler = DPMSolverPlusPlusScheduler.from_config(original.config)
    plain = _run(pipe)
    pipe.scheduler = original
    handle = attach_exposure_bias_time_shift(pipe, half_width=0)
    same = _run(pipe)
    handle.remove()
    assert torch.equal(plain, same)
