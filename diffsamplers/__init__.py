"""diffsamplers: diffusion-model samplers that drop into diffusers.

Layers (nothing imports from a layer above it; ``tests/test_layers.py`` checks it): core primitives (noise,
prediction, rng, denoiser) → bundled models and data → schedules → solvers → the sampling step, loop and reference
→ guidance, teleportation → metrics → tuning → diffusers adapters → apps (registry, recipes, CLI, reports).
"""

from .denoiser import Denoiser
from .noise import ContinuousVP, DiscreteVP, NoiseProcess, RectifiedFlow, VarianceExploding, noise_process_from_config
from .reference import reference_samples, reference_trajectory
from .rng import NoiseSource
from .sampling import initial_noise, sample
from .schedules import Schedule
from .solvers import (
    DDIM,
    DCSolver,
    DPMSolverPlusPlus,
    DPMSolverPlusPlusSinglestep,
    DynamicThresholding,
    Euler,
    EulerMaruyama,
    ExposureBiasTimeShift,
    UniPC,
)
from .step import Guidance, NonFiniteError, StepInfo

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
    "EulerMaruyama",
    "ExposureBiasTimeShift",
    "Guidance",
    "NoiseProcess",
    "NoiseSource",
    "NonFiniteError",
    "RectifiedFlow",
    "Schedule",
    "StepInfo",
    "UniPC",
    "VarianceExploding",
    "initial_noise",
    "noise_process_from_config",
    "reference_samples",
    "reference_trajectory",
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
