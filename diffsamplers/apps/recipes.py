"""The recipe parser: solver and schedule specs, as the command line, the jobs and the scripts write them.

Solver specs — ``NAME[:OPTIONS][+ts[:OPTIONS]]``:

* a registered solver (:data:`SOLVERS`: ``ddim``, ``dpm++2m``, ``unipc``, …), with optional keyword options of
  its class, e.g. ``ddim:eta=0.5`` or ``unipc:order=3,variant=bh1``;
* ``dc-solver`` — DC-Solver with the ratios predicted by the cascade polynomial regression shipped in the model's
  folder (``dc_solver_cpr.safetensors``); ``dc-solver:PATH`` — ratios or a CPR fit from a file;
  ``dc-solver:search`` — ratios searched for the schedule at hand (the paper's search, on separate noises);
* ``diffusers:SchedulerClass[:config=value,…]`` — one of diffusers' own schedulers, run the way pipelines run it;
* ``best`` — the recipe shipped for the model at that NFE (solver, learned schedule, teleport, ratios:
  :mod:`diffsamplers.apps.best`);
* ``+ts[:half_width=…,cutoff=…]`` after any of ours — the exposure-bias time shift around it;
* ``final_step=midpoint`` (or a number κ in [0, 1)) among any of our solvers' options — the last step to σ̃ = 0
  taken as the probability-flow ODE's limit (:mod:`diffsamplers.solvers.final_step`), e.g. ``unipc:final_step=midpoint``,
  ``dc-solver:search,final_step=midpoint``.

Schedule specs — ``NAME[:OPTIONS][/FINAL]``: diffusers' ``linspace``, ``leading``, ``trailing``;
``uniform_time`` (``time``), ``uniform_logsnr`` (``logsnr``), ``karras[:rho=7]``, ``exponential``,
``beta[:a=0.6,b=0.6]``; ``ays:MODEL`` (a published Align Your Steps schedule: sd15, sdxl, svd, deepfloyd_if);
``learned:PATH`` or a ``.safetensors`` path (a learned schedule); ``sigmas:s0,s1,…`` (explicit levels);
``flow[:shift=S]`` (diffusers' DPM-Solver flow-matching grid, for rectified-flow models: :func:`flow_schedule`).
``FINAL`` names the last level, the same for every kind (:data:`~diffsamplers.schedules.schedule.FINAL_CONVENTIONS`):
``zero`` (the default: the last of n + 1 grid levels replaced by 0), ``sigma_min``, ``append_zero`` (n grid levels,
then 0: k-diffusion's and diffusers' Karras/exponential/beta sigmas, e.g. ``karras/append_zero``); ``ays:`` and
``learned:`` also take the deprecated ``replace`` (= ``zero``) and ``append`` (= ``append_zero``).

Guidance specs — ``TERM[+TERM…]``, composed in order: a number is the classifier-free guidance scale (``7.5``);
``NAME[:k=v,…]`` a registered guidance (:data:`GUIDANCES`) with its options, built for the model it guides. A term's
name ends at its first colon and each option's name at its first ``=``, so an option's value may hold colons and
dots: ``fk-steering:k=8,lam=10,potential=max,reward=digits-class:3`` (FK steering), ``fkc:k=8,anneal=2``
(Feynman–Kac correctors; or ``cfg=S``, ``classes=3-5``), ``svdd:m=8,reward=pixel-mass,alpha=0`` (SVDD). The particle
methods (fk-steering, fkc) need a stochastic solver and a number of samples that is a multiple of K.

Reward specs (the ``reward=`` of fk-steering and svdd; :func:`parse_reward`): ``digits-class:C`` (the bundled digits
classifier's probability of class C), ``pixel-mass[:-1]`` (mean intensity in [0, 1], or mean darkness) — the
shipped :data:`REWARDS` — or ``package.module:function`` for any callable ``(B, *shape) → (B,)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..masked.samplers import AncestralSampler, FirstHittingSampler
from ..noise import RectifiedFlow
from ..schedules.align_your_steps import align_your_steps
from ..schedules.diffusers_compat import diffusers_grid
from ..schedules.learned import LearnedSchedule
from ..schedules.schedule import DEFAULT_FINAL, FINAL_ALIASES, FINAL_CONVENTIONS, Schedule
from ..schedules.spacing import build_schedule, from_sigmas
from ..solvers.base import Solver
from ..solvers.dc_cpr import load_ratio_source
from ..solvers.dc_ratios import DCRatios
from ..solvers.dc_solver import DCSolver
from ..solvers.ddim import DDIM
from ..solvers.dpm_solver_pp import DPMSolverPlusPlus
from ..solvers.dpm_solver_pp_singlestep import DPMSolverPlusPlusSinglestep
from ..solvers.euler import Euler
from ..solvers.euler_maruyama import EulerMaruyama
from ..solvers.exposure_bias_time_shift import ExposureBiasTimeShift
from ..solvers.unipc import UniPC
from ..step import Guidance

__all__ = [
    "CPR_FILE",
    "DC_SOLVER",
    "GUIDANCES",
    "MASKED_SAMPLERS",
    "GuidanceRecipe",
    "OutsideFitError",
    "REWARDS",
    "SCHEDULES",
    "SOLVERS",
    "ScheduleRecipe",
    "SolverRecipe",
    "describe_guidances",
    "describe_rewards",
    "describe_schedules",
    "describe_solvers",
    "flow_schedule",
    "make_solver",
    "parse_guidance",
    "parse_reward",
    "parse_schedule",
    "parse_solver",
    "register_guidance",
    "register_reward",
    "register_solver",
]

#: Registered solvers: name → factory taking the spec's keyword options.
SOLVERS: dict[str, Callable[..., Solver]] = {
    "ddim": DDIM,
    "ddim-eta1": lambda **kw: DDIM(**{"eta": 1.0, **kw}),
    "euler": Euler,
    "euler-maruyama": EulerMaruyama,
    "dpm++1": lambda **kw: DPMSolverPlusPlus(1, **kw),
    "dpm++2m": lambda **kw: DPMSolverPlusPlus(2, **kw),
    "dpm++3m": lambda **kw: DPMSolverPlusPlus(3, **kw),
    "dpm++2s": lambda **kw: DPMSolverPlusPlusSinglestep(2, **kw),
    "dpm++3s": lambda **kw: DPMSolverPlusPlusSinglestep(3, **kw),
    "sde-dpm++2m": lambda **kw: DPMSolverPlusPlus(2, **{"sde": True, **kw}),
    "unipc": lambda **kw: UniPC(**{"order": 2, "variant": "bh2", **kw}),
    "unipc-bh1": lambda **kw: UniPC(**{"order": 2, "variant": "bh1", **kw}),
    "unipc3": lambda **kw: UniPC(**{"order": 3, "variant": "bh2", **kw}),
}

#: The option every solver spec takes: how the last step to σ̃ = 0 is taken (:mod:`diffsamplers.solvers.final_step`),
#: e.g. ``unipc:final_step=midpoint`` or ``dc-solver:search,final_step=0.45``.
FINAL_STEP_OPTION = "final_step"

#: The spec of a model's shipped best recipe per NFE (:mod:`diffsamplers.apps.best`).
BEST = "best"

#: DC-Solver's name in specs.
DC_SOLVER = "dc-solver"
#: Where a model folder ships the cascade polynomial regression that ``dc-solver`` uses.
CPR_FILE = "dc_solver_cpr.safetensors"
_DIFFUSERS = "diffusers:"
_TIME_SHIFT = "+ts"

#: Schedule names: builders of :mod:`diffsamplers.schedules.spacing` and their short aliases.
SCHEDULES = {
    "linspace": "linspace",
    "leading": "leading",
    "trailing": "trailing",
    "uniform_time": "uniform_time",
    "time": "uniform_time",
    "uniform_logsnr": "uniform_logsnr",
    "logsnr": "uniform_logsnr",
    "karras": "karras",
    "exponential": "exponential",
    "beta": "beta",
}
#: The ``/FINAL`` suffixes: the general final conventions (default ``zero``), then AYS's deprecated aliases.
_FINALS = (*FINAL_CONVENTIONS, *FINAL_ALIASES)
#: The flow-matching grid's name in specs, and the final levels diffusers offers for it.
_FLOW = "flow"
_FLOW_FINALS = ("zero", "sigma_min")
_DIFFUSERS_SPACINGS = ("linspace", "leading", "trailing")


class OutsideFitError(ValueError):
    """DC-Solver ratios asked of a cascade polynomial regression outside the NFE range it was fitted on."""


def register_solver(name: str, factory: Callable[..., Solver]) -> None:
    """Make the spec ``name[:options]`` build ``factory(**options)``."""
    SOLVERS[name] = factory


#: The samplers of masked (discrete) models: name → factory taking the number of steps and the spec's options
#: (``first-hitting[:k=K]`` — K tokens per model call, 1 by default; ``ancestral[:cache=false]`` — MDLM's sampler on
#: ``--steps`` steps).
MASKED_SAMPLERS: dict[str, Callable[..., Any]] = {
    "first-hitting": lambda steps, k=1: FirstHittingSampler(tokens_per_step=k),
    "ancestral": lambda steps, cache=True: AncestralSampler(steps, cache=cache),
}


def describe_solvers() -> str:
    """The solver specs, for help texts and errors."""
    return (
        f"{', '.join(SOLVERS)}, {DC_SOLVER}[:PATH|:search], {BEST} (the model's shipped recipe per NFE), "
        f"{_DIFFUSERS}SchedulerClass; any of ours +ts[:options] or :final_step=midpoint; "
        f"for masked (text) models {', '.join(MASKED_SAMPLERS)}"
    )


def describe_schedules() -> str:
    """The schedule specs, for help texts and errors."""
    return (
        f"{', '.join(SCHEDULES)}, ays:MODEL, learned:PATH, sigmas:s0,s1,…, {_FLOW}[:shift=S] (flow models); "
        f"optional /FINAL ({', '.join(FINAL_CONVENTIONS)}; default {DEFAULT_FINAL})"
    )


def _value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _options(text: str, spec: str) -> dict[str, Any]:
    """``k=v,k2=v2`` as a dict of typed values."""
    out: dict[str, Any] = {}
    for part in filter(None, text.split(",")):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"{spec!r}: options must be key=value pairs separated by commas, got {part!r}")
        out[key.strip()] = _value(value.strip())
    return out


# -- solvers ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SolverRecipe:
    """A parsed solver spec. :meth:`build` makes the solver; DC-Solver's ratios may need the model, the
    schedule or a ratio search, which the caller passes there."""

    spec: str
    name: str
    options: Mapping[str, Any] = field(default_factory=dict)
    ratios: str | None = None  # dc-solver: None (the model's CPR), "search" or a file path
    time_shift: Mapping[str, Any] | None = None
    scheduler_class: str | None = None  # diffusers:<class>

    @property
    def is_diffusers(self) -> bool:
        return self.scheduler_class is not None

    @property
    def is_best(self) -> bool:
        """``best``: the model's shipped best recipe at the NFE (:mod:`diffsamplers.apps.best`)."""
        return self.name == BEST

    @property
    def is_masked(self) -> bool:
        """A sampler of masked (discrete) models (:data:`MASKED_SAMPLERS`)."""
        return self.name in MASKED_SAMPLERS

    def build_masked(self, steps: int) -> Any:
        """The masked-model sampler of this spec, with ``steps`` steps where it takes them (ancestral)."""
        if not self.is_masked:
            raise ValueError(
                f"{self.spec!r} samples continuous models; a masked model takes {', '.join(MASKED_SAMPLERS)}"
            )
        return _construct(partial(MASKED_SAMPLERS[self.name], int(steps)), self.options, self.spec)

    @property
    def searches_ratios(self) -> bool:
        return self.name == DC_SOLVER and self.ratios == "search"

    def build(
        self,
        *,
        nfe: int | None = None,
        guidance_scale: float = 1.0,
        folder: Path | None = None,
        search: Callable[[DCSolver], list[float] | None] | None = None,
    ) -> Solver:
        """The solver. ``nfe`` and ``guidance_scale`` select DC-Solver's ratios from a CPR fit (the one in the
        model ``folder`` for plain ``dc-solver``); ``search(solver)`` returns the ratios for ``dc-solver:search``
        (``None``: the solver without ratios, for a caller that searches them itself)."""
        if self.is_diffusers:
            raise ValueError(f"{self.spec!r} is a diffusers scheduler: run it with a diffusers loop, not as a solver")
        if self.is_masked:
            raise ValueError(f"{self.spec!r} samples masked (discrete) models such as --model text, not this one")
        if self.is_best:
            raise ValueError(f"{BEST!r} is a model's shipped recipe with its own schedule: sample it through the jobs")
        solver = self._dc_solver(nfe, guidance_scale, folder, search) if self.name == DC_SOLVER else self._registered()
        if FINAL_STEP_OPTION in self.options:
            if self.time_shift is not None:
                raise ValueError(f"{self.spec!r}: the time shift (+ts) recomputes every update: no final_step with it")
            solver = solver.with_final_step(self.options[FINAL_STEP_OPTION])
        if self.time_shift is not None:
            solver = _construct(lambda **kw: ExposureBiasTimeShift(solver, **kw), self.time_shift, self.spec)
        return solver

    @property
    def class_options(self) -> dict[str, Any]:
        """The options passed to the solver's class (all but ``final_step``, which every solver takes)."""
        return {k: v for k, v in self.options.items() if k != FINAL_STEP_OPTION}

    def _registered(self) -> Solver:
        return _construct(SOLVERS[self.name], self.class_options, self.spec)

    def _dc_solver(
        self,
        nfe: int | None,
        guidance_scale: float,
        folder: Path | None,
        search: Callable[[DCSolver], list[float] | None] | None,
    ) -> DCSolver:
        solver = _construct(DCSolver, self.class_options, self.spec)
        if self.ratios == "search":
            if search is None:
                raise ValueError(f"{self.spec!r} searches its ratios for the schedule: this job cannot run a search")
            return solver.with_ratios(search(solver))
        if self.ratios is None:
            if folder is None:
                raise ValueError(
                    f"{self.spec!r} takes its ratios from the model folder's {CPR_FILE}; this model has no folder: "
                    f"pass {DC_SOLVER}:PATH or {DC_SOLVER}:search"
                )
            file = Path(folder) / CPR_FILE
        else:
            file = Path(self.ratios)
        return solver.with_ratios(dc_ratios_from_file(file, nfe, guidance_scale))


