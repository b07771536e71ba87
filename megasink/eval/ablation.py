"""Head ablation: what head collapse costs (the library behind tools/ablate_heads.py).

On the documents head diagnosis uses (megasink/eval/inputs.py: the same --data, --num-samples,
--seq-len and --shuffle-seed give the same samples), the k least important heads of every
layer are masked, k = 0 ... H-1, and the validation loss is measured:

- ``importance``: heads in ascending measured importance (diagnosis on the same samples, or an
  importance.json given with --importance);
- ``random``: a seeded random order per layer, the control.

A masked head contributes nothing to its layer's output: its slice of the attention output,
the (B, T, nh * hd) input of ``wo``, is zeroed by a forward pre-hook (so every attention
variant and kernel is masked the same way, from outside the model). A collapsed model loses
little when its dormant heads (megasink/heatmap.py's definition) go; a balanced one loses about
as much as the random order.

Loss is the mean cross-entropy (nats) over every predicted token of the samples (a sample of
T tokens predicts T - 1); bits/byte divides the summed loss by ln 2 and by the UTF-8 bytes of
the predicted tokens (decoded with the model's tokenizer; omitted without one). Outputs in
``--out``: ``ablation.json``, ``ablation.png`` (loss against k, bits/byte on the right axis)
and ``summary.txt`` (the table the CLI prints).
"""
from __future__ import annotations

import argparse
import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

ORDERS = ("importance", "random")


@dataclass
class Ablation:
    model: str
    variant: str
    importance: torch.Tensor  # (L, H)
    orders: dict  # {order: [L][H] heads, first masked first}
    nll: dict  # {order: [H] summed nll (nats) with k = 0 ... H-1 heads masked per layer}
    num_samples: int
    num_targets: int  # predicted tokens
    num_bytes: Optional[int]  # UTF-8 bytes of the predicted tokens; None without a tokenizer
    seq_len: int
    seed: int
    data: list = field(default_factory=list)
    num_asked: int = 0  # --num-samples (0: as many as found)

    @property
    def loss(self) -> dict:
        """{order: [H] mean nll per predicted token}."""
        return {o: [v / self.num_targets for v in vals] for o, vals in self.nll.items()}

    @property
    def bpb(self) -> Optional[dict]:
        """{order: [H] bits per byte}, or None without a tokenizer."""
        if not self.num_bytes:
            return None
        return {o: [v / math.log(2) / self.num_bytes for v in vals] for o, vals in self.nll.items()}


@contextmanager
def masked_heads(model, heads: list):
    """While inside, heads[l] (global head indices) of layer l contribute nothing: their slices of
    the input of ``wo``, the attention output (B, T, nh * hd), are zeroed."""
    handles = []
    try:
        for name, layer in model.layers.items():
            attn = layer.attention
            cols = torch.zeros(attn.wo.in_features, dtype=torch.bool, device=attn.wo.weight.device)
            for h in heads[int(name)]:
                cols[h * attn.head_dim:(h + 1) * attn.head_dim] = True
            if cols.any():
                handles.append(attn.wo.register_forward_pre_hook(
                    lambda module, args, cols=cols: (args[0].masked_fill(cols, 0.0),)))  # (B, T, nh * hd)
        yield model
    finally:
        for handle in handles:
            handle.remove()


def masking_orders(importance: torch.Tensor, seed: int) -> dict:
    """{"importance": ascending importance per layer, "random": a seeded permutation per layer}."""
    L, H = importance.shape
    g = torch.Generator().manual_seed(seed)
    return {"importance": importance.argsort(dim=-1, stable=True).tolist(),
            "random": [torch.randperm(H, generator=g).tolist() for _ in range(L)]}


@torch.no_grad()
def total_nll(model, batches: list, device: str = "cpu") -> float:
    """Summed next-token cross-entropy (nats) over every predicted token of the batches."""
    total = 0.0
    for tokens in batches:
        tokens = tokens.to(device)
        logits = model(tokens[:, :-1]).logits  # (B, T - 1, V)
        nll = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none")
        total += nll.double().sum().item()
    return total


