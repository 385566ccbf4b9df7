"""Precise categorical sampling, and the effective temperature of a categorical sampler.

**The exponential race** (Gumbel-max in disguise): with weights w_v ≥ 0 and E_v = −log U_v ~ Exp(1) independent,
argmax_v w_v / E_v is distributed as w / Σw (since −log E_v is a standard Gumbel variable, this is
argmax_v log w_v + G_v). MDLM samples its ancestral step this way (Sahoo et al. 2024, ``_sample_categorical``).

**Truncation** (Zheng et al., "Masked Diffusion Models are Secretly Time-Agnostic Masked Models and Exploit
Inaccurate Categorical Sampling", 2024, arXiv:2409.02908, Sec. 5): ``torch.rand`` in float32 returns multiples of
2^-24, so U ≤ 1 − 2^-24, E ≥ −log(1 − 2^-24) ≈ 5.96e-8 and the Gumbel noise −log E is capped at 16.63 (36.7 in
float64). A weight can then beat a competitor whose weight is at most 2^24 times larger only with a probability
rounded down to a multiple of 2^-24: in the MDLM ancestral step, where token v's weight is p_v·(m_t − m_s) and the
mask's is m_s, tokens with p_v·Δm/m_s ≲ 2^-24 almost never win. Rare tokens are under-drawn — a lowered *effective
temperature* — and more so the more steps (the smaller Δm). Drawing the uniforms in float64 (the default here)
removes the effect at any realistic size; ``dtype=torch.float32`` reproduces it exactly (uniforms, −log and weights
all in float32, as MDLM's code had them). The effect is at most one changed outcome per 2^24 uniforms drawn, so it
shows only in large draws (a test needs ~10^9 uniforms to resolve it).

:func:`categorical` runs the race over the last axis, ``chunk_rows`` rows at a time to bound memory (two
``(chunk_rows, V)`` buffers in ``dtype``). The uniforms are drawn chunk by chunk in row order from one generator;
on the CPU (the per-element Mersenne-Twister stream) chunking therefore gives the same samples as no chunking, on
CUDA (Philox offsets advance per call) it gives different, equally valid ones. No host read.

:func:`effective_temperature` fits, by maximum likelihood over many draws of any sampler, the temperature T for
which the sampler's frequencies match softmax(log p / T).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["KINDS", "TemperatureFit", "categorical", "effective_temperature"]

#: What :func:`categorical` takes: unnormalised log-probabilities, or non-negative (unnormalised) weights.
KINDS = ("logits", "probs")


def categorical(
    logits_or_probs: torch.Tensor,
    generator: torch.Generator | None,
    *,
    kind: str = "logits",
    dtype: torch.dtype = torch.float64,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """One draw per row of a categorical distribution over the last axis, by the exponential race.

    Args:
        logits_or_probs: ``(..., V)`` logits (``kind="logits"``; −inf allowed) or non-negative weights, not
            necessarily normalised (``kind="probs"``; zeros allowed). A view (e.g. ``expand``) is read chunk by
            chunk and never materialised whole.
        generator: the random stream (on the tensor's device), or ``None`` for the global one.
        kind: one of :data:`KINDS`.
        dtype: the precision of the uniforms and of the race: ``torch.float64`` (exact at any realistic size) or
            ``torch.float32`` (reproduces the truncated Gumbel noise of float32 code; see the module docstring).
        chunk_rows: rows per chunk (``None``: all rows at once).

    Returns:
        ``(...)`` int64 indices in [0, V). A row of all-zero weights (all −inf logits) returns index 0; NaN rows
        are undefined (nothing is checked on the device, so the call never reads it back).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}: expected one of {KINDS}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"categorical sampling runs in torch.float32 or torch.float64, got dtype={dtype}")
    if logits_or_probs.ndim < 1 or logits_or_probs.shape[-1] < 1:
        raise ValueError(f"need at least one category on the last axis, got shape {tuple(logits_or_probs.shape)}")
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive number of rows, got {chunk_rows}")
    *batch, vocab = logits_or_probs.shape
    rows = logits_or_probs.reshape(-1, vocab)  # a view where possible (an expanded row stays a view)
    n = rows.shape[0]
    out = torch.empty(n, dtype=torch.int64, device=rows.device)
    step = n if chunk_rows is None else chunk_rows
    for start in range(0, n, max(step, 1)):
        chunk = rows[start : start + step]
        weights = _weights(chunk, kind, dtype)
        u = torch.rand(chunk.shape, generator=generator, dtype=dtype, device=chunk.device)
        race = u.log_().neg_()  # E = −log U ~ Exp(1), in ``dtype`` (float32: E ≥ 5.96e-8)
        out[start : start + step] = torch.div(weights, race, out=race).argmax(dim=-1)
    return out.reshape(batch)


