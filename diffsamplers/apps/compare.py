"""``diffsamplers compare``: each solver's error against the exact probability-flow ODE solution.

On the bundled Gaussian mixture (exact denoiser, :mod:`diffsamplers.models.gmm`) every method starts from the same
x_T and is compared with SciPy's solution of the same ODE (DOP853, rtol 1e-10) from that x_T to the method's final
noise level — the ground truth itself, not the many-step reference the other tables use. Our solvers and diffusers'
own schedulers run side by side on the same network, each with its usual schedule; the table reports the RMS error
per NFE. Methods are solver and schedule specs (:mod:`diffsamplers.apps.recipes`). ``process`` (``--process``) picks
the setting (:data:`SETTINGS`):

* ``"vp"`` — DDPM's discrete VP schedule, an ε-prediction network, x_T at σ̃(t = 999);
* ``"flow"`` — the rectified-flow path x_t = (1 − t) x0 + t ε (Liu et al. 2023; Lipman et al. 2023) of the model
  ``gmm-flow``, a velocity network (v = ε − x0, timestep 1000·t), x_T = ε at t = 1 — pure noise, where
  ``FlowMatchEulerDiscreteScheduler`` starts, as a pipeline's ``latents = randn``. A method whose grid starts below
  t = 1 (diffusers' flow DPM-Solver and UniPC, our solvers on the flow grid, the uniform-logSNR grid or the Align
  Your Steps schedule learned for ``gmm-flow``) takes that x_T as its first sample, as diffusers' flow DPM-Solver
  does in a pipeline; the reference still starts at t = 1.

DC-Solver's ratios are searched per NFE (``dc-solver:search``: :func:`diffsamplers.tuning.dc_search.search_dc_ratios`,
20 iterations per step as the official diffusers version) on 10 other noises against the reference trajectory; they
are then scored like every other method.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..denoiser import Denoiser
from ..metrics.errors import rms_error
from ..models.gmm import GaussianMixture, default_flow_process, default_mixture, default_process, reference_solution
from ..noise import NoiseProcess
from ..sampling import initial_noise, sample
from ..solvers.dc_solver import DCSolver
from ..teleport.statistics import GaussianStatistics
from ..tuning.dc_search import PAPER_DATAPOINTS, search_dc_ratios
from .best import best_recipes
from .recipes import parse_schedule, parse_solver
from .registry import GMM_FLOW_SCHEDULER_CONFIG, ModelBundle
from .samplers import diffusers_scheduler, run_diffusers_scheduler

__all__ = [
    "DEFAULT_NFES",
    "FLOW_METHODS",
    "METHODS",
    "PROCESSES",
    "SETTINGS",
    "Method",
    "Setting",
    "network_bundle",
    "run_method",
    "run_compare",
    "format_table",
    "best_by_nfe",
    "format_best_shipped",
]

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
    (
        "diffsamplers best (shipped)",
        "best",
        None,
        "the recipe shipped for the model at each NFE (docs/few_step.md): chosen on held-out noises",
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


_FLOW_GRID = "diffusers' DPM-Solver flow grid, shift 3 (flow:shift=3): x_T = ε taken at t = 0.99967, final t = 0"
_FLOW_LOGSNR = "uniform logSNR, t = 0.999 … 0.001 (σ̃ = 999 … 0.001): x_T = ε taken at t = 0.999, final t = 0"
_LOGSNR_SPEC = "logsnr:sigma_max=999,sigma_min=0.001"
_DIFFUSERS_FLOW = "use_flow_sigmas=true,prediction_type=flow_prediction,flow_shift=3.0"
#: The Align Your Steps schedule learned for ``gmm-flow`` (docs/flow_matching.md gives the command), a file of the
#: repository: a relative ``learned:`` path is found from the working directory or else from the repository root.
FLOW_AYS_FILE = "docs/ays/gmm-flow_dpm++2m_nfe10.safetensors"
_FLOW_AYS = (
    "Align Your Steps learned for gmm-flow with DPM-Solver++ 2M (KLUB, σ̃ = 1e6 … 0.01, 10 → 20 → 40 steps, "
    "interpolated log-linearly to other NFEs, last level → 0): x_T = ε taken at t = 1 − 1e-6, final t = 0"
)

#: The rows of ``--process flow``: ours on diffusers' flow grid (and a uniform-logSNR grid and the learned schedule),
#: diffusers' flow schedulers. A row is (name, solver spec, schedule spec or None for a diffusers scheduler, notes).
FLOW_METHODS: tuple[tuple[str, str, str | None, str], ...] = (
    ("DPM-Solver++ 2M", "dpm++2m", "flow:shift=3", _FLOW_GRID),
    ("DPM-Solver++ 3M", "dpm++3m", "flow:shift=3", _FLOW_GRID + ", Taylor third-order term"),
    ("UniPC (bh2)", "unipc", "flow:shift=3", _FLOW_GRID),
    (
        "DC-Solver (bh2, searched)",
        "dc-solver:search",
        "flow:shift=3",
        _FLOW_GRID + ", ratios searched per NFE on 10 other noises (seed 12345)",
    ),
    ("DPM-Solver++ 2M, logSNR", "dpm++2m", _LOGSNR_SPEC, _FLOW_LOGSNR),
    ("DPM-Solver++ 3M, logSNR", "dpm++3m", _LOGSNR_SPEC, _FLOW_LOGSNR),
    ("DPM-Solver++ 2M, AYS learned", "dpm++2m", f"learned:{FLOW_AYS_FILE}", _FLOW_AYS),
    ("UniPC (bh2), AYS learned", "unipc", f"learned:{FLOW_AYS_FILE}", _FLOW_AYS + "; the schedule learned for 2M"),
    (
        "diffusers FlowMatch Euler",
        "diffusers:FlowMatchEulerDiscreteScheduler",
        None,
        "the model's config (SD3: shift 3), starts at t = 1",
    ),
    (
        "diffusers DPM-Solver++ 2M",
        f"diffusers:DPMSolverMultistepScheduler:{_DIFFUSERS_FLOW}",
        None,
        "flow sigmas, flow_shift 3: x_T = ε taken at t = 0.99967; integer timesteps ⌊1000 t⌋",
    ),
    (
        "diffusers DPM-Solver++ 3M",
        f"diffusers:DPMSolverMultistepScheduler:{_DIFFUSERS_FLOW},solver_order=3",
        None,
        "as 2M, solver_order=3",
    ),
    (
        "diffusers UniPC (bh2)",
        f"diffusers:UniPCMultistepScheduler:{_DIFFUSERS_FLOW}",
        None,
        "flow sigmas, flow_shift 3: starts at t = 1 − 1e-6; integer timesteps ⌊1000 t⌋",
    ),
)


@dataclass(frozen=True)
class Setting:
    """What one ``--process`` compares on: the network every method runs (with its diffusers config), the noise
    level σ̃ of x_T that the exact solution starts from (∞: pure noise), and the default rows."""

    name: str
    bundle: ModelBundle
    sigma_start: float
    methods: tuple[tuple[str, str, str | None, str], ...]
    process_description: str
    start_description: str


def network_bundle(
    name: str, gmm: GaussianMixture, process: NoiseProcess, prediction_type: str, config: dict[str, Any]
) -> ModelBundle:
    """The mixture as a network predicting ``prediction_type``, read through a plain :class:`Denoiser` (so our
    solvers see what diffusers' schedulers see), with the diffusers config of its training."""
    return ModelBundle(
        name=name,
        denoiser=Denoiser(gmm.as_model(process, prediction_type), process, prediction_type),
        sample_shape=tuple(gmm.sample_shape),
        scheduler_config=dict(config),
        gaussian_statistics=lambda: GaussianStatistics.from_gmm(gmm),
    )


def _vp_setting(gmm: GaussianMixture) -> Setting:
    process = default_process()
    config = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}
    return Setting(
        "gmm",
        network_bundle("gmm (ε-network)", gmm, process, "epsilon", config),
        float(process.sigma_max),
        METHODS,
        "discrete VP, linear betas 1e-4..0.02, 1000 steps",
        "x_T ~ N(0, I) at σ̃(t = 999)",
    )


