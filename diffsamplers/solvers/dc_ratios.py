"""Learned DC-Solver ratios on disk: safetensors (the ratios, float64) + JSON metadata.

The metadata says what the ratios were searched for — model, NFE, guidance scale, schedule (noise levels
and model timesteps), solver settings — and how (search settings, per-step losses). Ratios only make sense
for that configuration (the ratios compensate one grid's misalignment), so :meth:`DCRatios.check` refuses another NFE,
model, guidance scale, schedule or solver with an error naming both values. An interrupted search leaves a
file marked incomplete (``searched_steps`` < NFE), which the search resumes and sampling refuses.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..artifacts import ArtifactError, load_artifact, save_artifact
from ..schedules.schedule import Schedule
from .base import Solver
from .dc_solver import DCSolver, check_ratios
from .dpm_solver_pp import DPMSolverPlusPlus
from .unipc import UniPC

__all__ = ["DCRatios", "solver_settings", "schedule_description", "RatioMismatchError", "KIND"]

KIND = "dc_solver_ratios"
FORMAT_VERSION = 1


class RatioMismatchError(ArtifactError):
    """Ratios (or a regression) used for a configuration other than the one they were made for."""


def solver_settings(solver: DCSolver) -> dict[str, Any]:
    """The settings that ratios depend on, as JSON."""
    base: Solver = solver.base
    settings: dict[str, Any] = {"base": type(base).__name__, "dc_order": solver.dc_order}
    if isinstance(base, UniPC):
        settings.update(
            order=base.order,
            variant=base.variant,
            lower_order_final=base.lower_order_final,
            disable_corrector=list(base.disable_corrector),
            use_corrector=base.use_corrector,
        )
    elif isinstance(base, DPMSolverPlusPlus):
        settings.update(
            order=base.order,
            solver_type=base.solver_type,
            lower_order_final=base.lower_order_final,
            lower_order_final_threshold=base.lower_order_final_threshold,
            third_order=base.third_order,
        )
    else:
        settings["name"] = base.name
    settings["thresholding"] = base.x0_transform is not None
    return settings


def schedule_description(schedule: Schedule, process: Any = None) -> dict[str, Any]:
    """The noise levels and model timesteps of ``schedule`` (and its builder's metadata), as JSON."""
    timesteps = schedule.timesteps if process is None else schedule.model_timesteps(process)
    return {
        "sigmas": [float(s) for s in schedule.sigmas],
        "timesteps": None if timesteps is None else [float(t) for t in timesteps],
        "metadata": {k: v for k, v in schedule.metadata.items() if isinstance(v, (str, int, float, bool))},
    }


def _same_levels(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and bool(np.allclose(a, b, rtol=1e-9, atol=0.0))


@dataclass
class DCRatios:
    """Compensation ratios for one (model, NFE, guidance scale, schedule, solver) and their provenance."""

    ratios: list[float]
    model: str
    guidance_scale: float
    schedule: dict[str, Any]
    solver: dict[str, Any]
    search: dict[str, Any] = field(default_factory=dict)
    searched_steps: int | None = None  # None: complete

    @property
    def nfe(self) -> int:
        return len(self.ratios)

    @property
    def complete(self) -> bool:
        return self.searched_steps is None or self.searched_steps >= self.nfe

    # -- disk ---------------------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        return {
            "kind": KIND,
            "version": FORMAT_VERSION,
            "model": self.model,
            "nfe": self.nfe,
            "guidance_scale": self.guidance_scale,
            "schedule": self.schedule,
            "solver": self.solver,
            "search": self.search,
            "searched_steps": self.nfe if self.searched_steps is None else self.searched_steps,
            "complete": self.complete,
            "ratios": list(self.ratios),  # also readable without safetensors
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (an interrupted write leaves the previous file)."""
        return save_artifact(path, {"ratios": torch.tensor(self.ratios, dtype=torch.float64)}, self.metadata())

    @classmethod
    def load(cls, path: str | os.PathLike) -> DCRatios:
        tensors, meta = load_artifact(path, KIND)
        if meta.get("version") != FORMAT_VERSION:
            raise ArtifactError(f"{path}: unsupported ratio file version {meta.get('version')!r}")
        ratios = tensors["ratios"].tolist()
        if len(ratios) != meta["nfe"]:
            raise ArtifactError(f"{path}: holds {len(ratios)} ratios but says NFE {meta['nfe']}")
        return cls(
            ratios=ratios,
            model=meta["model"],
            guidance_scale=float(meta["guidance_scale"]),
            schedule=meta["schedule"],
            solver=meta["solver"],
            search=meta.get("search", {}),
            searched_steps=None if meta.get("complete", True) else int(meta["searched_steps"]),
        )

    # -- use ------------------------------------------------------------------------------------------
    def check(
        self,
        *,
        nfe: int | None = None,
        model: str | None = None,
        guidance_scale: float | None = None,
        schedule: dict[str, Any] | None = None,
        solver: dict[str, Any] | None = None,
        source: str = "the ratios",
        allow_incomplete: bool = False,
    ) -> DCRatios:
        """Raise :class:`RatioMismatchError` naming both values if any given property differs; returns self."""
        if not allow_incomplete and not self.complete:
            raise RatioMismatchError(
                f"{source}: the search stopped after {self.searched_steps} of {self.nfe} steps; resume it first"
            )
        if nfe is not None and int(nfe) != self.nfe:
            raise RatioMismatchError(f"{source} were searched for NFE {self.nfe}, but this run has NFE {nfe}")
        if model is not None and model != self.model:
            raise RatioMismatchError(f"{source} were searched for model {self.model!r}, not {model!r}")
        if guidance_scale is not None and not math.isclose(float(guidance_scale), self.guidance_scale, rel_tol=1e-9):
            raise RatioMismatchError(
                f"{source} were searched for guidance scale {self.guidance_scale:g}, not {float(guidance_scale):g}"
            )
        if schedule is not None and not _same_levels(schedule["sigmas"], self.schedule["sigmas"]):
            raise RatioMismatchError(
                f"{source} were searched on the noise levels {_short(self.schedule['sigmas'])}, "
                f"not {_short(schedule['sigmas'])}"
            )
        if solver is not None and solver != self.solver:
            diff = sorted(k for k in set(solver) | set(self.solver) if solver.get(k) != self.solver.get(k))
            raise RatioMismatchError(
                f"{source} were searched with solver settings "
                + ", ".join(f"{k}={self.solver.get(k)!r}" for k in diff)
                + ", not "
                + ", ".join(f"{k}={solver.get(k)!r}" for k in diff)
            )
        check_ratios(self.ratios, self.nfe, int(self.solver.get("dc_order", 2)), what=source)
        return self


def _short(values: list[float]) -> str:
    shown = ", ".join(f"{v:.4g}" for v in values[:4])
    return f"[{shown}{', …' if len(values) > 4 else ''}] ({len(values) - 1} steps)"
