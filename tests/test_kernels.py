"""Attention routes against eager attention: the CUDA varlen route run on the CPU through a CPU
kernel of aten's exact FA2 varlen signature (the CPU flash op per document), the real aten
varlen ops on meta tensors, the backend resolution rule, and the batch layouts."""
import pytest
import torch

from conftest import build_seeded, small_model_cfg
from megasink.model import kernels
from megasink.model.kernels import BackendError, SeqInfo, attention_with_lse, resolve_backend, varlen

_aten = torch.ops.aten
F64 = torch.float64


# ------------------------------------------------------------------ a CPU kernel with aten's signature

def _docs(cu):
    c = cu.tolist()
    return list(zip(c[:-1], c[1:]))


def _bhtd(x, a, b):
    """(N, n, hd) rows a..b -> (1, n, L, hd), as the CPU flash op takes them."""
    return x[a:b].transpose(0, 1)[None]


def cpu_varlen_fwd(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, return_debug_mask, *, scale=None,
                   **unused_kw):
    assert cu_q.dtype == torch.int32 and torch.equal(cu_q, cu_k) and is_causal and dropout_p == 0.0
    assert all(b - a <= max_q for a, b in _docs(cu_q)), "max_seqlen below a document's length"
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1 and q.shape[-1] % 8 == 0  # FA2's requirements
    outs, lses = [], []
    for a, b in _docs(cu_q):
        o, l = _aten._scaled_dot_product_flash_attention_for_cpu(_bhtd(q, a, b), _bhtd(k, a, b), _bhtd(v, a, b),
                                                                 0.0, True, scale=scale)
        outs.append(o[0].transpose(0, 1))  # (L, nh, hd)
        lses.append(l[0].float() if q.dtype != F64 else l[0])  # (nh, L)
    rng = torch.zeros(2, dtype=torch.uint64)
    return torch.cat(outs), torch.cat(lses, 1), rng, torch.empty((), dtype=torch.uint64), torch.empty(0)


def cpu_varlen_bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, rng_state, unused, *,
                   scale=None, **unused_kw):
    assert q.shape[-1] % 8 == 0 and dout.is_contiguous()
    grads = [[], [], []]
    for a, b in _docs(cu_q):
        g = _aten._scaled_dot_product_flash_attention_for_cpu_backward(
            _bhtd(dout, a, b), _bhtd(q, a, b), _bhtd(k, a, b), _bhtd(v, a, b), _bhtd(out, a, b),
            lse[:, a:b][None].to(q.dtype if q.dtype == F64 else torch.float32), 0.0, True, scale=scale)
        for acc, x in zip(grads, g):
            acc.append(x[0].transpose(0, 1))
    return tuple(torch.cat(x) for x in grads)


@pytest.fixture(scope="module")
def cpu_varlen():
    """aten's FA2 varlen ops get a CPU kernel for this module's tests (CUDA-only in torch)."""
    lib = torch.library.Library("aten", "IMPL")
    lib.impl("_flash_attention_forward", cpu_varlen_fwd, "CPU")
    lib.impl("_flash_attention_backward", cpu_varlen_bwd, "CPU")
    yield
    lib._destroy()


def _layout(B=2, T=40):
    """Packed rows with a padding run (-1), length-1 documents, and a row that is one document."""
    doc = torch.zeros(B, T, dtype=torch.long)
    doc[0, 7], doc[0, 8:21], doc[0, 21:33], doc[0, 33:] = 1, 2, 3, -1  # doc 1 has length 1; padding at the end
    doc[1, 39:] = 1  # the last token alone
    return SeqInfo.build(torch.zeros(B, T, dtype=torch.long), doc)


def test_seqinfo_varlen_offsets():
    seq = _layout()
    cu, max_len = seq.varlen()
    assert cu.tolist() == [0, 7, 8, 21, 33, 40, 79, 80] and max_len == 40
    plain = SeqInfo.build(torch.zeros(3, 5, dtype=torch.long))
    assert plain.varlen()[0].tolist() == [0, 5, 10, 15]


@pytest.mark.parametrize("loss", ["out+lse", "lse where dO[:, 0] = 0", "out only"])
def test_varlen_route_equals_eager_fp64(cpu_varlen, monkeypatch, loss):
    """out, lse, dq, dk, dv for a loss on out and lse, packed documents, GQA, fp64. The second
    case zeroes dO's first column on a third of the rows, so the shifted O cannot serve them:
    the augmented column runs, padded to FA2's multiple of 8."""
    widths = []
    real_bwd = varlen.kernel_bwd
    monkeypatch.setattr(varlen, "kernel_bwd", lambda *a: (lambda dout, q, *r: widths.append(q.shape[-1])
                                                          or real_bwd(*a)(dout, q, *r)))
    torch.manual_seed(0)
    seq = _layout()
    q = torch.randn(2, 4, 40, 16, dtype=F64, requires_grad=True)
    k, v = (torch.randn(2, 2, 40, 16, dtype=F64, requires_grad=True) for _ in range(2))
    r_out, r_lse = torch.randn(2, 4, 40, 16, dtype=F64), torch.randn(2, 4, 40, dtype=F64)
    if loss == "lse where dO[:, 0] = 0":
        r_out[:, :, ::3, 0] = 0
    lse_w = 0.0 if loss == "out only" else 1.0
    res = {}
    for backend in ("eager", "varlen"):
        out, lse = attention_with_lse(q, k, v, backend=backend, seq=seq, lse_grad=lse_w > 0)
        grads = torch.autograd.grad((out * r_out).sum() + lse_w * (lse * r_lse).sum(), (q, k, v))
        res[backend] = (out, lse, *grads)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), res["eager"], res["varlen"]):
        assert (a - b).abs().max() <= 1e-10 * a.abs().max(), name
    assert widths == {"out+lse": [16], "lse where dO[:, 0] = 0": [24], "out only": [16]}[loss]


