"""Solvers: each precomputes its coefficients on the host and updates the sample with a few fused ops."""

from .base import LinearStep, Solver, SolverPlan, SolverState
from .dc_solver import DCSolver
from .ddim import DDIM
from .dpm_solver_pp import DPMSolverPlusPlus
from .dpm_solver_pp_singlestep import DPMSolverPlusPlusSinglestep
from .euler import Euler
from .euler_maruyama import EulerMaruyama
from .exposure_bias_time_shift import ExposureBiasTimeShift
from .thresholding import DynamicThresholding
from .unipc import UniPC

__all__ = [
    "DCSolver",
    "DDIM",
    "DPMSolverPlusPlus",
    "DPMSolverPlusPlusSinglestep",
    "DynamicThresholding",
    "Euler",
    "EulerMaruyama",
    "ExposureBiasTimeShift",
    "LinearStep",
    "Solver",
    "SolverPlan",
    "SolverState",
    "UniPC",
]
