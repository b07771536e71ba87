#!/usr/bin/env python
"""GPU numerics against the CPU reference, and GPU step timings, in one short run.

For a session lent a GPU (benchmarks/gpu/run.sh calls this). Needs only torch, pyyaml and
the megasink package from the working tree; writes everything to ``--out`` as JSON and
prints markdown tables.

1. Kernel: ``attention_with_lse`` on the device (flash: the fused kernel with the shifted-O
   backward; flex: FlexAttention, also with document masking) against the eager reference
   computed in float64 on the CPU, for a loss on out *and* lse (so dLSE is carried):
   relative error of out, lse, dq, dk, dv. fp32 with TF32 off (target <= 1e-4) and bf16
   (reported).
2. Model: every variant, the gradients of (LM loss + aux loss) of a small model on the device
   (backend auto) against the same model in float64 on the CPU with the eager backend
   (target <= 1e-4 relative per parameter, fp32, TF32 off).
3. Timing (bf16, backend auto): one training step fwd + bwd + AdamW of a 0.6B-shaped model
   (configs/0.6b-*.yaml dimensions, fewer layers by ``--layers``) with the aux loss off and on,
   interleaved rounds, CUDA events; tokens/s and on/off - 1 per variant; and flash vs eager
   attention fwd+bwd at T = 2048 / 4096.

    python benchmarks/gpu/check.py --out /tmp/gpu.json
    python benchmarks/gpu/check.py --device cpu --quick     # the logic, on CPU (tests it here)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def kernel_check(device, dtype, backend: str, docs: bool, T: int = 256) -> dict:
    """Device kernel vs float64 eager on the CPU: out, lse and the grads of a loss on both."""
    import torch

    from megasink.model.kernels import SeqInfo, attention_with_lse

    g = torch.Generator().manual_seed(0)
    B, nh, nkv, hd = 2, 8, 2, 64
    q, k, v = (torch.randn(B, n, T, hd, generator=g, dtype=torch.float64) for n in (nh, nkv, nkv))
    w_out, w_lse = torch.randn(B, nh, T, hd, generator=g, dtype=torch.float64), torch.randn(B, nh, T, generator=g,
                                                                                            dtype=torch.float64)
    doc = None
    if docs:
        doc = torch.zeros(B, T, dtype=torch.long)
        for cut in (T // 5, T // 2, 3 * T // 4):
            doc[:, cut:] += 1

    def run(dev, dt, be):
        xs = [x.to(dev, dt).requires_grad_() for x in (q, k, v)]
        seq = SeqInfo.build(torch.zeros(B, T, dtype=torch.long, device=dev), None if doc is None else doc.to(dev))
        out, lse = attention_with_lse(*xs, backend=be, seq=seq)
        loss = (out.double() * w_out.to(dev)).sum() + (lse.double() * w_lse.to(dev)).sum()
        grads = torch.autograd.grad(loss, xs)
        return [t.detach().cpu() for t in (out, lse, *grads)]

    ref = run(torch.device("cpu"), torch.float64, "eager")
    got = run(device, dtype, backend)
    return {name: rel(a, b) for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, ref)}


def model_check(device, variant: str, backend: str = "auto") -> dict:
    """(LM + aux) gradients of a small model on the device vs float64 eager on the CPU."""
    import torch

    from megasink.config import AuxLossConfig, ModelConfig
    from megasink.model.transformer import Transformer

    cfg = ModelConfig(attention=variant, n_layers=2, n_heads=4, n_kv_heads=2, d_model=128, vocab_size=256,
                      seq_len=128, attention_backend=backend, init_std=0.1)
    torch.manual_seed(0)
    base = Transformer(cfg, AuxLossConfig(coef=1.0))
    with torch.no_grad():
        for name, p in base.named_parameters():
            if name.endswith(("sinks", "gate_bias")):
                p.copy_(torch.randn_like(p))
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), generator=torch.Generator().manual_seed(1))

    def grads(dev, dt, be):
        import copy

        m = copy.deepcopy(base).to(dev, dt)
        m.cfg.attention_backend = be
        out = m(tokens.to(dev), None, targets=tokens.roll(-1, 1).to(dev))
        (out.loss + out.aux_loss).backward()
        return {n: p.grad.detach().cpu() for n, p in m.named_parameters()}, float(out.aux_loss.detach())

    ref, aux_ref = grads(torch.device("cpu"), torch.float64, "eager")
    got, aux = grads(device, torch.float32, backend)
    worst = max(ref, key=lambda n: rel(got[n], ref[n]))
    return {"max_rel_grad": rel(got[worst], ref[worst]), "worst_param": worst,
            "aux_rel": abs(aux - aux_ref) / abs(aux_ref)}


def timed(fn, device, reps: int) -> list:
    import torch

    out = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            out.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return out


def step_timing(device, variant: str, layers: int, batch: int, seq: int, reps: int) -> dict:
    """bf16 train step of the 0.6B dimensions with `layers` layers, aux off vs on, interleaved."""
    import torch

    from megasink.config import AuxLossConfig, load_config
    from megasink.model.transformer import Transformer

    m = load_config(os.path.join(ROOT, f"configs/0.6b-{variant}.yaml"), [f"model.n_layers={layers}",
                                                                          f"model.seq_len={seq}"]).model
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokens = torch.randint(0, m.vocab_size, (batch, seq + 1), device=device)
    steps = {}
    for mode, coef in (("off", 0.0), ("on", 1e-4)):
        torch.manual_seed(0)
        model = Transformer(m, AuxLossConfig(coef=coef)).to(device, dt)
        model.measure_importance = coef > 0
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model=model, opt=opt):
            out = model(tokens[:, :-1], None, targets=tokens[:, 1:])
            (out.loss + out.aux_loss).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        steps[mode] = step
    for fn in steps.values():
        timed(fn, device, 2)  # warm-up
    times = {"off": [], "on": []}
    for r in range(reps):
        for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):
            times[mode] += timed(steps[mode], device, 1)
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    ratios = [a / b for a, b in zip(times["on"], times["off"])]
    return {"variant": variant, "layers": layers, "batch": batch, "seq": seq, "off_s": off, "on_s": on,
            "tokens_per_s_off": batch * seq / off, "overhead": statistics.median(ratios) - 1}


def attention_timing(device, T: int, reps: int) -> dict:
    import torch

    from megasink.model.kernels import SeqInfo, attention_with_lse

    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    B, nh, nkv, hd = 2, 16, 4, 128
    q, k, v = (torch.randn(B, n, T, hd, device=device, dtype=dt, requires_grad=True) for n in (nh, nkv, nkv))
    seq = SeqInfo.build(torch.zeros(B, T, dtype=torch.long, device=device))
    res = {}
    for be in ("flash", "eager"):
        def f(be=be):
            out, lse = attention_with_lse(q, k, v, backend=be, seq=seq)
            (out.float().sum() + lse.sum()).backward()
            q.grad = k.grad = v.grad = None
        timed(f, device, 2)
        res[be] = statistics.median(timed(f, device, reps))
    return {"T": T, "flash_s": res["flash"], "eager_s": res["eager"], "speedup": res["eager"] / res["flash"]}


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="small shapes (for a CPU dry run)")
    ap.add_argument("--layers", type=int, default=4, help="layers of the 0.6B-shaped timing model")
    ap.add_argument("--out", default="gpu_check.json")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    res: dict = {"device": str(device), "torch": torch.__version__, "kernel": [], "model": [], "steps": [],
                 "attention": []}
    cases = [("flash", False)] + ([("flex", False), ("flex", True)] if device.type == "cuda" else [("flash", True)])
    for dt_name in ("float32", "bfloat16"):
        for backend, docs in cases:
            try:
                r = kernel_check(device, getattr(torch, dt_name), backend, docs, T=64 if args.quick else 256)
            except Exception as e:  # report, keep going: one broken backend should not hide the rest
                r = {"error": f"{type(e).__name__}: {e}"}
            res["kernel"].append({"dtype": dt_name, "backend": backend, "docs": docs, **r})
            print("kernel", res["kernel"][-1], flush=True)
    for variant in ("vanilla", "sink", "gated"):
        res["model"].append({"variant": variant, **model_check(device, variant)})
        print("model", res["model"][-1], flush=True)
    seqs = (256,) if args.quick else (2048,)
    for variant in ("vanilla", "sink", "gated"):
        for seq in seqs:
            res["steps"].append(step_timing(device, variant, 1 if args.quick else args.layers, 2 if args.quick else 4,
                                            seq, 3 if args.quick else 10))
            print("step", res["steps"][-1], flush=True)
    for T in ((256,) if args.quick else (2048, 4096)):
        res["attention"].append(attention_timing(device, T, 3 if args.quick else 10))
        print("attention", res["attention"][-1], flush=True)
    fp32 = [r for r in res["kernel"] if r["dtype"] == "float32"]
    res["kernel_fp32_ok"] = all("error" not in r and max(r[k] for k in ("out", "lse", "dq", "dk", "dv")) <= 1e-4
                                for r in fp32)
    res["model_ok"] = all(r["max_rel_grad"] <= 1e-4 for r in res["model"])
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    print(f"kernel fp32 <= 1e-4: {res['kernel_fp32_ok']}; model grads <= 1e-4: {res['model_ok']}; wrote {args.out}")
    return 0 if res["kernel_fp32_ok"] and res["model_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
