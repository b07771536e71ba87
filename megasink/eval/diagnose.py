"""Head diagnosis: per-head importance of a trained model over a sample of documents.

The library behind tools/diagnose_heads.py (docs/design.md, "The method" and "File formats
and contracts"):

    Imp[l, h] = sum over samples and counted tokens of G[t, h] / number of counted tokens

G is the variant's gate (vanilla: 1 - attention on the document's first token, which is itself
not counted; sink: sigmoid(lse - s_h); gated: the head gate). A sample is one document
truncated to ``seq_len`` tokens (default: the length the model was trained for), in dataset
order or shuffled with a seed (megasink/data/documents.py). The model and its options are
megasink/eval/inputs.py's: megasink's forward gives the gates from its kernel's log-sum-exp,
without an attention matrix; only the transformers fallback for HF models megasink cannot
represent forms one, a layer at a time. Samples of equal length are batched (no padding, no
masks).

Outputs in ``--out``: ``importance.json`` (``layers``, ``heads``, ``importance`` [L][H], ``cv``
[L], ``shared_heads`` [L][m] when ``top_m`` > 0, readable as ``aux_loss.shared_heads``),
``importance.png`` (megasink/heatmap.py: colour importance / layer mean, per-layer CV on the
right, shared heads boxed) and ``summary.txt`` (the text printed by the CLI).
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch

from megasink.config import MIN_ROUTED_HEADS
from megasink.eval.inputs import HFEagerGates
from megasink.model import importance as imp_lib


@dataclass
class Diagnosis:
    model: str
    variant: str
    importance: torch.Tensor  # (L, H) float64
    num_samples: int
    num_tokens: int  # counted tokens (vanilla: without each document's first token)
    seq_len: int
    top_m: int = 0
    data: list = field(default_factory=list)
    num_asked: int = 0  # --num-samples (0: as many as found)
    trained_len: int = 0  # the length the model was trained for (0: unknown)

    @property
    def cv(self) -> torch.Tensor:
        """(L,) population std / mean of each layer's head importance."""
        return imp_lib.cv_squared(self.importance, torch.ones_like(self.importance, dtype=torch.bool)).sqrt()

    def shared_heads(self) -> list:
        """[L][top_m] head indices, most important first (ties: the lower head index first)."""
        if self.top_m <= 0:
            return []
        return imp_lib.top_m_indices(self.importance, self.top_m).tolist()


# --------------------------------------------------------------------------- importance


def _dims(model) -> tuple[int, int, int]:
    """(vocabulary, layers, heads) of a megasink model or an HFEagerGates."""
    if isinstance(model, HFEagerGates):
        return model.vocab_size, model.n_layers, model.n_heads
    return model.cfg.vocab_size, model.cfg.n_layers, model.cfg.n_heads


def _batch_gate_sums(model, tokens: torch.Tensor) -> tuple[torch.Tensor, int]:
    """tokens (B, T) -> (gate sums (L, H), counted tokens) by the model's own forward."""
    if isinstance(model, HFEagerGates):
        return model.gate_sums(tokens)
    out = model(tokens, logits=False)  # the output layer (tokens x vocabulary) is not needed
    if out.gate_sums is None or not torch.isfinite(out.gate_sums).all():
        raise ValueError("the model's forward gave no finite gate sums (weights with NaN or inf?)")
    return out.gate_sums, int(out.gate_count)


@torch.no_grad()
def gate_statistics(model, samples: Iterable[np.ndarray], device: str = "cpu", max_batch_tokens: int = 16384,
                    progress: bool = False, total: Optional[int] = None) -> tuple[torch.Tensor, int, int]:
    """(gate sums (L, H) float64, counted tokens, samples) over samples, batched by length."""
    from tqdm import tqdm

    from megasink.data.documents import batch_by_length

    vocab, n_layers, n_heads = _dims(model)
    sums = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    count, n = 0, 0
    with tqdm(total=total, desc="samples", disable=None if progress else True) as bar:  # None: a terminal only
        for batch in batch_by_length(samples, max_batch_tokens):
            tokens = torch.as_tensor(batch, device=device)  # (B, T)
            if int(tokens.max()) >= vocab or int(tokens.min()) < 0:
                raise ValueError(f"token id {int(tokens.max())} outside the model's vocabulary ({vocab}): "
                                 "data and model do not match")
            s, c = _batch_gate_sums(model, tokens)
            sums.add_(s.double().cpu())
            count, n = count + c, n + len(batch)
            bar.update(len(batch))
    return sums, count, n


