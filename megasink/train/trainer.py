"""The training loop: LM loss + sink-aware aux loss on DeepSpeed, any tp x dp layout.

One optimizer step = ``A`` micro-batches per data-parallel rank (A = gradient accumulation).
The LM loss is the mean cross-entropy over the step's global batch: each micro-batch adds its
cross-entropy *sum* times ``loss_term / N`` (N the global number of target tokens). The aux
loss is computed from *global* importance (summed over DP ranks and micro-batches, gathered
over TP heads), and its gradient reaches each rank's own gate sums through ``stats.AuxGrad``
on the micro-batch's loss. The factors are stated once, in ``stats.loss_scales`` (docs/design.md,
"The distributed aux-gradient invariant"). With A > 1 and ``aux_loss.accumulation: global`` the
global importance is known before the backward passes thanks to one no-grad statistics pass
over the step's micro-batches.
"""
from __future__ import annotations

import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megasink.config import Config, save_config
from megasink.data import to_device
from megasink.model import importance as imp_lib
from megasink.parallel import stats
from megasink.parallel.dims import ParallelDims
from megasink.parallel.parallelize import ParallelModel
from megasink.parallel.tensor import cross_entropy_sum
from megasink.train import state as train_state
from megasink.train.metrics import MetricsLogger, flops_per_token, peak_flops
from megasink.train.schedule import lr_multiplier
from megasink.utils import atomic_write_text


class TrainingError(RuntimeError):
    pass


@dataclass
class StepResult:
    loss: float
    aux_loss: float
    importance: Optional[torch.Tensor]  # (L_stage, H) global; None when not measured
    finite: bool
    grad_norm: Optional[float] = None
    skipped: bool = False


@dataclass
class _Statistics:
    """A step's global gate statistics as they are known: (L, H) sums, count, aux loss, and with
    accumulation global its gradient dL_aux/dS, known before the first micro-batch."""
    aux: torch.Tensor
    sums: Optional[torch.Tensor] = None
    count: Optional[torch.Tensor] = None
    grad: Optional[torch.Tensor] = None


@dataclass
class Counters:
    step: int = 0
    skipped_steps: int = 0
    nan_streak: int = 0
    tokens: int = 0
    extra: dict = field(default_factory=dict)


