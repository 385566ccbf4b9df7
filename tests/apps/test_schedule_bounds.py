"""``diffsamplers schedule optimize --sigma-min/--sigma-max``: the learned schedule's endpoints, checked before any
computation; a bad value ends in one line naming the flag, exit status 2, and no file written."""

import pytest

from tests.apps.test_cli import one_line_error

OPTIMIZE = ["schedule", "optimize", "--output", "s.safetensors", "--quiet"]

BAD_BOUNDS = {
    "zero": (["--sigma-min", "0"], "--sigma-min must be a finite number > 0, got 0"),
    "negative": (["--sigma-max", "-1"], "--sigma-max must be a finite number > 0, got -1"),
    "infinite": (["--sigma-max", "inf"], "--sigma-max must be a finite number > 0, got inf"),
    "text": (["--sigma-min", "tiny"], "--sigma-min must be a finite number > 0, got tiny"),
    "crossed": (["--sigma-min", "1", "--sigma-max", "0.5"], "--sigma-min must be below --sigma-max, got 1 and 0.5"),
    "below the model's range": (
        ["--model", "gmm", "--sigma-min", "1e-4"],
        "--sigma-min: sigma_min 0.0001 lies outside the model's noise range [0.0100013, 157.407] (DiscreteVP)",
    ),
    "above the model's range": (
        ["--model", "gmm-flow", "--sigma-max", "1e7"],
        "--sigma-max: sigma_max 1e+07 lies outside the model's noise range [1e-06, 999999] (RectifiedFlow)",
    ),
    "above the model's sigma_max": (
        ["--model", "gmm", "--sigma-min", "200"],
        "--sigma-min: sigma_min 200 must be below sigma_max 157.407",
    ),
}


@pytest.mark.parametrize("argv, message", BAD_BOUNDS.values(), ids=BAD_BOUNDS.keys())
def test_bad_schedule_bounds_fail_in_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the output and its checkpoint would land here; none is written
    line = one_line_error([*OPTIMIZE, *argv], capsys)
    assert line == f"diffsamplers schedule optimize: error: {message}"
    assert not list(tmp_path.iterdir())
