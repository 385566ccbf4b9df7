"""``diffsamplers compare``: each solver's error against the exact probability-flow ODE solution.

On the bundled Gaussian mixture (exact denoiser, :mod:`diffsamplers.models.gmm`) every method starts from the same
x_T at σ̃(t = 999) and is compared with SciPy's solution of the same ODE (DOP853, rtol 1e-10) at the method's final
noise level — the ground truth itself, not the many-step reference the other tables use. Our solvers and diffusers'
own schedulers run side by side on the same ε-prediction network, each with its usual schedule; the table reports
the RMS error per NFE. Methods are solver and schedule specs (:mod:`diffsamplers.apps.recipes`).

DC-Solver's ratios are searched per NFE (``dc-solver:search``: :func:`diffsamplers.tuning.dc_search.search_dc_ratios`,
20 iterations per step as the official diffusers version) on 10 other noises against the reference trajectory; they
are then scored like every other method.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..denoiser import Denoiser
from ..metrics.errors import rms_error
from ..models.gmm import GaussianMixture, default_mixture, default_process, reference_solution
from ..noise import DiscreteVP
from ..sampling import initial_noise, sample
from ..solvers.dc_solver import DCSolver
from ..tuning.dc_search import PAPER_DATAPOINTS, search_dc_ratios
from .recipes import parse_schedule, parse_solver
from .registry import ModelBundle
from .samplers import diffusers_scheduler, run_diffusers_scheduler

__all__ = ["DEFAULT_NFES", "METHODS", "Method", "run_compare", "format_table", "best_by_nfe"]

DEFAULT_NFES = (5, 6, 8, 10, 15, 20, 50)

#: The seed of DC-Solver's search noises (other noises than the scored ones).
SEARCH_SEED = 12345


@dataclass
class Method:
    """A row of the table: a solver spec on a schedule spec (diffusers' schedulers use their config's grid)."""

    name: str
    solver: str
    schedule: str | None = None
    notes: str = ""
    errors: dict[int, float | None] = field(default_factory=dict)

    @property
    def library(self) -> str:
        return "diffusers" if parse_solver(self.solver).is_diffusers else "diffsamplers"


_GRID = "linspace timesteps, final σ = 0"

#: The default rows: our solvers on diffusers' default grid (and a uniform-logSNR grid), and diffusers' schedulers.
METHODS: tuple[tuple[str, str, str | None, str], ...] = (
    ("DDIM", "ddim", "linspace", _GRID),
    ("DPM-Solver++ 2M", "dpm++2m", "linspace", _GRID),
    ("DPM-Solver++ 3M", "dpm++3m", "linspace", _GRID + ", Taylor third-order term"),
    (
        "DPM-Solver++ 3M (reference)",
        "dpm++3m:third_order=reference",
        "linspace",
        _GRID + ", the official/diffusers third-order term",
    ),
    ("DPM-Solver++ 2S", "dpm++2s", "linspace", _GRID),
    ("DPM-Solver++ 3S", "dpm++3s", "linspace", _GRID),
    ("UniPC (bh2)", "unipc", "linspace", _GRID),
    (
        "DC-Solver (bh2, searched)",
        "dc-solver:search",
        "linspace",
        _GRID + ", ratios searched per NFE on 10 other noises (seed 12345)",
    ),
    ("DPM-Solver++ 2M, logSNR", "dpm++2m", "logsnr", "uniform logSNR, final σ = 0"),
    ("DPM-Solver++ 3M, logSNR", "dpm++3m", "logsnr", "uniform logSNR, final σ = 0"),
    ("diffusers DDIM", "diffusers:DDIMScheduler:timestep_spacing=trailing,set_alpha_to_one=true", None, "trailing"),
    ("diffusers Euler", "diffusers:EulerDiscreteScheduler", None, "defaults"),
    ("diffusers Heun", "diffusers:HeunDiscreteScheduler", None, "NFE = 2·steps − 1 (odd NFE only)"),
    ("diffusers DPM-Solver++ 2M", "diffusers:DPMSolverMultistepScheduler", None, "defaults"),
    ("diffusers DPM-Solver++ 3M", "diffusers:DPMSolverMultistepScheduler:solver_order=3", None, "solver_order=3"),
    ("diffusers DPM-Solver++ 2S", "diffusers:DPMSolverSinglestepScheduler", None, "defaults"),
    ("diffusers UniPC (bh2)", "diffusers:UniPCMultistepScheduler", None, "defaults"),
    ("diffusers DEIS", "diffusers:DEISMultistepScheduler", None, "defaults, ends at σ_min"),
)


def _bundle(gmm: GaussianMixture, process: DiscreteVP) -> ModelBundle:
    """The mixture as an ε-prediction network, with the diffusers config of its training schedule."""
    config = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}
    return ModelBundle(
        name="gmm (ε-network)",
        denoiser=Denoiser(gmm.as_model(process, "epsilon"), process, "epsilon"),
        sample_shape=tuple(gmm.sample_shape),
        scheduler_config=config,
    )


def _run(method: Method, bundle: ModelBundle, nfe: int, x_T: torch.Tensor) -> tuple[torch.Tensor, float] | None:
    """The method's final sample at ``nfe`` evaluations and its final noise level; ``None`` if it cannot spend
    exactly that many evaluations."""
    recipe = parse_solver(method.solver)
    if recipe.is_diffusers:
        scheduler = diffusers_scheduler(recipe, bundle)
        order = int(getattr(scheduler, "order", 1))
        if (nfe + order - 1) % order:
            return None
        steps = (nfe + order - 1) // order  # Heun: NFE = 2·steps − 1
        x = run_diffusers_scheduler(scheduler, bundle.denoiser.model, steps, x_T)
        return x, float(scheduler.sigmas[-1]) if hasattr(scheduler, "sigmas") else 0.0
    schedule = parse_schedule(method.schedule or "linspace").build(bundle.process, nfe)

    def search(solver: DCSolver) -> list[float]:
        points = initial_noise(bundle.process, schedule.sigmas[0], (PAPER_DATAPOINTS, *x_T.shape[1:]), SEARCH_SEED)
        return search_dc_ratios(bundle.denoiser, solver, schedule, points, model_id="gmm", iterations=20).ratios

    solver = recipe.build(nfe=nfe, search=search)
    return sample(bundle.denoiser, solver, schedule, x_T=x_T, progress=False), schedule.final_sigma


def run_compare(
    nfes: Sequence[int] = DEFAULT_NFES,
    num_samples: int = 64,
    seed: int = 0,
    gmm: GaussianMixture | None = None,
    process: DiscreteVP | None = None,
    methods: Sequence[Method] | None = None,
    select: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every method at every NFE; returns a JSON-ready report."""
    import diffusers

    from .. import __version__

    gmm = gmm or default_mixture()
    process = process or default_process()
    methods = list(methods) if methods is not None else [Method(*m) for m in METHODS]
    if select:
        methods = [m for m in methods if select.lower() in m.name.lower()]
        if not methods:
            raise ValueError(f"--methods: no method matches {select!r}")
    nfes = [int(n) for n in nfes]
    if any(n <= 0 for n in nfes):
        raise ValueError(f"--nfe must be positive, got {nfes}")
    bundle = _bundle(gmm, process)
    sigma_start = float(process.sigma_max)
    x_T = initial_noise(process, sigma_start, (num_samples, *gmm.sample_shape), seed)
    references: dict[float, torch.Tensor] = {}

    def exact(final: float) -> torch.Tensor:
        key = round(final, 12)
        if key not in references:
            references[key] = reference_solution(gmm, process, x_T.double(), sigma_start, final)
        return references[key]

    bar = tqdm(total=len(methods) * len(nfes), desc="compare", disable=not progress)
    for method in methods:
        for nfe in nfes:
            result = _run(method, bundle, nfe, x_T)
            method.errors[nfe] = None if result is None else rms_error(result[0], exact(result[1]))
            bar.update(1)
    bar.close()
    return {
        "model": f"Gaussian mixture, {len(gmm.weights)} components, sample shape {list(gmm.sample_shape)} "
        "(diffsamplers.models.gmm.default_mixture)",
        "process": "discrete VP, linear betas 1e-4..0.02, 1000 steps",
        "metric": "RMS error against SciPy's solution of the probability-flow ODE (DOP853, rtol 1e-10) from the same x_T",
        "num_samples": num_samples,
        "seed": seed,
        "nfe": nfes,
        "methods": [
            {
                "name": m.name,
                "library": m.library,
                "solver": m.solver,
                "schedule": m.schedule,
                "notes": m.notes,
                "errors": {str(k): v for k, v in m.errors.items()},
            }
            for m in methods
        ],
        "versions": {"diffsamplers": __version__, "diffusers": diffusers.__version__, "torch": torch.__version__},
    }


def format_table(report: dict[str, Any]) -> str:
    nfes = report["nfe"]
    width = max(len(m["name"]) for m in report["methods"]) + 2
    lines = [f"{'NFE':<{width}}" + "".join(f"{n:>10}" for n in nfes)]
    for m in report["methods"]:
        cells = []
        for n in nfes:
            v = m["errors"].get(str(n))
            cells.append(f"{'—':>10}" if v is None else f"{v:>10.2e}")
        lines.append(f"{m['name']:<{width}}" + "".join(cells))
    return "\n".join(lines)


def best_by_nfe(report: dict[str, Any]) -> dict[int, str]:
    """The method with the smallest error at each NFE (for summaries)."""
    out = {}
    for n in report["nfe"]:
        errs = [(m["errors"].get(str(n)), m["name"]) for m in report["methods"]]
        errs = [(e, name) for e, name in errs if e is not None and np.isfinite(e)]
        if errs:
            out[n] = min(errs)[1]
    return out
