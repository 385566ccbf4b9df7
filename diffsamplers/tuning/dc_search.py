"""Searching DC-Solver's compensation ratios (Zhao et al. 2024, arXiv:2409.03755, Sec. 3.3, Eq. 12).

Greedy and sequential along the sampling trajectory of a few datapoints (the paper uses 10): at step i,
with the trajectory so far fixed, ρ_i is optimised so that the sample at the *next* noise level — after
the compensated predictor and, when the solver has one, the corrector there, which evaluates the model at
the predicted point (the gradient flows through that model call) — matches a ground-truth trajectory at
the same level, L(ρ_i) = MSE(x_{i+1}(ρ_i), x^GT_{i+1}). At the last step there is no corrector and the
final sample is compared with the ground truth's final sample. Then the real step is taken with the found
ρ_i and the search moves on; the first ``dc_order`` steps keep ρ = 1.

Defaults follow the official LDM code: AdamW, lr 0.1, ρ starting at 1, 40 iterations, the last iterate.
The ground truth is :func:`diffsamplers.reference.reference_trajectory` (from the same x_T, on a grid
containing the target levels, so step k is compared at its own noise level — the official diffusers script
pairs them off by one). Every step is the package's one step function (:mod:`diffsamplers.step`: ``predict``,
``correct``, ``advance``) with differentiable Lagrange weights passed as the compensation, so sampling with the
found ratios reproduces the searched trajectory exactly. After every step the ratios found so far are written atomically to
``checkpoint``; a search started with an existing incomplete checkpoint for the same configuration and
data resumes there.

``refine_iterations`` > 0 adds a second phase of ours (off by default, so the default is the paper's search): all
ratios together, from the greedy ones, by Adam on the whole trajectory's distance from the ground truth, L(ρ) = Σ_k
MSE(x_k(ρ), x^GT_k) over every level k = 1 … N of a full sampling run of the search noises (gradients through every
model call). The greedy search fixes ρ_i before seeing how later steps use it; under strong classifier-free
guidance that myopia costs accuracy (on the bundled digits model at scale 7.5 the refinement makes DC-Solver beat
every baseline). But N − ``dc_order`` free ratios fitted jointly to 10 noises can overfit them, so the refinement
is *validated*: ``refine_validation`` takes the initial noise of other datapoints (with their conditions and,
optionally, reference trajectory — else computed like the search's), L of every iterate is measured on them without
gradients, the iterate with the lowest validation L is kept — the greedy start included, so the result never fits
the validation noises worse than the greedy ratios — and ``refine_patience`` iterations without a lower validation
L stop it. Validation noises are required: the DC paper (Zhao et al. 2024, arXiv:2409.03755) has no joint phase to
follow, and its 10 search noises cannot tell a better fit from an overfit. ``refine_validation="search"`` is the
explicit opt-in to the unvalidated refinement of earlier versions (the best iterate by L on the search noises
themselves; with ``refine_patience=None`` exactly the old result, which is also what a ratio file refined before
validation existed resumes as). A penalty toward the greedy ratios, λ·Σ(ρ − ρ_greedy)², was measured and not kept:
it made the validated refinement's held-out error worse at NFE 6–10 for λ = 1e-3, 1e-2 and 1e-1 on the generated
mixture of docs/dc_solver.md. ``SearchRecord.refine`` holds the settings, the validation data's size and
fingerprint, L on the search and the validation noises of the greedy and the kept ratios
(``loss_before``/``loss_after``, ``validation_loss_before``/``validation_loss_after``), the kept iterate
(``best_iteration``), ``iterations_run`` and ``stopped_early``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from ..denoiser import Denoiser, compute_dtype
from ..reference import REFERENCE_STEPS, reference_trajectory
from ..schedules.schedule import Schedule
from ..solvers.base import LinearStep, SolverPlan
from ..solvers.dc_ratios import DCRatios, RatioMismatchError, schedule_description, solver_settings
from ..solvers.dc_solver import DCSolver, lagrange_weights
from ..step import SamplingRun, advance, correct, predict, step

__all__ = [
    "ON_SEARCH_NOISES",
    "PAPER_DATAPOINTS",
    "REFINE_PATIENCE",
    "SearchRecord",
    "SearchSettings",
    "data_fingerprint",
    "effective_guidance_scale",
    "search_dc_ratios",
]

#: The number of datapoints the paper optimises the ratios on (and the default minimum).
PAPER_DATAPOINTS = 10
#: The joint refinement stops after this many iterations without a lower validation loss.
REFINE_PATIENCE = 20
#: ``refine_validation`` value for the unvalidated refinement (the best iterate on the search noises themselves).
ON_SEARCH_NOISES = "search"

Cond = Mapping[str, Any] | None


def effective_guidance_scale(denoiser: Denoiser, uncond: Cond, guidance_scale: float | None) -> float:
    """The classifier-free guidance scale a run uses (1 when there is no unconditional input)."""
    if uncond is None:
        return 1.0
    return float(denoiser.guidance_scale if guidance_scale is None else guidance_scale)


def data_fingerprint(x_T: torch.Tensor, cond: Cond = None) -> str:
    """A short hash of the datapoints (noise and conditions), to refuse resuming on other data."""
    digest = hashlib.sha256()
    digest.update(x_T.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    for key in sorted(cond or {}):
        value = (cond or {})[key]
        if isinstance(value, torch.Tensor):
            digest.update(key.encode())
            digest.update(value.detach().to("cpu").contiguous().float().numpy().tobytes())
    return digest.hexdigest()[:16]


def _bound(kind: str | None) -> tuple[Callable[[torch.Tensor], torch.Tensor], float]:
    """(parameter → ratio, initial parameter); "tanh" keeps ρ in (0.5, 1.5) (the official option)."""
    if kind in (None, "none"):
        return (lambda p: p), 1.0
    if kind == "tanh":
        return (lambda p: 1.0 + 0.5 * torch.tanh(p)), 0.0
    raise ValueError(f"unknown bound {kind!r}: expected None, 'none' or 'tanh'")


@dataclass(frozen=True)
class SearchSettings:
    """How the ratios are optimised: the paper's greedy search (``iterations`` steps of ``optimizer`` at ``lr``
    per ratio, ρ optionally ``bound``ed) and the optional joint refinement after it."""

    iterations: int = 40
    lr: float = 0.1
    optimizer: Literal["adamw", "adam"] = "adamw"
    bound: Literal["none", "tanh"] | None = None
    refine_iterations: int = 0
    refine_lr: float = 0.02
    refine_patience: int | None = REFINE_PATIENCE

    def __post_init__(self) -> None:
        if self.iterations < 1 or not self.lr > 0:
            raise ValueError(f"need iterations >= 1 and lr > 0, got {self.iterations} and {self.lr}")
        if self.refine_iterations < 0 or not self.refine_lr > 0:
            raise ValueError(
                f"need refine_iterations >= 0 and refine_lr > 0, got {self.refine_iterations} and {self.refine_lr}"
            )
        if self.refine_patience is not None and self.refine_patience < 1:
            raise ValueError(f"refine_patience must be >= 1 or None (no early stopping), got {self.refine_patience}")
        if self.optimizer not in ("adamw", "adam"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}: expected 'adamw' or 'adam'")
        _bound(self.bound)


@dataclass
class SearchRecord:
    """How a ratio file was made (its ``search`` metadata): data, settings, per-step losses, time, refinement."""

    datapoints: int
    data_fingerprint: str
    iterations: int
    lr: float
    optimizer: str
    bound: str
    reference_steps: int | None
    loss_before: list[float | None]
    loss_after: list[float | None]
    seconds: float = 0.0
    refine: dict[str, Any] = field(default_factory=dict)
    greedy_ratios: list[float] | None = None

    def metadata(self) -> dict[str, Any]:
        out = asdict(self)
        if out["greedy_ratios"] is None:
            del out["greedy_ratios"]
        return out


@dataclass
class _Validation:
    """The joint refinement's validation noises (conditions) and their reference trajectory (computed when needed)."""

    x_T: torch.Tensor
    cond: Cond
    uncond: Cond
    reference: torch.Tensor | None
    reference_steps: int | None  # None: the reference was given
    schedule: Schedule

    def describe(self) -> dict[str, Any]:
        """What identifies the validation data in the record (and decides whether a refinement resumes)."""
        return {
            "datapoints": int(self.x_T.shape[0]),
            "data_fingerprint": data_fingerprint(self.x_T, self.cond),
            "reference_steps": self.reference_steps,
        }


