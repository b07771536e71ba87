"""torch.compile of each block (train.compile) gives the eager model's numbers: LM + aux loss
gradients for every variant with packed documents, with activation checkpointing, and the
varlen route's custom ops trace as one graph that new document layouts do not recompile."""
import pytest
import torch

from conftest import build_seeded, packed_doc_ids, small_model_cfg
from megasink.config import Config, ConfigError, validate
from megasink.parallel.parallelize import apply_compile


def _grads(model, tokens, doc):
    model.zero_grad()
    out = model(tokens, doc, targets=tokens.roll(-1, 1))
    (out.loss + out.aux_loss).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, out


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "activation-checkpointing"])
def test_compiled_blocks_give_eager_gradients(variant, checkpointing):
    from torch._dynamo.utils import counters

    cfg = small_model_cfg(variant)
    model = build_seeded(cfg, coef=1.0, activation_checkpointing=checkpointing)  # the aux gradient: a visible share
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    layouts = [packed_doc_ids(2, cfg.seq_len), packed_doc_ids(2, cfg.seq_len, (5, 20, 33))]
    eager = [_grads(model, tokens, d) for d in layouts]
    names = sorted(n for n, _ in model.named_parameters())
    apply_compile(model, backend="aot_eager")
    assert sorted(n for n, _ in model.named_parameters()) == names  # checkpoint keys unchanged
    counters.clear()
    for (g_e, o_e), d in zip(eager, layouts):
        g_c, o_c = _grads(model, tokens, d)
        assert abs(o_c.aux_loss.item() - o_e.aux_loss.item()) <= 1e-6 * o_e.aux_loss.item()
        for n in g_e:
            assert (g_e[n] - g_c[n]).norm() <= 1e-5 * g_e[n].norm(), n
    assert counters["stats"]["calls_captured"] > 0  # really compiled
    assert counters["stats"]["unique_graphs"] == 1  # one graph for every layer and both layouts


def test_varlen_route_compiles_once(monkeypatch):
    """The varlen custom ops under torch.compile(fullgraph=True): one graph, no recompile when
    the number of documents changes, gradients equal to the uncompiled route (CPU kernel of
    aten's signature, from test_kernels)."""
    from test_kernels import cpu_varlen_bwd, cpu_varlen_fwd

    from megasink.model.kernels import SeqInfo, attention_with_lse

    lib = torch.library.Library("aten", "IMPL")
    lib.impl("_flash_attention_forward", cpu_varlen_fwd, "CPU")
    lib.impl("_flash_attention_backward", cpu_varlen_bwd, "CPU")
    try:
        def f(q, k, v, seq):
            out, lse = attention_with_lse(q, k, v, backend="varlen", seq=seq)
            return (out.float() ** 2).sum() + lse.sum()

        compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
        monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
        for cuts in ((11, 30), (5, 6, 20, 33), (40,)):
            seq = SeqInfo.build(torch.zeros(2, 48, dtype=torch.long), packed_doc_ids(2, 48, cuts))
            seq.prepare("varlen", torch.float32)
            q = torch.randn(2, 4, 48, 16, requires_grad=True)
            k, v = (torch.randn(2, 2, 48, 16, requires_grad=True) for _ in range(2))
            g_ref = torch.autograd.grad(f(q, k, v, seq), (q, k, v))
            g_cmp = torch.autograd.grad(compiled(q, k, v, seq), (q, k, v))
            for a, b in zip(g_ref, g_cmp):
                assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    finally:
        lib._destroy()


def test_compile_refused_with_tp_or_pp():
    cfg = Config()
    cfg.train.compile, cfg.parallel.tp = True, 2
    with pytest.raises(ConfigError, match="train.compile is supported with parallel.tp=1 and parallel.pp=1"):
        validate(cfg)


def test_compile_refused_with_zero3():
    """ZeRO-3's gather hooks break a fullgraph block (dynamo: 'Skip calling torch.compiler.disable()d
    function'), and the gathered parameters' alignment differs per layer: refused by name."""
    cfg = Config()
    cfg.train.compile, cfg.parallel.zero_stage = True, 3
    with pytest.raises(ConfigError, match="train.compile is supported with parallel.zero_stage 0-2"):
        validate(cfg)
    cfg.parallel.zero_stage = 2
    validate(cfg)
