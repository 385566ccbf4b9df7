"""Searching DC-Solver's compensation ratios (Zhao et al. 2024, arXiv:2409.03755, Sec. 3.3, Eq. 12).

Greedy and sequential along the sampling trajectory of a few datapoints (the paper uses 10): at step i,
with the trajectory so far fixed, ρ_i is optimised so that the sample at the *next* noise level — after
the compensated predictor and, when the solver has one, the corrector there, which evaluates the model at
the predicted point (the gradient flows through that model call) — matches a ground-truth trajectory at
the same level, L(ρ_i) = MSE(x_{i+1}(ρ_i), x^GT_{i+1}). At the last step there is no corrector and the
final sample is compared with the ground truth's final sample. Then the real step is taken with the found
ρ_i and the search moves on; the first ``dc_order`` steps keep ρ = 1.

Defaults follow the official LDM code: AdamW, lr 0.1, ρ starting at 1, 40 iterations, the last iterate.
The ground truth is :func:`diffsamplers.trajectory.reference_trajectory` (1,000 steps from the same x_T,
on a grid containing the target levels — not the official diffusers script's off-by-one pairing, see the
reference notes §2.7). Everything the step does is :class:`~diffsamplers.solvers.DCSolver`'s own
``correct``/``advance`` with differentiable Lagrange weights, so sampling with the found ratios reproduces
the searched trajectory exactly. After every step the ratios found so far are written atomically to
``checkpoint``; a search started with an existing incomplete checkpoint for the same configuration and
data resumes there.

``refine_iterations`` > 0 adds a second phase of ours (off by default, so the default is the paper's search):
all ratios together, from the greedy ones, by Adam on the whole trajectory's distance from the ground truth,
L(ρ) = Σ_k MSE(x_k(ρ), x^GT_k) over every level k = 1 … N of a full sampling run (gradients through every
model call). The greedy search fixes ρ_i before seeing how later steps use it; under strong classifier-free
guidance that myopia costs accuracy: on the bundled digits model at scale 7.5 the refinement makes DC-Solver
beat every baseline, while on the exact mixtures it can send rare trajectories astray (README tables). The
best iterate by L (the greedy start included) is kept, so the refined ratios never fit the search data worse.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from ..denoiser import Denoiser, compute_dtype
from ..sampling import _timesteps_on
from ..schedules.schedule import Schedule
from ..solvers.base import SolverPlan, SolverState
from ..solvers.dc_solver import DCSolver, lagrange_weights
from ..trajectory import DEFAULT_REFERENCE_STEPS, reference_trajectory
from .ratios import DCRatios, RatioMismatchError, schedule_description, solver_settings

__all__ = ["search_dc_ratios", "effective_guidance_scale", "data_fingerprint", "PAPER_DATAPOINTS"]

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
    reference_steps: int = DEFAULT_REFERENCE_STEPS,
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
    if min_datapoints < 1:
        raise ValueError(f"min_datapoints must be at least 1, got {min_datapoints}")
    if x_T.ndim < 2 or x_T.shape[0] < min_datapoints:
        got = x_T.shape[0] if x_T.ndim >= 1 else 0
        raise ValueError(
            f"the ratio search needs at least {min_datapoints} datapoints (the paper uses {PAPER_DATAPOINTS}), "
            f"got {got}"
        )
    if iterations < 1 or not lr > 0:
        raise ValueError(f"need iterations >= 1 and lr > 0, got {iterations} and {lr}")
    if refine_iterations < 0 or not refine_lr > 0:
        raise ValueError(f"need refine_iterations >= 0 and refine_lr > 0, got {refine_iterations} and {refine_lr}")
    if optimizer not in ("adamw", "adam"):
        raise ValueError(f"unknown optimizer {optimizer!r}: expected 'adamw' or 'adam'")
    to_ratio, start = _bound(bound)
    process = denoiser.process
    solver = solver.with_ratios(None)
    plan = solver.plan(process, schedule)
    n, order = plan.num_evals, solver.dc_order
    scale = effective_guidance_scale(denoiser, uncond, guidance_scale)
    device, work = x_T.device, compute_dtype(x_T.dtype)
    given_reference = reference is not None
    if reference is None:
        reference = reference_trajectory(
            denoiser, schedule, x_T, steps=reference_steps, cond=cond, uncond=uncond, guidance_scale=guidance_scale
        )
    if tuple(reference.shape) != (n + 1, *x_T.shape):
        raise ValueError(f"reference must have shape {(n + 1, *x_T.shape)}, got {tuple(reference.shape)}")

    result = DCRatios(
        ratios=[1.0] * n,
        model=model_id,
        guidance_scale=scale,
        schedule=schedule_description(schedule, process),
        solver=solver_settings(solver),
        search={
            "datapoints": int(x_T.shape[0]),
            "data_fingerprint": data_fingerprint(x_T, cond),
            "iterations": iterations,
            "lr": lr,
            "optimizer": optimizer,
            "bound": bound or "none",
            "reference_steps": None if given_reference else reference_steps,
            "loss_before": [None] * n,
            "loss_after": [None] * n,
            "seconds": 0.0,
            "refine": {"iterations": refine_iterations, "lr": refine_lr, "done": refine_iterations == 0},
        },
        searched_steps=order,
    )
    done = order  # steps whose ratio is known
    if checkpoint is not None and Path(checkpoint).exists():
        previous = DCRatios.load(checkpoint).check(
            nfe=n,
            model=model_id,
            guidance_scale=scale,
            schedule=result.schedule,
            solver=result.solver,
            source=f"checkpoint {checkpoint}",
            allow_incomplete=True,
        )
        if previous.search.get("data_fingerprint") != result.search["data_fingerprint"]:
            raise RatioMismatchError(
                f"checkpoint {checkpoint} was searched on other datapoints "
                f"(fingerprint {previous.search.get('data_fingerprint')} vs {result.search['data_fingerprint']})"
            )
        previous_refine = previous.search.get("refine", {"iterations": 0, "done": True})
        same_refine = _refine_key(previous_refine) == _refine_key(result.search["refine"])
        if previous.complete and same_refine and previous_refine.get("done"):
            return previous
        greedy = previous.search.get("greedy_ratios") or previous.ratios
        result.ratios = list(greedy)
        result.search.update({k: previous.search[k] for k in ("loss_before", "loss_after", "seconds")})
        done = n if previous.complete else max(order, int(previous.searched_steps or 0))

    timesteps = _timesteps_on(plan, device).unbind(0)
    alphas, sigmas = plan.alpha_t.tolist(), plan.sigma_t.tolist()

    def predict(x: torch.Tensor, k: int) -> torch.Tensor:
        return denoiser.predict_x0(
            x, timesteps[k], alphas[k], sigmas[k], cond=cond, uncond=uncond, guidance_scale=guidance_scale
        )

    state = solver.init_state()
    x = x_T.to(work)
    clock = time.perf_counter()
    for k in range(n):
        with torch.no_grad():
            c, x_c = solver.correct(plan, state, k, x, predict(x, k))
        times = solver.compensation_times(plan, k) if k >= order else None
        if times is not None and k >= done:
            target = reference[k + 1].to(device=device, dtype=work)
            corrected = k + 1 < n and plan.steps[k + 1].corrector is not None

            def loss_at(ratio: torch.Tensor) -> torch.Tensor:
                trial = SolverState(history=list(state.history), anchor=state.anchor)
                x_next = solver.advance(trial, c, x_c, compensation=lagrange_weights(ratio, times))  # noqa: B023
                if corrected:  # noqa: B023
                    _, x_next = solver.correct(plan, trial, k + 1, x_next, predict(x_next, k + 1))  # noqa: B023
                return torch.nn.functional.mse_loss(x_next, target)  # noqa: B023

            param = torch.tensor(start, dtype=work, device=device, requires_grad=True)
            opt_cls = torch.optim.AdamW if optimizer == "adamw" else torch.optim.Adam
            opt = opt_cls([param], lr=lr)
            before = None
            for _ in range(iterations):
                with torch.enable_grad():
                    loss = loss_at(to_ratio(param))
                    (param.grad,) = torch.autograd.grad(loss, [param])
                before = float(loss.detach()) if before is None else before
                opt.step()
            with torch.no_grad():
                ratio = float(to_ratio(param))
                after = float(loss_at(torch.tensor(ratio, dtype=work, device=device)))
            if not math.isfinite(ratio):
                raise FloatingPointError(f"the ratio search diverged at step {k} (loss {before})")
            result.ratios[k] = ratio
            result.search["loss_before"][k], result.search["loss_after"][k] = before, after
            if log is not None:
                log(f"step {k + 1}/{n}: ratio {ratio:.4f}, loss {before:.4e} -> {after:.4e}")
        ratio = result.ratios[k]
        weights = lagrange_weights(ratio, times) if times is not None and ratio != 1.0 else ()
        with torch.no_grad():
            x = solver.advance(state, c, x_c, compensation=weights)
        if k >= done:
            result.searched_steps = k + 1
            result.search["seconds"] = float(result.search["seconds"]) + time.perf_counter() - clock
            clock = time.perf_counter()
            if checkpoint is not None:
                result.save(checkpoint)
    if refine_iterations > 0:
        result.search["greedy_ratios"] = list(result.ratios)
        result.searched_steps = n  # greedy complete; the refinement is redone if interrupted
        if checkpoint is not None:
            result.save(checkpoint)
        clock = time.perf_counter()
        refined, before, after = _refine_jointly(
            solver, plan, x_T, reference, predict, result.ratios, refine_iterations, refine_lr
        )
        result.ratios = refined
        result.search["refine"].update(
            done=True, loss_before=before, loss_after=after, seconds=time.perf_counter() - clock
        )
        if log is not None:
            log(f"joint refinement: trajectory loss {before:.4e} -> {after:.4e}")
    result.searched_steps = None
    if checkpoint is not None:
        result.save(checkpoint)
    return result


def _refine_key(refine: Mapping[str, Any]) -> tuple[int, float | None]:
    """What decides a refinement's result: its iterations and, when there are any, its learning rate."""
    iterations = int(refine.get("iterations", 0))
    return iterations, (float(refine["lr"]) if iterations else None)


