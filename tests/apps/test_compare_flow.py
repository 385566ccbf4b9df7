"""``diffsamplers compare --process flow``: the rectified-flow mixture from x_T = ε at t = 1, scored against the exact
flow ODE solution from t = 1."""

import json
import math

import pytest

from diffsamplers.apps.cli import main
from diffsamplers.apps.compare import FLOW_METHODS, METHODS, Method, run_compare

ROWS = ("DPM-Solver++ 2M", "DPM-Solver++ 2M, logSNR", "diffusers FlowMatch Euler", "diffusers DPM-Solver++ 2M")


def test_flow_compare_orders_the_solvers():
    methods = [Method(*row) for row in FLOW_METHODS if row[0] in ROWS]
    report = run_compare(nfes=[10, 20], num_samples=8, process="flow", methods=methods, progress=False)
    assert report["process_name"] == "flow" and "t = 1" in report["start"]
    errors = {m["name"]: m["errors"] for m in report["methods"]}
    assert set(errors) == set(ROWS)
    for name, row in errors.items():
        assert all(math.isfinite(row[n]) and row[n] > 0 for n in ("10", "20")), name
        assert row["20"] < row["10"], name  # errors fall with NFE
    # Measured (8 samples, seed 0): 2M 4.27e-2 vs Euler 4.52e-2 at NFE 20; the logSNR grid 6.0e-3.
    assert errors["DPM-Solver++ 2M"]["20"] < errors["diffusers FlowMatch Euler"]["20"]
    assert errors["DPM-Solver++ 2M, logSNR"]["20"] < errors["diffusers FlowMatch Euler"]["20"] / 5
    # The same grid as diffusers' flow DPM-Solver; only diffusers' integer timesteps ⌊1000 t⌋ differ (0.5 % here).
    for n in ("10", "20"):
        assert errors["DPM-Solver++ 2M"][n] == pytest.approx(errors["diffusers DPM-Solver++ 2M"][n], rel=0.02)


def test_compare_process_flag(tmp_path, capsys):
    path = tmp_path / "flow.json"
    argv = ["compare", "--process", "flow", "--nfe", "5", "--num-samples", "2", "--methods", "Euler", "--quiet"]
    assert main([*argv, "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert [m["name"] for m in report["methods"]] == ["diffusers FlowMatch Euler"]
    assert "rectified flow" in capsys.readouterr().out
    assert main(["compare", "--process", "bogus", "--quiet"]) == 2
    assert "--process: invalid choice: 'bogus'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--process: unknown process 've': expected one of vp, flow"):
        run_compare(nfes=[5], num_samples=1, process="ve")


def test_the_default_rows_per_process():
    assert {row[0] for row in FLOW_METHODS} >= {
        "DPM-Solver++ 2M",
        "DPM-Solver++ 3M",
        "UniPC (bh2)",
        "DC-Solver (bh2, searched)",
        "diffusers FlowMatch Euler",
        "diffusers DPM-Solver++ 2M",
        "diffusers DPM-Solver++ 3M",
        "diffusers UniPC (bh2)",
    }
    assert all(schedule is None or not schedule.startswith("flow") for _, _, schedule, _ in METHODS)
