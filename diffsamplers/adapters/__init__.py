"""diffusers adapters: scheduler classes over this package's solvers (never a second copy of the maths)."""

from .cads_pipeline import CADSCallback, cads_pipeline_kwargs
from .dc_solver_scheduler import DCSolverScheduler
from .digits_pipeline import DigitsPipeline
from .dpm_solver_pp_scheduler import DPMSolverPlusPlusScheduler
from .exposure_bias_time_shift import TimeShiftHandle, attach_exposure_bias_time_shift, time_shift_settings
from .masked_scheduler import MaskedDiffusionScheduler, MaskedSchedulerOutput
from .particle_callback import ParticleResampling
from .scheduler_base import SolverScheduler

__all__ = [
    "CADSCallback",
    "DCSolverScheduler",
    "DigitsPipeline",
    "DPMSolverPlusPlusScheduler",
    "MaskedDiffusionScheduler",
    "MaskedSchedulerOutput",
    "ParticleResampling",
    "SolverScheduler",
    "TimeShiftHandle",
    "attach_exposure_bias_time_shift",
    "cads_pipeline_kwargs",
    "time_shift_settings",
]