def _refine_jointly(
    solver: DCSolver,
    plan: SolverPlan,
    x_T: torch.Tensor,
    reference: torch.Tensor,
    predict: Callable[[torch.Tensor, int], torch.Tensor],
    ratios: list[float],
    iterations: int,
    lr: float,
) -> tuple[list[float], float, float]:
    """All ratios together by Adam on Σ_k MSE(x_k, x^GT_k) over a whole sampling run; the best iterate.

    Returns (ratios, loss of the given ratios, loss of the returned ones).
    """
    n, order = plan.num_evals, solver.dc_order
    work = compute_dtype(x_T.dtype)
    times = [solver.compensation_times(plan, k) for k in range(order, n)]
    targets = reference[1:].to(device=x_T.device, dtype=work)
    param = torch.tensor(ratios[order:], dtype=work, device=x_T.device, requires_grad=True)
    opt = torch.optim.Adam([param], lr=lr)

    def trajectory_loss(free: torch.Tensor) -> torch.Tensor:
        state, x, loss = solver.init_state(), x_T.to(work), x_T.new_zeros((), dtype=work)
        for k in range(n):
            c, x_c = solver.correct(plan, state, k, x, predict(x, k))
            weights = lagrange_weights(free[k - order], times[k - order]) if k >= order else ()
            x = solver.advance(state, c, x_c, compensation=weights)
            loss = loss + torch.nn.functional.mse_loss(x, targets[k])
        return loss

    best_loss, best, first = math.inf, list(ratios), None
    for step in range(iterations + 1):
        with torch.enable_grad():
            loss = trajectory_loss(param)
            value = float(loss.detach())
            if step < iterations:
                (param.grad,) = torch.autograd.grad(loss, [param])
        first = value if first is None else first
        if math.isfinite(value) and value < best_loss:
            best_loss, best = value, ratios[:order] + [float(v) for v in param.detach().tolist()]
        if step < iterations:
            opt.step()
    return best, float(first), best_loss
