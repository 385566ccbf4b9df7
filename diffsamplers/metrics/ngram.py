"""A character n-gram reference model for text samples: interpolated Kneser–Ney perplexity and unigram entropy.

Samples of the bundled masked diffusion language model (:mod:`diffsamplers.models.text_mdm`) are judged as in
Zheng et al. 2024 (arXiv:2409.02908, Sec. 5–6): a *generative perplexity* under an independent reference model,
always reported together with the samples' *unigram entropy* (a sampler that lowers the effective temperature
lowers both; a low perplexity with a low entropy is repetition, not quality). The reference here is a character
n-gram model fitted on the corpus's training split (:func:`reference_ngram`).

**Smoothing** — interpolated Kneser–Ney (Kneser & Ney 1995; Chen & Goodman 1999, "An empirical study of smoothing
techniques for language modeling", Eq. 12–13, one discount per order). For the highest order n with context h,

    P(w | h) = max(c(h w) − D_n, 0) / c(h) + D_n · N₁₊(h •) / c(h) · P(w | h'),     h' = h without its first char,

and for a lower order k the raw counts c are replaced by continuation counts N₁₊(• h w) (the number of distinct
characters that precede h w in the training text). Order 1 interpolates with the uniform distribution over the
vocabulary, so every symbol of the vocabulary has a positive probability. A context never seen at its order backs
off entirely: P(w | h) = P(w | h'). Discounts D_k = n₁ / (n₁ + 2 n₂) from the counts-of-counts of each order
(Ney, Essen & Kneser 1994). A text is a window of a longer document: its first n − 1 characters are predicted
from the shorter contexts available, each with raw counts at its top order (no start symbol).
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Iterable, Sequence

__all__ = ["CharNGram", "reference_ngram", "unigram_entropy"]


def _as_list(texts: str | Iterable[str]) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    out = list(texts)
    for text in out:
        if not isinstance(text, str):
            raise TypeError(f"texts must be strings, got {type(text).__name__}")
    return out


def unigram_entropy(texts: str | Iterable[str], base: float = 2.0) -> float:
    """Shannon entropy of the character frequencies pooled over ``texts`` (bits by default): 0 for a constant
    string, log V for text using V symbols equally often. Empty input → ``ValueError``."""
    counts: Counter[str] = Counter()
    for text in _as_list(texts):
        counts.update(text)
    total = sum(counts.values())
    if total == 0:
        raise ValueError("the unigram entropy of an empty text is undefined")
    h = -sum(c / total * math.log(c / total) for c in counts.values())
    return max(0.0, h) / math.log(base)


class CharNGram:
    """An interpolated Kneser–Ney character model of order ``order`` fitted on ``texts`` (see the module docstring).

    ``vocab``: the symbols it assigns probability to (default: the characters of ``texts``); a character outside
    it in a scored text → ``ValueError`` naming it.
    """

    def __init__(self, texts: str | Iterable[str], order: int = 5, vocab: Iterable[str] | None = None):
        if not isinstance(order, int) or order < 1:
            raise ValueError(f"the n-gram order must be a positive integer, got {order!r}")
        texts = _as_list(texts)
        self.order = order
        seen = {c for text in texts for c in text}
        self.vocab: tuple[str, ...] = tuple(sorted(seen if vocab is None else set(vocab)))
        if not self.vocab:
            raise ValueError("an n-gram model needs a non-empty training text or vocabulary")
        unknown = seen.difference(self.vocab)
        if unknown:
            raise ValueError(f"training characters {sorted(unknown)!r} are not in the vocabulary")
        self._vocab_set = frozenset(self.vocab)
        # raw[k]: k-gram → count (k = 1 … n); cont[k]: k-gram → N₁₊(• gram) (k = 1 … n − 1)
        raw: list[Counter[str]] = [Counter() for _ in range(order + 1)]
        for text in texts:
            for k in range(1, order + 1):
                raw[k].update(text[i : i + k] for i in range(len(text) - k + 1))
        cont: list[Counter[str]] = [Counter() for _ in range(order + 1)]
        for k in range(2, order + 1):
            cont[k - 1].update(gram[1:] for gram in raw[k])
        self._raw, self._cont = raw, cont
        # per order and count type: context → (Σ_w count(h w), N₁₊(h •)), and the discount
        self._ctx_raw = [self._context_totals(raw[k]) for k in range(order + 1)]
        self._ctx_cont = [self._context_totals(cont[k]) for k in range(order + 1)]
        self._d_raw = [self._discount(raw[k]) for k in range(order + 1)]
        self._d_cont = [self._discount(cont[k]) for k in range(order + 1)]
        self.num_train_chars = sum(len(t) for t in texts)

    @staticmethod
    def _context_totals(counts: Counter[str]) -> dict[str, tuple[int, int]]:
        totals: dict[str, list[int]] = {}
        for gram, c in counts.items():
            entry = totals.setdefault(gram[:-1], [0, 0])
            entry[0] += c
            entry[1] += 1
        return {h: (a, b) for h, (a, b) in totals.items()}

    @staticmethod
    def _discount(counts: Counter[str]) -> float:
        n1 = sum(1 for c in counts.values() if c == 1)
        n2 = sum(1 for c in counts.values() if c == 2)
        return n1 / (n1 + 2 * n2) if n1 + 2 * n2 > 0 else 0.5

    def prob(self, char: str, context: str = "") -> float:
        """P(char | the last n − 1 characters of ``context``)."""
        if char not in self._vocab_set:
            raise ValueError(f"character {char!r} is not in the {len(self.vocab)}-symbol vocabulary")
        h = context[-(self.order - 1) :] if self.order > 1 else ""
        return self._prob(char, h, top=True)

    def _prob(self, w: str, h: str, top: bool) -> float:
        k = len(h) + 1
        if top:
            counts, totals, d = self._raw[k], self._ctx_raw[k], self._d_raw[k]
        else:
            counts, totals, d = self._cont[k], self._ctx_cont[k], self._d_cont[k]
        lower = self._prob(w, h[1:], top=False) if k > 1 else 1.0 / len(self.vocab)
        entry = totals.get(h)
        if entry is None:
            return lower
        total, types = entry
        return (max(counts.get(h + w, 0) - d, 0.0) + d * types * lower) / total

    def nll(self, text: str) -> float:
        """−log P(text) in nats: the sum over its characters of −log P(c_i | c_{i−n+1} … c_{i−1})."""
        bad = set(text).difference(self._vocab_set)
        if bad:
            pos = next(i for i, c in enumerate(text) if c in bad)
            raise ValueError(
                f"character {text[pos]!r} at position {pos} is not in the {len(self.vocab)}-symbol vocabulary"
            )
        n = self.order
        return -sum(math.log(self._prob(text[i], text[max(0, i - n + 1) : i], top=True)) for i in range(len(text)))

    def nats_per_char(self, texts: str | Sequence[str]) -> float:
        """Cross-entropy in nats per character, pooled over ``texts`` (total −log P / total characters)."""
        texts = _as_list(texts)
        chars = sum(len(t) for t in texts)
        if chars == 0:
            raise ValueError("cannot score an empty text")
        return sum(self.nll(t) for t in texts) / chars

    def bits_per_char(self, texts: str | Sequence[str]) -> float:
        """Cross-entropy in bits per character, pooled over ``texts``."""
        return self.nats_per_char(texts) / math.log(2.0)

    def perplexity(self, texts: str | Sequence[str]) -> float:
        """Per-character perplexity exp(nats per character) of ``texts`` (a uniform model over V symbols has V)."""
        return math.exp(self.nats_per_char(texts))


@functools.lru_cache(maxsize=4)
def reference_ngram(order: int = 5, held_out_fraction: float | None = None) -> CharNGram:
    """The reference model: order ``order`` fitted on the training split of the Python documentation corpus
    (:mod:`diffsamplers.data.text`), with the whole corpus's vocabulary. Cached."""
    from ..data.text import HELD_OUT_FRACTION, corpus_vocab, split_text

    fraction = HELD_OUT_FRACTION if held_out_fraction is None else held_out_fraction
    return CharNGram(split_text("train", fraction), order=order, vocab=corpus_vocab().symbols)