def _construct(factory: Callable[..., Any], options: Mapping[str, Any], spec: str) -> Any:
    try:
        return factory(**options)
    except TypeError as err:
        raise ValueError(f"{spec!r}: bad option ({err})") from None


def dc_ratios_from_file(file: Path, nfe: int | None, guidance_scale: float) -> list[float]:
    """DC-Solver ratios from a searched ratio file (checked against ``nfe``) or a CPR fit (predicted for
    ``nfe`` and ``guidance_scale`` inside the NFE range it was fitted on)."""
    source = load_ratio_source(file)
    if isinstance(source, DCRatios):
        if nfe is not None:
            source.check(nfe=nfe, source=str(file))
        return list(source.ratios)
    if nfe is None:
        raise ValueError(f"{file} is a CPR fit: its ratios need the number of steps")
    fitted = source.nfe_range
    if fitted is not None and not fitted[0] <= nfe <= fitted[1]:
        raise OutsideFitError(
            f"the CPR in {file} was fitted on NFE {fitted[0]}–{fitted[1]}; its polynomial in the NFE is not trusted "
            f"at {nfe} steps: search ratios for {nfe} steps (scripts/search_dc_ratios.py)"
        )
    return source.predict(nfe, guidance_scale)


def parse_solver(spec: str) -> SolverRecipe:
    """Parse a solver spec (module docstring); ``ValueError`` names the spec and lists what exists."""
    text = str(spec).strip()
    if text.startswith(_DIFFUSERS):
        cls, _, opts = text[len(_DIFFUSERS) :].partition(":")
        if not cls:
            raise ValueError(
                f"unknown solver {spec!r}: {_DIFFUSERS} needs a scheduler class, e.g. {_DIFFUSERS}DDIMScheduler"
            )
        return SolverRecipe(text, "diffusers", _options(opts, text), scheduler_class=cls)
    base, ts, ts_opts = text.partition(_TIME_SHIFT)
    if ts and ts_opts and not ts_opts.startswith(":"):
        raise ValueError(f"unknown solver {spec!r}: the time shift is written +ts or +ts:half_width=…,cutoff=…")
    time_shift = _options(ts_opts[1:], text) if ts else None
    name, _, arg = base.partition(":")
    if name == DC_SOLVER:
        head, _, rest = arg.partition(",")
        if head and "=" not in head:  # dc-solver:search[,options] or dc-solver:PATH[,options]
            return SolverRecipe(text, name, _options(rest, text), ratios=head, time_shift=time_shift)
        return SolverRecipe(text, name, _options(arg, text), time_shift=time_shift)
    if name in MASKED_SAMPLERS and not ts:
        return SolverRecipe(text, name, _options(arg, text))
    if name == BEST and not arg and not ts:
        return SolverRecipe(text, name)
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {spec!r}: expected {describe_solvers()}")
    return SolverRecipe(text, name, _options(arg, text), time_shift=time_shift)