@dataclass
class _Search:
    """What the steps of one search share: the no-grad run along the trajectory, its reference and the result."""

    run: SamplingRun
    solver: DCSolver
    reference: torch.Tensor
    settings: SearchSettings
    result: DCRatios
    record: SearchRecord
    checkpoint: Path | None
    log: Callable[[str], None]
    validation: _Validation | None = None  # None: the refinement validates on the search noises

    @property
    def plan(self) -> SolverPlan:
        return self.run.plan

    def save(self) -> None:
        self.result.search = self.record.metadata()
        if self.checkpoint is not None:
            self.result.save(self.checkpoint)


def search_dc_ratios(
    denoiser: Denoiser,
    solver: DCSolver,
    schedule: Schedule,
    x_T: torch.Tensor,
    *,
    model_id: str,
    cond: Cond = None,
    uncond: Cond = None,
    guidance_scale: float | None = None,
    reference: torch.Tensor | None = None,
    reference_steps: int = REFERENCE_STEPS,
    iterations: int = 40,
    lr: float = 0.1,
    optimizer: Literal["adamw", "adam"] = "adamw",
    bound: Literal["none", "tanh"] | None = None,
    min_datapoints: int = PAPER_DATAPOINTS,
    checkpoint: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = None,
    refine_iterations: int = 0,
    refine_lr: float = 0.02,
    refine_validation: torch.Tensor | Literal["search"] | None = None,
    refine_validation_cond: Cond = None,
    refine_validation_uncond: Cond = None,
    refine_validation_reference: torch.Tensor | None = None,
    refine_patience: int | None = REFINE_PATIENCE,
) -> DCRatios:
    """Search the ratios of ``solver`` (its own ratios are ignored) for ``denoiser`` on ``schedule``.

    Args:
        x_T: the datapoints' initial noise, at the schedule's first level (at least ``min_datapoints``).
        model_id: a name for the model, stored with the ratios and checked when they are loaded.
        cond / uncond / guidance_scale: as for :func:`diffsamplers.sample` (classifier-free guidance when
            ``uncond`` is given and the scale is not 1).
        reference: the ground-truth trajectory, shape (N + 1, *x_T.shape) as returned by
            :func:`reference_trajectory`; computed with ``reference_steps`` steps when not given.
        iterations / lr / optimizer / bound: the per-step optimisation (official: 40 / 0.1 / AdamW / none).
        checkpoint: a ``.safetensors`` path written after every step and resumed from.
        log: called with a line per searched step.
        refine_iterations / refine_lr: the joint trajectory refinement after the greedy search (Adam steps and
            learning rate; 0 = the paper's greedy search only).
        refine_validation: with ``refine_iterations`` > 0, the initial noise of other datapoints (same sample
            shape as ``x_T``'s, at least one) on which each iterate's trajectory loss is measured: the iterate
            with the lowest validation loss is kept (the greedy start included). ``"search"`` is the unvalidated
            refinement (the best iterate on the search noises themselves, which overfits them); required.
        refine_validation_cond / refine_validation_uncond: the validation datapoints' conditions (needed when the
            search has ``cond`` / ``uncond``).
        refine_validation_reference: their reference trajectory, shape (N + 1, *refine_validation.shape);
            computed with ``reference_steps`` steps when not given.
        refine_patience: stop after this many iterations without a lower validation loss (``None``: never).
    """
    if not isinstance(solver, DCSolver):
        raise TypeError(f"solver must be a DCSolver, got {type(solver).__name__}")
    _check_datapoints(x_T, min_datapoints)
    settings = SearchSettings(iterations, lr, optimizer, bound, refine_iterations, refine_lr, refine_patience)
    solver = solver.with_ratios(None)
    plan = solver.plan(denoiser.process, schedule)
    validation = _validation(
        settings,
        x_T,
        cond,
        uncond,
        refine_validation,
        refine_validation_cond,
        refine_validation_uncond,
        refine_validation_reference,
        reference_steps,
        schedule,
        plan.num_evals,
    )
    given_reference = reference is not None
    if reference is None:
        reference = reference_trajectory(
            denoiser, schedule, x_T, steps=reference_steps, cond=cond, uncond=uncond, guidance_scale=guidance_scale
        )
    if tuple(reference.shape) != (plan.num_evals + 1, *x_T.shape):
        raise ValueError(f"reference must have shape {(plan.num_evals + 1, *x_T.shape)}, got {tuple(reference.shape)}")
    x = x_T.to(compute_dtype(x_T.dtype))
    run = SamplingRun.start(
        solver, plan, x, denoiser=denoiser, cond=cond, uncond=uncond, guidance_scale=guidance_scale, check_finite=False
    )
    record = _new_record(x_T, cond, settings, None if given_reference else reference_steps, plan.num_evals)
    if settings.refine_iterations > 0:
        record.refine["validation"] = ON_SEARCH_NOISES if validation is None else validation.describe()
    result = DCRatios(
        ratios=[1.0] * plan.num_evals,
        model=model_id,
        guidance_scale=effective_guidance_scale(denoiser, uncond, guidance_scale),
        schedule=schedule_description(schedule, denoiser.process),
        solver=solver_settings(solver),
        search=record.metadata(),
        searched_steps=solver.dc_order,
    )
    checkpoint_path = None if checkpoint is None else Path(checkpoint)
    search = _Search(
        run, solver, reference, settings, result, record, checkpoint_path, log or (lambda _line: None), validation
    )
    finished = _resume(search)
    if finished is not None:
        return finished
    _greedy_search(search, x)
    if settings.refine_iterations > 0:
        _refine(search, x)
    result.searched_steps = None
    search.save()
    return result


