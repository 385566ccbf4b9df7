"""The k-NN metrics of what guidance changes: hand-computed cases, known properties, an independent whole-matrix
implementation (the blocked one must agree with it for any block size), and the input checks."""

import pytest
import torch

from diffsamplers.metrics import manifold
from diffsamplers.metrics.manifold import (
    average_knn_distance,
    density_coverage,
    precision_recall,
    within_class_diversity,
)

# 1-D points: real 0, 1, 2, 3 (k = 1: every real ball has radius 1); fake 0.5 (inside the balls of 0 and 1) and
# 10 (inside none); the two fakes are each other's nearest neighbour, so each fake ball has radius 9.5.
REAL = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
FAKE = torch.tensor([[0.5], [10.0]])


def test_hand_computed_precision_recall_density_coverage():
    assert precision_recall(REAL, FAKE, k=1) == (0.5, 1.0)  # recall 1: one outlier inflates the fake manifold
    density, coverage = density_coverage(REAL, FAKE, k=1)
    assert density == 1.0  # (2 balls + 0 balls) / (k·M = 2)
    assert coverage == 0.5  # the balls of 0 and 1 hold a fake, those of 2 and 3 none
    # k = 2: real radii 2, 1, 1, 2; the fake 0.5 still lies in the balls of 0 and 1 only: 2 / (k·M = 4)
    assert density_coverage(REAL, FAKE, k=2) == (0.5, 0.5)


def test_hand_computed_average_knn_distance():
    # 0.5: nearest reals 0 and 1 (0.5 each) → 0.5; 10: nearest 3 and 2 (7, 8) → 7.5; mean 4
    assert average_knn_distance(FAKE, REAL, k=2) == pytest.approx(4.0)
    assert average_knn_distance(FAKE, REAL, k=4) == pytest.approx((1.25 + 8.5) / 2)  # k = N: all real samples


def test_hand_computed_within_class_diversity():
    features = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0], [1.0, 0.0], [5.0, 5.0], [0.0, 0.0], [0.0, 3.0]])
    labels = torch.tensor([0, 0, 1, 1, 2, 3, 3])
    # class 0: 5; class 1: 1; class 2: one sample, skipped; class 3: 3 → (5 + 1 + 3) / 3
    assert within_class_diversity(features, labels) == pytest.approx(3.0)
    three = torch.tensor([[0.0], [1.0], [3.0]])
    assert within_class_diversity(three, torch.zeros(3, dtype=torch.long)) == pytest.approx(2.0)  # (1 + 3 + 2) / 3


def _clusters(centres: torch.Tensor, per_centre: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (centres[:, None, :] + torch.randn(len(centres), per_centre, centres.shape[1], generator=g)).flatten(0, 1)


CENTRES = torch.tensor([[10.0, 10.0], [10.0, -10.0], [-10.0, 10.0], [-10.0, -10.0]])


def test_identical_sets():
    x = torch.randn(60, 5, generator=torch.Generator().manual_seed(0))
    assert precision_recall(x, x) == (1.0, 1.0)
    assert density_coverage(x, x)[1] == 1.0


def test_disjoint_far_sets():
    real = torch.randn(50, 4, generator=torch.Generator().manual_seed(1))
    fake = torch.randn(40, 4, generator=torch.Generator().manual_seed(2)) + 100.0
    assert precision_recall(real, fake) == (0.0, 0.0)
    assert density_coverage(real, fake) == (0.0, 0.0)
    assert average_knn_distance(fake, real) > 190.0  # ≈ ‖(100, 100, 100, 100)‖ = 200


def test_half_the_modes():
    """Generated samples from 2 of the 4 modes: faithful (precision ≈ 1, density ≈ 1: where they are, they are as
    dense as the real samples) but only half as diverse (recall and coverage ≈ 0.5)."""
    real = _clusters(CENTRES, 150, seed=3)
    fake = _clusters(CENTRES[:2], 150, seed=4)
    precision, recall = precision_recall(real, fake)
    density, coverage = density_coverage(real, fake)
    assert precision > 0.9 and 0.45 < recall <= 0.5
    assert 0.45 < coverage <= 0.5 and 0.8 < density < 1.2
    whole = _clusters(CENTRES, 75, seed=5)  # as many fakes, from every mode
    assert precision_recall(real, whole)[1] > 0.9 and density_coverage(real, whole)[1] > 0.8


def test_average_knn_distance_is_higher_in_sparse_regions():
    real = torch.randn(2000, 2, generator=torch.Generator().manual_seed(6))
    near_mode = 0.3 * torch.randn(100, 2, generator=torch.Generator().manual_seed(7))
    in_tail = near_mode + torch.tensor([2.5, 0.0])
    assert average_knn_distance(in_tail, real) > 2 * average_knn_distance(near_mode, real)


def _reference(real: torch.Tensor, fake: torch.Tensor, k: int) -> dict[str, float]:
    """The metrics from whole distance matrices, computed directly (no ‖x‖² + ‖y‖² − 2x·y expansion, no blocks)."""
    real, fake = real.double(), fake.double()

    def dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a[:, None, :] - b[None, :, :]).norm(dim=2)

    def radius(x: torch.Tensor) -> torch.Tensor:
        return dist(x, x).sort(dim=1).values[:, k]  # column 0: the sample itself (no duplicates here)

    d = dist(fake, real)
    inside = d <= radius(real)[None, :]
    return {
        "precision": inside.any(1).double().mean().item(),
        "recall": (d.T <= radius(fake)[None, :]).any(1).double().mean().item(),
        "density": inside.sum().item() / (k * len(fake)),
        "coverage": inside.any(0).double().mean().item(),
        "avgknn": d.sort(dim=1).values[:, :k].mean().item(),
    }