def make_solver(spec: str) -> Solver:
    """A solver from a spec that needs nothing else (not plain ``dc-solver``, which needs a model's CPR)."""
    return parse_solver(spec).build()


# -- schedules --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScheduleRecipe:
    """A parsed schedule spec; :meth:`build` makes the schedule for a noise process and a number of steps."""

    spec: str
    kind: str  # a spacing of SCHEDULES, "ays", "learned" or "sigmas"
    arg: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    final: str | None = None

    @property
    def diffusers_spacing(self) -> str | None:
        """diffusers' ``timestep_spacing`` this spec names, if it is one."""
        return self.kind if self.kind in ("linspace", "leading", "trailing") else None

    def build(self, process: Any, steps: int | None) -> Schedule:
        if self.kind == "sigmas":
            return from_sigmas(process, [float(v) for v in str(self.arg).split(",")])
        if steps is None:
            raise ValueError(f"schedule {self.spec!r} needs a number of steps")
        kind = type(process).__name__
        if self.kind == _FLOW:
            if not isinstance(process, RectifiedFlow):
                raise ValueError(
                    f"schedule {self.spec!r} is the flow-matching grid: it needs a RectifiedFlow model, not {kind}"
                )
            return flow_schedule(process, steps, final=self.final or "zero", **self.options)
        if self.kind in _DIFFUSERS_SPACINGS and isinstance(process, RectifiedFlow):
            raise ValueError(
                f"schedule {self.spec!r} is diffusers' integer-timestep spacing of a discrete VP model, not of a "
                f"{kind} one: use {_FLOW}[:shift=S] (diffusers' flow grid) or a σ̃ spacing such as logsnr"
            )
        if self.kind == "ays":
            return align_your_steps(
                str(self.arg), steps, final=self.final or DEFAULT_FINAL, process=process, **self.options
            )
        if self.kind == "learned":
            path = Path(str(self.arg))
            if not path.is_file():
                raise FileNotFoundError(f"schedule {self.spec!r}: no learned schedule file {path}")
            return LearnedSchedule.load(path).schedule(steps, final=self.final or DEFAULT_FINAL, process=process)
        if self.final in FINAL_ALIASES:
            raise ValueError(
                f"schedule {self.spec!r}: /{self.final} is for ays: and learned: schedules (deprecated there too): "
                f"use /{FINAL_ALIASES[self.final]}"
            )
        if self.options:
            from ..schedules.spacing import SPACINGS

            kwargs = dict(self.options)
            if self.final is not None:
                kwargs["final"] = self.final
            builder = SPACINGS.get(self.kind)
            if builder is None:
                raise ValueError(f"schedule {self.spec!r}: {self.kind} takes no options")
            return _construct(lambda **kw: builder(process, steps, **kw), kwargs, self.spec)
        return build_schedule(process, steps, self.kind, self.final)  # type: ignore[arg-type]


