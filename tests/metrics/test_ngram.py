"""The character n-gram reference (interpolated Kneser–Ney) and the unigram entropy of text samples."""

from __future__ import annotations

import math
import random

import pytest

from diffsamplers.data.text import corpus_vocab, split_text
from diffsamplers.metrics.ngram import CharNGram, reference_ngram, unigram_entropy

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def reference() -> CharNGram:
    return reference_ngram(5)


@pytest.fixture(scope="module")
def held_out() -> str:
    return split_text("held_out")


def test_held_out_perplexity_is_finite_and_beats_uniform_and_unigram(reference, held_out):
    v = corpus_vocab().size
    ppl = reference.perplexity(held_out)
    assert math.isfinite(ppl) and 1.0 < ppl < v
    # a context model of order 5 must beat the text's own unigram entropy (measured: 1.68 vs 4.43 bits/char)
    assert reference.bits_per_char(held_out) < unigram_entropy(held_out) - 1.0
    assert reference.bits_per_char(held_out) == pytest.approx(math.log2(ppl))


def test_shuffled_characters_score_much_worse(reference, held_out):
    chars = list(held_out[:8000])
    random.Random(0).shuffle(chars)
    shuffled = "".join(chars)
    # same unigram statistics, no structure: measured ≈ 150 against ≈ 3.2 for the text itself
    assert unigram_entropy(shuffled) == pytest.approx(unigram_entropy(held_out[:8000]))
    assert reference.perplexity(shuffled) > 10 * reference.perplexity(held_out[:8000])


@pytest.mark.parametrize("context", ["", "e", "the s", "def f", "Q~zz", "qqqqqqqqqq"])
def test_conditionals_sum_to_one(reference, context):
    assert sum(reference.prob(c, context) for c in reference.vocab) == pytest.approx(1.0, abs=1e-12)


def test_unigram_model_by_hand():
    """Order 1 on "aab" over {a, b, c}: D = n₁/(n₁ + 2 n₂) = 1/3, P(w) = (max(c_w − D, 0) + D · 2 · 1/3) / 3."""
    model = CharNGram("aab", order=1, vocab="abc")
    assert model.prob("a") == pytest.approx(17 / 27)
    assert model.prob("b") == pytest.approx(8 / 27)
    assert model.prob("c") == pytest.approx(2 / 27)
    assert model.nll("ac") == pytest.approx(-math.log(17 / 27) - math.log(2 / 27))


def test_lower_orders_use_continuation_counts():
    """Kneser–Ney's point: 'z' is frequent but only ever follows 'q'; 'y' is rarer but follows many characters.
    In an unseen context the back-off distribution must prefer 'y' (raw unigram counts would prefer 'z')."""
    text = "qz" * 50 + "ay by cy dy ey fy "
    model = CharNGram(text, order=2)
    assert text.count("z") > text.count("y")
    assert model.prob("y", "z") > model.prob("z", "z")  # 'z' is never followed by anything but 'q'
    assert model.prob("y", "y") > model.prob("z", "y")
    assert sum(model.prob(c, "z") for c in model.vocab) == pytest.approx(1.0)


def test_bad_input_is_named():
    model = CharNGram("hello world", order=3)
    with pytest.raises(ValueError, match=r"character 'Z' at position 2"):
        model.nll("heZ")
    with pytest.raises(ValueError, match="order must be a positive integer, got 0"):
        CharNGram("abc", order=0)
    with pytest.raises(ValueError, match=r"\['x'\] are not in the vocabulary"):
        CharNGram("abx", order=2, vocab="ab")
    with pytest.raises(ValueError, match="empty"):
        model.perplexity([""])


def test_unigram_entropy():
    assert unigram_entropy("aaaaaaa") == 0.0
    assert unigram_entropy("ab" * 10) == pytest.approx(1.0)
    assert unigram_entropy(["abcd", "dcba"]) == pytest.approx(2.0)  # pooled over texts
    assert unigram_entropy("abcd", base=math.e) == pytest.approx(math.log(4))
    with pytest.raises(ValueError, match="empty"):
        unigram_entropy(["", ""])
