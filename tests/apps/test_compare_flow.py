"""``diffsamplers compare --process flow``: the rectified-flow mixture from x_T = ε at t = 1, scored against the exact
flow ODE solution from t = 1."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from diffsamplers.apps.cli import main
from diffsamplers.apps.compare import DEFAULT_NFES, FLOW_AYS_FILE, FLOW_METHODS, METHODS, Method, run_compare
from diffsamplers.apps.recipes import parse_schedule
from diffsamplers.models.gmm import default_flow_process
from diffsamplers.schedules.learned import LearnedSchedule

ROOT = Path(__file__).resolve().parents[2]

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


def test_the_learned_flow_schedule_loads_as_a_gmm_flow_schedule(tmp_path, monkeypatch):
    """The Align Your Steps file of the flow rows (docs/flow_matching.md): learned for gmm-flow with DPM-Solver++ 2M
    on σ̃ ∈ [0.01, σ̃_max], stages 10 → 20 → 40 decreasing within the process's range; at every NFE of the table it
    builds a decreasing schedule ending at 0; the rows find it from any working directory and keep the spec as
    written."""
    flow = default_flow_process()
    learned = LearnedSchedule.load(ROOT / FLOW_AYS_FILE)
    meta = learned.metadata
    assert (meta["model"], meta["solver"], meta["nfe"]) == ("gmm-flow", "dpm++2m", 10)
    assert meta["process"] == flow.to_config() and meta["settings"]["sigma_min"] == 0.01
    assert sorted(learned.stages) == [10, 20, 40]
    for levels in learned.stages.values():
        assert np.all(np.diff(levels) < 0)
        assert levels[0] == pytest.approx(flow.sigma_max) and levels[-1] == pytest.approx(0.01)
    for nfe in DEFAULT_NFES:
        sched = parse_schedule(f"learned:{ROOT / FLOW_AYS_FILE}").build(flow, nfe)  # raises outside the range
        assert sched.num_steps == nfe and sched.sigmas[-1] == 0.0 and np.all(np.diff(sched.sigmas) < 0)
    rows = [Method(*row) for row in FLOW_METHODS if row[2] == f"learned:{FLOW_AYS_FILE}"]
    assert [m.name for m in rows] == ["DPM-Solver++ 2M, AYS learned", "UniPC (bh2), AYS learned"]
    grid = Method(*next(row for row in FLOW_METHODS if row[0] == "DPM-Solver++ 2M"))
    monkeypatch.chdir(tmp_path)
    report = run_compare(nfes=[10], num_samples=8, process="flow", methods=[rows[0], grid], progress=False)
    assert report["methods"][0]["schedule"] == f"learned:{FLOW_AYS_FILE}"
    errors = {m["name"]: m["errors"]["10"] for m in report["methods"]}
    # Measured (8 samples, seed 0): 3.26e-2 on the learned schedule against 7.42e-2 on the shift-3 flow grid.
    assert errors["DPM-Solver++ 2M, AYS learned"] < 0.6 * errors["DPM-Solver++ 2M"]