def parse_schedule(spec: str) -> ScheduleRecipe:
    """Parse a schedule spec (module docstring); ``ValueError`` names the spec and lists what exists."""
    text = str(spec).strip()
    head, slash, tail = text.rpartition("/")
    is_path = text.startswith("learned:") or text.endswith(".safetensors")
    if slash and tail in _FINALS:
        body, final_or_none = head, tail
    elif slash and not is_path:
        raise ValueError(f"unknown final level {tail!r} in schedule {spec!r}: expected one of {_FINALS}")
    else:
        body, final_or_none = text, None
    if body.endswith(".safetensors") or body.startswith("learned:"):
        path = body[len("learned:") :] if body.startswith("learned:") else body
        return ScheduleRecipe(text, "learned", path, final=final_or_none)
    name, _, arg = body.partition(":")
    if name == "ays":
        model, _, opts = arg.partition(",")
        if not model:
            raise ValueError(f"schedule {spec!r}: ays needs a model, e.g. ays:sd15")
        return ScheduleRecipe(text, "ays", model, _options(opts, text), final_or_none)
    if name == "sigmas":
        values = [v for v in arg.split(",") if v]
        try:
            levels = [float(v) for v in values]
        except ValueError:
            raise ValueError(f"schedule {spec!r}: sigmas: takes numbers separated by commas") from None
        if len(levels) < 2 or not all(math.isfinite(v) for v in levels):
            raise ValueError(f"schedule {spec!r}: sigmas: needs at least two finite levels (the last is the final one)")
        return ScheduleRecipe(text, "sigmas", ",".join(repr(v) for v in levels), final=final_or_none)
    if name == _FLOW:
        return _flow_recipe(text, arg, final_or_none)
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {spec!r}: expected {describe_schedules()}")
    return ScheduleRecipe(text, SCHEDULES[name], options=_options(arg, text), final=final_or_none)


def _flow_recipe(spec: str, arg: str, final: str | None) -> ScheduleRecipe:
    """``flow[:shift=S][/zero|/sigma_min]``, its options checked (``ValueError`` names the spec and the value)."""
    options = _options(arg, spec)
    unknown = sorted(set(options) - {"shift"})
    if unknown:
        raise ValueError(f"schedule {spec!r}: {_FLOW} takes only shift=S, got {', '.join(unknown)}")
    shift = options.get("shift", 1.0)
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not 0 < shift < math.inf:
        raise ValueError(f"schedule {spec!r}: shift must be a positive number, got {shift!r}")
    if final is not None and final not in _FLOW_FINALS:
        raise ValueError(f"schedule {spec!r}: the flow grid ends with /{' or /'.join(_FLOW_FINALS)}, not /{final}")
    return ScheduleRecipe(spec, _FLOW, options={"shift": float(shift)}, final=final)


