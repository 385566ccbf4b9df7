"""Solvers: each precomputes its coefficients on the host and updates the sample with a few fused ops."""

from .base import LinearStep, Solver, SolverPlan, SolverState
from .ddim import DDIM
from .dpm_solver_pp import DPMSolverPlusPlus
from .dpm_solver_pp_singlestep import DPMSolverPlusPlusSinglestep
from .euler import Euler
from .exposure_bias_time_shift import ExposureBiasTimeShift
from .thresholding import DynamicThresholding

__all__ = [
    "DDIM",
    "DPMSolverPlusPlus",
    "DPMSolverPlusPlusSinglestep",
    "DynamicThresholding",
    "Euler",
    "ExposureBiasTimeShift",
    "LinearStep",
    "Solver",
    "SolverPlan",
    "SolverState",
]
