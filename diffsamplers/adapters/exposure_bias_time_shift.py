"""The exposure-bias time-shift sampler (Li et al. 2024, ICLR; :mod:`diffsamplers.solvers.exposure_bias_time_shift`)
inside a diffusers pipeline.

The shift is part of the schedulers' config: ``exposure_bias_shift_half_width`` > 0 (0, the default, is off) with
``exposure_bias_shift_cutoff``, ``…_variance_source``, ``…_signal_variance`` and ``…_start_step`` wraps the
scheduler's solver in :class:`~diffsamplers.solvers.ExposureBiasTimeShift`, and the keys round-trip through
``save_pretrained`` / ``from_pretrained``. Its ``step`` converts the model output with each sample's own (α, σ).

diffusers pipelines always pass ``scheduler.timesteps[i]`` — one scalar — to the network, while the time-shift
sampler evaluates each sample at its own timestep. :func:`attach_exposure_bias_time_shift` makes that work in
any pipeline without changing its code:

1. the pipeline's scheduler becomes a :class:`~diffsamplers.DPMSolverPlusPlusScheduler` (built from the
   pipeline's scheduler config with the shift's keys; ``solver_order=1`` gives DDIM) — or, if it already is one of
   this package's schedulers (e.g. a :class:`~diffsamplers.DCSolverScheduler`), the same class;
2. a forward pre-hook on the denoising network (``pipe.unet`` or ``pipe.transformer``) replaces the timestep
   argument by the scheduler's per-sample timesteps (:meth:`SolverScheduler.current_model_timesteps`) at the
   steps where samples were shifted, repeated over the classifier-free-guidance batch, in the pipeline's units
   (a float timestep is scaled by the pipeline's value over the scheduler's: Flux passes t/1000).

On a flow-matching pipeline (SD3, Flux …) step 1 builds the flow scheduler from the FlowMatch config
(:mod:`diffsamplers.adapters.source_config`).

``handle.remove()`` restores the original scheduler and removes the hook::

    handle = attach_exposure_bias_time_shift(pipe, half_width=5, cutoff=300)
    images = pipe(num_inference_steps=10).images
    handle.remove()

A pipeline whose scheduler was loaded with the keys set needs the hook all the same:
``attach_exposure_bias_time_shift(pipe, **time_shift_settings(pipe.scheduler))``.
Nothing is read back from the device: the hook only swaps in a tensor the scheduler already holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .dpm_solver_pp_scheduler import DPMSolverPlusPlusScheduler
from .scheduler_base import SolverScheduler

__all__ = [
    "CONFIG_KEYS",
    "TimeShiftHandle",
    "attach_exposure_bias_time_shift",
    "time_shift_model_hook",
    "time_shift_settings",
]

#: The scheduler config keys of the shift and :func:`attach_exposure_bias_time_shift`'s argument for each.
CONFIG_KEYS = {
    "half_width": "exposure_bias_shift_half_width",
    "cutoff": "exposure_bias_shift_cutoff",
    "variance_source": "exposure_bias_shift_variance_source",
    "signal_variance": "exposure_bias_shift_signal_variance",
    "start_step": "exposure_bias_shift_start_step",
}


def _network(pipe: Any) -> torch.nn.Module:
    for name in ("unet", "transformer"):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise TypeError(f"{type(pipe).__name__} has no 'unet' or 'transformer' module to attach the time shift to")


def time_shift_model_hook(scheduler: SolverScheduler):
    """A ``register_forward_pre_hook(..., with_kwargs=True)`` hook feeding the scheduler's per-sample timesteps."""

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        ts = scheduler.current_model_timesteps()
        if ts is None:
            return None
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        batch = int(sample.shape[0])
        if batch % ts.shape[0] != 0:
            raise ValueError(f"model batch {batch} is not a multiple of the {ts.shape[0]} time-shifted samples")
        ts = ts.to(sample.device).repeat(batch // ts.shape[0])
        given = args[1] if len(args) >= 2 else kwargs.get("timestep")
        if isinstance(given, torch.Tensor) and given.is_floating_point():
            # keep the pipeline's units (Flux passes t/1000): scale by its timestep over the scheduler's, on the device
            k = scheduler.step_index if scheduler.step_index is not None else (scheduler.begin_index or 0)
            nominal = scheduler.timesteps[k].to(device=given.device, dtype=given.dtype)
            ts = ts.to(given.dtype) * (given.reshape(-1)[:1] / nominal)
        if len(args) >= 2:
            return (args[0], ts, *args[2:]), kwargs
        return args, {**kwargs, "timestep": ts}

    return hook


@dataclass
class TimeShiftHandle:
    """What :func:`attach_exposure_bias_time_shift` changed; :meth:`remove` undoes it."""

    pipe: Any
    scheduler: SolverScheduler
    original_scheduler: Any
    hook: torch.utils.hooks.RemovableHandle

    def remove(self) -> None:
        self.hook.remove()
        self.pipe.scheduler = self.original_scheduler


def time_shift_settings(scheduler: SolverScheduler) -> dict[str, Any]:
    """The shift's settings in ``scheduler``'s config, as :func:`attach_exposure_bias_time_shift` arguments."""
    return {arg: scheduler.config[key] for arg, key in CONFIG_KEYS.items()}


def attach_exposure_bias_time_shift(
    pipe: Any,
    half_width: int = 10,
    cutoff: float = 300.0,
    *,
    variance_source: str = "x",
    signal_variance: float = 0.0,
    start_step: int = 1,
    **scheduler_kwargs: Any,
) -> TimeShiftHandle:
    """Sample ``pipe`` with the exposure-bias time shift (see the module docstring).

    ``scheduler_kwargs`` override the pipeline scheduler's config, e.g. ``solver_order=1`` for DDIM or
    ``algorithm_type="sde-dpmsolver++"``. The time-shift arguments are those of
    :class:`~diffsamplers.solvers.ExposureBiasTimeShift`; they become the scheduler's ``exposure_bias_shift_*``
    config keys.
    """
    original = pipe.scheduler
    settings = dict(
        half_width=half_width,
        cutoff=cutoff,
        variance_source=variance_source,
        signal_variance=signal_variance,
        start_step=start_step,
    )
    keys = {CONFIG_KEYS[arg]: value for arg, value in settings.items()}
    cls = type(original) if isinstance(original, SolverScheduler) else DPMSolverPlusPlusScheduler
    scheduler = cls.from_config(original.config, **scheduler_kwargs, **keys)
    pipe.scheduler = scheduler
    hook = _network(pipe).register_forward_pre_hook(time_shift_model_hook(scheduler), with_kwargs=True)
    return TimeShiftHandle(pipe, scheduler, original, hook)