def _new_record(
    x_T: torch.Tensor, cond: Cond, settings: SearchSettings, reference_steps: int | None, nfe: int
) -> SearchRecord:
    return SearchRecord(
        datapoints=int(x_T.shape[0]),
        data_fingerprint=data_fingerprint(x_T, cond),
        iterations=settings.iterations,
        lr=settings.lr,
        optimizer=settings.optimizer,
        bound=settings.bound or "none",
        reference_steps=reference_steps,
        loss_before=[None] * nfe,
        loss_after=[None] * nfe,
        refine={
            "iterations": settings.refine_iterations,
            "lr": settings.refine_lr,
            "patience": settings.refine_patience,
            "done": settings.refine_iterations == 0,
        },
    )


def _validation(
    settings: SearchSettings,
    x_T: torch.Tensor,
    cond: Cond,
    uncond: Cond,
    noise: torch.Tensor | str | None,
    noise_cond: Cond,
    noise_uncond: Cond,
    reference: torch.Tensor | None,
    reference_steps: int,
    schedule: Schedule,
    nfe: int,
) -> _Validation | None:
    """The refinement's validation data, checked (``None``: no refinement, or the unvalidated one)."""
    if settings.refine_iterations == 0:
        return None
    if isinstance(noise, str):
        if noise != ON_SEARCH_NOISES:
            raise ValueError(
                f"refine_validation must be a tensor of initial noise or {ON_SEARCH_NOISES!r}, got {noise!r}"
            )
        return None
    if noise is None:
        raise ValueError(
            "the joint refinement (refine_iterations > 0) needs validation noises: refine_validation=<x_T of other "
            f"datapoints> (the best fit of the search noises can overfit them), or refine_validation={ON_SEARCH_NOISES!r} "
            "for the unvalidated refinement"
        )
    if not isinstance(noise, torch.Tensor):
        raise TypeError(f"refine_validation must be a tensor, got {type(noise).__name__}")
    if noise.ndim != x_T.ndim or noise.shape[0] < 1 or tuple(noise.shape[1:]) != tuple(x_T.shape[1:]):
        raise ValueError(
            f"refine_validation must hold at least one sample of x_T's sample shape {tuple(x_T.shape[1:])}: "
            f"shape (M, {', '.join(str(d) for d in x_T.shape[1:])}), got {tuple(noise.shape)}"
        )
    for name, given, needed in (("cond", noise_cond, cond), ("uncond", noise_uncond, uncond)):
        if needed is not None and given is None:
            raise ValueError(f"the search has {name}: give the validation datapoints' refine_validation_{name} too")
    if reference is not None and tuple(reference.shape) != (nfe + 1, *noise.shape):
        raise ValueError(
            f"refine_validation_reference must have shape {(nfe + 1, *noise.shape)}, got {tuple(reference.shape)}"
        )
    x = noise.to(device=x_T.device, dtype=compute_dtype(x_T.dtype))
    steps = None if reference is not None else reference_steps
    return _Validation(x, noise_cond, noise_uncond, reference, steps, schedule)