def flow_schedule(process: RectifiedFlow, num_steps: int, shift: float = 1.0, final: str = "zero") -> Schedule:
    """diffusers' DPM-Solver grid for flow-matching models (``DPMSolverMultistepScheduler(use_flow_sigmas=True,
    flow_shift=shift)``), on a rectified flow x_t = (1 − t) x0 + t ε (Liu et al. 2023; Lipman et al. 2023).

    Flow times t = s·u/(1 + (s − 1)·u) (SD3's time shift, Esser et al. 2024, "Scaling Rectified Flow Transformers
    for High-Resolution Image Synthesis"; s = ``shift``) for u = 1 − linspace(1, 1/N, n + 1), flipped and the
    last dropped, then the final level (``"zero"``: t = 0; ``"sigma_min"``: diffusers' σ̃ at VP training step 0
    taken as a flow time), N = the process's timestep scale (``num_train_timesteps``) — computed by
    :func:`~diffsamplers.schedules.diffusers_compat.diffusers_grid`, so it is diffusers' float32 grid. It starts
    below t = 1 (at 1 − 1/N before the shift), where a pipeline's x_T = ε is taken as the first sample. The
    network receives N·t as a float, where diffusers' scheduler truncates it to an integer.
    """
    scale = float(process.timestep_scale)
    if not (scale.is_integer() and scale >= 2):
        raise ValueError(f"the flow grid needs an integer timestep scale N ≥ 2 (num_train_timesteps), got {scale:g}")
    config = {
        "num_train_timesteps": int(scale),
        "use_flow_sigmas": True,
        "flow_shift": float(shift),
        "final_sigmas_type": final,
    }
    grid = diffusers_grid(process, config, num_steps, flavour="dpmsolver").schedule
    return Schedule(grid.sigmas, metadata={**grid.metadata, "spacing": _FLOW, "shift": float(shift)})


# -- guidance ---------------------------------------------------------------------------------------

#: Registered guidances: name → factory ``(bundle, **options) -> Guidance``, ``bundle`` being the
#: :class:`~diffsamplers.apps.registry.ModelBundle` it guides (its process, denoiser, folder).
GUIDANCES: dict[str, Callable[..., Guidance]] = {}


def register_guidance(name: str, factory: Callable[..., Guidance]) -> None:
    """Make the guidance spec ``name[:options]`` build ``factory(bundle, **options)``."""
    GUIDANCES[name] = factory


def describe_guidances() -> str:
    """The guidance specs, for help texts and errors."""
    names = ", ".join(f"{n}[:k=v,…]" for n in GUIDANCES)
    return "a number (the classifier-free guidance scale)" + (f", {names}" if names else "") + "; compose with +"


@dataclass(frozen=True)
class GuidanceRecipe:
    """A parsed guidance spec: the classifier-free scale if one term is a number, and the named guidances with their
    options, in order. :meth:`build` makes the :class:`~diffsamplers.step.Guidance` hooks for a model."""

    spec: str
    scale: float | None = None
    terms: tuple[tuple[str, Mapping[str, Any]], ...] = ()

    def build(self, bundle: Any) -> tuple[Guidance, ...]:
        """The guidance hooks of the named terms for ``bundle`` (the scale goes to the model call itself)."""
        return tuple(
            _construct(partial(GUIDANCES[name], bundle), options, f"{self.spec} ({name})")
            for name, options in self.terms
        )

    def __str__(self) -> str:
        return self.spec


def parse_guidance(spec: str | float) -> GuidanceRecipe:
    """Parse ``TERM[+TERM…]`` (see the module docstring); raises ``ValueError`` naming the bad term."""
    text = str(spec).strip()
    if not text:
        raise ValueError("guidance spec is empty")
    scale: float | None = None
    terms: list[tuple[str, Mapping[str, Any]]] = []
    for term in (t.strip() for t in text.split("+")):
        if not term:
            raise ValueError(f"guidance spec {text!r} has an empty term")
        try:
            value = float(term)
        except ValueError:
            value = None
        if value is not None:
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"guidance spec {text!r}: the guidance scale must be a finite number > 0, got {term}")
            if scale is not None:
                raise ValueError(f"guidance spec {text!r} gives the classifier-free scale twice")
            scale = value
            continue
        name, _, options = term.partition(":")
        if name not in GUIDANCES:
            raise ValueError(f"unknown guidance {name!r} in {text!r}: expected {describe_guidances()}")
        terms.append((name, _options(options, text)))
    return GuidanceRecipe(text, scale, tuple(terms))


def _self_minority(
    bundle: Any,
    *,
    w: float | None = None,
    level: float | None = None,
    p: float | None = None,
    every: int | None = None,
    k: int | None = None,
    cutoff: float | None = None,
    sign: int = 1,
    chunk: int | None = None,
    draws: int = 1,
    distance: str = "l2",
    variance: str = "posterior",
) -> Guidance:
    """``self-minority:w=W[,p=0.8][,k=5][,cutoff=T][,sign=-1][,chunk=N][,draws=M][,distance=l2][,variance=…]`` — the
    self-guided minority sampler (:class:`~diffsamplers.guidance.self_minority.SelfGuidedMinority`); ``level`` and
    ``every`` are the long names of ``p`` and ``k``."""
    from ..guidance.self_minority import SelfGuidedMinority

    if w is None:
        raise ValueError("self-minority needs its scale: self-minority:w=W (the paper uses 0.2-0.4 at 250 steps)")
    for long, short, name in ((level, p, "level/p"), (every, k, "every/k")):
        if long is not None and short is not None:
            raise ValueError(f"self-minority: give {name} once, got {long!r} and {short!r}")
    return SelfGuidedMinority(
        w,
        level=0.8 if level is None and p is None else (level if level is not None else p),
        every=5 if every is None and k is None else (every if every is not None else k),
        cutoff=cutoff,
        sign=sign,
        chunk_size=chunk,
        draws=draws,
        distance=distance,
        variance=variance,
        model_name=getattr(bundle, "name", None),
    )