def _flow_setting(gmm: GaussianMixture) -> Setting:
    process = default_flow_process()
    return Setting(
        "gmm-flow",
        network_bundle("gmm-flow (velocity network)", gmm, process, "flow_prediction", GMM_FLOW_SCHEDULER_CONFIG),
        math.inf,
        FLOW_METHODS,
        "rectified flow x_t = (1 − t) x0 + t ε, velocity network v = ε − x0 at timestep 1000·t "
        "(gmm-flow; scheduler config FlowMatchEuler, shift 3)",
        "x_T = ε ~ N(0, I) at t = 1 (pure noise); methods whose grid starts below t = 1 take it as their first sample",
    )


#: ``--process``: the settings by name.
SETTINGS: dict[str, Callable[[GaussianMixture], Setting]] = {"vp": _vp_setting, "flow": _flow_setting}
PROCESSES = tuple(SETTINGS)


def _in_repository(spec: str) -> str:
    """A ``learned:`` spec whose relative path is not found from the working directory, with the path taken from
    the repository root instead (where :data:`FLOW_AYS_FILE` lies); any other spec as it is."""
    recipe = parse_schedule(spec)
    if recipe.kind != "learned" or Path(str(recipe.arg)).is_absolute() or Path(str(recipe.arg)).is_file():
        return spec
    found = Path(__file__).resolve().parents[2] / str(recipe.arg)
    return spec.replace(str(recipe.arg), str(found), 1) if found.is_file() else spec


