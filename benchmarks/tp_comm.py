#!/usr/bin/env python
"""Bytes moved by each tensor-parallel collective in one training step, against a formula.

What it does: on ``tp`` gloo ranks (torch.multiprocessing.spawn, CPU), it builds a small
model, applies ``megasink.parallel.tensor.apply_tensor_parallel``, wraps every
``torch.distributed`` collective so that each call is recorded (op, call site, phase,
tensor elements and bytes), runs one training step the way megasink/train/trainer.py takes
it (the vocabulary-parallel LM loss ``cross_entropy_sum``, the gate sums made global by
``stats.globalize``, the aux gradient handed back by ``stats.attach_aux_grad``), forward +
backward, and checks the record against the formula below, exactly (number of calls and
elements per call site).

Formula (derived from megasink/parallel/tensor.py; per rank, per step, one micro-batch).
Notation: B batch, T sequence length, d d_model, L layers, H query heads, Hkv kv heads,
hd head dim, P = tp, N = B*T tokens. Every tensor is fp32 (4 bytes per element).

Forward
  embedding     VocabParallelEmbedding -> ReduceFromTP all-reduce of (B, T, d)    1 x N d
  row-parallel  ReduceFromTP after wo and after w2 (Megatron's two per layer)  2L x N d
  loss          VocabParallelCrossEntropy: all-reduce MAX of the row max, SUM of the
                picked target logit, SUM of the sum of exps, each (N,)            3 x N
  importance    stats.globalize all_gather of the gate sums: P x (L, H/P) -> (L, H) 1 x L H
Backward
  column-parallel inputs: CopyToTP all-reduces the gradient of each block's two norm
                outputs (CopiedNorm: the summed input gradient of wq, wk, wv, and of
                w1, w3), plus the output head's input                      (2L + 1) x N d
  replicated kv (only when Hkv % P != 0): CopyToTP on the wk and wv *weights*
                all-reduces their full gradients                           2L x Hkv hd d
  ReduceFromTP, AuxGrad and the cross-entropy have no collective in their backward.

  elements = N d (4L + 2) + 3 N + L H  [+ 2 L Hkv hd d]

"Payload" counts each call's tensor once (the gathered (L, H) result for the all-gather).
"Wire" is the ring-algorithm estimate of bytes each rank sends: 2 (P-1)/P x payload for
an all-reduce, (P-1)/P x payload for an all-gather. The importance all-gather's share of
the traffic is **expected to be negligible** (L H against N d (4L + 2)); the table also
gives it for the repository's 0.6B/1B/2B configs from the formula.

The backward matches Megatron's two all-reduces per layer (one for the fused QKV input, one
for the MLP input). Until 2026-11-29 megasink did five (every column-parallel linear copied
its own input): (5L + 1) -> (2L + 1) x N d, see benchmarks/RESULTS.md.

Exit status: 0 when every rank's record equals the formula for every variant and tp
size, 1 otherwise. ``--quick`` runs tp=2 only.

    python benchmarks/tp_comm.py               # tp=2 and tp=4, ~30 s
    python benchmarks/tp_comm.py --quick
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import tempfile

from common import ROOT, free_port, table

VARIANTS = ("vanilla", "sink", "gated")
F32 = 4


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--quick", action="store_true", help="tp=2 only")
    p.add_argument("--tp", default="2,4", help="comma-separated TP sizes (default 2,4)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2, help="2 with tp=4 exercises the replicated-kv path")
    p.add_argument("--vocab", type=int, default=96)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--json", help="also write the records to this JSON file")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- formula
def expected(m, B: int, P: int) -> dict:
    """{(phase, op, site): (calls, elements per call)} from the formula in the docstring."""
    N, d, L, H = B * m.seq_len, m.d_model, m.n_layers, m.n_heads
    e = {
        ("forward", "all_reduce", "VocabParallelEmbedding/ReduceFromTP"): (1, N * d),
        ("forward", "all_reduce", "RowParallelLinear/ReduceFromTP"): (2 * L, N * d),
        ("forward", "all_reduce", "VocabParallelCrossEntropy"): (3, N),
        ("forward", "all_gather", "stats.globalize"): (1, L * H),
        ("backward", "all_reduce", "CopyToTP (activation)"): (2 * L + 1, N * d),
    }
    if m.kv_heads % P:
        e[("backward", "all_reduce", "CopyToTP (replicated kv weight)")] = (2 * L, m.kv_heads * m.head_dim * d)
    return e


def formula_total(m, B: int, P: int) -> tuple[int, int]:
    """(total elements, importance elements) per rank per step, closed form."""
    N, d, L, H = B * m.seq_len, m.d_model, m.n_layers, m.n_heads
    total = N * d * (4 * L + 2) + 3 * N + L * H + (2 * L * m.kv_heads * m.head_dim * d if m.kv_heads % P else 0)
    return total, L * H


def wire_factor(op: str, P: int) -> float:
    return 2 * (P - 1) / P if op == "all_reduce" else (P - 1) / P


# --------------------------------------------------------------------------- worker
def _site(frame) -> str:
    """The megasink function that called the collective; for ReduceFromTP (called from the
    embedding and from row-parallel linears) the module whose forward applied it."""
    def skip(f):
        path = f.f_code.co_filename.replace(os.sep, "/")
        return "/torch/" in path or path.endswith("/benchmarks/tp_comm.py")

    f = frame
    while f is not None and skip(f):
        f = f.f_back
    if f is None:
        return "?"
    name = getattr(f.f_code, "co_qualname", f.f_code.co_name)
    if name.startswith("ReduceFromTP"):
        g = f.f_back
        while g is not None and skip(g):
            g = g.f_back
        owner = getattr(g.f_code, "co_qualname", g.f_code.co_name).split(".")[0] if g is not None else "?"
        return f"{owner}/ReduceFromTP"
    return name


def _instrument(log: list, phase: list) -> None:
    """Replace torch.distributed's collectives by recording wrappers (megasink calls them
    as ``dist.<op>`` at run time, so patching the module attributes is enough)."""
    import torch
    import torch.distributed as dist

    def wrap(op_name, fn):
        def inner(*args, **kwargs):
            if op_name == "all_gather":  # (output list, input): count the gathered result
                numel, elem, shape = sum(t.numel() for t in args[0]), args[1].element_size(), list(args[1].shape)
            else:
                t = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("tensor")
                numel, elem, shape = (t.numel(), t.element_size(), list(t.shape)) if t is not None else (0, 0, None)
            log.append(dict(op=op_name, site=_site(sys._getframe(1)), phase=phase[0], numel=numel,
                            bytes=numel * elem, shape=shape, reduce_op=str(kwargs.get("op", "SUM")).split(".")[-1]))
            return fn(*args, **kwargs)

        return inner

    for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "reduce_scatter",
                 "broadcast", "all_to_all_single", "all_to_all", "reduce", "gather", "scatter", "send", "recv",
                 "isend", "irecv"):
        if hasattr(dist, name):
            setattr(dist, name, wrap(name, getattr(dist, name)))


def classify(rec: dict, m) -> tuple:
    """A record -> its formula key (phase, op, site)."""
    site = rec["site"]
    if site.startswith("CopyToTP"):
        weight = rec["shape"] == [m.kv_heads * m.head_dim, m.d_model]
        site = "CopyToTP (replicated kv weight)" if weight else "CopyToTP (activation)"
    else:
        site = {"VocabParallelCrossEntropy.forward": "VocabParallelCrossEntropy",
                "globalize": "stats.globalize"}.get(site, site)
    return rec["phase"], rec["op"], site


def _worker(rank, world, port, out_dir, cfg_kw, B):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    from common import packed_doc_ids

    from megasink.config import AuxLossConfig, ModelConfig
    from megasink.model import importance as imp_lib
    from megasink.model.transformer import Transformer
    from megasink.parallel import stats
    from megasink.parallel.dims import ParallelDims
    from megasink.parallel.tensor import apply_tensor_parallel, cross_entropy_sum

    dist.init_process_group("gloo", rank=rank, world_size=world)
    dims = ParallelDims(tp=world, pp=1, dp=1, rank=rank)
    dims.build_groups()
    log, phase = [], ["setup"]
    _instrument(log, phase)
    results = {}
    for variant in VARIANTS:
        m = ModelConfig(attention=variant, **cfg_kw)
        torch.manual_seed(0)
        model = apply_tensor_parallel(Transformer(m, AuxLossConfig(coef=1e-2)), dims)
        g = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, m.vocab_size, (B, m.seq_len), generator=g)  # same batch on every TP rank
        doc = packed_doc_ids(B, m.seq_len, max(4, m.seq_len // 3))
        start = len(log)
        phase[0] = "forward"  # megasink/train/trainer.py with one micro-batch, dp = 1
        out = model(tokens, doc)
        loss = cross_entropy_sum(out.logits, tokens.roll(-1, 1), dims) / tokens.numel()
        s, c = stats.globalize(out.gate_sums, out.gate_count, dims)
        _, grad = imp_lib.aux_loss_and_grad(s, c, model.routed_mask(), 1e-2)
        loss = stats.attach_aux_grad(loss, out.gate_sums, grad, dims, scale=1.0)
        phase[0] = "backward"
        loss.backward()
        phase[0] = "after"
        results[variant] = log[start:]
    dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(results, f)


def run(P: int, cfg_kw: dict, B: int) -> list:
    """-> per-rank {variant: [records]}."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(P, free_port(), out_dir, cfg_kw, B), nprocs=P, join=True)
        res = []
        for r in range(P):
            with open(os.path.join(out_dir, f"rank{r}.pkl"), "rb") as f:
                res.append(pickle.load(f))
        return res


