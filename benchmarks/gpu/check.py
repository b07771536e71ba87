#!/usr/bin/env python
"""The one-call GPU check: numerics of the CUDA routes against the CPU float64 reference, then
the real training CLI and a Hugging Face baseline, one stage per call (run.sh runs them in
priority order, each under its own timeout, each writing ``OUT/<stage>.json`` when done).

Stages:
  kernels  varlen (bf16) and flex (fp32): out, lse, dq, dk, dv for a loss on out *and* lse,
           packed documents (a padding run, a length-1 document) and GQA, against eager
           attention in float64 on the CPU from the same (rounded) inputs; varlen at head dims
           64 and 128 and once through the augmented-column fallback.
  model    the three variants' (LM + aux) parameter gradients, varlen in bf16 and flex in fp32,
           against the same weights in float64 on the CPU with the eager route.
  cli      ``megasink train configs/0.6b-sink.yaml`` on synthetic data: bf16, one GPU, NCCL,
           ZeRO-1, no activation checkpointing, no checkpoint writes, aux loss on, compile off
           (``--compile`` on; ``--no-aux``: aux_loss.coef=0, the baseline of the aux loss's
           overhead), micro-batch from a memory estimate; tokens/s and MFU from metrics.jsonl.
  hf       HF ``LlamaForCausalLM`` (sdpa, bf16, same dims and batch, one document per row,
           fused AdamW, no compile) against megasink run the same way: tokens/s and their ratio.
  profile  the same two models under torch.profiler: each one's top ops by device time per step.

``--dry-run`` runs every stage's logic on the CPU with tiny shapes (the CPU flash route
stands in for varlen, eager for flex; the CLI on a 2-layer 0.6b-shaped model): tests run it.

    python benchmarks/gpu/check.py kernels --out /tmp/gpu
    python benchmarks/gpu/check.py cli --dry-run --out /tmp/dry
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import torch  # noqa: E402

TOL = {torch.bfloat16: 3e-2, torch.float32: 1e-4, torch.float64: 1e-9}  # relative, per tensor


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _doc_ids(B: int, T: int) -> torch.Tensor:
    """Packed rows: documents of several lengths, a length-1 document, a padding run (-1) at the end."""
    doc = torch.zeros(B, T, dtype=torch.long)
    for cut in (T // 5, T // 5 + 1, T // 2):
        doc[:, cut:] += 1
    doc[0, 7 * T // 8:] = -1
    return doc


def kernel_case(device, dtype, backend: str, T: int, hd: int = 64, augmented: bool = False) -> dict:
    """One route's out, lse, dq, dk, dv vs float64 eager. ``augmented``: a few rows get
    dO[..., 0] = 0 with dLSE != 0, which sends the backward to the augmented-column fallback."""
    from megasink.model.kernels import SeqInfo, attention_with_lse

    g = torch.Generator().manual_seed(0)
    B, nh, nkv = 2, 4, 2  # the model stage's head counts (flex compiles once per shape)
    q, k, v = (torch.randn(B, n, T, hd, generator=g).to(dtype) for n in (nh, nkv, nkv))  # rounded once
    w_out, w_lse = torch.randn(B, nh, T, hd, generator=g), torch.randn(B, nh, T, generator=g)
    if augmented:
        w_out[0, :, :5, 0] = 0.0  # dO = w_out: these rows have dO[..., 0] = 0
    doc = _doc_ids(B, T)

    def run(dev, dt, be):
        xs = [x.to(dev, dt).requires_grad_() for x in (q, k, v)]
        seq = SeqInfo.build(doc.to(dev), doc.to(dev))
        out, lse = attention_with_lse(*xs, backend=be, seq=seq)
        loss = (out.double() * w_out.to(dev, torch.float64)).sum() + (lse.double() * w_lse.to(dev, torch.float64)).sum()
        return [t.detach().cpu() for t in (out, lse, *torch.autograd.grad(loss, xs))]

    ref, got = run(torch.device("cpu"), torch.float64, "eager"), run(device, dtype, backend)
    errs = {name: rel(a, b) for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, ref)}
    return {"backend": backend, "dtype": str(dtype).split(".")[1], "T": T, "hd": hd, "augmented": augmented,
            **errs, "tol": TOL[dtype], "ok": max(errs.values()) <= TOL[dtype]}


def model_case(device, dtype, backend: str, variant: str) -> dict:
    from megasink.config import AuxLossConfig, ModelConfig
    from megasink.model.transformer import Transformer

    cfg = ModelConfig(attention=variant, n_layers=2, n_heads=4, n_kv_heads=2, d_model=256, vocab_size=512,
                      seq_len=256, init_std=0.1)
    torch.manual_seed(0)
    base = Transformer(cfg, AuxLossConfig(coef=1.0)).to(dtype)  # the weights both sides start from
    with torch.no_grad():
        for name, p in base.named_parameters():
            if name.endswith(("sinks", "gate_bias")):
                p.copy_(torch.randn_like(p))
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), generator=torch.Generator().manual_seed(1))
    doc = _doc_ids(2, cfg.seq_len)

    def grads(dev, dt, be):
        m = Transformer(dataclasses.replace(cfg, attention_backend=be), base.aux_cfg)
        m.load_state_dict(base.state_dict())
        m = m.to(dev, dt)
        out = m(tokens.to(dev), doc.to(dev), targets=tokens.roll(-1, 1).to(dev))
        (out.loss + out.aux_loss).backward()
        return {n: p.grad.detach().cpu() for n, p in m.named_parameters()}, float(out.aux_loss)

    (ref, aux_ref), (got, aux) = grads(torch.device("cpu"), torch.float64, "eager"), grads(device, dtype, backend)
    worst = max(ref, key=lambda n: rel(got[n], ref[n]))
    tol = 5 * TOL[dtype]  # a whole model's rounding in that dtype
    return {"variant": variant, "backend": backend, "dtype": str(dtype).split(".")[1], "worst_param": worst,
            "max_rel_grad": rel(got[worst], ref[worst]), "aux_rel": abs(aux - aux_ref) / abs(aux_ref), "tol": tol,
            "ok": rel(got[worst], ref[worst]) <= tol}


def routes(device) -> list:
    """(dtype, backend) pairs to check: the CUDA routes, or their CPU stand-ins in a dry run."""
    if device.type == "cuda":
        return [(torch.bfloat16, "varlen"), (torch.float32, "flex")]
    return [(torch.float32, "flash"), (torch.float32, "eager")]


def kernel_shapes(backend: str, dry: bool) -> list:
    """(T, hd, augmented) per case: the FA2 route at the model's head dims (64; 128 as in the
    0.6B config) and once through its augmented fallback (hd 128 -> 136); flex at one shape (each
    shape is a compilation)."""
    if dry:
        return [(64, 64, False), (64, 32, True)]
    if backend == "flex":
        return [(256, 64, False)]
    return [(256, 64, False), (1024, 128, False), (256, 128, True)]


def stage_kernels(device, dry: bool, emit) -> dict:
    res = {"cases": [], "ok": False}
    for dtype, backend in routes(device):
        for T, hd, augmented in kernel_shapes(backend, dry):
            res["cases"].append(_guarded(kernel_case, device, dtype, backend, T, hd, augmented))
            print("kernel", res["cases"][-1], flush=True)
            emit(res)  # what ran so far survives a timeout
    res["ok"] = all(c.get("ok") for c in res["cases"])
    return res


def stage_model(device, dry: bool, emit) -> dict:
    res = {"cases": [], "ok": False}
    for dtype, backend in routes(device):
        for variant in ("vanilla", "sink", "gated"):
            res["cases"].append(_guarded(model_case, device, dtype, backend, variant))
            print("model", res["cases"][-1], flush=True)
            emit(res)
    res["ok"] = all(c.get("ok") for c in res["cases"])
    return res


def _guarded(fn, *args) -> dict:
    """fn's result, or its error: one broken route should not hide the others."""
    try:
        return fn(*args)
    except Exception as e:
        return {"args": [str(a) for a in args[1:]], "error": f"{type(e).__name__}: {e}", "ok": False}