def _weights(chunk: torch.Tensor, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """Weights in ``dtype``, each row scaled so its largest is 1 (the race is scale-free; w/E cannot overflow)."""
    x = chunk.to(dtype, copy=True)
    top = x.amax(dim=-1, keepdim=True)
    if kind == "logits":
        return x.sub_(torch.where(torch.isfinite(top), top, torch.zeros_like(top))).exp_()
    return x.div_(torch.where(top > 0, top, torch.ones_like(top)))


@dataclass(frozen=True)
class TemperatureFit:
    """The maximum-likelihood temperature of a sampler's draws (see :func:`effective_temperature`).

    Attributes:
        temperature: T̂ (``0.0`` when every draw landed on the most probable token(s): T̂ → 0).
        stderr: its asymptotic standard error, 1/(β̂²·√(N·Var_β̂[log p])) with β = 1/T (``inf`` when T̂ = 0).
        events: N, the draws that landed on a token of ``probs`` (draws outside [0, V) are not counted).
        draws: the number of draws made.
        counts: ``(V,)`` how often each token was drawn.
    """

    temperature: float
    stderr: float
    events: int
    draws: int
    counts: torch.Tensor


def effective_temperature(
    sampler: Callable[[int, torch.Generator | None], torch.Tensor],
    probs: torch.Tensor,
    *,
    draws: int,
    generator: torch.Generator | None = None,
    batch: int = 4096,
) -> TemperatureFit:
    """The temperature T for which the sampler's empirical frequencies best match softmax(log p / T).

    The model family q_β(v) ∝ p_v^β (β = 1/T) is an exponential family in the statistic log p_v, so the maximum
    likelihood estimate solves E_{q_β}[log p] = (1/N)·Σ_draws log p_v (moment matching; the left side increases
    with β, its derivative being Var_{q_β}[log p]); it is found by bisection in log β over [1e-3, 1e3], in float64.

    Args:
        sampler: ``sampler(n, generator) → (n,)`` indices. Draws outside [0, V) — e.g. the mask's outcome V of an
            ancestral step (:func:`diffsamplers.masked.samplers.ancestral_probabilities`) — are discarded, so the
            fit is of the sampled token's law given that a token was drawn.
        probs: ``(V,)`` the reference probabilities p (normalised here; zeros allowed, but a draw of a token of
            probability 0 raises ``ValueError``).
        draws: how many draws to make, ``batch`` per call of ``sampler``.
        generator: passed to every call of ``sampler``.
    """
    if draws < 1 or batch < 1:
        raise ValueError(f"draws and batch must be positive, got draws={draws}, batch={batch}")
    p = probs.detach().to(device="cpu", dtype=torch.float64).flatten()
    if p.numel() < 2 or (p < 0).any() or not torch.isfinite(p).all() or p.sum() <= 0:
        raise ValueError("probs must be a finite, non-negative vector of at least two entries with a positive sum")
    p = p / p.sum()
    vocab = p.numel()
    counts = torch.zeros(vocab, dtype=torch.int64)
    for start in range(0, draws, batch):
        drawn = sampler(min(batch, draws - start), generator).detach().flatten().to("cpu")
        drawn = drawn[(drawn >= 0) & (drawn < vocab)]
        counts += torch.bincount(drawn, minlength=vocab)
    if (counts[p == 0] > 0).any():
        bad = torch.nonzero((counts > 0) & (p == 0)).flatten().tolist()
        raise ValueError(f"the sampler drew token(s) {bad[:8]} of probability 0")
    events = int(counts.sum())
    if events == 0:
        raise ValueError(f"none of the {draws} draws landed on a token in [0, {vocab})")
    support = p > 0
    log_p = p[support].log()
    if float(log_p.max() - log_p.min()) == 0.0:
        raise ValueError("all tokens of probs are equally likely: the temperature is not identifiable")
    target = float((counts[support].double() * log_p).sum()) / events
    beta = _solve_beta(log_p, target)
    if math.isinf(beta):
        return TemperatureFit(0.0, math.inf, events, draws, counts)
    q = torch.softmax(beta * log_p, dim=0)
    var = float((q * log_p**2).sum() - (q * log_p).sum() ** 2)
    stderr = 1.0 / (beta**2 * math.sqrt(events * var)) if var > 0 else math.inf
    return TemperatureFit(1.0 / beta, stderr, events, draws, counts)


def _solve_beta(log_p: torch.Tensor, target: float) -> float:
    """β with E_{q_β}[log p] = target, by bisection in log β (``inf`` if target is at the maximum of log p)."""

    def mean(beta: float) -> float:
        q = torch.softmax(beta * log_p, dim=0)
        return float((q * log_p).sum())

    lo, hi = math.log(1e-3), math.log(1e3)
    if target >= mean(math.exp(hi)):
        return math.inf if target >= float(log_p.max()) - 1e-12 else math.exp(hi)
    if target <= mean(math.exp(lo)):
        return math.exp(lo)
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if mean(math.exp(mid)) < target:
            lo = mid
        else:
            hi = mid
    return math.exp(0.5 * (lo + hi))
