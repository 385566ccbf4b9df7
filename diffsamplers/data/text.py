"""Python's own documentation text as a character-level corpus for the bundled masked diffusion language model.

The corpus is ``pydoc_data.topics.topics`` — the help topics ``help("assert")``, ``help("with")``, … that ship with
every CPython (a dict of 79 strings, about 465 k characters and 103 distinct symbols on Python 3.11; the text
differs between Python versions, so a trained model stores its own vocabulary and :func:`corpus_fingerprint`
records which text it saw). Nothing is downloaded.

* **Vocabulary** (:class:`CharVocab`): the symbols that occur anywhere in the corpus, sorted by code point; token
  ``i`` is ``symbols[i]``, and the mask token of masked diffusion is ``V = len(symbols)`` (one past the vocabulary).
* **Split** (:func:`split_topics`): the topics sorted by key; the last ``held_out_fraction`` of them (8 of 79 at
  10 %, ≈ 38 k characters) are held out, the others are the training text. Deterministic and disjoint by topic.
* **Text of a split** (:func:`split_text`): its topics' strings concatenated in key order (each ends with a
  newline, so topics are separated by a blank line).
* **Windows**: :func:`random_windows` draws training windows of length L with a ``torch.Generator``;
  :func:`fixed_windows` cuts non-overlapping evaluation windows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = [
    "HELD_OUT_FRACTION",
    "CharVocab",
    "TextCorpus",
    "corpus_fingerprint",
    "corpus_topics",
    "corpus_vocab",
    "fixed_windows",
    "load_text_corpus",
    "random_windows",
    "split_text",
    "split_topics",
]

#: Fraction of the topics (by sorted key, from the end) held out from training.
HELD_OUT_FRACTION = 0.1
#: What :meth:`CharVocab.decode` writes for a mask token by default.
MASK_CHAR = "▒"


def corpus_topics() -> dict[str, str]:
    """A copy of ``pydoc_data.topics.topics``: help-topic name → its text."""
    try:
        from pydoc_data.topics import topics
    except ImportError as err:  # pragma: no cover - part of the standard library
        raise ImportError("the text corpus is pydoc_data.topics from Python's standard library") from err
    return dict(topics)


def corpus_fingerprint() -> str:
    """The first 16 hex digits of the SHA-256 of the whole corpus (topics in key order, name and text): tells
    whether two Python installations hold the same documentation text."""
    digest = hashlib.sha256()
    topics = corpus_topics()
    for key in sorted(topics):
        digest.update(key.encode() + b"\0" + topics[key].encode() + b"\0")
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class CharVocab:
    """A character vocabulary: token ``i`` ↔ ``symbols[i]``; the mask id is ``size`` (one past the symbols).

    ``symbols`` must be distinct characters sorted by code point (the order :func:`corpus_vocab` builds).
    """

    symbols: str

    def __post_init__(self) -> None:
        if not self.symbols:
            raise ValueError("a vocabulary needs at least one symbol")
        if list(self.symbols) != sorted(set(self.symbols)):
            raise ValueError(f"vocabulary symbols must be distinct and sorted by code point, got {self.symbols!r}")
        object.__setattr__(self, "_index", {c: i for i, c in enumerate(self.symbols)})

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> CharVocab:
        """The sorted set of the characters that occur in ``texts``."""
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        return cls("".join(sorted(seen)))

    @property
    def size(self) -> int:
        """V, the number of real symbols."""
        return len(self.symbols)

    @property
    def mask_id(self) -> int:
        """The mask token's id, V."""
        return len(self.symbols)

    def __len__(self) -> int:
        return len(self.symbols)

    def __contains__(self, char: object) -> bool:
        return char in self._index  # type: ignore[attr-defined]

    def encode(self, text: str) -> torch.Tensor:
        """(len(text),) int64 token ids; a character outside the vocabulary → ``ValueError`` naming it."""
        index = self._index  # type: ignore[attr-defined]
        try:
            ids = [index[c] for c in text]
        except KeyError:
            pos = next(i for i, c in enumerate(text) if c not in index)
            raise ValueError(
                f"character {text[pos]!r} (U+{ord(text[pos]):04X}) at position {pos} is not in the "
                f"{self.size}-symbol vocabulary"
            ) from None
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids: torch.Tensor | Sequence[int], mask_char: str = MASK_CHAR) -> str:
        """The text of a 1-D sequence of ids; the mask id becomes ``mask_char``; other ids → ``ValueError``."""
        if isinstance(ids, torch.Tensor):
            if ids.ndim != 1:
                raise ValueError(f"decode takes a 1-D sequence of ids, got shape {tuple(ids.shape)}")
            values = ids.tolist()
        else:
            values = [int(v) for v in ids]
        out = []
        for v in values:
            if v == self.mask_id:
                out.append(mask_char)
            elif 0 <= v < self.size:
                out.append(self.symbols[v])
            else:
                raise ValueError(
                    f"token id {v} is outside [0, {self.mask_id}] (V = {self.size}, mask id {self.mask_id})"
                )
        return "".join(out)

    def decode_batch(self, ids: torch.Tensor, mask_char: str = MASK_CHAR) -> list[str]:
        """The texts of a (B, L) batch of ids."""
        if ids.ndim != 2:
            raise ValueError(f"decode_batch takes (B, L) ids, got shape {tuple(ids.shape)}")
        return [self.decode(row, mask_char) for row in ids.cpu()]


