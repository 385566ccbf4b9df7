"""Few-step accuracy on exact models: what each ingredient buys at 5–20 model evaluations, and the best recipe.

On Gaussian mixtures (exact denoiser, exact probability-flow ODE solution by SciPy, :mod:`diffsamplers.models.gmm`)
every recipe starts from the same x_T at the model's σ_max and is scored by its RMS error against the exact solution
from that x_T. Four mixtures (:data:`PROBLEMS`): three generated ones of the kind a user writes down (isotropic
components, means ``mean_scale``·N(0, I), on Stable Diffusion 1.5's scaled-linear β schedule) that differ in dimension,
component count and spread, and the bundled one (``gmm``, its own DDPM schedule).

Three disjoint sets of noises per mixture (:data:`SIZES`): **fit** (4,096, seed 1) — what a learned schedule is
fitted on (its first :data:`FIT_SAMPLES_ABOVE_10` above 10 evaluations) and DC-Solver's ratios are searched on (its
first 32); **stop** (2,048, seed 2) — the held-out set that picks a learned schedule's start and stops its search,
picks the teleport level and the best recipe per NFE; **test** (4,096, seed 0) — where every number of the tables is
measured: the RMS over all of them, with the count of noises sent astray — whose sample ends in another component of
the mixture than the exact solution (:meth:`~diffsamplers.models.gmm.GaussianMixture.component`) — and the RMS of the
rest (:func:`score_rows`, which ``--rescore`` runs again on a finished report without fitting anything). Nothing is
fitted or chosen on the test noises, and every search and choice uses the plain RMS. A few noises in a hundred lie near a
boundary between components, where a few-step solver can end in another component than the exact ODE; at 5–10
evaluations those noises decide the RMS, so the sets are large enough to hold dozens of them: a schedule fitted on a
few hundred noises (or with them left out) fits their particular flips, not the rate at which it causes them.

The ingredients, each measured on its own:

* the **final step** (:mod:`diffsamplers.solvers.final_step`): the solver's own last jump to σ = 0 vs the ODE's limit
  ("midpoint");
* **learned schedules** (:func:`~diffsamplers.tuning.ays_optimizer.optimize_schedule` with the solver's error as the
  objective, final convention and final step as run, started from the best hand-made schedule on the stop noises) vs
  uniform logSNR and Karras ρ = 7 with the same solver;
* **Gaussian teleportation** (:func:`~diffsamplers.teleport.gaussian.teleport_level`'s criterion): the n evaluations
  spent from the teleport level down, vs from σ_max — on uniform logSNR the level chosen per NFE on the stop noises
  among the criterion's levels for tolerances 0.03 … 0.001 and no teleport
  (:func:`~diffsamplers.tuning.teleport_choice.choose_teleport`); a learned schedule fits its top level too, starting
  from the level chosen for uniform logSNR at that NFE (``AYSSettings.teleport_from``);
* **DC-Solver** ratios searched (greedy, the paper's search) on fit noises for the learned schedule.

The best recipe per NFE is the one with the smallest error on the stop noises; diffusers' schedulers (DPM-Solver++
2M/3M and UniPC with Karras sigmas and with their defaults) run on the same network for comparison.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..models.gmm import GaussianMixture, default_mixture, default_process, reference_solution
from ..noise import DiscreteVP
from ..sampling import initial_noise
from ..schedules.schedule import Schedule
from ..schedules.spacing import from_sigmas, karras, uniform_logsnr
from ..solvers.base import Solver
from ..solvers.dc_solver import DCSolver
from ..teleport.gaussian import TeleportLevel, teleport_level
from ..teleport.statistics import GaussianStatistics
from ..tuning.ays_optimizer import AYSSettings, optimize_schedule
from ..tuning.dc_search import search_dc_ratios
from ..tuning.solver_error import SolverErrorMetric, squared_errors
from ..tuning.teleport_choice import TELEPORT_TOLERANCES, TeleportChoice, choose_teleport
from .compare import Method, network_bundle, run_method
from .recipes import parse_solver

__all__ = [
    "DIFFUSERS_METHODS",
    "FIT_SEED",
    "PROBLEMS",
    "STOP_SEED",
    "TEST_SEED",
    "MixtureProblem",
    "NoiseSet",
    "Recipe",
    "make_problem",
    "equivalent_nfe",
    "format_tables",
    "rescore",
    "run_few_step",
    "score_rows",
]

TEST_SEED, FIT_SEED, STOP_SEED = 0, 1, 2
#: Noises per set.
SIZES = {"test": 4096, "fit": 4096, "stop": 2048}
#: Fit noises a schedule search uses above 10 evaluations, where hardly any noise ends in another component: the cost
#: of a search grows with the step count and the levels it moves.
FIT_SAMPLES_ABOVE_10 = 1024
SD15_BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
_SD15_CONFIG = {"num_train_timesteps": 1000, **SD15_BETAS}
_GMM_CONFIG = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}

#: The mixtures: name → (description, builder of (mixture, process, diffusers config)).
PROBLEMS: dict[str, tuple[str, Callable[[], tuple[GaussianMixture, DiscreteVP, dict[str, Any]]]]] = {
    "mix768": (
        "d = 768, 10 isotropic components, std 0.15·U(0.7, 1), means 0.5·N(0, I), seed 0; SD 1.5 β",
        lambda: (GaussianMixture.isotropic(768, 10, 0.15, (0.7, 1.0), 0.5, seed=0), _sd15(), _SD15_CONFIG),
    ),
    "mix512": (
        "d = 512, 32 isotropic components, std 0.3·U(0.5, 1), means 0.35·N(0, I), seed 1; SD 1.5 β",
        lambda: (GaussianMixture.isotropic(512, 32, 0.3, (0.5, 1.0), 0.35, seed=1), _sd15(), _SD15_CONFIG),
    ),
    "mix128": (
        "d = 128, 4 isotropic components, std 0.05·U(0.7, 1), means 1.0·N(0, I), seed 2; SD 1.5 β",
        lambda: (GaussianMixture.isotropic(128, 4, 0.05, (0.7, 1.0), 1.0, seed=2), _sd15(), _SD15_CONFIG),
    ),
    "gmm": (
        "the bundled mixture: d = 64 (1×8×8), 8 components with log-uniform spectra; DDPM linear β",
        lambda: (default_mixture(), default_process(), _GMM_CONFIG),
    ),
}

#: diffusers' schedulers on the same network (name, spec); "diffusers' best" is the smallest error among them.
DIFFUSERS_METHODS: tuple[tuple[str, str], ...] = (
    ("DPM-Solver++ 2M, Karras", "diffusers:DPMSolverMultistepScheduler:use_karras_sigmas=true"),
    ("DPM-Solver++ 3M, Karras", "diffusers:DPMSolverMultistepScheduler:use_karras_sigmas=true,solver_order=3"),
    ("UniPC, Karras", "diffusers:UniPCMultistepScheduler:use_karras_sigmas=true"),
    ("DPM-Solver++ 2M", "diffusers:DPMSolverMultistepScheduler"),
    ("UniPC", "diffusers:UniPCMultistepScheduler"),
)


def _sd15() -> DiscreteVP:
    return DiscreteVP.from_beta_schedule(**SD15_BETAS, num_train_timesteps=1000)


@dataclass
class NoiseSet:
    """Seeded initial noises at σ_max and their exact PF-ODE solutions at σ = 0."""

    x_T: torch.Tensor
    reference: torch.Tensor


@dataclass
class MixtureProblem:
    """One mixture on its process: the exact denoiser, the data's Gaussian statistics and the three noise sets."""

    name: str
    description: str
    gmm: GaussianMixture
    process: DiscreteVP
    config: dict[str, Any]
    sets: dict[str, NoiseSet] = field(default_factory=dict)

    @property
    def denoiser(self) -> Any:
        return self.gmm.as_denoiser(self.process)

    @property
    def stats(self) -> GaussianStatistics:
        return GaussianStatistics.from_gmm(self.gmm)

    @property
    def sigma_max(self) -> float:
        return float(self.process.sigma_max)

    def metric(self, which: str, solver: Solver, samples: int | None = None) -> SolverErrorMetric:
        """``solver``'s RMS error on the noise set ``which`` (its first ``samples``; teleporting its x_T when a
        schedule starts lower)."""
        s = self.sets[which]
        return SolverErrorMetric(
            self.denoiser,
            solver,
            s.x_T[:samples],
            s.reference[:samples],
            final="zero",
            teleport=self.stats,
            sigma_start=self.sigma_max,
        )


