"""The single-device model against independent references (explicit softmax, gpt-oss sinks,
finite differences, documents run alone)."""
import pytest
import torch

from conftest import build_seeded, packed_doc_ids, small_model_cfg, with_backend
from megasink.model.importance import token_weights
from megasink.model.kernels import SeqInfo
from megasink.model.layers import apply_rope


def reference_attention(attn, x, doc_ids, cos, sin):
    """Explicit-probability attention read straight off the weights -> (out before wo, gate)."""
    B, T, _ = x.shape
    hd, nh = attn.head_dim, attn.wq.weight.shape[0] // attn.q_cols
    qg = (x @ attn.wq.weight.T).view(B, T, nh, attn.q_cols)
    q, k = qg[..., :hd], (x @ attn.wk.weight.T).view(B, T, -1, hd)
    v = (x @ attn.wv.weight.T).view(B, T, -1, hd)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    rep = nh // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / hd ** 0.5
    allowed = torch.ones(T, T, dtype=torch.bool).tril() & (doc_ids[:, :, None] == doc_ids[:, None, :])[:, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    if attn.variant == "sink":  # gpt-oss: the sink is an extra logit column with no value
        sink_col = attn.sinks[None, :, None, None].expand(B, nh, T, 1)
        probs = torch.cat([scores, sink_col], -1).softmax(-1)
        out = torch.einsum("bhts,bshd->bthd", probs[..., :-1], v)
        return out, 1 - probs[..., -1]
    probs = scores.softmax(-1)
    out = torch.einsum("bhts,bshd->bthd", probs, v)
    if attn.variant == "vanilla":
        first = torch.tensor([[min(s for s in range(T) if doc_ids[b, s] == doc_ids[b, t]) for t in range(T)]
                              for b in range(B)])
        w_first = torch.gather(probs, 3, first[:, None, :, None].expand(B, nh, T, 1))[..., 0]
        return out, 1 - w_first
    gate = torch.sigmoid(qg[..., hd] + attn.gate_bias).transpose(1, 2)
    return out * gate.transpose(1, 2)[..., None], gate


@pytest.mark.parametrize("backend", ["eager", "flash"])
def test_gates_match_explicit_probabilities(variant, backend):
    cfg = small_model_cfg(variant)
    model = build_seeded(cfg)
    attn = model.layers["0"].attention
    B, T = 2, cfg.seq_len
    x = torch.randn(B, T, cfg.d_model)
    doc = packed_doc_ids(B, T)
    seq = SeqInfo.build(torch.zeros(B, T, dtype=torch.long), doc)
    cos, sin = model.rope(seq.positions)
    with torch.no_grad():
        y, gate = attn(x, cos, sin, seq, backend)
        ref_out, ref_gate = reference_attention(attn, x, doc, cos, sin)
        ref_y = attn.wo(ref_out.reshape(B, T, -1))
    if variant != "vanilla":
        assert (ref_gate - gate).abs().max() < 1e-5
    else:  # compare where the gate is defined (the sink token itself has G = 0 in both)
        assert (ref_gate - gate).abs().max() < 1e-5
        assert gate[:, :, [0, 11, 30]].abs().max() < 1e-6
    assert (ref_y - y).abs().max() < 1e-5
    assert gate.std() > 1e-3  # the check is not vacuous
    weights = token_weights(seq, variant)
    y2, sums = attn(x, cos, sin, seq, backend, weights)  # with a graph
    ref_sums = (ref_gate * weights[:, None]).sum((0, 2))
    assert (sums - ref_sums).abs().max() < 1e-5 * weights.sum() and (y2 - ref_y).abs().max() < 1e-5


def _loss_grads(model, tokens, doc, backend, measure=True):
    model = with_backend(model, backend)
    out = model(tokens, doc, targets=tokens.roll(-1, 1), measure=measure)
    (out.loss + out.aux_loss).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, out


@pytest.mark.parametrize("docs", [False, True])
def test_flash_gradients_equal_eager(variant, docs):
    cfg = small_model_cfg(variant)
    model = build_seeded(cfg, coef=1.0)  # large coef: the aux gradient is a visible share
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    doc = packed_doc_ids(2, cfg.seq_len) if docs else None
    g_eager, o_eager = _loss_grads(model, tokens, doc, "eager")
    g_flash, o_flash = _loss_grads(model, tokens, doc, "flash")
    assert torch.allclose(o_eager.aux_loss, o_flash.aux_loss, rtol=1e-5)
    for name in g_eager:
        rel = (g_eager[name] - g_flash[name]).norm() / g_eager[name].norm()
        assert rel < 1e-4, (name, rel.item())
    # the lse gradient is really carried: without it (sdpa, inference-only) q/k grads differ
    if variant in ("vanilla", "sink"):
        with pytest.raises(RuntimeError, match="drops the gradient of the log-sum-exp"):
            _loss_grads(model, tokens, doc, "sdpa")


def test_kernel_lse_gradient_flash_vs_eager():
    from megasink.model.kernels import attention_with_lse

    torch.manual_seed(0)
    q = torch.randn(2, 4, 64, 16, requires_grad=True)
    k = torch.randn(2, 2, 64, 16, requires_grad=True)
    v = torch.randn(2, 2, 64, 16, requires_grad=True)
    seq = SeqInfo.build(torch.zeros(2, 64, dtype=torch.long), packed_doc_ids(2, 64, (20,)))
    r_out, r_lse = torch.randn(2, 4, 64, 16), torch.randn(2, 4, 64)
    grads = {}
    for backend in ("eager", "flash", "sdpa"):
        out, lse = attention_with_lse(q, k, v, backend=backend, seq=seq)
        gq, gk, gv = torch.autograd.grad((out * r_out).sum() + (lse * r_lse).sum(), (q, k, v), allow_unused=True)
        grads[backend] = (gq, gk, gv)
    for a, b in zip(grads["eager"], grads["flash"]):
        assert (a - b).norm() / a.norm() < 1e-5
    # stock sdpa autograd silently drops dLSE: its q grad is visibly wrong
    assert (grads["eager"][0] - grads["sdpa"][0]).norm() / grads["eager"][0].norm() > 1e-2


def test_flex_forward_matches_eager_and_refuses_cpu_training():
    from megasink.model.kernels import BackendError, attention_with_lse, resolve_backend

    q, k, v = torch.randn(1, 4, 64, 16), torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16)
    seq = SeqInfo.build(torch.zeros(1, 64, dtype=torch.long), packed_doc_ids(1, 64, (25,)))
    o1, l1 = attention_with_lse(q, k, v, backend="eager", seq=seq)
    o2, l2 = attention_with_lse(q, k, v, backend="flex", seq=seq)
    assert (o1 - o2).abs().max() < 1e-5 and (l1 - l2).abs().max() < 1e-5
    with pytest.raises(BackendError, match="no FlexAttention backward on CPU"):
        resolve_backend("flex", torch.device("cpu"), needs_lse_grad=True)
    assert resolve_backend("auto", torch.device("cpu"), needs_lse_grad=True) == "flash"


