"""Evaluating DC-Solver against its baselines on any denoiser: the accuracy tables of the README.

For each guidance scale and NFE, every method starts from the same x_T (and conditions) as a 1,000-step
reference run of the same guided ODE (:func:`diffsamplers.trajectory.reference_trajectory`) and is scored
by the difference of its final samples from the reference's: the RMS over all samples (√MSE, the paper's
metric) and the median over samples of each sample's RMS error. The two differ where a few trajectories
go astray (UniPC under strong guidance): the RMS is then set by those few, the median by the typical one.
The methods:

* UniPC (the DC base, default order 2, bh2), DPM-Solver++ 2M and 3M;
* DC-Solver with ratios searched (:func:`diffsamplers.dc.search.search_dc_ratios`) on separate datapoints
  (``num_search`` noises and conditions, seeds disjoint from the evaluation's);
* DC-Solver with ratios predicted by a cascade polynomial regression fitted on the *other* searched
  configurations (leave-one-out: the configuration scored was never searched for the fit), for NFEs
  inside the searched range (CPR interpolates; extrapolating a quadratic in the NFE is not meaningful),
  and for ``unseen`` (NFE, scale) configurations off the grid, predicted from a fit on the whole grid;
* optionally DC-Solver with the searched ratios refined jointly on the whole trajectory
  (``refine_iterations``, see :func:`~diffsamplers.dc.search.search_dc_ratios`);
* optionally DC as a plug-in on DPM-Solver++ 2M.

A :class:`Problem` bundles what is model-specific — the denoiser, the sample shape, how to draw conditions
(``None`` for an unconditional model), the grid, extra metrics on the final samples (e.g. a Fréchet
distance) — so the same function evaluates the bundled exact mixtures and any trained model.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..denoiser import Denoiser
from ..models.conditional_gmm import default_conditional_mixture
from ..models.gmm import default_mixture, default_process
from ..sampling import sample
from ..schedules.schedule import Schedule
from ..schedules.spacing import build_schedule
from ..solvers.base import Solver
from ..solvers.dc_solver import DCSolver
from ..solvers.dpm_solver_pp import DPMSolverPlusPlus
from ..solvers.unipc import UniPC
from ..trajectory import DEFAULT_REFERENCE_STEPS, reference_trajectories
from .cpr import CascadePolynomialRegression
from .ratios import DCRatios, schedule_description
from .search import PAPER_DATAPOINTS, search_dc_ratios

__all__ = [
    "Problem",
    "evaluate_dc",
    "format_tables",
    "gmm_problem",
    "conditional_gmm_problem",
    "digits_problem",
    "load_problem",
    "PROBLEMS",
]

Conditions = tuple[Mapping[str, Any] | None, Mapping[str, Any] | None]


@dataclass
class Problem:
    """A model to evaluate on.

    ``conditions(n, generator)`` returns (cond, uncond) for n samples (uncond: the null condition, used when
    the guidance scale is not 1); ``None`` means an unconditional model. ``metrics`` map a name to a
    function of the final samples (N, *sample_shape) → float, reported next to the error.
    """

    name: str
    denoiser: Denoiser
    sample_shape: tuple[int, ...]
    conditions: Callable[[int, torch.Generator], Conditions] | None = None
    spacing: str = "linspace"
    final: str = "sigma_min"
    metrics: Mapping[str, Callable[[torch.Tensor], float]] = field(default_factory=dict)

    def schedule(self, nfe: int) -> Schedule:
        return build_schedule(self.denoiser.process, nfe, self.spacing, self.final)  # type: ignore[arg-type]

    def draw(self, n: int, seed: int, guidance_scale: float) -> tuple[torch.Tensor, Conditions]:
        """n initial noises and their conditions (the null condition only when guided)."""
        g = torch.Generator().manual_seed(seed)
        x_T = torch.randn((n, *self.sample_shape), generator=g)
        if self.conditions is None:
            if guidance_scale != 1.0:
                raise ValueError(f"{self.name} is unconditional: it has no guidance scale {guidance_scale:g}")
            return x_T, (None, None)
        cond, uncond = self.conditions(n, g)
        return x_T, (cond, uncond if guidance_scale != 1.0 else None)


def gmm_problem() -> Problem:
    """The bundled exact Gaussian mixture (unconditional)."""
    process = default_process()
    gmm = default_mixture()
    return Problem("gmm", gmm.as_denoiser(process), tuple(gmm.sample_shape))


def conditional_gmm_problem() -> Problem:
    """The bundled exact class-conditional Gaussian mixture (10 classes, null label 10)."""
    process = default_process()
    mixture = default_conditional_mixture()

    def conditions(n: int, g: torch.Generator) -> Conditions:
        labels = torch.randint(0, mixture.num_classes, (n,), generator=g)
        return {"class_labels": labels}, {"class_labels": torch.full_like(labels, mixture.null_label)}

    return Problem("gmm-cond", mixture.as_denoiser(process), mixture.sample_shape, conditions)


def digits_problem() -> Problem:
    """The bundled class-conditional digits model, with FD-digits against the training digits as a metric."""
    from ..models.digits import load_digits
    from ..models.registry import fd_digits

    model = load_digits()

    def conditions(n: int, g: torch.Generator) -> Conditions:
        labels = torch.randint(0, model.num_classes, (n,), generator=g)
        return {"class_labels": labels}, {"class_labels": torch.full_like(labels, model.null_class)}

    return Problem("digits", model.denoiser(), model.sample_shape, conditions, metrics={"FD-digits": fd_digits})


PROBLEMS: dict[str, Callable[[], Problem]] = {
    "gmm": gmm_problem,
    "gmm-cond": conditional_gmm_problem,
    "digits": digits_problem,
}


def load_problem(spec: str) -> Problem:
    """A bundled problem by name (``gmm``, ``gmm-cond``, ``digits``) or ``package.module:factory`` returning a Problem."""
    if spec in PROBLEMS:
        return PROBLEMS[spec]()
    if ":" not in spec:
        raise ValueError(f"unknown problem {spec!r}: expected one of {sorted(PROBLEMS)} or 'package.module:factory'")
    module, _, attr = spec.partition(":")
    factory = getattr(importlib.import_module(module), attr)
    problem = factory()
    if not isinstance(problem, Problem):
        raise TypeError(f"{spec} returned {type(problem).__name__}, not a Problem")
    return problem


def _errors(x: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(RMS over all samples, median over samples of the per-sample RMS) of ``x`` against ``reference``."""
    per_sample = (x.double() - reference.double()).pow(2).flatten(1).mean(1)
    return float(per_sample.mean().sqrt()), float(per_sample.sqrt().median())