# --------------------------------------------------------------------------- checks
def aggregate(records: list, m) -> dict:
    """{key: (calls, elements per call)}; raises when one site moves different sizes."""
    agg: dict = {}
    for rec in records:
        key = classify(rec, m)
        calls, per = agg.get(key, (0, rec["numel"]))
        if per != rec["numel"]:
            raise AssertionError(f"{key}: calls of {per} and {rec['numel']} elements")
        agg[key] = (calls + 1, per)
    return agg


def paper_configs() -> list:
    """Formula-only share of the importance all-gather for the repository's big configs."""
    from megasink.config import load_config

    rows = []
    for name in ("0.6b-sink", "1b-sink", "2b-sink"):
        path = os.path.join(ROOT, "configs", f"{name}.yaml")
        if not os.path.exists(path):
            continue
        cfg = load_config(path)
        m, B, P = cfg.model, cfg.train.micro_batch_size, max(2, cfg.parallel.tp)
        total, imp = formula_total(m, B, P)
        rows.append([name, f"{m.n_layers}L d{m.d_model} {m.n_heads}h", f"{B} x {m.seq_len}", P,
                     f"{total * F32 / 2**20:.1f}", f"{imp * F32} B", f"{imp / total:.1e}"])
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    from megasink.config import ModelConfig, validate_model

    cfg_kw = dict(n_layers=args.layers, d_model=args.d_model, n_heads=args.heads, n_kv_heads=args.kv_heads,
                  vocab_size=args.vocab, seq_len=args.seq)
    sizes = [2] if args.quick else [int(x) for x in args.tp.split(",")]
    print(f"# tp_comm.py{' --quick' if args.quick else ''}: {args.layers} layers, d_model {args.d_model}, "
          f"{args.heads} heads / {args.kv_heads} kv, vocab {args.vocab}, B x T = {args.batch} x {args.seq}, "
          f"fp32, gloo, tp in {sizes}")
    ok, dump, summary = True, {}, []
    for P in sizes:
        m = ModelConfig(attention="sink", **cfg_kw)
        validate_model(m)
        if args.heads % P or args.vocab % P or (args.kv_heads % P and P % args.kv_heads):
            raise SystemExit(f"tp={P} does not divide heads / vocab / kv heads of this model")
        per_rank = run(P, cfg_kw, args.batch)
        exp = expected(m, args.batch, P)
        for variant in VARIANTS:
            for rank, res in enumerate(per_rank):
                got = aggregate(res[variant], m)
                if got != exp:
                    ok = False
                    print(f"MISMATCH tp={P} {variant} rank {rank}:\n  got      {got}\n  expected {exp}")
            dump[f"tp{P}/{variant}"] = per_rank[0][variant]
        # one table per tp size: the records are the same for every variant and rank when ok
        got = aggregate(per_rank[0]["sink"], m)
        rows, tot_pay, tot_wire, imp_pay, imp_wire = [], 0, 0.0, 0, 0.0
        for key in sorted(got, key=lambda k: (k[0] != "forward", k[2])):
            calls, per = got[key]
            pay = calls * per * F32
            wire = pay * wire_factor(key[1], P)
            tot_pay, tot_wire = tot_pay + pay, tot_wire + wire
            if key[2] == "stats.globalize":
                imp_pay, imp_wire = imp_pay + pay, imp_wire + wire
            rows.append([key[0], key[1], key[2], calls, per, f"{pay:,}", f"{wire:,.0f}",
                         "ok" if exp.get(key) == got[key] else f"expected {exp.get(key)}"])
        for key in set(exp) - set(got):
            rows.append([key[0], key[1], key[2], 0, 0, 0, 0, f"expected {exp[key]}"])
        rows.append(["total", "", "", sum(c for c, _ in got.values()), "", f"{tot_pay:,}", f"{tot_wire:,.0f}", ""])
        print(f"\n### tp={P}, the trainer's step (forward + backward), per rank\n")
        print(table(["phase", "op", "call site", "calls", "elements/call", "payload bytes", "ring wire bytes",
                     "formula"], rows))
        total_formula, imp_formula = formula_total(m, args.batch, P)
        if total_formula * F32 != tot_pay:
            ok = False
            print(f"MISMATCH: closed form {total_formula * F32} bytes != measured {tot_pay}")
        print(f"\nimportance all-gather share: {imp_pay / tot_pay:.3e} of the payload, "
              f"{imp_wire / tot_wire:.3e} of the ring wire bytes")
        summary.append(dict(tp=P, payload=tot_pay, wire=tot_wire, imp_payload=imp_pay,
                            imp_share=imp_pay / tot_pay, imp_wire_share=imp_wire / tot_wire))
    print("\n### Formula only: importance all-gather share at the repository's big configs (tp >= 2)\n")
    print(table(["config", "model", "B x T", "tp", "payload MiB/step", "importance", "share"], paper_configs()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "records": dump}, f, indent=1)
    print("\nrecords " + ("match the formula exactly on every rank, variant and tp size" if ok else "DO NOT MATCH"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