def _check_datapoints(x_T: torch.Tensor, min_datapoints: int) -> None:
    if min_datapoints < 1:
        raise ValueError(f"min_datapoints must be at least 1, got {min_datapoints}")
    if x_T.ndim < 2 or x_T.shape[0] < min_datapoints:
        got = x_T.shape[0] if x_T.ndim >= 1 else 0
        raise ValueError(
            f"the ratio search needs at least {min_datapoints} datapoints (the paper uses {PAPER_DATAPOINTS}), "
            f"got {got}"
        )


def _resume(search: _Search) -> DCRatios | None:
    """Continue from a checkpoint of the same configuration and data: the stored result if it is complete
    (greedy and refinement), else ``None`` with the search's state moved to where the checkpoint stopped."""
    path, result, record = search.checkpoint, search.result, search.record
    if path is None or not path.exists():
        return None
    previous = DCRatios.load(path).check(
        nfe=result.nfe,
        model=result.model,
        guidance_scale=result.guidance_scale,
        schedule=result.schedule,
        solver=result.solver,
        source=f"checkpoint {path}",
        allow_incomplete=True,
    )
    if previous.search.get("data_fingerprint") != record.data_fingerprint:
        raise RatioMismatchError(
            f"checkpoint {path} was searched on other datapoints "
            f"(fingerprint {previous.search.get('data_fingerprint')} vs {record.data_fingerprint})"
        )
    previous_refine = previous.search.get("refine", {"iterations": 0, "done": True})
    same_refine = _refine_key(previous_refine) == _refine_key(record.refine)
    if previous.complete and same_refine and previous_refine.get("done"):
        return previous
    result.ratios = list(previous.search.get("greedy_ratios") or previous.ratios)
    record.loss_before = list(previous.search["loss_before"])
    record.loss_after = list(previous.search["loss_after"])
    record.seconds = float(previous.search["seconds"])
    order = search.solver.dc_order
    result.searched_steps = result.nfe if previous.complete else max(order, int(previous.searched_steps or 0))
    return None