def test_varlen_model_gradients_equal_eager_fp64(cpu_varlen, variant, monkeypatch):
    """The whole model (LM + aux loss, coef 1) on the varlen route equals the eager route, fp64."""
    import megasink.model.transformer as transformer

    cfg = small_model_cfg(variant, seq_len=40)  # head dim 16: FA2 takes multiples of 8
    assert cfg.head_dim == 16
    model = build_seeded(cfg, coef=1.0, dtype=F64)
    seq = _layout()
    tokens = torch.randint(0, cfg.vocab_size, (2, 40))
    grads = {}
    for backend in ("eager", "varlen"):
        monkeypatch.setattr(transformer, "resolve_backend", lambda *a, b=backend: b)
        model.zero_grad()
        out = model(tokens, seq.doc_ids, targets=tokens.roll(-1, 1))
        (out.loss + out.aux_loss).backward()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters()}
        grads[backend]["aux"] = out.aux_loss.detach()
    assert grads["eager"]["aux"] > 0
    for name, a in grads["eager"].items():
        assert (a - grads["varlen"][name]).abs().max() <= 1e-9 * a.abs().max(), name


def test_real_varlen_ops_on_meta_tensors():
    """aten's own FA2 varlen ops (CUDA-only) run their shape functions on meta tensors with the
    model's layout: bf16 q (N, 8, 64), GQA k/v (N, 2, 64); the fake functions agree with them,
    and the augmented fallback's padded head dim (72) is accepted."""
    N, cu = 100, torch.tensor([0, 30, 31, 100], dtype=torch.int32, device="meta")
    q = torch.empty(N, 8, 64, dtype=torch.bfloat16, device="meta")
    k, v = (torch.empty(N, 2, 64, dtype=torch.bfloat16, device="meta") for _ in range(2))
    out, lse, rng, unused = varlen.kernel_fwd(q, k, v, cu, 64, 0.125)
    fake = torch.ops.megasink.varlen_fwd(q, k, v, cu, 64, 0.125, True)  # meta inputs: the fake function
    assert out.shape == q.shape and lse.shape == (8, N) and lse.dtype == torch.float32
    assert rng.shape == (2,) and rng.dtype == torch.uint64
    assert [(t.shape, t.dtype) for t in fake] == [(t.shape, t.dtype) for t in (out, lse, rng, unused)]
    bwd = varlen.kernel_bwd(lse, cu, 64, 0.125, rng, unused)
    dq, dk, dv = bwd(torch.empty_like(out), q, k, v, out)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    from megasink.model.kernels.lse_grad import augmented_backward

    dq, dk, dv = augmented_backward(bwd, torch.empty_like(out), lse.t(), q, k, v, out, varlen.ALIGN)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape


def test_backend_resolution():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_backend("auto", cpu, True) == "flash"
    assert resolve_backend("auto", cuda, True) == "varlen"  # packed documents, exact dLSE, on CUDA
    assert resolve_backend("flex", cuda, True) == "flex"
    with pytest.raises(BackendError, match="on CUDA use varlen"):
        resolve_backend("flash", cuda, True)
    with pytest.raises(BackendError, match="on the CPU use flash"):
        resolve_backend("varlen", cpu, False)
    with pytest.raises(BackendError, match="drops the gradient"):
        resolve_backend("sdpa", cuda, True)
    with pytest.raises(BackendError, match="allowed: auto, eager, flash, varlen, flex, sdpa"):
        resolve_backend("fa3", cpu, True)


def test_shifted_column_rounds_once_and_treats_subnormal_do_as_zero():
    """bf16: rowsum(dO * O') equals D - dLSE within u |dO0 O0 - dLSE| (u = 2^-8: one rounding of the
    exact new column) even for tiny dO0; rounding twice (delta to bf16, then the subtraction in
    bf16) misses it by up to 3.3x here. A row whose |dO0| is below fp32's smallest
    normal (a kernel may flush it to 0) with dLSE != 0 takes the augmented fallback (None)."""
    from megasink.model.kernels.lse_grad import shift_out

    g = torch.Generator().manual_seed(0)
    out = torch.randn(2, 3, 64, 16, generator=g).to(torch.bfloat16)
    dout = torch.randn(2, 3, 64, 16, generator=g)
    dout[..., 0] *= torch.logspace(-6, 0, 64)  # some rows with a small dO0
    dout = dout.to(torch.bfloat16)
    dlse = torch.randn(2, 3, 64, generator=g)
    shifted = shift_out(out, dout, dlse)
    assert shifted is not None and shifted.dtype == torch.bfloat16
    assert torch.equal(shifted[..., 1:], out[..., 1:])
    exact = (dout.double() * out.double()).sum(-1) - dlse.double()
    got = (dout.double() * shifted.double()).sum(-1)
    bound = 2.0 ** -8 * (dout[..., 0].double() * out[..., 0].double() - dlse.double()).abs()
    assert ((got - exact).abs() <= bound * 1.001 + 1e-12).all()
    tiny = dout.clone().float()
    tiny[0, 0, 5, 0] = 1e-39  # subnormal in fp32
    assert shift_out(out, tiny, dlse) is None
    dlse_zero_there = dlse.clone()
    dlse_zero_there[0, 0, 5] = 0.0
    assert shift_out(out, tiny, dlse_zero_there) is not None  # no dLSE in that row: nothing to shift
