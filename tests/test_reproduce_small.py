"""benchmarks/reproduce_small.py --smoke: two tiny runs and a fine-tuning run, then the report."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NUMBER = re.compile(r"^-?\d+\.\d+( ± \d+\.\d+)?$")


def _table(text: str, header_start: str) -> list[list[str]]:
    """The rows (cells) of the markdown table whose header row starts with ``header_start``."""
    lines = text.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_smoke_writes_report_and_plots(tmp_path):
    out = tmp_path / "rs"
    cmd = [sys.executable, str(REPO / "benchmarks/reproduce_small.py"), "--smoke", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (out / "REPORT.md").read_text()
    assert f"python benchmarks/reproduce_small.py --smoke --out {out}" in report
    assert "Runs finished: 3 of 3." in report
    for name in ("cv_curves", "importance_heatmaps", "val_curves", "val_vs_lambda", "finetune_heatmaps"):
        png = out / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"plots/{name}.png" in report

    rows = _table(report, "| setting |")
    assert [r[0] for r in rows] == ["gated-l0", "gated-l1e-2"]
    for r in rows:
        assert r[1] == "1" and r[2] == "6"
        for cell in (r[3], r[4], r[6], r[7], r[8]):  # train/val loss, mean/max/peak CV
            assert NUMBER.match(cell), cell
        assert 0 < float(r[4]) < 10  # a real cross-entropy on a 512-token vocabulary
        assert 0 <= float(r[6]) <= float(r[7]) <= float(r[8])
        assert re.match(r"^\d+\.\d of 8$", r[9])  # dormant heads of 2 layers x 4 heads
    ft = _table(report, "| run | steps | formerly dormant")
    assert [r[0] for r in ft] == ["starting model", "ft-shared-1"]
    assert all(NUMBER.match(c) for r in ft for c in (r[2], r[3], r[7]))

    # finished runs are skipped: a second call trains nothing and rewrites the same table
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert again.returncode == 0 and "[reproduce] 1/" not in again.stdout
    assert _table((out / "REPORT.md").read_text(), "| setting |") == rows