def _greedy_search(search: _Search, x: torch.Tensor) -> None:
    """The paper's search along the trajectory: ρ_k for each step not searched yet, then the real step with it."""
    run, solver, plan, result, record = search.run, search.solver, search.plan, search.result, search.record
    done = int(result.searched_steps or solver.dc_order)
    clock = time.perf_counter()
    for k in range(plan.num_evals):
        with torch.no_grad():
            c, x_c = correct(run, k, x, predict(run, k, x))
        times = solver.compensation_times(plan, k) if k >= solver.dc_order else None
        if times is not None and k >= done:
            ratio, before, after = _search_ratio(search, k, c, x_c, times)
            result.ratios[k] = ratio
            record.loss_before[k], record.loss_after[k] = before, after
            search.log(f"step {k + 1}/{plan.num_evals}: ratio {ratio:.4f}, loss {before:.4e} -> {after:.4e}")
        ratio = result.ratios[k]
        weights = lagrange_weights(ratio, times) if times is not None and ratio != 1.0 else ()
        with torch.no_grad():
            x = advance(run, k, c, x_c, compensation=weights)
        if k >= done:
            result.searched_steps = k + 1
            record.seconds += time.perf_counter() - clock
            clock = time.perf_counter()
            search.save()


def _search_ratio(
    search: _Search, k: int, c: LinearStep, x_c: torch.Tensor, times: list[float]
) -> tuple[float, float, float]:
    """ρ_k minimising L(ρ) = MSE(x_{k+1}(ρ), x^GT_{k+1}): x_{k+1} is the compensated update from the corrected
    x_k and, when the next step corrects, its correction (through a model call). Returns (ρ_k, L(1), L(ρ_k))."""
    run, plan, settings = search.run, search.plan, search.settings
    work = x_c.dtype
    target = search.reference[k + 1].to(device=x_c.device, dtype=work)
    corrected = k + 1 < plan.num_evals and plan.steps[k + 1].corrector is not None

    def loss_at(ratio: torch.Tensor) -> torch.Tensor:
        trial = run.branch()
        x_next = advance(trial, k, c, x_c, compensation=lagrange_weights(ratio, times))
        if corrected:
            _, x_next = correct(trial, k + 1, x_next, predict(trial, k + 1, x_next))
        return torch.nn.functional.mse_loss(x_next, target)

    to_ratio, start = _bound(settings.bound)
    param = torch.tensor(start, dtype=work, device=x_c.device, requires_grad=True)
    opt_cls = torch.optim.AdamW if settings.optimizer == "adamw" else torch.optim.Adam
    opt = opt_cls([param], lr=settings.lr)
    before = math.nan
    for i in range(settings.iterations):
        with torch.enable_grad():
            loss = loss_at(to_ratio(param))
            (param.grad,) = torch.autograd.grad(loss, [param])
        if i == 0:
            before = float(loss.detach())
        opt.step()
    with torch.no_grad():
        ratio = float(to_ratio(param))
        after = float(loss_at(torch.tensor(ratio, dtype=work, device=x_c.device)))
    if not math.isfinite(ratio):
        raise FloatingPointError(f"the ratio search diverged at step {k} (loss {before})")
    return ratio, before, after


