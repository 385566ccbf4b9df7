"""The step module's guidance hooks (condition, guide_x0, transition), Move, SamplingRun.reindex, and the rule that
every solver steps by ``correct`` then ``advance``.

Most checks use an elementwise network (ε = 0.1·x + a per-row offset): every sample's arithmetic is then the same
whatever its batch or position in it, so runs that must agree are compared bit for bit.
"""

import importlib
import inspect
import pkgutil

import pytest
import torch

import diffsamplers.solvers
from diffsamplers import DDIM, DCSolver, Denoiser, DPMSolverPlusPlus, DPMSolverPlusPlusSinglestep, UniPC, sample
from diffsamplers.models.gmm import default_mixture, default_process
from diffsamplers.rng import NoiseSource
from diffsamplers.schedules import diffusers_spacing, uniform_logsnr
from diffsamplers.solvers import ExposureBiasTimeShift, Solver
from diffsamplers.step import Conditions, Guidance, Move, SamplingRun, StepContext, as_guidance

PROCESS = default_process()
SHAPE = (1, 8, 8)
N = 4


class _Net(torch.nn.Module):
    """ε = 0.1·x + 0.02·label + 1e-4·t: linear in x (so ∂x̂0/∂x is known), a per-row offset from the label."""

    def forward(self, x, t, class_labels):
        return 0.1 * x + 0.02 * class_labels.view(-1, 1, 1, 1).float() + 1e-4 * t.view(-1, 1, 1, 1).float()


DEN = Denoiser(_Net(), PROCESS, "epsilon")
LABELS = torch.tensor([3, 1, 4, 1])
COND = {"class_labels": LABELS}
UNCOND = {"class_labels": torch.tensor([10])}


def _x_T(n=N, seed=0):
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def _run(solver, steps=6, **kw):
    kw = {"cond": COND, "uncond": UNCOND, "guidance_scale": 2.5, "progress": False, **kw}
    if "x_T" not in kw:
        kw["x_T"] = _x_T()
    return sample(DEN, solver, diffusers_spacing(PROCESS, steps), **kw)


def _manual(solver, steps, x, scales, cond=COND, uncond=UNCOND, x0_map=None):
    """The loop written out with the solver's own step and the denoiser called with host floats."""
    plan = solver.plan(PROCESS, diffusers_spacing(PROCESS, steps))
    state = solver.init_state()
    for k in range(plan.num_evals):
        alpha, sigma = float(plan.alpha_t[k]), float(plan.sigma_t[k])
        x0 = DEN.predict_x0(
            x, float(plan.timesteps[k]), alpha, sigma, cond=cond, uncond=uncond, guidance_scale=scales[k]
        )
        if x0_map is not None:
            x0 = x0_map(k, x, x0, alpha, sigma)
        x = solver.step(plan, state, k, x, x0)
    return x


# -- condition ------------------------------------------------------------------------------------------


class _ScalePerStep(Guidance):
    """Classifier-free guidance scale s_k at evaluation k (e.g. a guidance interval)."""

    def __init__(self, scales):
        self.scales = scales
        self.seen = []

    def condition(self, ctx, conditions):
        assert isinstance(ctx, StepContext) and ctx.plan is ctx.run.plan and ctx.num_evals == len(self.scales)
        self.seen.append((ctx.index, ctx.sigma_tilde, conditions.guidance_scale, ctx.rows))
        return Conditions(conditions.cond, conditions.uncond, self.scales[ctx.index])


@pytest.mark.parametrize("solver", [DPMSolverPlusPlus(2), UniPC(2)], ids=lambda s: s.name)
def test_condition_hook_sets_the_guidance_scale_per_step(solver):
    scales = [1.0, 1.0, 4.0, 3.0, 2.0, 1.0]
    hook = _ScalePerStep(scales)
    x_T = _x_T()
    out = _run(solver, x_T=x_T, guidance=hook)
    plan = solver.plan(PROCESS, diffusers_spacing(PROCESS, 6))
    # the hook saw every evaluation in order, with the run's own scale, σ̃ and rows
    assert hook.seen == [(k, float(plan.sigmas[k]), 2.5, range(0, N)) for k in range(6)]
    assert torch.equal(out, _manual(solver, 6, x_T, scales))
    # and the scale mattered: the constant-scale run differs
    assert float((out - _run(solver, x_T=x_T)).abs().max()) > 1e-3


# -- guide_x0 with the gradient -------------------------------------------------------------------------


