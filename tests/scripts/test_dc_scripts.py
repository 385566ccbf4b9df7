"""scripts/search_dc_ratios.py, fit_cpr.py and eval_dc_solver.py run end to end (small settings)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from diffsamplers.solvers.dc_cpr import CascadePolynomialRegression
from diffsamplers.solvers.dc_ratios import DCRatios

ROOT = Path(__file__).resolve().parents[2]


def _run(script, *args):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )
    return result


def test_search_fit_and_eval_scripts(tmp_path):
    files = []
    for nfe, scale in [(5, 1.0), (8, 3.0)]:
        out = tmp_path / f"r{nfe}_{scale}.safetensors"
        r = _run(
            "search_dc_ratios.py", "--model", "gmm-cond", "--nfe", nfe, "--guidance", scale,
            "--out", out, "--iterations", 5, "--reference-steps", 200,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]
        assert "wrote" in r.stdout and DCRatios.load(out).check(nfe=nfe, model="gmm-cond", guidance_scale=scale)
        files.append(out)
    # running it again finds the complete file and returns at once
    again = _run("search_dc_ratios.py", "--model", "gmm-cond", "--nfe", 5, "--out", files[0], "--iterations", 5,
                 "--reference-steps", 200)  # fmt: skip
    assert again.returncode == 0 and "step" not in again.stdout
    bad = _run("search_dc_ratios.py", "--model", "gmm-cond", "--nfe", 5, "--out", tmp_path / "x.safetensors",
               "--datapoints", 4)  # fmt: skip
    assert bad.returncode == 2 and "needs at least 10 datapoints" in bad.stderr
    # the joint refinement, validated on other seeded noises with their own labels
    refined_out = tmp_path / "refined.safetensors"
    r = _run("search_dc_ratios.py", "--model", "gmm-cond", "--nfe", 5, "--guidance", 3.0, "--out", refined_out,
             "--iterations", 5, "--reference-steps", 200, "--refine-iterations", 3, "--refine-validation", 6)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    info = DCRatios.load(refined_out).search["refine"]
    assert "joint refinement" in r.stdout and info["validation"]["datapoints"] == 6
    assert info["validation_loss_after"] <= info["validation_loss_before"]

    cpr = tmp_path / "cpr.safetensors"
    r = _run("fit_cpr.py", *files, "--out", cpr, "--predict", 7, 2.0)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "NFE 7, guidance 2:" in r.stdout
    assert len(CascadePolynomialRegression.load(cpr).predict(7, 2.0)) == 7

    report = tmp_path / "eval.json"
    ratio_dir = tmp_path / "ratios"
    r = _run("eval_dc_solver.py", "--model", "gmm", "--nfe", 5, 6, 8, "--eval", 8, "--iterations", 5,
             "--reference-steps", 200, "--refine-iterations", 3, "--ratio-dir", ratio_dir,
             "--json", report)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| DC-Solver (searched) |" in r.stdout and "| DC-Solver (searched + joint refinement) |" in r.stdout
    rows = json.loads(report.read_text())["rows"]
    assert [row["nfe"] for row in rows] == [5, 6, 8] and all("DPM-Solver++ 3M" in row["errors"] for row in rows)
    # CPR fitted on the other configurations' greedy and refined ratios, at the interior NFE only
    assert "| CPR of refined recovery of the refined gain over UniPC |" in r.stdout
    assert {"DC-Solver (CPR)", "DC-Solver (CPR of refined)"} <= set(rows[1]["errors"]) and "cpr_refined_ratios" in rows[
        1
    ]
    assert "DC-Solver (CPR of refined)" not in rows[0]["errors"]
    # greedy ratios where CPR globs them, refined ones apart, each with its greedy start recorded
    assert sorted(p.name for p in ratio_dir.glob("*.safetensors")) == [
        "gmm_dc-unipc2-bh2_nfe5_cfg1.safetensors", "gmm_dc-unipc2-bh2_nfe6_cfg1.safetensors",
        "gmm_dc-unipc2-bh2_nfe8_cfg1.safetensors",
    ]  # fmt: skip
    refined = DCRatios.load(ratio_dir / "refined" / "gmm_dc-unipc2-bh2_nfe6_cfg1.safetensors")
    assert (
        refined.search["greedy_ratios"] == DCRatios.load(ratio_dir / "gmm_dc-unipc2-bh2_nfe6_cfg1.safetensors").ratios
    )
    assert refined.search["refine"]["done"] and refined.ratios == rows[1]["refined_ratios"]
    assert refined.search["refine"]["validation"]["datapoints"] == 32
    assert json.loads(report.read_text())["refine_validation"] == 32