def make_problem(name: str, sizes: dict[str, int] | None = None) -> MixtureProblem:
    """The mixture ``name`` of :data:`PROBLEMS` with its test, fit and stop noises (``sizes``: samples per set)."""
    if name not in PROBLEMS:
        raise ValueError(f"unknown mixture {name!r}: expected one of {', '.join(PROBLEMS)}")
    description, build = PROBLEMS[name]
    gmm, process, config = build()
    problem = MixtureProblem(name, description, gmm, process, dict(config))
    sizes = {**SIZES, **(sizes or {})}
    for which, seed in (("test", TEST_SEED), ("fit", FIT_SEED), ("stop", STOP_SEED)):
        x_T = initial_noise(process, problem.sigma_max, (sizes[which], *gmm.sample_shape), seed)
        ref = reference_solution(gmm, process, x_T.double(), problem.sigma_max, 0.0).float()
        problem.sets[which] = NoiseSet(x_T, ref)
    return problem


@dataclass(frozen=True)
class Recipe:
    """One of our configurations: a solver spec on a schedule kind (``logsnr``, ``karras`` or ``learned``),
    optionally teleported (the n evaluations then start at the teleport level)."""

    solver: str
    schedule: str
    teleport: bool = False
    dc_search: bool = False
    schedule_solver: str | None = None  # the solver a learned schedule is fitted for (default: ``solver``)

    @property
    def name(self) -> str:
        base = {"logsnr": "uniform logSNR", "karras": "Karras ρ=7", "learned": "learned"}[self.schedule]
        return (
            f"{self.solver}{' + DC ratios' if self.dc_search else ''}, {base}{' + teleport' if self.teleport else ''}"
        )