def corpus_vocab() -> CharVocab:
    """The vocabulary of the whole corpus (training and held-out topics): every symbol that occurs, sorted."""
    return CharVocab.from_texts(corpus_topics().values())


def split_topics(held_out_fraction: float = HELD_OUT_FRACTION) -> tuple[list[str], list[str]]:
    """(training keys, held-out keys), both sorted: the last ``round(fraction · n)`` topics by key are held out
    (at least one, and at least one left for training)."""
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must lie in (0, 1), got {held_out_fraction}")
    keys = sorted(corpus_topics())
    n_held = min(len(keys) - 1, max(1, round(held_out_fraction * len(keys))))
    return keys[:-n_held], keys[-n_held:]


def split_text(
    split: Literal["train", "held_out", "all"] = "train", held_out_fraction: float = HELD_OUT_FRACTION
) -> str:
    """The text of a split: its topics concatenated in key order."""
    if split not in ("train", "held_out", "all"):
        raise ValueError(f"unknown split {split!r}: expected 'train', 'held_out' or 'all'")
    topics = corpus_topics()
    train, held = split_topics(held_out_fraction)
    keys = {"train": train, "held_out": held, "all": sorted(topics)}[split]
    return "".join(topics[k] for k in keys)


@dataclass(frozen=True)
class TextCorpus:
    """The encoded corpus: the vocabulary and the token ids of the training and held-out text."""

    vocab: CharVocab
    train: torch.Tensor
    held_out: torch.Tensor
    held_out_fraction: float
    fingerprint: str


def load_text_corpus(held_out_fraction: float = HELD_OUT_FRACTION, vocab: CharVocab | None = None) -> TextCorpus:
    """The corpus encoded with ``vocab`` (default: :func:`corpus_vocab`)."""
    vocab = corpus_vocab() if vocab is None else vocab
    return TextCorpus(
        vocab=vocab,
        train=vocab.encode(split_text("train", held_out_fraction)),
        held_out=vocab.encode(split_text("held_out", held_out_fraction)),
        held_out_fraction=held_out_fraction,
        fingerprint=corpus_fingerprint(),
    )


def _check_length(ids: torch.Tensor, length: int) -> None:
    if ids.ndim != 1:
        raise ValueError(f"windows are cut from a 1-D sequence of ids, got shape {tuple(ids.shape)}")
    if int(length) < 1:
        raise ValueError(f"window length must be positive, got {length}")
    if ids.numel() < length:
        raise ValueError(f"a text of {ids.numel()} tokens is shorter than the window length {length}")


def random_windows(ids: torch.Tensor, length: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """(batch_size, length) windows of ``ids`` at uniformly random starts (drawn from ``generator``, on the CPU)."""
    _check_length(ids, length)
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    starts = torch.randint(0, ids.numel() - length + 1, (int(batch_size),), generator=generator)
    return ids[starts[:, None] + torch.arange(length)]


def fixed_windows(ids: torch.Tensor, length: int, max_windows: int | None = None) -> torch.Tensor:
    """(N, length) consecutive non-overlapping windows from the start of ``ids`` (the tail shorter than a window is
    dropped), the first ``max_windows`` if given, else all ⌊len / length⌋."""
    _check_length(ids, length)
    n = ids.numel() // length
    if max_windows is not None:
        if int(max_windows) < 1:
            raise ValueError(f"max_windows must be positive, got {max_windows}")
        n = min(n, int(max_windows))
    return ids[: n * length].reshape(n, length).clone()
