"""slurm/*.sbatch on a real (throwaway) Slurm cluster on this machine.

The module fixture runs tests/slurm_cluster.sh: it installs slurm + munge + shellcheck from
the distribution's packages when missing (root, Debian), starts munged, slurmctld and two
slurmd (nodes msnode1/msnode2, each in its own UTS namespace) with everything under a
temporary directory, and stops them by their pid files at the end. Jobs run the tiny
config on CPU (``--gpus-per-node=0``, ``MEGASINK_NPROC_PER_NODE``), two ranks each:

- 2 nodes x 1 rank: the run directory, the loss, the checkpoints;
- 1 node x 2 ranks, sent the pre-timeout signal (what ``--signal=B:USR1@300`` delivers):
  checkpoints, requeues itself, resumes from ``latest`` and reproduces the loss curve of
  the uninterrupted run exactly;
- a killed rank makes the job fail at once instead of hanging, or, with
  ``MEGASINK_MAX_RESTARTS=1`` (through finetune.sbatch), restarts all ranks from the
  latest checkpoint;
- preprocess.sbatch: a job array over input files plus its merge job.

Skips (with the reason) when the cluster cannot be started here: not Linux, not root, no
apt-get or the packages do not install. ``MEGASINK_REQUIRE_SLURM=1`` turns those skips
into failures (for CI, where the cluster must run).
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_SH = ROOT / "tests" / "slurm_cluster.sh"
SKIP_CODE = 77
FINAL_STATES = {"COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
# The tiny config, made smaller still: ~0.3 s per step on 2 CPU cores.
TINY = [
    "model.n_layers=2", "model.seq_len=64", "train.micro_batch_size=2", "train.global_batch_size=4",
    "train.steps=20", "train.log_interval=5", "train.save_interval=10", "train.keep_last=10",
    "train.progress=false",
]


def _skip_or_fail(reason: str):
    if os.environ.get("MEGASINK_REQUIRE_SLURM") == "1":
        pytest.fail(f"MEGASINK_REQUIRE_SLURM=1 but {reason}")
    pytest.skip(reason)


def _script_reason(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if "SKIP:" in ln]
    return lines[-1].split("SKIP:", 1)[1].strip() if lines else stderr.strip()[-500:]


def _tools_or_skip() -> None:
    """Install slurm/munge/shellcheck if needed (exit 77 from the script means: skip)."""
    if sys.platform != "linux":
        _skip_or_fail("the Slurm test cluster runs on Linux only")
    r = subprocess.run(["bash", str(CLUSTER_SH), "install"], capture_output=True, text=True, timeout=600)
    if r.returncode == SKIP_CODE:
        _skip_or_fail(f"cannot install the Slurm test cluster: {_script_reason(r.stderr)}")
    assert r.returncode == 0, f"slurm_cluster.sh install failed:\n{r.stderr}"


class Cluster:
    def __init__(self, path: Path, env: dict):
        self.path, self.env = path, env
        self._pending_since: dict = {}

    def run(self, *cmd, check=True, timeout=60) -> subprocess.CompletedProcess:
        r = subprocess.run(list(cmd), capture_output=True, text=True, env=self.env, cwd=ROOT, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, cmd))} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
        return r

    def sbatch(self, *args, export: dict | None = None) -> int:
        """Submit from the repository root (as a user would); returns the job id."""
        exports = ",".join(["ALL"] + [f"{k}={v}" for k, v in (export or {}).items()])
        r = self.run("sbatch", "--parsable", f"--export={exports}", *map(str, args))
        return int(r.stdout.strip().split(";")[0])

    def job(self, jid: int) -> dict:
        out = self.run("scontrol", "show", "job", "-o", str(jid)).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out.splitlines()[0]))

    def wait(self, jid: int, timeout: float, on_poll=None) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            info = self.job(jid)
            if info["JobState"] in FINAL_STATES:
                return info
            if on_poll is not None:
                on_poll(info)
            time.sleep(0.5)
        raise AssertionError(f"job {jid} not finished after {timeout} s: {self.job(jid)}\n{self.diagnose(jid)}")

    def release_requeued(self, info: dict) -> None:
        """A requeued job waits ~2 min (BeginTime); tests need not.

        Not at once: slurmd refuses to start a job id whose old credential was revoked in
        the same second ("Job credential revoked"), which the 2 min delay normally avoids.
        """
        if info["JobState"] != "PENDING" or int(info.get("Restarts", "0")) == 0:
            return
        first_seen = self._pending_since.setdefault(info["JobId"], time.monotonic())
        if time.monotonic() - first_seen >= 3:
            self.run("scontrol", "update", f"JobId={info['JobId']}", "StartTime=now", check=False)

    def diagnose(self, jid: int | None = None) -> str:
        parts = []
        if jid is not None:
            out = self.job(jid).get("StdOut", "")
            if out and os.path.exists(out):
                parts.append(f"--- {out}\n" + Path(out).read_text()[-6000:])
        for log in sorted((self.path / "log").glob("*.log")):
            parts.append(f"--- {log}\n" + "\n".join(log.read_text().splitlines()[-15:]))
        return "\n".join(parts)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    _tools_or_skip()
    path = tmp_path_factory.mktemp("slurm")
    r = subprocess.run(["bash", str(CLUSTER_SH), "start", str(path), "2"], capture_output=True, text=True,
                       timeout=300)
    if r.returncode == SKIP_CODE:
        _skip_or_fail(f"cannot start the Slurm test cluster: {_script_reason(r.stderr)}")
    assert r.returncode == 0, f"slurm_cluster.sh start failed:\n{r.stderr}"
    # Jobs inherit the submitting environment (--export=ALL): keep other tests' launch
    # variables (RANK, MASTER_PORT, OMP_NUM_THREADS, ...) out of it.
    leaky = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")
    env = {k: v for k, v in os.environ.items()
           if k not in leaky and not k.startswith(("SLURM_", "TORCHELASTIC_", "MEGASINK_"))}
    env.update(SLURM_CONF=str(path / "slurm.conf"), MEGASINK_PYTHON=sys.executable)
    env["PATH"] = env.get("PATH", "") + ":/usr/sbin:/sbin"
    try:
        yield Cluster(path, env)
    finally:
        subprocess.run(["bash", str(CLUSTER_SH), "stop", str(path)], capture_output=True, text=True, timeout=120)
        assert not _daemons_of(path), f"daemons of {path} still running after stop: {_daemons_of(path)}"


def _daemons_of(path: Path) -> list[str]:
    """Processes still holding files of the cluster directory open (daemons, job steps)."""
    left = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fds = [os.readlink(fd) for fd in (proc / "fd").iterdir()]
        except OSError:
            continue
        if any(f.startswith(str(path) + "/") for f in fds):
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            left.append(f"{proc.name}: {cmdline[:120]}")
    return left


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_job_args(tmp_path: Path, nodes: int) -> list[str]:
    """sbatch options that make the GPU scripts run on this CPU-only cluster."""
    return [f"--nodes={nodes}", "--gpus-per-node=0", f"--output={tmp_path}/%x-%j.out"]


def test_sbatch_scripts_pass_shellcheck():
    _tools_or_skip()
    scripts = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "slurm").glob("*.sbatch"))
    assert {"slurm/pretrain.sbatch", "slurm/finetune.sbatch", "slurm/preprocess.sbatch"} <= set(scripts)
    files = scripts + ["slurm/common.sh", "tests/slurm_cluster.sh"]
    r = subprocess.run(["shellcheck", "-x", *files], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory):
    """The reference run: 2 nodes x 1 rank, 20 steps, no interruption."""
    tmp = tmp_path_factory.mktemp("pretrain")
    run_dir = tmp / "run"
    jid = cluster.sbatch(*_cpu_job_args(tmp, 2), "slurm/pretrain.sbatch", "configs/tiny-sink.yaml",
                         f"run_dir={run_dir}", *TINY,
                         export={"MEGASINK_NPROC_PER_NODE": 1, "MEGASINK_RDZV_PORT": _free_port()})
    info = cluster.wait(jid, timeout=150)
    return jid, info, run_dir


def test_pretrain_two_nodes(cluster, uninterrupted):
    jid, info, run_dir = uninterrupted
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", cluster.diagnose(jid)
    assert info["NodeList"] == "msnode[1-2]"
    log = Path(info["StdOut"]).read_text()
    assert "rendezvous msnode1:" in log, log
    for name in ("config.yaml", "metrics.jsonl", "checkpoints/latest", "checkpoints/step_20"):
        assert (run_dir / name).exists(), f"{name} missing in {run_dir}:\n{log[-4000:]}"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_20"
    rows = _metrics(run_dir)
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    # world size 2 (dp=2): both nodes took part
    assert "dp=2" in log, log
    for r in rows:
        # synthetic tokens are uniform: the loss sits at ln(vocab) = ln(512) ~ 6.24
        assert math.isfinite(r["loss"]) and abs(r["loss"] - math.log(512)) < 0.5, rows
        assert math.isfinite(r["aux_loss"]) and r["aux_loss"] >= 0


def test_preempt_signal_checkpoints_requeues_and_resumes(cluster, uninterrupted, tmp_path):
    _, ref_info, ref_dir = uninterrupted
    assert ref_info["JobState"] == "COMPLETED", "the uninterrupted reference run failed"
    run_dir = tmp_path / "run"
    jid = cluster.sbatch(*_cpu_job_args(tmp_path, 1), "slurm/pretrain.sbatch", "configs/tiny-sink.yaml",
                         f"run_dir={run_dir}", *TINY,
                         export={"MEGASINK_NPROC_PER_NODE": 2, "MEGASINK_RDZV_PORT": _free_port()})
    # Once training runs (first metrics line), send what `#SBATCH --signal=B:USR1@300`
    # sends before the time limit: SIGUSR1 to the batch shell.
    _wait_for(cluster, jid, "metrics", lambda: _metrics(run_dir))
    cluster.run("scancel", "--batch", "--signal=USR1", str(jid))
    info = cluster.wait(jid, timeout=150, on_poll=cluster.release_requeued)
    log = Path(info["StdOut"]).read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", cluster.diagnose(jid)
    assert info["Restarts"] == "1", f"expected one requeue: {info}\n{log}"

    m = re.search(r"checkpointed at step (\d+); requeueing job", log)
    assert m, f"no checkpoint-and-requeue in the log:\n{log}"
    step = int(m.group(1))
    assert 5 <= step < 20, log
    assert f"resuming after preemption at step {step}" in log, log
    assert (run_dir / "checkpoints" / f"step_{step}").is_dir()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_20"
    assert not (run_dir / "PREEMPTED").exists(), "the resumed trainer must remove PREEMPTED"
    rows = _metrics(run_dir)
    steps = [r["step"] for r in rows]
    assert steps == [5, 10, 15, 20], f"resumed run must continue, not restart: {steps}"
    # Same global batch, same world size: the interrupted run reproduces the reference.
    ref = {r["step"]: r["loss"] for r in _metrics(ref_dir)}
    for r in rows:
        assert r["loss"] == pytest.approx(ref[r["step"]], rel=1e-5, abs=1e-6), (rows, ref)


def _worker_pids(jid: int, rank: int) -> list[int]:
    """Training worker processes of job ``jid`` with RANK=``rank`` (found through /proc)."""
    want = {f"SLURM_JOB_ID={jid}".encode(), f"RANK={rank}".encode()}
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = set((proc / "environ").read_bytes().split(b"\0"))
            cmd = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if want <= env and b"megasink.train" in cmd and b"torch.distributed.run" not in cmd:
            pids.append(int(proc.name))
    return pids


def _wait_for(cluster: Cluster, jid: int, what: str, ready, timeout: float = 90) -> None:
    """Poll ``ready()`` while job ``jid`` runs; fail with its log if it ends or times out."""
    end = time.monotonic() + timeout
    while not ready():
        info = cluster.job(jid)
        assert info["JobState"] not in FINAL_STATES, f"job {jid} ended before {what}:\n{cluster.diagnose(jid)}"
        assert time.monotonic() < end, f"job {jid}: no {what} after {timeout} s:\n{cluster.diagnose(jid)}"
        time.sleep(0.2)


def _kill_rank(jid: int, rank: int) -> None:
    victims = _worker_pids(jid, rank)
    assert len(victims) == 1, f"rank {rank} worker of job {jid}: {victims}"
    os.kill(victims[0], signal.SIGKILL)


def test_dead_rank_fails_the_job_instead_of_hanging(cluster, tmp_path):
    run_dir = tmp_path / "run"
    timeout_s = 60
    jid = cluster.sbatch(*_cpu_job_args(tmp_path, 2), "slurm/pretrain.sbatch", "configs/tiny-sink.yaml",
                         f"run_dir={run_dir}", *TINY, "train.steps=100000", f"parallel.timeout_s={timeout_s}",
                         export={"MEGASINK_NPROC_PER_NODE": 1, "MEGASINK_RDZV_PORT": _free_port()})
    _wait_for(cluster, jid, "metrics", lambda: _metrics(run_dir))
    _kill_rank(jid, rank=1)
    killed_at = time.monotonic()
    info = cluster.wait(jid, timeout=timeout_s + 60)
    waited = time.monotonic() - killed_at
    assert info["JobState"] == "FAILED", cluster.diagnose(jid)
    assert waited < timeout_s + 30, f"job took {waited:.0f} s to fail"
    deadline = time.monotonic() + 15
    while _worker_pids(jid, rank=0) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _worker_pids(jid, rank=0), "rank 0 outlived the failed job"


def test_preprocess_array_and_merge(cluster, tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    from data_fixtures import data_documents, data_records, data_tokenizer_model, data_write_jsonl

    tok = shutil.copy(data_tokenizer_model(), tmp_path / "tok.model")
    docs = data_documents(90)
    for i in range(3):
        data_write_jsonl(tmp_path / f"in_{i}.jsonl", data_records(docs[30 * i: 30 * (i + 1)]))
    prefix = tmp_path / "out" / "corpus"
    # 2 array tasks for 3 files: one part takes two files
    jid = cluster.sbatch("--array=0-1", "--cpus-per-task=1", "--mem=1G", f"--output={tmp_path}/%x-%A_%a.out",
                         "slurm/preprocess.sbatch", prefix, f"{tmp_path}/in_*.jsonl",
                         "--tokenizer-model", tok, "--valid-fraction", "0.1")
    end = time.monotonic() + 120
    while cluster.run("squeue", "-h", "-o", "%i").stdout.strip():
        assert time.monotonic() < end, cluster.run("squeue").stdout + cluster.diagnose()
        time.sleep(0.5)
    logs = "\n".join(f"--- {p}\n{p.read_text()}" for p in sorted(tmp_path.glob("*.out")))
    assert "megasink-preprocess-merge" in logs, f"no merge job log next to the task logs:\n{logs}"
    meta_path = Path(f"{prefix}.meta.json")
    assert meta_path.exists(), f"job {jid}: no merged corpus\n{logs}"
    meta = json.loads(meta_path.read_text())
    assert meta["merged_from_parts"] == 2
    assert meta["inputs"] == [str(tmp_path / f"in_{i}.jsonl") for i in range(3)]
    assert meta["splits"]["train"]["prefixes"] == ["corpus_00000", "corpus_00001"]
    assert not Path(f"{prefix}.parts").exists()

    from megasink.config import DataConfig
    from megasink.data.build import build_dataset
    from megasink.data.indexed import IndexedDataset

    n_docs = sum(len(IndexedDataset(f"{prefix}_{i:05d}")) for i in range(2)) + len(IndexedDataset(f"{prefix}_valid"))
    assert n_docs == 90
    data = DataConfig(path=[str(prefix)], tokenizer=str(tok))
    assert len(build_dataset(data, 64, 512, seed=0)) > 0
    assert len(build_dataset(data, 64, 512, seed=0, split="valid")) > 0


def test_torchrun_restart_resumes_from_latest(cluster, uninterrupted, tmp_path):
    """MEGASINK_MAX_RESTARTS=1: a killed rank is restarted with the others, from latest.

    Submitted through finetune.sbatch (same launch, its own defaults) without
    train.init_from, so the loss curve must match the pretraining reference.
    """
    _, ref_info, ref_dir = uninterrupted
    assert ref_info["JobState"] == "COMPLETED", "the uninterrupted reference run failed"
    run_dir = tmp_path / "run"
    jid = cluster.sbatch(*_cpu_job_args(tmp_path, 1), "slurm/finetune.sbatch", "configs/tiny-sink.yaml",
                         f"run_dir={run_dir}", *TINY,
                         export={"MEGASINK_NPROC_PER_NODE": 2, "MEGASINK_MAX_RESTARTS": 1,
                                 "MEGASINK_RDZV_PORT": _free_port()})
    _wait_for(cluster, jid, "checkpoint", lambda: (run_dir / "checkpoints" / "latest").exists())
    _kill_rank(jid, rank=1)
    info = cluster.wait(jid, timeout=150)
    log = Path(info["StdOut"]).read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", cluster.diagnose(jid)
    assert info["JobName"] == "megasink-finetune"
    assert "resumed from" in log, f"the restarted ranks did not resume from a checkpoint:\n{log}"
    rows = _metrics(run_dir)
    assert rows[-1]["step"] == 20, rows
    ref = {r["step"]: r["loss"] for r in _metrics(ref_dir)}
    for r in rows:  # steps redone after the restart reproduce the reference too
        assert r["loss"] == pytest.approx(ref[r["step"]], rel=1e-5, abs=1e-6), (rows, ref)