# ------------------------------------------------------------------ the CLI and the HF baseline

DRY_MODEL = ["model.n_layers=2", "model.d_model=128", "model.n_heads=2", "model.n_kv_heads=2", "model.vocab_size=512",
             "model.seq_len=128"]


def model_config(dry: bool):
    from megasink.config import load_config

    return load_config(os.path.join(ROOT, "configs/0.6b-sink.yaml"), DRY_MODEL if dry else [])


def micro_batch_for_memory(m, free_bytes: float, safety: float = 0.5) -> int:
    """Sequences per micro-batch that fit ``safety`` of the free memory, from an estimate: 20 bytes
    per parameter (bf16 weights and gradients, fp32 master weights and AdamW moments) and, per
    token, each layer's saved activations without recomputation (~42 d + 8 ffn bytes: bf16 tensors
    plus the fp32 copies RMSNorm and RoPE make) and the logits' bf16 / fp32 / gradient (10 V bytes)."""
    from megasink.train.metrics import flops_per_token

    params = (flops_per_token(m) - 12 * m.n_layers * m.d_model * m.seq_len) / 6 + m.d_model * m.vocab_size
    states = 20 * params
    per_token = m.n_layers * (42 * m.d_model + 8 * m.ffn_dim) + 10 * m.vocab_size
    return max(1, int((safety * free_bytes - states) // (per_token * m.seq_len)))


def _free_bytes(device) -> float:
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 8e9


def _micro_batch(device, dry: bool, m) -> int:
    """The CLI, hf and profile stages' micro-batch: at most 16, from the memory estimate."""
    return 2 if dry else min(16, micro_batch_for_memory(m, _free_bytes(device)))


def stage_cli(device, dry: bool, compile_: bool, runs_dir: str, aux: bool = True) -> dict:
    m = model_config(dry).model
    mb = _micro_batch(device, dry, m)
    steps, log = (4, 2) if dry else (30, 5)
    run_dir = os.path.join(runs_dir, f"cli-compile-{int(compile_)}-aux-{int(aux)}")
    args = [sys.executable, "-m", "megasink.train", "configs/0.6b-sink.yaml", "data.path=[synthetic]",
            f"train.steps={steps}", f"train.log_interval={log}", "train.eval_interval=0", "train.save_checkpoints=false",
            "train.activation_checkpointing=false", f"train.micro_batch_size={mb}", f"train.global_batch_size={mb}",
            "train.warmup_steps=2", "train.progress=false", "parallel.zero_stage=1",
            f"aux_loss.coef={1e-4 if aux else 0.0}",
            f"train.compile={str(compile_).lower()}", "train.resume=none", f"run_dir={run_dir}",
            f"train.importance_interval={steps}"]
    args += DRY_MODEL + ["train.precision=fp32", "train.compile_backend=aot_eager"] if dry else ["train.precision=bf16"]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    t0 = time.time()
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    records = []
    path = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(path):
        records = [r for r in map(json.loads, open(path)) if "tokens_per_s" in r]
    steady = records[1:] or records  # the first window holds start-up (and compilation)
    res = {"compile": compile_, "aux": aux, "micro_batch": mb, "seq_len": m.seq_len, "rc": proc.returncode,
           "wall_s": round(time.time() - t0, 1), "records": len(records),
           "tokens_per_s": _median([r["tokens_per_s"] for r in steady]), "mfu": _median([r["mfu"] for r in steady]),
           "loss_first_last": [records[0]["loss"], records[-1]["loss"]] if records else None,
           "ok": proc.returncode == 0 and len(records) > 0}
    if proc.returncode != 0:
        res["stderr_tail"] = proc.stderr[-3000:]
    return res


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else None


def _time_steps(step, device, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def _train_step(model, opt, tokens, forward):
    def step():
        loss = forward(model, tokens)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _hf_and_megasink(dry: bool):
    """(config, [(name, build, loss_fn)]): HF Llama and megasink (sink + aux) of the same dims."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megasink.config import AuxLossConfig
    from megasink.model.transformer import Transformer

    cfg = model_config(dry)
    m = cfg.model
    hf_cfg = LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.ffn_dim,
                         num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads,
                         num_key_value_heads=m.kv_heads, max_position_embeddings=m.seq_len, rms_norm_eps=m.norm_eps,
                         rope_theta=m.rope_theta, tie_word_embeddings=m.tie_embeddings, attn_implementation="sdpa",
                         use_cache=False)
    return cfg, [
        ("hf", lambda: LlamaForCausalLM(hf_cfg), lambda mod, t: mod(input_ids=t[:, :-1], labels=t[:, :-1]).loss),
        ("megasink", lambda: Transformer(m, AuxLossConfig(coef=cfg.aux_loss.coef)),
         lambda mod, t: (lambda o: o.loss + o.aux_loss)(mod(t[:, :-1], None, targets=t[:, 1:])))]


def _built(device, dry: bool, build, mb: int, m):
    """(model, fused AdamW, tokens) on ``device`` in the check's dtype."""
    dt = torch.float32 if dry else torch.bfloat16
    torch.manual_seed(0)
    model = build().to(device, dt)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda" or None)
    return model, opt, torch.randint(0, m.vocab_size, (mb, m.seq_len + 1), device=device)


def stage_hf(device, dry: bool) -> dict:
    """HF Llama vs megasink, same dims, batch, dtype and optimizer; one document per row."""
    from megasink.train.metrics import flops_per_token

    cfg, models = _hf_and_megasink(dry)
    m = cfg.model
    mb = _micro_batch(device, dry, m)
    warm, reps = (1, 2) if dry else (3, 10)
    res = {"micro_batch": mb, "seq_len": m.seq_len}
    for name, build, fwd in models:
        model, opt, tokens = _built(device, dry, build, mb, m)
        sec = _time_steps(_train_step(model, opt, tokens, fwd), device, warm, reps)
        res[f"{name}_tokens_per_s"] = mb * m.seq_len / sec
        del model, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    res["ratio"] = res["megasink_tokens_per_s"] / res["hf_tokens_per_s"]
    if device.type == "cuda":
        from megasink.train.metrics import peak_flops

        res["megasink_mfu"] = res["megasink_tokens_per_s"] * flops_per_token(m) / peak_flops()[0]
    res["ok"] = True
    return res


def stage_profile(device, dry: bool, top: int = 25, steps: int = 2) -> dict:
    """Where a training step's time goes, HF vs megasink (the hf stage's models and batch):
    torch.profiler over ``steps`` steps after as many warm-up steps; per model the ``top`` ops by
    self time on the device (CPU time in a dry run), with call counts, and the step's total."""
    from torch.profiler import ProfilerActivity, profile

    cfg, models = _hf_and_megasink(dry)
    m = cfg.model
    mb = _micro_batch(device, dry, m)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    res = {"micro_batch": mb, "seq_len": m.seq_len, "steps": steps}
    for name, build, fwd in models:
        model, opt, tokens = _built(device, dry, build, mb, m)
        step = _train_step(model, opt, tokens, fwd)
        for _ in range(steps):  # warm-up: allocator, cuBLAS handles, autotuning
            step()
        with profile(activities=activities) as prof:
            for _ in range(steps):
                step()
            if cuda:
                torch.cuda.synchronize()
        events = prof.key_averages()
        attr = "self_device_time_total" if cuda else "self_cpu_time_total"
        rows = sorted(events, key=lambda e: getattr(e, attr), reverse=True)
        res[name] = {"total_ms": sum(getattr(e, attr) for e in events) / 1e3 / steps,
                     "top": [{"op": e.key[:120], "ms_per_step": getattr(e, attr) / 1e3 / steps,
                              "calls": e.count // steps} for e in rows[:top]]}
        print(f"{name}: {res[name]['total_ms']:.1f} ms per step ({'device' if cuda else 'CPU'} self time)")
        for r in res[name]["top"]:
            print(f"  {r['ms_per_step']:9.2f} ms  {r['calls']:5d}x  {r['op']}")
        del model, opt, prof
        if cuda:
            torch.cuda.empty_cache()
    res["ok"] = True
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["kernels", "model", "cli", "hf", "profile"])
    ap.add_argument("--compile", action="store_true", help="cli: train with train.compile=true")
    ap.add_argument("--no-aux", action="store_true", help="cli: aux_loss.coef=0 (the baseline of its overhead)")
    ap.add_argument("--dry-run", action="store_true", help="the logic on the CPU, tiny shapes")
    ap.add_argument("--out", default="gpu_check", help="folder for <stage>.json")
    ap.add_argument("--runs", default=os.path.join(tempfile.gettempdir(), "megasink-gpu-runs"),
                    help="folder for the CLI stages' training run directories (kept out of --out)")
    args = ap.parse_args(argv)
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 checks at fp32 precision
        torch.backends.cudnn.allow_tf32 = False
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    name = args.stage + ("-compile" if args.compile else "") + ("-noaux" if args.no_aux else "")
    where = dict(stage=args.stage, device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                 torch=torch.__version__)

    def emit(res: dict) -> None:
        """OUT/<stage>.json, written atomically: after each case, and whole at the end."""
        tmp = os.path.join(args.out, f".{name}.json.tmp")
        with open(tmp, "w") as f:
            json.dump({**res, **where, "seconds": round(time.time() - t0, 1)}, f, indent=2)
        os.replace(tmp, os.path.join(args.out, f"{name}.json"))

    if args.stage == "kernels":
        res = stage_kernels(device, args.dry_run, emit)
    elif args.stage == "model":
        res = stage_model(device, args.dry_run, emit)
    elif args.stage == "cli":
        res = stage_cli(device, args.dry_run, args.compile, args.runs, aux=not args.no_aux)
    elif args.stage == "hf":
        res = stage_hf(device, args.dry_run)
    else:
        res = stage_profile(device, args.dry_run)
    emit(res)
    print(json.dumps({k: v for k, v in {**res, **where}.items() if k != "cases"}), flush=True)
    return 0 if res.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
