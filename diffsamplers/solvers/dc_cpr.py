"""Cascade polynomial regression (CPR) of DC-Solver's ratios (Zhao et al. 2024, arXiv:2409.03755, Sec. 3.4).

Searched ratios vary smoothly with the step, the NFE and the guidance scale, so the paper fits, on a few
searched configurations, a cascade of polynomials and predicts the ratios of unseen ones instantly. With
the official normalisation g = CFG/12, n = NFE/50 and x = i/NFE (i = 1 … NFE the step), and 36
coefficients c[k, j, m] (k = 0…3, j, m = 0…2):

    a_{k,j} = c[k,j,0] n² + c[k,j,1] n + c[k,j,2]            (quadratic in the NFE)
    β_k     = a_{k,0} g² + a_{k,1} g + a_{k,2}               (quadratic in the guidance scale)
    ρ_i     = Σ_k β_k x^k                                     (cubic in the step fraction)

and ρ_i = 1 for the first ``dc_order`` steps. ρ is linear in the coefficients (ρ = Σ c[k,j,m] x^k g^{2−j}
n^{2−m}), so the fit is an ordinary least-squares problem over every searched step (the official code uses
``scipy.optimize.curve_fit`` on the same model). A polynomial in g or n cannot have a higher degree than
the number of distinct searched values minus one: the fit lowers those degrees (with two guidance scales
the dependence on g is linear) and leaves the unused coefficients at 0.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..artifacts import ArtifactError, load_artifact, save_artifact
from .dc_ratios import KIND as RATIOS_KIND
from .dc_ratios import DCRatios, RatioMismatchError

__all__ = ["CascadePolynomialRegression", "KIND", "load_ratio_source"]

KIND = "dc_solver_cpr"
GUIDANCE_NORM = 12.0
NFE_NORM = 50.0
SHAPE = (4, 3, 3)  # (step-fraction power k = 0..3, guidance row j, NFE row m)


def _features(nfe: int, guidance_scale: float, steps: np.ndarray) -> np.ndarray:
    """x^k g^{2−j} n^{2−m} for each step (1-based) — the columns of c[k, j, m] flattened."""
    x = np.asarray(steps, dtype=np.float64) / nfe
    g, n = guidance_scale / GUIDANCE_NORM, nfe / NFE_NORM
    xk = x[:, None] ** np.arange(4)[None, :]  # (S, 4)
    gj = g ** (2 - np.arange(3))  # (3,)
    nm = n ** (2 - np.arange(3))  # (3,)
    return (xk[:, :, None, None] * gj[None, None, :, None] * nm[None, None, None, :]).reshape(len(x), -1)


@dataclass
class CascadePolynomialRegression:
    """Ratios as a cascade polynomial of (step/NFE, guidance scale, NFE); see the module docstring."""

    coefficients: np.ndarray
    dc_order: int = 2
    model: str = ""
    solver: dict[str, Any] = field(default_factory=dict)
    spacing: dict[str, Any] = field(default_factory=dict)
    fitted_on: list[dict[str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        coefficients = np.asarray(self.coefficients, dtype=np.float64)
        if coefficients.size != 36:
            raise ValueError(f"CPR needs 36 coefficients (4 × 3 × 3), got {coefficients.size}")
        if not np.all(np.isfinite(coefficients)):
            raise ValueError("CPR coefficients must be finite")
        self.coefficients = coefficients.reshape(SHAPE)

    # -- fit / predict --------------------------------------------------------------------------
    @classmethod
    def fit(
        cls, searched: Sequence[DCRatios], max_degrees: tuple[int, int, int] = (3, 2, 2)
    ) -> CascadePolynomialRegression:
        """Least-squares fit to searched ratio sets of one model and solver (several NFEs / guidance scales).

        ``max_degrees`` are the degrees in (step fraction, guidance scale, NFE); the paper's (3, 2, 2).
        """
        if len(searched) < 1:
            raise ValueError("CPR needs at least one searched ratio set")
        first = searched[0]
        for other in searched[1:]:
            if other.model != first.model:
                raise RatioMismatchError(
                    f"cannot fit CPR on ratios of different models: {first.model!r}, {other.model!r}"
                )
            if other.solver != first.solver:
                raise RatioMismatchError(
                    f"cannot fit CPR on ratios of different solver settings: {first.solver}, {other.solver}"
                )
        for r in searched:
            r.check(source=f"ratios for NFE {r.nfe}, guidance {r.guidance_scale:g}")
        dc_order = int(first.solver.get("dc_order", 2))
        deg_x, deg_g, deg_n = (int(d) for d in max_degrees)
        if not (0 <= deg_x <= 3 and 0 <= deg_g <= 2 and 0 <= deg_n <= 2):
            raise ValueError(f"max_degrees must be at most (3, 2, 2), got {max_degrees}")
        deg_g = min(deg_g, len({r.guidance_scale for r in searched}) - 1)
        deg_n = min(deg_n, len({r.nfe for r in searched}) - 1)
        rows, targets, fractions = [], [], set()
        for r in searched:
            steps = np.arange(dc_order + 1, r.nfe + 1)  # 1-based steps with a searched ratio
            if steps.size:
                rows.append(_features(r.nfe, r.guidance_scale, steps))
                targets.append(np.asarray(r.ratios, dtype=np.float64)[steps - 1])
                fractions.update(np.round(steps / r.nfe, 12).tolist())
        if not rows:
            raise ValueError(f"no searched steps to fit: every NFE is at most dc_order = {dc_order}")
        deg_x = min(deg_x, len(fractions) - 1)
        design, y = np.concatenate(rows), np.concatenate(targets)
        k, j, m = np.meshgrid(np.arange(4), np.arange(3), np.arange(3), indexing="ij")
        used = ((k <= deg_x) & (2 - j <= deg_g) & (2 - m <= deg_n)).reshape(-1)
        columns = design[:, used]
        scale = np.linalg.norm(columns, axis=0)  # n² and g² columns are small: equilibrate before solving
        solution, *_ = np.linalg.lstsq(columns / scale, y, rcond=None)
        coefficients = np.zeros(36)
        coefficients[used] = solution / scale
        return cls(
            coefficients,
            dc_order=dc_order,
            model=first.model,
            solver=dict(first.solver),
            spacing=dict(first.schedule.get("metadata", {})),
            fitted_on=[{"nfe": r.nfe, "guidance_scale": r.guidance_scale} for r in searched],
        )

    @property
    def nfe_range(self) -> tuple[int, int] | None:
        """The smallest and largest NFE the regression was fitted on (None if not recorded)."""
        nfes = [int(c["nfe"]) for c in self.fitted_on]
        return (min(nfes), max(nfes)) if nfes else None

    def predict(self, nfe: int, guidance_scale: float) -> list[float]:
        """Ratios for ``nfe`` steps at ``guidance_scale`` (ρ = 1 for the first ``dc_order`` steps)."""
        if isinstance(nfe, bool) or not isinstance(nfe, (int, np.integer)) or nfe < 1:
            raise ValueError(f"nfe must be a positive integer, got {nfe!r}")
        steps = np.arange(1, int(nfe) + 1)
        values = _features(int(nfe), float(guidance_scale), steps) @ self.coefficients.reshape(-1)
        values[: self.dc_order] = 1.0
        return [float(v) for v in values]

    def ratios(self, nfe: int, guidance_scale: float, schedule: dict[str, Any]) -> DCRatios:
        """The prediction as a :class:`DCRatios` (for ``schedule``, a :func:`schedule_description`)."""
        return DCRatios(
            ratios=self.predict(nfe, guidance_scale),
            model=self.model,
            guidance_scale=float(guidance_scale),
            schedule=schedule,
            solver=dict(self.solver),
            search={"cpr": True, "fitted_on": self.fitted_on},
        )

    # -- disk -----------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        meta = {
            "kind": KIND,
            "version": 1,
            "dc_order": self.dc_order,
            "model": self.model,
            "solver": self.solver,
            "spacing": self.spacing,
            "fitted_on": self.fitted_on,
            "coefficients": self.coefficients.reshape(-1).tolist(),
        }
        return save_artifact(path, {"coefficients": torch.from_numpy(self.coefficients.copy())}, meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> CascadePolynomialRegression:
        tensors, meta = load_artifact(path, KIND)
        if meta.get("version") != 1:
            raise ArtifactError(f"{path}: unsupported CPR file version {meta.get('version')!r}")
        return cls(
            tensors["coefficients"].numpy(),
            dc_order=int(meta["dc_order"]),
            model=meta["model"],
            solver=meta["solver"],
            spacing=meta.get("spacing", {}),
            fitted_on=meta.get("fitted_on", []),
        )


def load_ratio_source(path: str | os.PathLike) -> DCRatios | CascadePolynomialRegression:
    """A DC-Solver ratio file: searched ratios (:class:`DCRatios`) or a cascade polynomial regression, by its kind."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"no DC-Solver ratios at {path}: search them with scripts/search_dc_ratios.py (and fit a CPR with "
            "scripts/fit_cpr.py)"
        )
    kind = load_artifact(path)[1].get("kind")
    if kind == KIND:
        return CascadePolynomialRegression.load(path)
    if kind == RATIOS_KIND:
        return DCRatios.load(path)
    raise ArtifactError(f"{path} holds {kind!r}, not DC-Solver ratios or a CPR fit")
