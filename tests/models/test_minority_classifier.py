"""The shipped minority classifier of the digits model (Um, Lee & Ye 2024, Sec. 3.2): small, loads offline against
the digits network's id and level count, refuses another model or L by name, round-trips through its files."""

from __future__ import annotations

import json
import math

import pytest
import torch

from diffsamplers.artifacts import ArtifactError
from diffsamplers.models.digits import DIGITS_PIPELINE_DIR, load_digits
from diffsamplers.models.minority_classifier import (
    MinorityClassifier,
    default_minority_dir,
    load_minority_classifier,
    network_id,
    save_minority_classifier,
)

SHIPPED = default_minority_dir(DIGITS_PIPELINE_DIR)


@pytest.fixture(scope="module")
def digits_id() -> str:
    return network_id(load_digits().unet)


def test_shipped_classifier_is_small_and_describes_itself(digits_id):
    assert SHIPPED.name == "digits_minority" and SHIPPED.parent == DIGITS_PIPELINE_DIR.parent
    assert (SHIPPED / "model.safetensors").stat().st_size < 1_000_000
    model, info = load_minority_classifier(SHIPPED, model_id=digits_id, num_levels=10)
    assert isinstance(model, MinorityClassifier) and model.num_levels == info.num_levels == 10
    assert not any(p.requires_grad for p in model.parameters())
    assert info.model == "digits" and info.model_id == digits_id
    assert len(info.thresholds) == 9 and list(info.thresholds) == sorted(info.thresholds)
    assert info.time == pytest.approx(0.6) and info.distance == "features" and info.num_draws >= 5
    held = info.metrics["held_out"]["by_time"]["0"]
    assert held["accuracy"] > info.metrics["chance_accuracy"]  # better than chance on held-out digits
    logits = model(torch.zeros(3, 1, 16, 16), torch.tensor([math.log(0.01), 0.0, 5.0]))
    assert logits.shape == (3, 10) and bool(torch.isfinite(logits).all())


def test_mismatched_model_or_level_count_is_refused_by_value(digits_id):
    with pytest.raises(
        ValueError, match=rf"model 'digits' \(model id {digits_id}\), not for this model \(model id 0123"
    ):
        load_minority_classifier(SHIPPED, model_id="0123456789abcdef")
    with pytest.raises(ValueError, match="has 10 minority levels, not 5"):
        load_minority_classifier(SHIPPED, model_id=digits_id, num_levels=5)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing .*train_minority_classifier.py"):
        load_minority_classifier(tmp_path / "nothing")


def test_round_trip_and_header_check(tmp_path, digits_id):
    model, info = load_minority_classifier(SHIPPED)
    out = save_minority_classifier(model, tmp_path / "copy", info)
    again, info2 = load_minority_classifier(out, model_id=digits_id)
    assert info2 == info
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again(x, 0.5), model(x, 0.5))
    # a config.json edited to claim another model no longer matches the weights file's header
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "model_id": "ffffffffffffffff"}))
    with pytest.raises(ArtifactError, match="does not match"):
        load_minority_classifier(out)
    with pytest.raises(ValueError, match="info gives 10 levels and 9 thresholds"):
        save_minority_classifier(MinorityClassifier(4), tmp_path / "bad", info)


def test_network_id_follows_the_weights():
    a = MinorityClassifier(3)
    b = MinorityClassifier(3)
    b.load_state_dict(a.state_dict())
    assert network_id(a) == network_id(b) and len(network_id(a)) == 16
    with torch.no_grad():
        b.head.bias[0] += 1e-6
    assert network_id(a) != network_id(b)
    with pytest.raises(TypeError, match="torch network"):
        network_id(lambda x: x)