def test_finite_difference_whole_model_fp64(variant):
    cfg = small_model_cfg(variant, seq_len=24, attention_backend="flash")
    model = build_seeded(cfg, coef=1.0, dtype=torch.float64)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    doc = packed_doc_ids(2, cfg.seq_len, (9,))

    def loss_fn():
        out = model(tokens, doc, targets=tokens.roll(-1, 1))
        return out.loss + out.aux_loss

    model.zero_grad()
    loss_fn().backward()
    params = [p for p in model.parameters()]
    direction = [torch.randn_like(p) for p in params]
    analytic = sum((p.grad * d).sum() for p, d in zip(params, direction))
    eps = 1e-6
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.add_(eps * d)
        plus = loss_fn()
        for p, d in zip(params, direction):
            p.sub_(2 * eps * d)
        minus = loss_fn()
    numeric = (plus - minus) / (2 * eps)
    assert abs(numeric - analytic) / abs(analytic) < 1e-6, (numeric.item(), analytic.item())


def test_packed_documents_equal_documents_alone(variant):
    cfg = small_model_cfg(variant)
    model = build_seeded(cfg)
    a, b = torch.randint(0, cfg.vocab_size, (1, 13)), torch.randint(0, cfg.vocab_size, (1, 22))
    packed = torch.cat([a, b], 1)
    doc = torch.tensor([[0] * 13 + [1] * 22])
    with torch.no_grad():
        out_p = model(packed, doc)
        out_a, out_b = model(a), model(b)
    assert (out_p.logits[:, :13] - out_a.logits).abs().max() < 1e-5
    assert (out_p.logits[:, 13:] - out_b.logits).abs().max() < 1e-5
    # importance is token-weighted over the batch: the packed sums are the sums of the parts
    assert torch.allclose(out_p.gate_sums, out_a.gate_sums + out_b.gate_sums, atol=1e-5)
    assert out_p.gate_count == out_a.gate_count + out_b.gate_count