def _refine_key(refine: Mapping[str, Any]) -> tuple[Any, ...]:
    """What decides a refinement's result: its iterations and, when there are any, its learning rate, patience and
    validation data (a record from before validation: the unvalidated refinement without early stopping)."""
    iterations = int(refine.get("iterations", 0))
    if not iterations:
        return (0,)
    patience = refine.get("patience")
    validation = json.dumps(refine.get("validation", ON_SEARCH_NOISES), sort_keys=True)
    return (
        iterations,
        float(refine["lr"]),
        None if patience is None else int(patience),
        validation,
    )


@dataclass
class _Refined:
    """A refinement's outcome: the kept ratios, the trajectory loss on the search and validation noises of the
    greedy start and of the kept iterate, which iterate it is, how many ran and whether patience ran out."""

    ratios: list[float]
    loss_before: float
    loss_after: float
    validation_loss_before: float
    validation_loss_after: float
    best_iteration: int
    iterations_run: int
    stopped_early: bool


def _refine(search: _Search, x_T: torch.Tensor) -> None:
    """The joint refinement after the greedy search (checkpointed first, so that an interruption redoes only it)."""
    result, record = search.result, search.record
    record.greedy_ratios = list(result.ratios)
    result.searched_steps = result.nfe  # greedy complete; the refinement is redone if interrupted
    search.save()
    clock = time.perf_counter()
    out = _refine_jointly(search, x_T, result.ratios)
    result.ratios = out.ratios
    found = asdict(out)
    del found["ratios"]
    record.refine.update(done=True, **found, seconds=time.perf_counter() - clock)
    on = "search noises" if search.validation is None else f"{search.validation.x_T.shape[0]} validation noises"
    search.log(
        f"joint refinement: trajectory loss {out.loss_before:.4e} -> {out.loss_after:.4e}, on the {on} "
        f"{out.validation_loss_before:.4e} -> {out.validation_loss_after:.4e} (iteration {out.best_iteration} of "
        f"{out.iterations_run}{', stopped early' if out.stopped_early else ''})"
    )


