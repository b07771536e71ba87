"""benchmarks/gpu/run.sh --dry-run: the one-call GPU check's logic on the CPU (every stage runs
and writes its JSON with numbers that parse), so a session lent a GPU spends its minutes measuring."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "benchmarks/gpu/run.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + (tmp_path / "check.log").read_text()[-3000:]
    res = {p.stem: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    assert set(res) == {"kernels", "model", "cli", "cli-compile", "cli-noaux", "hf", "profile"}
    # the device tool returns only a few files (8): seven JSON files and one log, no run directories
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{n}.json" for n in res] + ["check.log"])
    assert all(r["ok"] for r in res.values())
    assert any(c["augmented"] for c in res["kernels"]["cases"])  # the fallback's own case
    for case in res["kernels"]["cases"] + res["model"]["cases"]:
        assert 0 <= max(v for k, v in case.items() if k in ("out", "lse", "dq", "dk", "dv", "max_rel_grad")) <= case["tol"]
    for name in ("cli", "cli-compile", "cli-noaux"):
        assert res[name]["tokens_per_s"] > 0 and 0 < res[name]["mfu"] < 1 and res[name]["records"] >= 1
    assert res["cli-compile"]["compile"] is True and res["cli-noaux"]["aux"] is False and res["cli"]["aux"] is True
    assert res["hf"]["ratio"] > 0
    for name in ("hf", "megasink"):
        top = res["profile"][name]["top"]
        assert res["profile"][name]["total_ms"] > 0 and len(top) > 5 and top[0]["ms_per_step"] >= top[-1]["ms_per_step"]