@dataclass
class _Config:
    """One (guidance scale, NFE) of an evaluation: its grid, data and reference."""

    scale: float
    nfe: int
    schedule: Schedule
    x_search: torch.Tensor
    search_conditions: Conditions
    x_eval: torch.Tensor
    eval_conditions: Conditions
    reference: torch.Tensor | None = None  # the reference's final samples for x_eval
    search_reference: torch.Tensor | None = None  # the reference trajectory of x_search at the target levels


def _run(problem: Problem, solver: Solver, cfg: _Config, batch_size: int | None) -> torch.Tensor:
    cond, uncond = cfg.eval_conditions
    with torch.no_grad():
        return sample(
            problem.denoiser,
            solver,
            cfg.schedule,
            x_T=cfg.x_eval,
            cond=cond,
            uncond=uncond,
            guidance_scale=cfg.scale,
            batch_size=batch_size,
            progress=False,
        )


def _ratio_path(
    directory: str | os.PathLike, problem: Problem, cfg: _Config, solver: DCSolver, refined: bool = False
) -> Path:
    """Where a configuration's searched ratios are kept; refined ones in ``refined/`` (CPR fits on the rest)."""
    folder = Path(directory) / "refined" if refined else Path(directory)
    return folder / f"{problem.name}_{solver.name}_nfe{cfg.nfe}_cfg{cfg.scale:g}.safetensors"


