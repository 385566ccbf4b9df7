"""Step schedules: which noise levels σ̃ to visit (float64 data on the host)."""

from .align_your_steps import (
    AYS_MODELS,
    align_your_steps,
    ays_noise_levels,
    ays_sigmas_for_diffusers,
    ays_timesteps_for_diffusers,
    loglinear_interpolation,
    schedule_from_levels,
)
from .schedule import FINAL_CONVENTIONS, Schedule
from .spacing import (
    SPACINGS,
    beta,
    build_schedule,
    default_schedule,
    diffusers_spacing,
    exponential,
    from_sigmas,
    from_timesteps,
    karras,
    uniform_logsnr,
    uniform_time,
)

__all__ = [
    "AYS_MODELS",
    "align_your_steps",
    "ays_noise_levels",
    "ays_sigmas_for_diffusers",
    "ays_timesteps_for_diffusers",
    "loglinear_interpolation",
    "schedule_from_levels",
    "FINAL_CONVENTIONS",
    "SPACINGS",
    "Schedule",
    "beta",
    "build_schedule",
    "default_schedule",
    "diffusers_spacing",
    "exponential",
    "from_sigmas",
    "from_timesteps",
    "karras",
    "uniform_logsnr",
    "uniform_time",
]
