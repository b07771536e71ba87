"""The trainer on DeepSpeed over gloo: data-parallel/ZeRO parity, resume, crash safety, errors."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dist_utils import free_port, run_distributed
from train_utils import TINY, losses, train_worker

CONFIG = "configs/tiny-sink.yaml"
REPO = Path(__file__).resolve().parents[1]


def _train(tmp, name, world, extra):
    run_dir = tmp / name
    run_distributed(train_worker, world, CONFIG, TINY + [f"run_dir={run_dir}"] + extra)
    return run_dir


def _assert_close(a: dict, b: dict, rel=1e-5):
    assert a.keys() == b.keys()
    for step in a:
        assert abs(a[step] - b[step]) <= rel * abs(b[step]) + 1e-12, (step, a[step], b[step])


@pytest.mark.slow
def test_data_parallel_zero_stages_match_single_process(tmp_path):
    # dp=1 runs 2 micro-batches per step (exact global importance via the statistics pass);
    # dp=2 runs 1 per rank: the same global batch, so the same numbers.
    # CV^2 compares near-equal importances, so its relative rounding error is ~ eps / CV; at
    # init_std 0.1 (CV ~ 1e-2) ZeRO-3's reduce-scatter order alone moved step 5's aux loss by
    # 1.3e-5. init_std 0.2 spreads the heads further (aux 3-7x larger) and keeps 1e-5 meaningful.
    common = ["train.steps=5", "model.init_std=0.2"]
    ref = _train(tmp_path, "dp1", 1, common)
    ref_loss, ref_aux, ref_gn = losses(ref), losses(ref, "aux_loss"), losses(ref, "grad_norm")
    assert max(ref_aux.values()) > 1e-6 and min(ref_gn.values()) > 0
    for zero in (0, 1, 2, 3):
        run = _train(tmp_path, f"dp2_z{zero}", 2, common + [f"parallel.zero_stage={zero}"])
        _assert_close(losses(run), ref_loss)
        _assert_close(losses(run, "aux_loss"), ref_aux)
        _assert_close(losses(run, "grad_norm"), ref_gn, rel=1e-4)  # ZeRO-0: ours; 1-3: DeepSpeed's


@pytest.mark.slow
def test_resume_equals_uninterrupted(tmp_path):
    # 20 steps straight, saving at step 10; then a fresh run resumes from that checkpoint
    common = ["train.steps=20", "parallel.zero_stage=1", "train.save_interval=10"]
    straight = _train(tmp_path, "straight", 2, common)
    ckpt = straight / "checkpoints" / "step_10"
    resumed = _train(tmp_path, "resumed", 2, common + [f"train.resume={ckpt}"])
    a, b = losses(straight), losses(resumed)
    assert sorted(b) == list(range(11, 21))
    for step in b:
        assert a[step] == b[step], (step, a[step], b[step])
    assert losses(straight, "aux_loss")[15] == losses(resumed, "aux_loss")[15]


CRASH_SCRIPT = """
import os, signal, sys
import megasink.checkpoint as ck
orig = ck.save_tensors
calls = []
def dying_save(path, tensors):
    calls.append(path)
    if "step_4" in str(path):
        orig(path, tensors)              # half of the checkpoint is on disk...
        os.kill(os.getpid(), signal.SIGKILL)   # ...and the process dies
    return orig(path, tensors)