class _GradientStep(Guidance):
    """x̂0 ← x̂0 + s·∇ₓ Σ x̂0, the gradient taken inside the step (a classifier-guidance-like hook)."""

    needs_grad = True

    def __init__(self, strength):
        self.strength = strength
        self.grads = []

    def guide_x0(self, ctx, x, x0):
        assert torch.is_grad_enabled() and x.requires_grad and x0.requires_grad
        # retain_graph: under sample(enable_grad=True) x̂0's graph is part of the run's and is used again
        (g,) = torch.autograd.grad(x0.sum(), x, retain_graph=True)
        self.grads.append((g, ctx.alpha, ctx.sigma))
        return x0 + self.strength * g


def test_guide_x0_with_needs_grad_differentiates_inside_the_step_only():
    hook = _GradientStep(0.05)
    seen = []
    x_T = _x_T()
    out = _run(
        DPMSolverPlusPlus(2),
        x_T=x_T,
        guidance=hook,
        callback=lambda info: seen.append((info.x.requires_grad, info.x0.requires_grad, info.x0.grad_fn)),
    )
    # ε = 0.1 x + b (guided or not) ⇒ x̂0 = ((1 − 0.1σ) x − σ b)/α and ∂Σx̂0/∂x = (1 − 0.1σ)/α everywhere
    assert len(hook.grads) == 6
    for g, alpha, sigma in hook.grads:
        torch.testing.assert_close(g, torch.full_like(g, (1 - 0.1 * sigma) / alpha), rtol=1e-5, atol=0)
    # outside the hook nothing carries a graph: the callback's x and x̂0, and the result
    assert seen == [(False, False, None)] * 6
    assert not out.requires_grad and out.grad_fn is None
    # the guided run is the manual computation with the analytic gradient
    manual = _manual(
        DPMSolverPlusPlus(2),
        6,
        x_T,
        [2.5] * 6,
        x0_map=lambda k, x, x0, a, s: x0 + 0.05 * (1 - 0.1 * s) / a,
    )
    torch.testing.assert_close(out, manual, rtol=1e-5, atol=1e-5)
    assert float((out - _run(DPMSolverPlusPlus(2), x_T=x_T)).abs().max()) > 1e-2  # the guidance acted


def test_needs_grad_under_enable_grad_keeps_the_graph():
    """With ``enable_grad=True`` the guided x̂0 stays attached: the sample is differentiable w.r.t. x_T."""
    x_T = _x_T().requires_grad_(True)
    out = _run(DDIM(), steps=4, x_T=x_T, guidance=_GradientStep(0.05), enable_grad=True)
    (g,) = torch.autograd.grad(out.sum(), x_T)
    # a linear model and a linear solver: x_0 = c·x_T + const, and c = Π_k ∂x_{k+1}/∂x_k is the same for every element
    assert float(g.std()) < 1e-5 * float(g.abs().mean()) and float(g.abs().mean()) > 1e-3


# -- transition and Move ---------------------------------------------------------------------------------


class _Candidates(Guidance):
    """Replays every update as ``copies`` candidates and keeps the taken result."""

    def __init__(self, copies):
        self.copies = copies
        self.moves = []

    def transition(self, ctx, move):
        assert isinstance(move, Move) and move.index == ctx.index and move.run is ctx.run
        cands, states = move.candidates(self.copies)
        self.moves.append((move.index, move.c, move.result.clone(), cands, states))
        return move.result


def _dc():
    return DCSolver([1.0, 1.0, 1.1, 0.9, 1.05, 0.95])


@pytest.mark.parametrize(
    "solver",
    [DPMSolverPlusPlus(3), DPMSolverPlusPlusSinglestep(2), UniPC(2, "bh2"), _dc()],
    ids=lambda s: s.name,
)
def test_candidates_of_a_deterministic_step_equal_the_taken_update(solver):
    hook = _Candidates(3)
    x_T = _x_T()
    out = _run(solver, x_T=x_T, guidance=hook)
    assert torch.equal(out, _run(solver, x_T=x_T))  # replaying left the run untouched
    assert [m[0] for m in hook.moves] == list(range(6))
    rows = torch.arange(N).repeat_interleave(3)
    for _, _, result, cands, states in hook.moves:
        assert cands.shape == (3 * N, *SHAPE)
        assert torch.equal(cands, result[rows])  # sample b's candidates are rows 3b … 3b + 2
        assert all(h.shape[0] == 3 * N for h in states.history)
        assert states.anchor is None or states.anchor.shape[0] == 3 * N


