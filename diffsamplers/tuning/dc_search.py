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

``refine_iterations`` > 0 adds a second phase of ours (off by default, so the default is the paper's search):
all ratios together, from the greedy ones, by Adam on the whole trajectory's distance from the ground truth,
L(ρ) = Σ_k MSE(x_k(ρ), x^GT_k) over every level k = 1 … N of a full sampling run (gradients through every
model call). The greedy search fixes ρ_i before seeing how later steps use it; under strong classifier-free
guidance that myopia costs accuracy: on the bundled digits model at scale 7.5 the refinement makes DC-Solver
beat every baseline, while on the exact mixtures it can send rare trajectories astray (docs/dc_solver.md). The
best iterate by L (the greedy start included) is kept, so the refined ratios never fit the search data worse.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
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
    "PAPER_DATAPOINTS",
    "SearchRecord",
    "SearchSettings",
    "data_fingerprint",
    "effective_guidance_scale",
    "search_dc_ratios",
]

#: The number of datapoints the paper optimises the ratios on (and the default minimum).
PAPER_DATAPOINTS = 10

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

    def __post_init__(self) -> None:
        if self.iterations < 1 or not self.lr > 0:
            raise ValueError(f"need iterations >= 1 and lr > 0, got {self.iterations} and {self.lr}")
        if self.refine_iterations < 0 or not self.refine_lr > 0:
            raise ValueError(
                f"need refine_iterations >= 0 and refine_lr > 0, got {self.refine_iterations} and {self.refine_lr}"
            )
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
    """
    if not isinstance(solver, DCSolver):
        raise TypeError(f"solver must be a DCSolver, got {type(solver).__name__}")
    _check_datapoints(x_T, min_datapoints)
    settings = SearchSettings(iterations, lr, optimizer, bound, refine_iterations, refine_lr)
    solver = solver.with_ratios(None)
    plan = solver.plan(denoiser.process, schedule)
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
    search = _Search(run, solver, reference, settings, result, record, checkpoint_path, log or (lambda _line: None))
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
            "done": settings.refine_iterations == 0,
        },
    )


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


def _refine_key(refine: Mapping[str, Any]) -> tuple[int, float | None]:
    """What decides a refinement's result: its iterations and, when there are any, its learning rate."""
    iterations = int(refine.get("iterations", 0))
    return iterations, (float(refine["lr"]) if iterations else None)


def _refine(search: _Search, x_T: torch.Tensor) -> None:
    """The joint refinement after the greedy search (checkpointed first, so that an interruption redoes only it)."""
    result, record = search.result, search.record
    record.greedy_ratios = list(result.ratios)
    result.searched_steps = result.nfe  # greedy complete; the refinement is redone if interrupted
    search.save()
    clock = time.perf_counter()
    refined, before, after = _refine_jointly(search, x_T, result.ratios)
    result.ratios = refined
    record.refine.update(done=True, loss_before=before, loss_after=after, seconds=time.perf_counter() - clock)
    search.log(f"joint refinement: trajectory loss {before:.4e} -> {after:.4e}")


def _refine_jointly(search: _Search, x_T: torch.Tensor, ratios: list[float]) -> tuple[list[float], float, float]:
    """All ratios together by Adam on Σ_k MSE(x_k, x^GT_k) over a whole sampling run; the best iterate.

    Returns (ratios, loss of the given ratios, loss of the returned ones).
    """
    solver, plan, settings = search.solver, search.plan, search.settings
    n, order = plan.num_evals, solver.dc_order
    times = [solver.compensation_times(plan, k) for k in range(order, n)]
    targets = search.reference[1:].to(device=x_T.device, dtype=x_T.dtype)
    param = torch.tensor(ratios[order:], dtype=x_T.dtype, device=x_T.device, requires_grad=True)
    opt = torch.optim.Adam([param], lr=settings.refine_lr)

    def trajectory_loss(free: torch.Tensor) -> torch.Tensor:
        run, x, loss = search.run.branch(), x_T, x_T.new_zeros(())
        run.state = solver.init_state()
        for k in range(n):
            weights = lagrange_weights(free[k - order], times[k - order]) if k >= order else ()
            x = step(run, k, x, compensation=weights)
            loss = loss + torch.nn.functional.mse_loss(x, targets[k])
        return loss

    iterations = settings.refine_iterations
    best_loss, best, first = math.inf, list(ratios), math.nan
    for it in range(iterations + 1):
        with torch.enable_grad():
            loss = trajectory_loss(param)
            value = float(loss.detach())
            if it < iterations:
                (param.grad,) = torch.autograd.grad(loss, [param])
        if it == 0:
            first = value
        if math.isfinite(value) and value < best_loss:
            best_loss, best = value, ratios[:order] + [float(v) for v in param.detach().tolist()]
        if it < iterations:
            opt.step()
    return best, first, best_loss
