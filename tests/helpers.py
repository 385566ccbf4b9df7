"""Small helpers shared by the tests."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from diffsamplers.models.gmm import GaussianMixture

#: A well-conditioned mixture (no component narrower than σ ≈ 0.14): its denoiser does not amplify float32
#: rounding at low noise, and its error curves are asymptotic from NFE 10 on.
SMOOTH_MIXTURE = GaussianMixture.random((1, 4, 4), num_components=2, seed=1, eig_range=(0.05, 0.5), mean_scale=0.8)


def scheduler_loop(
    scheduler,
    x: torch.Tensor,
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: Sequence[torch.Tensor] | None = None,
    **set_timesteps_kwargs,
) -> torch.Tensor:
    """Run a diffusers-style scheduler through a full loop, as a pipeline does."""
    scheduler.set_timesteps(**set_timesteps_kwargs)
    x = x * getattr(scheduler, "init_noise_sigma", 1.0)  # FlowMatch schedulers have none (σ = 1)
    for i, t in enumerate(scheduler.timesteps):
        scale = getattr(scheduler, "scale_model_input", None)  # FlowMatch schedulers have none
        out = model(x if scale is None else scale(x, t), t)
        kwargs = {} if noise is None else {"variance_noise": noise[i]}
        x = scheduler.step(out.to(x.dtype), t, x, **kwargs).prev_sample
    return x


def fitted_slope(nfes: Sequence[int], errors: Sequence[float]) -> float:
    """Slope of log(error) against log(NFE): minus the observed order of convergence."""
    return float(np.polyfit(np.log(np.asarray(nfes, float)), np.log(np.asarray(errors, float)), 1)[0])


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).pow(2).mean().sqrt())