class _ScriptedNoise(NoiseSource):
    """Draw number n is the constant n (plus 0.001·row), so every draw can be told apart."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def draw(self, start, stop, sample_shape, device, dtype):
        rows = torch.arange(start, stop, dtype=dtype).view(-1, *([1] * len(sample_shape)))
        out = (self.count + 0.001 * rows).expand(stop - start, *sample_shape).to(device)
        self.count += 1
        return out.clone()


@pytest.mark.parametrize("solver", [DPMSolverPlusPlus(2, sde=True), DDIM(eta=1.0)], ids=lambda s: s.name)
def test_candidates_of_a_stochastic_step_draw_their_own_noise(solver):
    """Candidate j of step k gets the j-th draw after the taken update's: it differs from the taken update by
    c_z·(z_j − z_taken), and the next step's noise comes after the candidates' draws."""
    copies = 3
    hook = _Candidates(copies)
    noise = _ScriptedNoise()
    _run(solver, x_T=_x_T(), guidance=hook, noise=noise)
    stochastic = [m for m in hook.moves if m[1].noise != 0.0]
    assert len(stochastic) >= 5
    draw = 0  # the taken update of the first stochastic step draws number 0 (x_T is given)
    for _, c, result, cands, _ in hook.moves:
        if c.noise == 0.0:
            continue
        per_sample = cands.view(N, copies, *SHAPE)
        for j in range(copies):
            expected = result + c.noise * float((draw + 1 + j) - draw)
            torch.testing.assert_close(per_sample[:, j], expected, rtol=1e-6, atol=1e-6)  # float32 rounding
        assert float((per_sample[:, 0] - per_sample[:, 1]).abs().min()) > 0.5 * abs(c.noise)
        draw += 1 + copies
    assert noise.count == draw


def _resampling(at, index):
    class Resample(Guidance):
        def __init__(self):
            self.checked = False

        def transition(self, ctx, move):
            if ctx.index != at:
                return move.result
            run = ctx.run
            history, anchor = list(run.state.history), run.state.anchor
            cond, uncond = run.cond, run.uncond
            run.reindex(index)
            assert all(torch.equal(a, b[index]) for a, b in zip(run.state.history, history, strict=True))
            assert (anchor is None and run.state.anchor is None) or torch.equal(run.state.anchor, anchor[index])
            assert torch.equal(run.cond["class_labels"], cond["class_labels"][index])
            assert torch.equal(run.uncond["class_labels"], uncond["class_labels"][index])
            self.checked = True
            return move.result.index_select(0, index)

    return Resample()


@pytest.mark.parametrize(
    "solver, at",
    [
        (DPMSolverPlusPlus(3), 2),
        (DPMSolverPlusPlusSinglestep(2), 0),  # inside an outer step: the anchor is in use
        (DPMSolverPlusPlusSinglestep(3), 1),
        (UniPC(3, "bh1"), 2),  # the corrector's anchor and history
        (_dc(), 3),  # compensation reads three predictions
    ],
    ids=lambda v: v.name if isinstance(v, Solver) else str(v),
)
def test_reindex_gathers_state_and_conditions_with_the_samples(solver, at):
    """Resampling mid-run (ancestors ``index``) then continuing: sample i ends where sample index[i] of the plain
    run ends, bit for bit — only if the x̂0 history, the anchor and both per-sample conditions moved with it."""
    index = torch.tensor([1, 1, 3, 0])
    uncond = {"class_labels": torch.tensor([10, 11, 12, 13])}  # per-sample unconditional inputs are gathered too
    x_T = _x_T()
    hook = _resampling(at, index)
    out = _run(solver, x_T=x_T, uncond=uncond, guidance=hook)
    plain = _run(solver, x_T=x_T, uncond=uncond)
    assert hook.checked
    assert torch.equal(out, plain[index])
    assert not torch.equal(out, plain)


def test_a_duplicated_particle_keeps_its_own_random_stream():
    """After resampling, particles 0 and 1 share an ancestor and its state, but each keeps drawing from its own row's
    stream: a duplicate never replays its ancestor's future noise (streams are not re-indexed, on purpose)."""
    index = torch.tensor([0, 0, 2, 3])
    seeds, uncond = list(range(N)), {"class_labels": torch.tensor([10, 11, 12, 13])}
    out = _run(DPMSolverPlusPlus(2, sde=True), seeds=seeds, uncond=uncond, guidance=_resampling(2, index))
    again = _run(DPMSolverPlusPlus(2, sde=True), seeds=seeds, uncond=uncond, guidance=_resampling(2, index))
    assert torch.equal(out, again)  # deterministic with seeds
    assert (out[0] - out[1]).abs().max() > 1e-3  # same state after step 2, different noise after it


