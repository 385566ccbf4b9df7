"""Evaluating DC-Solver against its baselines on any model of the registry: the accuracy tables of docs/dc_solver.md.

For each guidance scale and NFE, every method starts from the same x_T (and conditions) as the reference solution
of the same guided ODE (:mod:`diffsamplers.reference`) and is scored by the difference of its final samples from
the reference's: the RMS over all samples (√MSE, the paper's metric) and the median over samples of each
sample's RMS error (:func:`diffsamplers.metrics.errors.error_summary`). The methods:

* UniPC (the DC base, default order 2, bh2), DPM-Solver++ 2M and 3M;
* DC-Solver with ratios searched (:func:`diffsamplers.tuning.dc_search.search_dc_ratios`) on separate datapoints
  (``num_search`` noises and conditions, seeds disjoint from the evaluation's);
* DC-Solver with ratios predicted by a cascade polynomial regression fitted on the *other* searched
  configurations (leave-one-out: the configuration scored was never searched for the fit), for NFEs inside the
  searched range (CPR interpolates; extrapolating a quadratic in the NFE is not meaningful), and for ``unseen``
  (NFE, scale) configurations off the grid, predicted from a fit on the whole grid;
* optionally DC-Solver with the searched ratios refined jointly on the whole trajectory (``refine_iterations``;
  the iterate kept by the trajectory loss on ``num_validation`` other noises, ``refine_unvalidated`` for the
  unvalidated refinement that overfits the search noises);
* optionally DC as a plug-in on DPM-Solver++ 2M.

The model's sample metrics (FD-digits for the digits model) are reported next to the errors.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..metrics.errors import error_summary
from ..reference import REFERENCE_STEPS, reference_description, reference_trajectories
from ..sampling import sample
from ..schedules.schedule import Schedule
from ..solvers.base import Solver
from ..solvers.dc_cpr import CascadePolynomialRegression
from ..solvers.dc_ratios import DCRatios, schedule_description
from ..solvers.dc_solver import DCSolver
from ..solvers.dpm_solver_pp import DPMSolverPlusPlus
from ..solvers.unipc import UniPC
from ..tuning.dc_search import ON_SEARCH_NOISES, PAPER_DATAPOINTS, REFINE_PATIENCE, search_dc_ratios
from .recipes import parse_schedule
from .registry import Draw, ModelBundle

__all__ = ["DCEvaluation", "evaluate_dc", "format_tables", "SEARCHED", "REFINED"]

#: The default number of validation noises of the joint refinement (drawn with seed ``seed + 3``).
REFINE_VALIDATION = 32
SEARCHED = "DC-Solver (searched)"
REFINED = "DC-Solver (searched + joint refinement)"
PLUG_IN = "DC on DPM-Solver++ 2M (searched)"


@dataclass(frozen=True)
class DCEvaluation:
    """What :func:`evaluate_dc` measures: the grid (``nfes`` × ``guidance_scales`` and the ``unseen`` off-grid
    configurations), the data (``num_eval`` scored, ``num_search`` search noises), the schedule spec, the
    reference and search budgets, and the optional rows."""

    nfes: Sequence[int] = (5, 6, 8, 10)
    guidance_scales: Sequence[float] = (1.0,)
    unseen: Sequence[tuple[int, float]] = ()
    num_eval: int = 64
    num_search: int = PAPER_DATAPOINTS
    seed: int = 0
    schedule: str = "linspace/sigma_min"
    plug_in: bool = False
    cpr: bool = True
    reference_steps: int = REFERENCE_STEPS
    iterations: int = 40
    refine_iterations: int = 0
    num_validation: int = REFINE_VALIDATION
    refine_patience: int | None = REFINE_PATIENCE
    refine_unvalidated: bool = False
    ratio_dir: str | os.PathLike | None = None
    batch_size: int | None = None
    sample_metrics: bool = True

    def grid(self) -> list[tuple[int, float]]:
        return [(int(n), float(g)) for g in self.guidance_scales for n in self.nfes]

    def off_grid(self) -> list[tuple[int, float]]:
        grid = self.grid()
        return [(int(n), float(g)) for n, g in self.unseen if (int(n), float(g)) not in grid]


@dataclass
class _Config:
    """One (NFE, guidance scale) of an evaluation: its grid, data and references."""

    nfe: int
    scale: float
    unseen: bool
    schedule: Schedule
    search: Draw
    scored: Draw
    reference: torch.Tensor | None = None  # the reference's final samples of the scored noises
    search_reference: torch.Tensor | None = None  # the reference trajectory of the search noises
    validation: Draw | None = None  # the joint refinement's validation noises
    validation_reference: torch.Tensor | None = None  # and their reference trajectory


@dataclass
class Row:
    """The results of one configuration (a row of the report's JSON)."""

    guidance_scale: float
    nfe: int
    unseen: bool
    errors: dict[str, float] = field(default_factory=dict)
    median_errors: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    ratios: list[float] = field(default_factory=list)
    search_seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(out.pop("extra"))
        return out


@dataclass
class _Job:
    """What the steps of one evaluation share."""

    bundle: ModelBundle
    settings: DCEvaluation
    solver: DCSolver
    baselines: Mapping[str, Solver]
    log: Callable[[str], None]

    @property
    def baseline_name(self) -> str:
        return f"UniPC ({self.solver.base.name})"


def evaluate_dc(
    bundle: ModelBundle,
    settings: DCEvaluation | None = None,
    *,
    solver: DCSolver | None = None,
    baselines: Mapping[str, Solver] | None = None,
    log: Callable[[str], None] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Errors of DC-Solver and its baselines against the reference; returns a JSON-ready report.

    ``settings`` (or keyword ``overrides`` of :class:`DCEvaluation`) say what is measured; ``ratio_dir`` keeps
    the searched ratios (one file per configuration, written step by step and resumed).
    """
    settings = DCEvaluation(**overrides) if settings is None else DCEvaluation(**{**asdict(settings), **overrides})
    solver = solver or DCSolver(base=UniPC(order=2, variant="bh2"))
    job = _Job(bundle, settings, solver, {}, log or (lambda _line: None))
    job.baselines = (
        dict(baselines)
        if baselines is not None
        else {
            job.baseline_name: solver.base,
            "DPM-Solver++ 2M": DPMSolverPlusPlus(2),
            "DPM-Solver++ 3M": DPMSolverPlusPlus(3),
        }
    )
    configs = _configs(job)
    found: dict[tuple[int, float], dict[str, DCRatios]] = {}
    rows = [_score_config(job, cfg, found.setdefault((cfg.nfe, cfg.scale), {})) for cfg in configs]
    if settings.cpr and len(settings.grid()) >= 2:
        _score_cpr(job, configs, rows, found)
    return _report(job, configs, rows)


def _configs(job: _Job) -> list[_Config]:
    """Every configuration with its data and references: one reference run per scale and data set serves every
    NFE (the fine grid contains all their levels)."""
    settings, bundle = job.settings, job.bundle
    recipe = parse_schedule(settings.schedule)
    grid, extra = settings.grid(), settings.off_grid()
    configs: list[_Config] = []
    for scale in dict.fromkeys(g for _, g in grid + extra):
        search = bundle.draw(settings.num_search, settings.seed + 1, scale)
        scored = bundle.draw(settings.num_eval, settings.seed + 2, scale)
        group = [
            _Config(nfe, scale, (nfe, scale) in extra, recipe.build(bundle.process, nfe), search, scored)
            for nfe, g in grid + extra
            if g == scale
        ]
        validation = bundle.draw(settings.num_validation, settings.seed + 3, scale) if _validated(settings) else None
        for c in group:
            c.validation = validation
        draws = [(scored, "reference"), (search, "search_reference")]
        draws += [(validation, "validation_reference")] if validation is not None else []
        for draw, attribute in draws:
            trajectories = reference_trajectories(
                bundle.denoiser,
                [c.schedule for c in group],
                draw.x_T,
                steps=settings.reference_steps,
                cond=draw.cond,
                uncond=draw.uncond,
                guidance_scale=scale,
                batch_size=settings.batch_size,
            )
            for c, trajectory in zip(group, trajectories):
                setattr(c, attribute, trajectory[-1] if attribute == "reference" else trajectory)
        configs += group
    return configs


def _ratio_path(job: _Job, cfg: _Config, solver: DCSolver, refined: bool) -> Path | None:
    """Where a configuration's searched ratios are kept; refined ones in ``refined/`` (CPR fits on the rest)."""
    if job.settings.ratio_dir is None:
        return None
    folder = Path(job.settings.ratio_dir) / "refined" if refined else Path(job.settings.ratio_dir)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{job.bundle.name}_{solver.name}_nfe{cfg.nfe}_cfg{cfg.scale:g}.safetensors"


def _validated(settings: DCEvaluation) -> bool:
    """Whether the joint refinement runs with validation noises."""
    return settings.refine_iterations > 0 and not settings.refine_unvalidated


def _search(job: _Job, cfg: _Config, solver: DCSolver, refine: int = 0) -> DCRatios:
    settings = job.settings
    validation: dict[str, Any] = {}
    if refine > 0:
        validation["refine_patience"] = settings.refine_patience
        if cfg.validation is None:
            validation["refine_validation"] = ON_SEARCH_NOISES
        else:
            validation.update(
                refine_validation=cfg.validation.x_T,
                refine_validation_cond=cfg.validation.cond,
                refine_validation_uncond=cfg.validation.uncond,
                refine_validation_reference=cfg.validation_reference,
            )
    return search_dc_ratios(
        job.bundle.denoiser,
        solver,
        cfg.schedule,
        cfg.search.x_T,
        model_id=job.bundle.name,
        cond=cfg.search.cond,
        uncond=cfg.search.uncond,
        guidance_scale=cfg.scale,
        reference=cfg.search_reference,
        reference_steps=job.settings.reference_steps,
        iterations=job.settings.iterations,
        refine_iterations=refine,
        checkpoint=_ratio_path(job, cfg, solver, refined=refine > 0),
        **validation,
    )


def _run(job: _Job, solver: Solver, cfg: _Config) -> torch.Tensor:
    return sample(
        job.bundle.denoiser,
        solver,
        cfg.schedule,
        x_T=cfg.scored.x_T,
        cond=cfg.scored.cond,
        uncond=cfg.scored.uncond,
        guidance_scale=cfg.scale,
        batch_size=job.settings.batch_size,
        progress=False,
    )


def _score(job: _Job, row: Row, name: str, solver: Solver, cfg: _Config) -> None:
    assert cfg.reference is not None
    x = _run(job, solver, cfg)
    row.errors[name], row.median_errors[name] = error_summary(x, cfg.reference)
    metrics = job.bundle.sample_metrics if job.settings.sample_metrics else {}
    row.metrics[name] = {m: float(f(x)) for m, f in metrics.items()}


def _score_config(job: _Job, cfg: _Config, found: dict[str, DCRatios]) -> Row:
    """The baselines and the searched DC-Solver rows of one configuration (``found`` keeps the ratios)."""
    settings, solver = job.settings, job.solver
    row = Row(cfg.scale, cfg.nfe, cfg.unseen)
    methods: dict[str, Solver] = dict(job.baselines)
    found[SEARCHED] = _search(job, cfg, solver)
    row.ratios, row.search_seconds = found[SEARCHED].ratios, found[SEARCHED].search.get("seconds")
    methods[SEARCHED] = solver.with_ratios(found[SEARCHED].ratios)
    if settings.refine_iterations > 0:
        found[REFINED] = _search(job, cfg, solver, settings.refine_iterations)
        row.extra["refined_ratios"] = found[REFINED].ratios
        methods[REFINED] = solver.with_ratios(found[REFINED].ratios)
    if settings.plug_in:
        plug_in = DCSolver(base=DPMSolverPlusPlus(2), dc_order=solver.dc_order)
        methods[PLUG_IN] = plug_in.with_ratios(_search(job, cfg, plug_in).ratios)
    for name, method in methods.items():
        _score(job, row, name, method, cfg)
    job.log(f"cfg {cfg.scale:g}, NFE {cfg.nfe}: " + ", ".join(f"{k} {v:.3e}" for k, v in row.errors.items()))
    return row


def _score_cpr(
    job: _Job, configs: list[_Config], rows: list[Row], found: dict[tuple[int, float], dict[str, DCRatios]]
) -> None:
    """CPR rows: each configuration's ratios predicted from a fit on the other grid configurations (interior
    NFEs only), and the fraction of the searched (or refined) gain over UniPC it recovers."""
    variants = [("DC-Solver (CPR)", SEARCHED, "")]
    if job.settings.refine_iterations > 0:
        variants.append(("DC-Solver (CPR of refined)", REFINED, "_refined"))
    grid = job.settings.grid()
    for name, target, suffix in variants:
        for cfg, row in zip(configs, rows):
            others = [found[key][target] for key in grid if key != (cfg.nfe, cfg.scale)]
            if not min(r.nfe for r in others) < cfg.nfe < max(r.nfe for r in others):
                continue
            predicted = CascadePolynomialRegression.fit(others).predict(cfg.nfe, cfg.scale)
            _score(job, row, name, job.solver.with_ratios(predicted), cfg)
            row.extra[f"cpr{suffix}_ratios"] = predicted
            for key, label in (("errors", ""), ("median_errors", "_median")):
                errors = getattr(row, key)
                gain = errors[job.baseline_name] - errors[target]
                row.extra[f"cpr{suffix}_recovery{label}"] = (
                    (errors[job.baseline_name] - errors[name]) / gain if gain > 0 else None
                )


def _report(job: _Job, configs: list[_Config], rows: list[Row]) -> dict[str, Any]:
    settings = job.settings
    return {
        "model": job.bundle.name,
        "metric": "difference of the final samples from the reference solution from the same x_T (of the guided "
        "ODE when guided): RMS over all samples, and median per-sample RMS",
        "reference": reference_description(settings.reference_steps),
        "schedule": settings.schedule,
        "num_eval": settings.num_eval,
        "num_search": settings.num_search,
        "seed": settings.seed,
        "iterations": settings.iterations,
        "refine_iterations": settings.refine_iterations,
        "refine_validation": (
            None
            if settings.refine_iterations == 0
            else (settings.num_validation if _validated(settings) else ON_SEARCH_NOISES)
        ),
        "refine_patience": settings.refine_patience if settings.refine_iterations else None,
        "solver": job.solver.name,
        "baseline": job.baseline_name,
        "schedules": {str(c.nfe): schedule_description(c.schedule) for c in configs},
        "rows": [row.to_json() for row in rows],
        "cpr_fit_on": "the other grid configurations" if settings.cpr else None,
    }


def format_tables(report: dict[str, Any]) -> str:
    """Markdown tables per guidance scale: methods × NFE, RMS / median per-sample error, the best in bold."""
    out = []
    tables = [
        (
            f"guidance scale {g:g}" + (" (no guidance)" if g == 1.0 else ""),
            [r for r in report["rows"] if r["guidance_scale"] == g and not r.get("unseen")],
        )
        for g in sorted({r["guidance_scale"] for r in report["rows"] if not r.get("unseen")})
    ]
    unseen = [r for r in report["rows"] if r.get("unseen")]
    if unseen:
        tables.append(("configurations off the grid (CPR fitted on the grid only)", unseen))
    for title, rows in tables:
        nfes = [r["nfe"] if not r.get("unseen") else f"{r['nfe']}, cfg {r['guidance_scale']:g}" for r in rows]
        names = list(dict.fromkeys(name for r in rows for name in r["errors"]))
        out += [title, "", "| method (RMS / median) | " + " | ".join(f"NFE {n}" for n in nfes) + " |"]
        out.append("|---|" + "---|" * len(nfes))
        for name in names:
            cells = []
            for r in rows:
                parts = []
                for key in ("errors", "median_errors"):
                    v = r[key].get(name)
                    best = min(r[key].values())
                    parts.append("—" if v is None else (f"**{v:.4f}**" if v == best else f"{v:.4f}"))
                cells.append(" / ".join(parts))
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        for suffix, label in (("", "CPR"), ("_refined", "CPR of refined")):
            if not any(f"cpr{suffix}_recovery" in r for r in rows):
                continue
            cells = []
            for r in rows:
                keys = (f"cpr{suffix}_recovery", f"cpr{suffix}_recovery_median")
                parts = ["—" if r.get(k) is None else f"{100 * r[k]:.0f} %" for k in keys]
                cells.append(" / ".join(parts) if keys[0] in r else "—")
            target = "searched" if not suffix else "refined"
            out.append(f"| {label} recovery of the {target} gain over UniPC | " + " | ".join(cells) + " |")
        for m in sorted({m for r in rows for per in r["metrics"].values() for m in per}):
            out += ["", f"{m}:", "", "| method | " + " | ".join(f"NFE {n}" for n in nfes) + " |"]
            out.append("|---|" + "---|" * len(nfes))
            for name in names:
                vals = [r["metrics"].get(name, {}).get(m) for r in rows]
                out.append(f"| {name} | " + " | ".join("—" if v is None else f"{v:.4g}" for v in vals) + " |")
        out.append("")
    return "\n".join(out)
