"""Our schedulers inside real flow-matching pipelines — Stable Diffusion 3 and Flux — assembled from small random
components (nothing downloaded: the transformers are built from configs with random weights; the prompt embeddings
are passed directly, so no text encoder or tokenizer is needed; ``output_type="latent"`` skips the VAE).

A plain ``X.from_config(pipe.scheduler.config)`` must give the numbers of diffusers' flow DPM-Solver++ / UniPC
configured with the flow keys by hand.
"""

import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    UniPCMultistepScheduler,
)

from diffsamplers import DCSolverScheduler, DPMSolverPlusPlusScheduler
from diffsamplers.adapters import attach_exposure_bias_time_shift

pytestmark = pytest.mark.usefixtures("single_thread")

BY_HAND = dict(use_flow_sigmas=True, prediction_type="flow_prediction")
PAIRS = [(DPMSolverPlusPlusScheduler, DPMSolverMultistepScheduler), (DCSolverScheduler, UniPCMultistepScheduler)]


def _embeddings(length: int, width: int, pooled: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "prompt_embeds": torch.randn(2, length, width, generator=g),
        "pooled_prompt_embeds": torch.randn(2, pooled, generator=g),
    }


@pytest.fixture(scope="module")
def sd3():
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=8,
    ).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),  # SD3 / SD3.5's scheduler config
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def flux():
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=8,
        axes_dims_rope=(2, 2, 4),
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(  # Flux.1's scheduler config: μ from the image size
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run_sd3(pipe, scheduler, steps: int, **kwargs) -> torch.Tensor:
    pipe.scheduler = scheduler
    embeds = _embeddings(5, 16, 8)
    with torch.no_grad():
        return pipe(
            **embeds,
            negative_prompt_embeds=torch.zeros_like(embeds["prompt_embeds"]),
            negative_pooled_prompt_embeds=torch.zeros_like(embeds["pooled_prompt_embeds"]),
            guidance_scale=3.0,
            num_inference_steps=steps,
            height=64,
            width=64,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
            **kwargs,
        ).images


def _run_flux(pipe, scheduler, steps: int, **kwargs) -> torch.Tensor:
    pipe.scheduler = scheduler
    with torch.no_grad():
        return pipe(
            **_embeddings(5, 16, 8),
            num_inference_steps=steps,
            height=64,
            width=64,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
            **kwargs,
        ).images


@pytest.mark.parametrize("ours, theirs", PAIRS, ids=["dpm", "dc"])
@pytest.mark.parametrize("steps", [4, 12])
def test_sd3_drop_in(sd3, ours, theirs, steps):
    source = sd3.scheduler.config
    a = _run_sd3(sd3, ours.from_config(source), steps)
    b = _run_sd3(sd3, theirs.from_config(source, **BY_HAND, flow_shift=3.0), steps)
    sd3.scheduler = FlowMatchEulerDiscreteScheduler.from_config(source)
    assert a.shape == (2, 4, 8, 8) and torch.isfinite(a).all()
    assert (a - b).abs().max() <= 1e-5


@pytest.mark.parametrize("ours, theirs", PAIRS, ids=["dpm", "dc"])
@pytest.mark.parametrize("steps", [4, 12])
def test_flux_drop_in(flux, ours, theirs, steps):
    """Flux passes μ (from the image size and the config's base_shift / max_shift) and, to schedulers with
    ``use_flow_sigmas``, no sigmas."""
    source = flux.scheduler.config
    a = _run_flux(flux, ours.from_config(source), steps)
    b = _run_flux(flux, theirs.from_config(source, **BY_HAND), steps)
    flux.scheduler = FlowMatchEulerDiscreteScheduler.from_config(source)
    assert a.shape == (2, 16, 16) and torch.isfinite(a).all()
    assert (a - b).abs().max() <= 1e-5


def test_sd3_custom_sigmas_give_the_steps_asked_for(sd3):
    """User sigmas reach the scheduler with FlowMatchEuler's meaning: n levels from σ = 1, n steps, shifted."""
    source = sd3.scheduler.config
    sigmas = list(np.linspace(1.0, 1 / 6, 6))
    reference = FlowMatchEulerDiscreteScheduler.from_config(source)
    reference.set_timesteps(sigmas=sigmas)
    ours = DPMSolverPlusPlusScheduler.from_config(source)
    calls = []
    hook = sd3.transformer.register_forward_pre_hook(
        lambda m, a, k: calls.append(k["timestep"][0].item()), with_kwargs=True
    )
    try:
        out = _run_sd3(sd3, ours, 6, sigmas=sigmas)
    finally:
        hook.remove()
        sd3.scheduler = FlowMatchEulerDiscreteScheduler.from_config(source)
    assert len(calls) == 6 and torch.isfinite(out).all()
    assert np.allclose(calls, reference.timesteps.numpy(), atol=1.3e-4, rtol=0)


@pytest.mark.parametrize("pipeline", ["sd3", "flux"])
def test_time_shift_attaches_to_a_flow_pipeline(pipeline, request):
    """attach_exposure_bias_time_shift builds the flow scheduler from the FlowMatch config, and the transformer
    receives the per-sample timesteps in the pipeline's own units (Flux: t/1000)."""
    pipe = request.getfixturevalue(pipeline)
    run = _run_sd3 if pipeline == "sd3" else _run_flux
    source = pipe.scheduler.config
    plain = run(pipe, DPMSolverPlusPlusScheduler.from_config(source), 10)
    handle = attach_exposure_bias_time_shift(pipe, half_width=40, cutoff=0.0)
    seen: list[torch.Tensor] = []
    probe = pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["timestep"].detach().clone()), with_kwargs=True
    )
    try:
        assert handle.scheduler.config.use_flow_sigmas
        shifted = run(pipe, handle.scheduler, 10)
    finally:
        probe.remove()
        handle.remove()
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(source)
    scale = 1.0 if pipeline == "sd3" else 1e-3
    nominal = handle.scheduler.timesteps.double() * scale
    assert torch.isfinite(shifted).all()
    assert all(((t.double() > 0) & (t.double() <= 1000 * scale)).all() for t in seen)
    moved = [
        k for k, t in enumerate(seen) if not torch.allclose(t.double(), nominal[k].expand_as(t), atol=1e-6 * scale)
    ]
    assert moved, "no step was shifted"
    assert not torch.allclose(shifted, plain, atol=1e-6)
