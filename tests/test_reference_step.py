"""One trainer step equals one step of plain autograd on the global batch, in every layout.

The reference is written here from scratch, independent of the trainer's machinery: an unsharded
copy of the initial model in float64 with the eager (explicit softmax) attention route, the whole
global batch in one forward, loss = mean LM cross-entropy over the global batch's target tokens +
lambda * sum_l CV^2 of that batch's head importance (population std / mean, all heads routed),
one ``loss.backward()``, gradient clipping as configured, and torch's own AdamW. The trainer runs
the same step in fp32 under a parallel layout with gradient accumulation (A = 2), ZeRO, tensor and
pipeline parallelism, and saves it; its checkpoint's weights and AdamW moments (exp_avg is
(1 - beta1) * gradient after one step, so it compares the gradient itself) and its logged loss,
aux loss and gradient norm must equal the reference's.

The test can fail: the same comparison, run with the trainer's aux-gradient scale (the one
function ``stats.loss_scales``) multiplied by 0.5 or 2, must not pass.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os

import pytest
import torch

from dist_utils import run_distributed
from train_utils import read_metrics

GLOBAL_BATCH = 4
# A large lambda and a wide init: the aux gradient is a sizable part of every gate's gradient
# (a 2x error in it moves exp_avg of the gate parameters by far more than the tolerance)
COMMON = ["model.n_layers=2", "model.seq_len=64", "model.d_model=64", "model.vocab_size=128",
          "model.init_std=0.2", "model.sink_init=-1.0", "model.gate_bias_init=0.5",
          f"train.global_batch_size={GLOBAL_BATCH}", "train.steps=1", "train.warmup_steps=0", "train.lr=1e-2",
          "train.log_interval=1", "train.progress=false", "train.resume=none",
          "aux_loss.coef=1.0", "aux_loss.accumulation=global"]
TOL = 1e-5  # relative, per tensor (norm of the difference / norm of the reference)


def _overrides(variant: str, layout: list[str], run_dir, data=()) -> list[str]:
    """The trainer's config for ``layout`` (its entries, plus "world=N" for the process count)."""
    dp = _world(layout) // (_size(layout, "tp") * _size(layout, "pp"))
    mbs = GLOBAL_BATCH // (2 * dp)  # two micro-batches per rank: gradient accumulation A = 2
    return COMMON + [f"model.attention={variant}", f"train.micro_batch_size={mbs}", f"run_dir={run_dir}",
                     *_layout_args(layout), *data]


def _size(layout, key) -> int:
    return next((int(x.split("=")[1]) for x in layout if x.startswith(f"parallel.{key}=")), 1)


def _world(layout) -> int:
    return next((int(x.split("=")[1]) for x in layout if x.startswith("world=")), 1)


def _layout_args(layout) -> list[str]:
    return [x for x in layout if not x.startswith("world=")]


def _trainer_worker(rank, world_size, overrides, aux_grad_factor):
    from megasink.config import load_config
    from megasink.train.main import run

    with _aux_gradient_scaled(aux_grad_factor):  # the built-in mutation: a wrong aux-gradient scale
        run(load_config("configs/tiny-sink.yaml", overrides))
    return None


@contextlib.contextmanager
def _aux_gradient_scaled(factor: float):
    """The trainer's one aux-gradient scale (stats.loss_scales' injected_grad) times ``factor``."""
    from megasink.parallel import stats

    original = stats.loss_scales

    def scaled(*args, **kwargs):
        scales = original(*args, **kwargs)
        return dataclasses.replace(scales, injected_grad=scales.injected_grad * factor)

    stats.loss_scales = scaled
    try:
        yield
    finally:
        stats.loss_scales = original


def run_trainer(tmp_path, variant: str, layout: list[str], aux_grad_factor: float = 1.0, data=()):
    """Run one trainer step in ``layout``; (metrics of step 1, weights, AdamW moments)."""
    from megasink.checkpoint import load_model_tensors, load_optim_tensors, resolve_checkpoint_dir

    run_dir = tmp_path / f"{variant}-{'-'.join(_layout_args(layout)) or 'single'}-x{aux_grad_factor}"
    overrides = _overrides(variant, layout, run_dir, data)
    world = _world(layout)
    if world == 1:  # in this process: keep its environment (the trainer sets MASTER_PORT, RANK, ...)
        saved = dict(os.environ)
        try:
            _trainer_worker(0, 1, overrides, aux_grad_factor)
        finally:
            os.environ.clear()
            os.environ.update(saved)
    else:
        run_distributed(_trainer_worker, world, overrides, aux_grad_factor)
    ckpt = resolve_checkpoint_dir(run_dir)
    (metrics,) = [m for m in read_metrics(run_dir) if m["step"] == 1 and "loss" in m]
    return metrics, load_model_tensors(ckpt), load_optim_tensors(ckpt)