ck.save_tensors = dying_save
from megasink.train.main import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_crash_while_saving_keeps_previous_checkpoint(tmp_path):
    run_dir = tmp_path / "crash"
    args = [CONFIG, *TINY, f"run_dir={run_dir}", "train.steps=6", "train.save_interval=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, *args], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_2"
    assert (ckpts / "step_4.tmp").exists() and not (ckpts / "step_4").exists()
    proc = subprocess.run([sys.executable, "-m", "megasink.train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from" in proc.stdout + proc.stderr and "step_2" in proc.stdout + proc.stderr
    assert (ckpts / "latest").read_text().strip() == "step_6"
    assert sorted(losses(run_dir)) == [1, 2, 3, 4, 5, 6]  # steps 3-4 re-done after the crash


def _umask_027():
    os.umask(0o027)


@pytest.mark.slow
def test_resume_skips_a_damaged_latest_on_every_rank(tmp_path):
    """A kill left step_4 damaged and a half-written metrics line: two ranks resume from step_2
    (rank 0 decides), re-do steps 3-4 and log every step once; every file gets the umask's mode."""
    from train_utils import read_metrics

    run_dir = tmp_path / "run"
    args = [CONFIG, *TINY, f"run_dir={run_dir}", "train.save_interval=2", "train.keep_last=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run([sys.executable, "-m", "megasink.train", *args, "train.steps=4"], cwd=REPO, env=env,
                           capture_output=True, text=True, preexec_fn=_umask_027, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    damaged = run_dir / "checkpoints" / "step_4" / "optim-rank00000-of-00001.safetensors"  # a sharded save
    damaged.write_bytes(damaged.read_bytes()[:-100])
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')
    second = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                             str(free_port()), "-m", "megasink.train", *args, "train.steps=6"], cwd=REPO, env=env,
                            capture_output=True, text=True, preexec_fn=_umask_027, timeout=300)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-3000:]
    assert f"{damaged} is" in out and "resuming from step_2, the newest complete checkpoint" in out, out[-3000:]
    assert "at step 2" in out
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_4", "step_6"]
    reference = tmp_path / "reference"
    subprocess.run(["bash", "-c", f"umask 027 && : > {reference}"], check=True)
    files = {str(p.relative_to(run_dir)): oct(p.stat().st_mode & 0o777) for p in run_dir.rglob("*") if p.is_file()}
    assert files == {name: oct(reference.stat().st_mode & 0o777) for name in files}


def _start_training(tmp_path, launcher: str, extra=()):
    """(process, log path, run dir): a 500-step run started as the README says, at step 2 or later."""
    import time

    run_dir = tmp_path / "run"
    cmd = ["-m", "megasink.train", CONFIG, *TINY, f"run_dir={run_dir}", "train.steps=500", *extra]
    if launcher == "torchrun":
        cmd = ["-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port", str(free_port()), *cmd]
    log = tmp_path / "log"
    out = open(log, "w")
    proc = subprocess.Popen([sys.executable, *cmd], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 240
    while "step      2 |" not in log.read_text() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    return proc, log, run_dir


@pytest.mark.slow
@pytest.mark.parametrize("launcher,exit_code", [("one process", 0), ("torchrun", 1)])
@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_signal_checkpoints_and_exits_as_the_readme_says(tmp_path, launcher, exit_code, signame):
    """SIGTERM or a Ctrl-C (SIGINT) to the launched command: every rank saves and writes PREEMPTED,
    no traceback. One process exits 0; torchrun forwards the signal, its worker exits 0, and
    torchrun itself exits 1 (SignalException, its own handling): the README and the Slurm
    scripts rely on the marker."""
    import signal

    proc, log, run_dir = _start_training(tmp_path, launcher)
    proc.send_signal(getattr(signal, signame))
    rc = proc.wait(timeout=240)
    text = log.read_text()
    step = int((run_dir / "PREEMPTED").read_text())
    assert rc == exit_code and f"saved {run_dir}/checkpoints/step_{step} at step {step}" in text, text[-3000:]
    assert "Traceback" not in text.split("step      2 |")[1] or launcher == "torchrun", text[-3000:]


@pytest.mark.slow
def test_second_ctrl_c_aborts_at_once(tmp_path):
    """Ctrl-C twice: the second aborts without waiting for the checkpoint (exit 130, one line,
    no traceback); no checkpoint is left half written (latest absent or complete)."""
    import signal
    import time

    from megasink.checkpoint import resolve_checkpoint_dir

    # steps of ~1 s: the second Ctrl-C comes while the first one's step is still running
    slow = ["model.d_model=256", "model.seq_len=512", "train.micro_batch_size=4", "train.global_batch_size=8"]
    proc, log, run_dir = _start_training(tmp_path, "one process", slow)
    proc.send_signal(signal.SIGINT)
    deadline = time.time() + 60
    while "interrupt: saving a checkpoint" not in log.read_text() and time.time() < deadline:
        time.sleep(0.05)  # the first one has been seen (two at once arrive as one signal)
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(timeout=120)
    text = log.read_text()
    assert rc == 130 and "second interrupt: aborting now" in text and "Traceback" not in text, text[-3000:]
    if (run_dir / "checkpoints" / "latest").exists():
        resolve_checkpoint_dir(run_dir)  # raises if latest named a damaged checkpoint


def _cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "megasink.train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args,message", [
    (["parallel.dp=2"], "world size 1 != parallel.tp (1) * parallel.pp (1) * parallel.dp (2)"),
    (["data.path=[/nonexistent/corpus]"], "dataset '/nonexistent/corpus' not found"),
    (["train.stpes=5"], "unknown key 'train.stpes'"),
    (["parallel.tp=3"], "model.n_heads=4 is not divisible by parallel.tp=3"),
    (["parallel.pp=2"], "launch a multiple of 2 processes, e.g. torchrun --nproc_per_node 2"),
])
def test_bad_input_fails_before_training(tmp_path, args, message):
    proc = _cli(CONFIG, f"run_dir={tmp_path / 'r'}", *args)
    assert proc.returncode == 2
    assert message in proc.stderr, proc.stderr
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def _nan_worker(rank, world_size, run_dir, zero, bad_steps):
    """Train with NaN losses injected at given steps; return metrics and weights per step."""
    import torch

    from megasink.config import load_config
    from megasink.train import main as train_main
    from megasink.train import trainer

    calls = {"n": 0}
    orig = trainer.cross_entropy_sum

    def lm_loss(logits, targets, dims):
        loss = orig(logits, targets, dims)
        if not torch.is_grad_enabled():
            return loss
        calls["n"] += 1
        step = (calls["n"] - 1) // 2 + 1  # 2 micro-batches per step (the first call is step 1)
        return loss * float("nan") if step in bad_steps else loss

    trainer.cross_entropy_sum = lm_loss
    cfg = load_config(CONFIG, TINY + [f"run_dir={run_dir}", "train.steps=4", f"parallel.zero_stage={zero}",
                                      "aux_loss.coef=0", "train.max_nan_skips=1"])
    try:
        return train_main.run(cfg)
    except Exception as e:  # noqa: BLE001 - the test inspects it
        return repr(e)


@pytest.mark.slow
@pytest.mark.parametrize("zero", [0, 1])
def test_nan_step_is_skipped_and_too_many_stop(tmp_path, zero):
    from megasink.checkpoint import load_tensors, resolve_checkpoint_dir

    # one bad step: skipped (weights unchanged), training goes on
    run_distributed(_nan_worker, 1, str(tmp_path / "one"), zero, {3})
    from train_utils import read_metrics

    rec = read_metrics(tmp_path / "one")
    assert rec[-1]["step"] == 4 and rec[-1]["skipped_steps"] == 1
    # two in a row with max_nan_skips=1: stops with an error and a checkpoint
    res = run_distributed(_nan_worker, 1, str(tmp_path / "two"), zero, {2, 3})
    assert "non-finite steps in a row" in res[0]
    ck = resolve_checkpoint_dir(tmp_path / "two")
    assert ck.name == "step_3"
    w = load_tensors(next(ck.glob("model*.safetensors")))
    assert all(bool(v.isfinite().all()) for v in w.values() if v.is_floating_point())


@pytest.mark.slow
@pytest.mark.parametrize("zero", [0, 1, 2])
def test_bf16_resume_equals_uninterrupted(tmp_path, zero):
    # bf16 keeps fp32 masters beside the model (ZeRO-0: DeepSpeed's unfused optimizer; ZeRO-1 with
    # fp32 gradient accumulation: its BF16_Optimizer; ZeRO-2: fragments): the checkpoint must hold
    # the masters, not the bf16 working copies. ZeRO-0 refuses accumulation in bf16: one micro-batch.
    common = ["train.steps=8", "train.save_interval=4", "train.precision=bf16", f"parallel.zero_stage={zero}"]
    if zero == 0:
        common.append("train.global_batch_size=2")
    straight = _train(tmp_path, "straight", 1, common)
    resumed = _train(tmp_path, "resumed", 1, common + [f"train.resume={straight}/checkpoints/step_4"])
    a, b = losses(straight), losses(resumed)
    assert sorted(b) == [5, 6, 7, 8] and all(a[s] == b[s] for s in b), (a, b)


def test_importance_measured_on_log_steps_only_changes_nothing(tmp_path):
    # vanilla without the aux loss computes its gates only on the steps it logs: the training
    # numbers equal a run that logs (and measures) every step, and every logged CV is finite
    import math

    common = ["train.steps=4", "aux_loss.coef=0", "model.attention=vanilla"]
    every = _train(tmp_path, "every", 1, common + ["train.log_interval=1"])
    sparse = _train(tmp_path, "sparse", 1, common + ["train.log_interval=3"])
    assert sorted(losses(sparse)) == [3, 4]
    for key in ("loss", "grad_norm"):
        assert {s: v for s, v in losses(every, key).items() if s in (3, 4)} == losses(sparse, key)
    from train_utils import read_metrics

    cvs = [r["cv"] for r in read_metrics(sparse) if "cv" in r]
    assert len(cvs) == 2 and all(math.isfinite(x) and x > 0 for cv in cvs for x in cv)
