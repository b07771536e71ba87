#!/usr/bin/env python
"""megasink's training step against Hugging Face transformers' LlamaForCausalLM.

What it measures, in one run, on one process: one training step (forward, LM loss,
backward, AdamW step) of

- megasink: ``Transformer`` with vanilla attention, ``attention_backend: auto`` (the fused
  flash kernel; with the aux loss off no lse gradient is taken, so the stock flash
  backward runs), ``aux_loss.coef: 0``, backward of ``out.loss``, head importance not
  measured (what ``megasink train`` does on the steps between log steps);
- Hugging Face: ``LlamaForCausalLM`` built from the same dimensions (megasink's own HF
  export config, megasink/hf/mapping.py: hidden, intermediate = model.ffn_dim, heads, kv
  heads, vocab, rope theta, rms eps, untied embeddings, no biases) with
  ``attn_implementation="sdpa"``, loaded with *the same weights*, backward of its loss
  (``labels`` + ``shift_labels`` = the same next-token targets),

with the same batch (one document per row: causal attention, no document masking, which
HF's sdpa path would need a 4-D mask for), the same torch.optim.AdamW settings, fp32. A
parity check first asserts that both compute the same loss from the same weights, so
the comparison is between two implementations of one model.

Sizes: the tiny CPU config (configs/tiny-vanilla.yaml: 4 layers, d 128, 4 heads / 2 kv,
vocab 512, 8 x 256 tokens) and a mid one (8 layers, d 512, 8 heads, vocab 32768,
seq 512, batch 2; ~59M parameters).

**Target: megasink at least as fast as HF (HF step time / megasink step time >= 1.0)**
for both sizes. Exit status 1 when missed (``--quick``: small shapes, not enforced).
``--profile`` prints a torch.profiler comparison (self time per op, steps profiled one at
a time, interleaved). ``--explain`` adds a megasink case to the same rounds that measures
head importance (the vanilla gates), as the trainer's log steps do.

Protocol (benchmarks/common.py): warm-up, interleaved rounds, medians, ratio = median of
per-round ratios with a bootstrap 95 % interval. 1 intra-op thread and the process CPU
clock by default (see benchmarks/aux_overhead.py for why on a shared 2-core machine).

    python benchmarks/train_step.py            # ~3 minutes on 2 cores
    python benchmarks/train_step.py --explain --profile   # ~5 minutes
    python benchmarks/train_step.py --quick
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import sys

from common import (ROOT, bootstrap_ci, interleaved, machine_line, median, ms, set_threads, spread,
                    table)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--quick", action="store_true", help="smoke run: small shapes, few rounds, target not enforced")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    p.add_argument("--clock", choices=("cpu", "wall"), help="process CPU time (default with 1 thread) or wall clock")
    p.add_argument("--sizes", default="tiny,mid", help="comma-separated subset of tiny,mid")
    p.add_argument("--reps-tiny", type=int, default=30, help="timed rounds, tiny")
    p.add_argument("--reps-mid", type=int, default=10, help="timed rounds, mid")
    p.add_argument("--mid-batch", type=int, default=2, help="batch size of the mid config")
    p.add_argument("--profile", action="store_true", help="profile steps of each implementation per size")
    p.add_argument("--explain", action="store_true", help="also time megasink measuring head importance "
                   "(as on log steps)")
    p.add_argument("--json", help="also write the measurements to this JSON file")
    return p.parse_args(argv)


def model_cfg(size: str, quick: bool, mid_batch: int):
    from megasink.config import ModelConfig, load_config

    if size == "tiny":
        cfg = load_config(f"{ROOT}/configs/tiny-vanilla.yaml", ["aux_loss.coef=0"])
        m, B = cfg.model, cfg.train.micro_batch_size
        if quick:
            m, B = dataclasses.replace(m, n_layers=2, seq_len=128), 4
    elif quick:
        m, B = ModelConfig(attention="vanilla", n_layers=2, n_heads=8, n_kv_heads=8, d_model=256,
                           vocab_size=4096, seq_len=256), 1
    else:
        m, B = ModelConfig(attention="vanilla", n_layers=8, n_heads=8, n_kv_heads=8, d_model=512,
                           vocab_size=32768, seq_len=512), mid_batch
    return dataclasses.replace(m, attention="vanilla", attention_backend="auto"), B


def adamw(params):
    import torch

    return torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8)


def build_pair(m):
    """(megasink model, HF LlamaForCausalLM) with identical weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from megasink.config import AuxLossConfig
    from megasink.hf.mapping import hf_config_dict, to_hf_tensors
    from megasink.model.transformer import Transformer

    torch.manual_seed(0)
    ours = Transformer(m, AuxLossConfig(coef=0.0))
    d = {k: v for k, v in hf_config_dict(m).items() if k not in ("architectures", "model_type", "torch_dtype")}
    d["use_cache"] = False
    hf_cfg = LlamaConfig(**d)
    hf_cfg._attn_implementation = "sdpa"
    hf = LlamaForCausalLM(hf_cfg).float()
    missing, unexpected = hf.load_state_dict(dict(to_hf_tensors(ours.state_dict(), m)), strict=False)
    missing = [k for k in missing if "rotary" not in k]
    if missing or unexpected:
        raise RuntimeError(f"weight mapping: missing {missing}, unexpected {unexpected}")
    ours.train()
    hf.train()
    return ours, hf


