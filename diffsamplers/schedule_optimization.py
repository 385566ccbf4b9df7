"""The schedule-optimisation job behind ``diffsamplers schedule optimize`` and ``scripts/optimize_schedule.py``.

For a named model (:mod:`diffsamplers.models.registry`) and solver: held-out initial noise, its reference
solution (exact for the Gaussian mixture, a 1,000-step run otherwise), the solver's error against it as the
early-stopping metric, then :func:`~diffsamplers.schedules.ays_optimizer.optimize_schedule` with a
checkpoint next to the output, and the learned schedule saved (and plotted).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .dc.schedule_metric import SearchedDCErrorMetric
from .dc.search import PAPER_DATAPOINTS
from .evaluation.solver_error import SolverErrorMetric, initial_noise, validation_set
from .models.registry import load_model
from .schedules.ays_learned import LearnedSchedule, plot_schedules
from .schedules.ays_optimizer import AYSSettings, optimize_schedule
from .solvers.dc_solver import DCSolver
from .solvers.registry import make_solver

#: The solver name whose schedule is judged by DC-Solver with ratios searched for each candidate.
DC_SOLVER = "dc-solver"

__all__ = ["optimize_for_model", "DC_SOLVER"]


def optimize_for_model(
    model: str,
    solver: str,
    nfe: int,
    out: str | Path,
    settings: AYSSettings | None = None,
    metric_samples: int = 256,
    metric_seed: int = 1_000_003,
    reference_steps: int = 1000,
    search_samples: int = PAPER_DATAPOINTS,
    checkpoint: str | Path | None = None,
    resume: bool = True,
    plot: str | Path | None = None,
    data: str | None = None,
    device: str | None = None,
    log: Any = print,
) -> LearnedSchedule:
    """Optimise, save to ``out`` (safetensors), optionally plot; returns the learned schedule.

    The first stage has ``nfe`` steps unless ``settings`` says otherwise; its early-stopping metric is
    ``solver``'s RMS error at that many steps against the reference of ``metric_samples`` held-out noises.
    ``solver="dc-solver"``: DC-Solver (UniPC bh2 base) with its ratios searched afresh, on ``search_samples``
    other noises, for every schedule the metric scores (:class:`~diffsamplers.dc.schedule_metric.SearchedDCErrorMetric`).
    """
    bundle = load_model(model, device=device, data=data or None)
    if bundle.data is None:
        raise ValueError(f"model {model!r} has no data: pass data= (a tensor file or 'sklearn-digits')")
    settings = settings or AYSSettings(num_steps=nfe)
    run_device = device or "cpu"
    val = validation_set(bundle, metric_samples, metric_seed, run_device, reference_steps)
    if val.reference is None:
        raise ValueError("the early-stopping metric needs a reference: reference_steps must be > 0")
    metric: SolverErrorMetric
    if solver == DC_SOLVER:
        x_search, cond_search = initial_noise(bundle, search_samples, metric_seed + 7, run_device)
        metric = SearchedDCErrorMetric(
            bundle.denoiser,
            DCSolver(),
            val.x_T,
            val.reference,
            x_search,
            model_id=model,
            cond_search=cond_search,
            reference_steps=reference_steps,
            cond=val.cond,
        )
    else:
        metric = SolverErrorMetric(bundle.denoiser, make_solver(solver), val.x_T, val.reference, cond=val.cond)
    out = Path(out)
    checkpoint = checkpoint or out.with_name(out.stem + ".checkpoint.safetensors")
    describe = {
        "model": model,
        "solver": solver,
        "nfe": int(nfe),
        "seed": settings.seed,
        "metric_samples": metric_samples,
        **({"search_samples": search_samples} if solver == DC_SOLVER else {}),
    }
    learned = optimize_schedule(
        bundle.denoiser,
        bundle.data,
        settings,
        metric=metric,
        checkpoint=checkpoint,
        resume=resume,
        describe=describe,
        device=run_device,
        log=log,
    )
    learned.metadata["metric"] = (
        f"RMS error of {solver} vs {'exact' if bundle.exact_reference else f'{reference_steps}-step'} reference"
    )
    learned.save(out)
    if plot:
        process = bundle.denoiser.process
        from .schedules.spacing import karras, uniform_logsnr, uniform_time

        n = settings.num_steps
        baselines = {
            "uniform time": uniform_time(process, n, final="sigma_min").sigmas,
            "uniform logSNR": uniform_logsnr(process, n, final="sigma_min").sigmas,
            "Karras ρ=7": karras(process, n, final="sigma_min").sigmas,
        }
        learned_levels = {
            "AYS learned" + (f", stage {i + 1}" if i else ""): v for i, v in enumerate(learned.stages.values())
        }
        plot_schedules(plot, {**learned_levels, **baselines}, learned.metadata["klub_history"], f"AYS learned: {model}")
    return learned