# ----------------------------------------------------------------------------- the reference
def reference_step(variant: str, data=()) -> dict:
    """The step by plain autograd in float64 on the whole global batch, from the trainer's own
    initial weights (seeded the same way) and data (the loader's first global batch; ``data``:
    overrides naming a corpus instead of the synthetic one)."""
    from megasink.config import load_config
    from megasink.data import build_dataset, build_loader
    from megasink.model.transformer import Transformer

    cfg = load_config("configs/tiny-sink.yaml", COMMON + [f"model.attention={variant}",
                                                          "model.attention_backend=eager", *data])
    t, m = cfg.train, cfg.model
    torch.manual_seed(t.seed)
    model = Transformer(m, cfg.aux_loss).double()  # the same initial weights as the trainer's model
    ds = build_dataset(cfg.data, m.seq_len, m.vocab_size, t.seed, split="train")
    batch = build_loader(ds, GLOBAL_BATCH, 0, 1, t.seed).next_batch()  # the first global batch, whole

    out = model(batch["tokens"], batch["doc_ids"])
    logits, targets = out.logits.flatten(0, 1), batch["targets"].flatten()
    lm = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
    lm = lm / (targets != -100).sum()
    imp = out.gate_sums / out.gate_count  # (L, H): mean gate per head over the global batch
    cv2 = imp.var(dim=-1, unbiased=False) / imp.mean(dim=-1) ** 2  # population variance / mean^2
    aux = cfg.aux_loss.coef * cv2.sum()
    params = dict(model.named_parameters())
    aux_grads = torch.autograd.grad(aux, list(params.values()), retain_graph=True, allow_unused=True)
    (lm + aux).backward()
    # how much of the gradient the aux loss is, in the tensor where it is the most
    aux_share = max(float(g.norm() / p.grad.norm()) for g, p in zip(aux_grads, params.values()) if g is not None)
    grad_norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in params.values()))
    if t.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(list(params.values()), t.grad_clip)
    initial = {n: p.detach().clone() for n, p in params.items()}
    grads = {n: p.grad.detach().clone() for n, p in params.items()}
    return {"cfg": cfg, "batch": batch, "loss": lm.item(), "aux_loss": aux.item(), "grad_norm": grad_norm, "aux_share": aux_share,
            "initial": initial, **adamw_step(cfg, initial, grads)}


def adamw_step(cfg, initial: dict, grads: dict) -> dict:
    """torch's AdamW, one step from ``initial`` with ``grads`` (already clipped), in float64:
    {"weights", "exp_avg", "exp_avg_sq"}, each {name: tensor}."""
    t = cfg.train
    params = {n: torch.nn.Parameter(p.double().clone()) for n, p in initial.items()}
    for n, p in params.items():
        p.grad = grads[n].double()
    decay = [p for p in params.values() if p.dim() >= 2]  # norms, sinks, gate biases: no decay
    no_decay = [p for p in params.values() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8)
    opt.step()
    return {"weights": {n: p.detach() for n, p in params.items()},
            "exp_avg": {n: opt.state[p]["exp_avg"] for n, p in params.items()},
            "exp_avg_sq": {n: opt.state[p]["exp_avg_sq"] for n, p in params.items()}}


_REFERENCES: dict = {}


def reference(variant: str, data=()) -> dict:
    key = (variant, tuple(data))
    if key not in _REFERENCES:
        _REFERENCES[key] = reference_step(variant, data)
    return _REFERENCES[key]


def _rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


def mismatches(ref: dict, metrics: dict, weights: dict, moments: dict) -> list[str]:
    """Every way the trainer's step differs from the reference by more than TOL (relative).

    The gradient is compared through exp_avg = (1 - beta1) * clipped gradient (and exp_avg_sq,
    its square). The weights are compared with torch's AdamW applied to *the trainer's own*
    gradient: Adam's first update is about lr * sign(gradient) per element, so where a gradient
    is ~1e-8, fp32 rounding alone (1e-9 absolute) moves that element's update by a sizable
    part of lr, and the reference gradient would test rounding, not the optimizer step."""
    bad = []
    for key in ("loss", "aux_loss", "grad_norm"):
        if not abs(metrics[key] - ref[key]) <= TOL * abs(ref[key]):
            bad.append(f"{key}: trainer {metrics[key]!r}, reference {ref[key]!r}")
    for key in ("exp_avg", "exp_avg_sq"):
        for name, want in ref[key].items():
            if not _rel_error(moments[f"{key}/{name}"], want) <= TOL:
                bad.append(f"{key} of {name}: relative error {_rel_error(moments[f'{key}/{name}'], want):.2e}")
    beta1 = ref["cfg"].train.beta1
    own_grads = {name: moments[f"exp_avg/{name}"].double() / (1 - beta1) for name in ref["initial"]}
    expected = adamw_step(ref["cfg"], ref["initial"], own_grads)["weights"]
    for name, want in expected.items():
        if not _rel_error(weights[name], want) <= TOL:
            bad.append(f"weight {name}: relative error {_rel_error(weights[name], want):.2e}")
    return bad


