"""The training loop: LM loss + sink-aware aux loss on DeepSpeed, any tp x dp layout.

One optimizer step = ``A`` micro-batches per data-parallel rank (A = gradient accumulation).
The aux loss is computed from *global* importance (summed over DP ranks and micro-batches,
gathered over TP heads) and reaches each rank's gates through a surrogate term whose
gradient is exactly d(L_aux)/d(local gate sums) (megasink/parallel/stats.py; the rule and
its scale A * dp are in docs/design.md, "The distributed aux-gradient invariant"). With A > 1
and ``aux_loss.accumulation: global`` the global importance is known before the backward
passes thanks to one no-grad statistics pass over the step's micro-batches.
"""
from __future__ import annotations

import math
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
from megasink.parallel.engine import build_engine
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
    importance: torch.Tensor  # (L, H) global
    finite: bool
    grad_norm: Optional[float] = None
    skipped: bool = False


@dataclass
class Counters:
    step: int = 0
    skipped_steps: int = 0
    nan_streak: int = 0
    tokens: int = 0
    extra: dict = field(default_factory=dict)


class Trainer:
    def __init__(self, cfg: Config, dims: ParallelDims, model: torch.nn.Module, train_loader, valid_ds=None):
        self.cfg, self.dims = cfg, dims
        self.rank = dist.get_rank()
        self.run_dir = Path(cfg.run_dir)
        self.model = model
        self.accum = dims.grad_accum_steps(cfg)
        self.engine, self.optimizer, self.scheduler = build_engine(model, cfg, dims, lr_multiplier(cfg.train))
        self.loader = train_loader
        self.valid_ds = valid_ds
        self.counters = Counters()
        self.metrics = MetricsLogger(self.run_dir, enabled=self.rank == 0)
        self.peak, self.peak_source = peak_flops(cfg.train.peak_tflops)
        self.flops_per_token = flops_per_token(cfg.model)
        self._preempt = False
        self._bar = None
        self.last_metrics: dict = {}
        self.lm_evals = None  # rank 0's background `megasink eval` processes (train.lm_eval_tasks)
        if cfg.train.lm_eval_tasks and self.rank == 0:
            from megasink.eval.background import BackgroundEvals

            self.lm_evals = BackgroundEvals(self.run_dir, cfg.train.lm_eval_tasks, cfg.train.lm_eval_args,
                                            self._log_main)

    # ------------------------------------------------------------------ statistics
    def _shared_heads_full(self) -> torch.Tensor:
        """(L, H) bool, the same tensor the model uses (updated in place on resume)."""
        return self.model.shared_heads

    def _routed(self) -> torch.Tensor:
        return self.model.routed_mask()

    def _aux(self, sums: torch.Tensor, count: torch.Tensor):
        a = self.cfg.aux_loss
        return imp_lib.aux_loss_and_grad(sums, count, self._routed(), a.coef, a.scale_by_heads)

    @torch.no_grad()
    def _statistics_pass(self, batches) -> tuple[torch.Tensor, torch.Tensor, list]:
        """Global (L, H) gate sums and count over all micro-batches, plus each LM loss."""
        sums, count, losses = None, None, []
        for b in batches:
            out = self.engine(b["tokens"], b["doc_ids"], targets=b["targets"])
            losses.append(out.loss)
            sums = out.gate_sums if sums is None else sums + out.gate_sums
            count = out.gate_count if count is None else count + out.gate_count
        g_sums, g_count = stats.globalize(sums, count, self.dims)
        return g_sums, g_count, losses

    def _all_finite(self, value: torch.Tensor) -> bool:
        flag = torch.tensor([1.0 if bool(torch.isfinite(value).all()) else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    # ------------------------------------------------------------------ one step
    def train_step(self, batches) -> StepResult:
        A, dp, coef = len(batches), self.dims.dp, self.cfg.aux_loss.coef
        exact_global = A > 1 and self.cfg.aux_loss.accumulation == "global" and coef > 0
        grad_full = aux_value = g_sums = g_count = grad_norm = None
        if exact_global:
            g_sums, g_count, _ = self._statistics_pass(batches)
            aux_value, grad_full = self._aux(g_sums, g_count)
        lm_total, aux_total, sum_acc, cnt_acc, finite = 0.0, 0.0, 0.0, 0.0, True
        for i, b in enumerate(batches):
            self.engine.set_gradient_accumulation_boundary(i == A - 1)
            out = self.engine(b["tokens"], b["doc_ids"], targets=b["targets"])
            finite = finite and self._all_finite(out.loss.detach())
            loss = out.loss
            if exact_global:
                loss = loss + stats.surrogate(out.gate_sums, grad_full, self.dims, scale=A * dp)
            else:
                s, c = stats.globalize(out.gate_sums, out.gate_count, self.dims)
                sum_acc, cnt_acc = sum_acc + s, cnt_acc + c
                if coef > 0:
                    val, g = self._aux(s, c)
                    aux_total += val.item() / A
                    loss = loss + stats.surrogate(out.gate_sums, g, self.dims, scale=dp)
            lm_total += self._global_mean(out.loss.detach()) / A
            self.engine.backward(loss)
            if i == A - 1 and not finite and self.engine.zero_optimization_stage() == 0:
                self.engine.zero_grad()  # ZeRO-0 has no overflow check: drop the update ourselves
                return self._skipped(lm_total, g_sums, g_count, sum_acc, cnt_acc)
            skipped_before = self.engine.skipped_steps
            if i == A - 1 and self.engine.zero_optimization_stage() == 0:
                grad_norm = self._grad_norm_zero0()  # DeepSpeed does not report it without ZeRO
            self.engine.step()
        if not exact_global:
            g_sums, g_count = sum_acc, cnt_acc
            aux_value = torch.tensor(aux_total) if coef > 0 else torch.tensor(0.0)
        imp = imp_lib.importance(g_sums, g_count)
        if self.engine.zero_optimization_stage() > 0:
            grad_norm = self.engine.get_global_grad_norm()
        skipped = self.engine.skipped_steps > skipped_before or not finite
        return StepResult(lm_total, float(aux_value), imp, finite and not skipped,
                          None if grad_norm is None else float(grad_norm), skipped)

    def _grad_norm_zero0(self) -> float:
        """Global L2 norm of the (data-parallel averaged) gradients, before clipping; each
        tensor-parallel shard counted once, replicated parameters once (on tp rank 0)."""
        sq = torch.zeros(1, device=self.dims.device)
        for p in self.engine.module.parameters():
            if p.grad is not None and (getattr(p, "tp_shard_dim", None) is not None or self.dims.tp_rank == 0):
                sq += p.grad.detach().float().pow(2).sum()
        if self.dims.tp * self.dims.pp > 1:
            dist.all_reduce(sq, group=self.dims.group("mp"))
        return float(sq.sqrt())

    def _skipped(self, lm_total, g_sums, g_count, sum_acc, cnt_acc) -> StepResult:
        sums, count = (g_sums, g_count) if g_sums is not None else (sum_acc, cnt_acc)
        return StepResult(lm_total, float("nan"), imp_lib.importance(sums, count), False, None, True)

    def _global_mean(self, value: torch.Tensor) -> float:
        """Mean of a per-rank scalar over the data-parallel group."""
        v = value.detach().float().reshape(1).clone()
        if self.dims.dp > 1:
            dist.all_reduce(v, group=self.dims.group("dp"))
        return v.item() / self.dims.dp

    # ------------------------------------------------------------------ evaluation
    def _valid_batches(self) -> list:
        from megasink.data import iter_validation_batches

        t = self.cfg.train
        return [to_device(b, self.dims.device) for b in iter_validation_batches(
            self.valid_ds, t.micro_batch_size, t.eval_steps, self.dims.dp_rank, self.dims.dp)]

    def _measure_importance(self, on: bool) -> bool:
        """Compute head importance in this step's forward? Without the aux loss vanilla gates
        are pure measurement (~1 % of a step): only on log steps (with it, the model computes
        them regardless). Returns the previous setting."""
        before = getattr(self.model, "measure_importance", True)
        if hasattr(self.model, "measure_importance"):
            self.model.measure_importance = on
        return before

    @torch.no_grad()
    def evaluate(self) -> dict:
        if self.valid_ds is None:
            return {}
        measured = self._measure_importance(False)
        self.engine.eval()
        batches = self._valid_batches()
        total = sum(self._global_mean(self.engine(b["tokens"], b["doc_ids"], targets=b["targets"]).loss)
                    for b in batches)
        self.engine.train()
        self._measure_importance(measured)
        return self._eval_record(total / len(batches))

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
                                               self.cfg.train.keep_last, self._shared_heads_full(), in_use)

    def resume(self, ckpt_dir: Path) -> None:
        st = train_state.load_training_state(self.engine, ckpt_dir, self.dims, self._shared_heads_full())
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
        def handler(signum, frame):
            self._preempt = True

        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, handler)

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
            self._measure_importance(next_step % t.log_interval == 0 or next_step == t.steps)
            res = self.train_step(batches)
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
        # to the host once (they are logged and plotted): on GPUs they live on the device
        imp = stats.gather_layers_over_pp(res.importance, self.dims).detach().cpu()
        routed = stats.gather_layers_over_pp(self._routed(), self.dims).cpu()
        cv = imp_lib.cv_squared(imp, routed).sqrt()
        vanished = imp_lib.vanishing_warning(imp, routed)
        if vanished:
            self._log_main(f"warning: step {self.counters.step}: {vanished}")
        rec = {"loss": res.loss, "aux_loss": res.aux_loss, "lr": self.scheduler.get_last_lr()[0],
               "grad_norm": res.grad_norm, "tokens_per_s": tokens_per_s,
               "mfu": tokens_per_s * self.flops_per_token / (self.peak * self.dims.world_size),
               "cv": [round(float(x), 6) for x in cv], "skipped_steps": self.counters.skipped_steps}
        shared = ~routed
        if shared.any():
            rec["importance_shared_mean"] = float(imp[shared].mean())
            rec["importance_routed_mean"] = float(imp[routed].mean())
        step = self.counters.step
        if step % self.cfg.train.importance_interval == 0 or step == self.cfg.train.steps:
            rec["importance"] = [[round(float(x), 6) for x in row] for row in imp]
            self.metrics.log_importance(step, imp, cv)
        self.metrics.log(step, rec)
        self.last_metrics.update(loss=res.loss, cv=rec["cv"])
        self._log_main(f"step {step:6d} | loss {res.loss:.4f} | aux {res.aux_loss:.3e} | lr {rec['lr']:.2e} | "
                       f"{tokens_per_s:,.0f} tok/s | mfu {rec['mfu']:.2%} | "
                       f"cv {' '.join(f'{x:.3f}' for x in rec['cv'])}")

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