register_guidance("self-minority", _self_minority)


def _minority(bundle: Any, *, level: int | None = None, w: float = 1.0, classifier: str | None = None) -> Guidance:
    """``minority[:level=L-1][,w=1][,classifier=PATH]`` — classifier-based minority guidance (Um et al. 2024;
    :class:`~diffsamplers.guidance.minority.MinorityGuidance`) with the minority classifier shipped beside the
    model's folder (``<folder>_minority``, :func:`~diffsamplers.models.minority_classifier.default_minority_dir`)
    or the one at ``PATH``, checked against the model's id; ``level`` defaults to the most unique, L − 1."""
    from ..guidance.minority import MinorityGuidance
    from ..models.minority_classifier import default_minority_dir, load_minority_classifier, network_id

    name = getattr(bundle, "name", "this model")
    if classifier is None:
        folder = getattr(bundle, "folder", None)
        if folder is None or not (default_minority_dir(folder) / "config.json").is_file():
            where = "it has no model folder" if folder is None else f"there is none at {default_minority_dir(folder)}"
            raise ValueError(
                f"minority: model {name!r} ships no minority classifier ({where}); pass minority:classifier=PATH "
                "(train one with scripts/train_minority_classifier.py)"
            )
        path = default_minority_dir(folder)
    else:
        path = Path(str(classifier))
    net, _ = load_minority_classifier(path, model_id=network_id(bundle.denoiser.model), device=bundle.device)
    target = net.num_levels - 1 if level is None else level
    if isinstance(target, float) and target.is_integer():
        target = int(target)
    return MinorityGuidance(net, target, w)


register_guidance("minority", _minority)


def _cads(
    bundle: Any,
    *,
    tau1: float = 0.6,
    tau2: float = 0.9,
    s: float = 0.1,
    psi: float = 1.0,
    both: bool = False,
) -> Guidance:
    """``cads[:tau1=0.6,tau2=0.9,s=0.1,psi=1,both=false]`` — condition-annealed sampling (Sadat et al. 2024;
    :class:`~diffsamplers.guidance.cads.CADS`) of a class-conditional model's class *embedding*: the network is made
    to take the embedding in place of its label (:func:`~diffsamplers.guidance.cads.class_embedding_input`); a model
    without a learned class embedding (the exact ``gmm-cond``) or without a condition raises ``ValueError``."""
    from ..guidance.cads import CADS, class_embedding_input

    name = getattr(bundle, "name", "this model")
    if not getattr(bundle, "num_classes", 0):
        raise ValueError(f"cads: model {name!r} is unconditional; CADS anneals a condition")
    embed = class_embedding_input(bundle.denoiser.model, f"model {name!r}")
    return CADS(tau1, tau2, s, psi, both=both, embeddings={bundle.cond_key: embed})


register_guidance("cads", _cads)


# -- rewards ----------------------------------------------------------------------------------------

#: A reward: per-sample scores of clean samples, ``(B, *shape) -> (B,)``.
Reward = Callable[[Any], Any]
#: Shipped rewards: name → factory ``(argument, bundle) -> reward``, ``argument`` the text after the name's colon
#: (``None`` without one) and ``bundle`` the model the reward scores samples of (``None``: no model at hand).
REWARDS: dict[str, Callable[[str | None, Any], Reward]] = {}
_REWARD_USAGE: dict[str, str] = {}
_REWARD_IMPORT = "package.module:function"


def register_reward(name: str, factory: Callable[[str | None, Any], Reward], usage: str | None = None) -> None:
    """Make the reward spec ``name[:ARGUMENT]`` build ``factory(argument, bundle)``; ``usage`` is how help texts
    and errors write it (default ``name``)."""
    REWARDS[name] = factory
    _REWARD_USAGE[name] = usage or name


def describe_rewards() -> str:
    """The reward specs, for help texts and errors."""
    return ", ".join([*(_REWARD_USAGE[n] for n in REWARDS), f"{_REWARD_IMPORT} (any callable (B, …) → (B,))"])


def parse_reward(spec: str, bundle: Any = None) -> Reward:
    """The reward a spec names, for samples of ``bundle`` (a :class:`~diffsamplers.apps.registry.ModelBundle`, or
    ``None``): a shipped one (:data:`REWARDS`: ``digits-class:C``, ``pixel-mass[:-1]``; see
    :mod:`diffsamplers.guidance.rewards`) or ``package.module:function``, any callable ``(B, *shape) → (B,)``
    imported with :mod:`importlib`. The name ends at the first colon. ``ValueError`` names the spec and lists the
    rewards it knows."""
    text = str(spec).strip()
    name, colon, arg = text.partition(":")
    if name in REWARDS:
        return REWARDS[name](arg if colon else None, bundle)
    if colon and arg and all(part.isidentifier() for part in name.split(".")):
        return _import_reward(text, name, arg)
    raise ValueError(f"unknown reward {text!r}: expected {describe_rewards()}")


def _import_reward(spec: str, module_name: str, attribute: str) -> Reward:
    """``module:attribute`` (dotted attributes allowed) imported and checked to be callable."""
    import importlib

    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is not None and (module_name == err.name or module_name.startswith(f"{err.name}.")):
            raise ValueError(
                f"reward {spec!r}: no module {module_name!r} to import (expected {describe_rewards()})"
            ) from None
        raise ValueError(f"reward {spec!r}: importing {module_name!r} failed: {err}") from None
    except Exception as err:  # the module exists but fails on import: say so, in one line
        raise ValueError(f"reward {spec!r}: importing {module_name!r} failed ({type(err).__name__}: {err})") from None
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"reward {spec!r}: module {module_name!r} has no attribute {attribute!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(
            f"reward {spec!r}: {module_name}.{attribute} is a {type(obj).__name__}, not a callable (B, …) → (B,)"
        )
    return obj