class Trainer:
    """Drives a ``ParallelModel`` (megasink/parallel/parallelize.py). ``evals``: on rank 0 with
    ``train.lm_eval_tasks``, a callable that takes the trainer's log function and returns the
    background evaluator of saved checkpoints: an object with ``poll()``, ``start(step,
    checkpoint)``, ``in_use()`` (checkpoint names pruning must keep) and ``close()``."""

    def __init__(self, cfg: Config, dims: ParallelDims, pm: ParallelModel, train_loader, valid_ds=None, evals=None):
        self.cfg, self.dims = cfg, dims
        self.rank = dist.get_rank()
        self.run_dir = Path(cfg.run_dir)
        self.pm = pm
        self.engine, self.optimizer, self.scheduler = pm.engine, pm.optimizer, pm.scheduler
        self.accum = dims.grad_accum_steps(cfg)
        self.scales = stats.loss_scales(dims, self.accum)
        self.loader = train_loader
        self.valid_ds = valid_ds
        self.counters = Counters()
        self.metrics = MetricsLogger(self.run_dir, enabled=self.rank == 0)
        self.peak, self.peak_source = peak_flops(cfg.train.peak_tflops)
        self.flops_per_token = flops_per_token(cfg.model)
        self._preempt = False
        self._bar = None
        self.last_metrics: dict = {}
        self.lm_evals = evals(self._log_main) if evals is not None else None

    # ------------------------------------------------------------------ statistics
    def _routed(self) -> torch.Tensor:
        """(L_stage, H) bool: the routed heads of this rank's layers (shared_heads is updated in place on resume)."""
        return ~self.pm.shared_heads[self.pm.layers.start:self.pm.layers.stop]

    def _aux(self, sums: torch.Tensor, count: torch.Tensor):
        a = self.cfg.aux_loss
        return imp_lib.aux_loss_and_grad(sums, count, self._routed(), a.coef, a.scale_by_heads)

    @torch.no_grad()
    def _statistics_pass(self, batches) -> tuple[torch.Tensor, torch.Tensor]:
        """Global (L, H) gate sums and count over all micro-batches of the step."""
        sums, count = 0.0, 0.0
        for b in batches:
            out = self.engine(b["tokens"], b["doc_ids"], logits=False)  # gate statistics only
            sums, count = sums + out.gate_sums, count + out.gate_count
        return stats.globalize(sums, count, self.dims)

    # ------------------------------------------------------------------ one step
    def train_step(self, batches, measure: bool = True) -> StepResult:
        """One optimizer step over this rank's micro-batches. ``measure``: a logged step, which
        reports importance (the aux loss measures it anyway) and the gradient norm. One host
        synchronisation of its own, before the optimizer step: the loss, aux loss and (ZeRO-0,
        logged steps) gradient norm come to the host together (tests/test_host_syncs.py)."""
        A = len(batches)
        acc = _Statistics(aux=torch.zeros((), device=self.dims.device))
        if A > 1 and self.cfg.aux_loss.accumulation == "global" and self.cfg.aux_loss.coef > 0:
            acc.sums, acc.count = self._statistics_pass(batches)  # exact global importance first
            acc.aux, acc.grad = self._aux(acc.sums, acc.count)
        n_targets = stats.global_target_count(batches, self.dims)
        weight = self.scales.loss_term / n_targets  # each micro-batch's cross-entropy sum times this
        lm_sum = 0.0
        for i, b in enumerate(batches):
            self.engine.set_gradient_accumulation_boundary(i == A - 1)
            out = self.engine(b["tokens"], b["doc_ids"], measure=measure)
            ce = cross_entropy_sum(out.logits, b["targets"], self.dims)
            lm_sum = lm_sum + ce.detach()
            self.engine.backward(self._with_aux_grad(ce * weight, out, acc, A, measure))
            if i == A - 1:
                zero0 = self.engine.zero_optimization_stage() == 0
                loss, aux, grad_norm = self._step_values(lm_sum, n_targets, acc.aux, zero0 and measure)
                finite = math.isfinite(loss)  # the same value on every rank
                if not finite and zero0:
                    self.engine.zero_grad()  # ZeRO-0 has no overflow check: drop the update ourselves
                    return StepResult(loss, float("nan"), None, False, None, True)
                skipped_before = self.engine.skipped_steps
            self.engine.step()
        imp = imp_lib.importance(acc.sums, acc.count) if acc.sums is not None else None
        if not zero0 and measure:  # DeepSpeed's, read only when logged (a host sync)
            grad_norm = self.engine.get_global_grad_norm()
        skipped = self.engine.skipped_steps > skipped_before or not finite
        return StepResult(loss, aux, imp, finite and not skipped, None if grad_norm is None else float(grad_norm),
                          skipped)

    def _with_aux_grad(self, loss: torch.Tensor, out, acc: "_Statistics", A: int, measure: bool) -> torch.Tensor:
        """The micro-batch's loss with the aux gradient attached to its gate sums (stats.AuxGrad),
        from the step's global statistics (``acc.grad``, known before the step), or else from this
        micro-batch's own global statistics (accumulation micro, or A = 1: the aux loss is then the
        mean of the micro-batches' aux losses). Accumulates the statistics it makes global."""
        if acc.grad is not None:
            return stats.attach_aux_grad(loss, out.gate_sums, acc.grad, self.dims, self.scales.injected_grad)
        coef = self.cfg.aux_loss.coef
        if not (coef > 0 or measure):
            return loss  # nothing reads importance this step: no collective
        s, c = stats.globalize(out.gate_sums, out.gate_count, self.dims)
        acc.sums = s if acc.sums is None else acc.sums + s
        acc.count = c if acc.count is None else acc.count + c
        if coef == 0:
            return loss
        value, grad = self._aux(s, c)
        acc.aux = acc.aux + value / A
        return stats.attach_aux_grad(loss, out.gate_sums, grad, self.dims, self.scales.injected_grad / A)

    def _step_values(self, lm_sum, n_targets: torch.Tensor, aux: torch.Tensor, with_norm: bool):
        """(LM loss: the mean over the global batch's target tokens, aux loss, and with ``with_norm``
        the gradient norm before clipping (ZeRO-0: DeepSpeed reports it otherwise), else None),
        brought to the host in one sync."""
        norm = self._grad_norm_zero0() if with_norm else torch.full((), float("nan"), device=self.dims.device)
        values = [stats.dp_sum(lm_sum, self.dims) / n_targets, aux.double(), norm.double()]
        loss, aux_value, grad_norm = torch.stack(values).tolist()
        return loss, aux_value, grad_norm if with_norm else None

    def _grad_norm_zero0(self) -> torch.Tensor:
        """() global L2 norm of the (data-parallel averaged) gradients, before clipping; each
        tensor-parallel shard counted once, replicated parameters once (on tp rank 0)."""
        sq = torch.zeros(1, device=self.dims.device)
        for p in self.engine.module.parameters():
            if p.grad is not None and (getattr(p, "tp_shard_dim", None) is not None or self.dims.tp_rank == 0):
                sq += p.grad.detach().float().pow(2).sum()
        if self.dims.tp * self.dims.pp > 1:
            dist.all_reduce(sq, group=self.dims.group("mp"))
        return sq[0].sqrt()

    def _global_mean(self, local_sum, count: torch.Tensor) -> float:
        """(sum over the data-parallel group of a per-rank sum) / count: one host sync."""
        return (stats.dp_sum(local_sum, self.dims) / count).item()

    # ------------------------------------------------------------------ evaluation
    def _valid_batches(self) -> list:
        from megasink.data import iter_validation_batches

        t = self.cfg.train
        return [to_device(b, self.dims.device) for b in iter_validation_batches(
            self.valid_ds, t.micro_batch_size, t.eval_steps, self.dims.dp_rank, self.dims.dp)]

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation loss: the mean cross-entropy over every target token of the validation batches."""
        if self.valid_ds is None:
            return {}
        self.engine.eval()
        batches = self._valid_batches()
        lm_sum = sum(cross_entropy_sum(self.engine(b["tokens"], b["doc_ids"], measure=False).logits, b["targets"],
                                       self.dims) for b in batches)
        self.engine.train()
        return self._eval_record(self._global_mean(lm_sum, stats.global_target_count(batches, self.dims)))

    def _eval_record(self, val_loss: float) -> dict:
        out = {"val_loss": val_loss}
        bpt = getattr(self.valid_ds, "bytes_per_token", None)
        if bpt:
            out["val_bpb"] = val_loss / math.log(2) / bpt
        return out

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Optional[Path]:
        if not self.cfg.train.save_checkpoints:
            return None
        st = {"counters": {"skipped_steps": self.counters.skipped_steps, "tokens": self.counters.tokens},
              "scheduler": {"last_epoch": self.scheduler.last_epoch}, "loader": self.loader.state_dict()}
        in_use = self.lm_evals.in_use() if self.lm_evals is not None else ()
        return train_state.save_training_state(self.engine, self.cfg, self.dims, self.counters.step, st,
                                               self.cfg.train.keep_last, self.pm.shared_heads, in_use)

    def resume(self, ckpt_dir: Path) -> None:
        st = train_state.load_training_state(self.engine, ckpt_dir, self.dims, self.pm.shared_heads)
        self.counters.step = st.get("step", 0)
        c = st.get("counters", {})
        self.counters.skipped_steps, self.counters.tokens = c.get("skipped_steps", 0), c.get("tokens", 0)
        epoch = st.get("scheduler", {}).get("last_epoch", self.counters.step)
        self._set_schedule_position(epoch)
        if "loader" in st:
            self.loader.load_state_dict(st["loader"])
        self.engine.global_steps = self.counters.step
        self._log_main(f"resumed from {ckpt_dir} at step {self.counters.step}")

    def _set_schedule_position(self, epoch: int) -> None:
        fn = lr_multiplier(self.cfg.train)
        self.scheduler.last_epoch = epoch
        lrs = [base * fn(epoch) for base in self.scheduler.base_lrs]
        for g, lr in zip(self.scheduler.optimizer.param_groups, lrs):
            g["lr"] = lr
        self.scheduler._last_lr = lrs

    # ------------------------------------------------------------------ preemption
    def install_signal_handlers(self) -> None:
        """SIGTERM, SIGUSR1 (Slurm's warning) and a first Ctrl-C (SIGINT) ask for a checkpoint at
        the end of the current step and a clean exit 0 with run_dir/PREEMPTED; a second Ctrl-C
        aborts at once without saving (exit 130). Under torchrun the workers run in their own
        session: a Ctrl-C reaches torchrun, which forwards one SIGINT to each worker."""
        def handler(signum, frame):
            self._preempt = True

        def interrupt(signum, frame):
            if self._preempt:
                print("[megasink] second interrupt: aborting now, nothing more is saved", file=sys.stderr, flush=True)
                os._exit(130)
            self._preempt = True
            if self.rank == 0:
                print("\n[megasink] interrupt: saving a checkpoint after this step, then exiting (Ctrl-C again to "
                      "abort without saving)", file=sys.stderr, flush=True)

        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, handler)
        signal.signal(signal.SIGINT, interrupt)

    def _preempt_requested(self) -> bool:
        flag = torch.tensor([1.0 if self._preempt else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _log_main(self, msg: str) -> None:
        if self.rank != 0:
            return
        if self._bar is not None:
            self._bar.write(f"[megasink] {msg}")
        else:
            print(f"[megasink] {msg}", flush=True)

    # ------------------------------------------------------------------ the loop
    def run(self, resume_dir: Optional[Path] = None) -> dict:
        """Train from ``resume_dir`` (None: from scratch) to train.steps, or until a signal."""
        t = self.cfg.train
        if resume_dir is not None:
            self.resume(resume_dir)
        self.metrics.start(self.counters.step)  # drops what a killed run logged after this step
        if self.rank == 0:
            save_config(self.cfg, self.run_dir / "config.yaml")
            (self.run_dir / "PREEMPTED").unlink(missing_ok=True)
        self.install_signal_handlers()
        self._log_main(f"layout tp={self.dims.tp} pp={self.dims.pp} dp={self.dims.dp}, accumulation {self.accum}, "
                       f"MFU peak: {self.peak_source}")
        bar = self._bar = self._progress_bar()
        tokens_per_step = t.global_batch_size * self.cfg.model.seq_len
        window_start, window_steps = time.perf_counter(), 0
        while self.counters.step < t.steps:
            batches = [to_device(self.loader.next_batch(), self.dims.device) for _ in range(self.accum)]
            next_step = self.counters.step + 1
            res = self.train_step(batches, measure=next_step % t.log_interval == 0 or next_step == t.steps)
            self.counters.step += 1
            self.counters.tokens += tokens_per_step
            window_steps += 1
            self._account(res)
            step = self.counters.step
            if step % t.log_interval == 0 or step == t.steps:
                elapsed = time.perf_counter() - window_start
                self._log_step(res, tokens_per_step * window_steps / max(elapsed, 1e-9))
                window_start, window_steps = time.perf_counter(), 0
            if t.eval_interval and step % t.eval_interval == 0:
                self._log_eval()
            saved = None
            if t.save_interval and step % t.save_interval == 0 and step < t.steps:
                saved = self.save()
            if t.lm_eval_tasks and step % t.eval_interval == 0 and step < t.steps:
                self._start_lm_eval(saved or self.save())
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{res.loss:.3f}", aux=f"{res.aux_loss:.2e}")
            if self._preempt_requested():
                path = self.save()
                if self.rank == 0:
                    atomic_write_text(self.run_dir / "PREEMPTED", f"{step}\n")
                self._log_main(f"preemption signal: saved {path} at step {step}, exiting")
                return {"preempted": True, "step": step}
        if bar is not None:
            bar.close()
            self._bar = None
        if self.valid_ds is not None and not (t.eval_interval and self.counters.step % t.eval_interval == 0):
            self._log_eval()
        path = self.save()
        if t.lm_eval_tasks and self.counters.step % t.eval_interval == 0:
            self._start_lm_eval(path)
        if self.lm_evals is not None:
            self.lm_evals.close()  # never waits: evaluations still running log their own results
        self._log_main(f"done: step {self.counters.step}, checkpoint {path}")
        self.metrics.close()
        return {"preempted": False, "step": self.counters.step, **self.last_metrics}

    def _progress_bar(self):
        if self.rank != 0 or not self.cfg.train.progress or not sys.stderr.isatty():
            return None  # batch jobs (Slurm logs, CI) get the per-log-step lines only
        from tqdm import tqdm

        return tqdm(total=self.cfg.train.steps, initial=self.counters.step, desc="train", unit="step",
                    dynamic_ncols=True, mininterval=1.0)

    def _account(self, res: StepResult) -> None:
        c = self.counters
        if res.finite:
            c.nan_streak = 0
            return
        c.skipped_steps += 1
        c.nan_streak += 1
        self._log_main(f"step {c.step}: non-finite loss, update skipped ({c.nan_streak} in a row)")
        if c.nan_streak > self.cfg.train.max_nan_skips:
            path = self.save()
            raise TrainingError(f"{c.nan_streak} non-finite steps in a row (train.max_nan_skips="
                                f"{self.cfg.train.max_nan_skips}); saved {path} for inspection")

    def _log_step(self, res: StepResult, tokens_per_s: float) -> None:
        rec = {"loss": res.loss, "aux_loss": res.aux_loss, "lr": self.scheduler.get_last_lr()[0],
               "grad_norm": res.grad_norm, "tokens_per_s": tokens_per_s,
               "mfu": tokens_per_s * self.flops_per_token / (self.peak * self.dims.world_size),
               "skipped_steps": self.counters.skipped_steps}
        step = self.counters.step
        if res.importance is not None:  # None only on a skipped step (same on every rank)
            rec.update(self._importance_record(res.importance, step))
        self.metrics.log(step, rec)
        self.last_metrics.update(loss=res.loss, cv=rec.get("cv"))
        self._log_main(f"step {step:6d} | loss {res.loss:.4f} | aux {res.aux_loss:.3e} | lr {rec['lr']:.2e} | "
                       f"{tokens_per_s:,.0f} tok/s | mfu {rec['mfu']:.2%} | "
                       f"cv {' '.join(f'{x:.3f}' for x in rec.get('cv', []))}")

    def _importance_record(self, importance: torch.Tensor, step: int) -> dict:
        """Per-layer CV (every step logged), the shared/routed means, the full matrix and its
        heatmap (every importance_interval): all layers, gathered over pipeline stages."""
        # to the host once (they are logged and plotted): on GPUs they live on the device
        imp = stats.gather_layers_over_pp(importance, self.dims).detach().cpu()
        routed = stats.gather_layers_over_pp(self._routed(), self.dims).cpu()
        cv = imp_lib.cv_squared(imp, routed).sqrt()
        vanished = imp_lib.vanishing_warning(imp, routed)
        if vanished:
            self._log_main(f"warning: step {step}: {vanished}")
        rec = {"cv": [round(float(x), 6) for x in cv]}
        shared = ~routed
        if shared.any():
            rec["importance_shared_mean"] = float(imp[shared].mean())
            rec["importance_routed_mean"] = float(imp[routed].mean())
        if step % self.cfg.train.importance_interval == 0 or step == self.cfg.train.steps:
            rec["importance"] = [[round(float(x), 6) for x in row] for row in imp]
            self.metrics.log_importance(step, imp, cv)
        return rec

    def _start_lm_eval(self, ckpt: Optional[Path]) -> None:
        """Rank 0 starts `megasink eval` of ``ckpt`` in the background (no collective; every rank saved it)."""
        if self.lm_evals is not None:
            self.lm_evals.poll()
            self.lm_evals.start(self.counters.step, ckpt)

    def _log_eval(self) -> None:
        rec = self.evaluate()
        if rec:
            self.metrics.log(self.counters.step, rec)
            self.last_metrics.update(rec)
            self._log_main(" | ".join(f"{k} {v:.4f}" for k, v in rec.items()))