def diagnose(model_path: str, data: list, num_samples: int = 500, seq_len: Optional[int] = None, top_m: int = 0,
             shuffle_seed: Optional[int] = None, tokenizer: Optional[str] = None, text_key: str = "text",
             device: str = "cpu", backend: str = "auto", max_batch_tokens: int = 16384,
             dtype: str = "auto", progress: bool = False) -> Diagnosis:
    """Per-head importance of the model at model_path over documents from the data paths.

    ``seq_len`` None: the length the model was trained for (inputs.default_seq_len). ``backend``
    and ``dtype`` as megasink/eval/inputs.py resolves them; gates and sums are accumulated in
    fp32 / fp64 whatever ``dtype``. Notes on the samples (fewer than asked for, longer than the
    model was trained for) go to stderr.
    """
    from megasink.eval.inputs import (default_seq_len, load_for_forward, model_tokenizer, read_samples,
                                      sample_notes, trained_length)

    seq_len = seq_len or default_seq_len(model_path)
    trained = trained_length(model_path)
    model = load_for_forward(model_path, device, backend, dtype)
    _, _, n_heads = _dims(model)
    if not 0 <= top_m <= n_heads - MIN_ROUTED_HEADS:
        raise ValueError(f"--top-m {top_m} must be in [0, {n_heads - MIN_ROUTED_HEADS}] for {n_heads} heads: "
                         f"fine-tuning needs at least {MIN_ROUTED_HEADS} routed (not shared) heads per layer")
    samples = read_samples(data, num_samples, seq_len, shuffle_seed, model_tokenizer(model_path, tokenizer), text_key)
    for note in sample_notes(samples, num_samples, seq_len, trained):
        print(note, file=sys.stderr)
    sums, count, n = gate_statistics(model, samples, device, max_batch_tokens, progress, total=len(samples))
    if count == 0:
        raise ValueError("no counted tokens: the data has no documents longer than one token")
    variant = model.variant if isinstance(model, HFEagerGates) else model.cfg.attention
    return Diagnosis(str(model_path), variant, sums / count, n, count, seq_len, top_m, [str(p) for p in data],
                     num_samples, trained[0])


# --------------------------------------------------------------------------- outputs


def to_json(d: Diagnosis) -> dict:
    L, H = d.importance.shape
    out = {"model": d.model, "variant": d.variant, "data": d.data, "num_samples": d.num_samples,
           "num_tokens": d.num_tokens, "seq_len": d.seq_len, "layers": L, "heads": H,
           "importance": d.importance.tolist(), "cv": d.cv.tolist()}
    if d.top_m > 0:
        out["top_m"] = d.top_m
        out["shared_heads"] = d.shared_heads()
    return out


def plot_heatmap(d: Diagnosis, path: str | os.PathLike) -> Path:
    """importance.png: the one heatmap (megasink/heatmap.py) with per-layer CV and shared heads."""
    from megasink.heatmap import Panel, save_importance_panels

    shared = f", top-{d.top_m} shared boxed" if d.top_m else ""
    panel = Panel(f"{Path(d.model).name} ({d.variant})", d.importance.tolist(), d.cv.tolist(), d.shared_heads())
    return save_importance_panels([panel], path, f"head diagnosis: {d.num_samples} samples, {d.num_tokens} tokens"
                                                 f"{shared}")


def _collapse_word(mean_cv: float) -> str:
    """A rough reading of the mean per-layer CV (thresholds are a rule of thumb, not from the paper)."""
    if mean_cv < 0.25:
        return "balanced: heads carry similar weight"
    if mean_cv < 0.5:
        return "mildly collapsed"
    if mean_cv < 1.0:
        return "collapsed: a few heads dominate most layers"
    return "severely collapsed: most heads are near-idle"