def run_method(
    method: Method, bundle: ModelBundle, nfe: int, x_T: torch.Tensor, model_id: str = "gmm"
) -> tuple[torch.Tensor, float] | None:
    """The method's final sample at ``nfe`` evaluations and its final noise level σ̃; ``None`` if it cannot spend
    exactly that many evaluations."""
    recipe = parse_solver(method.solver)
    if recipe.is_best:
        best = best_recipes(model_id).get(nfe)
        if best is None:
            return None
        stats = bundle.gaussian_statistics() if bundle.gaussian_statistics else None
        return best.sample(bundle.denoiser, x_T, stats, progress=False), best.sigmas[-1]
    if recipe.is_diffusers:
        scheduler = diffusers_scheduler(recipe, bundle)
        order = int(getattr(scheduler, "order", 1))
        if (nfe + order - 1) % order:
            return None
        steps = (nfe + order - 1) // order  # Heun: NFE = 2·steps − 1
        x = run_diffusers_scheduler(scheduler, bundle.denoiser.model, steps, x_T)
        last = float(scheduler.sigmas[-1]) if hasattr(scheduler, "sigmas") else 0.0
        # diffusers keeps σ̃ for VP models and the flow time t for flow models
        return x, float(bundle.process.sigma_tilde(last)) if bundle.process.scaling == "flow" else last
    schedule = parse_schedule(_in_repository(method.schedule or "linspace")).build(bundle.process, nfe)

    def search(solver: DCSolver) -> list[float]:
        points = initial_noise(bundle.process, schedule.sigmas[0], (PAPER_DATAPOINTS, *x_T.shape[1:]), SEARCH_SEED)
        return search_dc_ratios(bundle.denoiser, solver, schedule, points, model_id=model_id, iterations=20).ratios

    solver = recipe.build(nfe=nfe, search=search)
    return sample(bundle.denoiser, solver, schedule, x_T=x_T, progress=False), schedule.final_sigma


def run_compare(
    nfes: Sequence[int] = DEFAULT_NFES,
    num_samples: int = 64,
    seed: int = 0,
    gmm: GaussianMixture | None = None,
    process: str = "vp",
    methods: Sequence[Method] | None = None,
    select: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every method at every NFE on the setting ``process`` (:data:`SETTINGS`: ``"vp"`` or ``"flow"``; its
    default rows unless ``methods`` are given); returns a JSON-ready report."""
    import diffusers

    from .. import __version__

    if process not in SETTINGS:
        raise ValueError(f"--process: unknown process {process!r}: expected one of {', '.join(PROCESSES)}")
    gmm = gmm or default_mixture()
    setting = SETTINGS[process](gmm)
    methods = list(methods) if methods is not None else [Method(*m) for m in setting.methods]
    if select:
        methods = [m for m in methods if select.lower() in m.name.lower()]
        if not methods:
            raise ValueError(f"--methods: no method matches {select!r}")
    nfes = [int(n) for n in nfes]
    if any(n <= 0 for n in nfes):
        raise ValueError(f"--nfe must be positive, got {nfes}")
    bundle = setting.bundle
    x_T = initial_noise(bundle.process, setting.sigma_start, (num_samples, *gmm.sample_shape), seed)
    references: dict[float, torch.Tensor] = {}

    def exact(final: float) -> torch.Tensor:
        key = round(final, 12)
        if key not in references:
            references[key] = reference_solution(gmm, bundle.process, x_T.double(), setting.sigma_start, final)
        return references[key]

    bar = tqdm(total=len(methods) * len(nfes), desc="compare", disable=not progress)
    for method in methods:
        for nfe in nfes:
            result = run_method(method, bundle, nfe, x_T, setting.name)
            method.errors[nfe] = None if result is None else rms_error(result[0], exact(result[1]))
            bar.update(1)
    bar.close()
    return {
        "model": f"Gaussian mixture, {len(gmm.weights)} components, sample shape {list(gmm.sample_shape)} "
        "(diffsamplers.models.gmm.default_mixture)",
        "process": setting.process_description,
        "process_name": process,
        "start": setting.start_description,
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
        "best_shipped": {str(n): r.name for n, r in best_recipes(setting.name).items() if n in nfes},
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


def format_best_shipped(report: dict[str, Any]) -> str:
    """The shipped recipe behind the ``best`` row at each NFE (empty when the model has none)."""
    shipped = report.get("best_shipped") or {}
    return "\n".join(f"best shipped at NFE {n}: {name}" for n, name in shipped.items())


def best_by_nfe(report: dict[str, Any]) -> dict[int, str]:
    """The method with the smallest error at each NFE (for summaries)."""
    out = {}
    for n in report["nfe"]:
        errs = [(m["errors"].get(str(n)), m["name"]) for m in report["methods"]]
        errs = [(e, name) for e, name in errs if e is not None and np.isfinite(e)]
        if errs:
            out[n] = min(errs)[1]
    return out
