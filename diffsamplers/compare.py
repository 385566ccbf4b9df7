"""``diffsamplers compare``: each solver's error against the exact probability-flow ODE solution.

On the bundled Gaussian mixture (exact denoiser, :mod:`diffsamplers.models.gmm`) every method starts from
the same x_T at σ̃(t = 999) and is compared with SciPy's solution of the same ODE (rtol 1e-10) at the
method's final noise level. Our solvers and diffusers' own schedulers run side by side on the same
ε-prediction network, each with its usual schedule; the table reports the RMS error per NFE.

DC-Solver's ratios are searched per NFE (:func:`diffsamplers.dc.search.search_dc_ratios`, 20 iterations
per step as the official diffusers version) on 10 other noises against a 1,000-step reference; they are
then scored like every other method.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .denoiser import Denoiser
from .models.gmm import GaussianMixture, default_mixture, default_process, reference_solution
from .noise import DiscreteVP
from .sampling import sample
from .schedules.schedule import Schedule
from .schedules.spacing import diffusers_spacing, uniform_logsnr
from .solvers.base import Solver
from .solvers.dc_solver import DCSolver
from .solvers.ddim import DDIM
from .solvers.dpm_solver_pp import DPMSolverPlusPlus
from .solvers.dpm_solver_pp_singlestep import DPMSolverPlusPlusSinglestep
from .solvers.unipc import UniPC

__all__ = ["DEFAULT_NFES", "Method", "default_methods", "run_compare", "format_table", "write_plot"]

DEFAULT_NFES = (5, 6, 8, 10, 15, 20, 50)

#: A method takes (NFE, x_T) and returns the final sample and its final σ̃, or None if it cannot spend
#: exactly that many model evaluations.
Runner = Callable[[int, torch.Tensor], "tuple[torch.Tensor, float] | None"]


@dataclass
class Method:
    name: str
    library: str
    run: Runner
    notes: str = ""
    errors: dict[int, float | None] = field(default_factory=dict)


def _ours(name: str, solver: Solver, schedule: Callable[[int], Schedule], denoiser: Denoiser, notes: str) -> Method:
    def run(nfe: int, x_T: torch.Tensor) -> tuple[torch.Tensor, float]:
        sched = schedule(nfe)
        return sample(denoiser, solver, sched, x_T=x_T, progress=False), sched.final_sigma

    return Method(name, "diffsamplers", run, notes)


def _dc_searched(
    name: str, solver: DCSolver, schedule: Callable[[int], Schedule], denoiser: Denoiser, seed: int, notes: str
) -> Method:
    """DC-Solver with ratios searched for each NFE on 10 noises of their own (seed ``seed``)."""
    from .dc.search import PAPER_DATAPOINTS, search_dc_ratios

    def run(nfe: int, x_T: torch.Tensor) -> tuple[torch.Tensor, float]:
        sched = schedule(nfe)
        g = torch.Generator().manual_seed(seed)
        datapoints = torch.randn((PAPER_DATAPOINTS, *x_T.shape[1:]), generator=g)
        found = search_dc_ratios(denoiser, solver, sched, datapoints, model_id="gmm", iterations=20)
        return sample(denoiser, solver.with_ratios(found.ratios), sched, x_T=x_T, progress=False), sched.final_sigma

    return Method(name, "diffsamplers", run, notes)


def _diffusers(
    name: str,
    scheduler: Any,
    model: torch.nn.Module,
    process: DiscreteVP,
    steps_for_nfe: Callable[[int], int | None],
    notes: str,
) -> Method:
    """Run a diffusers scheduler the way its pipelines do (``init_noise_sigma``, ``scale_model_input``)."""

    def run(nfe: int, x_T: torch.Tensor) -> tuple[torch.Tensor, float] | None:
        steps = steps_for_nfe(nfe)
        if steps is None:
            return None
        scheduler.set_timesteps(steps)
        # The same x_T in the scheduler's own scaling: VE-type schedulers (Euler, Heun) work on x/α.
        sigma_t = float(process.sigma_tilde(float(scheduler.timesteps[0])))
        scale = (
            float(scheduler.init_noise_sigma) if float(scheduler.init_noise_sigma) == 1.0 else math.sqrt(1 + sigma_t**2)
        )
        x = x_T * scale
        for t in scheduler.timesteps:
            with torch.no_grad():
                out = model(scheduler.scale_model_input(x, t), t).sample
            x = scheduler.step(out, t, x).prev_sample
        final = float(scheduler.sigmas[-1]) if hasattr(scheduler, "sigmas") else 0.0
        return x, final

    return Method(name, "diffusers", run, notes)


def default_methods(gmm: GaussianMixture, process: DiscreteVP) -> list[Method]:
    """Our solvers on diffusers' default grid (and a uniform-logSNR grid), and diffusers' schedulers."""
    import diffusers

    eps_model = gmm.as_model(process, "epsilon")
    denoiser = Denoiser(eps_model, process, "epsilon")
    linspace = lambda n: diffusers_spacing(process, n, "linspace", final="zero")  # noqa: E731
    logsnr = lambda n: uniform_logsnr(process, n, final="zero")  # noqa: E731
    grid = "linspace timesteps, final σ = 0"
    methods = [
        _ours("DDIM", DDIM(), linspace, denoiser, grid),
        _ours("DPM-Solver++ 2M", DPMSolverPlusPlus(2), linspace, denoiser, grid),
        _ours("DPM-Solver++ 3M", DPMSolverPlusPlus(3), linspace, denoiser, grid + ", Taylor third-order term"),
        _ours(
            "DPM-Solver++ 3M (reference)",
            DPMSolverPlusPlus(3, third_order="reference"),
            linspace,
            denoiser,
            grid + ", the official/diffusers third-order term",
        ),
        _ours("DPM-Solver++ 2S", DPMSolverPlusPlusSinglestep(2), linspace, denoiser, grid),
        _ours("DPM-Solver++ 3S", DPMSolverPlusPlusSinglestep(3), linspace, denoiser, grid),
        _ours("UniPC (bh2)", UniPC(2, "bh2"), linspace, denoiser, grid),
        _dc_searched(
            "DC-Solver (bh2, searched)",
            DCSolver(base=UniPC(2, "bh2")),
            linspace,
            denoiser,
            12345,
            grid + ", ratios searched per NFE on 10 other noises (seed 12345)",
        ),
        _ours("DPM-Solver++ 2M, logSNR", DPMSolverPlusPlus(2), logsnr, denoiser, "uniform logSNR, final σ = 0"),
        _ours("DPM-Solver++ 3M, logSNR", DPMSolverPlusPlus(3), logsnr, denoiser, "uniform logSNR, final σ = 0"),
    ]
    base = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}
    same = lambda n: n  # noqa: E731
    heun = lambda n: (n + 1) // 2 if n % 2 == 1 else None  # noqa: E731
    methods += [
        _diffusers(
            "diffusers DDIM",
            diffusers.DDIMScheduler(**base, timestep_spacing="trailing", set_alpha_to_one=True),
            eps_model,
            process,
            same,
            "trailing",
        ),
        _diffusers("diffusers Euler", diffusers.EulerDiscreteScheduler(**base), eps_model, process, same, "defaults"),
        _diffusers(
            "diffusers Heun",
            diffusers.HeunDiscreteScheduler(**base),
            eps_model,
            process,
            heun,
            "NFE = 2·steps − 1 (odd NFE only)",
        ),
        _diffusers(
            "diffusers DPM-Solver++ 2M",
            diffusers.DPMSolverMultistepScheduler(**base),
            eps_model,
            process,
            same,
            "defaults",
        ),
        _diffusers(
            "diffusers DPM-Solver++ 3M",
            diffusers.DPMSolverMultistepScheduler(**base, solver_order=3),
            eps_model,
            process,
            same,
            "solver_order=3",
        ),
        _diffusers(
            "diffusers DPM-Solver++ 2S",
            diffusers.DPMSolverSinglestepScheduler(**base),
            eps_model,
            process,
            same,
            "defaults",
        ),
        _diffusers(
            "diffusers UniPC (bh2)", diffusers.UniPCMultistepScheduler(**base), eps_model, process, same, "defaults"
        ),
        _diffusers(
            "diffusers DEIS",
            diffusers.DEISMultistepScheduler(**base),
            eps_model,
            process,
            same,
            "defaults, ends at σ_min",
        ),
    ]
    return methods


def run_compare(
    nfes: Sequence[int] = DEFAULT_NFES,
    num_samples: int = 64,
    seed: int = 0,
    gmm: GaussianMixture | None = None,
    process: DiscreteVP | None = None,
    methods: list[Method] | None = None,
    select: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every method at every NFE; returns a JSON-ready report."""
    import diffusers

    from . import __version__

    gmm = gmm or default_mixture()
    process = process or default_process()
    methods = methods if methods is not None else default_methods(gmm, process)
    if select:
        methods = [m for m in methods if select.lower() in m.name.lower()]
        if not methods:
            raise ValueError(f"no method matches {select!r}")
    nfes = [int(n) for n in nfes]
    if any(n <= 0 for n in nfes):
        raise ValueError(f"NFEs must be positive, got {nfes}")
    x_T = torch.randn(num_samples, *gmm.sample_shape, generator=torch.Generator().manual_seed(seed))
    sigma_start = float(process.sigma_max)
    references: dict[float, torch.Tensor] = {}

    def reference(final: float) -> torch.Tensor:
        key = round(final, 12)
        if key not in references:
            references[key] = reference_solution(gmm, process, x_T.double(), sigma_start, final)
        return references[key]

    bar = tqdm(total=len(methods) * len(nfes), desc="compare", disable=not progress)
    for method in methods:
        for nfe in nfes:
            result = method.run(nfe, x_T)
            if result is None:
                method.errors[nfe] = None
            else:
                x, final = result
                method.errors[nfe] = float((x.double() - reference(final)).pow(2).mean().sqrt())
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
            {"name": m.name, "library": m.library, "notes": m.notes, "errors": {str(k): v for k, v in m.errors.items()}}
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


def write_plot(report: dict[str, Any], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for m in report["methods"]:
        pts = [(int(k), v) for k, v in m["errors"].items() if v is not None]
        if not pts:
            continue
        xs, ys = zip(*sorted(pts))
        style = "-o" if m["library"] == "diffsamplers" else "--s"
        ax.loglog(
            xs, ys, style, label=m["name"], markersize=4, linewidth=1.3 if m["library"] == "diffsamplers" else 1.0
        )
    ax.set_xlabel("NFE (model evaluations)")
    ax.set_ylabel("RMS error vs exact PF-ODE solution")
    ax.set_title("Solver error on the bundled Gaussian mixture")
    ax.set_xticks(report["nfe"], [str(n) for n in report["nfe"]])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_json(report: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(json.dumps(report, indent=2))


def best_by_nfe(report: dict[str, Any]) -> dict[int, str]:
    """The method with the smallest error at each NFE (for summaries)."""
    out = {}
    for n in report["nfe"]:
        errs = [(m["errors"].get(str(n)), m["name"]) for m in report["methods"]]
        errs = [(e, name) for e, name in errs if e is not None and np.isfinite(e)]
        if errs:
            out[n] = min(errs)[1]
    return out
