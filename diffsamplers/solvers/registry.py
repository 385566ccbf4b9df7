"""Solvers by name, for the command line, evaluation jobs and scripts (``register_solver`` adds more)."""

from __future__ import annotations

from collections.abc import Callable

from .base import Solver
from .ddim import DDIM
from .dpm_solver_pp import DPMSolverPlusPlus
from .dpm_solver_pp_singlestep import DPMSolverPlusPlusSinglestep
from .euler import Euler
from .unipc import UniPC

__all__ = ["SOLVERS", "make_solver", "register_solver"]

SOLVERS: dict[str, Callable[[], Solver]] = {
    "ddim": DDIM,
    "ddim-eta1": lambda: DDIM(eta=1.0),
    "euler": Euler,
    "dpm++1": lambda: DPMSolverPlusPlus(1),
    "dpm++2m": lambda: DPMSolverPlusPlus(2),
    "dpm++3m": lambda: DPMSolverPlusPlus(3),
    "dpm++2s": lambda: DPMSolverPlusPlusSinglestep(2),
    "dpm++3s": lambda: DPMSolverPlusPlusSinglestep(3),
    "sde-dpm++2m": lambda: DPMSolverPlusPlus(2, sde=True),
    "unipc": lambda: UniPC(2, "bh2"),
    "unipc-bh1": lambda: UniPC(2, "bh1"),
    "unipc3": lambda: UniPC(3, "bh2"),
}


def register_solver(name: str, factory: Callable[[], Solver]) -> None:
    """Make ``make_solver(name)`` return ``factory()``."""
    SOLVERS[name] = factory


def make_solver(name: str) -> Solver:
    """A solver from its short name (see :data:`SOLVERS`; DC-Solver needs ratios: see ``evaluation.sources``)."""
    try:
        return SOLVERS[name]()
    except KeyError:
        raise ValueError(f"unknown solver {name!r}: expected one of {sorted(SOLVERS)} or dc-solver[:RATIOS]") from None
