"""CADS (Sadat et al. 2024, ICLR, arXiv:2310.17347; :mod:`diffsamplers.guidance.cads`) inside a diffusers
``StableDiffusionPipeline``-style pipeline, without changing its code.

A pipeline calls its UNet on ``encoder_hidden_states=prompt_embeds``, where under classifier-free guidance
``prompt_embeds`` is the batch ``[negative; conditional]`` (diffusers 0.42.1 concatenates them before the loop), and
``callback_on_step_end`` may return a new ``prompt_embeds`` — the concatenated one — that the *next* step uses.
The callback acts after a step, so it alone would leave the first step on the clean embedding, where γ(1) = 0 asks
for pure noise (the notes' pitfall). :func:`cads_pipeline_kwargs` therefore

1. encodes the prompt once (``pipe.encode_prompt``) and keeps the clean embeddings y;
2. passes the first step's annealed embedding ŷ(t_0) in as ``prompt_embeds`` (with the clean negative embedding:
   only the conditional half is annealed unless the guidance's ``both``), t_0 from the scheduler's own timesteps
   (``retrieve_timesteps`` on a copy of it);
3. adds a :class:`CADSCallback` that returns ``prompt_embeds`` for step i + 1 — ``[negative; ŷ(t_{i+1})]``, always
   annealed from the clean y, never from the previous step's ŷ.

The maths is :meth:`CADS.anneal <diffsamplers.guidance.cads.CADS.anneal>`, the one the sampling loop runs; the time
is the normalised process time of the step's timestep (t/(N − 1) for DDPM's N training steps), as in the loop. The
noise n comes from a dedicated source (``seed``: one generator, or one seed per image, whose draws then do not
depend on the batch), never from the pipeline's generator::

    cads = CADS(tau1=0.6, tau2=0.9, noise_scale=0.25)
    images = pipe(guidance_scale=7.5, **cads_pipeline_kwargs(pipe, "a photo of a cat", cads, 50)).images

The kwargs carry ``num_inference_steps`` and ``num_images_per_prompt=1`` (the images are already in the
embeddings' batch), so the call must not pass them again; a callback of one's own can call the returned one first.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

from ..guidance.cads import CADS
from ..noise import NoiseProcess, noise_process_from_config
from ..rng import NoiseSource

__all__ = ["CADSCallback", "cads_pipeline_kwargs"]


class CADSCallback:
    """``callback_on_step_end`` of a pipeline under CADS: the ``prompt_embeds`` of the next step, annealed from the
    clean embeddings at that step's time (:meth:`embeddings`).

    Args:
        cads: the guidance whose parameters and maths (:meth:`CADS.anneal`) are used.
        cond: the clean conditional embeddings, one row per image.
        negative: the clean negative embeddings (same shape), the unconditional half under classifier-free guidance.
        process: the pipeline's noise process (its timesteps → normalised time).
        noise: where n comes from (rows = images).
    """

    def __init__(
        self, cads: CADS, cond: torch.Tensor, negative: torch.Tensor | None, process: NoiseProcess, noise: NoiseSource
    ):
        if negative is not None and negative.shape != cond.shape:
            raise ValueError(
                f"negative embeddings {tuple(negative.shape)} do not match the prompt's {tuple(cond.shape)}"
            )
        self.cads, self.cond, self.negative, self.process = cads, cond, negative, process
        self.noise = noise
        self.times: list[float] = []  # the normalised time of every step annealed so far, in order

    def time(self, timestep: Any) -> float:
        """The normalised time (1 = noise) of a pipeline timestep."""
        t = float(self.process.t_from_timestep(float(timestep)))
        return min(max(t / float(self.process.t_max), 0.0), 1.0)

    def embeddings(self, timestep: Any, guided: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(conditional, negative) embeddings of the step at ``timestep``: ŷ_final of the clean ones (eqs. 1–4); the
        negative is annealed too only under ``cads.both`` and is ``None`` unless ``guided``."""
        time = self.time(timestep)
        self.times.append(time)
        rows = self.cond.shape[0]
        cond = self.cads.anneal(
            self.cond, time, lambda shape, device, dtype: self.noise.draw(0, rows, shape, device, dtype)
        )
        if not guided or self.negative is None:
            return cond, None
        negative = self.negative
        if self.cads.both:
            uncond = self.noise.substream("uncond")
            negative = self.cads.anneal(
                negative, time, lambda shape, device, dtype: uncond.draw(0, rows, shape, device, dtype)
            )
        return cond, negative

    def __call__(self, pipe: Any, i: int, t: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        timesteps = pipe.scheduler.timesteps
        if i + 1 >= len(timesteps):
            return {}
        guided = bool(pipe.do_classifier_free_guidance)
        cond, negative = self.embeddings(timesteps[i + 1], guided)
        return {"prompt_embeds": torch.cat([negative, cond]) if negative is not None else cond}


def cads_pipeline_kwargs(
    pipe: Any,
    prompt: str | Sequence[str],
    cads: CADS,
    num_inference_steps: int = 50,
    *,
    negative_prompt: str | Sequence[str] | None = None,
    num_images_per_prompt: int = 1,
    seed: int | Sequence[int] = 0,
    timesteps: Sequence[int] | None = None,
    sigmas: Sequence[float] | None = None,
    clip_skip: int | None = None,
) -> dict[str, Any]:
    """The keyword arguments that run ``pipe`` under CADS (module docstring): ``prompt_embeds`` (annealed for the
    first step), ``negative_prompt_embeds``, ``callback_on_step_end`` (a :class:`CADSCallback`),
    ``num_inference_steps`` (and ``timesteps`` / ``sigmas`` where given) and ``num_images_per_prompt=1``.

    ``seed``: the CADS noise's own source — an integer seeds one generator for the batch, a sequence gives one seed
    per image (prompts × ``num_images_per_prompt``, in the pipeline's order).
    """
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

    device = pipe._execution_device
    cond, negative = pipe.encode_prompt(
        prompt, device, int(num_images_per_prompt), True, negative_prompt, clip_skip=clip_skip
    )
    rows = int(cond.shape[0])
    if isinstance(seed, int):
        noise = NoiseSource(generator=torch.Generator().manual_seed(seed))
    else:
        if len(seed) != rows:
            raise ValueError(f"seed: {len(seed)} seeds for {rows} images (prompts × num_images_per_prompt)")
        noise = NoiseSource(seeds=list(seed))
    callback = CADSCallback(cads, cond, negative, noise_process_from_config(pipe.scheduler.config), noise)
    schedule: dict[str, Any] = {"num_inference_steps": int(num_inference_steps)}
    if timesteps is not None:
        schedule["timesteps"] = list(timesteps)
    if sigmas is not None:
        schedule["sigmas"] = list(sigmas)
    first = retrieve_timesteps(copy.deepcopy(pipe.scheduler), device="cpu", **schedule)[0][0]
    first_cond, first_negative = callback.embeddings(first, guided=True)
    return {
        "prompt_embeds": first_cond,
        "negative_prompt_embeds": first_negative,
        "num_images_per_prompt": 1,
        "callback_on_step_end": callback,
        **schedule,
    }
