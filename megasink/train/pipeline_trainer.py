"""The training step under pipeline parallelism (DeepSpeed PipelineEngine, 1F1B).

Per optimizer step, with the aux loss on: (1) a no-grad pipelined pass over the step's
micro-batches collects each stage's gate sums and screens the loss for non-finite values;
(2) each stage makes its layers' statistics global (DP sum, TP gather), computes
d(L_aux)/d(gate sums) for its layers and arms its blocks to hand it to their gate sums through
``stats.AuxGrad`` (the same path and scale as the one-stage trainer, docs/design.md, "The
distributed aux-gradient invariant"); (3) ``train_batch`` runs the 1F1B schedule. Labels carry
each micro-batch's loss weight, so the LM loss is the mean over the global batch's target
tokens as in the one-stage trainer. The logged aux loss is the sum of the stages' shares
(all-reduced over the pipeline group) and the logged importance/CV cover every layer
(gathered over stages).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megasink.model import importance as imp_lib
from megasink.parallel import stats
from megasink.train.trainer import StepResult, Trainer


class PipelineTrainer(Trainer):
    def _items(self, batches, weight: torch.Tensor):
        """DeepSpeed's micro-batch iterator: ((tokens, doc_ids), (targets, loss weight))."""
        w = weight.to(torch.float32).reshape(1)
        return iter([((b["tokens"], b["doc_ids"]), (b["targets"], w)) for b in batches])

    def train_step(self, batches, measure: bool = True) -> StepResult:
        ctx, coef = self.pm.stage, self.cfg.aux_loss.coef
        ctx.reset()
        weight = self.scales.loss_term / stats.global_target_count(batches, self.dims)
        if coef > 0:
            ctx.mode = "collect"  # the no-grad statistics pass: global importance first
            pre_loss = self.engine.eval_batch(self._items(batches, weight), num_micro_batches=len(batches))
            self.engine.train()
            g_sums, g_count = ctx.statistics()
            aux_stage, ctx.grad = self._aux(g_sums, g_count)
            if not math.isfinite(float(pre_loss)):
                ctx.mode = "off"
                return StepResult(float(pre_loss), float("nan"), imp_lib.importance(g_sums, g_count), False, None, True)
            ctx.mode, ctx.scale = "inject", self.scales.injected_grad
        else:
            ctx.mode = "collect" if measure else "off"  # no aux gradient: statistics for logging only
        skipped_before = self.engine.skipped_steps
        loss = self.engine.train_batch(self._items(batches, weight))
        mode, ctx.mode = ctx.mode, "off"
        imp = None
        if coef == 0:
            aux_stage = torch.zeros((), device=self.dims.device)
            if mode == "collect":
                g_sums, g_count = ctx.statistics()
        if coef > 0 or mode == "collect":
            imp = imp_lib.importance(g_sums, g_count)
        aux_total = aux_stage.detach().clone().reshape(1)
        dist.all_reduce(aux_total, group=self.dims.group("pp"))  # every stage's layers' share
        grad_norm = self.engine.get_global_grad_norm() if measure else None  # read when logged
        loss, aux = torch.stack([torch.as_tensor(loss, device=aux_total.device).double().reshape(()),
                                 aux_total[0].double()]).tolist()  # one host sync
        finite = math.isfinite(loss)
        skipped = self.engine.skipped_steps > skipped_before or not finite
        return StepResult(loss, aux, imp, not skipped, None if grad_norm is None else float(grad_norm), skipped)

    @torch.no_grad()
    def evaluate(self) -> dict:
        if self.valid_ds is None:
            return {}
        batches = self._valid_batches()
        # eval_batch averages over its micro-batches and the dp ranks, as train_batch does
        weight = stats.loss_scales(self.dims, len(batches)).loss_term / stats.global_target_count(batches, self.dims)
        self.pm.stage.mode = "off"
        val_loss = float(self.engine.eval_batch(self._items(batches, weight), num_micro_batches=len(batches)))
        self.engine.train()
        return self._eval_record(val_loss)
