"""scripts/train_minority_classifier.py and scripts/minority_guidance_digits.py run end to end (tiny settings)."""

import json
import runpy
from pathlib import Path

import pytest

from diffsamplers.models.digits import load_digits
from diffsamplers.models.minority_classifier import load_minority_classifier, network_id

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("single_thread")


def _run(script, *args):
    """The script's ``main(argv)``, in this process (the digits model and diffusers are imported once)."""
    return runpy.run_path(str(ROOT / "scripts" / script), run_name="script")["main"]([str(a) for a in args])


def test_training_writes_a_classifier_for_the_digits_model(tmp_path):
    out = tmp_path / "minority"
    _run(
        "train_minority_classifier.py", "--iterations", 2, "--batch-size", 8, "--draws", 1, "--distance", "l2",
        "--levels", 4, "--output", out,
    )  # fmt: skip
    model, info = load_minority_classifier(out, model_id=network_id(load_digits().unet), num_levels=4)
    assert info.distance == "l2" and info.num_draws == 1 and len(info.thresholds) == 3
    held = info.metrics["held_out"]
    assert set(held["by_time"]) == {"0", "0.1", "0.25", "0.5", "0.75", "1"}
    assert 0 <= held["uniform_t"]["accuracy"] <= 1 and info.metrics["num_train"] + info.metrics["num_held_out"] == 1438


def test_guidance_table_rows_and_grid(tmp_path, capsys):
    out, grid = tmp_path / "minority.json", tmp_path / "grid.png"
    code = _run(
        "minority_guidance_digits.py", "--num-samples", 20, "--weights", 0, 2, "--nfe", 3, "--draws", 1,
        "--json", out, "--grid", grid, "--grid-samples", 10,
    )  # fmt: skip
    assert code == 0
    report = json.loads(out.read_text())
    assert [row["w"] for row in report["rows"]] == [0.0, 2.0] and grid.is_file()
    assert "| held-out digits |" in capsys.readouterr().out
    unguided, guided = report["rows"]
    assert guided["classifier_level"] > unguided["classifier_level"]
