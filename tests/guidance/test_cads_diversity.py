"""The claim of docs/guidance.md's CADS section at small scale: on the digits model at guidance 7.5, CADS (the
spec's defaults) raises the within-class diversity over plain classifier-free guidance with the same seeds and
steps, and the class accuracy stays within 2 points (40 samples, 10 steps; the table has 1,000 at 20). Recall and
coverage are not asserted: at 40 samples they move by one or two real digits, and at 1,000 recall at 7.5 does not
rise (the table says so)."""

import pytest

from diffsamplers.apps.recipes import parse_guidance
from diffsamplers.apps.registry import load_model
from diffsamplers.apps.samplers import make_sampler
from diffsamplers.metrics.manifold import within_class_diversity

pytestmark = pytest.mark.usefixtures("single_thread")


def test_cads_raises_within_class_diversity():
    bundle = load_model("digits")
    extractor = bundle.features()
    scores = {}
    for spec in ("7.5", "7.5+cads"):
        recipe = parse_guidance(spec)
        sampler = make_sampler(bundle, "dpm++2m", 10, "linspace", recipe.scale, 0, guidance=recipe.build(bundle))
        images, labels = sampler(range(40))
        features = extractor(images)
        scores[spec] = {
            "diversity": within_class_diversity(features, labels),
            "accuracy": float((extractor.classify(features) == labels).float().mean()),
        }
    cfg, cads = scores["7.5"], scores["7.5+cads"]
    assert cads["diversity"] > cfg["diversity"]
    assert cads["accuracy"] >= cfg["accuracy"] - 0.02