def batch(m, B: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    window = torch.randint(0, m.vocab_size, (B, m.seq_len + 1), generator=g)
    return window[:, :-1].contiguous(), window[:, 1:].contiguous()  # tokens, targets (B, T)


def check_parity(ours, hf, tokens, targets) -> float:
    import torch

    with torch.no_grad():
        a = ours(tokens, targets=targets).loss
        b = hf(input_ids=tokens, labels=targets, shift_labels=targets).loss
    rel = abs(a.item() - b.item()) / abs(b.item())
    if rel > 1e-4:
        raise RuntimeError(f"megasink loss {a.item():.6f} != HF loss {b.item():.6f}: not the same model")
    return rel


def step_fns(ours, hf, tokens, targets, explain: bool = False):
    """{case: step()}. With `explain`, ``measured``: megasink on a copy of its weights with
    head importance measured (vanilla gates computed, as on the trainer's log steps)."""
    import copy

    def megasink_step(model, measure: bool = False):
        """measure=False: as the trainer's steps between log steps (no vanilla gates)."""
        opt = adamw(model.parameters())

        def step():
            model(tokens, targets=targets, measure=measure).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    opt_hf = adamw(hf.parameters())

    def step_hf():
        hf(input_ids=tokens, labels=targets, shift_labels=targets).loss.backward()
        opt_hf.step()
        opt_hf.zero_grad(set_to_none=True)

    steps = {"megasink": megasink_step(ours), "hf": step_hf}
    if explain:
        steps["measured"] = megasink_step(copy.deepcopy(ours), measure=True)
    return steps


def profile_pair(name: str, steps: dict, n: int = 4) -> None:
    """Self CPU time per op, megasink vs HF, profiled one step at a time, interleaved."""
    from torch.profiler import ProfilerActivity, profile

    res = {"megasink": collections.Counter(), "hf": collections.Counter()}
    calls = {"megasink": {}, "hf": {}}
    for r in range(n):
        for impl in (("megasink", "hf") if r % 2 == 0 else ("hf", "megasink")):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                steps[impl]()
            for e in prof.key_averages():
                res[impl][e.key] += e.self_cpu_time_total / n / 1e3
                calls[impl][e.key] = e.count
    res = {impl: {k: (v, calls[impl][k]) for k, v in r.items()} for impl, r in res.items()}
    tot = {k: sum(v[0] for v in r.values()) for k, r in res.items()}
    keys = sorted(set(res["megasink"]) | set(res["hf"]),
                  key=lambda k: -abs(res["megasink"].get(k, (0, 0))[0] - res["hf"].get(k, (0, 0))[0]))
    print(f"\n#### profile {name}: self CPU ms per step, megasink {tot['megasink']:.1f}, HF {tot['hf']:.1f}\n")
    rows = []
    for k in keys[:20]:
        a, b = res["megasink"].get(k, (0.0, 0)), res["hf"].get(k, (0.0, 0))
        rows.append([k[:60], f"{a[0]:.2f} ({a[1]})", f"{b[0]:.2f} ({b[1]})", f"{a[0] - b[0]:+.2f}"])
    print(table(["op", "megasink ms (calls)", "HF ms (calls)", "megasink - HF"], rows))


def main(argv=None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    args.clock = args.clock or ("cpu" if args.threads == 1 else "wall")
    import torch
    import transformers

    print(f"# train_step.py{' --quick' if args.quick else ''}: {machine_line()}; "
          f"transformers {transformers.__version__}; clock: {args.clock}")
    rows = []
    for size in args.sizes.split(","):
        m, B = model_cfg(size, args.quick, args.mid_batch)
        ours, hf = build_pair(m)
        tokens, targets = batch(m, B)
        rel = check_parity(ours, hf, tokens, targets)
        steps = step_fns(ours, hf, tokens, targets, args.explain)
        reps = 3 if args.quick else (args.reps_tiny if size == "tiny" else args.reps_mid)
        t = interleaved(steps, reps=reps, warmup=2, clock=args.clock)
        ratios = [h / o for h, o in zip(t["hf"], t["megasink"])]
        n_tok = B * m.seq_len
        row = dict(size=size, params=sum(p.numel() for p in ours.parameters()), batch=B, seq=m.seq_len,
                   layers=m.n_layers, d_model=m.d_model, heads=m.n_heads, kv_heads=m.kv_heads, vocab=m.vocab_size,
                   ours_s=median(t["megasink"]), hf_s=median(t["hf"]), ratio=median(ratios),
                   ci=bootstrap_ci(ratios), wall_ratio=median(h / o for h, o in zip(t.wall["hf"], t.wall["megasink"])),
                   noise=spread(t["megasink"]), parity=rel, reps=reps)
        row["ours_tok_s"], row["hf_tok_s"] = n_tok / row["ours_s"], n_tok / row["hf_s"]
        for case in ("measured",):
            if case in t:
                r_case = [h / o for h, o in zip(t["hf"], t[case])]
                row[case] = dict(s=median(t[case]), ratio=median(r_case), ci=bootstrap_ci(r_case))
        rows.append(row)
        print(f"  {size}: megasink {ms(row['ours_s'])} ms, HF {ms(row['hf_s'])} ms", file=sys.stderr, flush=True)
        if args.profile:
            profile_pair(size, steps)
        del ours, hf, steps
    print("\n### Training step (fwd + bwd + AdamW, fp32): megasink vanilla (flash, aux off) vs HF Llama (sdpa)\n")
    print(table(["config", "params", "B x T", "megasink ms", "HF ms", "megasink tok/s", "HF tok/s",
                 "HF/megasink", "95% CI", "wall-clock ratio", "noise", ">= 1.0"],
                [[f"{r['size']} ({r['layers']}L d{r['d_model']} {r['heads']}h/{r['kv_heads']}kv V{r['vocab']})",
                  f"{r['params'] / 1e6:.1f}M", f"{r['batch']} x {r['seq']}", ms(r["ours_s"]), ms(r["hf_s"]),
                  f"{r['ours_tok_s']:.0f}", f"{r['hf_tok_s']:.0f}", f"{r['ratio']:.3f}",
                  f"[{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]", f"{r['wall_ratio']:.3f}", f"{100 * r['noise']:.0f}%",
                  "yes" if r["ratio"] >= 1.0 else "NO"] for r in rows]))
    explained = [r for r in rows if "measured" in r]
    if explained:
        print("\n#### megasink measuring head importance (as on log steps), same rounds\n")
        print(table(["config", "megasink ms", "measured ms", "HF/measured", "95% CI", "HF ms"],
                    [[r["size"], ms(r["ours_s"]), ms(r["measured"]["s"]), f"{r['measured']['ratio']:.3f}",
                      f"[{r['measured']['ci'][0]:.3f}, {r['measured']['ci'][1]:.3f}]", ms(r["hf_s"])]
                     for r in explained]))
    print("\nSame weights in both (loss parity checked: |rel diff| "
          + ", ".join(f"{r['parity']:.1e}" for r in rows) + f"); torch {torch.__version__}.")
    print(f"# done: {machine_line()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=float)
    if args.quick:
        print("--quick: smoke run, target not enforced")
        return 0
    ok = all(r["ratio"] >= 1.0 for r in rows)
    print("target (HF/megasink >= 1.0): " + ("met" if ok else "MISSED for "
                                               + ", ".join(r["size"] for r in rows if r["ratio"] < 1.0)))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