def _data_line(d: Diagnosis) -> str:
    asked = f" (found only {d.num_samples} of the {d.num_asked} asked for)" if d.num_samples < d.num_asked else ""
    trained = ""
    if d.trained_len:
        trained = (f" (longer than the {d.trained_len} the model was trained for)" if d.seq_len > d.trained_len
                   else f" (the model was trained for {d.trained_len})")
    return f"data: {d.num_samples} samples{asked}, <= {d.seq_len} tokens each{trained}, {d.num_tokens} counted tokens"


def summary(d: Diagnosis) -> str:
    """One screen of text: how collapsed the model is, layer by layer."""
    from megasink.heatmap import DORMANT, dormant_count

    imp, cv = d.importance, d.cv
    L, H = imp.shape
    eff = H / (1 + cv.pow(2))  # participation ratio (sum imp)^2 / sum imp^2 = H / (1 + CV^2)
    dormant = dormant_count(imp.tolist())
    lo, hi = divmod(int(imp.argmin()), H), divmod(int(imp.argmax()), H)
    lines = [
        f"head diagnosis: {d.model} ({d.variant}, {L} layers x {H} heads)",
        _data_line(d),
        f"importance: mean {imp.mean():.3f}, min {imp.min():.3f} (layer {lo[0]} head {lo[1]}), "
        f"max {imp.max():.3f} (layer {hi[0]} head {hi[1]})",
        f"CV per layer: mean {cv.mean():.3f}, max {cv.max():.3f} (layer {int(cv.argmax())}), min {cv.min():.3f}",
        f"effective heads per layer (H / (1 + CV^2)): mean {eff.mean():.1f} of {H}",
        f"dormant heads (importance < {DORMANT} x their layer's mean): {dormant} of {L * H} "
        f"({100 * dormant / (L * H):.0f}%)",
        f"verdict: {_collapse_word(float(cv.mean()))}",
        "",
        "layer    CV   eff.heads   min    max   " + (f"top-{d.top_m} share" if d.top_m else ""),
    ]
    shared = d.shared_heads()
    for layer in range(L):
        row = imp[layer]
        share = f"{row[shared[layer]].sum() / row.sum():.2f}" if shared else ""
        lines.append(f"{layer:5d} {cv[layer]:6.3f} {eff[layer]:7.1f}    {row.min():.3f}  {row.max():.3f}   {share}")
    return "\n".join(lines)


def write_outputs(d: Diagnosis, out_dir: str | os.PathLike) -> Path:
    from megasink.utils import atomic_write_json, atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "importance.json", to_json(d))
    plot_heatmap(d, out / "importance.png")
    atomic_write_text(out / "summary.txt", summary(d) + "\n")
    return out


# --------------------------------------------------------------------------- command line


def main(argv=None) -> int:
    from megasink.eval.inputs import DefaultsFormatter, add_forward_args

    p = argparse.ArgumentParser(
        prog="diagnose_heads.py", formatter_class=DefaultsFormatter,
        description="Per-head importance (token-weighted mean gate) of a megasink checkpoint or an HF causal-LM "
                    "directory over documents; writes importance.json, importance.png and summary.txt.")
    add_forward_args(p, num_samples=500)
    p.add_argument("--top-m", type=int, default=0, help="also choose the top-m heads per layer as shared heads")
    args = p.parse_args(argv)
    try:
        d = diagnose(args.model, args.data, args.num_samples, args.seq_len, args.top_m, args.shuffle_seed,
                     args.tokenizer, args.text_key, args.device, args.backend, args.max_batch_tokens,
                     args.dtype, progress=not args.no_progress)
    except (ValueError, OSError) as e:  # data / model / options that do not fit
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = write_outputs(d, args.out)
    print(summary(d))
    print(f"\nwrote {out / 'importance.json'}, {out / 'importance.png'}, {out / 'summary.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