def test_reindex_of_nested_and_shared_conditions():
    solver = UniPC(2)
    plan = solver.plan(PROCESS, uniform_logsnr(PROCESS, 4))
    labels, emb = torch.arange(4), torch.randn(4, 3, 2)
    shared, scalar = torch.randn(1, 3), torch.tensor(0.5)
    run = SamplingRun.start(
        solver,
        plan,
        _x_T(),
        denoiser=DEN,
        cond={"class_labels": labels, "extra": {"emb": emb, "scalar": scalar, "shared": shared}},
        uncond={"class_labels": torch.tensor([10])},
        row_offset=8,
    )
    run.state.history = [torch.randn(4, *SHAPE), torch.randn(4, *SHAPE)]
    run.state.anchor = torch.randn(4, *SHAPE)
    sums = torch.randn(plan.num_evals, 4)
    run.finite.sums = sums.clone()
    history, anchor = list(run.state.history), run.state.anchor
    index = torch.tensor([2, 0, 0, 3])
    run.reindex(index)
    assert torch.equal(run.cond["class_labels"], labels[index])
    assert torch.equal(run.cond["extra"]["emb"], emb[index])
    assert run.cond["extra"]["scalar"] is scalar and run.cond["extra"]["shared"] is shared  # no batch dimension
    assert torch.equal(run.uncond["class_labels"], torch.tensor([10]))  # broadcast, not per sample
    assert all(torch.equal(a, b[index]) for a, b in zip(run.state.history, history, strict=True))
    assert torch.equal(run.state.anchor, anchor[index])
    assert torch.equal(run.finite.sums, sums[:, index])
    assert run.rows == range(8, 12)


# -- composition ----------------------------------------------------------------------------------------


class _Logged(Guidance):
    def __init__(self, name, log, scale=None, add=0.0, mul=1.0):
        self.name, self.log, self.scale, self.add, self.mul = name, log, scale, add, mul

    def condition(self, ctx, conditions):
        self.log.append(("condition", self.name, ctx.index, conditions.guidance_scale))
        scale = conditions.guidance_scale if self.scale is None else self.scale(conditions.guidance_scale)
        return Conditions(conditions.cond, conditions.uncond, scale)

    def guide_x0(self, ctx, x, x0):
        self.log.append(("guide_x0", self.name, ctx.index, None))
        return (x0 + self.add) * self.mul

    def transition(self, ctx, move):
        self.log.append(("transition", self.name, ctx.index, None))
        return (move.result + self.add) * self.mul


def test_hooks_compose_in_order():
    log = []
    first = _Logged("a", log, scale=lambda s: 2.0, add=0.01)
    second = _Logged("b", log, scale=lambda s: 3.0 * s, mul=0.9)
    x_T = _x_T()
    solver = DPMSolverPlusPlus(2)
    x0s = []
    out = _run(solver, steps=3, x_T=x_T, guidance=[first, second], callback=lambda i: x0s.append(i.x0))
    expected = []
    for k in range(3):
        expected += [("condition", "a", k, 2.5), ("condition", "b", k, 2.0)]
        expected += [("guide_x0", "a", k, None), ("guide_x0", "b", k, None)]
        expected += [("transition", "a", k, None), ("transition", "b", k, None)]
    assert log == expected
    # the same composition written out: scale 3·2 = 6; x̂0 → (x̂0 + 0.01)·0.9; x → (x + 0.01)·0.9
    plan = solver.plan(PROCESS, diffusers_spacing(PROCESS, 3))
    state, x = solver.init_state(), x_T
    for k in range(3):
        x0 = DEN.predict_x0(
            x, float(plan.timesteps[k]), float(plan.alpha_t[k]), float(plan.sigma_t[k]), COND, UNCOND, 6.0
        )
        x0 = (x0 + 0.01) * 0.9
        assert torch.equal(x0, x0s[k])
        x = (solver.step(plan, state, k, x, x0) + 0.01) * 0.9
    assert torch.equal(out, x)
    # the other order is another method: scale 2 (b's 3·2.5 overwritten by a), x̂0 → x̂0·0.9 + 0.01
    log.clear()
    assert not torch.allclose(out, _run(solver, steps=3, x_T=x_T, guidance=[second, first]), atol=1e-3)
    assert log[:2] == [("condition", "b", 0, 2.5), ("condition", "a", 0, 7.5)]


