"""slurm/pretrain.sbatch's decision after the training step, with stand-in srun and scontrol.

What the training step's exit code is after a signal depends on the launcher (torchrun exits
1 after its workers saved on SIGTERM); the script must requeue on ``run_dir/PREEMPTED``
written during this start, and on nothing else. No cluster needed: ``srun`` is a stub that
writes the marker (or not) and exits with a chosen code, ``scontrol`` records its arguments.
"""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SRUN = """#!/bin/bash
[[ $STUB_PREEMPT == 1 ]] && echo 7 > "$STUB_RUN_DIR/PREEMPTED"
exit "$STUB_RC"
"""
SCONTROL = """#!/bin/bash
echo "$@" >> "$STUB_LOG"
[[ $1 == show ]] && echo node1
exit 0
"""


def _run_script(tmp_path, rc: int, preempt: bool, stale_marker: bool = False):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    run_dir, log = tmp_path / "run", tmp_path / "scontrol.log"
    if stale_marker:  # left by an earlier start: must not requeue again
        run_dir.mkdir()
        (run_dir / "PREEMPTED").write_text("3\n")
        old = time.time() - 3600
        os.utime(run_dir / "PREEMPTED", (old, old))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "42", "SLURM_SUBMIT_DIR": str(REPO),
           "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "node1", "MEGASINK_NPROC_PER_NODE": "2",
           "MEGASINK_PYTHON": sys.executable, "STUB_RC": str(rc), "STUB_PREEMPT": str(int(preempt)),
           "STUB_RUN_DIR": str(run_dir), "STUB_LOG": str(log)}
    # `sleep` is where a real requeue ends the batch script (Slurm kills it): a no-op here
    proc = subprocess.run(["bash", "-c", 'sleep() { :; }; source slurm/pretrain.sbatch "$@"', "pretrain.sbatch",
                           "configs/tiny-sink.yaml", f"run_dir={run_dir}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    requeues = [ln for ln in (log.read_text().splitlines() if log.exists() else []) if ln.startswith("requeue")]
    return proc, requeues


@pytest.mark.parametrize("rc", [0, 1])
def test_marker_requeues_whatever_the_exit_code(tmp_path, rc):
    proc, requeues = _run_script(tmp_path, rc, preempt=True)
    assert requeues == ["requeue 42"], proc.stdout + proc.stderr
    assert proc.returncode == 0 and f"training step exited with code {rc}" in proc.stdout


@pytest.mark.parametrize("rc,stale", [(1, False), (0, True), (1, True)])
def test_no_fresh_marker_no_requeue(tmp_path, rc, stale):
    proc, requeues = _run_script(tmp_path, rc, preempt=False, stale_marker=stale)
    assert requeues == [] and proc.returncode == rc, proc.stdout + proc.stderr
