"""lm-eval during training: ``megasink eval`` of a saved checkpoint in a background process.

With ``train.lm_eval_tasks`` set, rank 0 starts ``python -m megasink.eval STEP_DIR --tasks ...
--out RUN/eval/step_N --metrics-run RUN --step N`` after the checkpoint of every
``train.eval_interval`` step is saved, and goes on training: no barrier, no collective, and a
failed or slow evaluation never stops or delays the run (its output is in
RUN/eval/step_N/eval.log). When it finishes, the evaluation itself appends one record,
``{"step": N, "lm_eval/<task>/<metric>": value, ...}`` (each task's main metric: the first of
its metric_list), to RUN/metrics.jsonl and the same scalars to RUN/tensorboard, with the step
it measured, whether or not training is still running.

Pruning (``train.keep_last``) keeps a checkpoint while its evaluation runs; the first save
after the evaluation ends prunes it.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Optional


def main_metrics(results: dict) -> dict:
    """{"lm_eval/<task>/<metric>": value}: each task's (and group's) first metric_list entry."""
    out = {}
    for task, values in results.get("results", {}).items():
        configured = [m.get("metric") for m in results.get("configs", {}).get(task, {}).get("metric_list", [])]
        names = [k for k, v in values.items()
                 if "," in k and "_stderr" not in k and isinstance(v, (int, float)) and not isinstance(v, bool)]
        if not names:
            continue
        main = next((k for k in names if configured and k.split(",")[0] == configured[0]), names[0])
        out[f"lm_eval/{task}/{main.split(',')[0]}"] = float(values[main])
    return out


def append_metrics(run_dir, step: int, record: dict) -> None:
    """One line ``{"step": step, **record}`` appended to RUN/metrics.jsonl (a single write, so it
    interleaves whole with the trainer's lines) and the scalars to RUN/tensorboard."""
    run_dir = Path(run_dir)
    line = json.dumps({"step": step, **record}) + "\n"
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(line)
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional at run time
        return
    with SummaryWriter(str(run_dir / "tensorboard"), filename_suffix=".lm_eval") as tb:
        for key, value in record.items():
            tb.add_scalar(key, value, step)


def eval_command(ckpt, run_dir, step: int, tasks: str, extra_args: str = "") -> list[str]:
    """The ``megasink eval`` command line of one background evaluation."""
    out = Path(run_dir) / "eval" / f"step_{step}"
    return [sys.executable, "-m", "megasink.eval", str(ckpt), "--tasks", tasks, "--out", str(out),
            "--metrics-run", str(run_dir), "--step", str(step), *shlex.split(extra_args)]


# what torchrun / the deepspeed launcher / MPI set for the training ranks: the evaluation is a
# single process, and lm-eval (accelerate) would otherwise join the training's process group
_LAUNCHER_VARS = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                  "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT"}
_LAUNCHER_PREFIXES = ("TORCHELASTIC_", "OMPI_", "PMI_", "PMIX_")


def single_process_env() -> dict:
    """os.environ without the launcher's distributed variables."""
    return {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS and not k.startswith(_LAUNCHER_PREFIXES)}


class BackgroundEvals:
    """Rank 0's running evaluations: started without waiting, reaped when they end."""

    def __init__(self, run_dir, tasks: str, extra_args: str = "", log=print):
        self.run_dir, self.tasks, self.extra_args, self.log = Path(run_dir), tasks, extra_args, log
        self.running: dict[int, tuple[subprocess.Popen, Path]] = {}  # step -> (process, checkpoint)

    def start(self, step: int, ckpt: Optional[Path]) -> None:
        """Evaluate ``ckpt`` (saved at ``step``) in a new process; a failure to start is only logged."""
        if ckpt is None:
            return  # train.save_checkpoints=false: nothing to evaluate
        out = self.run_dir / "eval" / f"step_{step}"
        try:
            out.mkdir(parents=True, exist_ok=True)
            with open(out / "eval.log", "w") as log_file:  # the child keeps its own descriptor
                proc = subprocess.Popen(
                    eval_command(ckpt, self.run_dir, step, self.tasks, self.extra_args), stdout=log_file,
                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=single_process_env(),
                    start_new_session=True)
        except OSError as e:
            self.log(f"warning: lm-eval of step {step} not started: {e}")
            return
        self.running[step] = (proc, Path(ckpt))
        self.log(f"lm-eval of step {step} started in the background (pid {proc.pid}, log {out / 'eval.log'})")

    def poll(self) -> None:
        """Reap finished evaluations; name the failed ones (their log says why)."""
        for step, (proc, _) in list(self.running.items()):
            rc = proc.poll()
            if rc is None:
                continue
            del self.running[step]
            if rc != 0:
                self.log(f"warning: lm-eval of step {step} failed (exit {rc}); see "
                         f"{self.run_dir / 'eval' / f'step_{step}' / 'eval.log'}")

    def in_use(self) -> set[str]:
        """Names of the checkpoint directories that running evaluations still read (pruning keeps them)."""
        self.poll()
        return {ckpt.name for _, ckpt in self.running.values()}

    def close(self) -> None:
        """At the end of training: reap, and name the evaluations left running (never waited for)."""
        self.poll()
        for step, (proc, _) in self.running.items():
            self.log(f"lm-eval of step {step} still running (pid {proc.pid}); it appends its metrics to "
                     f"{self.run_dir / 'metrics.jsonl'} when done")
