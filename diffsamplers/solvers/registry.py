"""Solvers by name, for the command line and the scripts (``register_solver`` adds more, e.g. DC-Solver)."""

from __future__ import annotations

from collections.abc import Callable

from .base import Solver
from .ddim import DDIM
from .dpm_solver_pp import DPMSolverPlusPlus
from .dpm_solver_pp_singlestep import DPMSolverPlusPlusSinglestep
from .euler import Euler

__all__ = ["SOLVERS", "register_solver", "solver_from_name"]

SOLVERS: dict[str, Callable[[], Solver]] = {
    "ddim": DDIM,
    "euler": Euler,
    "dpm++2m": lambda: DPMSolverPlusPlus(2),
    "dpm++3m": lambda: DPMSolverPlusPlus(3),
    "sde-dpm++2m": lambda: DPMSolverPlusPlus(2, sde=True),
    "dpm++2s": lambda: DPMSolverPlusPlusSinglestep(2),
    "dpm++3s": lambda: DPMSolverPlusPlusSinglestep(3),
}


def register_solver(name: str, factory: Callable[[], Solver]) -> None:
    """Make ``solver_from_name(name)`` return ``factory()``."""
    SOLVERS[name] = factory


def solver_from_name(name: str) -> Solver:
    try:
        return SOLVERS[name]()
    except KeyError:
        raise ValueError(f"unknown solver {name!r}: expected one of {sorted(SOLVERS)}") from None
