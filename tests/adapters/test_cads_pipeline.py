"""CADS in a real StableDiffusionPipeline (small random components, nothing downloaded): the first step's embedding
is annealed before the step, only the conditional half, every later step from the clean embedding; s = 0 is the
pipeline without CADS; the CADS noise has its own seeds."""

import pytest
import torch
from diffusers import DDIMScheduler

from diffsamplers.adapters.cads_pipeline import cads_pipeline_kwargs
from diffsamplers.guidance.cads import CADS

from .test_pipelines import sd_pipe  # noqa: F401 (the fixture)

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPT = "a photo of a digit"
STEPS = 4


def _run(pipe, cads: CADS | None = None, seen: list | None = None, **kwargs) -> torch.Tensor:
    hook = None
    if seen is not None:
        hook = pipe.unet.register_forward_pre_hook(
            lambda m, a, kw: seen.append(kw["encoder_hidden_states"].clone()), with_kwargs=True
        )
    inputs = {"prompt": PROMPT, "num_inference_steps": STEPS}
    if cads is not None:
        inputs = cads_pipeline_kwargs(pipe, PROMPT, cads, STEPS, **kwargs)
    try:
        out = pipe(
            height=32,
            width=32,
            guidance_scale=6.0,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
            **inputs,
        )
    finally:
        if hook is not None:
            hook.remove()
    return out.images


def test_cads_pipeline(sd_pipe):  # noqa: F811
    # trailing spacing: the first step is at timestep 999, t = 1, where γ = 0
    sd_pipe.scheduler = DDIMScheduler.from_config(sd_pipe.scheduler.config, timestep_spacing="trailing")
    seen: list[torch.Tensor] = []
    plain = _run(sd_pipe, seen=seen)
    clean_uncond, clean = seen[0].chunk(2)
    cads = CADS(noise_scale=0.25)
    seen = []
    out = _run(sd_pipe, cads, seen=seen, seed=1)
    assert out.shape == plain.shape and (out - plain).abs().max() > 1e-3
    times = [t / 999 for t in sd_pipe.scheduler.timesteps.tolist()]
    assert [round(cads.gamma(t), 2) for t in times] == [0.0, 0.5, 1.0, 1.0]  # t = 1, 0.75, 0.5, 0.25
    assert len(seen) == STEPS
    for k, embeds in enumerate(seen):
        uncond, cond = embeds.chunk(2)
        assert torch.equal(uncond, clean_uncond)  # the negative half: clean at every step
        assert torch.equal(cond, clean) == (cads.gamma(times[k]) == 1.0)
    # the first step runs on an annealed embedding: γ(1) = 0 leaves the statistics of the clean one, not its direction
    first, second = seen[0].chunk(2)[1], seen[1].chunk(2)[1]
    assert torch.nn.functional.cosine_similarity(_centred(first), _centred(clean), dim=0).abs() < 0.1
    assert torch.allclose(first.std(), clean.std(), rtol=1e-4) and torch.allclose(first.mean(), clean.mean(), atol=1e-5)
    assert 0.3 < torch.nn.functional.cosine_similarity(_centred(second), _centred(clean), dim=0) < 0.99  # γ = 0.5

    # s = 0 is the pipeline without CADS; the CADS noise is seeded apart from the pipeline's generator
    assert torch.allclose(_run(sd_pipe, CADS(noise_scale=0.0)), plain, atol=1e-6, rtol=0)
    assert torch.equal(_run(sd_pipe, cads, seed=1), out)
    assert not torch.equal(_run(sd_pipe, cads, seed=2), out)
    seen = []
    _run(sd_pipe, CADS(noise_scale=0.25, both=True), seen=seen, seed=1)
    assert not torch.equal(seen[0].chunk(2)[0], clean_uncond) and torch.equal(seen[-1].chunk(2)[0], clean_uncond)


def _centred(y: torch.Tensor) -> torch.Tensor:
    return (y - y.mean()).flatten()