@dataclass
class _Fitted:
    """What a run learns per mixture (cached across rows): the teleport criterion's curve, the teleport levels chosen,
    schedules, ratios."""

    problem: MixtureProblem
    curve: TeleportLevel | None = None
    teleports: dict[tuple[str, int], TeleportChoice] = field(default_factory=dict)
    schedules: dict[tuple[str, int, bool], np.ndarray] = field(default_factory=dict)
    ratios: dict[tuple[str, int, bool], list[float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    log: Callable[[str], None] = print

    def teleport_curve(self) -> TeleportLevel:
        """The criterion's curve down to the loosest tolerance tried (the stricter ones are read off it)."""
        if self.curve is None:
            t = time.time()
            loosest = max(TELEPORT_TOLERANCES)
            self.curve = teleport_level(self.problem.denoiser, self.problem.stats, tolerance=loosest)
            self.seconds["teleport level"] = round(time.time() - t, 1)
            levels = ", ".join(f"{tol:g}: σ̃ = {self.curve.at(tol).sigma:.4g}" for tol in TELEPORT_TOLERANCES)
            self.log(f"{self.problem.name}: teleport levels {levels}")
        return self.curve

    def teleport_start(self, solver: str, nfe: int) -> float:
        """Where a learned teleporting schedule's search starts: the level chosen for uniform logSNR at this NFE."""
        return float(self.schedule(Recipe(solver, "logsnr", teleport=True), nfe).sigmas[0])

    def schedule(self, recipe: Recipe, nfe: int) -> Schedule:
        """The n-evaluation schedule of ``recipe`` (for a teleporting recipe: from the teleport level down)."""
        process, top = self.problem.process, self.problem.sigma_max
        if recipe.teleport and recipe.schedule == "logsnr":
            key = (recipe.solver, nfe)
            if key not in self.teleports:
                solver = parse_solver(recipe.solver).build()
                metric = self.problem.metric("stop", solver)
                self.teleports[key] = choose_teleport(self.teleport_curve(), metric, solver, nfe)
            return self.teleports[key].solver_schedule
        if recipe.teleport and recipe.schedule != "learned":
            raise ValueError(f"teleporting recipes run on uniform logSNR or a learned schedule, not {recipe.schedule}")
        if recipe.schedule == "logsnr":
            return uniform_logsnr(process, nfe)
        if recipe.schedule == "karras":
            return karras(process, nfe, final="zero")
        spec = recipe.schedule_solver or recipe.solver
        key = (spec, nfe, recipe.teleport)
        if key not in self.schedules:
            t = time.time()
            solver = parse_solver(spec).build(search=lambda _s: None)
            settings = AYSSettings(
                num_steps=nfe,
                refinements=0,
                objective="error",
                init="best",
                num_candidates=7,
                max_sweeps=8,
                patience=2,
                radius=0.5,
                min_radius=2e-3,
                sigma_max=self.teleport_start(spec, nfe) if recipe.teleport else top,
                teleport_from=top if recipe.teleport else None,
            )
            learned = optimize_schedule(
                self.problem.denoiser,
                None,
                settings,
                metric=self.problem.metric("stop", solver),
                objective=self.problem.metric("fit", solver, None if nfe <= 10 else FIT_SAMPLES_ABOVE_10),
                log=None,
            )
            self.schedules[key] = learned.levels(nfe)
            self.seconds[f"schedule {spec} {nfe}{' teleport' if recipe.teleport else ''}"] = round(time.time() - t, 1)
        levels = self.schedules[key].copy()
        levels[-1] = 0.0
        return from_sigmas(process, levels)

    def solver(self, recipe: Recipe, nfe: int, schedule: Schedule) -> Solver:
        spec = parse_solver(recipe.solver)
        if not recipe.dc_search:
            return spec.build()
        key = (recipe.solver, nfe, recipe.teleport)
        if key not in self.ratios:
            dc = spec.build(search=lambda _s: None)
            assert isinstance(dc, DCSolver)
            x = self.problem.metric("fit", dc).start(float(schedule.sigmas[0]))[:32]
            self.ratios[key] = search_dc_ratios(
                self.problem.denoiser, dc, schedule, x, model_id=self.problem.name, iterations=20
            ).ratios
        return spec.build(search=lambda _s: self.ratios[key])


_UNIPC_MID = "unipc:final_step=midpoint"

#: Our rows (solver spec, schedule kind, teleport, DC search), in table order; DC-Solver runs on the schedule learned
#: for its base solver (UniPC bh2 with the midpoint final step) and searches its ratios there.
OUR_RECIPES: tuple[Recipe, ...] = (
    Recipe("dpm++2m", "logsnr"),
    Recipe("unipc", "logsnr"),
    Recipe("unipc:final_step=midpoint", "logsnr"),
    Recipe("unipc:final_step=midpoint", "karras"),
    Recipe("unipc:final_step=midpoint", "learned"),
    Recipe("unipc:final_step=midpoint", "logsnr", teleport=True),
    Recipe("unipc:final_step=midpoint", "learned", teleport=True),
    Recipe("dc-solver:search,final_step=midpoint", "learned", dc_search=True, schedule_solver=_UNIPC_MID),
    Recipe("dc-solver:search,final_step=midpoint", "learned", True, True, _UNIPC_MID),
)


def run_few_step(
    problems: Sequence[str] = tuple(PROBLEMS),
    nfes: Sequence[int] = (5, 7, 8, 10, 20),
    recipes: Sequence[Recipe] = OUR_RECIPES,
    sizes: dict[str, int] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Every recipe and diffusers' schedulers at every NFE on every mixture; returns a JSON-ready report."""
    out: dict[str, Any] = {"nfe": [int(n) for n in nfes], "problems": {}}
    for name in problems:
        t0 = time.time()
        problem = make_problem(name, sizes)
        fitted = _Fitted(problem, log=log)
        rows: list[dict[str, Any]] = []
        for recipe in recipes:
            errors: dict[str, dict[str, Any]] = {"stop": {}}
            configs: dict[str, dict[str, Any]] = {}
            for nfe in nfes:
                schedule = fitted.schedule(recipe, nfe)
                solver = fitted.solver(recipe, nfe, schedule)
                errors["stop"][str(nfe)] = problem.metric("stop", solver).error(schedule, solver)
                ratios = fitted.ratios.get((recipe.solver, nfe, recipe.teleport)) if recipe.dc_search else None
                logsnr = recipe.teleport and recipe.schedule == "logsnr"
                choice = fitted.teleports.get((recipe.solver, nfe)) if logsnr else None
                configs[str(nfe)] = {
                    "solver": recipe.solver,
                    "sigmas": schedule.sigmas.tolist(),
                    "teleport": bool(schedule.sigmas[0] < problem.sigma_max * (1 - 1e-9)),
                    "teleport_tolerance": None if choice is None else choice.tolerance,
                    "ratios": ratios,
                }
            rows.append(
                {
                    "name": recipe.name,
                    "library": "diffsamplers",
                    "recipe": recipe.__dict__,
                    "errors": errors,
                    "configs": configs,
                }
            )
            log(f"{name}: {recipe.name}: fitted; stop " + ", ".join(f"{n}: {errors['stop'][str(n)]:.2e}" for n in nfes))
        for label, spec in DIFFUSERS_METHODS:
            rows.append({"name": f"diffusers {label}", "library": "diffusers", "spec": spec, "errors": {}})
        score_rows(problem, rows, nfes, log)
        out["problems"][name] = {
            "description": problem.description,
            "nfe": [int(n) for n in nfes],
            "sizes": {k: int(v.x_T.shape[0]) for k, v in problem.sets.items()},
            "teleport_levels": None
            if fitted.curve is None
            else {str(tol): fitted.curve.at(tol).sigma for tol in TELEPORT_TOLERANCES},
            "rows": rows,
            "best": _best(rows, nfes),
            "learned_levels": {
                f"{k[0]} nfe={k[1]}{' teleport' if k[2] else ''}": v.tolist() for k, v in fitted.schedules.items()
            },
            "dc_ratios": {f"{k[0]} nfe={k[1]}{' teleport' if k[2] else ''}": v for k, v in fitted.ratios.items()},
            "seconds": {**fitted.seconds, "total": round(time.time() - t0, 1)},
        }
    return out


def score_rows(
    problem: MixtureProblem, rows: list[dict[str, Any]], nfes: Sequence[int], log: Callable[[str], None] = print
) -> None:
    """Every row's errors on the test noises, in place: ours as fitted (solver spec, levels and DC ratios from its
    ``configs``), diffusers' schedulers by their spec on the mixture's ε-network. Per NFE: the RMS (``test``), the
    noises sent astray (``astray``: the sample's component differs from the exact solution's) and the RMS of the
    others (``test_rest``)."""
    test = problem.sets["test"]
    exact = problem.gmm.component(test.reference)
    bundle = network_bundle(problem.name, problem.gmm, problem.process, "epsilon", problem.config)
    for row in rows:
        stop = row["errors"].get("stop")  # what was chosen on stays; every test error is measured here
        errors = row["errors"] = {"test": {}, "astray": {}, "test_rest": {}, **({"stop": stop} if stop else {})}
        for nfe in nfes:
            key = str(nfe)
            if row["library"] == "diffsamplers":
                cfg = row["configs"][key]
                spec, ratios = parse_solver(cfg["solver"]), cfg["ratios"]
                solver = spec.build() if ratios is None else spec.build(search=lambda _s, r=ratios: r)
                schedule = from_sigmas(problem.process, np.asarray(cfg["sigmas"], dtype=np.float64))
                out = problem.metric("test", solver).samples(schedule, solver)
            else:
                result = run_method(Method(row["name"], row["spec"]), bundle, nfe, test.x_T, problem.name)
                assert result is not None
                out = result[0]
            squared = squared_errors(out, test.reference)
            astray = problem.gmm.component(out) != exact
            errors["test"][key] = float(squared.mean().sqrt())
            errors["astray"][key] = int(astray.sum())
            errors["test_rest"][key] = float(squared[~astray].mean().sqrt())
        log(f"{problem.name}: {row['name']}: " + ", ".join(f"{n}: {errors['test'][str(n)]:.2e}" for n in nfes))


def rescore(
    report: dict[str, Any], log: Callable[[str], None] = print, test_samples: int | None = None
) -> dict[str, Any]:
    """A finished report's test errors measured again (:func:`score_rows`; nothing fitted again) on its test noises or
    on the first ``test_samples`` of seed :data:`TEST_SEED`, and its best recipes re-read, in place."""
    for name, prob in report["problems"].items():
        if test_samples is not None:
            prob["sizes"]["test"] = int(test_samples)
        problem = make_problem(name, {"test": prob["sizes"]["test"], "fit": 1, "stop": 1})
        score_rows(problem, prob["rows"], prob["nfe"], log)
        prob["best"] = _best(prob["rows"], prob["nfe"])
    return report


def _best(rows: list[dict[str, Any]], nfes: Sequence[int]) -> dict[str, Any]:
    """Per NFE: our recipe with the smallest *stop* error (its test error reported), and diffusers' best on test."""
    best: dict[str, Any] = {}
    for nfe in nfes:
        key = str(nfe)
        ours = [r for r in rows if r["library"] == "diffsamplers"]
        pick = min(ours, key=lambda r: r["errors"]["stop"][key])
        diffusers = [r for r in rows if r["library"] == "diffusers"]
        theirs = min(diffusers, key=lambda r: r["errors"]["test"][key])
        best[key] = {
            "ours": pick["name"],
            "ours_stop": pick["errors"]["stop"][key],
            "config": pick["configs"][key],
            "ours_test": pick["errors"]["test"][key],
            "ours_astray": pick["errors"]["astray"][key],
            "ours_rest": pick["errors"]["test_rest"][key],
            "diffusers": theirs["name"],
            "diffusers_test": theirs["errors"]["test"][key],
            "diffusers_astray": theirs["errors"]["astray"][key],
            "diffusers_rest": theirs["errors"]["test_rest"][key],
        }
    return best


def format_tables(report: dict[str, Any]) -> str:
    """Markdown: per mixture, every row's test RMS per NFE, then our best recipe (chosen on the stop noises) against
    diffusers' best; then per row the noises that end in another component and the RMS of the others."""
    lines: list[str] = []
    for name, prob in report["problems"].items():
        nfes = [str(n) for n in prob.get("nfe", report["nfe"])]
        lines += [f"### {name}: {prob['description']}", ""]
        sizes = prob["sizes"]
        teleport = prob.get("teleport_levels")
        levels = "" if not teleport else ", ".join(f"{float(v):.3g} ({t})" for t, v in teleport.items())
        lines.append(
            f"RMS error on {sizes['test']} test noises (fit {sizes['fit']}, stop {sizes['stop']})"
            + (f"; the criterion's teleport levels σ̃ (tolerance): {levels}" if levels else "")
        )
        header = ["", "| method | " + " | ".join(nfes) + " |", "|---|" + "---|" * len(nfes)]
        lines += header
        for row in prob["rows"]:
            lines.append(f"| {row['name']} | " + " | ".join(f"{row['errors']['test'][n]:.2e}" for n in nfes) + " |")
        best = prob["best"]
        lines.append(
            "| **best of ours (chosen on stop noises)** | "
            + " | ".join(f"**{best[n]['ours_test']:.2e}**" for n in nfes)
            + " |"
        )
        lines.append("| diffusers' best | " + " | ".join(f"{best[n]['diffusers_test']:.2e}" for n in nfes) + " |")
        lines += [
            "",
            "The test noises sent astray (ending in another component than the exact solution) / the RMS error of the "
            "others",
            *header,
        ]
        for row in prob["rows"]:
            e = row["errors"]
            lines.append(
                f"| {row['name']} | " + " | ".join(_astray_cell(e["astray"][n], e["test_rest"][n]) for n in nfes) + " |"
            )
        lines.append(
            "| **best of ours (chosen on stop noises)** | "
            + " | ".join("**" + _astray_cell(best[n]["ours_astray"], best[n]["ours_rest"]) + "**" for n in nfes)
            + " |"
        )
        lines.append(
            "| diffusers' best | "
            + " | ".join(_astray_cell(best[n]["diffusers_astray"], best[n]["diffusers_rest"]) for n in nfes)
            + " |"
        )
        lines += ["", "Best of ours per NFE: " + "; ".join(f"{n}: {best[n]['ours']}" for n in nfes) + "."]
        for row in prob["rows"]:
            if (
                row["library"] == "diffsamplers"
                and row["recipe"]["schedule"] == "learned"
                and not row["recipe"]["dc_search"]
            ):
                lines.append(f"Levels σ̃ per NFE, {row['name']}: " + _levels_text(row, nfes) + ".")
        by_name = {row["name"]: row["errors"]["test"] for row in prob["rows"]}
        for plain, label in ((_LOGSNR_ROW, "uniform logSNR"), (_LEARNED_ROW, "learned")):
            teleported = by_name.get(plain + " + teleport")
            if plain in by_name and teleported is not None:
                equal = equivalent_nfe(by_name[plain], teleported)
                cells = "; ".join(f"{n} → {_nfe_text(equal[n], nfes)}" for n in nfes)
                lines.append(f"Teleport ({label}): NFE with teleport → NFE without it at the same error: {cells}.")
        for row in prob["rows"]:
            if row["library"] == "diffsamplers" and row["recipe"]["teleport"] and row["recipe"]["schedule"] == "logsnr":
                lines.append(f"Start level σ̃ per NFE, {row['name']}: " + _start_levels(row, nfes) + ".")
        lines.append("")
    return "\n".join(lines)


def _astray_cell(astray: int, rest: float) -> str:
    return f"{astray} / {rest:.2e}"


def _levels_text(row: dict[str, Any], nfes: Sequence[str]) -> str:
    """A learned row's levels per NFE (the last, 0, left out)."""
    return "; ".join(f"{n}: " + ", ".join(f"{v:.3g}" for v in row["configs"][n]["sigmas"][:-1]) for n in nfes)


def _start_levels(row: dict[str, Any], nfes: Sequence[str]) -> str:
    """Where a teleporting row's solver starts per NFE (and the tolerance chosen, or "no teleport")."""
    out = []
    for n in nfes:
        cfg = row["configs"][n]
        tol = cfg.get("teleport_tolerance")
        note = "" if tol is None else f" (tolerance {tol:g})"
        out.append(f"{n}: {cfg['sigmas'][0]:.3g}{note}" if cfg["teleport"] else f"{n}: no teleport")
    return "; ".join(out)


def _hand_made(process: Any) -> dict[str, Callable[[int], Schedule]]:
    """The hand-made schedules :func:`run_model_schedules` compares, as builders of an n-step schedule."""
    return {
        "uniform logSNR": lambda n: uniform_logsnr(process, n),
        "Karras ρ=7": lambda n: karras(process, n, final="zero"),
    }


def run_model_schedules(
    model: str = "digits",
    solver: str = "unipc",
    nfes: Sequence[int] = (5, 7, 10),
    sizes: dict[str, int] | None = None,
    reference_steps: int = 250,
    num_candidates: int = 5,
    max_sweeps: int = 4,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Learned schedules on a trained model of the registry (no exact solution): the same error-objective search as
    on the mixtures, against the package's reference (:mod:`diffsamplers.reference`, ``reference_steps`` steps) on
    fit and stop noises, scored on test noises against uniform logSNR and Karras with the same solver."""
    from .evaluation import validation_set
    from .registry import load_model

    bundle = load_model(model)
    sizes = {"test": 64, "fit": 32, "stop": 32, **(sizes or {})}
    seeds = {"test": 10_000 + TEST_SEED, "fit": 10_000 + FIT_SEED, "stop": 10_000 + STOP_SEED}
    sets = {k: validation_set(bundle, sizes[k], seeds[k], reference_steps=reference_steps) for k in sizes}
    built = parse_solver(solver).build(nfe=None, folder=bundle.folder)

    def metric(which: str) -> SolverErrorMetric:
        s = sets[which]
        assert s.reference is not None
        return SolverErrorMetric(bundle.denoiser, built, s.x_T, s.reference.float(), final="zero", cond=s.cond)

    rows: dict[str, dict[str, float]] = {name: {} for name in [*_hand_made(bundle.process), "learned"]}
    levels_out: dict[str, list[float]] = {}
    seconds: dict[str, float] = {}
    for nfe in nfes:
        for name, build in _hand_made(bundle.process).items():
            rows[name][str(nfe)] = metric("test").error(build(nfe), built)
        t = time.time()
        settings = AYSSettings(
            num_steps=nfe,
            refinements=0,
            objective="error",
            init="uniform_logsnr",
            num_candidates=num_candidates,
            max_sweeps=max_sweeps,
            patience=2,
        )
        learned = optimize_schedule(
            bundle.denoiser, None, settings, metric=metric("stop"), objective=metric("fit"), log=None
        )
        seconds[str(nfe)] = round(time.time() - t, 1)
        levels = learned.levels(nfe)
        levels_out[str(nfe)] = levels.tolist()
        rows["learned"][str(nfe)] = metric("test")(levels)
        log(f"{model} {solver} NFE {nfe}: " + ", ".join(f"{k} {v[str(nfe)]:.3e}" for k, v in rows.items()))
    return {
        "model": model,
        "solver": solver,
        "nfe": [int(n) for n in nfes],
        "sizes": sizes,
        "seeds": seeds,
        "reference_steps": reference_steps,
        "errors": rows,
        "learned_levels": levels_out,
        "seconds": seconds,
    }


_LOGSNR_ROW = "unipc:final_step=midpoint, uniform logSNR"
_LEARNED_ROW = "unipc:final_step=midpoint, learned"


def equivalent_nfe(plain: dict[str, float], other: dict[str, float]) -> dict[str, float | None]:
    """For each NFE of ``other``, the NFE at which ``plain`` has the same error: log-error interpolated linearly in
    the NFE between the measured NFEs of ``plain`` that bracket it; ``inf`` when ``other`` is more accurate than
    ``plain`` at every measured NFE, ``None`` when no pair brackets it otherwise."""
    points = sorted((int(n), float(e)) for n, e in plain.items())
    out: dict[str, float | None] = {}
    for n, err in other.items():
        out[n] = math.inf if err < min(e for _, e in points) else None
        for (n0, e0), (n1, e1) in zip(points, points[1:]):
            if min(e0, e1) <= err <= max(e0, e1) and e0 != e1:
                w = (np.log(err) - np.log(e0)) / (np.log(e1) - np.log(e0))
                out[n] = n0 + float(w) * (n1 - n0)
                break
    return out


def _nfe_text(value: float | None, nfes: Sequence[str]) -> str:
    if value is None:
        return "—"
    return f"> {max(int(n) for n in nfes)}" if math.isinf(value) else f"{value:.1f}"