def _digits_class_reward(arg: str | None, bundle: Any) -> Reward:
    """``digits-class:C`` — the bundled digits classifier's probability of class C
    (:class:`~diffsamplers.guidance.rewards.DigitsClassProbability`), for a model of 1×16×16 images in [−1, 1]."""
    from ..guidance.rewards import DIGITS_SHAPE, DigitsClassProbability

    spec = "digits-class" if arg is None else f"digits-class:{arg}"
    text = (arg or "").strip()
    if not text.isdigit():
        raise ValueError(f"reward {spec!r}: name the digit whose probability it is, e.g. digits-class:3, got {text!r}")
    shape = getattr(bundle, "sample_shape", None)
    if shape is not None and tuple(shape) != DIGITS_SHAPE:
        raise ValueError(
            f"reward {spec!r} scores 1×16×16 digits images in [-1, 1]: model {getattr(bundle, 'name', '?')!r} makes "
            f"samples of shape {tuple(shape)}"
        )
    return DigitsClassProbability(int(text), device=getattr(bundle, "device", None))


def _pixel_mass_reward(arg: str | None, bundle: Any) -> Reward:
    """``pixel-mass[:-1]`` — the mean intensity of a sample in [−1, 1] mapped to [0, 1]; ``:-1`` its mean darkness
    (1 − the intensity: −intensity up to a constant, which the reward methods do not see)
    (:class:`~diffsamplers.guidance.rewards.PixelMass`)."""
    from ..guidance.rewards import PixelMass

    text = (arg or "1").strip()
    if text not in ("1", "+1", "-1"):
        raise ValueError(f"reward 'pixel-mass:{arg}': the sign is 1 (bright) or -1 (dark), got {text!r}")
    return PixelMass(-1 if text == "-1" else 1)


register_reward("digits-class", _digits_class_reward, "digits-class:C")
register_reward("pixel-mass", _pixel_mass_reward, "pixel-mass[:-1]")


def _text_chars_reward(arg: str | None, bundle: Any) -> Reward:
    """``text-chars:CLASS`` — the share of a text sample's characters in CLASS (digit, upper, lower, space, punct, or
    the characters themselves; :class:`~diffsamplers.guidance.rewards.TextCharacterShare`), for a character-level
    masked model (``--model text``)."""
    from ..guidance.rewards import TextCharacterShare

    vocab = getattr(bundle, "vocab", None)
    if vocab is None:
        raise ValueError("reward text-chars needs a character-level masked model such as --model text")
    if not arg:
        raise ValueError("reward text-chars: name the characters, e.g. text-chars:digit or text-chars:aeiou")
    return TextCharacterShare(vocab.symbols, arg)


register_reward("text-chars", _text_chars_reward, "text-chars:CLASS")


# -- reward and particle guidances --------------------------------------------------------------------


def _count(method: str, option: str, value: Any, meaning: str) -> int:
    """A required count option (``k``, ``m``) as an integer ≥ 1; ``ValueError`` naming the option and the value."""
    if value is None:
        raise ValueError(f"{method} needs {option}={option.upper()}, {meaning}")
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value or value < 1:
        raise ValueError(f"{method}: {option} ({meaning}) must be an integer ≥ 1, got {value!r}")
    return int(value)


