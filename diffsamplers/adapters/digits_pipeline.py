"""A class-conditional diffusers pipeline for the bundled digits UNet, with classifier-free guidance.

It drives any diffusers scheduler through the standard contract (``set_timesteps``, ``scale_model_input``,
``step``), so diffusers' own schedulers and ours swap in with ``from_config``::

    pipe = DigitsPipeline.from_pretrained(diffsamplers.models.digits.DIGITS_PIPELINE_DIR)
    pipe.scheduler = DPMSolverPlusPlusScheduler.from_config(pipe.scheduler.config)
    images = pipe([0, 1, 2], num_inference_steps=20, guidance_scale=2.0).images
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

__all__ = ["DigitsPipeline"]


class DigitsPipeline(DiffusionPipeline):
    """Class-conditional sampling from a ``UNet2DModel`` with ``num_class_embeds = classes + 1``.

    The last class embedding is the null class used for the unconditional half of classifier-free guidance
    (Ho & Salimans 2022, Eq. 6: ε̂ = ε_u + w (ε_c − ε_u)).
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: Any, scheduler: Any):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @property
    def null_class(self) -> int:
        return int(self.unet.config.num_class_embeds) - 1

    @torch.no_grad()
    def __call__(
        self,
        class_labels: list[int] | torch.Tensor,
        num_inference_steps: int = 20,
        guidance_scale: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        output_type: str = "pt",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        labels = torch.as_tensor(class_labels, dtype=torch.long, device=self.device).reshape(-1)
        if labels.numel() == 0 or labels.min() < 0 or labels.max() >= self.null_class:
            raise ValueError(f"class_labels must be digits 0..{self.null_class - 1}, got {labels.tolist()}")
        cfg = self.unet.config
        shape = (labels.numel(), cfg.in_channels, cfg.sample_size, cfg.sample_size)
        latents = randn_tensor(shape, generator=generator, device=self.device, dtype=self.unet.dtype)
        latents = latents * self.scheduler.init_noise_sigma

        kwargs: dict[str, Any] = {}
        params = inspect.signature(self.scheduler.set_timesteps).parameters
        for name, value in (("timesteps", timesteps), ("sigmas", sigmas)):
            if value is not None:
                if name not in params:
                    raise ValueError(f"{type(self.scheduler).__name__}.set_timesteps does not accept {name}=")
                kwargs[name] = value
        if kwargs:
            self.scheduler.set_timesteps(device=self.device, **kwargs)
        else:
            self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        step_kwargs = (
            {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters else {}
        )

        guided = guidance_scale != 1.0
        class_input = torch.cat([torch.full_like(labels, self.null_class), labels]) if guided else labels
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([latents, latents]) if guided else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            out = self.unet(model_input, t, class_labels=class_input).sample
            if guided:
                out_u, out_c = out.chunk(2)
                out = out_u + guidance_scale * (out_c - out_u)
            latents = self.scheduler.step(out, t, latents, **step_kwargs).prev_sample

        images = (latents / 2 + 0.5).clamp(0, 1)
        if output_type == "np":
            images = images.permute(0, 2, 3, 1).float().cpu().numpy()
        elif output_type == "pil":
            images = self.numpy_to_pil(images.permute(0, 2, 3, 1).float().cpu().numpy())
        elif output_type != "pt":
            raise ValueError(f"unknown output_type {output_type!r}: expected 'pt', 'np' or 'pil'")
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images if output_type != "np" else np.asarray(images))
