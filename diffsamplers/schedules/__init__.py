"""Step schedules: which noise levels σ̃ to visit (float64 data on the host)."""

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