def ablation_nll(model, batches: list, orders: dict, device: str = "cpu", progress: bool = False) -> dict:
    """{order: [H] summed nll with the first k heads of each layer's order masked, k = 0 ... H-1}."""
    from tqdm import tqdm

    H = len(next(iter(orders.values()))[0])
    with tqdm(total=1 + len(orders) * (H - 1), desc="masked forward passes", disable=not progress) as bar:
        base = total_nll(model, batches, device)
        bar.update(1)
        out = {}
        for name, order in orders.items():
            out[name] = [base]
            for k in range(1, H):
                with masked_heads(model, [row[:k] for row in order]):
                    out[name].append(total_nll(model, batches, device))
                bar.update(1)
    return out


def predicted_bytes(samples: list, decode) -> int:
    """UTF-8 bytes of every sample's predicted tokens (all but the first), as they read in context."""
    return sum(len(decode(s).encode()) - len(decode(s[:1]).encode()) for s in samples if len(s) >= 2)


def _load(model_path: str, device: str, backend: str, dtype: str):
    from megasink.eval.inputs import HFEagerGates, load_for_forward

    model = load_for_forward(model_path, device, backend, dtype)
    if isinstance(model, HFEagerGates):
        raise ValueError(f"{model_path}: head ablation needs a model megasink can represent (see the note above)")
    return model


def _importance(model, samples: list, importance_file: Optional[str], device: str, max_batch_tokens: int):
    """(L, H) importance: from an importance.json, or measured on the samples."""
    from megasink.eval.diagnose import gate_statistics

    L, H = model.cfg.n_layers, model.cfg.n_heads
    if importance_file:
        import json

        imp = torch.tensor(json.loads(Path(importance_file).read_text())["importance"], dtype=torch.float64)
        if imp.shape != (L, H):
            raise ValueError(f"--importance {importance_file}: {list(imp.shape)} values, the model has {L} x {H} heads")
        return imp
    sums, count, _ = gate_statistics(model, samples, device, max_batch_tokens)
    if count == 0:
        raise ValueError("no counted tokens: the data has no documents longer than one token")
    return sums / count


def ablate(model_path: str, data: list, num_samples: int = 200, seq_len: Optional[int] = None,
           shuffle_seed: Optional[int] = None, seed: int = 0, importance_file: Optional[str] = None,
           tokenizer: Optional[str] = None, text_key: str = "text", device: str = "cpu", backend: str = "auto",
           max_batch_tokens: int = 16384, dtype: str = "auto", progress: bool = False) -> Ablation:
    """Validation loss with k = 0 ... H-1 heads masked per layer, by importance and in a seeded random
    order. ``seq_len`` None: the length the model was trained for. Notes on the samples (fewer than
    asked for, longer than the model was trained for) go to stderr."""
    from megasink.data.documents import batch_by_length
    from megasink.eval.inputs import default_seq_len, model_tokenizer, read_samples, sample_notes, trained_length
    from megasink.hf.tokenizer import load_decoder

    seq_len = seq_len or default_seq_len(model_path)
    model = _load(model_path, device, backend, dtype)
    tok = model_tokenizer(model_path, tokenizer)
    samples = read_samples(data, num_samples, seq_len, shuffle_seed, tok, text_key)
    for note in sample_notes(samples, num_samples, seq_len, trained_length(model_path)):
        print(note, file=sys.stderr)
    batches = [torch.as_tensor(b) for b in batch_by_length(samples, max_batch_tokens, min_tokens=2)]  # (B, T) each
    if not batches:
        raise ValueError("no sample has two tokens: nothing to predict")
    importance = _importance(model, samples, importance_file, device, max_batch_tokens)
    orders = masking_orders(importance, seed)
    nll = ablation_nll(model, batches, orders, device, progress)
    n_bytes = predicted_bytes(samples, load_decoder(tok)) if tok else None
    return Ablation(str(model_path), model.cfg.attention, importance, orders, nll, len(samples),
                    sum(t.numel() - t.shape[0] for t in batches), n_bytes, seq_len, seed, [str(p) for p in data],
                    num_samples)


# --------------------------------------------------------------------------- outputs


def to_json(a: Ablation) -> dict:
    from megasink.heatmap import dormant_mask

    L, H = a.importance.shape
    return {"model": a.model, "variant": a.variant, "data": a.data, "num_samples": a.num_samples,
            "num_targets": a.num_targets, "num_bytes": a.num_bytes, "seq_len": a.seq_len, "seed": a.seed,
            "layers": L, "heads": H, "k": list(range(H)), "importance": a.importance.tolist(), "orders": a.orders,
            "dormant_per_layer": [sum(row) for row in dormant_mask(a.importance.tolist())], "loss": a.loss,
            "bpb": a.bpb}


