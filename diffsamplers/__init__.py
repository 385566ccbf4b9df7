"""diffsamplers: diffusion-model samplers that drop into diffusers.

Layers (data flows down): noise processes → denoiser → schedules → solvers → sampling loop → adapters.
"""

from .denoiser import Denoiser
from .noise import ContinuousVP, DiscreteVP, NoiseProcess, RectifiedFlow, VarianceExploding, noise_process_from_config
from .rng import NoiseSource
from .sampling import NonFiniteError, StepInfo, sample
from .schedules import Schedule
from .solvers import (
    DDIM,
    DCSolver,
    DPMSolverPlusPlus,
    DPMSolverPlusPlusSinglestep,
    DynamicThresholding,
    Euler,
    ExposureBiasTimeShift,
    UniPC,
)

__version__ = "0.1.0"

__all__ = [
    "DCSolver",
    "DCSolverScheduler",
    "DDIM",
    "ContinuousVP",
    "DPMSolverPlusPlus",
    "DPMSolverPlusPlusScheduler",
    "DPMSolverPlusPlusSinglestep",
    "Denoiser",
    "DiscreteVP",
    "DynamicThresholding",
    "Euler",
    "ExposureBiasTimeShift",
    "NoiseProcess",
    "NoiseSource",
    "NonFiniteError",
    "RectifiedFlow",
    "Schedule",
    "StepInfo",
    "UniPC",
    "VarianceExploding",
    "noise_process_from_config",
    "sample",
]


def __getattr__(name: str):
    # The diffusers adapters import diffusers, which is slow: load them on first use.
    if name == "DPMSolverPlusPlusScheduler":
        from .adapters.dpm_solver_pp_scheduler import DPMSolverPlusPlusScheduler

        return DPMSolverPlusPlusScheduler
    if name == "DCSolverScheduler":
        from .adapters.dc_solver_scheduler import DCSolverScheduler

        return DCSolverScheduler
    raise AttributeError(f"module 'diffsamplers' has no attribute {name!r}")
