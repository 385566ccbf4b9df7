"""The best recipe we ship for a model at a given NFE: ``--solver best``.

A recipe is a solver spec, the exact noise levels it visits (a schedule learned for that NFE, the last level 0),
optionally a Gaussian teleport (x_T is drawn at the model's σ_max and carried by the Gaussian flow to the first
level, :func:`~diffsamplers.teleport.gaussian.gaussian_flow`) and DC-Solver ratios. The recipes of a model are chosen
per NFE on held-out noises by ``scripts/few_step_table.py`` (:mod:`diffsamplers.apps.few_step`) and written to
``diffsamplers/assets/best/<model>.json`` with the errors they were chosen on; ``diffsamplers compare`` reports them
beside diffusers' schedulers and ``diffsamplers sample --solver best --steps N`` samples with them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..denoiser import Denoiser
from ..sampling import sample
from ..schedules.schedule import Schedule
from ..schedules.spacing import from_sigmas
from ..solvers.base import Solver
from .recipes import BEST, parse_solver

__all__ = ["BEST", "BEST_DIR", "BestRecipe", "best_recipe", "best_recipes", "write_best"]

BEST_DIR = Path(__file__).resolve().parents[1] / "assets" / "best"


@dataclass(frozen=True)
class BestRecipe:
    """One NFE's shipped recipe (module docstring); ``measured`` holds how it was chosen."""

    nfe: int
    name: str
    solver: str
    sigmas: tuple[float, ...]
    teleport: bool = False
    ratios: tuple[float, ...] | None = None
    measured: dict[str, Any] | None = None

    def schedule(self, denoiser: Denoiser) -> Schedule:
        return from_sigmas(denoiser.process, list(self.sigmas))

    def build_solver(self) -> Solver:
        ratios = None if self.ratios is None else list(self.ratios)
        return parse_solver(self.solver).build(nfe=self.nfe, search=lambda _solver: ratios)

    def start(self, denoiser: Denoiser, x_T: torch.Tensor, stats: Any = None) -> torch.Tensor:
        """The first sample: ``x_T`` (drawn at the model's σ_max when the recipe teleports, else at the first level)
        teleported to the first level."""
        if not self.teleport:
            return x_T
        if stats is None:
            raise ValueError(f"the best recipe at NFE {self.nfe} teleports and needs the data's Gaussian statistics")
        from ..teleport.gaussian import gaussian_flow

        top = float(denoiser.process.sigma_max)
        return gaussian_flow(stats, denoiser.process, x_T, top, float(self.sigmas[0])).to(x_T.dtype)

    def initial_sigma(self, denoiser: Denoiser) -> float:
        """The level x_T is drawn at."""
        return float(denoiser.process.sigma_max) if self.teleport else float(self.sigmas[0])

    def sample(self, denoiser: Denoiser, x_T: torch.Tensor, stats: Any = None, **sample_kwargs: Any) -> torch.Tensor:
        """Samples from ``x_T`` (at :meth:`initial_sigma`) with exactly ``nfe`` model evaluations."""
        return sample(
            denoiser,
            self.build_solver(),
            self.schedule(denoiser),
            x_T=self.start(denoiser, x_T, stats),
            **sample_kwargs,
        )


def best_recipes(model: str, folder: Path = BEST_DIR) -> dict[int, BestRecipe]:
    """The recipes shipped for ``model`` by NFE (empty when there are none)."""
    path = Path(folder) / f"{model}.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    out = {}
    for key, r in data["recipes"].items():
        ratios = r.get("ratios")
        out[int(key)] = BestRecipe(
            nfe=int(key),
            name=r["name"],
            solver=r["solver"],
            sigmas=tuple(float(s) for s in r["sigmas"]),
            teleport=bool(r.get("teleport", False)),
            ratios=None if ratios is None else tuple(float(v) for v in ratios),
            measured=r.get("measured"),
        )
    return out


def best_recipe(model: str, nfe: int, folder: Path = BEST_DIR) -> BestRecipe:
    """The recipe shipped for ``model`` at ``nfe`` evaluations; a ``ValueError`` lists what exists."""
    recipes = best_recipes(model, folder)
    if int(nfe) not in recipes:
        have = ", ".join(map(str, sorted(recipes))) or "none"
        raise ValueError(
            f"--solver {BEST}: no recipe shipped for model {model!r} at {nfe} evaluations (shipped NFEs: {have}); "
            "scripts/few_step_table.py chooses them"
        )
    return recipes[int(nfe)]


def write_best(model: str, recipes: dict[int, BestRecipe], source: dict[str, Any], folder: Path = BEST_DIR) -> Path:
    """Write a model's recipes (atomically), with ``source`` saying how they were chosen."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    body = {
        "model": model,
        "source": source,
        "recipes": {
            str(n): {
                "name": r.name,
                "solver": r.solver,
                "sigmas": list(r.sigmas),
                "teleport": r.teleport,
                "ratios": None if r.ratios is None else list(r.ratios),
                "measured": r.measured,
            }
            for n, r in sorted(recipes.items())
        },
    }
    path = folder / f"{model}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(body, indent=1))
    tmp.replace(path)
    return path