def test_as_guidance_accepts_guidance_only():
    g, h = Guidance(), Guidance()
    assert as_guidance(None) == () and as_guidance(g) == (g,) and as_guidance([g, h]) == (g, h)
    assert as_guidance((h, g)) == (h, g)
    for bad, name in [(lambda ctx, x: x, "function"), ([g, "cfg"], "str"), ((g, 3), "int"), (7, "int")]:
        with pytest.raises(TypeError, match=f"guidance must be Guidance objects, got {name}"):
            as_guidance(bad)
    with pytest.raises(TypeError, match="guidance must be Guidance objects, got dict"):
        sample(DEN, DDIM(), 2, (1, *SHAPE), cond={"class_labels": torch.tensor([1])}, guidance=[{}], progress=False)
    # the base hooks are the identity and no transition is declared
    assert not g.has_transition and _Candidates(1).has_transition and not _ScalePerStep([]).has_transition
    x_T = _x_T()
    assert torch.equal(_run(DPMSolverPlusPlus(2), x_T=x_T, guidance=[g, h]), _run(DPMSolverPlusPlus(2), x_T=x_T))


# -- solvers step by correct + advance -------------------------------------------------------------------


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def test_no_solver_overrides_step():
    """Every solver steps by ``correct`` then ``advance``: the diffusers adapters start at ``correct`` and the
    transition hooks replay ``advance`` (``Move.candidates``), so a solver whose ``step`` did more would behave
    differently there. Every module of the solvers package is imported, so none of its classes is missed."""
    for info in pkgutil.walk_packages(diffsamplers.solvers.__path__, "diffsamplers.solvers."):
        importlib.import_module(info.name)
    solvers = set(_subclasses(Solver))
    names = {cls.__name__ for cls in solvers}
    expected = {"DDIM", "Euler", "DPMSolverPlusPlus", "DPMSolverPlusPlusSinglestep", "UniPC", "DCSolver"}
    assert expected | {"ExposureBiasTimeShift"} <= names
    assert sorted(cls.__qualname__ for cls in solvers if "step" in vars(cls)) == []
    # and Solver.step is the two halves
    assert "self.correct(" in inspect.getsource(Solver.step) and "self.advance(" in inspect.getsource(Solver.step)


def test_time_shift_correct_and_advance_reproduce_its_step():
    """The per-sample path of ExposureBiasTimeShift, driven by hand through ``correct`` and ``advance`` with the
    evaluation points it reports, equals ``Solver.step`` and the sampling loop bit for bit (float64, stochastic
    base), and the samples really left the grid."""
    gmm = default_mixture()
    den = gmm.as_denoiser(PROCESS)
    solver = ExposureBiasTimeShift(DPMSolverPlusPlus(2, sde=True), half_width=40, cutoff=100)
    schedule = diffusers_spacing(PROCESS, 8, "trailing")
    plan = solver.plan(PROCESS, schedule)
    assert any(plan.per_sample) and not all(plan.per_sample)
    x_T = torch.randn(5, *gmm.sample_shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    seeds = [7, 8, 9, 10, 11]
    loop = sample(den, solver, schedule, x_T=x_T, dtype=torch.float64, noise=NoiseSource(seeds=seeds), progress=False)

    def by_hand(halves):
        noise = NoiseSource(seeds=seeds)
        state, x, moved = solver.init_state(), x_T, 0
        for k in range(plan.num_evals):
            point = solver.evaluation_point(plan, state, k)
            if point is None:
                t, a, s = float(plan.timesteps[k]), float(plan.alpha_t[k]), float(plan.sigma_t[k])
            else:
                t, a, s = point
                moved += int((t != float(plan.timesteps[k])).sum())
            x0 = den.predict_x0(x, t, a, s)
            z = noise.draw(0, 5, x.shape[1:], x.device, x.dtype) if plan.steps[k].noise != 0.0 else None
            if halves:
                c, xc = solver.correct(plan, state, k, x, x0)
                x = solver.advance(plan, state, k, c, xc, z)
            else:
                x = solver.step(plan, state, k, x, x0, z)
        return x, moved

    halves, moved = by_hand(True)
    whole, _ = by_hand(False)
    assert moved > 0
    assert torch.equal(halves, whole) and torch.equal(halves, loop)
    unshifted = sample(
        den, solver.base, schedule, x_T=x_T, dtype=torch.float64, noise=NoiseSource(seeds=seeds), progress=False
    )
    assert not torch.allclose(loop, unshifted, atol=1e-6)  # the shifted grids changed the samples
