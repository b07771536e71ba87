"""The training step under pipeline parallelism (DeepSpeed PipelineEngine, 1F1B).

Per optimizer step, with the aux loss on: (1) a no-grad pipelined pass over the step's
micro-batches collects each stage's gate sums and screens the loss for non-finite values; (2) each stage makes its
layers' statistics global (DP sum, TP gather), computes d(L_aux)/d(gate sums) for its layers
and arms its pipe layers to inject it, times dp (docs/design.md, "The distributed aux-gradient
invariant"); (3) ``train_batch`` runs the 1F1B schedule. The
logged aux loss is the sum of the stages' shares (all-reduced over the pipeline group) and
the logged importance/CV cover every layer (gathered over stages).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megasink.model import importance as imp_lib
from megasink.parallel import stats
from megasink.parallel.pipeline import stage_layers
from megasink.train.trainer import StepResult, Trainer


class PipelineTrainer(Trainer):
    def __init__(self, cfg, dims, pipe_module, stage_ctx, full_shared_heads, train_loader, valid_ds=None):
        self.ctx = stage_ctx
        self.shared_heads_full = full_shared_heads  # (L, H) bool
        super().__init__(cfg, dims, pipe_module, train_loader, valid_ds)
        self.layers = stage_layers(cfg.model.n_layers, dims)

    def _shared_heads_full(self) -> torch.Tensor:
        return self.shared_heads_full

    def _routed(self) -> torch.Tensor:
        return ~self.shared_heads_full[self.layers.start:self.layers.stop]  # this stage's layers

    def _items(self, batches):
        return iter([((b["tokens"], b["doc_ids"]), b["targets"]) for b in batches])

    def _stage_statistics(self):
        layers = list(self.layers)
        sums = torch.stack([self.ctx.sums[i] for i in layers])  # (L_stage, H_local)
        return stats.globalize(sums, self.ctx.count, self.dims)

    def train_step(self, batches) -> StepResult:
        self.ctx.reset()
        if self.cfg.aux_loss.coef > 0:
            self.ctx.mode = "collect"  # the no-grad statistics pass: global importance first
            pre_loss = self.engine.eval_batch(self._items(batches), num_micro_batches=len(batches))
            self.engine.train()
            g_sums, g_count = self._stage_statistics()
            aux_stage, grad = self._aux(g_sums, g_count)
            if not bool(torch.isfinite(torch.as_tensor(pre_loss)).all()):
                return StepResult(float(pre_loss), float("nan"), imp_lib.importance(g_sums, g_count), False, None, True)
            local = stats.local_heads(grad, self.dims) * self.dims.dp  # DP averages gradients
            self.ctx.grad = {i: local[k] for k, i in enumerate(self.layers)}
            self.ctx.mode = "inject"
        else:
            self.ctx.mode = "collect"  # no aux gradient: statistics for logging come with the step
        skipped_before = self.engine.skipped_steps
        loss = self.engine.train_batch(self._items(batches))
        self.ctx.mode = "off"
        if self.cfg.aux_loss.coef == 0:
            g_sums, g_count = self._stage_statistics()
            aux_stage = torch.zeros(())
        aux_total = aux_stage.clone().reshape(1)
        dist.all_reduce(aux_total, group=self.dims.group("pp"))  # every stage's layers' share
        grad_norm = self.engine.get_global_grad_norm()
        finite = bool(torch.isfinite(torch.as_tensor(loss)).all())
        skipped = self.engine.skipped_steps > skipped_before or not finite
        return StepResult(float(loss), float(aux_total), imp_lib.importance(g_sums, g_count), not skipped,
                          None if grad_norm is None else float(grad_norm), skipped)

    @torch.no_grad()
    def evaluate(self) -> dict:
        if self.valid_ds is None:
            return {}
        batches = self._valid_batches()
        self.ctx.mode = "off"
        val_loss = float(self.engine.eval_batch(self._items(batches), num_micro_batches=len(batches)))
        self.engine.train()
        return self._eval_record(val_loss)