@pytest.mark.parametrize("block", [1, 7, 64, manifold.MAX_BLOCK_ELEMENTS])
def test_blocks_agree_with_the_whole_matrix(block, monkeypatch):
    monkeypatch.setattr(manifold, "MAX_BLOCK_ELEMENTS", block)
    g = torch.Generator().manual_seed(8)
    real, fake = torch.randn(70, 3, generator=g), 1.3 * torch.randn(45, 3, generator=g) + 0.4
    ref = _reference(real, fake, k=3)
    assert precision_recall(real, fake, k=3) == (pytest.approx(ref["precision"]), pytest.approx(ref["recall"]))
    assert density_coverage(real, fake, k=3) == (pytest.approx(ref["density"]), pytest.approx(ref["coverage"]))
    assert average_knn_distance(fake, real, k=3) == pytest.approx(ref["avgknn"])
    labels = torch.arange(70) % 4
    expected = sum(torch.pdist(real[labels == c].double()).mean().item() for c in range(4)) / 4
    assert within_class_diversity(real, labels) == pytest.approx(expected)


def test_duplicates_are_neighbours_at_distance_zero():
    real = torch.tensor([[0.0], [0.0], [5.0], [5.0]])  # k = 1: every radius is 0
    assert precision_recall(real, torch.tensor([[0.0], [5.0], [2.0]]), k=1)[0] == pytest.approx(2 / 3)
    assert density_coverage(real, torch.tensor([[0.0], [1.0]]), k=1) == (1.0, 0.5)


def test_float32_and_float64_inputs_agree():
    g = torch.Generator().manual_seed(9)
    real, fake = torch.randn(40, 6, generator=g), torch.randn(30, 6, generator=g)  # float32: exact in float64
    assert precision_recall(real, fake) == precision_recall(real.double(), fake.double())
    assert density_coverage(real.double(), fake) == density_coverage(real, fake.double())


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: precision_recall(REAL, FAKE, k=2), r"k=2 is too large: real has shape \(4, 1\), fake \(2, 1\)"),
        (lambda: precision_recall(REAL, REAL, k=4), r"k=4 is too large: real has shape \(4, 1\), fake \(4, 1\)"),
        (lambda: density_coverage(REAL, FAKE, k=4), r"k=4 is too large: real has shape \(4, 1\)"),
        (lambda: average_knn_distance(FAKE, REAL, k=5), r"k=5 is too large: real has shape \(4, 1\)"),
        (lambda: precision_recall(REAL, FAKE, k=0), "k must be a positive integer, got 0"),
        (lambda: density_coverage(REAL, FAKE, k=1.5), "k must be a positive integer, got 1.5"),
        (
            lambda: precision_recall(REAL, torch.zeros(3, 2)),
            r"same dimension: got shapes \(4, 1\) and \(3, 2\)",
        ),
        (lambda: average_knn_distance(torch.zeros(3), REAL), r"fake must be a 2-D \(N, d\) .* got shape \(3,\)"),
        (lambda: density_coverage(torch.zeros(2, 2, 2), FAKE), r"real must be a 2-D .* got shape \(2, 2, 2\)"),
        (lambda: precision_recall(torch.zeros(0, 1), FAKE), r"got shape \(0, 1\)"),
        (lambda: precision_recall(REAL, torch.tensor([[0.0], [float("nan")]])), r"fake \(shape \(2, 1\)\).*NaN"),
        (
            lambda: within_class_diversity(REAL, torch.tensor([0, 1, 2])),
            r"labels must have shape \(4,\) to match features of shape \(4, 1\), got \(3,\)",
        ),
        (lambda: within_class_diversity(REAL, torch.tensor([0, 1, 2, 3])), "needs a class with at least 2 samples"),
        (lambda: within_class_diversity(REAL, torch.zeros(4)), "labels must be integers"),
    ],
)
def test_bad_input_is_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()