def evaluate_dc(
    problem: Problem,
    *,
    nfes: Sequence[int] = (5, 6, 8, 10),
    guidance_scales: Sequence[float] = (1.0,),
    unseen: Sequence[tuple[int, float]] = (),
    num_eval: int = 64,
    num_search: int = PAPER_DATAPOINTS,
    seed: int = 0,
    solver: DCSolver | None = None,
    baselines: Mapping[str, Solver] | None = None,
    plug_in: bool = False,
    cpr: bool = True,
    reference_steps: int = DEFAULT_REFERENCE_STEPS,
    iterations: int = 40,
    refine_iterations: int = 0,
    ratio_dir: str | os.PathLike | None = None,
    batch_size: int | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Errors of DC-Solver and its baselines against a high-NFE reference; returns a JSON-ready report.

    The grid is ``nfes`` × ``guidance_scales``; ``unseen`` lists further (NFE, scale) configurations whose
    CPR ratios come from a fit on the grid only (they are also searched, to measure what CPR recovers).
    ``ratio_dir`` keeps the searched ratios (one file per configuration, written step by step and resumed).
    ``refine_iterations`` > 0 adds the row "DC-Solver (searched + joint refinement)".
    """
    solver = solver or DCSolver(base=UniPC(order=2, variant="bh2"))
    unipc_name = f"UniPC ({solver.base.name})"
    if baselines is None:
        baselines = {
            unipc_name: solver.base,
            "DPM-Solver++ 2M": DPMSolverPlusPlus(2),
            "DPM-Solver++ 3M": DPMSolverPlusPlus(3),
        }
    plug_in_solver = DCSolver(base=DPMSolverPlusPlus(2), dc_order=solver.dc_order)
    say = log or (lambda _msg: None)

    def search(dc: DCSolver, cfg: _Config, refine: int = 0) -> DCRatios:
        cond, uncond = cfg.search_conditions
        path = None if ratio_dir is None else _ratio_path(ratio_dir, problem, cfg, dc, refined=refine > 0)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        return search_dc_ratios(
            problem.denoiser,
            dc,
            cfg.schedule,
            cfg.x_search,
            model_id=problem.name,
            cond=cond,
            uncond=uncond,
            guidance_scale=cfg.scale,
            reference=cfg.search_reference,
            reference_steps=reference_steps,
            iterations=iterations,
            refine_iterations=refine,
            checkpoint=path,
        )

    def score(row: dict[str, Any], name: str, x: torch.Tensor, cfg: _Config) -> None:
        assert cfg.reference is not None
        row["errors"][name], row["median_errors"][name] = _errors(x, cfg.reference)
        row["metrics"][name] = {m: float(f(x)) for m, f in problem.metrics.items()}

    grid = [(int(n), float(g)) for g in guidance_scales for n in nfes]
    extra = [(int(n), float(g)) for n, g in unseen if (int(n), float(g)) not in grid]
    configs: list[_Config] = []
    for scale in dict.fromkeys(g for _, g in grid + extra):
        x_search, search_conditions = problem.draw(num_search, seed + 1, scale)
        x_eval, eval_conditions = problem.draw(num_eval, seed + 2, scale)
        group = [
            _Config(scale, nfe, problem.schedule(nfe), x_search, search_conditions, x_eval, eval_conditions)
            for nfe, g in grid + extra
            if g == scale
        ]
        # one 1,000-step run per dataset serves every NFE (the fine grid contains all their levels)
        for data, conditions, field_name in (
            (x_eval, eval_conditions, "reference"),
            (x_search, search_conditions, "search_reference"),
        ):
            trajectories = reference_trajectories(
                problem.denoiser,
                [c.schedule for c in group],
                data,
                steps=reference_steps,
                cond=conditions[0],
                uncond=conditions[1],
                guidance_scale=scale,
                batch_size=batch_size,
            )
            for c, trajectory in zip(group, trajectories):
                setattr(c, field_name, trajectory[-1] if field_name == "reference" else trajectory)
        configs += group
    rows: list[dict[str, Any]] = []
    searched: dict[tuple[float, int], DCRatios] = {}
    refined_found: dict[tuple[float, int], DCRatios] = {}
    for cfg in configs:
        row: dict[str, Any] = {
            "guidance_scale": cfg.scale,
            "nfe": cfg.nfe,
            "unseen": (cfg.nfe, cfg.scale) in extra,
            "errors": {},
            "median_errors": {},
            "metrics": {},
        }
        methods: dict[str, Solver] = dict(baselines)
        found = searched[(cfg.scale, cfg.nfe)] = search(solver, cfg)
        row["ratios"] = found.ratios
        row["search_seconds"] = found.search.get("seconds")
        methods["DC-Solver (searched)"] = solver.with_ratios(found.ratios)
        if refine_iterations > 0:
            refined = refined_found[(cfg.scale, cfg.nfe)] = search(solver, cfg, refine_iterations)
            row["refined_ratios"] = refined.ratios
            methods["DC-Solver (searched + joint refinement)"] = solver.with_ratios(refined.ratios)
        if plug_in:
            methods["DC on DPM-Solver++ 2M (searched)"] = plug_in_solver.with_ratios(search(plug_in_solver, cfg).ratios)
        for name, method in methods.items():
            score(row, name, _run(problem, method, cfg, batch_size), cfg)
        say(f"cfg {cfg.scale:g}, NFE {cfg.nfe}: " + ", ".join(f"{k} {v:.3e}" for k, v in row["errors"].items()))
        rows.append(row)
    if cpr and len(grid) >= 2:
        variants = [("DC-Solver (CPR)", "DC-Solver (searched)", searched, "")]
        if refine_iterations > 0:
            variants.append(
                ("DC-Solver (CPR of refined)", "DC-Solver (searched + joint refinement)", refined_found, "_refined")
            )
        for name, target, found_by_config, suffix in variants:
            on_grid = {(g, n): found_by_config[(g, n)] for n, g in grid}
            for cfg, row in zip(configs, rows):
                others = [r for key, r in on_grid.items() if key != (cfg.scale, cfg.nfe)]
                if not min(r.nfe for r in others) < cfg.nfe < max(r.nfe for r in others):
                    continue
                predicted = CascadePolynomialRegression.fit(others).predict(cfg.nfe, cfg.scale)
                score(row, name, _run(problem, solver.with_ratios(predicted), cfg, batch_size), cfg)
                row[f"cpr{suffix}_ratios"] = predicted
                for key, label in (("errors", ""), ("median_errors", "_median")):
                    errors = row[key]
                    gain = errors[unipc_name] - errors[target]
                    recovery = (errors[unipc_name] - errors[name]) / gain if gain > 0 else None
                    row[f"cpr{suffix}_recovery{label}"] = recovery
    return {
        "problem": problem.name,
        "metric": f"difference of the final samples from a {reference_steps}-step DPM-Solver++ 3M reference "
        "from the same x_T (of the guided ODE when guided): RMS over all samples, and median per-sample RMS",
        "grid": {"spacing": problem.spacing, "final": problem.final},
        "num_eval": num_eval,
        "num_search": num_search,
        "seed": seed,
        "iterations": iterations,
        "refine_iterations": refine_iterations,
        "solver": solver.name,
        "baseline": unipc_name,
        "schedules": {str(c.nfe): schedule_description(c.schedule) for c in configs},
        "rows": rows,
        "cpr_fit_on": "the other grid configurations" if cpr else None,
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
        out.append(title)
        out.append("")
        out.append("| method (RMS / median) | " + " | ".join(f"NFE {n}" for n in nfes) + " |")
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
        metric_names = sorted({m for r in rows for per in r["metrics"].values() for m in per})
        for m in metric_names:
            out.append("")
            out.append(f"{m}:")
            out.append("")
            out.append("| method | " + " | ".join(f"NFE {n}" for n in nfes) + " |")
            out.append("|---|" + "---|" * len(nfes))
            for name in names:
                vals = [r["metrics"].get(name, {}).get(m) for r in rows]
                out.append(f"| {name} | " + " | ".join("—" if v is None else f"{v:.4g}" for v in vals) + " |")
        out.append("")
    return "\n".join(out)