def summary(a: Ablation) -> str:
    """The table: loss (and bits/byte) per k for both orders."""
    from megasink.heatmap import DORMANT, dormant_mask

    L, H = a.importance.shape
    loss, bpb = a.loss, a.bpb
    asked = f" (found only {a.num_samples} of the {a.num_asked} asked for)" if a.num_samples < a.num_asked else ""
    dormant = dormant_mask(a.importance.tolist())
    lines = [f"head ablation: {a.model} ({a.variant}, {L} layers x {H} heads)",
             f"data: {a.num_samples} samples{asked}, <= {a.seq_len} tokens each, {a.num_targets} predicted tokens"
             + (f", {a.num_bytes} bytes" if a.num_bytes else " (no tokenizer: no bits/byte)"),
             f"dormant heads (importance < {DORMANT} x their layer's mean): {sum(map(sum, dormant))} of {L * H}, "
             f"per layer {' '.join(str(sum(row)) for row in dormant)}",
             f"k heads masked in every layer: least important first, or in a random order (seed {a.seed})", "",
             "   k   loss(importance)  loss(random)" + ("   bpb(importance)  bpb(random)" if bpb else "")]
    for k in range(H):
        row = f"{k:4d}   {loss['importance'][k]:16.5f}  {loss['random'][k]:12.5f}"
        lines.append(row + (f"   {bpb['importance'][k]:15.5f}  {bpb['random'][k]:11.5f}" if bpb else ""))
    return "\n".join(lines)


def plot_curves(a: Ablation) -> bytes:
    """PNG: loss against k for both orders; bits/byte on the right axis (a constant multiple of the loss)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    H = a.importance.shape[1]
    fig, ax = plt.subplots(figsize=(6, 4))
    for order, label, style in (("importance", "least important first", "o-"), ("random", "random order", "s--")):
        ax.plot(range(H), a.loss[order], style, label=label)
    ax.set_xlabel("heads masked per layer (k)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_xticks(range(H))
    if a.num_bytes:
        per_loss = a.num_targets / math.log(2) / a.num_bytes
        ax.secondary_yaxis("right", functions=(lambda x: x * per_loss, lambda y: y / per_loss)).set_ylabel(
            "bits per byte")
    ax.legend()
    ax.set_title(f"{Path(a.model).name} ({a.variant}): {a.num_samples} samples", fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def write_outputs(a: Ablation, out_dir) -> Path:
    """ablation.json, ablation.png and summary.txt in out_dir (each written atomically)."""
    from megasink.utils import atomic_write_bytes, atomic_write_json, atomic_write_text

    out = Path(out_dir)
    atomic_write_json(out / "ablation.json", to_json(a))
    atomic_write_bytes(out / "ablation.png", plot_curves(a))
    atomic_write_text(out / "summary.txt", summary(a) + "\n")
    return out


# --------------------------------------------------------------------------- command line


def main(argv=None) -> int:
    from megasink.eval.inputs import DefaultsFormatter, add_forward_args

    p = argparse.ArgumentParser(
        prog="ablate_heads.py", formatter_class=DefaultsFormatter,
        description="Head ablation: validation loss and bits/byte with the k least important heads of every layer "
                    "masked (k = 0 ... H-1), and in a seeded random order as the control, on the documents "
                    "diagnose_heads.py uses (same --data / --num-samples / --seq-len / --shuffle-seed). Writes "
                    "ablation.json, ablation.png and summary.txt.")
    add_forward_args(p, num_samples=200)
    p.add_argument("--seed", type=int, default=0, help="seed of the random masking order")
    p.add_argument("--importance", help="importance.json of diagnose_heads.py (default: measured on the samples)")
    args = p.parse_args(argv)
    try:
        a = ablate(args.model, args.data, args.num_samples, args.seq_len, args.shuffle_seed, args.seed,
                   args.importance, args.tokenizer, args.text_key, args.device, args.backend, args.max_batch_tokens,
                   args.dtype, progress=sys.stderr.isatty() and not args.no_progress)
    except (ValueError, OSError) as e:  # data / model / importance file that do not fit
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = write_outputs(a, args.out)
    print(summary(a))
    print(f"\nwrote {out / 'ablation.json'}, {out / 'ablation.png'}, {out / 'summary.txt'}")
    return 0
