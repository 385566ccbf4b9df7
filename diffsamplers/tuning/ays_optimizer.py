"""The Align Your Steps optimiser: a schedule that minimises the KLUB for a given model and data.

Sabour, Fidler & Kreis 2024, "Align Your Steps" (arXiv:2404.14507), Sec. 3.2–3.3, App. B.1, Alg. 1. The
objective is the sum of the per-interval KLUB (:class:`~diffsamplers.tuning.klub.KLUBEstimator`, Monte
Carlo with the model, endpoints σ_max and σ_min fixed). No official optimiser code exists; this follows the
paper's description:

* **Initialisation** — time-uniform for discrete-time models, EDM's ρ = 7 schedule otherwise (App. B.1); and
  time-uniform for rectified-flow models too, whose own samplers step uniformly in t (Liu et al. 2023; Esser et
  al. 2024 shift that grid): on σ̃ ∈ [10⁻⁶, 10⁶], the range of a diffusers flow config, EDM's 5-step schedule
  visits σ̃ = 10⁶, 2·10⁵, 3·10⁴, 2·10³ and 22 (DPM-Solver++ 2M on the bundled mixture: RMS 0.36 against
  0.08 time-uniform). ``init="best"`` (ours) starts from whichever of the standard schedules
  (:data:`STANDARD_INITS`) scores lowest on the early-stopping ``metric`` (the objective without one): a coordinate
  search ends near where it starts, and which hand-made schedule is best differs between models and step counts.
* **Coordinate-wise search** (Alg. 1) — for each interior level, 11 candidates between its neighbours (the
  current value is one of them, so the estimated KLUB never rises: the estimator uses a fixed bank of data and
  noise). Candidates are spaced in log σ̃ up to ``radius`` of the way to each neighbour, 5 on each side;
  when the current value wins, that level's radius halves (the paper does not say how the neighbourhood is
  chosen). Non-adjacent levels are independent, so each sweep updates the odd levels together, then the even
  ones, with one batched estimate each.
* **Early stopping** in the first stage — the KLUB-optimal schedule is not the KL-optimal one (App. A.3), and
  the paper stops on FID. Here a ``metric`` callable (e.g. the solver's error against a reference on held-out
  noise, :class:`~diffsamplers.metrics.SolverErrorMetric`) is evaluated after every sweep; the best sweep
  (the initialisation included) is kept and the search stops after ``patience`` sweeps without improvement.
* **The solver's own error as the objective** (ours, ``objective=`` of :func:`optimize_schedule`): the KLUB is a
  proxy, and the KLUB-optimal schedule can lose to uniform logSNR for the solver that will actually run it (a
  generated d = 768 mixture in issue 15: 2× worse at 5 and 10 steps). With ``objective(levels)`` — e.g. a
  :class:`~diffsamplers.tuning.solver_error.SolverErrorMetric` of the solver, final convention and final step as
  they will be run, on *fitting* noises — the same coordinate search minimises that error directly, one level at a
  time (the error couples all levels, so a sweep is Gauss–Seidel over the interior levels, the current value
  among the candidates so the objective never rises), and ``metric`` on *other* noises stops it. No data bank is
  needed; one stage per step count (no refinement), as the schedule is fitted per NFE. With ``teleport_from`` (the
  level the initial noise is drawn at) the top level is searched too, between the next level and ``teleport_from``:
  the objective then scores a Gaussian teleport from there to the top level followed by the solver
  (:class:`~diffsamplers.tuning.solver_error.SolverErrorMetric` with ``teleport``), so how far to teleport is
  fitted per NFE on the solver's error rather than set by a tolerance (Wang & Vastola 2024, arXiv:2412.09726).
* **Hierarchical refinement** — the schedule is subdivided at log-midpoints (10 → 20 → 40 steps by default) and
  only the new levels are optimised, until their radii shrink below ``min_radius`` (no early stopping).

Every sweep is checkpointed atomically (safetensors + JSON); an interrupted run resumes where it stopped and,
the bank being seeded, ends with the same schedule as an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..artifacts import load_artifact, save_artifact
from ..data import DataSource, take
from ..denoiser import Denoiser
from ..noise import DiscreteVP, NoiseProcess
from ..schedules.learned import LearnedSchedule
from .klub import KLUBEstimator

__all__ = [
    "AYSSettings",
    "STANDARD_INITS",
    "ScheduleBoundsError",
    "SearchState",
    "optimize_schedule",
    "initial_levels",
    "schedule_bounds",
]

_CHECKPOINT = "ays_checkpoint"
#: The hand-made schedules ``init="best"`` chooses from.
STANDARD_INITS = ("uniform_logsnr", "karras", "uniform_time")
Metric = Callable[[np.ndarray], float]


@dataclass(frozen=True)
class AYSSettings:
    """Settings of :func:`optimize_schedule` (defaults: the paper's where it gives them)."""

    num_steps: int = 10  # first stage
    refinements: int = 2  # 10 → 20 → 40
    num_samples: int = 8192
    num_candidates: int = 11
    importance_c: float = 0.5
    power: int = 1
    max_sweeps: int = 100
    refine_sweeps: int = 40
    patience: int = 3
    radius: float = 0.5
    min_radius: float = 1e-3
    init: str = "auto"  # "auto", "uniform_time", "karras", "uniform_logsnr", "best" (of those three, by the metric)
    objective: str = "klub"  # "klub" (the paper) or "error" (the objective callable of optimize_schedule)
    sigma_min: float | None = None
    sigma_max: float | None = None
    teleport_from: float | None = None  # "error" only: the top level is searched too, below this start level
    seed: int = 0
    batch_size: int = 4096

    def __post_init__(self) -> None:
        if self.num_steps < 2:
            raise ValueError(f"num_steps must be at least 2 (one interior level), got {self.num_steps}")
        if self.num_candidates < 3 or self.num_candidates % 2 == 0:
            raise ValueError(f"num_candidates must be odd and >= 3, got {self.num_candidates}")
        if not 0 < self.radius < 1:
            raise ValueError(f"radius must lie in (0, 1), got {self.radius}")
        if self.refinements < 0 or self.max_sweeps < 0 or self.refine_sweeps < 0 or self.patience < 1:
            raise ValueError("refinements, max_sweeps and refine_sweeps must be >= 0 and patience >= 1")
        if self.init not in ("auto", "best", *STANDARD_INITS):
            raise ValueError(f"unknown init {self.init!r}")
        if self.objective not in ("klub", "error"):
            raise ValueError(f"unknown objective {self.objective!r}: expected 'klub' or 'error'")
        if self.objective == "error" and self.refinements:
            raise ValueError(
                f"objective 'error' fits one schedule per step count: refinements must be 0, got {self.refinements}"
            )
        if self.teleport_from is not None:
            if self.objective != "error":
                raise ValueError(
                    "teleport_from searches the top level on the solver's error: it needs objective 'error'"
                )
            if not (math.isfinite(self.teleport_from) and self.teleport_from > 0):
                raise ValueError(f"teleport_from must be a positive, finite noise level, got {self.teleport_from}")


class ScheduleBoundsError(ValueError):
    """An endpoint of the learned schedule (``name``: ``"sigma_min"`` or ``"sigma_max"``) that cannot be used."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


def schedule_bounds(process: NoiseProcess, settings: AYSSettings) -> tuple[float, float]:
    """The learned schedule's endpoints (σ_min, σ_max): the settings' or the process's;
    :class:`ScheduleBoundsError` unless 0 < σ_min < σ_max within the process's noise range."""
    hi = process.sigma_max if settings.sigma_max is None else float(settings.sigma_max)
    lo = process.sigma_min if settings.sigma_min is None else float(settings.sigma_min)
    where = f"the model's noise range [{process.sigma_min:g}, {process.sigma_max:g}] ({type(process).__name__})"
    if not (math.isfinite(lo) and lo >= process.sigma_min * (1 - 1e-9)):
        raise ScheduleBoundsError("sigma_min", f"sigma_min {lo:g} lies outside {where}")
    if not (math.isfinite(hi) and hi <= process.sigma_max * (1 + 1e-9)):
        raise ScheduleBoundsError("sigma_max", f"sigma_max {hi:g} lies outside {where}")
    if not lo < hi:
        name = "sigma_min" if settings.sigma_min is not None else "sigma_max"
        raise ScheduleBoundsError(name, f"sigma_min {lo:g} must be below sigma_max {hi:g}")
    top = settings.teleport_from
    if top is not None and not hi <= top <= process.sigma_max * (1 + 1e-9):
        raise ScheduleBoundsError(
            "sigma_max", f"teleport_from {top:g} must lie between the first level {hi:g} and the model's σ_max"
        )
    return lo, hi


def initial_levels(process: NoiseProcess, settings: AYSSettings) -> np.ndarray:
    """The first-stage starting point: n + 1 decreasing levels from σ_max to σ_min (``init="best"`` is chosen by
    :func:`optimize_schedule`, which scores the standard ones)."""
    from ..schedules.spacing import karras, uniform_logsnr, uniform_time

    lo, hi = schedule_bounds(process, settings)
    init = settings.init
    if init == "best":
        raise ValueError("init 'best' is chosen by optimize_schedule on its metric: pass one of STANDARD_INITS here")
    if init == "auto":
        init = "uniform_time" if isinstance(process, DiscreteVP) or process.scaling == "flow" else "karras"
    n = settings.num_steps
    if init == "uniform_time":
        t_hi, t_lo = process.t_from_sigma_tilde(hi), process.t_from_sigma_tilde(lo)
        levels = uniform_time(process, n, final="sigma_min", t_start=float(t_hi), t_end=float(t_lo)).sigmas
    elif init == "karras":
        levels = karras(process, n, final="sigma_min", sigma_max=hi, sigma_min=lo).sigmas
    else:
        levels = uniform_logsnr(process, n, final="sigma_min", sigma_max=hi, sigma_min=lo).sigmas
    levels = levels.copy()
    levels[0], levels[-1] = hi, lo
    return levels


def _candidates(levels: np.ndarray, i: int, radius: float, count: int, ceiling: float | None = None) -> np.ndarray:
    """The current level first, then (count − 1)/2 candidates towards each neighbour, spaced in log σ (the top level,
    ``i`` = 0, moves between the next level and ``ceiling``)."""
    above = levels[i - 1] if i > 0 else ceiling
    if above is None:
        raise ValueError("the top level moves only below a ceiling (AYSSettings.teleport_from)")
    cur, lo, hi = math.log(levels[i]), math.log(levels[i + 1]), math.log(above)
    half = (count - 1) // 2
    steps = np.arange(1, half + 1) / half * radius
    return np.exp(np.concatenate([[cur], cur - steps * (cur - lo), cur + steps * (hi - cur)]))


class _ErrorObjective:
    """The ``objective`` callable of :func:`optimize_schedule` (e.g. a solver's error on fitting noises)."""

    def __init__(self, fn: Metric):
        self.fn = fn
        self.evaluations = 0

    def total(self, levels: np.ndarray) -> float:
        self.evaluations += 1
        value = float(self.fn(np.asarray(levels, dtype=np.float64)))
        if math.isnan(value):
            raise ValueError(f"the schedule objective returned NaN for levels {np.asarray(levels).tolist()}")
        return value


def _search_error(
    levels: np.ndarray,
    indices: list[int],
    radii: np.ndarray,
    est: _ErrorObjective,
    count: int,
    ceiling: float | None = None,
) -> tuple[np.ndarray, bool]:
    """Gauss–Seidel coordinate update of ``indices`` in turn on a non-separable objective (index 0, the top level,
    below ``ceiling``)."""
    out, moved = levels.copy(), False
    for i in indices:
        cands = _candidates(out, i, radii[i], count, ceiling)
        values = []
        for m in cands:
            trial = out.copy()
            trial[i] = m
            values.append(est.total(trial))
        j = int(np.argmin(values))  # ties keep the current value (index 0)
        if j == 0:
            radii[i] *= 0.5
        else:
            out[i] = cands[j]
            moved = True
    return out, moved


def _search(
    levels: np.ndarray, indices: list[int], radii: np.ndarray, est: KLUBEstimator, count: int
) -> tuple[np.ndarray, bool]:
    """One batched coordinate update of mutually non-adjacent ``indices``; returns (levels, whether any moved)."""
    if not indices:
        return levels, False
    cands = {i: _candidates(levels, i, radii[i], count) for i in indices}
    pairs = []
    for i in indices:
        for m in cands[i]:
            pairs += [(levels[i + 1], m), (m, levels[i - 1])]
    values = est.estimate(pairs).reshape(len(indices), count, 2).sum(-1)
    out, moved = levels.copy(), False
    for row, i in enumerate(indices):
        j = int(np.argmin(values[row]))  # ties keep the current value (index 0)
        if j == 0:
            radii[i] *= 0.5
        else:
            out[i] = cands[i][j]
            moved = True
    return out, moved


def _refine(levels: np.ndarray) -> np.ndarray:
    """Insert the log-midpoint of every interval (Sec. 3.3)."""
    mids = np.sqrt(levels[:-1] * levels[1:])
    out = np.empty(2 * levels.size - 1)
    out[0::2], out[1::2] = levels, mids
    return out


def _config_key(settings: AYSSettings, describe: dict[str, Any]) -> dict[str, Any]:
    return {"settings": asdict(settings), "describe": describe}


@dataclass
class SearchState:
    """Where an optimisation stands (what a checkpoint holds): the stage and sweep, the current levels and their
    search radii, the first stage's best levels by the metric, the finished stages, and the histories."""

    stage: int
    sweep: int
    levels: np.ndarray
    best: np.ndarray
    radii: np.ndarray
    stages: dict[int, np.ndarray]
    klub: list[float]
    metric: list[float]
    best_metric: float | None
    since_best: int
    elapsed: float

    @classmethod
    def start(cls, levels: np.ndarray, settings: AYSSettings, klub: float, metric: float | None) -> SearchState:
        return cls(
            stage=0,
            sweep=0,
            levels=levels,
            best=levels.copy(),
            radii=np.full(levels.size, settings.radius),
            stages={},
            klub=[klub],
            metric=[] if metric is None else [metric],
            best_metric=metric,
            since_best=0,
            elapsed=0.0,
        )


@dataclass
class _Run:
    """What the steps of one optimisation share."""

    settings: AYSSettings
    estimator: KLUBEstimator | _ErrorObjective
    metric: Metric | None
    checkpoint: str | Path | None
    key: dict[str, Any]
    say: Callable[[str], None]

    def save(self, state: SearchState) -> None:
        _save_checkpoint(self.checkpoint, self.key, state)


def optimize_schedule(
    denoiser: Denoiser,
    data: DataSource,
    settings: AYSSettings | None = None,
    metric: Metric | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = True,
    describe: dict[str, Any] | None = None,
    device: str | torch.device | None = None,
    log: Callable[[str], None] | None = print,
    objective: Metric | None = None,
) -> LearnedSchedule:
    """Optimise a schedule for ``denoiser`` on ``data`` (see the module docstring).

    Args:
        denoiser: the model (with its noise process).
        data: clean samples: a tensor, ``(samples, labels)``, or a stream of batches (the first
            ``num_samples`` are used; a smaller data set is cycled, each copy with fresh noise).
        settings: :class:`AYSSettings`.
        metric: early-stopping signal for the first stage, ``metric(levels) -> float`` (lower is better).
        checkpoint: file for per-sweep checkpoints; with ``resume`` an existing one with the same settings
            and ``describe`` is continued.
        describe: what is being optimised (model name, solver, NFE, …), stored in the result's metadata.
        objective: with ``settings.objective == "error"``, the function minimised in place of the KLUB,
            ``objective(levels) -> float`` (the solver's error on fitting noises; ``data`` is then unused). Pass a
            ``metric`` on other noises to stop on held-out data.
    """
    settings = settings or AYSSettings()
    describe = dict(describe or {})
    if (objective is not None) != (settings.objective == "error"):
        raise ValueError("pass objective= exactly when settings.objective is 'error'")
    estimator: KLUBEstimator | _ErrorObjective
    if objective is not None:
        estimator = _ErrorObjective(objective)
    else:
        x0, cond = _bank_data(data, settings)
        estimator = KLUBEstimator(
            denoiser,
            x0,
            cond,
            seed=settings.seed,
            importance_c=settings.importance_c,
            power=settings.power,
            batch_size=settings.batch_size,
            device=device,
        )
    run = _Run(settings, estimator, metric, checkpoint, _config_key(settings, describe), log or (lambda _: None))
    started = time.time()
    state = _load_checkpoint(checkpoint, run.key) if (checkpoint and resume) else None
    if state is None:
        state = _initial_state(run, denoiser.process)
    else:
        run.say(f"resuming from {checkpoint}: stage {state.stage}, sweep {state.sweep}")
    while state.stage <= settings.refinements:
        if _stage_finished(run, state):
            _next_stage(run, state)
        else:
            _sweep(run, state)
            state.elapsed += time.time() - started
            started = time.time()
            run.save(state)
    process = denoiser.process
    klub = objective is None
    metadata = {
        **describe,
        "method": "Align Your Steps (Sabour et al. 2024), "
        + ("KLUB coordinate search" if klub else "coordinate search on the solver's error"),
        "process": process.to_config() if not isinstance(process, DiscreteVP) else _short_config(process),
        "settings": asdict(settings),
        ("klub_history" if klub else "objective_history"): [float(v) for v in state.klub],
        "metric_history": [float(v) for v in state.metric],
        ("stage_klub" if klub else "stage_objective"): {str(n): estimator.total(v) for n, v in state.stages.items()},
        "model_evaluations_this_run": estimator.evaluations,
        "seconds": round(state.elapsed + time.time() - started, 1),
    }
    return LearnedSchedule(state.stages, metadata)


def _start_levels(run: _Run, process: NoiseProcess) -> tuple[np.ndarray, float | None]:
    """The settings' initial levels and their metric (None without one); for ``init="best"`` the standard schedule
    with the smallest metric (objective)."""
    if run.settings.init != "best":
        levels = initial_levels(process, run.settings)
        return levels, run.metric(levels) if run.metric else None
    judge = run.metric or run.estimator.total
    options = {init: initial_levels(process, replace(run.settings, init=init)) for init in STANDARD_INITS}
    scores = {init: float(judge(levels)) for init, levels in options.items()}
    chosen = min(scores, key=lambda init: scores[init])
    run.say("init best: " + ", ".join(f"{k} {v:.6g}" for k, v in scores.items()) + f" -> {chosen}")
    return options[chosen], scores[chosen] if run.metric else None


def _initial_state(run: _Run, process: NoiseProcess) -> SearchState:
    levels, value = _start_levels(run, process)
    state = SearchState.start(levels, run.settings, run.estimator.total(levels), value)
    name = "KLUB" if isinstance(run.estimator, KLUBEstimator) else "objective"
    run.say(f"init ({run.settings.init}): {name} {state.klub[0]:.6g}" + (f", metric {value:.6g}" if run.metric else ""))
    run.save(state)
    return state


def _movable(state: SearchState, settings: AYSSettings) -> list[int]:
    """The levels a sweep moves: every interior one in the first stage (and the top one with ``teleport_from``), the
    new (odd) ones in a refinement."""
    n = state.levels.size - 1
    if state.stage:
        return list(range(1, n, 2))
    return list(range(0 if settings.teleport_from is not None else 1, n))


def _stage_finished(run: _Run, state: SearchState) -> bool:
    first = state.stage == 0
    limit = run.settings.max_sweeps if first else run.settings.refine_sweeps
    if state.sweep >= limit or max(state.radii[_movable(state, run.settings)]) < run.settings.min_radius:
        return True
    return first and run.metric is not None and state.since_best >= run.settings.patience


def _sweep(run: _Run, state: SearchState) -> None:
    """One coordinate sweep (odd then even levels in the first stage, the new levels in a refinement), then the
    KLUB and, in the first stage, the early-stopping metric."""
    movable, count = _movable(state, run.settings), run.settings.num_candidates
    if isinstance(run.estimator, _ErrorObjective):
        levels, _ = _search_error(state.levels, movable, state.radii, run.estimator, count, run.settings.teleport_from)
    elif state.stage == 0:
        levels, _ = _search(state.levels, movable[0::2], state.radii, run.estimator, count)
        levels, _ = _search(levels, movable[1::2], state.radii, run.estimator, count)
    else:
        levels, _ = _search(state.levels, movable, state.radii, run.estimator, count)
    state.levels, state.sweep = levels, state.sweep + 1
    klub = run.estimator.total(levels)
    state.klub.append(klub)
    n = levels.size - 1
    name = "KLUB" if isinstance(run.estimator, KLUBEstimator) else "objective"
    msg = f"stage {state.stage} ({n} steps) sweep {state.sweep}: {name} {klub:.6g}, max radius {max(state.radii[movable]):.3g}"
    if state.stage == 0 and run.metric is not None:
        value = run.metric(levels)
        state.metric.append(value)
        if state.best_metric is None or value < state.best_metric:
            state.best_metric, state.best, state.since_best = value, levels.copy(), 0
        else:
            state.since_best += 1
        msg += f", metric {value:.6g} (best {state.best_metric:.6g})"
    run.say(msg)


def _next_stage(run: _Run, state: SearchState) -> None:
    """Keep the finished stage's result (the first stage's best by the metric) and subdivide it for the next."""
    settings = run.settings
    result = state.best if state.stage == 0 and run.metric is not None else state.levels
    steps = settings.num_steps * 2**state.stage
    state.stages[steps] = result.copy()
    finished, state.stage, state.sweep = state.stage, state.stage + 1, 0
    if state.stage <= settings.refinements:
        state.levels = _refine(result)
        state.radii = np.full(state.levels.size, settings.radius)
        state.klub.append(run.estimator.total(state.levels))
    run.save(state)
    run.say(f"stage {finished} done: {steps} steps, KLUB {run.estimator.total(result):.6g}")


def _short_config(process: DiscreteVP) -> dict[str, Any]:
    cfg = process.to_config()
    if "alphas_cumprod" in cfg:
        cfg = {"type": cfg["type"], "num_train_timesteps": process.num_train_timesteps}
    return cfg


def _bank_data(data: DataSource, settings: AYSSettings) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """``num_samples`` data samples; a smaller tensor data set is cycled (each copy gets its own noise)."""
    n = settings.num_samples
    if isinstance(data, torch.Tensor) or (isinstance(data, tuple) and isinstance(data[0], torch.Tensor)):
        total = (data if isinstance(data, torch.Tensor) else data[0]).shape[0]
        x0, cond = take(data, min(n, total), seed=settings.seed)
        if total < n:
            reps = -(-n // total)
            x0 = x0.repeat(reps, *([1] * (x0.ndim - 1)))[:n]
            cond = None if cond is None else {k: v.repeat(reps)[:n] for k, v in cond.items()}
        return x0, cond
    return take(data, n, seed=None)


def _save_checkpoint(path: str | Path | None, key: dict[str, Any], state: SearchState) -> None:
    if path is None:
        return
    tensors = {
        "levels": torch.from_numpy(state.levels.copy()),
        "best": torch.from_numpy(state.best.copy()),
        "radii": torch.from_numpy(state.radii.copy()),
        **{f"stage_{n}": torch.from_numpy(v.copy()) for n, v in state.stages.items()},
    }
    meta = {
        "kind": _CHECKPOINT,
        "key": key,
        **{k: getattr(state, k) for k in ("stage", "sweep", "best_metric", "since_best", "elapsed")},
        "klub": [float(v) for v in state.klub],
        "metric": [float(v) for v in state.metric],
    }
    save_artifact(path, tensors, meta)


def _load_checkpoint(path: str | Path, key: dict[str, Any]) -> SearchState | None:
    if not Path(path).is_file():
        return None
    tensors, meta = load_artifact(path, _CHECKPOINT)
    if meta["key"] != key:
        raise ValueError(
            f"checkpoint {path} was written for other settings or another model; remove it or pass resume=False "
            f"(it has {meta['key']}, this run {key})"
        )
    stages = {int(k.split("_", 1)[1]): v.double().numpy() for k, v in tensors.items() if k.startswith("stage_")}
    return SearchState(
        stages=stages,
        **{name: tensors[name].double().numpy() for name in ("levels", "best", "radii")},
        **{k: meta[k] for k in ("stage", "sweep", "best_metric", "since_best", "elapsed", "klub", "metric")},
    )