def _real(method: str, option: str, value: Any) -> float:
    """A numeric option as a float; ``ValueError`` naming the option and the value otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{method}: {option} must be a finite number, got {value!r}")
    return float(value)


def _reward_option(method: str, reward: Any, bundle: Any) -> Reward:
    if reward is None:
        raise ValueError(f"{method} needs reward=SPEC: {describe_rewards()}")
    return parse_reward(str(reward), bundle)


def _particle_options(method: str, interval: Any, start: Any, ess: Any, scheme: Any) -> dict[str, Any]:
    """The shared particle-schedule options that the spec gives (the class's defaults otherwise), checked."""
    options: dict[str, Any] = {}
    if interval is not None:
        options["interval"] = _count(method, "interval", interval, "the evaluations between weighting steps")
    if start is not None:
        options["start"] = _real(method, "start", start)
    if ess is not None:
        options["ess_threshold"] = _real(method, "ess", ess)
    if scheme is not None:
        options["scheme"] = str(scheme)
    return options


def _fk_steering(
    bundle: Any,
    *,
    k: int | None = None,
    reward: str | None = None,
    lam: float = 10.0,
    potential: str = "difference",
    interval: int | None = None,
    start: float | None = None,
    ess: float | None = None,
    scheme: str | None = None,
) -> Guidance:
    """``fk-steering:k=K,reward=SPEC[,lam=10][,potential=difference|max|sum][,interval=N][,start=T][,ess=E]
    [,scheme=S]`` — FK steering (Singhal et al. 2025; :class:`~diffsamplers.guidance.fk_steering.FKSteering`) of K
    particles per group towards p(x0)·exp(λ r(x0)), r the reward spec (:func:`parse_reward`); ``ess`` is the ESS
    threshold (resample where ESS < ess·K; default: always), ``start`` the normalised time weighting starts at. The
    particles of a group are consecutive rows: the number of samples must be a multiple of K, and the sampler
    stochastic (sde-dpm++2m, ddim-eta1, euler-maruyama)."""
    from ..guidance.fk_steering import POTENTIALS, FKSteering

    k = _count("fk-steering", "k", k, "the particles per group")
    if potential not in POTENTIALS:
        raise ValueError(f"fk-steering: unknown potential {potential!r}: expected one of {', '.join(POTENTIALS)}")
    lam = _real("fk-steering", "lam", lam)
    options = _particle_options("fk-steering", interval, start, ess, scheme)
    return FKSteering(_reward_option("fk-steering", reward, bundle), k, lam, potential, **options)


register_guidance("fk-steering", _fk_steering)


def _class_product(bundle: Any, classes: Any) -> list[dict[str, Any]]:
    """``classes=C1-C2[-…]`` as one condition per class (the experts of a product), checked against the model."""
    import torch

    parts = str(classes).split("-")
    if len(parts) < 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(
            f"fkc: classes= names the product's classes, two or more separated by '-' (e.g. 3-5), got {classes!r}"
        )
    labels = bundle.check_classes([int(p) for p in parts], "fkc: classes")
    return [{bundle.cond_key: torch.tensor([c], dtype=torch.long, device=bundle.device)} for c in labels]


def _fkc(
    bundle: Any,
    *,
    k: int | None = None,
    anneal: float | None = None,
    cfg: float | None = None,
    classes: str | None = None,
    interval: int | None = None,
    start: float | None = None,
    ess: float | None = None,
    scheme: str | None = None,
    clamp: float | None = None,
) -> Guidance:
    """``fkc:k=K,anneal=β|cfg=S|classes=C1-C2[,interval=N][,start=T][,ess=E][,scheme=S][,clamp=C]`` — Feynman–Kac
    correctors (Skreta et al. 2025; :class:`~diffsamplers.guidance.fk_correctors.FeynmanKacCorrector`) with K particles
    per group, for exactly one target: ``anneal=β`` the annealed p^β (:meth:`FeynmanKacCorrector.annealing`),
    ``cfg=S`` classifier-free guidance as the geometric mixture p(x)^(1−S) p(x|c)^S (the unconditional expert is the
    model's null label, so no classifier-free scale is needed beside it) or ``classes=C1-C2[-…]`` the product of the class conditionals
    (:meth:`FeynmanKacCorrector.product`). As for fk-steering the number of samples must be a multiple of K and the
    sampler stochastic. ``clamp=C`` centres and clamps each step's log-weight increments to [−C, C] (the official
    code's heuristic; it biases the target)."""
    given = [name for name, v in (("anneal", anneal), ("cfg", cfg), ("classes", classes)) if v is not None]
    if len(given) != 1:
        got = ", ".join(given) if given else "none"
        raise ValueError(f"fkc takes exactly one target: anneal=β, cfg=S or classes=C1-C2, got {got}")
    k = _count("fkc", "k", k, "the particles per group")
    options = _particle_options("fkc", interval, start, ess, scheme)
    if clamp is not None:
        options["clamp"] = _real("fkc", "clamp", clamp)
    if (cfg is not None or classes is not None) and not getattr(bundle, "num_classes", 0):
        raise ValueError(f"fkc: {given[0]}= needs a class-conditional model; {getattr(bundle, 'name', '?')!r} is not")
    from ..guidance.fk_correctors import Expert, FeynmanKacCorrector  # lazy: the module is optional to this parser

    if anneal is not None:
        return FeynmanKacCorrector.annealing(_real("fkc", "anneal", anneal), k, **options)
    if cfg is not None:
        # the unconditional expert is the model's null label: the spec works without a classifier-free scale
        w = _real("fkc", "cfg", cfg)
        null = bundle.conditions(torch.zeros(1, dtype=torch.long), 2.0)[1]
        return FeynmanKacCorrector([Expert(w, "cond"), Expert(1.0 - w, null)], k, **options)
    return FeynmanKacCorrector.product(_class_product(bundle, classes), k, **options)


register_guidance("fkc", _fkc)

#: SVDD's value estimators: ``pm`` the reward of the posterior mean x̂0, ``mc`` a learned value.
_SVDD_VALUES = ("pm", "mc")


def _svdd(
    bundle: Any,
    *,
    m: int | None = None,
    reward: str | None = None,
    alpha: float = 0.0,
    value: str = "pm",
    rollouts: int | None = None,
    rollout_steps: int | None = None,
    chunk: int | None = None,
) -> Guidance:
    """``svdd:m=M,reward=SPEC[,alpha=0][,value=pm|mc][,rollouts=R][,rollout_steps=S][,chunk=C]`` — soft value-based
        decoding
        (Li et al. 2024; :class:`~diffsamplers.guidance.svdd.SVDD`): M candidates of each step per sample, one kept by the
        soft value of the reward spec (:func:`parse_reward`), estimated by the reward of the posterior mean (``pm``) or by
        R Monte-Carlo rollouts of S steps (``mc``), the ``pm`` model calls in chunks of C rows if given (all candidates in
    one call by default); α = 0 keeps the best (the papers' argmax). Needs a stochastic
        sampler; no constraint on the number of samples (the candidates are drawn within each sample)."""
    m = _count("svdd", "m", m, "the candidates per step")
    if value not in _SVDD_VALUES:
        raise ValueError(f"svdd: unknown value estimator {value!r}: expected one of {', '.join(_SVDD_VALUES)}")
    alpha = _real("svdd", "alpha", alpha)
    options: dict[str, Any] = {}
    if rollouts is not None:
        options["rollouts"] = _count("svdd", "rollouts", rollouts, "the rollouts per candidate of value=mc")
    if rollout_steps is not None:
        options["rollout_steps"] = _count("svdd", "rollout_steps", rollout_steps, "the steps of a rollout")
    if chunk is not None:
        options["value_chunk"] = _count("svdd", "chunk", chunk, "the rows per model call of value=pm")
    reward_fn = _reward_option("svdd", reward, bundle)
    from ..guidance.svdd import SVDD  # lazy: the module is optional to this parser

    return SVDD(reward_fn, num_candidates=m, alpha=alpha, value=value, **options)


register_guidance("svdd", _svdd)
