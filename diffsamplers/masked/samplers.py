"""Samplers of masked (absorbing-state) diffusion: the MDLM ancestral sampler and the first-hitting sampler.

**Masked models.** A masked model is any callable ``model(x, t) → logits``: ``x`` a ``(B, L)`` LongTensor over the V
real tokens and the mask id (V by default, never inside [0, V)), ``t`` a ``(B,)`` float tensor or ``None`` for a
time-agnostic model, the logits ``(B, L, V)`` of p_θ(x0^i = v | x_t) over the real tokens (the SUBS
parameterisation of Sahoo et al.: no mask logit). :class:`MaskedDiffusion` bundles it with its vocabulary size, mask
id, context length, masking schedule (:mod:`diffsamplers.masked.schedules`) and the precision of categorical
sampling (:func:`diffsamplers.masked.categorical.categorical`, float64 by default), and validates inputs.

**Ancestral sampler** (Sahoo et al., "Simple and Effective Masked Diffusion Language Models", NeurIPS 2024, Eq. 7;
Zheng et al. 2024, arXiv:2409.02908, Eq. 3): on the grid t_k = t_start·(1 − k/T), k = 0…T, each masked position
independently stays masked with probability m(s)/m(t) or becomes token v with probability
(m(t) − m(s))/m(t)·p_θ(v | x_t) (:func:`ancestral_probabilities`); clean tokens are carried over. The last step
reaches m(0) = 0 and unmasks every remaining position (no separate "noise removal" argmax). Each step runs one race
over (V + 1) categories at **every** position (B·L rows, as MDLM does: no host read to find the masked ones).
With ``cache=True`` and a time-agnostic model (``time_conditioned=False``) the model is called again only after a
step in which some token changed (MDLM's ``ddpm_cache``): p_θ(· | x_t) then depends on x_t alone, so samples are
identical with and without the cache; this reads one boolean from the device per step.

**First-hitting sampler** (FHS; Zheng et al. 2024, Sec. 4.1, Alg. 1): with n masked tokens at time t each token's
unmask time τ_i satisfies P(τ_i < s) = m(s)/m(t) independently, so the first one to unmask (backwards in time)
comes at τ with P(τ < s) = (m(s)/m(t))^n, drawn as τ = m⁻¹(m(t)·u^{1/n}) (:func:`first_hitting_times`). By
exchangeability the token that unmasks is uniform among the masked ones, and its value is drawn from
p_θ(· | x_τ) at that one position: one categorical over V per row, not over L×V. With a time-agnostic model τ only
orders the events (the sampler is then random-order decoding); it is passed to a time-conditioned model. Rows
carry their own t and n; a row that is done stays in the batch untouched, and the number of steps
⌈max n / k⌉ is known after one host read at the start. The **parallel** variant (``tokens_per_step=k``) draws k
successive hitting times τ_j = m⁻¹(m(τ_{j−1})·u_j^{1/(n−j+1)}), calls the model once at τ_1, unmasks k distinct
uniformly chosen masked positions from that call (conditionally independently, an approximation for k > 1) and
moves the row's time to τ_k; NFE ≈ L/k.

Each sampler is one step function (:func:`ancestral_step`, :func:`first_hitting_step`) and a loop
(:meth:`AncestralSampler.sample`, :meth:`FirstHittingSampler.sample`) returning a :class:`MaskedSample` with the NFE.
All draws come from the ``generator`` passed in, in a fixed order (per step: the hitting-time uniforms, the
position keys, the token race).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .categorical import categorical
from .schedules import LinearMasking, MaskingSchedule

__all__ = [
    "start_state",
    "AncestralSampler",
    "FirstHittingSampler",
    "MaskedDiffusion",
    "MaskedModel",
    "MaskedSample",
    "ancestral_probabilities",
    "ancestral_step",
    "first_hitting_step",
    "first_hitting_times",
]

#: ``model(x (B, L) int64, t (B,) float or None) → logits (B, L, V)`` over the V real tokens.
MaskedModel = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


@dataclass(frozen=True)
class MaskedDiffusion:
    """A masked model with what the samplers need to know about it.

    Args:
        model: the masked model (see the module docstring).
        vocab_size: V, the number of real tokens.
        schedule: the masking schedule m(t).
        mask_id: the mask token's id (``None``: V); must not lie in [0, V).
        context_length: the longest sequence the model takes (``None``: no limit).
        time_conditioned: whether the model reads t (``False``: it is called with ``t=None``, and the ancestral
            sampler may cache its calls).
        dtype: the precision of categorical sampling (``torch.float64``; ``torch.float32`` reproduces the truncated
            Gumbel noise of float32 code).
        chunk_rows: rows per chunk of categorical sampling (``None``: all at once).
    """

    model: MaskedModel
    vocab_size: int
    schedule: MaskingSchedule = field(default_factory=LinearMasking)
    mask_id: int | None = None
    context_length: int | None = None
    time_conditioned: bool = True
    dtype: torch.dtype = torch.float64
    chunk_rows: int | None = None

    def __post_init__(self) -> None:
        if self.vocab_size < 1:
            raise ValueError(f"the vocabulary needs at least one token, got vocab_size={self.vocab_size}")
        if self.mask_id is not None and 0 <= self.mask_id < self.vocab_size:
            raise ValueError(
                f"mask id {self.mask_id} lies inside the vocabulary [0, {self.vocab_size}): it must be a separate id "
                f"(the default is {self.vocab_size})"
            )
        if self.context_length is not None and self.context_length < 1:
            raise ValueError(f"context_length must be positive, got {self.context_length}")

    @property
    def mask(self) -> int:
        """The mask token's id."""
        return self.vocab_size if self.mask_id is None else self.mask_id

    def all_masked(self, batch: int, length: int, device: str | torch.device = "cpu") -> torch.Tensor:
        """The fully masked ``(batch, length)`` start of sampling."""
        if batch < 1 or length < 1:
            raise ValueError(f"batch and length must be positive, got batch={batch}, length={length}")
        return self.check(torch.full((batch, length), self.mask, dtype=torch.int64, device=device))

    def check(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` if it is a valid ``(B, L)`` sequence of tokens in [0, V) or the mask; else ``ValueError`` naming the
        offending value (one host read)."""
        if x.ndim != 2 or x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise ValueError(
                f"tokens must be a (batch, length) integer tensor, got {x.dtype} of shape {tuple(x.shape)}"
            )
        if self.context_length is not None and x.shape[1] > self.context_length:
            raise ValueError(f"sequence length {x.shape[1]} exceeds the model's context of {self.context_length}")
        bad = ((x < 0) | (x >= self.vocab_size)) & (x != self.mask)
        if bad.any():
            value = int(x[bad][0])
            raise ValueError(
                f"token id {value} is outside the vocabulary [0, {self.vocab_size}) and is not the mask id {self.mask}"
            )
        return x.long()

    def logits(self, x: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        """The model's ``(B, L, V)`` logits at ``x`` (``t`` dropped for a time-agnostic model)."""
        out = self.model(x, t if self.time_conditioned else None)
        if tuple(out.shape) != (*x.shape, self.vocab_size):
            raise ValueError(
                f"the masked model returned logits of shape {tuple(out.shape)}, expected {(*x.shape, self.vocab_size)}"
            )
        return out


@dataclass(frozen=True)
class MaskedSample:
    """What a masked sampler returns.

    Attributes:
        tokens: ``(B, L)`` the samples (no mask left).
        nfe: model calls made (each on the whole batch).
        steps: steps taken (ancestral: T; first-hitting: ⌈max n / k⌉).
        changed_steps: the steps in which some token of the batch changed.
    """

    tokens: torch.Tensor
    nfe: int
    steps: int
    changed_steps: int


# --- the ancestral (MDLM) sampler ---------------------------------------------------------------------------------


def ancestral_probabilities(probs: torch.Tensor, m_t: float | torch.Tensor, m_s: float | torch.Tensor) -> torch.Tensor:
    """The ancestral step's law at a masked position (Sahoo et al. 2024, Eq. 7): ``(..., V + 1)`` float64,
    [p_θ(v)·(m_t − m_s)/m_t for each token v, m_s/m_t for the mask (last)]. ``m_t``, ``m_s``: floats or tensors
    broadcasting against ``probs[..., 0]`` (e.g. ``(B, 1)`` per row)."""
    p = probs.to(torch.float64)
    m_t = torch.as_tensor(m_t, dtype=torch.float64, device=p.device)
    m_s = torch.as_tensor(m_s, dtype=torch.float64, device=p.device)
    stay = (m_s / m_t).expand(p.shape[:-1]).unsqueeze(-1)
    return torch.cat([p * (1.0 - stay), stay], dim=-1)


def ancestral_step(
    diffusion: MaskedDiffusion,
    x: torch.Tensor,
    probs: torch.Tensor,
    m_t: float | torch.Tensor,
    m_s: float | torch.Tensor,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """One ancestral step from t to s < t: every masked position of ``x`` stays masked w.p. m_s/m_t, else takes a
    token from ``probs`` ``(B, L, V)`` = p_θ(· | x_t); clean positions are carried over. No host read."""
    scores = ancestral_probabilities(probs, m_t, m_s)
    draw = categorical(scores, generator, kind="probs", dtype=diffusion.dtype, chunk_rows=diffusion.chunk_rows)
    draw = torch.where(draw == diffusion.vocab_size, torch.full_like(draw, diffusion.mask), draw)
    return torch.where(x == diffusion.mask, draw, x)


@dataclass(frozen=True)
class AncestralSampler:
    """The MDLM ancestral sampler on T uniform steps in t (see the module docstring).

    Args:
        steps: T ≥ 1.
        cache: reuse the model's output after a step in which no token changed (time-agnostic models only).
    """

    steps: int
    cache: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"the ancestral sampler needs steps ≥ 1, got steps={self.steps}")

    def sample(
        self,
        diffusion: MaskedDiffusion,
        x: torch.Tensor | None = None,
        *,
        batch: int | None = None,
        length: int | None = None,
        generator: torch.Generator | None = None,
        start_time: float = 1.0,
    ) -> MaskedSample:
        """Sample from ``x`` (partially masked, taken as the state at ``start_time``) or from the all-mask
        ``(batch, length)`` sequence at t = 1."""
        x = start_state(diffusion, x, batch, length, start_time)
        times = [start_time * (1.0 - k / self.steps) for k in range(self.steps + 1)]
        masks = [diffusion.schedule.mask_probability(t) for t in times]
        caching = self.cache and not diffusion.time_conditioned
        probs: torch.Tensor | None = None
        nfe = 0
        changed = torch.zeros((), dtype=torch.int64, device=x.device)
        for k in range(self.steps):
            if probs is None or not caching:
                t = torch.full((x.shape[0],), times[k], dtype=torch.float32, device=x.device)
                probs = torch.softmax(diffusion.logits(x, t).to(torch.float64), dim=-1)
                nfe += 1
            x_next = ancestral_step(diffusion, x, probs, masks[k], masks[k + 1], generator)
            moved = (x_next != x).any()
            changed += moved
            if caching and bool(moved):  # the one host read per step of the cache
                probs = None
            x = x_next
        return MaskedSample(x, nfe, self.steps, int(changed))


# --- the first-hitting sampler ------------------------------------------------------------------------------------


def first_hitting_times(
    schedule: MaskingSchedule, t: torch.Tensor, masked: torch.Tensor, uniforms: torch.Tensor
) -> torch.Tensor:
    """Successive first-hitting times (Zheng et al. 2024, Sec. 4.1): τ_0 = t and τ_j = m⁻¹(m(τ_{j−1})·u_j^{1/(n−j+1)})
    while n − j + 1 > 0 masked tokens remain (else τ_j = τ_{j−1}).

    Args:
        schedule: the masking schedule m.
        t: ``(B,)`` the rows' current times.
        masked: ``(B,)`` n, the rows' numbers of masked tokens.
        uniforms: ``(B, k)`` u_j ∈ [0, 1).

    Returns:
        ``(B, k)`` float64 τ_1 … τ_k, non-increasing along each row.
    """
    tau = t.to(torch.float64)
    n = masked.to(torch.float64)
    out = []
    for j in range(uniforms.shape[1]):
        left = n - j
        root = torch.exp(torch.log(uniforms[:, j].to(torch.float64)) / left.clamp(min=1.0))
        nxt = schedule.inverse(schedule.mask_probability(tau) * root)
        tau = torch.where(left > 0, nxt, tau)
        out.append(tau)
    return torch.stack(out, dim=1)


def first_hitting_step(
    diffusion: MaskedDiffusion,
    x: torch.Tensor,
    t: torch.Tensor,
    generator: torch.Generator | None,
    tokens_per_step: int = 1,
    *,
    candidates: int = 1,
    logits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One first-hitting step (k = ``tokens_per_step`` unmasks per row, one model call): returns the new tokens and
    the rows' new times ``(B,)`` (τ_k). Rows without a mask are left as they are. No host read.

    ``candidates`` M > 1 replays the step M times per row from one model output (the candidates of SVDD, Li et al.
    2024, Alg. 1): rows ``(B·M, L)`` and times ``(B·M,)``, row b's candidates at b·M … b·M + M − 1, each with its own
    hitting times, positions and tokens. A time-agnostic model is called once on the B rows; a time-conditioned one
    on the B·M rows, each at its own τ_1 (the step's law needs p_θ(· | x_t) at τ_1). ``logits``: the model's
    ``(B, L, V)`` output at ``x``, already computed (time-agnostic models only); the call is then skipped. With
    M = 1 and no ``logits`` the draws and the call are those of the plain step."""
    if not isinstance(candidates, int) or candidates < 1:
        raise ValueError(f"candidates must be an integer ≥ 1, got {candidates!r}")
    if logits is not None:
        if diffusion.time_conditioned:
            raise ValueError(
                "a first-hitting step can reuse the model's logits only for a time-agnostic model (a time-conditioned "
                "one is called at the step's own hitting time)"
            )
        if tuple(logits.shape) != (*x.shape, diffusion.vocab_size):
            raise ValueError(f"logits of shape {tuple(logits.shape)}, expected {(*x.shape, diffusion.vocab_size)}")
    m = candidates
    source = x
    if m > 1:
        x, t = x.repeat_interleave(m, dim=0), t.repeat_interleave(m, dim=0)
    batch, length = x.shape
    k = tokens_per_step
    masked = x == diffusion.mask
    n = masked.sum(dim=1)
    taus = first_hitting_times(
        diffusion.schedule, t, n, torch.rand(batch, k, generator=generator, dtype=torch.float64, device=x.device)
    )
    # k distinct masked positions, uniformly: the k largest of i.i.d. uniform keys over the masked positions
    keys = torch.rand(batch, length, generator=generator, dtype=torch.float64, device=x.device)
    keys = torch.where(masked, keys, torch.full_like(keys, -1.0))
    picked_keys, positions = keys.topk(min(k, length), dim=1)
    valid = picked_keys >= 0.0
    if logits is None:
        if m == 1 or diffusion.time_conditioned:
            logits = diffusion.logits(x, taus[:, 0].to(torch.float32))
        else:  # t is dropped for a time-agnostic model: one call on the B distinct rows
            logits = diffusion.logits(source, taus[::m, 0].to(torch.float32))
    if logits.shape[0] == batch:
        rows = logits.gather(1, positions.unsqueeze(-1).expand(-1, -1, diffusion.vocab_size))
    else:  # the B rows' logits, read by each of their M candidates (not materialised B·M times)
        owner = torch.arange(batch, device=x.device) // m
        rows = logits[owner.unsqueeze(1), positions]
    tokens = categorical(rows, generator, kind="logits", dtype=diffusion.dtype, chunk_rows=diffusion.chunk_rows)
    tokens = torch.where(valid, tokens, x.gather(1, positions))
    return x.scatter(1, positions, tokens), taus[:, -1]


@dataclass(frozen=True)
class FirstHittingSampler:
    """The first-hitting sampler (see the module docstring); ``tokens_per_step`` k > 1 is the parallel variant."""

    tokens_per_step: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.tokens_per_step, int) or self.tokens_per_step < 1:
            raise ValueError(f"the first-hitting sampler needs tokens_per_step k ≥ 1, got k={self.tokens_per_step}")

    def sample(
        self,
        diffusion: MaskedDiffusion,
        x: torch.Tensor | None = None,
        *,
        batch: int | None = None,
        length: int | None = None,
        generator: torch.Generator | None = None,
        start_time: float = 1.0,
    ) -> MaskedSample:
        """Sample from ``x`` (partially masked, taken as the state at ``start_time``) or from the all-mask
        ``(batch, length)`` sequence at t = 1."""
        x = start_state(diffusion, x, batch, length, start_time)
        most = int((x == diffusion.mask).sum(dim=1).max())  # the one host read: the number of steps
        steps = math.ceil(most / self.tokens_per_step)
        t = torch.full((x.shape[0],), start_time, dtype=torch.float64, device=x.device)
        for _ in range(steps):
            x, t = first_hitting_step(diffusion, x, t, generator, self.tokens_per_step)
        return MaskedSample(x, steps, steps, steps)


def start_state(
    diffusion: MaskedDiffusion, x: torch.Tensor | None, batch: int | None, length: int | None, start_time: float = 1.0
) -> torch.Tensor:
    """A sampler's start: ``x`` checked (partially masked, the state at ``start_time`` ∈ (0, 1]) or the all-mask
    ``(batch, length)`` sequence; ``ValueError`` for disagreeing sizes, bad tokens or a start time outside (0, 1]."""
    if not 0.0 < start_time <= 1.0:
        raise ValueError(f"start_time must lie in (0, 1], got {start_time}")
    if x is None:
        if batch is None or length is None:
            raise ValueError("give either a start x or both batch and length")
        return diffusion.all_masked(batch, length)
    if batch is not None and batch != x.shape[0]:
        raise ValueError(f"batch={batch} disagrees with the start x of {x.shape[0]} rows")
    if length is not None and x.ndim == 2 and length != x.shape[1]:
        raise ValueError(f"length={length} disagrees with the start x of length {x.shape[1]}")
    return diffusion.check(x)