def check_layout(tmp_path, variant: str, layout: list[str], mutate: bool, data=()) -> None:
    ref = reference(variant, data)
    assert ref["aux_share"] > 100 * TOL, f"the aux loss must matter in this test ({ref['aux_share']:.2e})"
    bad = mismatches(ref, *run_trainer(tmp_path, variant, layout, data=data))
    assert not bad, "\n".join(bad)
    if mutate:
        for factor in (0.5, 2.0):
            bad = mismatches(ref, *run_trainer(tmp_path, variant, layout, aux_grad_factor=factor))
            assert bad, f"the trainer with its aux gradient scaled by {factor} still matched the reference"


@pytest.mark.parametrize("variant", ["vanilla", "sink", "gated"])
def test_one_process_step_equals_plain_autograd(tmp_path, variant):
    check_layout(tmp_path, variant, [], mutate=True)


LAYOUTS = {
    "dp2_zero1": ["world=2", "parallel.zero_stage=1"],
    "dp2_zero2": ["world=2", "parallel.zero_stage=2"],
    "dp2_zero3": ["world=2", "parallel.zero_stage=3"],
    "tp2": ["world=2", "parallel.tp=2"],
    "tp2_dp2": ["world=4", "parallel.tp=2", "parallel.zero_stage=1"],
    "pp2": ["world=2", "parallel.pp=2"],
    "pp2_tp2": ["world=4", "parallel.pp=2", "parallel.tp=2"],
}
# each layout with one variant (all three covered)
CASES = [("dp2_zero1", "vanilla"), ("dp2_zero2", "sink"), ("dp2_zero3", "gated"), ("tp2", "gated"),
         ("tp2_dp2", "sink"), ("pp2", "sink"), ("pp2_tp2", "vanilla")]


@pytest.mark.slow
@pytest.mark.parametrize("name,variant", CASES, ids=[c[0] for c in CASES])
def test_parallel_step_equals_plain_autograd(tmp_path, name, variant):
    check_layout(tmp_path, variant, LAYOUTS[name], mutate=True)


# ----------------------------------------------------------------------------- loss-masked fine-tuning data
@pytest.fixture(scope="module")
def masked_corpus(tmp_path_factory) -> list:
    """Overrides for a prompt/response corpus with a loss mask (targets -100 on prompt tokens)
    whose micro-batches hold different numbers of response tokens: the LM loss must be the mean
    over the global batch's response tokens, not a mean of per-micro-batch means."""
    from data_fixtures import data_hf_tokenizer, data_write_jsonl

    from megasink.data.preprocess import PreprocessConfig, preprocess

    tmp = tmp_path_factory.mktemp("masked")
    rows = [{"prompt": f"Question {i}: " + "why? " * (i % 7), "response": f" Because {i} " + "so " * (3 * (i % 5))}
            for i in range(80)]
    tok = data_hf_tokenizer("llama3")
    preprocess(PreprocessConfig(inputs=[data_write_jsonl(tmp / "pairs.jsonl", rows)], tokenizer=tok,
                                output_prefix=str(tmp / "pairs"), format="prompt_response", workers=0, progress=False))
    return [f"data.path=[{tmp / 'pairs'}]", f"data.tokenizer={tok}", "model.vocab_size=1024"]


def _assert_uneven(ref: dict) -> None:
    counts = (ref["batch"]["targets"] != -100).sum(-1).tolist()  # (GLOBAL_BATCH,) response targets per row
    assert len(set(counts)) > 1 and min(counts) < ref["batch"]["targets"].shape[1], counts


def test_loss_masked_step_equals_plain_autograd(tmp_path, masked_corpus):
    _assert_uneven(reference("sink", masked_corpus))
    check_layout(tmp_path, "sink", [], mutate=False, data=masked_corpus)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dp2_zero1", "pp2"])
def test_loss_masked_parallel_step_equals_plain_autograd(tmp_path, masked_corpus, name):
    check_layout(tmp_path, "sink", LAYOUTS[name], mutate=False, data=masked_corpus)