def test_vanilla_importance_excludes_sink_tokens():
    cfg = small_model_cfg("vanilla")
    model = build_seeded(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    out = model(tokens, packed_doc_ids(2, cfg.seq_len))
    assert out.gate_count.item() == 2 * (cfg.seq_len - 3)


def test_activation_checkpointing_same_gradients(variant):
    cfg = small_model_cfg(variant)
    model = build_seeded(cfg, coef=1.0)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    g1, _ = _loss_grads(model, tokens, packed_doc_ids(2, cfg.seq_len), "flash")
    model = build_seeded(cfg, coef=1.0, activation_checkpointing=True)
    g2, _ = _loss_grads(model, tokens, packed_doc_ids(2, cfg.seq_len), "flash")
    for name in g1:
        assert torch.equal(g1[name], g2[name]), name


def test_flash_backward_paths(monkeypatch):
    """No lse gradient: the plain kernel backward; with one: the same kernel at the same head
    dim with O shifted (rows without an output gradient are fine when their dLSE is 0 too);
    a row with dLSE but no output gradient: the augmented column (hd + 1). All equal eager."""
    from megasink.model import kernels
    from megasink.model.kernels import lse_grad

    seen = []
    rule = lse_grad.backward_with_lse_grad

    def recording(kernel_bwd, *args, **kw):
        return rule(lambda dout, q, *a: seen.append(q.shape[-1]) or kernel_bwd(dout, q, *a), *args, **kw)

    monkeypatch.setattr(lse_grad, "backward_with_lse_grad", recording)
    monkeypatch.setattr(kernels.cpu_flash, "backward_with_lse_grad", recording)
    q = torch.randn(1, 4, 16, 8, requires_grad=True)
    k, v = (torch.randn(1, 2, 16, 8, requires_grad=True) for _ in range(2))  # grouped-query
    seq = SeqInfo.build(torch.zeros(1, 16, dtype=torch.long))
    r = torch.randn(1, 4, 16, 8)
    rows = (torch.arange(16) % 3 != 0).float()[None, None, :]  # a third of the rows: no gradient
    losses = {"plain": (lambda o, l: (o * r).sum(), [8], False),
              "out+lse": (lambda o, l: (o * r).sum() + l.pow(2).sum(), [8], True),
              "some rows with neither": (lambda o, l: (o * r * rows[..., None]).sum() + (l.pow(2) * rows).sum(), [8],
                                         True),
              "lse only": (lambda o, l: l.pow(2).sum(), [9], True),
              "some rows lse only": (lambda o, l: (o * r * rows[..., None]).sum() + l.pow(2).sum(), [9], True)}
    for name, (fn, widths, lse_used) in losses.items():
        grads = {}
        for backend in ("eager", "flash"):
            seen.clear()
            out, lse = kernels.attention_with_lse(q, k, v, backend=backend, seq=seq, lse_grad=lse_used)
            g = torch.autograd.grad(fn(out, lse), (q, k, v), allow_unused=True)
            grads[backend] = [torch.zeros_like(t) if x is None else x for x, t in zip(g, (q, k, v))]
            if backend == "flash":
                assert seen == widths, (name, seen)
        for a, b in zip(grads["eager"], grads["flash"]):
            assert (a - b).norm() <= 1e-5 * a.norm() + 1e-7, name


@pytest.mark.parametrize("docs", [False, True])
def test_vanilla_gate_backward_equals_autograd_fp64(docs):
    """The vanilla gate (token-major, kv heads broadcast over their query group) against the
    textbook expression 1 - exp(q . k[first] * scale - lse) with k repeated to every query
    head, values and gradients (fp64, GQA)."""
    from megasink.model.attention import vanilla_gate

    torch.manual_seed(0)
    B, nh, nkv, T, hd = 2, 4, 2, 24, 8
    q = torch.randn(B, nh, T, hd, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, nkv, T, hd, dtype=torch.float64, requires_grad=True)
    lse = (torch.randn(B, nh, T, dtype=torch.float64) + 3).requires_grad_()
    seq = SeqInfo.build(torch.zeros(B, T, dtype=torch.long), packed_doc_ids(B, T, (7, 9)) if docs else None)
    first = seq.first_idx
    k0 = torch.gather(k, 2, first[:, None, :, None].expand(B, nkv, T, hd)).repeat_interleave(nh // nkv, 1)
    ref = 1 - torch.exp((q * k0).sum(-1) * hd ** -0.5 - lse)
    got = vanilla_gate(q, k, lse, seq, hd ** -0.5)
    assert torch.allclose(got, ref, rtol=1e-12, atol=1e-14)
    r = torch.randn(B, nh, T, dtype=torch.float64)
    g_ref = torch.autograd.grad((ref * r).sum(), (q, k, lse))
    g_got = torch.autograd.grad((got * r).sum(), (q, k, lse))
    for name, a, b in zip("q k lse".split(), g_ref, g_got):
        assert (a - b).abs().max() <= 1e-12 * a.abs().max(), name
    assert g_ref[1].abs().sum() > 0 and (g_ref[1] != 0).sum() < g_ref[1].numel()  # only document starts


def test_unmeasured_vanilla_gates_change_nothing_but_the_importance(variant):
    """forward(measure=False) (the trainer's steps between log steps, aux loss off): same logits,
    loss and gradients; vanilla gates are not computed (no sums, no importance), other variants
    keep them."""
    cfg = small_model_cfg(variant)
    model = build_seeded(cfg, coef=0.0)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    doc = packed_doc_ids(2, cfg.seq_len)
    g_on, o_on = _loss_grads(model, tokens, doc, "flash")
    g_off, o_off = _loss_grads(model, tokens, doc, "flash", measure=False)
    assert torch.equal(o_on.logits, o_off.logits) and torch.equal(o_on.loss, o_off.loss)
    for name in g_on:
        assert torch.equal(g_on[name], g_off[name]), name
    assert torch.isfinite(o_on.gate_sums).all() and o_on.importance is not None
    assert (o_off.gate_sums is None and o_off.importance is None) == (variant == "vanilla")
    model = build_seeded(cfg, coef=1.0)  # the aux loss needs the gates: measured whatever measure says
    assert torch.isfinite(model(tokens, doc, targets=tokens, measure=False).gate_sums).all()
    with torch.no_grad():  # without a graph nothing differentiates them: measured only when asked
        assert torch.isfinite(model(tokens, doc, targets=tokens).aux_loss)
        assert (model(tokens, doc, measure=False).gate_sums is None) == (variant == "vanilla")


def test_rmsnorm_and_rope_functions_equal_autograd_fp64():
    """RMSNorm and RoPE against the textbook expressions (Llama / HF: x / rms(x) * w;
    x cos + rotate_half(x) sin with duplicated frequencies), values and gradients, fp64."""
    from megasink.model.layers import RMSNorm, RotaryEmbedding

    torch.manual_seed(0)
    x = torch.randn(2, 12, 3, 16, dtype=torch.float64, requires_grad=True)
    norm = RMSNorm(16).double()
    with torch.no_grad():
        norm.weight.add_(torch.randn(16, dtype=torch.float64) * 0.3)
    r = torch.randn_like(x)
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight
    got = norm(x)
    assert torch.allclose(got, ref, rtol=1e-13, atol=0)
    for a, b in zip(torch.autograd.grad((ref * r).sum(), (x, norm.weight)),
                    torch.autograd.grad((got * r).sum(), (x, norm.weight))):
        assert torch.allclose(a, b, rtol=1e-11, atol=1e-13)

    positions = torch.arange(12).expand(2, 12) % 5  # restarting per document
    cos, sin = RotaryEmbedding(16)(positions)
    c, s = torch.cat((cos, cos), -1)[:, :, None].double(), torch.cat((sin, sin), -1)[:, :, None].double()
    ref = x * c + torch.cat((-x[..., 8:], x[..., :8]), -1) * s
    got = apply_rope(x, cos, sin)
    assert torch.allclose(got, ref, rtol=1e-13, atol=1e-15)
    assert torch.allclose(torch.autograd.grad((ref * r).sum(), x)[0], torch.autograd.grad((got * r).sum(), x)[0],
                          rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("feature,variant", [("qwen2", "gated"), ("qwen2", "sink"), ("qwen3", "sink"),
                                             ("qwen3", "vanilla")])
def test_source_model_features_compile_to_eager_gradients(feature, variant):
    """q/k/v biases (the gated bias in wq's bias), per-head q/k norms, an explicit head_dim and llama3
    RoPE inside a torch.compile'd block (train.compile): the eager model's LM + aux gradients, one graph."""
    from torch._dynamo.utils import counters

    from megasink.parallel.parallelize import apply_compile

    features = {"qwen2": dict(qkv_bias=True, hf_family="qwen2"),
                "qwen3": dict(qk_norm=True, hf_family="qwen3", d_head=24, rope_scaling="llama3", rope_factor=8.0,
                              rope_original_seq_len=16)}[feature]
    cfg = small_model_cfg(variant, **features)
    model = build_seeded(cfg, coef=1.0)
    if variant == "gated":  # no separate gate_bias: the gate column's entry of wq's bias
        assert not hasattr(model.layers["0"].attention, "gate_bias")
        assert model.layers["0"].attention.head_gate_bias().shape == (cfg.n_heads,)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), generator=torch.Generator().manual_seed(0))
    doc = packed_doc_ids(2, cfg.seq_len)

    def grads():
        model.zero_grad()
        out = model(tokens, doc, targets=tokens.roll(-1, 1))
        (out.loss + out.aux_loss).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    torch._dynamo.reset()
    eager = grads()
    apply_compile(model, backend="aot_eager")
    counters.clear()
    try:
        compiled = grads()
        assert counters["stats"]["unique_graphs"] == 1
    finally:
        torch._dynamo.reset()
    assert eager.keys() == compiled.keys()
    for n, g in eager.items():
        assert (g - compiled[n]).norm() <= 1e-5 * g.norm() + 1e-12, n


def test_gate_statistics_without_logits(variant):
    """forward(logits=False): the same gate sums and count, no output layer (B x T x V) computed."""
    cfg = small_model_cfg(variant)
    model = build_seeded(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    calls = []
    model.output.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        full = model(tokens, packed_doc_ids(2, cfg.seq_len))
        stats_only = model(tokens, packed_doc_ids(2, cfg.seq_len), logits=False)
    assert stats_only.logits is None and len(calls) == 1
    assert torch.equal(full.gate_sums, stats_only.gate_sums) and torch.equal(full.gate_count, stats_only.gate_count)
