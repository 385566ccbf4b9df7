"""A learned Align Your Steps schedule: its optimised levels per stage, their interpolation, files and plots.

The optimiser (:mod:`diffsamplers.tuning.ays_optimizer`) produces a first-stage schedule (10 steps in the
paper) and refinements with twice as many steps; for any other step count the finest one is interpolated
log-linearly over the step index (Sabour et al. 2024, Sec. 3.3), with the same
:func:`~diffsamplers.schedules.align_your_steps.schedule_from_levels` as the published schedules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..artifacts import load_artifact, save_artifact
from ..noise import NoiseProcess
from .align_your_steps import AysFinal, check_levels, schedule_from_levels
from .schedule import Schedule, check_final

__all__ = ["LearnedSchedule"]

_KIND = "learned_schedule"


@dataclass
class LearnedSchedule:
    """Optimised noise levels per stage (``{num_steps: levels}``, each decreasing from σ_max to σ_min).

    ``metadata`` records how it was made (model, solver, NFE, seed, KLUB and metric history, settings).
    """

    stages: dict[int, np.ndarray]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("a learned schedule needs at least one stage")
        clean = {}
        for n, levels in self.stages.items():
            arr = check_levels(levels, f"learned levels ({n} steps)")
            if arr.size != int(n) + 1:
                raise ValueError(f"stage {n} must hold {int(n) + 1} levels, got {arr.size}")
            clean[int(n)] = arr
        self.stages = dict(sorted(clean.items()))

    @property
    def finest(self) -> np.ndarray:
        return self.stages[max(self.stages)]

    def levels(self, num_steps: int | None = None) -> np.ndarray:
        """The optimised levels of a stage (default: the finest)."""
        return self.finest if num_steps is None else self.stages[int(num_steps)]

    def schedule(self, num_steps: int, final: AysFinal = "zero", process: NoiseProcess | None = None) -> Schedule:
        """A ``num_steps`` schedule: a stage's own levels when it has that many steps (``"zero"``,
        ``"sigma_min"``), else the finest stage interpolated log-linearly; the last level follows ``final``, the
        package's final-step policy (default ``"zero"``; see :mod:`diffsamplers.schedules.align_your_steps`)."""
        fin = check_final(final, aliases=True)
        levels = self.stages.get(int(num_steps)) if fin != "append_zero" else None
        source = levels if levels is not None else self.finest
        meta = {k: self.metadata[k] for k in ("model", "solver") if k in self.metadata}
        return schedule_from_levels(source, num_steps, fin, process, source="learned", **meta)

    # -- files ----------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """safetensors (``levels_<n>`` per stage, float64) with the metadata as JSON."""
        tensors = {f"levels_{n}": torch.from_numpy(v.copy()) for n, v in self.stages.items()}
        return save_artifact(path, tensors, {"kind": _KIND, "metadata": self.metadata})

    @classmethod
    def load(cls, path: str | Path) -> LearnedSchedule:
        tensors, meta = load_artifact(path, _KIND)
        stages = {int(k.split("_", 1)[1]): v.double().numpy() for k, v in tensors.items() if k.startswith("levels_")}
        return cls(stages, meta.get("metadata", {}))
