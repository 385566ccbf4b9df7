"""An exact masked model: sequences of length L from a Markov chain over V tokens, with the exact denoiser.

The chain has an initial law π and a transition matrix P: p(x) = π(x_1)·Π_i P(x_i, x_{i+1}). Its exact denoiser —
what a masked diffusion network learns (Sahoo et al. 2024, the SUBS parameterisation; Zheng et al. 2024,
arXiv:2409.02908, Prop. 3.2: the optimum is time-agnostic) — is, for every position i,

    p(x0^i = v | the unmasked tokens of x) = Σ_{y compatible with x, y_i = v} p(y) / Σ_{y compatible with x} p(y),

computed here by enumerating all V^L sequences (a sequence y is compatible with x if it agrees with every
unmasked token of x). Clean positions get the one-hot of their token. With it the samplers of
:mod:`diffsamplers.masked` can be checked against the exact sequence law :attr:`MarkovChainModel.probabilities`
(a χ² test over all V^L sequences). :func:`default_markov_chain` is the 3-token, length-4 chain of the tests: sticky
transitions (0.7 on the diagonal), so neighbouring tokens are strongly dependent and unmasking several of them at
once from the same conditionals (a coarse ancestral grid) visibly biases the joint law.
"""

from __future__ import annotations

import torch

__all__ = ["MarkovChainModel", "default_markov_chain"]


class MarkovChainModel:
    """The exact time-agnostic masked model of a Markov chain (see the module docstring).

    Args:
        initial: ``(V,)`` the law of the first token.
        transition: ``(V, V)`` row-stochastic, ``transition[a, b]`` = P(next = b | current = a).
        length: L, the (only) sequence length.
        mask_id: the mask token's id (``None``: V); must not lie in [0, V).
    """

    time_conditioned = False

    def __init__(self, initial: torch.Tensor, transition: torch.Tensor, length: int, mask_id: int | None = None):
        pi = torch.as_tensor(initial, dtype=torch.float64).flatten()
        p = torch.as_tensor(transition, dtype=torch.float64)
        v = pi.numel()
        if v < 2 or tuple(p.shape) != (v, v):
            raise ValueError(
                f"need an initial law over V ≥ 2 tokens and a (V, V) transition, got {v} and {tuple(p.shape)}"
            )
        if (pi < 0).any() or (p < 0).any() or abs(float(pi.sum()) - 1) > 1e-9 or (p.sum(1) - 1).abs().max() > 1e-9:
            raise ValueError("the initial law and every row of the transition must be probability vectors")
        if length < 1 or v**length > 2**20:
            raise ValueError(f"length must be ≥ 1 with V^L ≤ 2^20 sequences to enumerate, got V={v}, L={length}")
        if mask_id is not None and 0 <= mask_id < v:
            raise ValueError(f"mask id {mask_id} lies inside the vocabulary [0, {v})")
        self.initial, self.transition = pi, p
        self.vocab_size, self.length = v, length
        self.context_length = length
        self.mask_id = v if mask_id is None else mask_id
        #: ``(V^L, L)`` every sequence, in lexicographic order (index = Σ_i y_i·V^{L−1−i}).
        self.sequences = torch.cartesian_prod(*[torch.arange(v)] * length).reshape(-1, length)
        y = self.sequences
        logp = pi.log()[y[:, 0]] + p.log()[y[:, :-1], y[:, 1:]].sum(dim=1)
        #: ``(V^L,)`` the exact law of the sequences.
        self.probabilities = logp.exp()
        self._table: torch.Tensor | None = None  # log-conditionals of all (V + 1)^L partially masked states

    def index(self, x: torch.Tensor) -> torch.Tensor:
        """``(B,)`` the lexicographic index of each clean sequence of ``x`` ``(B, L)``."""
        self._check(x)
        if ((x < 0) | (x >= self.vocab_size)).any():
            raise ValueError("index() takes clean sequences (no mask)")
        powers = self.vocab_size ** torch.arange(self.length - 1, -1, -1, device=x.device)
        return (x.long() * powers).sum(dim=1)

    def conditionals(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, L, V)`` float64 p(x0^i = v | the unmasked tokens of x), by enumeration; ``ValueError`` for a row
        whose clean tokens have probability 0 under the chain."""
        self._check(x)
        conditionals, total = self._enumerate(x)
        if (total <= 0).any():
            row = int(torch.nonzero(total <= 0)[0, 0])
            raise ValueError(f"row {row} of x, {x[row].tolist()}, has probability 0 under the chain")
        return conditionals

    def _enumerate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(conditionals, total probability of the compatible sequences) per row; NaN rows where the total is 0."""
        y = self.sequences.to(x.device)
        masked = x == self.mask_id
        agree = (x[:, None, :] == y[None, :, :]) | masked[:, None, :]  # (B, V^L, L)
        weights = agree.all(dim=2).to(torch.float64) * self.probabilities.to(x.device)  # (B, V^L)
        total = weights.sum(dim=1)
        onehot = torch.nn.functional.one_hot(y, self.vocab_size).to(torch.float64)  # (V^L, L, V)
        return torch.einsum("bs,slv->blv", weights, onehot) / total[:, None, None], total

    def __call__(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """The masked model: ``(B, L, V)`` float64 logits log p(x0^i = v | x) (−inf for impossible tokens); ``t``
        is ignored (the exact denoiser is time-agnostic). Up to 2^16 partially masked states, the conditionals of
        every state are enumerated once and looked up (a state of probability 0 gets NaN logits); beyond, each
        call enumerates."""
        self._check(x)
        states = (self.vocab_size + 1) ** self.length
        if states > 2**16:
            return self.conditionals(x).log()
        if self._table is None:
            every = torch.cartesian_prod(*[torch.arange(self.vocab_size + 1)] * self.length).reshape(-1, self.length)
            every = torch.where(every == self.vocab_size, self.mask_id, every)
            self._table = torch.cat([self._enumerate(part)[0].log() for part in every.split(1024)])
        digits = torch.where(x == self.mask_id, self.vocab_size, x).long()
        powers = (self.vocab_size + 1) ** torch.arange(self.length - 1, -1, -1, device=x.device)
        return self._table.to(x.device)[(digits * powers).sum(dim=1)]

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(n, L)`` exact samples of the chain (by the inverse CDF over the enumerated sequences)."""
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        cdf = self.probabilities.cumsum(0)
        return self.sequences[torch.searchsorted(cdf, u * cdf[-1], right=True).clamp_(max=cdf.numel() - 1)]

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 2 or x.shape[1] != self.length:
            raise ValueError(
                f"the Markov chain model takes (batch, {self.length}) sequences, got shape {tuple(x.shape)}"
            )
        bad = ((x < 0) | (x >= self.vocab_size)) & (x != self.mask_id)
        if bad.any():
            raise ValueError(f"token id {int(x[bad][0])} is outside [0, {self.vocab_size}) and is not the mask")


def default_markov_chain(length: int = 4) -> MarkovChainModel:
    """The tests' chain: V = 3 tokens, sticky transitions (0.7 stay, 0.15 each move), initial law (0.4, 0.35, 0.25)."""
    transition = torch.full((3, 3), 0.15, dtype=torch.float64)
    transition.fill_diagonal_(0.7)
    return MarkovChainModel(torch.tensor([0.4, 0.35, 0.25], dtype=torch.float64), transition, length)
