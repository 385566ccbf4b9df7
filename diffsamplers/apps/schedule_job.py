"""The schedule-optimisation job behind ``diffsamplers schedule optimize`` and ``scripts/optimize_schedule.py``.

For a model of the registry and a solver spec: held-out initial noise and its reference samples, the solver's
error against them as the early-stopping metric, then :func:`~diffsamplers.tuning.ays_optimizer.optimize_schedule`
with a checkpoint next to the output, and the learned schedule saved (and plotted). ``dc-solver:search`` stops on
DC-Solver's own error with its ratios searched afresh for every candidate schedule
(:class:`~diffsamplers.tuning.dc_schedule_metric.SearchedDCErrorMetric`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..noise import NoiseProcess
from ..reference import REFERENCE_STEPS
from ..schedules.learned import LearnedSchedule
from ..schedules.schedule import DEFAULT_FINAL, Schedule
from ..schedules.spacing import karras, uniform_logsnr, uniform_time
from ..tuning.ays_optimizer import AYSSettings, optimize_schedule, schedule_bounds
from ..tuning.dc_schedule_metric import SearchedDCErrorMetric
from ..tuning.dc_search import PAPER_DATAPOINTS
from ..tuning.solver_error import SolverErrorMetric
from .evaluation import validation_set
from .recipes import parse_solver
from .registry import ModelBundle, load_model

__all__ = ["StoppingRule", "comparison_schedules", "optimize_for_model"]


@dataclass(frozen=True)
class StoppingRule:
    """The first stage's early-stopping signal: ``solver``'s error on ``metric_samples`` held-out noises (seed
    ``metric_seed``) against their reference, with the schedule ending by ``final`` as it will be run (the solver
    spec's ``final_step`` included); ``dc-solver:search`` searches ratios on ``search_samples`` others. With the
    settings' ``objective="error"`` the search itself minimises the same error on ``fit_samples`` other noises (seed
    ``fit_seed``), and both leave out samples with more than ``outlier`` times the median sample's error
    (:func:`stopping_metric`, :class:`~diffsamplers.tuning.solver_error.SolverErrorMetric`)."""

    solver: str = "dpm++2m"
    metric_samples: int = 256
    metric_seed: int = 1_000_003
    reference_steps: int = REFERENCE_STEPS
    search_samples: int = PAPER_DATAPOINTS
    final: str = DEFAULT_FINAL
    fit_samples: int = 256
    fit_seed: int = 2_000_003
    outlier: float | None = 20.0


def stopping_metric(
    bundle: ModelBundle, rule: StoppingRule, device: str, role: str = "stop", error_objective: bool = False
) -> SolverErrorMetric:
    """The solver's RMS error as a function of the schedule's levels (see :class:`StoppingRule`): on the rule's
    held-out noises (``role="stop"``) or its fitting noises (``"fit"``). With ``error_objective`` (the search
    minimises this error) outliers are left out — the fit's fixed by the starting schedule, so a schedule pays for
    the noises it sends astray; the stopping rule's each schedule's own, so a chance flip does not end the search."""
    if rule.reference_steps <= 0:
        raise ValueError("the early-stopping metric needs a reference: reference_steps must be > 0")
    if role not in ("stop", "fit"):
        raise ValueError(f"role must be 'stop' or 'fit', got {role!r}")
    samples, seed = (rule.metric_samples, rule.metric_seed) if role == "stop" else (rule.fit_samples, rule.fit_seed)
    held_out = validation_set(bundle, samples, seed, device=device, reference_steps=rule.reference_steps)
    assert held_out.reference is not None
    recipe = parse_solver(rule.solver)
    if recipe.searches_ratios:
        search = bundle.draw(rule.search_samples, seed + 7, device=device)
        return SearchedDCErrorMetric(
            bundle.denoiser,
            recipe.build(search=lambda _solver: None),  # the metric searches the ratios for every schedule
            held_out.x_T,
            held_out.reference,
            search.x_T,
            model_id=bundle.name,
            cond_search=search.cond,
            reference_steps=rule.reference_steps,
            cond=held_out.cond,
            final=rule.final,
        )
    solver = recipe.build(nfe=None, folder=bundle.folder)
    return SolverErrorMetric(
        bundle.denoiser,
        solver,
        held_out.x_T,
        held_out.reference,
        cond=held_out.cond,
        final=rule.final,  # type: ignore[arg-type]
        outlier=rule.outlier if error_objective else None,
        fixed_outliers=role == "fit",
    )


def optimize_for_model(
    model: str,
    nfe: int,
    out: str | Path,
    settings: AYSSettings | None = None,
    rule: StoppingRule | None = None,
    *,
    checkpoint: str | Path | None = None,
    resume: bool = True,
    plot: str | Path | None = None,
    data: str | None = None,
    device: str | None = None,
    log: Callable[[str], Any] | None = print,
) -> LearnedSchedule:
    """Optimise a schedule for ``model`` whose first stage has ``nfe`` steps (unless ``settings`` says otherwise),
    stopping on ``rule``; save it to ``out`` (safetensors, with a checkpoint beside it) and optionally plot it."""
    bundle = load_model(model, device=device, data=data or None)
    if bundle.data is None:
        raise ValueError(f"model {model!r} has no data: pass data= (a tensor file or 'sklearn-digits')")
    settings = settings or AYSSettings(num_steps=nfe)
    schedule_bounds(bundle.process, settings)  # endpoints outside the model's range fail before any computation
    rule = rule or StoppingRule()
    run_device = device or "cpu"
    error_objective = settings.objective == "error"
    metric = stopping_metric(bundle, rule, run_device, "stop", error_objective)
    objective = None
    if error_objective:
        if rule.fit_seed == rule.metric_seed:
            raise ValueError("the fitting noises must differ from the held-out ones: fit_seed equals metric_seed")
        objective = stopping_metric(bundle, rule, run_device, "fit", error_objective)
    out = Path(out)
    describe = {
        "model": model,
        "solver": rule.solver,
        "nfe": int(nfe),
        "seed": settings.seed,
        "metric_samples": rule.metric_samples,
        "final": rule.final,
        **({"fit_samples": rule.fit_samples, "outlier": rule.outlier} if objective is not None else {}),
        **({"search_samples": rule.search_samples} if isinstance(metric, SearchedDCErrorMetric) else {}),
    }
    learned = optimize_schedule(
        bundle.denoiser,
        bundle.data,
        settings,
        metric=metric,
        checkpoint=checkpoint or out.with_name(out.stem + ".checkpoint.safetensors"),
        resume=resume,
        describe=describe,
        device=run_device,
        log=log,
        objective=objective,
    )
    learned.metadata["metric"] = f"RMS error of {rule.solver} vs the {rule.reference_steps}-step reference"
    learned.save(out)
    if plot:
        _plot(bundle, learned, settings.num_steps, plot, model)
    return learned


def _plot(bundle: ModelBundle, learned: LearnedSchedule, n: int, path: str | Path, model: str) -> None:
    from .plots import plot_schedules

    process = bundle.process
    baselines = {
        "uniform time": uniform_time(process, n, final="sigma_min").sigmas,
        "uniform logSNR": uniform_logsnr(process, n, final="sigma_min").sigmas,
        "Karras ρ=7": karras(process, n, final="sigma_min").sigmas,
    }
    stages = {"AYS learned" + (f", stage {i + 1}" if i else ""): v for i, v in enumerate(learned.stages.values())}
    history = learned.metadata.get("klub_history") or learned.metadata.get("objective_history", [])
    plot_schedules(path, {**stages, **baselines}, history, f"AYS learned: {model}")


def comparison_schedules(
    process: NoiseProcess, learned: Mapping[int, LearnedSchedule]
) -> dict[str, Callable[[int], Schedule]]:
    """The schedules the AYS tables compare, by name, as builders of an n-step schedule: the hand-made ones
    (uniform time, uniform logSNR, Karras ρ = 7 ending at σ_min then 0, or with the last level replaced by 0),
    the schedule learned at each NFE, and the 10-step one (with its refinements) interpolated to n steps."""
    stages_of_10 = "→".join(map(str, sorted(learned[10].stages))) if 10 in learned else "10"
    return {
        "uniform time": lambda n: uniform_time(process, n),
        "uniform logSNR": lambda n: uniform_logsnr(process, n),
        "Karras ρ=7 (σ_min, then 0)": lambda n: karras(process, n, final="append_zero"),
        "Karras ρ=7 (last → 0)": lambda n: karras(process, n, final="zero"),
        "AYS learned at this NFE": lambda n: learned[n].schedule(n),
        f"AYS learned {stages_of_10}, interpolated": lambda n: learned[10].schedule(n),
    }