def _validation_data(search: _Search) -> tuple[SamplingRun, torch.Tensor, torch.Tensor] | None:
    """The validation run (the search's, on the validation datapoints), initial noise and targets (levels 1 … N)."""
    validation = search.validation
    if validation is None:
        return None
    run = search.run
    if validation.reference is None:
        assert validation.reference_steps is not None and run.denoiser is not None
        validation.reference = reference_trajectory(
            run.denoiser,
            validation.schedule,
            validation.x_T,
            steps=validation.reference_steps,
            cond=validation.cond,
            uncond=validation.uncond,
            guidance_scale=run.guidance_scale,
        )
    x = validation.x_T
    rows = range(int(x.shape[0]))
    vrun = replace(run, cond=validation.cond, uncond=validation.uncond, rows=rows, state=search.solver.init_state())
    return vrun, x, validation.reference[1:].to(device=x.device, dtype=x.dtype)


def _refine_jointly(search: _Search, x_T: torch.Tensor, ratios: list[float]) -> _Refined:
    """All ratios together by Adam on Σ_k MSE(x_k, x^GT_k) over a whole sampling run of the search noises; the
    iterate with the lowest such loss on the validation noises (on the search noises when there are none) is kept,
    the greedy start included; stops when patience runs out."""
    solver, plan, settings = search.solver, search.plan, search.settings
    n, order = plan.num_evals, solver.dc_order
    times = [solver.compensation_times(plan, k) for k in range(order, n)]
    targets = search.reference[1:].to(device=x_T.device, dtype=x_T.dtype)
    param = torch.tensor(ratios[order:], dtype=x_T.dtype, device=x_T.device, requires_grad=True)
    opt = torch.optim.Adam([param], lr=settings.refine_lr)
    validation = _validation_data(search)

    def trajectory_loss(start: SamplingRun, x: torch.Tensor, goal: torch.Tensor, free: torch.Tensor) -> torch.Tensor:
        run, loss = start.branch(), x.new_zeros(())
        run.state = solver.init_state()
        for k in range(n):
            weights = lagrange_weights(free[k - order], times[k - order]) if k >= order else ()
            x = step(run, k, x, compensation=weights)
            loss = loss + torch.nn.functional.mse_loss(x, goal[k])
        return loss

    iterations, patience = settings.refine_iterations, settings.refine_patience
    best = _Refined(list(ratios), math.nan, math.nan, math.nan, math.inf, 0, 0, False)
    for it in range(iterations + 1):
        if it > 0:
            opt.step()
        with torch.set_grad_enabled(it < iterations):
            fit = trajectory_loss(search.run, x_T, targets, param)
            if it < iterations:
                (param.grad,) = torch.autograd.grad(fit, [param])
        current = param.detach().clone()
        fit_value = float(fit.detach())
        if validation is None:
            held_out = fit_value
        else:
            with torch.no_grad():
                held_out = float(trajectory_loss(*validation, current))
        best.iterations_run = it
        if it == 0:
            best.loss_before, best.validation_loss_before = fit_value, held_out
        kept = best.validation_loss_after
        if it == 0 or (math.isfinite(held_out) and not held_out >= kept):  # (a NaN start is beaten by any finite loss)
            best.ratios = list(ratios) if it == 0 else ratios[:order] + [float(v) for v in current.tolist()]
            best.loss_after, best.validation_loss_after, best.best_iteration = fit_value, held_out, it
        elif patience is not None and it - best.best_iteration >= patience:
            best.stopped_early = it < iterations
            break
    return best
